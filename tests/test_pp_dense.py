"""Dense stage statistics (pp/_dense.py): agreement with per-patch features, no tile seams, argument checks, fallback."""

import logging
import warnings

import numpy as np
import pytest
import torch

import stemst
from stemst._errors import StemstWarning
from stemst.pp._dense import (
    DenseGeometry,
    DenseStats,
    _box_sums,
    _integral,
    _lattice_sums,
    _spans,
    _view_of,
    _window_sums,
    check_tiles,
    dense_model,
    fold_batchnorm,
    plan_tiles,
    stage_maps,
    view_boxes,
)
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
    # the deepest stages (5 x 5 cells per patch) are where per-patch padding matters; 0.78 over C6's 178 spots
    assert np.corrcoef(dense.ravel(), patch.ravel())[0, 1] > 0.75


def test_no_tile_seams(c2):
    """A spot whose patch straddles tile boundaries gets the features of a tile large enough to hold it whole."""
    stats, _ = _dense(c2, 512, rows=slice(0, 1))
    start = stats.windows(_windows(np.asarray(c2.tables["table"].obsm["spatial"], float)[:1], _plan(c2)))[0]
    small, big = 128, 2048
    assert len({tuple(np.floor((start + d) / small)) for d in (0, stats.geom.input_size)}) > 1  # straddles
    assert np.floor(start[0] / big) == np.floor((start[0] + 160) / big)  # one big tile holds it
    _, a = _dense(c2, small, margin_px=256, rows=slice(0, 1))
    _, b = _dense(c2, big, margin_px=256, rows=slice(0, 1))
    rel = np.abs(a - b).max() / np.abs(b).max()
    assert np.abs(a - b)[..., :SHALLOW].max() < 1e-3
    assert rel < 0.02  # with margin_px=64 it is 0.6 in the deepest stage


def _plan(sdata):
    enc = resolve_encoder("efficientnet_lite0")
    return plan_section(sdata, sdata.tables["table"], "C2", encoders=[enc], patch_size_um=None)[0]


def _direct_sums(fmap: torch.Tensor, boxes: np.ndarray) -> np.ndarray:
    """Sums of a ``(c, h, w)`` map and of its square over fractional boxes, cell by cell (area-weighted)."""
    c, h, w = fmap.shape
    out = []
    for y0, x0, y1, x1 in boxes:
        wy = np.clip(np.minimum(y1, np.arange(h) + 1) - np.maximum(y0, np.arange(h)), 0, None)
        wx = np.clip(np.minimum(x1, np.arange(w) + 1) - np.maximum(x0, np.arange(w)), 0, None)
        cover = torch.from_numpy(np.outer(wy, wx))
        out.append(torch.cat([(fmap.double() * cover).sum((1, 2)), (fmap.double() ** 2 * cover).sum((1, 2))]))
    return torch.stack(out).numpy()


def _random_boxes(rng, n, h, w):
    y0, x0 = rng.uniform(0, h - 3, n), rng.uniform(0, w - 3, n)
    return np.stack([y0, x0, rng.uniform(y0 + 0.5, h), rng.uniform(x0 + 0.5, w)], axis=1)


def test_window_sums_equal_a_direct_sum_over_the_covered_cells():
    """Known answer: the summed-area table read bilinearly at fractional corners is the area-weighted cell sum."""
    rng = np.random.default_rng(0)
    fmap = torch.from_numpy(rng.normal(3.0, 2.0, (3, 13, 17)).astype(np.float32))
    boxes = np.vstack([_random_boxes(rng, 40, 13, 17), [[0, 0, 13, 17], [2, 3, 7, 9], [2.25, 3.5, 2.75, 3.75]]])
    got = _window_sums(_integral(fmap), (13, 17), torch.from_numpy(boxes)).numpy()
    np.testing.assert_allclose(got, _direct_sums(fmap, boxes), rtol=1e-9, atol=1e-9)
    assert got[-3, 0] == pytest.approx(fmap[0].double().sum().item())
    lattice = _lattice_sums(fmap, _spans(boxes[:, [0, 2]]), _spans(boxes[:, [1, 3]]))  # any boxes: a 43 x 43 lattice
    np.testing.assert_allclose(lattice, got, rtol=1e-9, atol=1e-9)


