"""Evaluation metrics: small pure numpy functions on ``(n_spots, n_genes)`` arrays.

Every per-gene metric compares a gene's predicted and measured values across spots. A gene that is constant in the
measurement or in the prediction has no correlation (``NaN``); summaries average over the genes with a finite value
and report how many were left out (``n_undefined``).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy.stats import rankdata

from ._scores import crps_per_gene, energy_score, variogram_score

#: the PCC-k summaries reported by default (the Stem paper's PCC-10 / 50 / 200)
PCC_KS: tuple[int, ...] = (10, 50, 200)
#: central sample-interval levels whose coverage is reported
COVERAGE_LEVELS: tuple[float, ...] = (0.5, 0.8, 0.9, 0.95)


def _pair(pred: np.ndarray, true: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    pred = np.asarray(pred, dtype=np.float64)
    true = np.asarray(true, dtype=np.float64)
    if pred.shape != true.shape or pred.ndim != 2:
        raise ValueError(f"pred and true must be 2-D arrays of the same shape, got {pred.shape} and {true.shape}.")
    return pred, true


def _is_constant(x: np.ndarray, norm: np.ndarray) -> np.ndarray:
    """Columns whose centred norm is zero up to rounding error."""
    scale = np.abs(x).max(0) * np.sqrt(len(x))
    return norm <= 1e-12 * scale


def pearson_per_gene(pred: np.ndarray, true: np.ndarray) -> np.ndarray:
    """Pearson correlation of each gene (column) across spots (rows); ``NaN`` for a constant column.

    Examples
    --------
    >>> pearson_per_gene(np.array([[1.0, 1], [2, 2], [3, 1]]), np.array([[2.0, 0], [4, 1], [6, 2]])).round(3).tolist()
    [1.0, 0.0]
    """
    pred, true = _pair(pred, true)
    p = pred - pred.mean(0)
    t = true - true.mean(0)
    sp_, st_ = np.sqrt((p**2).sum(0)), np.sqrt((t**2).sum(0))
    with np.errstate(invalid="ignore", divide="ignore"):
        r = (p * t).sum(0) / (sp_ * st_)
    r[_is_constant(pred, sp_) | _is_constant(true, st_)] = np.nan
    return np.clip(r, -1.0, 1.0)


def mean_pearson(pred: np.ndarray, true: np.ndarray, *, undefined: float = float("nan")) -> float:
    """Mean of :func:`pearson_per_gene` over the genes where it is defined; ``undefined`` when it is for none.

    Model selection (the mean head's penalty, the baselines' cross-validation, the residual weight) scores
    with it, passing ``undefined=-1.0`` so that a fold without a defined correlation loses.

    Examples
    --------
    >>> round(mean_pearson(np.array([[1.0, 1], [2, 1], [3, 1]]), np.array([[2.0, 0], [4, 1], [6, 2]])), 6)
    1.0
    """
    r = pearson_per_gene(pred, true)
    ok = np.isfinite(r)
    return float(r[ok].mean()) if ok.any() else float(undefined)


def spearman_per_gene(pred: np.ndarray, true: np.ndarray) -> np.ndarray:
    """Spearman rank correlation of each gene (Pearson on average ranks); ``NaN`` for a constant column."""
    pred, true = _pair(pred, true)
    return pearson_per_gene(rankdata(pred, axis=0), rankdata(true, axis=0))


def mse_per_gene(pred: np.ndarray, true: np.ndarray) -> np.ndarray:
    """Mean squared error of each gene across spots."""
    pred, true = _pair(pred, true)
    return ((pred - true) ** 2).mean(0)


def mae_per_gene(pred: np.ndarray, true: np.ndarray) -> np.ndarray:
    """Mean absolute error of each gene across spots."""
    pred, true = _pair(pred, true)
    return np.abs(pred - true).mean(0)


def variance_ratio(pred: np.ndarray, true: np.ndarray) -> np.ndarray:
    """``var(pred) / var(true)`` per gene across spots (1 = spread preserved); ``NaN`` where the measurement is constant.

    Examples
    --------
    >>> variance_ratio(np.array([[0.0], [1]]), np.array([[0.0], [2]])).tolist()
    [0.25]
    """
    pred, true = _pair(pred, true)
    vt = true.var(0)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(vt > 0, pred.var(0) / np.where(vt > 0, vt, 1.0), np.nan)


def pcc_at_k(r: np.ndarray, k: int) -> float:
    """PCC-k: the mean of the ``k`` highest per-gene correlations.

    Genes with an undefined (``NaN``) correlation are ignored. When fewer than ``k`` genes have one, PCC-k is
    ``NaN`` rather than a mean over fewer genes, so a PCC-200 is never silently a PCC-100. Note that the ranking
    uses the test results, so PCC-k is optimistic; the mean over the whole panel is the honest summary.

    Examples
    --------
    >>> pcc_at_k(np.array([0.1, 0.9, np.nan, 0.5]), 2)
    0.7
    >>> pcc_at_k(np.array([0.1, 0.9]), 3)
    nan
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}.")
    r = np.asarray(r, dtype=np.float64)
    r = r[np.isfinite(r)]
    if len(r) < k:
        return float("nan")
    return float(np.sort(r)[::-1][:k].mean())


