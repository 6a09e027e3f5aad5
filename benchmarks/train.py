"""Training and sampling throughput of the Stem denoisers (CPU or GPU), written to benchmarks/results/train.json.

Synthetic inputs of the real shapes: the default 100-gene panel, the default condition (the 4896-d spatial context of
the 1632-d EfficientNet-Lite0 stage features) and the diffusion settings of :func:`stemst.tl.fit` (mean head on 256
principal components plus a 256-wide MLP head, the network seeing 8 whitened components), batch 256: timing only.
Achieved FLOP/s = the FLOPs of one training step (forward + backward, counted by
:class:`torch.utils.flop_counter.FlopCounterMode`) x steps/s; on CUDA also as a fraction of the GPU's dense bf16
peak (a table of known GPUs, or ``--peak-tflops``).

    OMP_WAIT_POLICY=PASSIVE python benchmarks/train.py [--quick] [--device cpu]
    python benchmarks/train.py --device cuda        # the paper-sized transformer in bf16 autocast
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from stemst._torch import resolve_device, torch_generator
from stemst.model import DEFAULT_PRESET, DiffusionModel, NetworkConfig, train_step
from stemst.model.networks import n_parameters
from stemst.tl import StemstModel

DOCS = Path(__file__).parents[1] / "docs" / "benchmarks_train.md"

CONFIGS = {
    "mlp_small (CPU default)": NetworkConfig("mlp"),
    "transformer_small": NetworkConfig("transformer", depth=2, width=64, heads=4, mlp_ratio=4.0),
    "transformer_stem (paper: depth 12, width 384)": NetworkConfig("transformer"),
}


#: the diffusion settings :func:`stemst.tl.fit` uses by default (the package's preset)
FIT_DIFFUSION = DEFAULT_PRESET.diffusion


def make_model(network: NetworkConfig, genes: int, dim: int, device: torch.device) -> StemstModel:
    """The package's model with :func:`stemst.tl.fit`'s diffusion settings; heads and statistics from random data."""
    gen = torch.Generator().manual_seed(0)
    module = DiffusionModel(genes, dim, network, FIT_DIFFUSION)
    cond = torch.randn(1024, dim, generator=gen)
    module.set_projection(cond)
    module.set_head(0.01 * torch.randn(256, genes, generator=gen), torch.full((genes,), 3.0))
    hidden = FIT_DIFFUSION.head_hidden
    module.set_mlp_head(
        0.01 * torch.randn(dim, hidden, generator=gen),
        torch.zeros(hidden),
        0.01 * torch.randn(hidden, genes, generator=gen),
        torch.full((genes,), 3.0),
    )
    module.set_statistics(cond, torch.rand(1024, genes, generator=gen) * 6, projection=False)
    return StemstModel(module, genes=[f"g{i}" for i in range(genes)], embedding_key="X_bench").to(device)


def time_training(model: StemstModel, steps: int, batch: int, device: torch.device) -> float:
    """Steps per second of :func:`stemst.model.train_step`, the step :func:`stemst.tl.fit` runs."""
    module = model.module.train()
    ema = copy.deepcopy(module).eval().requires_grad_(False)
    config = replace(DEFAULT_PRESET.training, steps=steps, batch_size=batch).resolved(
        8 * batch, default_lr=module.network.default_lr
    )
    opt = torch.optim.AdamW(module.parameters(), lr=config.lr)
    gen = torch_generator(0, device)
    cond = torch.randn(8 * batch, model.embedding_dim, device=device)
    y = torch.rand(8 * batch, model.n_genes, device=device) * 6

    def step(i: int) -> None:
        train_step(module, opt, ema, cond, y, step=i, config=config, generator=gen)

    if steps > 1:
        step(0)  # warm-up
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for i in range(steps):
        step(i)
    if device.type == "cuda":
        torch.cuda.synchronize()
    module.eval()
    return steps / (time.perf_counter() - t0)


#: dense bf16 tensor-core peak (TFLOP/s, without sparsity) of GPUs by name fragment, from the vendors' data sheets
PEAK_BF16_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "L4": 121.0, "A10": 125.0}


def peak_tflops(device: torch.device, override: float | None) -> float | None:
    """The GPU's dense bf16 peak, or ``override``; None on CPU or for an unknown GPU."""
    if override is not None:
        return override
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)