def test_window_sums_of_a_grid_share_row_spans_and_match_a_direct_sum():
    """Boxes on a lattice (the rows of a grid share their spans), in shuffled order, as predict_image's grids give."""
    rng = np.random.default_rng(1)
    fmap = torch.from_numpy(rng.normal(1.0, 2.0, (4, 20, 24)).astype(np.float32))
    y0, x0 = np.meshgrid(np.arange(0.3, 14, 1.7), np.arange(-0.6, 17, 2.2), indexing="ij")
    boxes = np.stack([y0.ravel(), x0.ravel(), y0.ravel() + 5.5, x0.ravel() + 5.5], axis=1)[rng.permutation(y0.size)]
    np.testing.assert_allclose(_box_sums(fmap, boxes), _direct_sums(fmap, boxes), rtol=1e-9, atol=1e-9)
    big = fmap.repeat(1, 4, 4)  # a map with more cells per box than LATTICE_CELLS: the summed-area table
    np.testing.assert_allclose(_box_sums(big, boxes), _direct_sums(big, boxes), rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("view", range(8))
def test_view_boxes_read_the_same_cells_in_every_view(view):
    """A box moved into a view's frame covers the same cells of the flipped / turned map (non-square region)."""
    rng = np.random.default_rng(view)
    fmap = torch.from_numpy(rng.normal(size=(2, 6, 10)).astype(np.float32))
    boxes = _random_boxes(rng, 20, 6, 10)
    turned = _view_of(fmap, view)
    got = _box_sums(turned, view_boxes(boxes, view, 6, 10))
    np.testing.assert_allclose(got, _direct_sums(fmap, boxes), rtol=1e-9, atol=1e-9)


def test_folded_batchnorm_gives_the_same_maps():
    net = dense_model(resolve_encoder("efficientnet_lite0").load())
    folded = fold_batchnorm(net)
    x = torch.rand(1, 3, 96, 128)
    with torch.inference_mode():
        for a, b in zip(stage_maps(net, x), stage_maps(folded, x), strict=True):
            assert a.shape == b.shape and (a - b).abs().max() <= 1e-5 * a.abs().max()
    assert isinstance(net.model.bn1, torch.nn.BatchNorm2d)  # the loaded network is left as it was
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in folded.modules())


def test_plan_tiles_computes_every_patch_whole_in_one_tile():
    rng = np.random.default_rng(1)
    starts = np.vstack([rng.uniform(-100, 5000, (300, 2)), [[0.0, 0.0], [4095.5, 2047.9]]])
    geom = DenseGeometry(163, 160, 1024, 256)
    tiles = plan_tiles(starts, geom)
    rows = np.concatenate([t.rows for t in tiles])
    np.testing.assert_array_equal(np.sort(rows), np.arange(len(starts)))  # each patch exactly once
    for t in tiles:
        assert t.y0 % 32 == t.x0 % 32 == t.h % 32 == t.w % 32 == 0
        lo, hi = starts[t.rows], starts[t.rows] + 160
        assert (lo >= [t.y0 + 256, t.x0 + 256]).all() and (hi <= [t.y0 + t.h - 256, t.x0 + t.w - 256]).all()
        assert t.h <= 1024 + 160 + 2 * 256 + 32 and t.w <= 1024 + 160 + 2 * 256 + 32