def relative_variance_distance(pred: np.ndarray, true: np.ndarray) -> float:
    """RVD: mean over genes of ``(var_pred - var_true)^2 / var_true^2`` (variance across spots; 0 = spread kept).

    Genes that are constant in the measurement are left out.

    Examples
    --------
    >>> relative_variance_distance(np.array([[0.0, 0], [1, 2]]), np.array([[0.0, 0], [2, 2]]))
    0.28125
    """
    pred, true = _pair(pred, true)
    vt, vp = true.var(0), pred.var(0)
    ok = vt > 0
    if not ok.any():
        return float("nan")
    return float(np.mean((vp[ok] - vt[ok]) ** 2 / vt[ok] ** 2))


def interval_coverage(samples: np.ndarray, true: np.ndarray, level: float) -> np.ndarray:
    """Per gene, the fraction of measured values inside the central ``level`` interval of the model's samples.

    A calibrated model covers a fraction ``level`` of the measurements (0.5 for the 50% interval); less means
    over-confident samples, more means too wide.

    Parameters
    ----------
    samples
        ``(n_spots, n_samples, n_genes)`` samples (the layout of ``obsm['samples']`` of a prediction table).
    true
        ``(n_spots, n_genes)`` measured values on the same scale.
    level
        Central probability mass of the interval, in (0, 1); its ends are the ``(1 - level) / 2`` and
        ``(1 + level) / 2`` sample quantiles (linear interpolation), both included.

    Returns
    -------
    ``(n_genes,)`` coverage fractions.

    Examples
    --------
    >>> s = np.arange(5.0).reshape(1, 5, 1).repeat(2, axis=0)  # samples 0..4 at both spots
    >>> interval_coverage(s, np.array([[2.0], [3.5]]), 0.5).tolist()  # interval [1, 3]
    [0.5]
    """
    samples = np.asarray(samples, dtype=np.float64)
    true = np.asarray(true, dtype=np.float64)
    if samples.ndim != 3 or samples.shape[0] != true.shape[0] or samples.shape[2] != true.shape[1]:
        raise ValueError(
            f"samples must be (n_spots, n_samples, n_genes) matching true {true.shape}, got {samples.shape}."
        )
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}.")
    lo, hi = np.quantile(samples, [(1 - level) / 2, (1 + level) / 2], axis=1)
    return ((true >= lo) & (true <= hi)).mean(0)


def gene_metrics(
    pred: np.ndarray,
    true: np.ndarray,
    *,
    samples: np.ndarray | None = None,
    levels: Sequence[float] = COVERAGE_LEVELS,
    pairs: np.ndarray | None = None,
) -> dict[str, np.ndarray]:
    """All per-gene metrics.

    Returns
    -------
    Columns ``pearson``, ``spearman``, ``mse``, ``mae``, ``var_ratio``, ``mean_pred``, ``mean_true``, ``var_pred``,
    ``var_true``; with ``samples``, ``crps`` (:func:`~stemst.metrics.crps_per_gene`), ``variogram`` (with ``pairs``,
    :func:`~stemst.metrics.variogram_score`) and, with at least 2 samples, ``coverage_50`` / ``coverage_90`` (one per
    level).
    """
    pred, true = _pair(pred, true)
    out = {
        "pearson": pearson_per_gene(pred, true),
        "spearman": spearman_per_gene(pred, true),
        "mse": mse_per_gene(pred, true),
        "mae": mae_per_gene(pred, true),
        "var_ratio": variance_ratio(pred, true),
        "mean_pred": pred.mean(0),
        "mean_true": true.mean(0),
        "var_pred": pred.var(0),
        "var_true": true.var(0),
    }
    if samples is not None:
        out["crps"] = crps_per_gene(samples, true)
        if pairs is not None:
            out["variogram"] = variogram_score(samples, true, pairs)
        if np.shape(samples)[1] >= 2:
            for level in levels:
                out[f"coverage_{round(100 * level)}"] = interval_coverage(samples, true, level)
    return out


