"""Dense stage statistics (pp/_dense.py): agreement with per-patch features, no tile seams, argument checks, fallback."""

import logging

import numpy as np
import pytest
import spatialdata as sd
import torch

import stemst
from stemst.pp._dense import DenseGeometry, DenseStats, check_tiles, dense_model
from stemst.pp._embed import _windows, plan_section
from stemst.pp._encoders import resolve_encoder

#: feature slices of EfficientNet-Lite0's stage statistics: (mean, std) of the stem and of stages 0-2 (stride <= 8)
SHALLOW = 2 * (32 + 16 + 24 + 40)


@pytest.fixture(scope="module")
def c2(data_dir, sdata_copy):
    """Eight C2 spots, embedded per patch (one view) with the default encoder."""
    full = stemst.datasets.her2st(["C2"], cache_dir=data_dir)
    sdata = sdata_copy(full, full.tables["table"][:8].copy())
    stemst.pp.embed_patches(sdata, augment=False, cache=False, progress=False)
    return sdata


def _dense(sdata, tile_px, margin_px=64, rows=slice(None), views=1):
    table = sdata.tables["table"]
    enc = resolve_encoder("efficientnet_lite0")
    plan, image = plan_section(sdata, table, "C2", encoders=[enc], patch_size_um=None)
    corners = _windows(np.asarray(table.obsm["spatial"], float)[rows], plan)
    geom = DenseGeometry(plan.patch_px, enc.input_size, tile_px, margin_px)
    stats = DenseStats(enc, dense_model(enc.load()), geom, torch.device("cpu"))
    return stats, stats.run(image, corners, views=views, mean_views=False)


def test_dense_features_agree_with_per_patch_features_on_real_spots(c2):
    _, dense = _dense(c2, 512)
    patch = c2.tables["table"].obsm["X_efficientnet_lite0"]
    assert dense.shape == (8, 1, 1632) and np.isfinite(dense).all()
    dense = dense[:, 0]
    # shallow stages see the same pixels: the patch edge's padding reaches only a few cells in
    shallow = np.corrcoef(dense[:, :SHALLOW].ravel(), patch[:, :SHALLOW].ravel())[0, 1]
    assert shallow > 0.99
    # the deepest stages (5 x 5 cells per patch) are where per-patch padding matters; measured overall 0.83 on C6
    assert np.corrcoef(dense.ravel(), patch.ravel())[0, 1] > 0.75


def test_no_tile_seams(c2):
    """A spot whose patch straddles tile boundaries gets the features of a tile large enough to hold it whole."""
    stats, _ = _dense(c2, 512, rows=slice(0, 1))
    start = stats.windows(_windows(np.asarray(c2.tables["table"].obsm["spatial"], float)[:1], _plan(c2)))[0]
    small, big = 128, 2048
    assert len({tuple(np.floor((start + d) / small)) for d in (0, stats.geom.input_size)}) > 1  # straddles
    assert np.floor(start[0] / big) == np.floor((start[0] + 160) / big)  # one big tile holds it
    _, a = _dense(c2, small, margin_px=128, rows=slice(0, 1))
    _, b = _dense(c2, big, margin_px=128, rows=slice(0, 1))
    rel = np.abs(a - b).max() / np.abs(b).max()
    assert np.abs(a - b)[..., :SHALLOW].max() < 1e-3
    assert rel < 0.02


def _plan(sdata):
    enc = resolve_encoder("efficientnet_lite0")
    return plan_section(sdata, sdata.tables["table"], "C2", encoders=[enc], patch_size_um=None)[0]


@pytest.mark.parametrize(
    ("tile", "margin", "match"),
    [(200, 64, "multiple of 32"), (1024, 50, "multiple of 32"), (64, 0, r"tile_px .*\[128, 8192\]"), (1024.0, 64, "")],
)
def test_tile_arguments_are_checked(tile, margin, match):
    with pytest.raises(ValueError, match=match):
        check_tiles(tile, margin)


def test_encoders_that_cannot_run_densely_fall_back_to_patches(c2, sdata_copy, caplog):
    a, b = sdata_copy(c2), sdata_copy(c2)
    with caplog.at_level(logging.INFO, logger="stemst"):
        stemst.pp.embed_patches(a, encoder="color_stats", augment=False, cache=False, progress=False, dense=True)
    assert "embedding per patch instead" in caplog.text
    stemst.pp.embed_patches(b, encoder="color_stats", augment=False, cache=False, progress=False)
    np.testing.assert_array_equal(a.tables["table"].obsm["X_color_stats"], b.tables["table"].obsm["X_color_stats"])


def test_embed_patches_dense_writes_views_in_the_per_patch_layout(c2, sdata_copy):
    sdata = sdata_copy(c2, c2.tables["table"][:2].copy())
    stemst.pp.embed_patches(sdata, augment=True, cache=False, progress=False, dense=True, tile_px=256)
    table = sdata.tables["table"]
    views = table.obsm["X_efficientnet_lite0_views"]
    assert views.shape == (2, 8, 1632) and np.isfinite(views).all()
    np.testing.assert_array_equal(views[:, 0], table.obsm["X_efficientnet_lite0"])
    assert table.uns["stemst"]["embeddings"]["X_efficientnet_lite0"]["dense"] is True
    # the views are different passes (rotated tissue), yet describe the same tissue
    assert not np.allclose(views[:, 0], views[:, 1]) and np.corrcoef(views[:, 0].ravel(), views[:, 5].ravel())[0, 1] > 0.8