@pytest.mark.parametrize(
    ("tile", "margin", "match"),
    [
        (200, 64, "multiple of 32"),
        (1024, 50, "multiple of 32"),
        (64, 0, r"tile_px .*\[128, 8192\]"),
        (1024.0, 64, "tile_px must be a whole number of pixels"),
    ],
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
    assert (
        not np.allclose(views[:, 0], views[:, 1]) and np.corrcoef(views[:, 0].ravel(), views[:, 5].ravel())[0, 1] > 0.8
    )


@pytest.fixture(scope="module")
def crop(data_dir):
    """A 900 px (620 µm) square of C6's tissue as its own section, with four dummy spots."""
    from stemst._schema import assemble, get_image, make_section, section_info

    full = stemst.datasets.her2st(["C6"], cache_dir=data_dir)
    table = full.tables["table"]
    cy, cx = np.median(table.obsm["spatial"], 0)[::-1].astype(int)
    image = np.asarray(get_image(full, "C6")[:, cy - 450 : cy + 450, cx - 450 : cx + 450])
    info = section_info(table, "C6")
    xy = np.array([[300.0, 300], [600, 300], [300, 600], [600, 600]])
    sec = make_section(
        "CROP",
        image=image,
        counts=np.ones((4, 3), int),
        genes=["A", "B", "C"],
        spot_ids=[f"s{i}" for i in range(4)],
        coords=xy,
        microns_per_pixel=info.microns_per_pixel,
        spot_diameter_um=info.spot_diameter_um,
        source="crop of HER2ST C6",
    )
    return assemble([sec]), info.microns_per_pixel


@pytest.fixture(scope="module")
def effnet_model(c2, sdata_copy):
    """A tiny model on C2's per-patch EfficientNet-Lite0 features (no context), only to run predict_image."""
    sdata = sdata_copy(c2)
    stemst.pp.select_genes(sdata, train_sections=["C2"], n_genes=5)
    kw = {
        "architecture": "mlp",
        "network": {"width": 16, "depth": 1},
        "diffusion": {"head_pcs": None},
        "steps": 5,
        "validation": None,
        "progress": False,
    }
    return stemst.tl.fit(sdata, embedding_key="X_efficientnet_lite0", sections="C2", **kw)


def test_predict_image_at_a_fine_spacing_returns_the_grid(crop, effnet_model, caplog):
    sdata, mpp = crop
    with caplog.at_level(logging.INFO, logger="stemst"):
        key = stemst.tl.predict_image(
            effnet_model, sdata, "CROP", spacing_um=16, n_samples=2, dense=True, progress=False
        )
    assert "GB of features and samples" in caplog.text and "Dense pass" in caplog.text  # estimate, then dense
    grid, pred = sdata.tables["CROP_grid_table"], sdata.tables[key]
    xy = grid.obsm["spatial"]
    step = 16 / mpp
    # the centres lie on the 16 µm lattice (offset half a step), inside the crop
    lattice = (xy - step / 2) / step
    np.testing.assert_allclose(lattice, np.round(lattice), atol=1e-6)
    assert xy.min() >= 0 and xy.max() <= 900 and len(xy) > 500
    assert pred.n_obs == len(sdata.shapes["CROP_grid"]) == len(xy) and np.isfinite(pred.X).all()
    assert "samples" not in pred.obsm and pred.layers["std"].shape == pred.X.shape  # keep_samples=False
    assert grid.uns["stemst"]["embeddings"]["X_efficientnet_lite0"]["dense"] == {"tile_px": 2048, "margin_px": 256}
    # neighbouring grid spots 16 µm apart see nearly the same patch: their features are close
    feats = grid.obsm["X_efficientnet_lite0"]
    near = np.argsort(((xy - xy[0]) ** 2).sum(1))[1]
    far = np.argmax(((xy - xy[0]) ** 2).sum(1))
    assert np.abs(feats[0] - feats[near]).mean() < 0.5 * np.abs(feats[0] - feats[far]).mean()


def test_grid_rings_match_spatial_context_rings_at_the_training_spacing():
    """On a square grid at the training spacing, the lattice rings are spatial_context's rings; on a grid 4x finer
    they pick the grid spots at the same physical distances, not the grid's own neighbours."""
    import anndata as ad

    from stemst.pp._context import ring_graphs
    from stemst.tl._predict import _lattice_rings

    xy = np.array([[x, y] for x in range(9) for y in range(9)], float) * 10.0
    mine = _lattice_rings(xy, 2, 10.0, 10.0)
    theirs = ring_graphs(ad.AnnData(obs={"i": [str(i) for i in range(len(xy))]}, obsm={"spatial": xy}), 2, 10.0)
    for a, b in zip(mine, theirs, strict=True):
        np.testing.assert_allclose(a.toarray(), b.toarray(), atol=1e-12)
    fine = np.array([[x, y] for x in range(33) for y in range(33)], float) * 2.5
    centre = int(np.flatnonzero((fine == [40.0, 40.0]).all(1))[0])
    ring1 = _lattice_rings(fine, 2, 10.0, 2.5)[0][centre].indices
    dist = np.sort(np.hypot(*(fine[ring1] - fine[centre]).T))
    np.testing.assert_allclose(dist, [10] * 4 + [10 * np.sqrt(2)] * 4)


def test_predict_image_auto_embeds_a_coarse_grid_per_patch(crop, effnet_model, caplog):
    """dense='auto' weighs the tiles' pixels against the patches': a grid coarser than the patches stays per patch."""
    sdata, _ = crop
    with caplog.at_level(logging.INFO, logger="stemst"):
        stemst.tl.predict_image(
            effnet_model, sdata, "CROP", spacing_um=150, n_samples=2, dense="auto", progress=False, overwrite=True
        )
    assert "embedding per patch" in caplog.text and "Dense pass" not in caplog.text
    assert "embedded per patch" in caplog.text  # the estimate logged before any work names the path
    assert "dense" not in sdata.tables["CROP_grid_table"].uns["stemst"]["embeddings"]["X_efficientnet_lite0"]


@pytest.fixture(scope="module")
def effnet_dense_model(c2, sdata_copy):
    """The same tiny model on C2's dense features (pp.embed_patches(dense=True)): the model records it."""
    sdata = sdata_copy(c2)
    stemst.pp.embed_patches(sdata, augment=False, cache=False, progress=False, dense=True)
    stemst.pp.select_genes(sdata, train_sections=["C2"], n_genes=5)
    kw = {"architecture": "mlp", "network": {"width": 16, "depth": 1}, "diffusion": {"head_pcs": None}}
    return stemst.tl.fit(
        sdata, embedding_key="X_efficientnet_lite0", sections="C2", steps=5, validation=None, progress=False, **kw
    )


def test_a_model_trained_on_dense_features_embeds_every_grid_densely(crop, effnet_dense_model, caplog):
    """Dense training features: a grid coarser than the patches is embedded densely too, with no mismatch warning."""
    sdata, _ = crop
    assert effnet_dense_model.encoder["dense"] is True
    with caplog.at_level(logging.INFO, logger="stemst"), warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        stemst.tl.predict_image(
            effnet_dense_model, sdata, "CROP", spacing_um=150, n_samples=2, progress=False, overwrite=True
        )
    assert "trained on dense features" in caplog.text and "Dense pass" in caplog.text
    assert not [w for w in seen if "embeddings were computed" in str(w.message)]


def test_features_from_the_other_path_than_the_models_warn(crop, effnet_model, effnet_dense_model):
    """A per-patch model on a dense grid, and a dense model on a per-patch grid: both warn, naming the remedy."""
    sdata, _ = crop
    for model, dense in ((effnet_model, True), (effnet_dense_model, False)):
        with pytest.warns(StemstWarning, match="embeddings were computed .* dense=True"):
            stemst.tl.predict_image(
                model, sdata, "CROP", spacing_um=150, n_samples=2, dense=dense, progress=False, overwrite=True
            )
