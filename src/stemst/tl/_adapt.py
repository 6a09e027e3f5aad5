"""Few-shot adaptation to a new section from a handful of measured spots, without retraining: :func:`adapt`."""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd

from stemst._docs import doc_params, doc_progress, doc_table_key
from stemst._logging import logger
from stemst._schema import TABLE_KEY, StemstDataError, get_table, section_mask
from stemst._utils import RNGLike, as_generator
from stemst.model.calibration import coverage, spread_scales, widen
from stemst.tl._data import get_counts, get_embeddings, get_targets

#: measured spots from which the spread is scaled gene by gene (one scale for all genes below)
PER_GENE_SPREAD_SPOTS = 100
#: prior degrees of freedom pulling each gene's residual variance towards the panel's pooled one
VARIANCE_PRIOR_DF = 4.0


def level_offsets(resid: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-gene level offsets from the residuals ``(k, genes)`` of ``k`` measured spots, shrunk for small ``k``.

    Empirical Bayes (James-Stein): each gene's mean residual is pulled towards the panel's common offset (a shift
    shared by all genes, such as sequencing depth, which ``k * genes`` values estimate well) by the weight
    ``tau^2 / (tau^2 + s_g^2 / k)``, where ``s_g^2`` is the gene's residual variance (pooled with the panel's for
    small ``k``) and ``tau^2`` the spread of the genes' true offsets around the common one.

    Returns
    -------
    ``(offsets, weights)``, each ``(genes,)``.

    Examples
    --------
    >>> rng = np.random.default_rng(0)
    >>> true = np.array([2.0, 2.0, -1.0, 3.0])
    >>> off, w = level_offsets(true + rng.normal(size=(400, 4)))
    >>> bool(np.abs(off - true).max() < 0.15), bool((w > 0.9).all())  # many spots: each gene its own offset
    (True, True)
    >>> off, w = level_offsets(2.0 + rng.normal(size=(3, 4)))  # genes alike, 3 spots: the common offset
    >>> bool((w < 0.5).all())
    True
    """
    k = len(resid)
    means = resid.mean(0)
    common = float(means.mean())
    if k < 2:
        return np.full_like(means, common), np.zeros_like(means)
    var = resid.var(0, ddof=1)
    var = ((k - 1) * var + VARIANCE_PRIOR_DF * var.mean()) / (k - 1 + VARIANCE_PRIOR_DF)
    noise = var / k
    tau2 = max(0.0, float(np.var(means, ddof=1) - noise.mean())) if len(means) > 1 else 0.0
    weights = tau2 / (tau2 + noise) if tau2 > 0 else np.zeros_like(means)
    return common + weights * (means - common), weights


def _loo_offsets(resid: np.ndarray) -> np.ndarray:
    """Each measured spot's offsets estimated without it, ``(k, genes)``: honest residuals for the spread."""
    k = len(resid)
    if k < 3:
        return np.broadcast_to(level_offsets(resid)[0], resid.shape).copy()
    return np.stack([level_offsets(np.delete(resid, i, axis=0))[0] for i in range(k)])


def _pick_spots(table: Any, section: str, spots: int | Sequence[str] | np.ndarray, rng: RNGLike) -> np.ndarray:
    """Row mask over ``table`` of the measured spots of ``section`` (``spots``: a number drawn at random, or names)."""
    in_section = section_mask(table, section)
    if not in_section.any():
        raise StemstDataError(f"Table has no spots in section {section!r}.")
    if isinstance(spots, int | np.integer) and not isinstance(spots, bool):
        candidates = np.flatnonzero(in_section)
        if not 2 <= spots <= len(candidates):
            raise ValueError(f"spots={spots} must be between 2 and the section's {len(candidates)} spots.")
        chosen = as_generator(rng).choice(candidates, int(spots), replace=False)
        mask = np.zeros(table.n_obs, bool)
        mask[chosen] = True
        return mask
    names = np.asarray(list(spots), dtype=str)
    mask = table.obs_names.isin(names) & in_section
    missing = set(names) - set(table.obs_names[mask])
    if missing:
        raise StemstDataError(
            f"{len(missing)} of the spots are not spots of section {section!r} in the table, e.g. {sorted(missing)[:5]}."
        )
    if mask.sum() < 2:
        raise ValueError("adapt needs at least 2 measured spots.")
    return mask


