"""Calibration of the sample spread on held-out data: per gene, the scale that makes intervals mean what they say."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from stemst.metrics import interval_coverage

#: central interval levels the calibration aims at (and :func:`stemst.tl.evaluate` reports)
LEVELS = (0.5, 0.8, 0.9, 0.95)
#: candidate scales of the sample spread
SCALES = np.geomspace(0.05, 20.0, 121)


def spread_scales(
    samples: np.ndarray,
    y: np.ndarray,
    *,
    levels: Sequence[float] = LEVELS,
    scales: np.ndarray = SCALES,
    min_spots: int = 50,
) -> np.ndarray:
    """Per-gene factor ``s`` such that the samples spread ``s`` times wider around their mean are calibrated.

    For each gene the scale minimises the mean over ``levels`` of ``|coverage - level|`` of the central intervals
    of ``mean + s (samples - mean)`` on held-out values ``y``. With fewer than ``min_spots`` spots, one scale for
    all genes is fitted instead (per-gene coverage would be too noisy).

    Parameters
    ----------
    samples
        ``(n_samples, n_spots, genes)`` samples for held-out spots.
    y
        ``(n_spots, genes)`` the measured values.

    Returns
    -------
    ``(genes,)`` scales.

    Examples
    --------
    >>> rng = np.random.default_rng(0)
    >>> y = rng.normal(scale=3.0, size=(400, 2))
    >>> samples = rng.normal(size=(200, 400, 2))  # three times too narrow
    >>> np.round(spread_scales(samples, y), 0).tolist()
    [3.0, 3.0]
    """
    center = samples.mean(0)
    dev, yc = samples - center, y - center
    q = np.asarray(levels, float)
    lo, hi = np.quantile(dev, np.concatenate([(1 - q) / 2, (1 + q) / 2]), axis=0).reshape(2, len(q), *y.shape)
    err = np.empty((len(scales), y.shape[1]))
    for i, s in enumerate(scales):
        hit = (yc >= s * lo) & (yc <= s * hi)  # (levels, spots, genes)
        cov = hit.mean(1) if y.shape[0] >= min_spots else np.broadcast_to(hit.mean((1, 2))[:, None], hit.shape[::2])
        err[i] = np.abs(cov - q[:, None]).mean(0)
    return scales[np.argmin(err, axis=0)]


def widen(samples: np.ndarray, scales: np.ndarray | float) -> np.ndarray:
    """Spread ``(n_samples, n_spots, genes)`` samples ``scales`` (per gene) times wider around their mean.

    Examples
    --------
    >>> widen(np.array([[[1.0]], [[3.0]]]), 2.0).ravel().tolist()
    [0.0, 4.0]
    """
    center = samples.mean(0)
    return center + scales * (samples - center)


def coverage(samples: np.ndarray, y: np.ndarray, level: float) -> float:
    """Share of ``y`` ``(n_spots, genes)`` inside the central ``level`` interval of the samples, over all values.

    ``samples`` are ``(n_samples, n_spots, genes)``, as :func:`spread_scales` takes them
    (:func:`stemst.metrics.interval_coverage` takes the spots first).

    Examples
    --------
    >>> coverage(np.arange(5.0).reshape(5, 1, 1), np.array([[2.0]]), 0.5)
    1.0
    """
    return float(interval_coverage(samples.transpose(1, 0, 2), y, level).mean())
