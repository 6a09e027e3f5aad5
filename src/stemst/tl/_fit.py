"""Training of the Stem diffusion model on stemst tables: :func:`fit`.

:func:`fit` moves data between SpatialData / AnnData and arrays; the recipe itself (mean head, cross-fitted
residuals, early stopping, calibration) runs on arrays in :func:`stemst.model.recipe.fit_recipe`, with the configs
of :data:`stemst.model.presets.DEFAULT_PRESET` unless others are given.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass, fields
from typing import Any

import numpy as np
import torch

from stemst._atomic import check_destination
from stemst._schema import TABLE_KEY, UNS_KEY, StemstDataError, context_key
from stemst._schema import embedding_key as _embedding_key
from stemst._torch import resolve_device
from stemst._utils import RNGLike, as_seed
from stemst.model import DiffusionConfig, NetworkConfig, RecipeConfig, TrainingConfig, distributed
from stemst.model.presets import DEFAULT_PRESET, Configs
from stemst.model.recipe import fit_recipe
from stemst.tl._data import TrainingSet, as_tables, holdout_groups, training_pairs
from stemst.tl._model import StemstModel
from stemst.tl._ood import shift_reference


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


@dataclass(frozen=True)
class RunOptions:
    """The run options :func:`fit` takes as further keyword arguments (``**run``)."""

    checkpoint_dir: str | os.PathLike | None = None  #: folder for ``checkpoint.pt``
    resume: bool = False  #: continue from the checkpoint in ``checkpoint_dir``
    callback: Callable[[int, StemstModel], bool | None] | None = None  #: ``callback(step, model)``; True stops
    table_key: str = TABLE_KEY  #: table of a SpatialData input


#: where the flat keyword arguments of earlier versions of :func:`fit` went
_CONFIG_OF = {
    **{f.name: "network" for f in fields(NetworkConfig)},
    **{f.name: "diffusion" for f in fields(DiffusionConfig)},
    **{f.name: "training" for f in fields(TrainingConfig)},
    **{f.name: "recipe" for f in fields(RecipeConfig)},
    "n_diffusion_steps": "diffusion (as n_steps)",
    "head": "diffusion (head=False: head_pcs=None)",
}


def _run_options(run: dict[str, Any]) -> RunOptions:
    """Return the run options, refusing an unknown keyword with where its setting lives now."""
    known = {f.name for f in fields(RunOptions)}
    for name in run:
        if name not in known:
            where = _CONFIG_OF.get(name)
            hint = f" It is a setting of {where}: pass e.g. {where.split()[0]}={{{name!r}: ...}}." if where else ""
            raise TypeError(f"fit() got an unexpected keyword argument {name!r}.{hint}")
    opts = RunOptions(**run)
    if opts.checkpoint_dir is not None:  # checked before any data is read, so that a bad path costs nothing
        check_destination(opts.checkpoint_dir, what="the training checkpoint", argument="checkpoint_dir")
    return opts


def _seed(rng: RNGLike | None, resume: bool) -> int | None:
    """Return the seed ``rng`` gives (``None``: the training config's); a resumed run needs an int."""
    if resume and rng is not None and not isinstance(rng, int | np.integer):
        raise ValueError("resume=True needs an int rng (a seed): a generator's state cannot be checked to match.")
    return None if rng is None else as_seed(rng)


def _check_configs(configs: Configs) -> None:
    """Refuse settings that cannot go together, before any data is read."""
    if configs.recipe.augment and (configs.diffusion.head_pcs or configs.network.spatial):
        raise ValueError(
            "augment=True needs no mean head (diffusion={'head_pcs': None}) and a per-spot network: the mean head "
            "and the joint model work on one embedding per spot."
        )


def fit(
    data: Any,
    *,
    embedding_key: str | None = None,
    genes: str | Iterable[str] | None = None,
    sections: str | Iterable[str] | None = None,
    validation: str | None = "auto",
    architecture: str = "auto",
    steps: int | None = None,
    batch_size: int | None = None,
    device: str | torch.device = "auto",
    rng: RNGLike | None = None,
    network: NetworkConfig | dict[str, Any] | None = None,
    diffusion: DiffusionConfig | dict[str, Any] | None = None,
    training: TrainingConfig | dict[str, Any] | None = None,
    recipe: RecipeConfig | dict[str, Any] | None = None,
    progress: bool = True,
    **run: Any,
) -> StemstModel:
    """Train the Stem conditional diffusion model on embedded, sequenced spots.

    Pairs (image embedding, expression of the gene panel on the ``transform`` scale; spots with no panel counts
    dropped) are kept as tensors on the device; each step of :func:`stemst.model.train` draws a batch of pairs, a
    diffusion step and noise, and takes an AdamW step on the improved-DDPM hybrid loss. Sampling uses the
    exponential moving average (EMA) of the weights. All settings are checked before the data are read.

    By default (:data:`stemst.model.presets.DEFAULT_PRESET`) the model is a *residual* diffusion: a reduced-rank
    ridge head on the top ``head_pcs`` principal components of the condition predicts the mean (its penalty and rank
    chosen by leave-one-section-out on the training sections), and the diffusion learns the distribution of what
    the head misses, from cross-fitted residuals, conditioned on the top ``cond_pcs`` whitened components. One
    training section (``validation``; spatial blocks of a single section) is held out: the EMA's loss on it stops
    training early and picks the weights kept, and the weight of the network's residual mean and the per-gene spread
    of the samples are calibrated on it, so that the central q-intervals of the samples hold about q of new values.
    ``diffusion={"head_pcs": None}`` gives the paper's model (the diffusion learns the expression itself). The
    recipe runs on arrays in :func:`stemst.model.recipe.fit_recipe`.

    Settings come in four configs, as scvi-tools separates architecture, training and plan: each argument takes a
    config object (used as it is) or a dict of its fields (which override the preset's), e.g.
    ``fit(sdata, network={"width": 512}, training={"lr": 3e-4})``. The common ones also have a keyword here.

    Parameters
    ----------
    data
        SpatialData, AnnData, or a list of them, with ``obsm[embedding_key]`` (see :func:`stemst.pp.embed_patches`).
    embedding_key
        The embeddings; default: the spatial-context features of the default encoder when
        :func:`stemst.pp.spatial_context` made them, else its plain embeddings; when the table was embedded with one
        other encoder only, that encoder's (see :func:`default_embedding_key`).
    genes, sections
        The gene panel (``None``: ``var['stemst_panel']``; a boolean ``var`` column or names) and the sections to
        train on (default all).
    validation
        The training section held out for early stopping and calibration: ``"auto"`` (the last one), a name, or
        ``None`` (train on everything for the given steps, no calibration).
    architecture
        The denoiser: ``"auto"`` (the preset's, ``"mlp"`` on every device, the only architecture whose held-out
        quality has been measured, ``docs/model.md``), ``"mlp"`` (trains in minutes on a CPU), ``"transformer"``
        (the paper's gene-token transformer; use a GPU) or ``"neighbourhood"`` (the joint model of a spot and its
        ring-1 neighbours, :class:`~stemst.model.JointDiffusionModel`).
    steps, batch_size
        Shortcuts for ``training``'s fields: at most 2000 steps unless ``steps`` or ``epochs`` (passes over the
        pairs) is given; ``batch_size=None``: 256, or all pairs when there are fewer (a larger explicit one is
        capped with a warning).
    device
        ``"auto"`` (CUDA if available, else CPU) or a torch device. On CUDA: bf16 autocast and TF32 matmuls.
        Under ``torchrun`` (``WORLD_SIZE > 1``) the process group is started here (NCCL on CUDA, gloo on CPU), each
        process trains on ``cuda:LOCAL_RANK`` with DistributedDataParallel and ``batch_size`` is the global batch,
        split across the processes; the result equals a one-process run with the same seed (docs: *Scaling out*).
    rng
        Seed (or generator drawing one) of the initialisation and of the training draws; ``None``: the training
        config's ``seed`` (0).
    network, diffusion, training, recipe
        :class:`~stemst.model.NetworkConfig` (sizes, dropout, learned variance), :class:`~stemst.model.DiffusionConfig`
        (parameterisation, schedule, the mean head and the network's condition),
        :class:`~stemst.model.TrainingConfig` (optimiser, EMA, steps, logging, ``checkpoint_every``) and
        :class:`~stemst.model.RecipeConfig` (``patience``, ``calibrate``, ``augment``, the target ``transform``).
    progress
        Show a progress bar with the loss.
    **run
        Run options (:class:`RunOptions`): ``checkpoint_dir`` (write ``checkpoint.pt`` atomically every
        ``training.checkpoint_every`` steps), ``resume`` (continue from it exactly as if the run had never stopped;
        the settings must match), ``callback`` (called as ``callback(step, model)`` at every history entry, ``model``
        holding the current EMA weights; returning ``True`` stops training) and ``table_key`` (for SpatialData).

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
    opts = _run_options(run)
    distributed.init()
    dev = resolve_device(device)  # a device this machine lacks is refused before any work
    configs = DEFAULT_PRESET.resolve(
        architecture=architecture,
        network=network,
        diffusion=diffusion,
        training=training,
        recipe=recipe,
        steps=steps,
        batch_size=batch_size,
        seed=_seed(rng, opts.resume),
    )
    _check_configs(configs)
    embedding_key = embedding_key or default_embedding_key(data, opts.table_key)
    transform = configs.recipe.transform
    ts, pairs, encoder, facts = _collect(
        data,
        opts.table_key,
        embedding_key=embedding_key,
        genes=genes,
        sections=sections,
        transform=transform,
        augment=configs.recipe.augment,
    )
    check_spread(ts)
    if configs.network.spatial and ts.coords is None:
        raise StemstDataError("The joint model needs the spot centres obsm['spatial'] of every training table.")
    groups, held = holdout_groups(ts, validation)
    held_rows = groups == held if held is not None else None
    ood, depth = shift_reference(
        data,
        opts.table_key,
        ts,
        embedding_key=embedding_key,
        encoder=encoder,
        sections=sections,
        held=held_rows,
        seed=configs.training.seed,
    )
    about = {"genes": ts.genes, "embedding_key": embedding_key, "transform": transform}

    def wrap(ema: Any, step: int, history: list[dict[str, float]], record: dict[str, Any]) -> StemstModel:
        final = {"steps_trained": step, "final_loss": history[-1]["loss"] if history else None}
        training = {**record, **facts, "depth": depth, **final}
        return StemstModel(ema, **about, encoder=encoder, training=training, history=history, ood=ood)

    def on_log(state: Any, record: dict[str, Any]) -> bool | None:
        return opts.callback(state.step, wrap(state.ema, state.step, state.history, record))

    result = fit_recipe(
        pairs,
        ts.Y,
        groups,
        held,
        configs,
        coords=ts.coords,
        sections=ts.sections,
        device=dev,
        callback=on_log if opts.callback is not None else None,
        checkpoint_dir=opts.checkpoint_dir,
        resume=opts.resume,
        run_info={**about, "validation": held},
        progress=progress,
    )
    return wrap(result.module, result.steps, result.history, result.record)
