"""Prediction: run any :class:`~stemst.tl.Predictor` on embedded spots and store the result as a linked table."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import anndata as ad
import numpy as np
import pandas as pd

from stemst._docs import (
    doc_overwrite,
    doc_params,
    doc_progress,
    doc_rng,
    doc_sections,
    doc_table_key,
)
from stemst._errors import warn
from stemst._logging import logger
from stemst._schema import (
    INSTANCE_KEY,
    MEASURED_KEY,
    OOD_KEY,
    OOD_SCORE_KEY,
    OOD_UNS_KEY,
    PANEL_KEY,
    PREDICTION_KEY,
    REGION_KEY,
    SECTION_KEY,
    SPATIAL_KEY,
    TABLE_KEY,
    UNS_KEY,
    StemstDataError,
    check_table_key_free,
    get_table,
    section_mask,
)
from stemst._utils import RNGLike
from stemst.tl._base import Predictor
from stemst.tl._data import get_embeddings

#: layer with the standard deviation of the samples (model scale)
STD_LAYER = "std"
#: layer with the predicted counts (the point prediction ``X`` back-transformed to counts)
COUNTS_LAYER = "counts"
#: obsm slot with the samples, ``(n_spots, n_samples, n_genes)``
SAMPLES_KEY = "samples"
#: :func:`predict` refuses to start when its samples would need more memory than this (GB; ``max_memory_gb``)
MAX_MEMORY_GB = 16.0
#: ... and warns above this
WARN_MEMORY_GB = 2.0
#: :func:`predict_image` refuses a grid of more pseudo-spots than this (``max_spots``) and warns above a fifth of it:
#: an 8 µm grid over a whole HER2ST section (~110,000 spots) fits
MAX_GRID_SPOTS = 250_000


def sample_memory_gb(n_spots: int, n_samples: int, n_genes: int, *, keep_samples: bool = True) -> float:
    """Return the memory (GB) :func:`predict` holds at its peak for these samples.

    The float32 samples, back-transformed, their deviations and the copy stored in ``obsm`` (with ``keep_samples``).

    Examples
    --------
    >>> round(sample_memory_gb(10_000, 1000, 100), 1)
    16.0
    """
    copies = 3 + int(keep_samples)
    return copies * 4.0 * n_spots * n_samples * n_genes / 1e9


def _check_n_samples(n_samples: Any) -> None:
    if isinstance(n_samples, bool) or not isinstance(n_samples, int | np.integer) or n_samples < 1:
        raise ValueError(f"n_samples must be a whole number >= 1, got {n_samples!r}.")


def check_memory(n_spots: int, n_samples: int, n_genes: int, *, keep_samples: bool, max_memory_gb: float) -> None:
    """Refuse a prediction whose samples exceed ``max_memory_gb``; warn above :data:`WARN_MEMORY_GB`."""
    need = sample_memory_gb(n_spots, n_samples, n_genes, keep_samples=keep_samples)
    sizes = f"{n_spots:,} spots x {n_samples:,} samples x {n_genes} genes"
    if need > max_memory_gb:
        raise StemstDataError(
            f"Predicting {sizes} would hold about {need:.1f} GB of samples, more than max_memory_gb={max_memory_gb:g}. "
            "Draw fewer samples (n_samples), predict fewer sections at a time, pass keep_samples=False, or raise "
            "max_memory_gb if the machine has the memory."
        )
    if need > WARN_MEMORY_GB:
        warn(f"Predicting {sizes} holds about {need:.1f} GB of samples in memory.", stacklevel=4)


def _check_resolution(model: Predictor, src: ad.AnnData) -> None:
    """Warn when the patches to predict were read at a resolution far from the training patches' (> 1.5x)."""
    trained = model.encoder.get("level_mpp") or {}
    if not isinstance(trained, dict) or not trained:
        return
    seen = getattr(model, "training", {}).get("sections") or list(trained)
    ref = [float(v) for k, v in trained.items() if k in seen] or [float(v) for v in trained.values()]
    ref_mpp = float(np.median(ref))
    now = src.uns.get(UNS_KEY, {}).get("embeddings", {}).get(model.embedding_key, {}).get("level_mpp") or {}
    present = set(src.obs[SECTION_KEY].astype(str)) if SECTION_KEY in src.obs else set(now)
    for section, mpp in dict(now).items():
        ratio = float(mpp) / ref_mpp
        if section in present and max(ratio, 1 / ratio) > 1.5:
            warn(
                f"Section {section!r} was embedded at {float(mpp):.2f} µm/px, the model's training sections at "
                f"{ref_mpp:.2f} µm/px ({ratio:.1f}x): the encoder sees tissue at another scale than in training, "
                "and predictions may be poor. Use an image of the training resolution if there is one."
            )


def _draw(
    model: Predictor, src: ad.AnnData, X: np.ndarray, n_draw: int, rng: RNGLike, progress: bool, sample_kwargs: dict
) -> np.ndarray:
    """Draw the model's samples ``(n_draw, n, genes)`` for the spots of ``src`` (the joint model gets their centres)."""
    if getattr(model, "spatial", False) and SPATIAL_KEY in src.obsm:  # the joint model samples neighbourhoods
        secs = src.obs[SECTION_KEY].astype(str).to_numpy() if SECTION_KEY in src.obs else None
        sample_kwargs = {**sample_kwargs, "coords": np.asarray(src.obsm[SPATIAL_KEY])[:, :2], "sections": secs}
    samples = np.asarray(model.sample(X, n_samples=n_draw, rng=rng, progress=progress, **sample_kwargs), np.float32)
    if samples.shape != (n_draw, len(X), model.n_genes):
        raise RuntimeError(
            f"{model.method} returned samples of shape {samples.shape}, expected {(n_draw, len(X), model.n_genes)}."
        )
    return samples