@doc_params(table_key=doc_table_key, progress=doc_progress)
def adapt(
    model: Any,
    data: Any,
    *,
    section: str,
    spots: int | Sequence[str] = 20,
    table_key: str = TABLE_KEY,
    n_samples: int = 30,
    rng: RNGLike = 0,
    progress: bool = False,
    **sample_kwargs: Any,
) -> Any:
    """Adapt a model to a new section (a new patient, a new run) from a few of its spots with measured counts.

    Without retraining the network: the model's predictions for the measured spots are compared with their
    counts, and two things are re-estimated, which :func:`stemst.tl.predict` then applies to every spot it predicts:

    - the **level** of each gene, a per-gene offset on the model's scale (:func:`level_offsets`: shrunk towards
      the offset shared by all genes, e.g. sequencing depth, when the spots are few);
    - the **spread** of the samples around their mean, one scale (a scale per gene from
      :data:`PER_GENE_SPREAD_SPOTS` spots) chosen so that the central intervals cover their nominal share of the
      measured values, each judged with offsets estimated without it (leave-one-out), as new spots will be.

    Per-gene offsets do not change the ranking of the spots, so per-gene correlations stay as they were; the
    levels, the MSE and the intervals are what adapts.

    Parameters
    ----------
    model
        A trained :class:`~stemst.tl.StemstModel` (an adapted one is adapted afresh from its unadapted self).
    data
        :class:`~spatialdata.SpatialData` or :class:`~anndata.AnnData` with the section's embeddings and counts.
    section
        The section to adapt to.
    spots
        The measured spots: a number (drawn at random from the section with ``rng``) or their ``obs_names``.
        The other spots of the section need no counts.
    {table_key}
    n_samples
        Samples per measured spot.
    rng
        Seed of the spots drawn and of the samples.
    {progress}
    **sample_kwargs
        Passed to the model's ``sample`` (as in :func:`stemst.tl.predict`).

    Returns
    -------
    A new model (``model`` is unchanged) whose ``adaptation`` records the section, the measured spots
    (``adaptation["spots"]``), the offsets and the spread scales; it is saved and loaded with the model.
    :func:`stemst.tl.predict` marks the measured spots in ``obs['adapt_measured']`` and :func:`stemst.tl.evaluate`
    scores the other spots only.

    Examples
    --------
    >>> adapted = stemst.tl.adapt(model, sdata, section="C6", spots=10)
    >>> adapted.adaptation["n_measured"], len(adapted.adaptation["offset"]), model.adaptation is None
    (10, 20, True)
    """
    from stemst.tl._model import StemstModel

    if not isinstance(model, StemstModel):
        raise TypeError(f"adapt needs a trained stemst model (stemst.tl.fit), got {type(model).__name__}.")
    base = copy.copy(model)
    base.adaptation = None
    table = get_table(data, table_key)
    sub = table[_pick_spots(table, section, spots, rng)]
    base.check_table(sub)
    if not get_counts(sub, base.genes).any():
        raise StemstDataError(f"The measured spots of section {section!r} have no counts in the model's panel.")
    X = get_embeddings(sub, base.embedding_key)
    y = get_targets(sub, base.genes, base.transform).astype(np.float64)
    samples = np.asarray(base.sample(X, n_samples=n_samples, rng=rng, progress=progress, **sample_kwargs), np.float64)
    point = np.asarray(base.point_estimate(X, samples), np.float64)
    offset, weights = level_offsets(y - point)
    loo = _loo_offsets(y - point)
    shifted = samples + loo
    per_gene = len(y) >= PER_GENE_SPREAD_SPOTS
    scales = spread_scales(shifted, y, min_spots=PER_GENE_SPREAD_SPOTS if per_gene else len(y) + 1)
    wide = widen(shifted, scales)
    loo_coverage = {f"coverage_{round(q * 100)}": coverage(wide, y, q) for q in (0.5, 0.9)}
    adapted = copy.copy(base)
    adapted.adaptation = {
        "section": str(section),
        "n_measured": len(y),
        "spots": sub.obs_names.astype(str).tolist(),
        "offset": offset.astype(float).tolist(),
        "shrinkage_weight": float(weights.mean()),
        "common_offset": float(np.mean(offset)),
        "spread_scale": scales.astype(float).tolist(),
        "spread_per_gene": per_gene,
        "coverage_loo": loo_coverage,
    }
    logger.info(
        "Adapted to section %r on %d measured spots: common offset %.2f, spread x%.2f (median), leave-one-out %s",
        section,
        len(y),
        adapted.adaptation["common_offset"],
        float(np.median(scales)),
        loo_coverage,
    )
    return adapted


