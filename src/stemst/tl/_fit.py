"""Training of the Stem diffusion model on stemst tables: :func:`fit`."""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np
import torch

from stemst._schema import TABLE_KEY, UNS_KEY
from stemst._utils import RNGLike, as_seed
from stemst.model import DiffusionConfig, DiffusionModel, NetworkConfig, TrainingConfig, TrainingState, train
from stemst.model.config import Architecture, LRSchedule, TargetScaling
from stemst.model.losses import Parameterization
from stemst.tl._data import TrainingSet, as_tables, training_pairs
from stemst.tl._model import StemstModel


def _encoder_settings(tables: list[Any], key: str) -> dict[str, Any]:
    info = tables[0].uns.get(UNS_KEY, {}).get("embeddings", {}).get(key)
    if not info:
        return {}
    return json.loads(json.dumps(dict(info), default=lambda o: o.tolist() if hasattr(o, "tolist") else str(o)))


def _collect(data: Any, table_key: str, **kwargs: Any) -> tuple[TrainingSet, np.ndarray, dict, dict]:
    """Return the training set, its conditions, the encoder settings and what the model records about the data."""
    tables = as_tables(data, table_key)
    ts, pairs = training_pairs(tables, **kwargs)
    facts = {
        "augment": ts.views is not None,
        "n_views": len(pairs) // ts.n_spots,
        "n_spots": ts.n_spots,
        "sections": sorted(set(ts.sections.tolist())),
    }
    return ts, pairs, _encoder_settings(tables, kwargs["embedding_key"]), facts