def _adjust(
    model: Predictor, mean: np.ndarray, samples: np.ndarray, factors: np.ndarray | None
) -> tuple[np.ndarray, np.ndarray]:
    """Apply the model's adaptation (:func:`stemst.tl.adapt`) and the depth factors to the mean and the samples."""
    from stemst.tl._adapt import apply_adaptation
    from stemst.tl._ood import rescale

    adaptation = getattr(model, "adaptation", None)
    if adaptation:
        logger.info(
            "Applying the adaptation to section %r (%d measured spots)", adaptation["section"], adaptation["n_measured"]
        )
        mean, samples = apply_adaptation(adaptation, mean, samples)
        if factors is not None:
            warn(
                "The model is adapted (stemst.tl.adapt): its levels already match the measured spots' depth, and "
                "depth= rescales the counts once more. Pass depth=None unless that is meant."
            )
    if factors is not None:
        mean, samples = rescale(mean, factors, model.transform), rescale(samples, factors, model.transform)
    return mean, samples


def _prediction_obs(src: ad.AnnData) -> pd.DataFrame:
    """Copy the source spots' section, region, spot id and array coordinates (the prediction annotates their circles)."""
    obs = pd.DataFrame(index=src.obs_names.copy())
    for col in src.obs.columns:
        if col in ("section", REGION_KEY, INSTANCE_KEY) or col.startswith("array_"):
            values = src.obs[col]
            if isinstance(values.dtype, pd.CategoricalDtype):  # kept categorical: squidpy's library_key needs it
                values = values.cat.remove_unused_categories()
            obs[col] = values.array.copy()
    return obs


def _diagnostics(out: ad.AnnData, model: Predictor, ood: tuple | None) -> None:
    """Store the out-of-distribution scores and summary and mark the spots an adapted model was adapted on."""
    if ood is not None:
        out.obs[OOD_SCORE_KEY], out.uns[OOD_UNS_KEY] = ood
        out.obs[OOD_KEY] = out.obs[OOD_SCORE_KEY] > 1
    adaptation = getattr(model, "adaptation", None)
    if adaptation:
        out.obs[MEASURED_KEY] = out.obs_names.isin(adaptation["spots"])


def _depth_params(model: Predictor, factors: np.ndarray | None, depth: Any) -> dict[str, Any]:
    """Return what the prediction records about the depth its counts assume (total counts per spot)."""
    ref = (getattr(model, "training", None) or {}).get("depth", {}).get("median_total_counts")
    if ref is None:
        return {}
    assumed = ref if factors is None else float(np.median(factors)) * ref
    what = "the training median" if depth is None else (depth if isinstance(depth, str) else "given")
    logger.info("The predicted counts assume %.0f total counts per spot (%s)", assumed, what)
    return {"training_depth": float(ref), "depth": float(assumed), "depth_source": what}


