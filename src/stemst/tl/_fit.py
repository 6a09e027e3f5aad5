"""Training of the Stem diffusion model on stemst tables: :func:`fit`."""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable
from dataclasses import replace
from typing import Any, Literal

import numpy as np
import torch

from stemst._atomic import check_destination
from stemst._errors import warn
from stemst._schema import TABLE_KEY, UNS_KEY, StemstDataError, context_key
from stemst._schema import embedding_key as _embedding_key
from stemst._torch import resolve_device
from stemst._utils import RNGLike, as_seed
from stemst.model import (
    DiffusionConfig,
    DiffusionModel,
    JointDiffusionModel,
    NetworkConfig,
    TrainingConfig,
    TrainingState,
    distributed,
    train,
)
from stemst.model.config import Architecture, LRSchedule, TargetScaling
from stemst.model.joint import gather, pack
from stemst.model.losses import Parameterization
from stemst.tl._data import TrainingSet, as_tables, training_pairs
from stemst.tl._model import StemstModel
from stemst.tl._ood import shift_reference
from stemst.tl._validation import N_BLOCKS, EarlyStopping, holdout_groups, joint_space, prepare_head
from stemst.tl._validation import calibrate as calibrate_spread


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


def check_spread(ts: TrainingSet) -> None:
    """Refuse training data that cannot be standardised: fewer than 2 spots, or constant embeddings."""
    if ts.n_spots < 2:
        raise StemstDataError(
            f"fit needs at least 2 spots with counts in the panel, got {ts.n_spots}: with one spot the expression "
            "has no spread to learn or standardise. Train on more spots or sections."
        )
    if not (ts.X.std(0) > 0).any():
        raise StemstDataError("Every training spot has the same embedding; re-embed the spots (wrong image?).")


def check_cross_fitting(groups: np.ndarray) -> None:
    """Refuse too few spots for the mean head: it is cross-fitted by group, each fit on at least 2 other spots."""
    names, sizes = np.unique(groups, return_counts=True)
    if len(names) < 2 or (len(groups) - sizes).min() < 2:
        raise StemstDataError(
            f"fit with the mean head (head=True) cross-fits it over groups of spots (the sections, or {N_BLOCKS} "
            f"spatial blocks of a single section of at least {4 * N_BLOCKS} spots), fitting each without its own "
            f"group on at least 2 other spots: the {len(groups)} training spots make {len(names)} group(s) of "
            f"{sizes.tolist()} spots. Train on more spots or sections, or pass head=False."
        )


def default_embedding_key(data: Any, table_key: str = TABLE_KEY) -> str:
    """Return the embeddings :func:`fit` uses by default.

    ``X_efficientnet_lite0_context`` when :func:`stemst.pp.spatial_context` made it, else ``X_efficientnet_lite0``;
    when the table has neither, the embedding of the one other encoder it was embedded with (its context features if
    made), so that a table prepared with another encoder (``stemst prepare --encoder color_stats``) is found.
    """
    table = as_tables(data, table_key)[0]
    key = _embedding_key("efficientnet_lite0")
    for candidate in (context_key(key), key):
        if candidate in table.obsm:
            return candidate
    made = [k for k in dict(table.uns.get(UNS_KEY, {}).get("embeddings", {})) if k in table.obsm]
    contexts = [k for k in made if k.endswith(context_key(""))]
    chosen = contexts or made
    return chosen[0] if len(chosen) == 1 else key