def fit(
    data: Any,
    *,
    embedding_key: str = "X_efficientnet_lite0",
    genes: str | Iterable[str] | None = None,
    sections: str | Iterable[str] | None = None,
    transform: str = "log2p1",
    augment: bool = True,
    architecture: Architecture = "mlp",
    depth: int | None = None,
    width: int | None = None,
    heads: int | None = None,
    mlp_ratio: float | None = None,
    dropout: float | None = None,
    learn_variance: bool = True,
    parameterization: Parameterization = "v",
    vlb_weight: float = 1e-3,
    n_diffusion_steps: int = 1000,
    target_scaling: TargetScaling = "standardize",
    clip_margin: float | None = 0.1,
    steps: int | None = None,
    epochs: float | None = None,
    batch_size: int = 256,
    lr: float | None = None,
    weight_decay: float = 0.0,
    lr_schedule: LRSchedule = "constant",
    warmup_steps: int = 0,
    max_grad_norm: float | None = 1.0,
    ema_decay: float = 0.9999,
    log_every: int | None = None,
    checkpoint_dir: str | os.PathLike | None = None,
    checkpoint_every: int = 1000,
    resume: bool = False,
    callback: Callable[[int, StemstModel], bool | None] | None = None,
    table_key: str = TABLE_KEY,
    device: str | torch.device = "auto",
    rng: RNGLike = 0,
    progress: bool = True,
) -> StemstModel:
    """Train the Stem conditional diffusion model on embedded, sequenced spots.

    Pairs (image embedding, expression of the gene panel on the ``transform`` scale; spots with no panel counts
    dropped) are kept as tensors on the device; each step of :func:`stemst.model.train` draws a batch of pairs, a
    diffusion step and noise, and takes an AdamW step on the improved-DDPM hybrid loss. Sampling uses the
    exponential moving average (EMA) of the weights. All settings are checked before the data are read.

    Parameters
    ----------
    data
        SpatialData, AnnData, or a list of them, with ``obsm[embedding_key]`` (see :func:`stemst.pp.embed_patches`).
    embedding_key, genes, sections, transform
        The embeddings, the gene panel (``None``: ``var['stemst_panel']``; a boolean ``var`` column or names), the
        sections to train on (default all) and the target transform (:func:`stemst.pp.transform_counts`).
    augment
        Train on the embeddings of the 8 flips/rotations ``obsm[f"{embedding_key}_views"]`` (7 augmented :
        1 original, the paper's ratio); falls back to the originals, with a warning, when the table has none.
    architecture, depth, width, heads, mlp_ratio, dropout, learn_variance
        The denoiser (:class:`~stemst.model.NetworkConfig`): ``"mlp"`` (default: trains in minutes on a CPU) or
        ``"transformer"`` (the paper's gene-token transformer; use a GPU); unset sizes take its defaults.
    parameterization, vlb_weight, n_diffusion_steps, target_scaling, clip_margin
        The diffusion (:class:`~stemst.model.DiffusionConfig`). ``"v"``-prediction (default) gave clearly better
        held-out correlations than the paper's ``"eps"`` after minutes of CPU training on HER2ST.
    steps, epochs, batch_size, lr, weight_decay, lr_schedule, warmup_steps, max_grad_norm, ema_decay, log_every
        Optimisation (:class:`~stemst.model.TrainingConfig`): 2000 steps unless ``steps`` or ``epochs`` (passes over
        the pairs) is given; ``lr=None``: 1e-4 for the transformer (the paper's), 1e-3 for the MLP.
    checkpoint_dir, checkpoint_every, resume
        Write ``checkpoint.pt`` atomically every ``checkpoint_every`` steps; with ``resume``, continue from it
        exactly as if the run had never stopped (the settings must match).
    callback
        Called as ``callback(step, model)`` at every history entry (``model`` holds the current EMA weights);
        returning ``True`` stops training (e.g. early stopping on a validation section).
    table_key
        Table key for SpatialData inputs.
    device
        ``"auto"`` (CUDA if available, else CPU) or a torch device. On CUDA: bf16 autocast and TF32 matmuls.
    rng
        Seed (or generator drawing one) of the initialisation and of the training draws.
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
    network = NetworkConfig(
        architecture,
        depth=depth,
        width=width,
        heads=heads,
        mlp_ratio=mlp_ratio,
        dropout=dropout or 0.0,
        learn_variance=learn_variance,
    )
    diffusion = DiffusionConfig(
        n_diffusion_steps,
        parameterization=parameterization,
        vlb_weight=vlb_weight if learn_variance else 0.0,
        target_scaling=target_scaling,
        clip_margin=clip_margin,
    )
    training = TrainingConfig(
        steps=steps,
        epochs=epochs,
        batch_size=batch_size,
        lr=network.default_lr if lr is None else lr,
        weight_decay=weight_decay,
        lr_schedule=lr_schedule,
        warmup_steps=warmup_steps,
        max_grad_norm=max_grad_norm,
        ema_decay=ema_decay,
        seed=as_seed(rng),
        log_every=log_every,
        checkpoint_every=checkpoint_every,
    )
    ts, pairs, encoder, facts = _collect(
        data,
        table_key,
        embedding_key=embedding_key,
        genes=genes,
        sections=sections,
        transform=transform,
        augment=augment,
    )
    training = training.resolved(len(pairs))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(training.seed)
        module = DiffusionModel(len(ts.genes), pairs.shape[1], network, diffusion)
    cond, y = torch.as_tensor(pairs), torch.as_tensor(ts.Y)
    module.set_statistics(cond, y)
    about = {"genes": ts.genes, "embedding_key": embedding_key, "transform": transform}
    record = {**training.as_dict(), **facts}

    def wrap(ema: DiffusionModel, step: int, history: list[dict[str, float]]) -> StemstModel:
        final = {"steps_trained": step, "final_loss": history[-1]["loss"] if history else None}
        return StemstModel(ema, **about, encoder=encoder, training={**record, **final}, history=history)

    def on_log(state: TrainingState) -> bool | None:
        return callback(state.step, wrap(state.ema, state.step, state.history))

    result = train(
        module,
        cond,
        y,
        training,
        device=device,
        checkpoint_dir=checkpoint_dir,
        resume=resume,
        run_info=about,
        callback=on_log if callback is not None else None,
        progress=progress,
    )
    return wrap(result.ema, result.steps, result.history)