@doc_params(table_key=doc_table_key, sections=doc_sections, overwrite=doc_overwrite, rng=doc_rng, progress=doc_progress)
def predict(
    model: Predictor,
    data: Any,
    *,
    table_key: str = TABLE_KEY,
    sections: str | Iterable[str] | None = None,
    n_samples: int = 20,
    key_added: str | None = None,
    overwrite: bool = False,
    keep_samples: bool = True,
    depth: float | np.ndarray | str | None = None,
    max_memory_gb: float = MAX_MEMORY_GB,
    rng: RNGLike = 0,
    progress: bool = True,
    **sample_kwargs: Any,
) -> str | ad.AnnData:
    """Predict expression for every spot and store it as a new table linked to the same spots.

    Every predicted section is also checked for a shift from the training data: each spot gets an
    out-of-distribution score of its image embedding against the training spots' (:mod:`stemst.tl._ood`; above 1
    for about 5% of unseen spots like the training ones), and a :class:`~stemst.StemstWarning` names any section
    most of whose spots score above 1, as it does a section embedded at another resolution than the training ones.

    Parameters
    ----------
    model
        A trained :class:`~stemst.tl.StemstModel` or baseline; an adapted one (:func:`stemst.tl.adapt`) has its
        per-gene levels and spread applied.
    data
        :class:`~spatialdata.SpatialData` with an embedded table, or an :class:`~anndata.AnnData`.
    {table_key}
    {sections}
    n_samples
        Samples per spot (ignored, i.e. 1, for deterministic baselines).
    key_added
        Name of the new table; default ``"stemst_prediction"`` (``"<method>_prediction"`` for baselines).
    {overwrite}
    keep_samples
        Store the samples in ``obsm['samples']``.
    depth
        The sequencing depth (total counts per spot) the counts should assume. ``None``: the training data's median
        (recorded in ``uns['stemst_prediction']['depth']``). A number (the new run's median total count per spot),
        one number per spot, or ``"measured"`` (each section's median total count in the counts table) multiplies
        the expected counts by ``depth / training depth``, and the mean and the samples on the model's scale
        accordingly (a log2(count + 1) target changes, a library-normalised one does not); the normalised
        expression (``normalize_total`` + ``log1p`` of ``layers['counts']``) does not change. The image already
        predicts how depth varies with cellularity from spot to spot: pass per-spot values only for depth that
        varies for other reasons.
    max_memory_gb
        Refuse to start when the samples (:func:`sample_memory_gb`: spots x samples x genes float32, about 4
        copies at the peak) would need more memory than this; above :data:`WARN_MEMORY_GB` a warning says how much.
    {rng}
    {progress}
    **sample_kwargs
        Passed to the model's ``sample``, e.g. ``sampler="dpmpp_2m", steps=25`` for the diffusion model.

    Returns
    -------
    The key of the new table in ``data.tables`` (or the new AnnData when ``data`` is an AnnData). The table has:

    - ``X``: the mean of the samples on the model's scale (e.g. log2(count + 1)), spots x panel genes;
    - ``layers['std']``: the standard deviation of the samples (divided by ``n_samples - 1``);
    - ``layers['counts']``: predicted counts, ``X`` back-transformed (e.g. ``2**X - 1``): the composition of the
      prediction's centre, ready for :func:`scanpy.pp.normalize_total` (averaging back-transformed samples would
      inflate each gene by its own spread);
    - ``obsm['samples']``: the samples, ``(n_spots, n_samples, n_genes)`` float32 (if ``keep_samples``);
    - ``obs``: the source spots' ``section``, ``region`` and ``spot_id`` (so it annotates the same circles),
      ``ood_score`` and ``ood`` (score above 1; models fitted before the score existed have none) and, for an
      adapted model, ``adapt_measured`` (the spots it was adapted on); ``obsm['spatial']`` and ``uns['stemst']``
      copied;
    - ``uns['stemst_ood']``: per section, ``fraction_ood``, ``median_score``, ``n_spots`` and ``warned``;
    - ``uns['stemst_prediction']``: the settings (method, samples, sampler, seed, source table, depth).

    Examples
    --------
    >>> key = stemst.tl.predict(model, sdata, sections="C6", n_samples=10, progress=False)
    >>> sdata.tables[key].layers["std"].shape  # C6's 178 spots, the model's 20 genes
    (178, 20)
    """
    from stemst.tl._ood import depth_factors, diagnose, expected_counts

    if not isinstance(model, Predictor):
        raise TypeError(f"model must be a stemst model or baseline, got {type(model).__name__}.")
    _check_n_samples(n_samples)
    key = key_added or (PREDICTION_KEY if model.method == "stemst" else f"{model.method.replace('+', '_')}_prediction")
    if not isinstance(data, ad.AnnData):
        check_table_key_free(data, key, overwrite=overwrite, counts_key=table_key)
    src = get_table(data, table_key)
    mask = section_mask(src, sections)
    if not mask.any():
        raise StemstDataError(f"No spots selected (sections={sections!r}).")
    src = src if mask.all() else src[mask]  # a view of all rows would copy every obsm array it is asked for
    model.check_table(src)
    factors = depth_factors(model, src, depth)
    _check_resolution(model, src)
    ood = diagnose(model, src)
    n_draw = n_samples if model.stochastic else 1
    check_memory(src.n_obs, n_draw, model.n_genes, keep_samples=keep_samples, max_memory_gb=max_memory_gb)
    X = get_embeddings(src, model.embedding_key)
    logger.info("Predicting %d spots x %d genes with %s (%d samples)", len(X), model.n_genes, model.method, n_draw)
    samples = _draw(model, src, X, n_draw, rng, progress, sample_kwargs)
    mean = np.asarray(model.point_estimate(X, samples), np.float32)
    mean, samples = _adjust(model, mean, samples, factors)

    var = pd.DataFrame(index=pd.Index(model.genes))
    var[PANEL_KEY] = True
    out = ad.AnnData(X=mean, obs=_prediction_obs(src), var=var)
    out.layers[STD_LAYER] = samples.std(0, ddof=1 if len(samples) > 1 else 0).astype(np.float32)  # few: not too low
    # the counts at the predicted centre: its composition is what normalize_total + log1p sees (averaging the
    # back-transformed samples instead inflates each gene by its own spread and distorts the composition)
    depth_info = _depth_params(model, factors, depth)
    out.layers[COUNTS_LAYER] = expected_counts(mean, factors, depth_info.get("training_depth"), model.transform)
    if keep_samples:
        out.obsm[SAMPLES_KEY] = np.ascontiguousarray(samples.transpose(1, 0, 2))
    if SPATIAL_KEY in src.obsm:
        out.obsm[SPATIAL_KEY] = np.asarray(src.obsm[SPATIAL_KEY]).copy()
    if UNS_KEY in src.uns:
        out.uns[UNS_KEY] = {k: v for k, v in src.uns[UNS_KEY].items() if k == "sections"}
    _diagnostics(out, model, ood)
    params = {**model.params(), **{k: v for k, v in sample_kwargs.items() if isinstance(v, str | int | float | bool)}}
    params.update(n_samples=n_draw, rng=rng if isinstance(rng, int) else None, source_table=table_key, **depth_info)
    if getattr(model, "adaptation", None):
        params.update(adapted_on=model.adaptation["section"], n_measured=model.adaptation["n_measured"])
    out.uns[PREDICTION_KEY] = {k: v for k, v in params.items() if v is not None}

    if isinstance(data, ad.AnnData):
        return out
    data.tables[key] = as_spatialdata_table(out)
    logger.info("Stored predictions in sdata.tables[%r]", key)
    return key