def apply_adaptation(adaptation: dict[str, Any], mean: np.ndarray, samples: np.ndarray) -> tuple[np.ndarray, ...]:
    """Return the adapted point prediction ``(n, genes)`` and samples ``(n_samples, n, genes)``.

    The point prediction is shifted by the offsets, unclipped: so each gene's ranking of the spots, and its
    correlation with the measured values, are exactly the unadapted model's (a shift below 0 is clipped in the
    counts). The samples are shifted likewise, spread around their own mean by the spread scales and clipped at 0.
    """
    offset = np.asarray(adaptation["offset"], np.float32)
    scale = np.asarray(adaptation["spread_scale"], np.float32)
    center = samples.mean(0)
    new = center + offset + scale * (samples - center)
    return (mean + offset).astype(np.float32), np.clip(new, 0, None).astype(np.float32)


#: numbers of measured spots :func:`adaptation_curve` tries by default
CURVE_SPOTS = (0, 5, 10, 20, 50)


@doc_params(table_key=doc_table_key)
def adaptation_curve(
    model: Any,
    data: Any,
    *,
    section: str,
    n_measured: Sequence[int] = CURVE_SPOTS,
    table_key: str = TABLE_KEY,
    n_samples: int = 20,
    rng: RNGLike = 0,
    **sample_kwargs: Any,
) -> pd.DataFrame:
    """How a model does on a section with 0, 5, 10, ... measured spots (:func:`adapt`), scored on the others.

    For each number ``k``, ``k`` spots of the section are drawn (seed ``rng``), the model is adapted on them,
    the section is predicted and :func:`stemst.tl.evaluate` scores the spots not drawn (``k = 0``: the model as
    it is, on every spot). ``data`` is left as it was.

    Parameters
    ----------
    model
        A trained :class:`~stemst.tl.StemstModel`.
    data
        :class:`~spatialdata.SpatialData` or :class:`~anndata.AnnData` with the section's embeddings and counts.
    section
        The section.
    n_measured
        The numbers of measured spots.
    {table_key}
    n_samples
        Samples per spot.
    rng
        Seed of the spots drawn and of the samples.
    **sample_kwargs
        Passed to the model's ``sample``, when adapting and when predicting.

    Returns
    -------
    One row per ``k``: ``n_measured``, ``n_scored``, ``mean_pearson``, ``mse``, ``coverage_50``, ``coverage_90``,
    ``fraction_ood`` (the section's share of spots with an OOD score above 1).

    Examples
    --------
    >>> curve = stemst.tl.adaptation_curve(model, sdata, section="C6", n_measured=(0, 10), n_samples=4)
    >>> curve["n_measured"].tolist(), curve["n_scored"].tolist()  # C6 has 178 spots
    ([0, 10], [178, 168])
    """
    from types import SimpleNamespace

    from stemst._schema import OOD_UNS_KEY
    from stemst.tl._evaluate import evaluate
    from stemst.tl._predict import predict

    table = get_table(data, table_key)
    rows = []
    for k in n_measured:
        adapted = model if k == 0 else adapt(model, table, section=section, spots=int(k), rng=rng, **sample_kwargs)
        pred = predict(adapted, table, sections=section, n_samples=n_samples, rng=rng, progress=False, **sample_kwargs)
        tables = SimpleNamespace(tables={"counts": table, "prediction": pred})  # leaves ``data`` as it was
        summary = evaluate(tables, pred_key="prediction", table_key="counts", key_added=None, normalized=False).summary
        ood = pred.uns.get(OOD_UNS_KEY, {}).get(section, {})
        rows.append(
            {
                "n_measured": int(k),
                "n_scored": int(summary["n_spots"]),
                **{m: float(summary[m]) for m in ("mean_pearson", "mse", "coverage_50", "coverage_90")},
                "fraction_ood": ood.get("fraction_ood", np.nan),
            }
        )
    return pd.DataFrame(rows)