def step_flops(model: StemstModel, batch: int, device: torch.device, counted: int = 16) -> int:
    """FLOPs of one training step's forward and backward pass (the optimiser's few are left out).

    Counted on ``counted`` rows and scaled to ``batch``: every sample is computed alone (attention is across the
    genes of one spot), so the count is linear in the batch.
    """
    from torch.utils.flop_counter import FlopCounterMode

    module = copy.deepcopy(model.module).train()
    cond = torch.randn(counted, model.embedding_dim, device=device)
    y = torch.rand(counted, model.n_genes, device=device) * 6
    with FlopCounterMode(display=False) as counter:
        loss, _ = module.loss(y, cond, generator=torch_generator(0, device))
        loss.mean().backward()
    return int(counter.get_total_flops()) * batch // counted


def time_sampling(model: StemstModel, n_spots: int, n_samples: int, steps: int) -> float:
    X = np.random.default_rng(0).normal(size=(n_spots, model.embedding_dim)).astype(np.float32)
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
    ap.add_argument("--peak-tflops", type=float, default=None, help="the device's peak, for the utilisation")
    args = ap.parse_args()
    if args.table_only:
        write_docs(json.loads(Path(args.out).read_text()))
        return
    dev = resolve_device(args.device)
    genes, dim, batch = 100, 3 * 1632, 256
    rows = []
    peak = peak_tflops(dev, args.peak_tflops)
    for name, network in CONFIGS.items():
        model = make_model(network, genes, dim, dev)
        big = "stem" in name and dev.type == "cpu"
        n_train = 1 if big else (10 if args.quick else 50)
        n_spots = 1 if big else (50 if args.quick else 200)
        steps_per_s = time_training(model, n_train, batch, dev)
        flops = step_flops(model, batch, dev)
        row = {
            "config": name,
            **{k: getattr(network, k) for k in ("architecture", "depth", "width", "heads", "mlp_ratio")},
            "parameters": n_parameters(model.module.net),
            "genes": genes,
            "embedding_dim": dim,
            "batch_size": batch,
            "train_steps_per_s": round(steps_per_s, 3),
            "step_gflop": round(flops / 1e9, 3),
            "achieved_tflops": round(flops * steps_per_s / 1e12, 4),
            "peak_tflops": peak,
            "utilisation": None if peak is None else round(flops * steps_per_s / 1e12 / peak, 4),
            "autocast": "bf16" if dev.type == "cuda" else "none",
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
        "command": "python benchmarks/train.py" + (" --quick" if args.quick else "") + f" --device {args.device}",
        "note": f"synthetic inputs of the real shapes; 1-min load average {os.getloadavg()[0]:.1f} at the end",
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

    cols = ["architecture", "parameters", "train_steps_per_s", "step_gflop", "achieved_tflops", "utilisation"]
    cols += ["sampled_spots_per_s"]
    df = pd.DataFrame(out["results"]).set_index("config")
    df = df[[c for c in cols if c in df.columns and df[c].notna().any()]]
    DOCS.write_text(
        "## Training and sampling speed\n\n"
        f"Measured with `{out.get('command', 'python benchmarks/train.py --quick --device cpu')}` on {out['cpu']} ({out['device']}, "
        f"{out['torch_threads']} torch threads, torch {out['torch']}); {out['note']}. Batch 256, 100 genes, 4896-d "
        "conditions (the default spatial context) with `stemst.tl.fit`'s mean head and 8 whitened components; sampling: DPM-Solver++(2M), 25 steps, 20 samples per spot. `step_gflop`: FLOPs of one step's "
        "forward + backward (FlopCounterMode); `achieved_tflops` = that x steps/s; `utilisation` = achieved / the GPU's "
        "dense bf16 peak (on CUDA only).\n\n" + markdown_table(df, floatfmt=".3g") + "\n"
    )


if __name__ == "__main__":
    main()