def as_spatialdata_table(table: ad.AnnData) -> ad.AnnData:
    """Return a prediction table parsed as a SpatialData table annotating the source spots' shapes (when known).

    ``obs['region']`` (one category per shapes element) and ``obs['spot_id']`` link each row to its circle, as in the
    counts table.
    """
    if REGION_KEY not in table.obs:
        return table
    from spatialdata.models import TableModel

    table.obs[REGION_KEY] = pd.Categorical(table.obs[REGION_KEY].astype(str))
    return TableModel.parse(
        table, region=list(table.obs[REGION_KEY].cat.categories), region_key=REGION_KEY, instance_key=INSTANCE_KEY
    )


@doc_params(table_key=doc_table_key, rng=doc_rng, progress=doc_progress)
def predict_image(
    model: Predictor,
    sdata: Any,
    section: str,
    *,
    spacing_um: float | None = None,
    table_key: str = TABLE_KEY,
    key_added: str | None = None,
    min_tissue: float = 0.25,
    encoder: Any = None,
    overwrite: bool = False,
    n_samples: int | None = None,
    keep_samples: bool = False,
    depth: float | None = None,
    dense: bool | str = "auto",
    tile_px: int = 2048,
    margin_px: int = 256,
    batch_size: int | None = None,
    max_spots: int = MAX_GRID_SPOTS,
    max_memory_gb: float = MAX_MEMORY_GB,
    rng: RNGLike = 0,
    progress: bool = True,
    **sample_kwargs: Any,
) -> str:
    """Predict expression over the tissue of a section that has an H&E image but no sequenced spots.

    Lays a square grid of pseudo-spots over the tissue (:func:`stemst.pp.grid_spots`), stores it as a circles element
    ``f"{{section}}_grid"`` with a table ``f"{{section}}_grid_table"`` (no counts), embeds every grid spot with the
    model's encoder and patch size, adds the spatial context if the model uses it and runs :func:`predict`.

    On a grid finer than the patches (``dense="auto"``, the default) and with the default encoder the grid is
    embedded **densely**: the network runs once per view over the tissue, in tiles fitted to the grid spots' patches
    and read lazily from the image, and each grid spot's features (mean and std of every stage over its patch) are
    window sums of the activation maps. On HER2ST C6 (8 views, 2 samples per spot, the shared 2-core CPU at load
    1.1-1.8) 50 µm (2,566 grid spots) took 143 s, against 274 s per patch when issue 22 was filed, 25 µm (9,421)
    178 s and 8 µm (78,660) 366 s: 235 s to embed, 131 s to sample, peak memory 6.1 GB. Dense features differ
    from per-patch ones where the patch edge's padding reaches into the network (mostly the two deepest stages), so
    a model should be trained on the kind of features it is applied to: trained on dense features
    (:func:`stemst.pp.embed_patches` with ``dense=True``) and applied to dense ones it scores as a per-patch model
    does on per-patch features (HER2ST validation sections C5 and C2), while either model applied to the other kind
    loses a little and has most spots flagged out of distribution (warned). With a model trained on dense features
    the grid is embedded densely at any spacing.
    Encoders that are not fully convolutional (ViTs, callables) embed each grid spot's patch instead (logged).

    The spatial context (ring means) is taken at the model's training spot spacing in µm, whatever the grid spacing:
    ring ``k`` of a grid spot is the mean own embedding of the grid spots nearest to the points of a square lattice
    of that spacing, ``k`` steps away (as the rings of a square spot array), so a fine grid sees the same
    neighbourhood the model was trained on.

    Before any work the grid size, a time estimate and the memory it will hold are logged; a grid of more than
    ``max_spots`` spots or an estimate above ``max_memory_gb`` is refused.

    Parameters
    ----------
    model
        A trained model with known encoder settings (``model.encoder``, from the training table).
    sdata
        SpatialData with the image ``f"{{section}}_he"``; the section's metadata (µm per pixel) is read from
        ``tables[table_key].uns['stemst']['sections']``.
    section
        Section name.
    spacing_um
        Grid spacing; default the model's patch size (so neighbouring patches touch), else the spot diameter.
    {table_key}
    key_added
        Name of the prediction table; default ``f"stemst_prediction_{{section}}_grid"``.
    min_tissue
        Fraction of a grid cell that must be tissue.
    encoder
        The encoder (a name or an :class:`~stemst.pp.Encoder`, as in :func:`stemst.pp.embed_patches`); default
        the one recorded in the model. It must be the encoder the model was trained on.
    overwrite
        Replace the grid, its table and the prediction table if they exist; by default existing ones are refused
        before anything is computed.
    n_samples
        Samples per grid spot (ignored, i.e. 1, for deterministic baselines). ``None`` (default): 20, fewer on a
        grid so large that spots x samples would exceed 300,000 (about 5 minutes of sampling on a 2-core CPU, ~1 ms
        per spot and sample), never fewer than 4; the number is logged. The default model's mean (``X``) comes from
        its mean head whatever the samples; only the std (and the samples, if kept) rest on them, noisier with fewer.
    keep_samples
        Store the samples in the prediction table's ``obsm['samples']`` (large on a fine grid: spots x samples x
        genes float32); the mean and std are always stored.
    depth
        The sequencing depth (total counts per spot) the counts should assume, as in :func:`predict`; ``None``: the
        training median. An unsequenced slide has no measured depth: give the run's expected depth as a number.
    dense
        ``"auto"`` (default): dense if the model was trained on dense features, else when its tiles read fewer
        pixels than the patches would, a dense pixel counted 1.5x (grid spacing well below the patch size: 50 µm and
        finer with the default 112 µm patches), else per patch; ``True``: from dense activation maps; ``False``: per
        patch. Encoders that cannot run densely embed per patch.
    tile_px, margin_px
        Dense pass: the grid spots are grouped by the ``tile_px`` square (model pixels, a multiple of 32) holding
        their patch's corner; each group is one tile, its patches' bounding box plus ``margin_px`` on every side, so
        every patch is computed whole in one tile. Larger tiles waste less margin but hold more activations in
        memory (about 2 GB for the default 2048 + 2 x 256); a margin under 256 shows tile seams in the two deepest
        stages.
    batch_size
        Patches per encoder forward pass on the per-patch path (default: 16 on CPU, 256 on CUDA).
    max_spots
        Refuse a grid estimated to hold more pseudo-spots than this, before laying it out (the message gives the
        spacing that fits); above a fifth of it a warning gives the number. The default allows an 8 µm grid over a
        whole Visium or ST section.
    max_memory_gb
        Refuse to start when the features, context and samples would need more memory than this (estimated before
        anything is embedded).
    {rng}
    {progress}
    **sample_kwargs
        Passed to the model's ``sample``, as in :func:`predict`.

    Returns
    -------
    The key of the new prediction table (same layout as :func:`predict`'s), annotating ``shapes[f"{{section}}_grid"]``.
    If any step fails, ``sdata`` is left as it was.

    Examples
    --------
    >>> key = stemst.tl.predict_image(model, sdata, "C6", spacing_um=400, n_samples=2, progress=False)
    >>> key, len(sdata.shapes["C6_grid"]) == sdata.tables[key].n_obs
    ('stemst_prediction_C6_grid', True)
    """
    from stemst.pp import grid_spots

    if depth is not None and (isinstance(depth, str) or np.ndim(depth) != 0):
        raise ValueError(f"predict_image: depth must be one number (total counts per spot) or None, got {depth!r}.")
    if dense not in (True, False, "auto"):
        raise ValueError(f"dense must be True, False or 'auto', got {dense!r}.")
    job = _image_job(model, sdata, section, spacing_um, table_key, key_added, overwrite, n_samples, encoder)
    centres, _ = grid_spots(
        sdata, section, spacing_um=job.spacing_um, table_key=table_key, min_tissue=min_tissue, max_spots=max_spots
    )
    if not len(centres):
        raise StemstDataError(f"No tissue found in section {section!r}; lower min_tissue or check the image.")
    if len(centres) > max_spots / 5:
        warn(f"predict_image: {len(centres):,} grid spots {job.spacing_um:g} µm apart in section {section!r} to embed.")
    n_samples = grid_samples(len(centres), n_samples)
    n_draw = n_samples if model.stochastic else 1
    work, grid_key = _grid_element(sdata, job, centres)
    plan = (
        _dense_plan(work, job, grid_key, auto=dense == "auto", tile_px=tile_px, margin_px=margin_px) if dense else None
    )
    _announce(job, model, len(centres), n_draw, keep_samples=keep_samples, max_memory_gb=max_memory_gb, dense=plan)
    _embed_grid(work, job, grid_key, plan, batch_size=batch_size, progress=progress)
    if job.context:
        _grid_context(work.tables[grid_key], job)
    logger.info("Predicting %d grid spots (%.0f µm apart) in section %r", len(centres), job.spacing_um, section)
    predict(
        model,
        work,
        table_key=grid_key,
        key_added=job.out_key,
        n_samples=n_samples,
        keep_samples=keep_samples,
        depth=depth,
        max_memory_gb=max_memory_gb,
        rng=rng,
        progress=progress,
        **sample_kwargs,
    )
    sdata.shapes[job.region] = work.shapes[job.region]
    sdata.tables[grid_key] = work.tables[grid_key]
    sdata.tables[job.out_key] = work.tables[job.out_key]
    return job.out_key


