"""Shared plotting helpers: a coarse H&E thumbnail, spot circles at their physical size, save/show."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import anndata as ad
import numpy as np

from stemst._schema import SPATIAL_KEY, StemstDataError, get_image, section_info, section_mask

#: longest side (pixels) of the H&E thumbnail drawn under the spots
THUMBNAIL_SIZE = 1000
#: a pyramid level whose dask graph has at most this many layers is stored (in memory or on disk), not computed
_STORED_LAYERS = 3


def _image_levels(sdata: Any, section: str) -> list[Any]:
    levels, scale = [], 0
    while True:
        arr = get_image(sdata, section, scale)
        if levels and arr.shape == levels[-1].shape:
            return levels
        levels.append(arr)
        scale += 1


_THUMBNAILS: dict[tuple[str, int, int], np.ndarray] = {}
_MAX_CACHED = 16


def _downsample(arr: Any, step: int, block: int) -> np.ndarray:
    img = np.asarray(arr[:, ::step, ::step])
    if block > 1:
        c, h, w = img.shape
        h2, w2 = h // block * block, w // block * block
        img = img[:, :h2, :w2].reshape(c, h2 // block, block, w2 // block, block).mean((2, 4)).astype(np.uint8)
    return np.ascontiguousarray(img.transpose(1, 2, 0))


def thumbnail(sdata: Any, section: str, *, max_size: int = THUMBNAIL_SIZE) -> tuple[np.ndarray, tuple[float, float]]:
    """Return a small RGB image of ``section`` and its size in full-resolution pixels.

    Reads the coarsest pyramid level that is stored rather than computed on the fly (for images loaded into memory
    the lazy coarse levels recompute from full resolution, which is slow), subsamples it with a stride and averages
    small blocks so that the longest side is at most ``max_size``.

    Returns
    -------
    ``(y, x, 3)`` uint8 image and ``(width, height)`` of the full-resolution image, for ``imshow(extent=...)``.
    """
    levels = _image_levels(sdata, section)
    full_h, full_w = levels[0].shape[1:]
    stored = [a for a in levels if not hasattr(a, "dask") or len(a.dask.layers) <= _STORED_LAYERS]
    arr = (stored or levels)[-1]
    longest = max(arr.shape[1:])
    factor = max(1, int(np.ceil(longest / max_size)))
    block = 2 if factor >= 4 else 1
    step = max(1, factor // block)
    name = getattr(arr, "name", None)  # dask names identify the data, so repeated plots reuse the thumbnail
    if name is None:
        return _downsample(arr, step, block), (float(full_w), float(full_h))
    key = (name, step, block)
    if key not in _THUMBNAILS:
        if len(_THUMBNAILS) >= _MAX_CACHED:
            _THUMBNAILS.pop(next(iter(_THUMBNAILS)))
        _THUMBNAILS[key] = _downsample(arr, step, block)
    img = _THUMBNAILS[key]
    return img, (float(full_w), float(full_h))


def spot_positions(adata: ad.AnnData, section: str) -> tuple[np.ndarray, np.ndarray, float]:
    """Mask of ``section``'s spots, their ``(x, y)`` in full-resolution pixels and the spot radius in pixels."""
    if SPATIAL_KEY not in adata.obsm:
        raise StemstDataError(f"The table has no obsm[{SPATIAL_KEY!r}] spot coordinates.")
    mask = section_mask(adata, section)
    xy = np.asarray(adata.obsm[SPATIAL_KEY], dtype=np.float64)[mask]
    radius = section_info(adata, section).spot_diameter_px / 2.0
    return mask, xy, radius


def draw_section(
    ax: Any,
    sdata: Any,
    adata: ad.AnnData,
    section: str,
    *,
    values: np.ndarray | None = None,
    cmap: str = "viridis",
    vmin: float | None = None,
    vmax: float | None = None,
    image: bool = True,
    alpha: float = 0.9,
    edgecolor: str = "black",
    crop: bool = True,
) -> Any:
    """Draw the H&E of ``section`` and one circle per spot (filled by ``values`` if given) on ``ax``.

    Returns
    -------
    The :class:`~matplotlib.collections.PatchCollection` of the circles. With ``crop``, the view is zoomed to the
    spots (plus two spot diameters), else it shows the whole image.
    """
    from matplotlib.collections import PatchCollection
    from matplotlib.patches import Circle

    mask, xy, radius = spot_positions(adata, section)
    if image and sdata is not None:
        img, (w, h) = thumbnail(sdata, section)
        ax.imshow(img, extent=(0, w, h, 0), interpolation="antialiased")
    circles = [Circle((x, y), radius) for x, y in xy]
    if values is None:
        coll = PatchCollection(circles, facecolor="none", edgecolor=edgecolor, linewidth=0.6)
    else:
        coll = PatchCollection(circles, cmap=cmap, alpha=alpha, linewidth=0)
        coll.set_array(np.asarray(values, dtype=np.float64))
        coll.set_clim(vmin, vmax)
    ax.add_collection(coll)
    if crop or not (image and sdata is not None):
        pad = 4 * radius
        ax.set_xlim(xy[:, 0].min() - pad, xy[:, 0].max() + pad)
        ax.set_ylim(xy[:, 1].max() + pad, xy[:, 1].min() - pad)
    ax.set_aspect("equal")
    ax.set_xticks([])
    ax.set_yticks([])
    return coll


def grid(
    n: int, *, ncols: int, panel_size: tuple[float, float], figsize: tuple[float, float] | None = None
) -> tuple[Any, np.ndarray]:
    """Make a figure with ``n`` panels in rows of ``ncols``; unused panels are hidden. Returns ``(fig, axes[:n])``."""
    import matplotlib.pyplot as plt

    ncols = max(1, min(ncols, n))
    nrows = int(np.ceil(n / ncols))
    if figsize is None:
        figsize = (panel_size[0] * ncols, panel_size[1] * nrows)
    fig, axes = plt.subplots(nrows, ncols, figsize=figsize, squeeze=False, layout="constrained")
    axes = axes.ravel()
    for a in axes[n:]:
        a.set_visible(False)
    return fig, axes[:n]


def finish(fig: Any, show: bool | None, save: str | Path | None) -> None:
    """Save ``fig`` to ``save`` if given; show it if ``show`` (default: show unless saving), scanpy-style."""
    import matplotlib.pyplot as plt

    if save is not None:
        fig.savefig(save, dpi=150, bbox_inches="tight")
    if show is None:
        show = save is None
    if show:
        plt.show()
    elif save is not None:
        plt.close(fig)


def as_list(x: str | Sequence[str]) -> list[str]:
    """Return a string or a sequence of strings as a list."""
    return [x] if isinstance(x, str) else [str(v) for v in x]
