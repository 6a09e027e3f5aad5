"""Proper scoring rules of a predictive distribution given by samples: CRPS, energy score, variogram score.

A proper score is minimised in expectation by the true predictive distribution, so it compares probabilistic
predictions fairly: a method cannot gain by being over- or under-confident, and it rewards sharpness only where it
is calibrated. All three are computed from samples, with the *fair* (unbiased in the number of samples) estimators,
so methods with different numbers of samples compare fairly; one sample (a deterministic prediction) reduces CRPS to
the absolute error and the energy score to the Euclidean error. Lower is better for every score.

References
----------
- Gneiting, T. & Raftery, A. E. (2007). Strictly proper scoring rules, prediction, and estimation. *JASA* 102,
  359-378 (CRPS and the energy score).
- Ferro, C. A. T. (2014). Fair scores for ensemble forecasts. *Q. J. R. Meteorol. Soc.* 140, 1917-1923 (the fair
  estimators used here).
- Scheuerer, M. & Hamill, T. M. (2015). Variogram-based proper scoring rules for probabilistic forecasts of
  multivariate quantities. *Monthly Weather Review* 143, 1321-1334 (the variogram score).
"""

from __future__ import annotations

import numpy as np


def _samples_and_truth(samples: np.ndarray, true: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    samples = np.asarray(samples, dtype=np.float64)
    true = np.asarray(true, dtype=np.float64)
    if samples.ndim != 3 or samples.shape[0] != true.shape[0] or samples.shape[2:] != true.shape[1:]:
        raise ValueError(
            f"samples must be (n_spots, n_samples, n_genes) matching true (n_spots, n_genes) {true.shape}, "
            f"got {samples.shape}."
        )
    return samples, true


def _mean_pair_distance(x: np.ndarray) -> np.ndarray:
    """``sum_{i != j} |x_i - x_j| / (m (m - 1))`` over axis 1 of ``(n, m, g)``, from the sorted values (O(m log m))."""
    m = x.shape[1]
    if m < 2:
        return np.zeros((x.shape[0], x.shape[2]))
    s = np.sort(x, axis=1)
    w = 2.0 * np.arange(1, m + 1) - m - 1  # sum_{i<j} (s_j - s_i) = sum_k (2k - m - 1) s_k
    return 2.0 * np.einsum("nmg,m->ng", s, w) / (m * (m - 1))


def crps_per_spot(samples: np.ndarray, true: np.ndarray) -> np.ndarray:
    """CRPS of each spot and gene, ``(n_spots, n_genes)``, by the fair sample estimator.

    ``CRPS = mean_i |X_i - y| - sum_{i != j} |X_i - X_j| / (2 m (m - 1))`` for ``m`` samples ``X_i`` (Ferro 2014); it
    is on the scale of the values (like the absolute error, which it equals for one sample).

    Parameters
    ----------
    samples
        ``(n_spots, n_samples, n_genes)`` (the layout of ``obsm['samples']`` of a prediction table).
    true
        ``(n_spots, n_genes)`` measured values on the same scale.

    Examples
    --------
    >>> s = np.array([[[0.0], [2.0]]])  # two samples, 0 and 2, of one spot and gene
    >>> crps_per_spot(s, np.array([[1.0]])).item()  # mean |X - y| = 1, minus |0 - 2| / 2
    0.0
    >>> crps_per_spot(s[:, :1], np.array([[3.0]])).item()  # one sample: the absolute error
    3.0
    """
    samples, true = _samples_and_truth(samples, true)
    return np.abs(samples - true[:, None]).mean(1) - 0.5 * _mean_pair_distance(samples)


def crps_per_gene(samples: np.ndarray, true: np.ndarray) -> np.ndarray:
    """Mean CRPS of each gene over spots, ``(n_genes,)`` (see :func:`crps_per_spot`)."""
    return crps_per_spot(samples, true).mean(0)


def energy_score(samples: np.ndarray, true: np.ndarray) -> np.ndarray:
    """Energy score of each spot's whole panel, ``(n_spots,)``: the multivariate CRPS (fair sample estimator).

    ``ES = mean_i ||X_i - y|| - sum_{i != j} ||X_i - X_j|| / (2 m (m - 1))`` with the Euclidean norm over genes. Unlike
    a per-gene score it rewards samples whose genes move together as the measured ones do (gene-gene structure).

    Examples
    --------
    >>> s = np.array([[[0.0, 0.0], [3.0, 4.0]]])  # two samples of a 2-gene panel
    >>> energy_score(s, np.array([[0.0, 0.0]])).item()  # (0 + 5) / 2 - 5 / 2
    0.0
    """
    samples, true = _samples_and_truth(samples, true)
    n, m, _ = samples.shape
    err = np.linalg.norm(samples - true[:, None], axis=2).mean(1)
    if m < 2:
        return err
    pair = np.zeros(n)
    for i in range(m - 1):  # m (m - 1) / 2 distances per spot, without an (n, m, m, g) array
        pair += np.linalg.norm(samples[:, i + 1 :] - samples[:, i : i + 1], axis=2).sum(1)
    return err - pair / (m * (m - 1))


def neighbour_pairs(coords: np.ndarray, sections: np.ndarray | None = None) -> np.ndarray:
    """Pairs ``(a, b)`` with ``a < b`` of ring-1 neighbouring spots (within 1.5 grid steps, never across sections).

    Examples
    --------
    >>> neighbour_pairs(np.array([[0.0, 0], [1, 0], [2, 0], [9, 0]])).tolist()
    [[0, 1], [1, 2]]
    """
    from stemst._spatial import neighbourhoods

    nb, _ = neighbourhoods(np.asarray(coords, dtype=np.float64)[:, :2], sections)
    i, j = np.nonzero(nb[:, 1:] >= 0)
    a, b = i, nb[:, 1:][i, j]
    keep = a < b
    return np.stack([a[keep], b[keep]], axis=1).astype(np.int64)


def variogram_score(samples: np.ndarray, true: np.ndarray, pairs: np.ndarray, *, p: float = 0.5) -> np.ndarray:
    """Variogram score of order ``p`` over pairs of spots, per gene ``(n_genes,)``: rewards spatial structure.

    For each pair ``(a, b)`` of (neighbouring) spots and each gene, ``(|y_a - y_b|^p - E|X_a - X_b|^p)^2``, the
    expectation taken over the joint samples (sample ``i`` of spot ``a`` with sample ``i`` of spot ``b``), averaged
    over the pairs (Scheuerer & Hamill 2015, with equal pair weights). Samples drawn independently per spot have too
    large a variogram between neighbours when real neighbours are correlated; a model that samples neighbourhoods
    jointly can match it.

    Parameters
    ----------
    samples
        ``(n_spots, n_samples, n_genes)``.
    true
        ``(n_spots, n_genes)``.
    pairs
        ``(n_pairs, 2)`` row indices, e.g. from :func:`neighbour_pairs`.
    p
        Order (0.5, the usual choice, is robust to outliers).

    Examples
    --------
    >>> s = np.array([[[0.0]], [[1.0]]])  # one sample at two spots: 0 and 1
    >>> variogram_score(s, np.array([[0.0], [4.0]]), np.array([[0, 1]])).item()  # (4 ** 0.5 - 1 ** 0.5) ** 2
    1.0
    """
    samples, true = _samples_and_truth(samples, true)
    pairs = np.asarray(pairs, dtype=np.int64).reshape(-1, 2)
    if len(pairs) == 0:
        return np.full(true.shape[1], np.nan)
    a, b = pairs[:, 0], pairs[:, 1]
    expected = (np.abs(samples[a] - samples[b]) ** p).mean(1)
    return ((np.abs(true[a] - true[b]) ** p - expected) ** 2).mean(0)