def summary_metrics(
    pred: np.ndarray,
    true: np.ndarray,
    *,
    samples: np.ndarray | None = None,
    ks: Sequence[int] = PCC_KS,
    levels: Sequence[float] = COVERAGE_LEVELS,
    pairs: np.ndarray | None = None,
) -> dict[str, float]:
    """Summary metrics of a prediction.

    Parameters
    ----------
    pred, true
        ``(n_spots, n_genes)`` predicted and measured values on the same scale.
    samples
        ``(n_spots, n_samples, n_genes)`` model samples for the proper scores (one sample, a deterministic
        prediction, is scored as a point mass) and the calibration metrics (skipped with fewer than 2 samples).
    ks
        PCC-k values to report.
    levels
        Central interval levels for the coverage.
    pairs
        ``(n_pairs, 2)`` neighbouring spots for the variogram score (:func:`~stemst.metrics.neighbour_pairs`).

    Returns
    -------
    ``mean_pearson`` (mean over the whole panel), ``median_pearson``, ``mean_spearman``, ``pcc_<k>`` (see
    :func:`pcc_at_k`), ``mse`` and ``mae`` (over all spots x genes), ``rvd``, ``mean_var_ratio``, ``n_spots``,
    ``n_genes``, ``n_undefined`` (genes without a correlation); with ``samples``, ``crps`` (mean over spots and
    genes), ``energy_score`` (mean over spots), ``variogram_score`` (with ``pairs``; mean over genes), and with at
    least 2 samples ``coverage_<level>`` (overall fraction) and ``rvd_samples`` (the RVD of single samples, mean of
    two).

    Examples
    --------
    >>> rng = np.random.default_rng(0)
    >>> y = rng.normal(size=(100, 20))
    >>> summary_metrics(y, y)["mean_pearson"]
    1.0
    """
    pred, true = _pair(pred, true)
    r = pearson_per_gene(pred, true)
    rs = spearman_per_gene(pred, true)
    ok = np.isfinite(r)
    out: dict[str, float] = {
        "mean_pearson": float(r[ok].mean()) if ok.any() else float("nan"),
        "median_pearson": float(np.median(r[ok])) if ok.any() else float("nan"),
        "mean_spearman": float(np.nanmean(rs)) if np.isfinite(rs).any() else float("nan"),
    }
    for k in ks:
        out[f"pcc_{k}"] = pcc_at_k(r, k)
    vr = variance_ratio(pred, true)
    out.update(
        mse=float(((pred - true) ** 2).mean()),
        mae=float(np.abs(pred - true).mean()),
        rvd=relative_variance_distance(pred, true),
        mean_var_ratio=float(np.nanmean(vr)) if np.isfinite(vr).any() else float("nan"),
    )
    if samples is not None:
        out["crps"] = float(crps_per_gene(samples, true).mean())
        out["energy_score"] = float(energy_score(samples, true).mean())
        if pairs is not None:
            out["variogram_score"] = float(np.nanmean(variogram_score(samples, true, pairs)))
    if samples is not None and np.shape(samples)[1] >= 2:
        for level in levels:
            out[f"coverage_{round(100 * level)}"] = float(interval_coverage(samples, true, level).mean())
        # the variance across spots of single samples (not of their mean, which shrinks it by construction)
        out["rvd_samples"] = float(np.mean([relative_variance_distance(samples[:, i], true) for i in range(2)]))
    out.update(n_spots=int(pred.shape[0]), n_genes=int(pred.shape[1]), n_undefined=int((~ok).sum()))
    return out
