"""Training and sampling throughput of the Stem denoisers (CPU or GPU), written to benchmarks/results/train.json.

Synthetic inputs of the real shapes (200 genes, 1280-d EfficientNet-Lite0 embeddings, batch 256): timing only.

    OMP_WAIT_POLICY=PASSIVE python benchmarks/train.py [--quick] [--device cpu]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import numpy as np
import torch

from stemst.tl import _diffusion as D
from stemst.tl._model import StemstModel, autocast, resolve_device
from stemst.tl._nets import DEFAULTS, n_parameters

DOCS = Path(__file__).parents[1] / "docs" / "benchmarks_train.md"

CONFIGS = {
    "mlp_small (CPU default)": {"architecture": "mlp", "net": {**DEFAULTS["mlp"]}},
    "transformer_small": {
        "architecture": "transformer",
        "net": {"depth": 2, "width": 64, "heads": 4, "mlp_ratio": 4.0},
    },
    "transformer_stem (paper: depth 12, width 384)": {
        "architecture": "transformer",
        "net": {**DEFAULTS["transformer"]},
    },
}


def make_model(cfg: dict, genes: int, dim: int, device: torch.device) -> StemstModel:
    config = {
        "genes": [f"g{i}" for i in range(genes)],
        "embedding_key": "X_bench",
        "transform": "log2p1",
        "architecture": cfg["architecture"],
        "net": {**cfg["net"], "learn_variance": True},
        "cond_dim": dim,
        "diffusion": {
            "n_steps": 1000,
            "beta_start": 1e-4,
            "beta_end": 0.02,
            "parameterization": "v",
            "vlb_weight": 1e-3,
        },
        "clip_margin": 0.1,
    }
    stats = {
        "emb_mean": torch.zeros(dim),
        "emb_std": torch.ones(dim),
        "y_mean": torch.zeros(genes),
        "y_std": torch.ones(genes),
        "y_min": -3 * torch.ones(genes),
        "y_max": 3 * torch.ones(genes),
    }
    return StemstModel.build(config, stats).to(device)


def time_training(model: StemstModel, steps: int, batch: int, device: torch.device) -> float:
    net = model.net.train()
    opt = torch.optim.AdamW(net.parameters(), lr=1e-4)
    sched = D.make_schedule(1000).to(device)
    sched = D.Schedule(*(getattr(sched, f).float() for f in sched.__dataclass_fields__))
    g, d = model.n_genes, model.embedding_dim
    y, c = torch.randn(batch, g, device=device), torch.randn(batch, d, device=device)

    def step() -> None:
        t = torch.randint(1000, (batch,), device=device)
        noise = torch.randn_like(y)
        xt = D.q_sample(sched, y, t, noise)
        with autocast(device):
            raw, v = net(xt, t, c)
        loss, _ = D.hybrid_loss(sched, raw.float(), v, y, xt, t, noise, parameterization="v")
        opt.zero_grad(set_to_none=True)
        loss.mean().backward()
        opt.step()

    if steps > 1:
        step()  # warm-up
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return steps / (time.perf_counter() - t0)


def time_sampling(model: StemstModel, n_spots: int, n_samples: int, steps: int) -> float:
    X = np.random.default_rng(0).normal(size=(n_spots, model.embedding_dim)).astype(np.float32)
    model.net.eval()
    model.sample(X[:2], n_samples=1, steps=2, rng=0, progress=False)
    t0 = time.perf_counter()
    model.sample(X, n_samples=n_samples, steps=steps, rng=0, progress=False)
    return n_spots / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="auto")
    ap.add_argument("--quick", action="store_true", help="fewer timed steps (for a busy CPU)")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "train.json"))
    ap.add_argument("--table-only", action="store_true", help="rebuild the docs table from the JSON")
    args = ap.parse_args()
    if args.table_only:
        write_docs(json.loads(Path(args.out).read_text()))
        return
    dev = resolve_device(args.device)
    genes, dim, batch = 200, 1280, 256
    rows = []
    for name, cfg in CONFIGS.items():
        model = make_model(cfg, genes, dim, dev)
        big = "stem" in name and dev.type == "cpu"
        n_train = 1 if big else (10 if args.quick else 50)
        n_spots = 1 if big else (50 if args.quick else 200)
        row = {
            "config": name,
            "architecture": cfg["architecture"],
            **cfg["net"],
            "parameters": n_parameters(model.net),
            "genes": genes,
            "embedding_dim": dim,
            "batch_size": batch,
            "train_steps_per_s": round(time_training(model, n_train, batch, dev), 3),
            "timed_train_steps": n_train,
            "sampler": "dpmpp_2m",
            "sampling_steps": 25,
            "n_samples": 20,
            "sampled_spots_per_s": round(time_sampling(model, n_spots, 20, 25), 3),
            "timed_spots": n_spots,
        }
        print(json.dumps(row), flush=True)
        rows.append(row)
    out = {
        "device": str(dev) if dev.type == "cpu" else torch.cuda.get_device_name(dev),
        "cpu": platform.processor() or platform.machine(),
        "torch_threads": torch.get_num_threads(),
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", ""),
        "torch": torch.__version__,
        "note": "synthetic inputs of the real shapes; the CPU was shared with other jobs, so treat as rough numbers",
        "results": rows,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1))
    write_docs(out)
    print("wrote", args.out, "and", DOCS)


def write_docs(out: dict) -> None:
    """Markdown table for the docs (``--table-only`` rebuilds it from the JSON)."""
    import pandas as pd

    from stemst._utils import markdown_table

    cols = ["architecture", "parameters", "train_steps_per_s", "sampled_spots_per_s"]
    df = pd.DataFrame(out["results"]).set_index("config")[cols]
    DOCS.write_text(
        "## Training and sampling speed\n\n"
        f"Measured with `python benchmarks/train.py --quick --device cpu` on {out['cpu']} ({out['device']}, "
        f"{out['torch_threads']} torch threads, torch {out['torch']}); {out['note']}. Batch 256, 200 genes, 1280-d "
        "embeddings; sampling: DPM-Solver++(2M), 25 steps, 20 samples per spot. No GPU was available when this was "
        "measured.\n\n" + markdown_table(df, floatfmt=".3g") + "\n"
    )


if __name__ == "__main__":
    main()
