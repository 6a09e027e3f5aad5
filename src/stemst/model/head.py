"""The regularised mean head: reduced-rank ridge regression from the condition to the expression panel.

On a few hundred training spots a free network overfits the conditional mean, while ridge regression does not
(``docs/model.md``). The diffusion model therefore learns the distribution of the *residual* around this head, and its
samples are ``head(c) + residual``: the mean cannot be worse than the head's, whatever the diffusion learns.
The head is a closed-form fit; its penalty and rank are chosen by held-out groups (sections, or spatial blocks).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from stemst.metrics import mean_pearson

#: penalties relative to the largest eigenvalue of the centred design ``Z^T Z``, so they adapt to the data size
RELATIVE_ALPHAS = (1e-3, 3e-3, 1e-2, 3e-2, 0.1, 0.3, 1.0)
#: ranks tried for the reduced-rank projection of the fitted values (``None``: full rank)
RANKS = (None, 3, 10, 30)


def ridge_path(
    Z: np.ndarray, Y: np.ndarray, alphas: Sequence[float]
) -> tuple[list[np.ndarray], np.ndarray, np.ndarray]:
    """Ridge coefficients of ``Y ~ Z`` (with intercept) for every penalty, from one SVD of the centred design.

    Returns ``(coefs, z_mean, y_mean)``: the prediction for penalty ``alphas[i]`` is
    ``(Z - z_mean) @ coefs[i] + y_mean``.

    Examples
    --------
    >>> rng = np.random.default_rng(0)
    >>> Z = rng.normal(size=(50, 3))
    >>> (coef,), zm, ym = ridge_path(Z, Z @ [[1.0], [2.0], [0.0]] + 5, [0.0])
    >>> np.allclose(coef.ravel(), [1, 2, 0]), np.allclose(ym, 5 + zm @ [1, 2, 0])
    (True, True)
    """
    z_mean, y_mean = Z.mean(0), Y.mean(0)
    U, s, Vt = np.linalg.svd(Z - z_mean, full_matrices=False)
    UtY = U.T @ (Y - y_mean)
    return [Vt.T @ ((s / (s**2 + a))[:, None] * UtY) for a in alphas], z_mean, y_mean


def reduce_rank(coef: np.ndarray, Zc: np.ndarray, rank: int | None) -> np.ndarray:
    """Project ``coef`` so that the fitted values ``Zc @ coef`` keep only their top ``rank`` principal directions.

    Reduced-rank regression: the genes share a few latent programmes (spot depth first of all), so pooling the
    genes' signal along them removes per-gene noise from the coefficients.
    """
    if rank is None or rank >= min(coef.shape):
        return coef
    _, _, Vt = np.linalg.svd(Zc @ coef, full_matrices=False)
    return coef @ Vt[:rank].T @ Vt[:rank]


@dataclass
class LinearHead:
    """``predict(Z) = (Z - z_mean) @ coef + y_mean``, with the settings that chose it."""

    coef: np.ndarray
    z_mean: np.ndarray
    y_mean: np.ndarray
    alpha: float
    rank: int | None
    cv: dict = field(default_factory=dict)

    def predict(self, Z: np.ndarray) -> np.ndarray:
        """Predicted means, ``(n, genes)``."""
        return (Z - self.z_mean) @ self.coef + self.y_mean


def _fit(Z: np.ndarray, Y: np.ndarray, alpha: float, rank: int | None) -> LinearHead:
    (coef,), zm, ym = ridge_path(Z, Y, [alpha])
    return LinearHead(reduce_rank(coef, Z - zm, rank), zm, ym, float(alpha), rank)


def fit_head(
    Z: np.ndarray,
    Y: np.ndarray,
    groups: np.ndarray,
    *,
    relative_alphas: Sequence[float] = RELATIVE_ALPHAS,
    ranks: Sequence[int | None] = RANKS,
    default: tuple[float, int | None] = (0.1, None),
) -> LinearHead:
    """Fit the head, choosing penalty and rank by leave-one-group-out mean Pearson r.

    Parameters
    ----------
    Z
        ``(n, k)`` conditions (e.g. PCA scores of the image and context features).
    Y
        ``(n, genes)`` targets.
    groups
        Group of each row (the section, or a spatial block); each group is held out once. With a single group
        nothing can be held out and ``default`` (relative penalty, rank) is used.
    relative_alphas, ranks
        The grid searched.
    default
        Setting used when there is one group only.

    Returns
    -------
    The head fitted on all rows with the chosen setting; ``head.cv`` holds the grid and its held-out scores.

    Examples
    --------
    >>> rng = np.random.default_rng(0)
    >>> Z = rng.normal(size=(120, 5))
    >>> Y = Z[:, :1] @ rng.normal(size=(1, 8)) + 0.5 * rng.normal(size=(120, 8))
    >>> head = fit_head(Z, Y, np.repeat([0, 1, 2], 40))
    >>> head.predict(Z).shape
    (120, 8)
    """
    top = float(np.linalg.norm(Z - Z.mean(0), 2) ** 2)
    folds = np.unique(groups)
    if len(folds) < 2:
        head = _fit(Z, Y, default[0] * top, default[1])
        head.cv = {"note": "one group: default setting, nothing held out"}
        return head
    grid = [(a, r) for a in relative_alphas for r in ranks]
    scores = np.zeros((len(folds), len(grid)))
    for i, f in enumerate(folds):
        tr, te = groups != f, groups == f
        fold_top = float(np.linalg.norm(Z[tr] - Z[tr].mean(0), 2) ** 2)
        coefs, zm, ym = ridge_path(Z[tr], Y[tr], [a * fold_top for a in relative_alphas])
        for j, (a, r) in enumerate(grid):
            coef = reduce_rank(coefs[relative_alphas.index(a)], Z[tr] - zm, r)
            scores[i, j] = mean_pearson((Z[te] - zm) @ coef + ym, Y[te], undefined=-1.0)
    mean = scores.mean(0)
    best = int(np.argmax(mean))
    a, r = grid[best]
    head = _fit(Z, Y, a * top, r)
    head.cv = {
        "relative_alpha": [g[0] for g in grid],
        "rank": [g[1] for g in grid],
        "mean_pearson": mean.tolist(),
        "best": {"relative_alpha": a, "rank": r, "mean_pearson": float(mean[best])},
    }
    return head


def cross_fitted_residuals(Z: np.ndarray, Y: np.ndarray, groups: np.ndarray, head: LinearHead) -> np.ndarray:
    """Residuals ``Y - head(Z)`` where each group's head was fitted without that group (same penalty and rank).

    In-sample residuals of a regression are smaller than those on new data; a diffusion model trained on them
    would learn too narrow a spread. With one group, the in-sample residuals are returned.
    """
    folds = np.unique(groups)
    if len(folds) < 2:
        return Y - head.predict(Z)
    top = float(np.linalg.norm(Z - Z.mean(0), 2) ** 2)
    out = np.empty_like(Y)
    for f in folds:
        tr, te = groups != f, groups == f
        fold_top = float(np.linalg.norm(Z[tr] - Z[tr].mean(0), 2) ** 2)
        out[te] = Y[te] - _fit(Z[tr], Y[tr], head.alpha / top * fold_top, head.rank).predict(Z[te])
    return out


def spatial_blocks(coords: np.ndarray, n_blocks: int) -> np.ndarray:
    """Split spots into ``n_blocks`` stripes of equal size along the longer axis of their extent.

    Used as held-out groups when a single section is available: neighbouring spots are alike, so holding out
    random spots would flatter any model.

    Examples
    --------
    >>> xy = np.array([[x, y] for x in range(8) for y in range(2)], float)
    >>> spatial_blocks(xy, 4).tolist()
    [0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3]
    """
    axis = int(np.argmax(np.ptp(coords, axis=0)))
    ranks = np.argsort(np.argsort(coords[:, axis], kind="stable"), kind="stable")
    return (ranks * n_blocks // len(coords)).astype(int)
