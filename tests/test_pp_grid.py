"""pp.grid_spots: which grid points count as tissue."""

import numpy as np
import pytest

import stemst
from stemst._schema import get_image
from stemst.io._image import tissue_mask
from stemst.pp._grid import _cell_tissue


@pytest.mark.parametrize("spacing_um", [8, 50])
def test_grid_cells_cover_the_tissue_area_at_fine_and_coarse_spacing(her2st_small, spacing_um):
    """With half of a cell's area as the bar, the kept cells cover the tissue mask's area (no dilation of the mask:
    cells smaller than a mask pixel used to take every pixel they touched, 4.6 % too much at 8 µm on C6)."""
    centres, step = stemst.pp.grid_spots(her2st_small, "C6", spacing_um=spacing_um, min_tissue=0.5)
    full, coarse = get_image(her2st_small, "C6", scale=0), get_image(her2st_small, "C6", scale=99)
    tissue = tissue_mask(np.asarray(coarse)).mean() * full.shape[1] * full.shape[2]
    assert len(centres) * step**2 / tissue == pytest.approx(1.0, abs=0.02 if spacing_um < 20 else 0.05)
    loose, _ = stemst.pp.grid_spots(her2st_small, "C6", spacing_um=spacing_um, min_tissue=0.25)
    assert len(loose) > len(centres)


def test_cell_tissue_weighs_each_mask_pixel_by_its_overlap():
    """Known answers: tissue is rows [1, 3) x columns [2, 5); cells are 2 x 2 pixels; off the image counts as glass."""
    mask = np.zeros((4, 6), bool)
    mask[1:3, 2:5] = True
    frac = _cell_tissue(mask, np.array([2.0, 2.25, 3.5]), np.array([3.5, 2.0, 5.5]), 1.0)
    assert frac[0, 0] == pytest.approx(1.0)  # [1, 3) x [2.5, 4.5): all tissue
    assert frac[1, 1] == pytest.approx(1.75 / 4)  # [1.25, 3.25) x [1, 3): 1.75 x 1 of tissue
    assert frac[2, 2] == pytest.approx(
        0.25 / 4
    )  # [2.5, 4.5) x [4.5, 6.5): a quarter pixel, half the cell off the image
