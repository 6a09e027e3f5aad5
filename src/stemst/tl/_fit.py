"""Training of the Stem diffusion model: :func:`fit`."""

from __future__ import annotations

import copy
import json
import math
import os
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from stemst._logging import logger
from stemst._schema import TABLE_KEY, UNS_KEY
from stemst.tl import _diffusion as D
from stemst.tl._data import as_tables, training_set
from stemst.tl._model import StemstModel, autocast, resolve_device, torch_generator
from stemst.tl._nets import DEFAULTS

CHECKPOINT_FILE = "checkpoint.pt"
#: settings that must match between a checkpoint and a resumed run
_RESUME_KEYS = ("genes", "embedding_key", "transform", "architecture", "net", "diffusion", "cond_dim", "target_scaling")


def ema_decay_at(step: int, decay: float) -> float:
    """EMA decay after ``step`` updates: ``min(decay, (1 + step) / (10 + step))``.

    The warm-up lets a short run (a few thousand steps on a CPU) still average over its recent weights instead of
    keeping mostly the random initialisation, while long runs use ``decay`` (0.9999, the paper's).
    """
    return min(decay, (1.0 + step) / (10.0 + step))


def _lr_at(step: int, *, lr: float, total: int, schedule: str, warmup: int) -> float:
    scale = min(1.0, (step + 1) / warmup) if warmup > 0 else 1.0
    if schedule == "cosine":
        progress = min(1.0, step / max(1, total))
        scale *= 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))
    elif schedule != "constant":
        raise ValueError(f"Unknown lr_schedule {schedule!r}; known: ['constant', 'cosine'].")
    return lr * scale


def _encoder_settings(tables: list[Any], key: str) -> dict[str, Any]:
    info = tables[0].uns.get(UNS_KEY, {}).get("embeddings", {}).get(key)
    if not info:
        return {}
    return json.loads(json.dumps(dict(info), default=lambda o: o.tolist() if hasattr(o, "tolist") else str(o)))


