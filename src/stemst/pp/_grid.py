"""A grid of pseudo-spots over the tissue of an H&E image: where to predict on a section with no sequenced spots."""

from __future__ import annotations

from typing import Any

import numpy as np

from stemst._schema import TABLE_KEY, get_image, get_table, section_info
from stemst._spatial import check_spacing, cover
from stemst.io._image import tissue_mask


def grid_spots(
    sdata: Any,
    section: str,
    *,
    spacing_um: float,
    table_key: str = TABLE_KEY,
    microns_per_pixel: float | None = None,
    min_tissue: float = 0.25,
    max_spots: int | None = None,
) -> tuple[np.ndarray, float]:
    """Centres ``(x, y)`` (full-resolution pixels) of a square grid of pseudo-spots over the tissue of ``section``.

    A grid point is kept when at least ``min_tissue`` of its cell's area is tissue (:func:`tissue_mask` at the coarsest
    pyramid level, each mask pixel weighted by its overlap with the cell: a cell smaller than a mask pixel takes the
    pixel it lies in, so fine grids follow the mask's outline). Returns the centres and the pixel spacing.

    With ``max_spots``, a grid estimated (grid points x tissue fraction) to hold more spots than that is refused
    before it is laid out, with the estimate and the spacing that would fit.

    Examples
    --------
    >>> centres, step = stemst.pp.grid_spots(sdata, "C6", spacing_um=400)  # sdata: HER2ST C2 and C6
    >>> centres.shape[1], round(step)  # (x, y) per grid point; 400 µm in C6's pixels (0.69 µm/px)
    (2, 582)
    """
    check_spacing(spacing_um)
    if microns_per_pixel is None:
        microns_per_pixel = section_info(get_table(sdata, table_key), section).microns_per_pixel
    full = get_image(sdata, section, scale=0)
    coarse = get_image(sdata, section, scale=99)  # clamps to the coarsest level
    h0, w0 = full.shape[1:]
    factor = h0 / coarse.shape[1]
    mask = tissue_mask(np.asarray(coarse))
    step = spacing_um / microns_per_pixel
    if step < 1:
        raise ValueError(f"spacing_um={spacing_um} is below one pixel ({microns_per_pixel:.3g} µm/px).")
    xs, ys = np.arange(step / 2, w0, step), np.arange(step / 2, h0, step)
    estimate = int(len(xs) * len(ys) * mask.mean())
    if max_spots is not None and estimate > max_spots:
        fits = spacing_um * float(np.sqrt(estimate / max_spots))
        raise ValueError(
            f"spacing_um={spacing_um:g} lays about {estimate:,} grid spots over the tissue of section {section!r}, "
            f"more than max_spots={max_spots:,} (each is a patch to embed and predict). Use a coarser spacing (about "
            f"{fits:.0f} µm gives {max_spots:,}) or raise max_spots."
        )
    keep = _cell_tissue(mask, ys / factor, xs / factor, step / factor / 2) >= min_tissue
    iy, ix = np.nonzero(keep)  # row-major: grid rows top to bottom, each left to right
    return np.stack([xs[ix], ys[iy]], axis=1), float(step)


def _cell_tissue(mask: np.ndarray, cy: np.ndarray, cx: np.ndarray, half: float) -> np.ndarray:
    """Tissue fraction of every grid cell, ``(len(cy), len(cx))``: the mask's area inside the cell over its area.

    Cells are squares of side ``2 * half`` mask pixels centred on ``(cy, cx)``, weighted by their exact overlap with
    each pixel, so a cell smaller than a pixel takes the pixel it lies in and a cell off the image counts as glass.

    Examples
    --------
    >>> mask = np.array([[1, 0], [0, 0]], bool)
    >>> _cell_tissue(mask, np.array([0.5, 1.0]), np.array([0.5, 1.0]), 0.5)
    array([[1.  , 0.5 ],
           [0.5 , 0.25]])
    """
    wy, wx = cover(cy - half, cy + half, mask.shape[0]), cover(cx - half, cx + half, mask.shape[1])
    return wy @ mask.astype(np.float64) @ wx.T / (2 * half) ** 2