#: CPU rate of the dense path (network, window sums, reads), model pixels per second per view on 2 cores (HER2ST C6
#: at 8 µm: 45.6 M px per view, 8 views in 235 s), and of the per-patch path, patches per second per view; for the
#: time estimate only
DENSE_PX_PER_S = 1.5e6
PATCHES_PER_S = 100.0
#: sampling cost of the default model on 2 cores, seconds per spot and sample (25 steps; for the estimate only)
SAMPLE_S = 1.0e-3
#: ``predict_image(n_samples=None)`` draws 20 samples per grid spot, fewer on grids so large that spots x samples
#: would exceed this (about 5 minutes of sampling on 2 cores), never fewer than :data:`MIN_GRID_SAMPLES`
GRID_SAMPLE_BUDGET = 300_000
DEFAULT_SAMPLES = 20
MIN_GRID_SAMPLES = 4
#: ``dense="auto"`` embeds densely when the dense pass reads fewer pixels than the patches, by this factor: a dense
#: pixel costs more than a patch pixel (larger maps, summed-area tables)
DENSE_PIXEL_COST = 1.5


def grid_samples(n_spots: int, n_samples: int | None) -> int:
    """Return the samples per grid spot: ``n_samples`` if given, else 20 capped by :data:`GRID_SAMPLE_BUDGET` (logged).

    Examples
    --------
    >>> grid_samples(700, None), grid_samples(84_000, None), grid_samples(84_000, 20)
    (20, 4, 20)
    """
    if n_samples is not None:
        return n_samples
    chosen = max(MIN_GRID_SAMPLES, min(DEFAULT_SAMPLES, GRID_SAMPLE_BUDGET // max(n_spots, 1)))
    if chosen < DEFAULT_SAMPLES:
        logger.info(
            "predict_image: %d samples per grid spot for %d spots (n_samples=None keeps spots x samples near %d); the "
            "mean comes from the model's mean head where it has one, the std from these samples. Pass n_samples for "
            "more.",
            chosen,
            n_spots,
            GRID_SAMPLE_BUDGET,
        )
    return chosen


@dataclass
class _ImageJob:
    """What :func:`predict_image` lays out and embeds, decided before any work."""

    section: str
    info: Any
    spacing_um: float
    patch_um: float | None
    region: str
    out_key: str
    encoder: Any
    context: dict | None
    base_key: str
    ring_spacing_um: float | None = None
    stain_norm: dict | None = None  # the training sections' stain reference, when the model was trained on one
    dense_trained: bool = False  # the model was trained on dense features (pp.embed_patches(dense=True))


def _image_job(
    model: Predictor,
    sdata: Any,
    section: str,
    spacing_um: float | None,
    table_key: str,
    key_added: str | None,
    overwrite: bool,
    n_samples: int | None,
    encoder: Any,
) -> _ImageJob:
    """Check the arguments and the keys to write (refusing before any work) and settle the grid's settings."""
    from stemst._schema import section_info
    from stemst._spatial import check_spacing

    if encoder is None and not model.encoder.get("encoder"):
        raise StemstDataError(
            "The model does not record which encoder made its embeddings (fit it on a table embedded with "
            "stemst.pp.embed_patches, or pass encoder=); predict_image needs it to embed new patches the same way."
        )
    if n_samples is not None:
        _check_n_samples(n_samples)
    if spacing_um is not None:
        check_spacing(spacing_um)
    info = section_info(get_table(sdata, table_key), section)
    region, out_key = f"{section}_grid", key_added or f"{PREDICTION_KEY}_{section}_grid"
    for key in (f"{region}_table", out_key):
        check_table_key_free(sdata, key, overwrite=overwrite, counts_key=table_key)
    if region in sdata.shapes and not overwrite:
        raise StemstDataError(f"sdata.shapes[{region!r}] exists; pass overwrite=True to replace the grid.")
    patch_um = model.encoder.get("patch_size_um")
    if isinstance(patch_um, dict) and patch_um:
        patch_um = float(np.median(list(patch_um.values())))
    if spacing_um is None:
        spacing_um = float(patch_um) if patch_um else info.spot_diameter_um
    context = model.encoder.get("context") or None
    job = _ImageJob(
        section=section,
        info=info,
        spacing_um=float(spacing_um),
        patch_um=float(patch_um) if patch_um else None,
        region=region,
        out_key=out_key,
        encoder=encoder if encoder is not None else (model.encoder.get("encoders") or model.encoder["encoder"]),
        context=context,
        base_key=context["embedding_key"] if context else model.embedding_key,
        stain_norm=model.encoder.get("stain_norm") or None,
        dense_trained=bool(model.encoder.get("dense")),
    )
    if context:
        job.ring_spacing_um = _training_spacing_um(model, context)
    return job


def _training_spacing_um(model: Predictor, context: dict) -> float | None:
    """Return the spot spacing (µm) of the model's training sections, from the recorded context spacing (px) and µm/px."""
    spacing = context.get("spacing") or {}
    mpp, level = model.encoder.get("level_mpp"), model.encoder.get("level")
    if not isinstance(mpp, dict) or not isinstance(spacing, dict):
        return None
    level = level if isinstance(level, dict) else {}
    seen = getattr(model, "training", {}).get("sections") or list(spacing)
    values = [float(spacing[s]) * float(mpp[s]) / 2 ** int(level.get(s, 0)) for s in spacing if s in seen and s in mpp]
    return float(np.median(values)) if values else None


def _announce(
    job: _ImageJob,
    model: Predictor,
    n_spots: int,
    n_draw: int,
    *,
    keep_samples: bool,
    max_memory_gb: float,
    dense: _DensePlan | None,
) -> None:
    """Log the grid, a time estimate and the memory it will hold; refuse above ``max_memory_gb``."""
    dim = int(model.encoder.get("dim") or 1632)
    n_rings = int(job.context["n_rings"]) if job.context else 0
    views = N_VIEWS_DENSE if job.context and job.context.get("use_views") else 1
    # own features (the mean of the views; per patch every view), rings, context and its standardised copy, float32
    feature_gb = 4.0 * n_spots * dim * (2 + 2 * n_rings + 2 * (1 + n_rings) + (1 if dense else views)) / 1e9
    sample_gb = sample_memory_gb(n_spots, n_draw, model.n_genes, keep_samples=keep_samples)
    need = feature_gb + sample_gb
    embed_s = views * dense.pixels / DENSE_PX_PER_S if dense else views * n_spots / PATCHES_PER_S
    sample_s = n_spots * n_draw * SAMPLE_S
    how = f"densely ({dense.pixels / 1e6:.0f} M model px per view)" if dense else "per patch"
    logger.info(
        "predict_image: %d grid spots %.0f µm apart in section %r, embedded %s, %d view(s), %d sample(s) each; about "
        "%.1f GB of features and samples; on a 2-core CPU about %.0f s to embed and %.0f s to sample (less on a GPU).",
        n_spots,
        job.spacing_um,
        job.section,
        how,
        views,
        n_draw,
        need,
        embed_s,
        sample_s,
    )
    if need > max_memory_gb:
        raise StemstDataError(
            f"predict_image: {n_spots:,} grid spots would hold about {need:.1f} GB of features and samples, more "
            f"than max_memory_gb={max_memory_gb:g}. Use a coarser spacing_um, fewer n_samples, keep_samples=False, "
            "or raise max_memory_gb if the machine has the memory."
        )


#: views of the default augmentation (the dihedral group)
N_VIEWS_DENSE = 8


def _grid_element(sdata: Any, job: _ImageJob, centres: np.ndarray) -> tuple[Any, str]:
    """Build the grid as circles with a table, in a new SpatialData sharing ``sdata``'s image (added to it at the end)."""
    import spatialdata as sd
    from spatialdata.models import ShapesModel, TableModel
    from spatialdata.transformations import Identity

    section, region, info = job.section, job.region, job.info
    ids = pd.Index([f"g{i}" for i in range(len(centres))])
    shapes = ShapesModel.parse(
        centres,
        geometry=0,
        radius=np.full(len(centres), job.spacing_um / info.microns_per_pixel / 2),
        index=ids,
        transformations={section: Identity()},
    )
    obs = pd.DataFrame(
        {
            SECTION_KEY: pd.Categorical([section] * len(ids)),
            REGION_KEY: pd.Categorical([region] * len(ids)),
            INSTANCE_KEY: ids.to_numpy(),
        },
        index=pd.Index([f"{region}_{i}" for i in ids]),
    )
    grid = ad.AnnData(obs=obs)
    grid.obsm[SPATIAL_KEY] = centres
    grid.uns[UNS_KEY] = {"sections": {section: info.to_dict()}}
    grid = TableModel.parse(grid, region=region, region_key=REGION_KEY, instance_key=INSTANCE_KEY)
    work = sd.SpatialData(images={f"{section}_he": sdata.images[f"{section}_he"]}, shapes={region: shapes})
    grid_key = f"{region}_table"
    work.tables[grid_key] = grid
    return work, grid_key


@dataclass
class _DensePlan:
    """A dense pass over the grid, planned before any work: its tiles read ``pixels`` model pixels per view."""

    stats: Any
    corners: np.ndarray
    image: Any
    plan: Any
    pixels: int
    tile_px: int
    margin_px: int


def _dense_plan(
    work: Any, job: _ImageJob, grid_key: str, *, auto: bool, tile_px: int, margin_px: int
) -> _DensePlan | None:
    """Plan the dense pass over the grid (its tiles and their pixels) before any work.

    None (logged) when the encoder cannot run densely or, with ``auto``, when the patches would read fewer pixels
    (the dense ones weighted by :data:`DENSE_PIXEL_COST`).
    """
    from stemst._torch import resolve_device
    from stemst.pp._dense import DenseGeometry, DenseStats, check_tiles, dense_model
    from stemst.pp._embed import _check_tissue, _windows, plan_section
    from stemst.pp._encoders import resolve_encoders

    check_tiles(tile_px, margin_px)
    if job.stain_norm:
        logger.info("predict_image: the model was trained on stain-normalised patches; embedding each grid spot's "
                    "patch, normalised to its training reference.")  # fmt: skip
        return None
    encoders = resolve_encoders(job.encoder)
    net = dense_model(encoders[0].load("cpu")) if len(encoders) == 1 else None
    if net is None:
        logger.info("predict_image: encoder %s cannot run densely; embedding each grid spot's patch.", job.encoder)
        return None
    table = work.tables[grid_key]
    coords = np.asarray(table.obsm[SPATIAL_KEY], np.float64)
    plan, image = plan_section(work, table, job.section, encoders=encoders, patch_size_um=job.patch_um)
    _check_tissue(work, table, job.section, coords)
    geom = DenseGeometry(plan.patch_px, int(encoders[0].input_size), tile_px, margin_px)
    stats, corners = DenseStats(encoders[0], net, geom, resolve_device("auto")), _windows(coords, plan)
    dense_px = sum(t.h * t.w for t in stats.tiles(stats.windows(corners)))
    patch_px = len(coords) * geom.input_size**2
    if job.dense_trained:
        logger.info("predict_image: the model was trained on dense features; embedding the grid densely.")
    elif auto and dense_px * DENSE_PIXEL_COST >= patch_px:
        logger.info("predict_image: the patches read %.0f M model px per view, a dense pass %.0f M (x %.1f for its "
                    "cost per pixel); embedding per patch.", patch_px / 1e6, dense_px / 1e6, DENSE_PIXEL_COST)  # fmt: skip
        return None
    return _DensePlan(stats, corners, image, plan, int(dense_px), tile_px, margin_px)


def _embed_grid(
    work: Any, job: _ImageJob, grid_key: str, dense: _DensePlan | None, *, batch_size: Any, progress: bool
) -> None:
    """Embed the grid spots: ``obsm[base_key]`` is the mean of the views when the context uses them, else view 0."""
    from stemst.pp import embed_patches

    use_views = bool(job.context and job.context.get("use_views"))
    if dense is not None:
        _embed_grid_dense(work, job, grid_key, dense, views=N_VIEWS_DENSE if use_views else 1)
        return
    embed_patches(
        work,
        encoder=job.encoder,
        table_key=grid_key,
        sections=[job.section],
        patch_size_um=job.patch_um,
        augment=use_views,
        batch_size=batch_size,
        progress=progress,
        key_added=job.base_key,
        stain_norm=job.stain_norm or False,
    )


def _embed_grid_dense(work: Any, job: _ImageJob, grid_key: str, dense: _DensePlan, *, views: int) -> None:
    """Dense features for the grid (the mean over the views, never the per-view array)."""
    table, plan = work.tables[grid_key], dense.plan
    feats = dense.stats.run(dense.image, dense.corners, views=views, mean_views=True)
    table.obsm[job.base_key] = feats
    name = dense.stats.encoder.name
    table.uns.setdefault(UNS_KEY, {}).setdefault("embeddings", {})[job.base_key] = {
        "encoder": name,
        "encoders": [name],
        "dim": int(feats.shape[1]),
        "patch_size_um": {job.section: float(plan.patch_size_um)},
        "patch_px": {job.section: int(plan.patch_px)},
        "level": {job.section: int(plan.level)},
        "level_mpp": {job.section: float(plan.level_mpp)},
        "views": views,
        "views_mean": True,
        "dense": {"tile_px": dense.tile_px, "margin_px": dense.margin_px},
    }


def _grid_context(table: ad.AnnData, job: _ImageJob) -> None:
    """Own + ring means at the training spot spacing, standardised as :func:`stemst.pp.spatial_context` does."""
    from stemst._schema import context_key, ring_key
    from stemst._spatial import spot_spacing

    context = job.context
    own = np.asarray(table.obsm[job.base_key], np.float32)
    coords = np.asarray(table.obsm[SPATIAL_KEY], np.float64)
    step = job.ring_spacing_um / job.info.microns_per_pixel if job.ring_spacing_um else spot_spacing(coords)
    grid_step = spot_spacing(coords) if len(coords) > 1 else step
    inner, rings = own, []
    for k, graph in enumerate(_lattice_rings(coords, int(context["n_rings"]), step, grid_step), start=1):
        ring = np.asarray(graph @ own, np.float32)
        empty = np.asarray(graph.sum(1)).ravel() == 0
        ring[empty] = inner[empty]
        table.obsm[ring_key(job.base_key, k)] = inner = ring
        rings.append(ring)
    table.obsm[context_key(job.base_key)] = _context_block(own, rings, standardize=bool(context.get("standardize")))
    settings = {**context, "spacing": {job.section: float(step)}, "grid_step": float(grid_step)}
    table.uns.setdefault(UNS_KEY, {}).setdefault("context", {})[context_key(job.base_key)] = settings
    emb = table.uns[UNS_KEY].get("embeddings", {}).get(job.base_key)
    if emb is not None:
        table.uns[UNS_KEY]["embeddings"][context_key(job.base_key)] = {**dict(emb), "context": settings}


def _context_block(own: np.ndarray, rings: list[np.ndarray], *, standardize: bool, chunk: int = 256) -> np.ndarray:
    """``[own, ring1, ...]`` standardised per column as :func:`stemst.pp.spatial_context` does, without copies.

    Filled and standardised in place, ``chunk`` columns at a time: a fine grid's context is gigabytes.
    """
    n, d = own.shape
    block = np.empty((n, d * (1 + len(rings))), np.float32)
    for k, part in enumerate([own, *rings]):
        block[:, k * d : (k + 1) * d] = part
    if standardize and n > 1:
        for start in range(0, block.shape[1], chunk):
            cols = block[:, start : start + chunk]
            mean, std = cols.mean(0), cols.std(0)
            cols -= mean
            cols /= std + 1e-3
    return block


def _lattice_rings(coords: np.ndarray, n_rings: int, step: float, grid_step: float) -> list[Any]:
    """Row-normalised ring graphs: ring ``k`` holds the grid spots nearest to a square lattice's ring-``k`` points.

    The lattice has spacing ``step`` (the training spots'); its ring ``k`` is the points ``(i, j) * step`` with
    ``k - 0.5 < sqrt(i^2 + j^2) <= k + 0.5``, as the rings of :func:`stemst.pp.spatial_context` on a square array.
    A lattice point with no grid spot within half a grid step (diagonal) is left out of the mean.
    """
    import scipy.sparse as sp
    from scipy.spatial import cKDTree

    tree = cKDTree(coords)
    reach = np.arange(-(n_rings + 1), n_rings + 2)
    graphs = []
    for k in range(1, n_rings + 1):
        rows, cols = [], []
        for i in reach:
            for j in reach:
                if not k - 0.5 < np.hypot(i, j) <= k + 0.5:
                    continue
                dist, idx = tree.query(coords + np.array([i, j]) * step, distance_upper_bound=grid_step * 0.75)
                ok = np.isfinite(dist)
                rows.append(np.flatnonzero(ok))
                cols.append(idx[ok])
        r, c = np.concatenate(rows), np.concatenate(cols)
        adj = sp.csr_matrix((np.ones(len(r)), (r, c)), shape=(len(coords),) * 2)
        deg = np.asarray(adj.sum(1)).ravel()
        graphs.append(sp.diags(np.divide(1.0, deg, out=np.zeros_like(deg), where=deg > 0)) @ adj)
    return graphs