def _atomic_save(obj: dict[str, Any], path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def fit(
    data: Any,
    *,
    embedding_key: str = "X_efficientnet_lite0",
    genes: str | Iterable[str] | None = None,
    sections: str | Iterable[str] | None = None,
    transform: str = "log2p1",
    architecture: str = "mlp",
    depth: int | None = None,
    width: int | None = None,
    heads: int | None = None,
    mlp_ratio: float | None = None,
    dropout: float | None = None,
    steps: int | None = None,
    epochs: float | None = None,
    batch_size: int = 256,
    lr: float | None = None,
    weight_decay: float = 0.0,
    lr_schedule: str = "constant",
    warmup_steps: int = 0,
    max_grad_norm: float | None = 1.0,
    ema_decay: float = 0.9999,
    augment: bool = True,
    parameterization: str = "v",
    learn_variance: bool = True,
    vlb_weight: float = 1e-3,
    n_diffusion_steps: int = 1000,
    target_scaling: str = "standardize",
    clip_margin: float | None = 0.1,
    table_key: str = TABLE_KEY,
    device: str | torch.device = "auto",
    rng: int = 0,
    checkpoint_dir: str | os.PathLike | None = None,
    checkpoint_every: int = 1000,
    resume: bool = False,
    log_every: int | None = None,
    callback: Callable[[int, StemstModel], bool | None] | None = None,
    progress: bool = True,
) -> StemstModel:
    """Train the Stem conditional diffusion model on embedded, sequenced spots.

    Pairs (image embedding, expression of the gene panel on the ``transform`` scale) are collected with
    :func:`stemst.tl._data.training_set` (spots with no panel counts are dropped) and kept as tensors on the device;
    each step draws a batch of pairs by index, a diffusion step ``t`` and noise, and takes an AdamW step on the
    improved-DDPM hybrid loss. Sampling uses the exponential moving average (EMA) of the weights.

    Parameters
    ----------
    data
        SpatialData, AnnData, or a list of them, with ``obsm[embedding_key]`` (see :func:`stemst.pp.embed_patches`).
    embedding_key
        ``obsm`` key of the image embeddings.
    genes
        Gene panel: ``None`` (``var['stemst_panel']``), a boolean ``var`` column or gene names.
    sections
        Train on these sections (default all).
    transform
        Target transform (see :func:`stemst.pp.transform_counts`); ``"log2p1"`` is the paper's.
    architecture
        ``"mlp"`` (residual MLP over the gene vector; the default: trains in minutes on a CPU) or ``"transformer"``
        (the paper's gene-token transformer; use it on a GPU: one step of the paper-sized one takes seconds on a CPU).
    depth, width, heads, mlp_ratio, dropout
        Network sizes; ``None`` takes the architecture's defaults (transformer: 12, 384, 6, 4, the paper's; mlp: 4,
        256, -, 2). ``dropout`` is used by the MLP only.
    steps
        Optimisation steps. Default: ``epochs`` passes over the training pairs, or 2000 steps if both are ``None``.
    epochs
        Alternative to ``steps``: passes over the training pairs (spots x views).
    batch_size
        Pairs per step.
    lr, weight_decay
        AdamW settings. ``lr=None``: 1e-4 for the transformer (the paper's), 1e-3 for the MLP (short CPU runs).
    lr_schedule
        ``"constant"`` (paper) or ``"cosine"`` (decays to 10 % of ``lr`` over ``steps``).
    warmup_steps
        Linear learning-rate warm-up.
    max_grad_norm
        Clip the gradient norm (``None``: no clipping).
    ema_decay
        Maximum EMA decay; the decay used after ``n`` steps is ``min(ema_decay, (1 + n) / (10 + n))`` (see
        :func:`ema_decay_at`).
    augment
        Use the embeddings of the 8 flips/rotations ``obsm[f"{embedding_key}_views"]`` as training pairs, drawn
        uniformly (7 augmented : 1 original, the paper's ratio). Falls back to the originals, with a warning, when
        the table has no views.
    parameterization
        What the network predicts: ``"v"`` (the velocity ``sqrt(abar) eps - sqrt(1 - abar) x0``; default, see below),
        ``"eps"`` (the noise; the paper's) or ``"x0"`` (the data). On HER2ST with a few minutes of CPU training,
        v-prediction gave clearly better held-out correlations than eps-prediction (eps needs far more steps: its
        data estimate at high noise divides by ``sqrt(abar_T)`` ~ 0.006); the sampling and the hybrid loss are
        the same for all three.
    learn_variance
        Learn the reverse-step variance (improved DDPM) and train on the hybrid loss.
    vlb_weight
        ``lambda`` of the hybrid loss ``L_simple + lambda L_vlb`` (paper: 0.001).
    n_diffusion_steps
        ``T`` of the linear beta schedule (1e-4 .. 0.02 for T = 1000).
    target_scaling
        ``"standardize"``: per-gene zero mean, unit variance in the network's data space (inverted when sampling);
        ``"none"``: the transform's values as they are (paper).
    clip_margin
        While sampling, clip the data prediction to the training range widened by this fraction (``None``: no
        clipping).
    table_key
        Table key for SpatialData inputs.
    device
        ``"auto"`` (CUDA if available, else CPU) or a torch device. On CUDA: bf16 autocast and TF32 matmuls.
    rng
        Seed of the initialisation and of the training draws.
    checkpoint_dir
        Folder for ``checkpoint.pt`` (weights, EMA, optimizer, RNG state, step, history), written atomically every
        ``checkpoint_every`` steps and at the end.
    checkpoint_every
        Steps between checkpoints.
    resume
        Continue from ``checkpoint_dir/checkpoint.pt`` if it exists; the run then continues exactly as if it had
        never stopped (same batches, noise, optimizer and EMA state).
    log_every
        Steps between history entries (default ``steps // 200``, at least 1).
    callback
        Called as ``callback(step, model)`` at every history entry (``model`` holds the current EMA weights);
        returning ``True`` stops training (e.g. early stopping on a validation section).
    progress
        Show a progress bar with the loss.

    Returns
    -------
    The trained :class:`~stemst.tl.StemstModel`; ``model.history`` holds the training curve.

    Raises
    ------
    FloatingPointError
        If the loss becomes NaN or infinite; the message names the step, and the last checkpoint (if any) is kept.

    Examples
    --------
    >>> stemst.pp.embed_patches(sdata)  # doctest: +SKIP
    >>> model = stemst.tl.fit(sdata, sections=["C2", "C3", "C4", "C5"], steps=3000)  # doctest: +SKIP
    >>> stemst.tl.predict(model, sdata, sections="C6")  # doctest: +SKIP
    """
    from tqdm.auto import tqdm

    if architecture not in DEFAULTS:
        raise ValueError(f"Unknown architecture {architecture!r}; known: {sorted(DEFAULTS)}.")
    if parameterization not in D.PARAMETERIZATIONS:
        raise ValueError(f"Unknown parameterization {parameterization!r}; known: {list(D.PARAMETERIZATIONS)}.")
    if target_scaling not in ("standardize", "none"):
        raise ValueError(f"Unknown target_scaling {target_scaling!r}; known: ['standardize', 'none'].")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
    if lr is None:
        lr = 1e-4 if architecture == "transformer" else 1e-3
    dev = resolve_device(device)
    if dev.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True

    # ---- data -----------------------------------------------------------------------------------------------------
    tables = as_tables(data, table_key)
    use_views = bool(augment)
    if use_views and not all(f"{embedding_key}_views" in t.obsm for t in tables):
        logger.warning(
            "augment=True but obsm[%r] is missing; training on the original patches only. Run "
            "stemst.pp.embed_patches(..., augment=True) for the 8 flips/rotations.",
            f"{embedding_key}_views",
        )
        use_views = False
    ts = training_set(
        tables, embedding_key=embedding_key, genes=genes, transform=transform, sections=sections, views=use_views
    )
    pairs = ts.views.reshape(-1, ts.views.shape[-1]) if use_views else ts.X
    n_views = ts.views.shape[1] if use_views else 1
    if steps is None:
        steps = int(math.ceil(epochs * len(pairs) / batch_size)) if epochs is not None else 2000
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}.")
    log_every = log_every or max(1, steps // 200)
    logger.info(
        "Training %s on %d spots x %d view(s), %d genes, %d-d embeddings, %d steps on %s",
        architecture,
        ts.n_spots,
        n_views,
        len(ts.genes),
        ts.X.shape[1],
        steps,
        dev,
    )

    emb_mean = torch.as_tensor(pairs.mean(0, dtype=np.float64), dtype=torch.float32)
    emb_std = torch.as_tensor(pairs.std(0, dtype=np.float64), dtype=torch.float32).clamp_min(1e-6)
    y = torch.as_tensor(ts.Y, dtype=torch.float32)
    if target_scaling == "standardize":
        y_mean, y_std = y.mean(0), y.std(0).clamp_min(1e-3)
    else:
        y_mean, y_std = torch.zeros(y.shape[1]), torch.ones(y.shape[1])
    stats = {
        "emb_mean": emb_mean,
        "emb_std": emb_std,
        "y_mean": y_mean,
        "y_std": y_std,
        "y_min": y.min(0).values,
        "y_max": y.max(0).values,
    }
    net_cfg = {**DEFAULTS[architecture]}
    for k, v in {"depth": depth, "width": width, "heads": heads, "mlp_ratio": mlp_ratio}.items():
        if v is not None:
            net_cfg[k] = v
    if architecture == "mlp":
        net_cfg["dropout"] = float(dropout or 0.0)
    net_cfg["learn_variance"] = bool(learn_variance)
    config: dict[str, Any] = {
        "genes": ts.genes,
        "embedding_key": embedding_key,
        "encoder": _encoder_settings(tables, embedding_key),
        "transform": transform,
        "architecture": architecture,
        "net": net_cfg,
        "cond_dim": int(ts.X.shape[1]),
        "diffusion": {
            "n_steps": int(n_diffusion_steps),
            "beta_start": 1e-4,
            "beta_end": 0.02,
            "parameterization": parameterization,
            "vlb_weight": float(vlb_weight) if learn_variance else 0.0,
        },
        "target_scaling": target_scaling,
        "clip_margin": clip_margin,
        "training": {
            "steps": int(steps),
            "batch_size": int(batch_size),
            "lr": float(lr),
            "weight_decay": float(weight_decay),
            "lr_schedule": lr_schedule,
            "warmup_steps": int(warmup_steps),
            "max_grad_norm": max_grad_norm,
            "ema_decay": float(ema_decay),
            "augment": use_views,
            "n_views": int(n_views),
            "rng": int(rng),
            "n_spots": int(ts.n_spots),
            "sections": sorted(set(ts.sections.tolist())),
        },
        "steps_trained": 0,
    }

    # ---- model, optimiser, state ------------------------------------------------------------------------------------
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(rng))
        model = StemstModel.build(config, stats)
    net = model.net.to(dev).train()
    ema = copy.deepcopy(net).eval().requires_grad_(False)
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=weight_decay)
    gen = torch_generator(int(rng), dev)
    history: list[dict[str, float]] = []
    start_step, elapsed0 = 0, 0.0
    ckpt_path = Path(checkpoint_dir) / CHECKPOINT_FILE if checkpoint_dir is not None else None
    if resume and ckpt_path is None:
        raise ValueError("resume=True needs a checkpoint_dir.")
    if resume and ckpt_path.exists():
        ck = torch.load(ckpt_path, map_location="cpu", weights_only=True)
        old = json.loads(ck["config"])
        diff = [k for k in _RESUME_KEYS if old.get(k) != json.loads(json.dumps(config[k]))]
        if diff:
            raise ValueError(f"Cannot resume from {ckpt_path}: the settings differ in {diff}.")
        net.load_state_dict(ck["net"])
        ema.load_state_dict(ck["ema"])
        opt.load_state_dict(ck["optimizer"])
        gen.set_state(ck["rng"])
        start_step, history = int(ck["step"]), json.loads(ck["history"])
        elapsed0 = history[-1]["time"] if history else 0.0
        logger.info("Resuming from %s at step %d", ckpt_path, start_step)
    elif ckpt_path is not None:
        ckpt_path.parent.mkdir(parents=True, exist_ok=True)

    pairs_t = torch.as_tensor(pairs, device=dev)
    y_t = model.scale_y(y).to(dev)
    sched = D.make_schedule(n_diffusion_steps).to(dev)
    sched_f = D.Schedule(*(getattr(sched, f).float() for f in sched.__dataclass_fields__))
    ema_params, net_params = list(ema.parameters()), list(net.parameters())

    def finish(step: int) -> StemstModel:
        model.net = ema
        model.history = history
        model.config["steps_trained"] = step
        model.config["final_loss"] = history[-1]["loss"] if history else None
        return model

    def save_checkpoint(step: int) -> None:
        state = {
            "config": json.dumps(config),
            "net": net.state_dict(),
            "ema": ema.state_dict(),
            "optimizer": opt.state_dict(),
            "rng": gen.get_state(),
            "step": step,
            "history": json.dumps(history),
            "stats": stats,
        }
        _atomic_save(state, ckpt_path)

    # ---- loop -------------------------------------------------------------------------------------------------------
    t0 = time.perf_counter() - elapsed0
    buf_loss, buf_mse = [], []
    last_ckpt = start_step if resume and ckpt_path is not None and ckpt_path.exists() else None
    bar = tqdm(total=steps, initial=start_step, desc=f"fit {architecture}", disable=not progress)
    step = start_step
    try:
        while step < steps:
            cur_lr = _lr_at(step, lr=lr, total=steps, schedule=lr_schedule, warmup=warmup_steps)
            for grp in opt.param_groups:
                grp["lr"] = cur_lr
            idx = torch.randint(len(pairs_t), (batch_size,), generator=gen, device=dev)
            t = torch.randint(n_diffusion_steps, (batch_size,), generator=gen, device=dev)
            noise = torch.randn((batch_size, y_t.shape[1]), generator=gen, device=dev)
            x0 = y_t[idx // n_views]
            xt = D.q_sample(sched_f, x0, t, noise)
            with autocast(dev):
                raw, v = net(xt, t, (pairs_t[idx] - emb_mean.to(dev)) / emb_std.to(dev))
            loss_vec, mse = D.hybrid_loss(
                sched_f,
                raw.float(),
                v,
                x0,
                xt,
                t,
                noise,
                parameterization=parameterization,
                vlb_weight=config["diffusion"]["vlb_weight"],
            )
            loss = loss_vec.mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if max_grad_norm is not None:
                torch.nn.utils.clip_grad_norm_(net_params, max_grad_norm)
            opt.step()
            torch._foreach_lerp_(ema_params, [p.detach() for p in net_params], 1.0 - ema_decay_at(step, ema_decay))
            buf_loss.append(loss.detach())
            buf_mse.append(mse.detach().mean())
            step += 1
            if step % log_every == 0 or step == steps or (ckpt_path is not None and step % checkpoint_every == 0):
                losses = torch.stack(buf_loss).cpu().numpy()
                bad = np.flatnonzero(~np.isfinite(losses))
                if bad.size:
                    first = step - len(losses) + int(bad[0]) + 1
                    where = f"; the last good checkpoint (step {last_ckpt}) is in {ckpt_path}" if last_ckpt else ""
                    raise FloatingPointError(
                        f"The training loss became {losses[bad[0]]} at step {first}{where}. Lower lr, keep "
                        "max_grad_norm set, or check the inputs for extreme values."
                    )
                entry = {
                    "step": step,
                    "loss": float(losses.mean()),
                    "mse": float(torch.stack(buf_mse).mean()),
                    "lr": cur_lr,
                    "time": time.perf_counter() - t0,
                }
                history.append(entry)
                buf_loss, buf_mse = [], []
                bar.set_postfix(loss=f"{entry['loss']:.4f}")
                if ckpt_path is not None and (step % checkpoint_every == 0 or step == steps):
                    save_checkpoint(step)
                    last_ckpt = step
                if callback is not None and callback(step, finish(step)):
                    logger.info("Stopped by the callback at step %d", step)
                    break
            bar.update(1)
    finally:
        bar.close()
    if ckpt_path is not None and last_ckpt != step:
        save_checkpoint(step)
    logger.info("Finished training: %d steps, loss %.4f", step, history[-1]["loss"] if history else float("nan"))
    model = finish(step)
    model.net.eval()
    return model
