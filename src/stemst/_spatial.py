"""Spot graphs shared by several packages: the grid spacing, each spot's ring-1 neighbourhood and the ring graphs.

:mod:`stemst.pp` (spatial context), :mod:`stemst.tl` (the joint model, smoothing) and :mod:`stemst.metrics` (the
variogram score's neighbour pairs) build their graphs here, so none of them imports another's private module.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import numpy as np
import scipy.sparse as sp

from stemst._errors import StemstDataError

if TYPE_CHECKING:
    import anndata as ad


def spot_spacing(coords: np.ndarray) -> float:
    """Centre-to-centre spacing of a spot grid: the median distance of each spot to its nearest neighbour.

    Works for the square legacy ST grid (200 µm), the hexagonal Visium grid (100 µm) and the tissue grids of
    :func:`stemst.tl.predict_image` alike, in whatever unit ``coords`` is in.

    Examples
    --------
    >>> import numpy as np
    >>> xy = np.array([[0, 0], [0, 2], [2, 0], [2, 2], [4, 4.0]])
    >>> spot_spacing(xy)
    2.0
    """
    from scipy.spatial import cKDTree

    coords = np.asarray(coords, dtype=np.float64)
    if len(coords) < 2:
        raise StemstDataError(f"A spot grid needs at least 2 spots to have a spacing, got {len(coords)}.")
    dist, _ = cKDTree(coords).query(coords, k=2)
    spacing = float(np.median(dist[:, 1]))
    if not np.isfinite(spacing) or spacing <= 0:
        raise StemstDataError("Several spots share the same centre: check obsm['spatial'] for duplicated spots.")
    return spacing


def neighbourhoods(
    coords: np.ndarray, sections: np.ndarray | None = None, *, size: int = 9
) -> tuple[np.ndarray, np.ndarray]:
    """Each spot's neighbourhood for the joint model: itself and its ring-1 neighbours, within its section.

    Parameters
    ----------
    coords
        ``(n, 2)`` spot centres.
    sections
        ``(n,)`` section of each spot (neighbourhoods never cross sections); ``None``: one section.
    size
        Tokens per neighbourhood (the spot and up to ``size - 1`` nearest neighbours within 1.5 grid steps).

    Returns
    -------
    ``neighbours`` ``(n, size)`` row indices (column 0 the spot itself, ``-1`` padding) and ``offsets``
    ``(n, size, 2)`` float32 positions relative to the spot, in grid steps.

    Examples
    --------
    >>> xy = np.array([[x, y] for x in range(3) for y in range(3)], float)
    >>> nb, off = neighbourhoods(xy)
    >>> nb[4, 0], int((nb[4] >= 0).sum()), int((nb[0] >= 0).sum())
    (np.int64(4), 9, 4)
    """
    from scipy.spatial import cKDTree

    coords = np.asarray(coords, dtype=np.float64)
    sections = np.zeros(len(coords), int) if sections is None else np.asarray(sections)
    neighbours = np.full((len(coords), size), -1, dtype=np.int64)
    offsets = np.zeros((len(coords), size, 2), dtype=np.float32)
    for s in dict.fromkeys(sections.tolist()):
        idx = np.flatnonzero(sections == s)
        if len(idx) < 2:
            neighbours[idx, 0] = idx
            continue
        spacing = spot_spacing(coords[idx])
        k = min(size, len(idx))
        dist, j = cKDTree(coords[idx]).query(coords[idx], k=k, distance_upper_bound=1.5 * spacing * (1 + 1e-6))
        ok = np.isfinite(dist)
        rows = np.where(ok, idx[np.minimum(j, len(idx) - 1)], -1)
        neighbours[idx, :k] = rows
        rel = (coords[np.maximum(rows, 0)] - coords[idx][:, None]) / spacing
        offsets[idx, :k] = np.where(ok[..., None], rel, 0.0)
    return neighbours, offsets


def ring_graphs(adata: ad.AnnData, n_rings: int, spacing: float) -> list[sp.csr_matrix]:
    """Row-normalised adjacency of ring ``k = 1..n_rings``: neighbours at ``(k - 0.5, k + 0.5]`` spacings.

    Built with :func:`squidpy.gr.spatial_neighbors_radius` on ``obsm['spatial']`` of one section.
    """
    import warnings

    with warnings.catch_warnings():  # squidpy's docstring tooling (docrep) warns about its own docstrings on import
        warnings.filterwarnings("ignore", category=SyntaxWarning, module="docrep")
        import squidpy as sq
    from spatialdata._logging import logger as sd_logger

    graphs = []
    level = sd_logger.level
    sd_logger.setLevel(logging.WARNING)  # squidpy logs every graph it builds at INFO through spatialdata's logger
    try:
        results = [
            sq.gr.spatial_neighbors_radius(adata, radius=((k - 0.5) * spacing, (k + 0.5) * spacing), copy=True)
            for k in range(1, n_rings + 1)
        ]
    finally:
        sd_logger.setLevel(level)
    for res in results:
        adj = sp.csr_matrix(res.connectivities, dtype=np.float64)
        adj.setdiag(0)
        adj.eliminate_zeros()
        deg = np.asarray(adj.sum(1)).ravel()
        graphs.append(sp.diags(np.divide(1.0, deg, out=np.zeros_like(deg), where=deg > 0)) @ adj)
    return graphs


def check_spacing(spacing_um: Any) -> None:
    """Refuse a grid spacing that is not a positive, finite number of micrometres."""
    if isinstance(spacing_um, bool) or not (
        isinstance(spacing_um, int | float | np.number) and np.isfinite(spacing_um) and spacing_um > 0
    ):
        raise ValueError(f"spacing_um must be a positive number of micrometres, got {spacing_um!r}.")


def cover(lo: np.ndarray, hi: np.ndarray, n: int) -> np.ndarray:
    """Return ``(len(lo), n)``: the length of each interval ``[lo, hi)`` inside each unit cell ``[i, i + 1)`` of ``n``.

    Examples
    --------
    >>> cover(np.array([0.5, -1.0]), np.array([2.0, 0.25]), 3)
    array([[0.5 , 1.  , 0.  ],
           [0.25, 0.  , 0.  ]])
    """
    cells = np.arange(n)
    return np.clip(np.minimum(hi[:, None], cells + 1) - np.maximum(lo[:, None], cells), 0.0, None)