def fit(
    data: Any,
    *,
    embedding_key: str | None = None,
    genes: str | Iterable[str] | None = None,
    sections: str | Iterable[str] | None = None,
    transform: str = "log2p1",
    validation: str | None = "auto",
    head: bool = True,
    head_pcs: int = 256,
    head_hidden: int | None = 256,
    cond_pcs: int | None = 8,
    cond_noise: float = 1.0,
    cond_dropout: float = 0.3,
    patience: int = 8,
    calibrate: bool = True,
    augment: bool = False,
    architecture: Architecture | Literal["auto"] = "auto",
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
    batch_size: int | None = None,
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

    By default (``head=True``) the model is a *residual* diffusion: a reduced-rank ridge head on the top
    ``head_pcs`` principal components of the condition predicts the mean (its penalty and rank chosen by
    leave-one-section-out on the training sections), and the diffusion learns the distribution of what the head
    misses, from cross-fitted residuals, conditioned on the top ``cond_pcs`` whitened components. One training
    section (``validation``; spatial blocks of a single section) is held out: the EMA's loss on it stops training
    early and picks the weights kept, and the weight of the network's residual mean and the per-gene spread of the
    samples are calibrated on it, so that the central q-intervals of the samples hold about q of new values.
    ``head=False`` gives the paper's model (the diffusion learns the expression itself).

    Parameters
    ----------
    data
        SpatialData, AnnData, or a list of them, with ``obsm[embedding_key]`` (see :func:`stemst.pp.embed_patches`).
    embedding_key
        The embeddings; default: the spatial-context features of the default encoder when
        :func:`stemst.pp.spatial_context` made them, else its plain embeddings; when the table was embedded with one
        other encoder only, that encoder's (see :func:`default_embedding_key`).
    genes, sections, transform
        The gene panel (``None``: ``var['stemst_panel']``; a boolean ``var`` column or names), the sections to
        train on (default all) and the target transform (:func:`stemst.pp.transform_counts`).
    validation
        The training section held out for early stopping and calibration: ``"auto"`` (the last one), a name, or
        ``None`` (train on everything for the given steps, no calibration).
    head, head_pcs, head_hidden, cond_pcs, cond_noise, cond_dropout
        The residual model's settings (:class:`~stemst.model.DiffusionConfig`): the mean head, its components and
        (``head_hidden``) the width of the early-stopped MLP averaged with the linear head,
        the network's condition (``None``: the whole standardised embedding) and its training noise and dropout.
        The defaults were chosen on validation folds inside HER2ST C2-C5 (``docs/model.md``).
    patience
        Held-out evaluations without improvement before training stops (one every ``steps // 40`` steps).
    calibrate
        Calibrate the residual-mean weight and the spread on the held-out section.
    augment
        Train on the embeddings of the 8 flips/rotations ``obsm[f"{embedding_key}_views"]`` (7 augmented :
        1 original, the paper's ratio); with ``head=False`` only (the context features already average the views).
    architecture, depth, width, heads, mlp_ratio, dropout, learn_variance
        The denoiser (:class:`~stemst.model.NetworkConfig`): ``"auto"`` (default: ``"mlp"`` on every device, the
        only architecture whose held-out quality has been measured, ``docs/model.md``), ``"mlp"`` (trains in
        minutes on a CPU), ``"transformer"`` (the paper's gene-token transformer;
        use a GPU) or ``"neighbourhood"`` (the joint model of a spot and its ring-1 neighbours,
        :class:`~stemst.model.JointDiffusionModel`); unset sizes take its defaults.
    parameterization, vlb_weight, n_diffusion_steps, target_scaling, clip_margin
        The diffusion (:class:`~stemst.model.DiffusionConfig`). ``"v"``-prediction (default) gave clearly better
        held-out correlations than the paper's ``"eps"`` after minutes of CPU training on HER2ST.
    steps, epochs, batch_size, lr, weight_decay, lr_schedule, warmup_steps, max_grad_norm, ema_decay, log_every
        Optimisation (:class:`~stemst.model.TrainingConfig`): at most 2000 steps unless ``steps`` or ``epochs``
        (passes over the pairs) is given; ``batch_size=None``: 256, or all pairs when there are fewer (a larger
        explicit one is capped with a warning); ``lr=None``: 1e-4 for the transformer (the paper's), 1e-3 for the MLP.
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
        Under ``torchrun`` (``WORLD_SIZE > 1``) the process group is started here (NCCL on CUDA, gloo on CPU), each
        process trains on ``cuda:LOCAL_RANK`` with DistributedDataParallel and ``batch_size`` is the global batch,
        split across the processes; the result equals a one-process run with the same seed (docs: *Scaling out*).
    rng
        Seed (or generator drawing one) of the initialisation and of the training draws.
    progress
        Show a progress bar with the loss.

    Returns
    -------
    The trained :class:`~stemst.tl.StemstModel`; ``model.history`` holds the training curve (with ``val_mse``, the
    held-out loss, where it was measured) and ``model.training`` the head, stopping and calibration choices.

    Raises
    ------
    FloatingPointError
        If the loss becomes NaN or infinite or explodes (a diverged run, e.g. ``lr`` far too high); the message names
        the step and ``lr``, and the last checkpoint (if any) is kept.
    StemstDataError
        If the counts are not raw counts (NaN or infinite, negative, or non-integer values, e.g. after
        ``sc.pp.normalize_total`` + ``sc.pp.log1p``).

    Examples
    --------
    A quick try on ``sdata`` (HER2ST C2 and C6 embedded with ``encoder="color_stats"``, with a 20-gene panel): a
    few steps on all of C2, nothing held out.

    >>> model = stemst.tl.fit(sdata, embedding_key="X_color_stats", sections="C2", steps=20, validation=None)
    >>> model.steps_trained, model.n_genes
    (20, 20)
    >>> key = stemst.tl.predict(model, sdata, sections="C6", progress=False)
    >>> sdata.tables[key].shape
    (178, 20)

    The recommended setting (the default encoder and its spatial context, the default steps; minutes on a CPU)::

        stemst.pp.embed_patches(sdata)
        stemst.pp.spatial_context(sdata)
        model = stemst.tl.fit(sdata, sections=["C2", "C3", "C4", "C5"])
        stemst.tl.predict(model, sdata, sections="C6")
    """
    distributed.init()
    resolve_device(device)  # a device this machine lacks is refused before any work
    if architecture == "auto":  # no default with unmeasured quality: the transformer is an option until measured
        architecture = "mlp"
    network = NetworkConfig(
        architecture,
        depth=depth,
        width=width,
        heads=heads,
        mlp_ratio=mlp_ratio,
        dropout=dropout or 0.0,
        learn_variance=learn_variance,
    )
    if resume and not isinstance(rng, int | np.integer):
        raise ValueError("resume=True needs an int rng (a seed): a generator's state cannot be checked to match.")
    if augment and (head or architecture == "neighbourhood"):
        raise ValueError(
            "augment=True needs head=False and a per-spot network: the mean head and the joint model work on one "
            "embedding per spot."
        )
    if checkpoint_dir is not None:  # checked before any data is read, so that a bad path costs nothing
        check_destination(checkpoint_dir, what="the training checkpoint", argument="checkpoint_dir")
    diffusion = DiffusionConfig(
        n_diffusion_steps,
        parameterization=parameterization,
        vlb_weight=vlb_weight if learn_variance else 0.0,
        target_scaling=target_scaling,
        clip_margin=clip_margin,
        head_pcs=head_pcs if head else None,
        head_hidden=head_hidden if head else None,
        cond_pcs=cond_pcs,
        cond_noise=cond_noise,
        cond_dropout=cond_dropout,
    )
    training = TrainingConfig(
        steps=steps,
        epochs=epochs,
        batch_size=256 if batch_size is None else batch_size,
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
    embedding_key = embedding_key or default_embedding_key(data, table_key)
    ts, pairs, encoder, facts = _collect(
        data,
        table_key,
        embedding_key=embedding_key,
        genes=genes,
        sections=sections,
        transform=transform,
        augment=augment,
    )
    check_spread(ts)
    groups, held = holdout_groups(ts, validation)
    if diffusion.head_pcs:
        check_cross_fitting(groups)
    cond, y = torch.as_tensor(pairs), torch.as_tensor(ts.Y)
    diffusion = diffusion.fitted(len(ts.X), ts.X.shape[1])
    joint = network.architecture == "neighbourhood"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(training.seed)
        module = (JointDiffusionModel if joint else DiffusionModel)(len(ts.genes), pairs.shape[1], network, diffusion)
    record: dict[str, Any] = {"validation": held}
    held_rows = groups == held if held is not None else None
    ood, record["depth"] = shift_reference(
        data,
        table_key,
        ts,
        embedding_key=embedding_key,
        encoder=encoder,
        sections=sections,
        held=held_rows,
        seed=training.seed,
    )
    if diffusion.head_pcs:
        residuals, record["head"] = prepare_head(module, cond, ts.Y, groups, seed=training.seed)
        y = module.head(cond) + torch.as_tensor(residuals)  # the diffusion learns the cross-fitted residuals
    fit_rows = torch.as_tensor(groups != held) if held is not None else torch.ones(ts.n_spots, dtype=torch.bool)
    rows = fit_rows.repeat_interleave(len(pairs) // ts.n_spots)
    module.set_statistics(cond[rows], y[fit_rows], projection=not diffusion.head_pcs)
    if batch_size is None:
        training = replace(training, batch_size=min(training.batch_size, int(rows.sum())))
    elif training.batch_size > int(rows.sum()):
        warn(
            f"batch_size={training.batch_size} exceeds the {int(rows.sum())} training pairs; using "
            f"{int(rows.sum())} (a larger batch only repeats pairs and costs time and memory)."
        )
        training = replace(training, batch_size=int(rows.sum()))
    training = training.resolved(int(rows.sum()))
    space = joint_space(ts) if joint else None
    if space is not None:  # each training row becomes a neighbourhood: the spot and its ring-1 neighbours
        cond, y = pack(cond, *space), gather(y, space[0])
    about = {"genes": ts.genes, "embedding_key": embedding_key, "transform": transform}
    record.update({**training.as_dict(), **facts})
    stopper = None
    if held is not None:
        every = max(1, training.steps // 40)
        stopper = EarlyStopping(cond[~rows], y[~fit_rows], every=every, patience=patience, seed=training.seed)

    def wrap(ema: DiffusionModel, step: int, history: list[dict[str, float]]) -> StemstModel:
        final = {"steps_trained": step, "final_loss": history[-1]["loss"] if history else None}
        return StemstModel(ema, **about, encoder=encoder, training={**record, **final}, history=history, ood=ood)

    def on_log(state: TrainingState) -> bool | None:
        stop = stopper(state) if stopper is not None else False
        return bool(callback(state.step, wrap(state.ema, state.step, state.history))) or stop if callback else stop

    result = train(
        module,
        cond[rows],
        y[fit_rows],
        training,
        device=device,
        checkpoint_dir=checkpoint_dir,
        resume=resume,
        run_info={**about, "validation": held},
        callback=on_log,
        progress=progress,
    )
    if stopper is not None:
        stopper.restore(result.ema)
        record["early_stopping"] = {"best_step": stopper.best_step, "val_mse": stopper.best, "curve": stopper.curve}
        if calibrate and diffusion.head_pcs:
            held_rows = ~fit_rows.numpy()
            record["calibration"] = calibrate_spread(
                result.ema,
                torch.as_tensor(pairs)[~rows],
                residuals[held_rows],
                ts.Y[held_rows],
                seed=training.seed,
                space=joint_space(ts, held_rows) if joint else None,
            )
    return wrap(result.ema, result.steps, result.history)
