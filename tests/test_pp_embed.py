import numpy as np
import pytest
import spatialdata as sd
import timm
import torch

import stemst
from stemst import _schema
from stemst._schema import StemstDataError, assemble, make_section
from stemst.pp import Encoder, embed_patches
from stemst.pp._embed import CLIPPED_KEY, plan_section
from stemst.pp._encoders import resolve_encoders

MEAN_RGB = Encoder("mean_rgb", build=lambda: lambda x: x.mean((-2, -1)), input_size=32, mean=(0, 0, 0), std=(1, 1, 1))


def _section(name, *, size=600, value=None, coords=None, rng=0):
    gen = np.random.default_rng(rng)
    img = (
        gen.integers(0, 256, (size, size, 3), dtype=np.uint8)
        if value is None
        else np.full((size, size, 3), value, np.uint8)
    )
    coords = np.array([[300, 300], [100, 150], [500, 420], [5, 5], [250, 560]]) if coords is None else coords
    n = len(coords)
    return make_section(
        name,
        image=img,
        counts=gen.poisson(2.0, (n, 4)),
        genes=list("ABCD"),
        spot_ids=[f"s{i}" for i in range(n)],
        coords=coords,
        microns_per_pixel=1.0,
        spot_diameter_um=50.0,
    )


def _with_table(sdata, table):
    """A SpatialData sharing ``sdata``'s (read-only) images and shapes with its own table (fixtures stay untouched)."""
    regions = table.obs["region"].astype(str).unique().tolist()
    table.obs["region"] = table.obs["region"].cat.remove_unused_categories()
    table.uns["spatialdata_attrs"]["region"] = regions
    return sd.SpatialData(images=dict(sdata.images), shapes=dict(sdata.shapes), tables={"table": table})


# ---------------------------------------------------------------------------------------------------------------
# synthetic data: exact behaviour


def test_patch_geometry_padding_and_clipped_flag():
    sec = _section("S1", value=0)  # black image: a patch's mean is its padded (white) fraction
    sec.image[:, :3, 590:] = 255  # a mark outside every patch, so that the image is not refused as blank
    sdata = assemble([sec])
    embed_patches(sdata, encoder=MEAN_RGB, augment=False, progress=False, device="cpu")
    t = sdata.tables["table"]
    x = t.obsm["X_mean_rgb"]
    assert x.shape == (5, 3) and x.dtype == np.float32
    # default patch: max(50 µm spot, 224 px * 0.5 µm/px) = 112 µm = 112 px; spot (5, 5) keeps 61 x 61 px of it
    settings = t.uns["stemst"]["embeddings"]["X_mean_rgb"]
    assert settings["patch_size_um"] == {"S1": 112.0} and settings["patch_px"] == {"S1": 112}
    assert settings["pad_value"] == 255 and settings["views"] == 1
    np.testing.assert_allclose(x[3], 1 - 61**2 / 112**2, atol=0.02)
    np.testing.assert_allclose(x[[0, 1, 2]], 0, atol=1e-6)
    assert t.obs[CLIPPED_KEY].tolist() == [False, False, False, True, True]
    assert "X_mean_rgb_views" not in t.obsm


def test_patch_content_matches_the_image():
    sec = _section("S1")
    sdata = assemble([sec])
    embed_patches(sdata, encoder=MEAN_RGB, patch_size_um=40, augment=False, progress=False)
    img = np.asarray(sec.image)  # (3, y, x)
    want = img[:, 300 - 20 : 300 + 20, 300 - 20 : 300 + 20].reshape(3, -1).mean(1) / 255
    np.testing.assert_allclose(sdata.tables["table"].obsm["X_mean_rgb"][0], want, atol=0.01)


def test_callable_and_concatenated_encoders():
    def green(x):
        return x[:, 1:2].mean((-2, -1))

    sdata = assemble([_section("S1")])
    embed_patches(sdata, encoder="color_stats", augment=True, progress=False)
    embed_patches(sdata, encoder=["color_stats", green], augment=True, progress=False)
    t = sdata.tables["table"]
    both = t.obsm["X_color_stats+green"]
    assert both.shape == (5, 31) and t.obsm["X_color_stats+green_views"].shape == (5, 8, 31)
    np.testing.assert_allclose(both[:, :30], t.obsm["X_color_stats"], rtol=1e-5, atol=1e-6)
    assert t.uns["stemst"]["embeddings"]["X_color_stats+green"]["encoders"] == ["color_stats", "green"]
    embed_patches(sdata, encoder=green, key_added="X_g", augment=False, progress=False)
    np.testing.assert_allclose(t.obsm["X_g"][:, 0], both[:, 30], atol=1e-6)


def test_checkpoint_file_equals_in_memory_module(tmp_path):
    torch.manual_seed(0)
    net = timm.create_model("test_resnet", pretrained=False, num_classes=0).eval()
    path = tmp_path / "tiny.pt"
    torch.save({"arch": "test_resnet", "state_dict": net.state_dict()}, path)
    bare = tmp_path / "bare.pt"
    torch.save(net.state_dict(), bare)

    sdata = assemble([_section("S1")])
    embed_patches(sdata, encoder=str(path), augment=False, progress=False)
    in_memory = Encoder("mem", build=lambda: net, input_size=160, mean=(0.5,) * 3, std=(0.5,) * 3)
    embed_patches(sdata, encoder=in_memory, augment=False, progress=False)
    embed_patches(
        sdata, encoder=Encoder.from_timm("test_resnet", name="bare", checkpoint=bare), augment=False, progress=False
    )
    t = sdata.tables["table"]
    assert t.obsm["X_tiny"].shape == (5, net.num_features)
    assert np.abs(t.obsm["X_tiny"]).max() > 0
    np.testing.assert_allclose(t.obsm["X_tiny"], t.obsm["X_mem"], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(t.obsm["X_bare"], t.obsm["X_mem"], rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="architecture"):
        embed_patches(sdata, encoder=str(bare), progress=False)


def test_sections_subset_updates_only_those_rows():
    sdata = assemble([_section("S1", rng=1), _section("S2", rng=2)])
    t = sdata.tables["table"]
    embed_patches(sdata, encoder="color_stats", sections="S1", progress=False)
    s1 = (t.obs["section"] == "S1").to_numpy()
    x = t.obsm["X_color_stats"]
    assert np.isfinite(x[s1]).all() and np.isnan(x[~s1]).all()
    first = x[s1].copy()
    embed_patches(sdata, encoder="color_stats", sections=["S2"], progress=False)
    assert np.isfinite(t.obsm["X_color_stats_views"]).all()
    np.testing.assert_array_equal(t.obsm["X_color_stats"][s1], first)
    assert set(t.uns["stemst"]["embeddings"]["X_color_stats"]["patch_px"]) == {"S1", "S2"}


def test_pyramid_level_choice(monkeypatch, tmp_path):
    monkeypatch.setattr(_schema, "MULTISCALE_THRESHOLD", 256)  # a 1000 px image becomes a 3-level pyramid
    sdata = assemble([_section("S1", size=1000, coords=np.array([[500, 500], [200, 700]]))])
    t = sdata.tables["table"]
    enc = resolve_encoders("color_stats")  # 64 px input
    # 400 µm -> 6.25 µm/px would do, but levels 1-2 are computed lazily from level 0: reading them costs more
    assert plan_section(sdata, t, "S1", encoders=enc, patch_size_um=400)[0].level == 0
    sdata.write(tmp_path / "s.zarr")
    saved = sd.read_zarr(tmp_path / "s.zarr")
    plan = plan_section(saved, t, "S1", encoders=enc, patch_size_um=400)[0]
    assert plan.level == 2 and plan.patch_px == 100  # 4 µm/px <= 6.25 µm/px; the coarsest such level
    plan = plan_section(saved, t, "S1", encoders=enc, patch_size_um=200)[0]
    assert plan.level == 1 and plan.patch_px == 100  # 3.1 µm/px needed: level 1 (2 µm/px), not level 2 (4 µm/px)
    embed_patches(saved, encoder="color_stats", patch_size_um=400, progress=False)
    embed_patches(sdata, encoder="color_stats", patch_size_um=400, progress=False, key_added="X_l0")
    a, b = saved.tables["table"].obsm["X_color_stats"], sdata.tables["table"].obsm["X_l0"]
    np.testing.assert_allclose(a[:, :3], b[:, :3], atol=0.01)  # same mean colour from either level


def test_bad_input_errors():
    sdata = assemble([_section("S1")])
    with pytest.raises(ValueError, match="Unknown encoder 'nope'.*color_stats"):
        embed_patches(sdata, encoder="nope", progress=False)
    with pytest.raises(StemstDataError, match="minimum 8"):
        embed_patches(sdata, encoder="color_stats", patch_size_um=5, progress=False)
    with pytest.raises(StemstDataError, match="Unknown sections"):
        embed_patches(sdata, encoder="color_stats", sections=["S9"], progress=False)
    no_image = sd.SpatialData(shapes=dict(sdata.shapes), tables={"table": sdata.tables["table"].copy()})
    with pytest.raises(StemstDataError, match="No image element 'S1_he'"):
        embed_patches(no_image, encoder="color_stats", progress=False)
    table = sdata.tables["table"].copy()
    del table.obsm["spatial"]
    with pytest.raises(StemstDataError, match="spatial"):
        embed_patches(_with_table(sdata, table), encoder="color_stats", progress=False)
    with pytest.raises(TypeError, match="SpatialData"):
        embed_patches(sdata.tables["table"], progress=False)


# ---------------------------------------------------------------------------------------------------------------
# HER2ST


@pytest.fixture(scope="module")
def c2_default(her2st_c):
    """All 187 C2 spots embedded with the default encoder (original view only)."""
    t = her2st_c.tables["table"]
    sdata = _with_table(her2st_c, t[(t.obs["section"] == "C2").to_numpy()].copy())
    embed_patches(sdata, augment=False, progress=False)
    return sdata


def test_default_encoder_embeds_every_c2_spot(c2_default):
    t = c2_default.tables["table"]
    x = t.obsm["X_efficientnet_lite0"]
    assert x.shape == (187, 1280) and x.dtype == np.float32 and np.isfinite(x).all()
    assert x.std(0).mean() > 0.05  # spots differ
    s = t.uns["stemst"]["embeddings"]["X_efficientnet_lite0"]
    # 112 µm at 0.689 µm/px; the lazily computed coarser levels are not used
    assert s["patch_size_um"] == {"C2": 112.0} and s["patch_px"] == {"C2": 163} and s["level"] == {"C2": 0}


def test_dihedral_views_differ_but_stay_close(her2st_c, c2_default):
    t = her2st_c.tables["table"]
    rows = np.flatnonzero((t.obs["section"] == "C2").to_numpy())[::16]  # 12 spots across the section
    sdata = _with_table(her2st_c, t[rows].copy())
    embed_patches(sdata, augment=True, progress=False)
    sub = sdata.tables["table"]
    v = sub.obsm["X_efficientnet_lite0_views"]
    assert v.shape == (len(rows), 8, 1280) and np.isfinite(v).all()
    np.testing.assert_array_equal(v[:, 0], sub.obsm["X_efficientnet_lite0"])
    ref = c2_default.tables["table"][sub.obs_names].obsm["X_efficientnet_lite0"]
    np.testing.assert_allclose(v[:, 0], ref, rtol=1e-3, atol=1e-3)  # view 0 is the plain embedding
    d_views = np.linalg.norm(v[:, :, None] - v[:, None], axis=-1)  # (n, 8, 8)
    iu = np.triu_indices(8, 1)
    within = d_views[:, iu[0], iu[1]]
    assert within.min() > 1e-3  # every view differs from every other
    d_spots = np.linalg.norm(v[:, None, 0] - v[None, :, 0], axis=-1)
    others = d_spots[~np.eye(len(rows), dtype=bool)].reshape(len(rows), -1)
    assert (within.mean(1) < 0.75 * others.mean(1)).all()  # each spot's views are closer than other spots, on average
    assert (within.mean(1) < others.min(1)).mean() >= 0.75  # and usually closer than the most similar other spot


def _ridge_pearson(x_train, y_train, x_test, y_test, alpha):
    mu, sd_ = x_train.mean(0), x_train.std(0) + 1e-6
    a, b = (x_train - mu) / sd_, (x_test - mu) / sd_
    w = np.linalg.solve(a.T @ a + alpha * np.eye(a.shape[1]), a.T @ (y_train - y_train.mean(0)))
    p = b @ w + y_train.mean(0)
    p, y = p - p.mean(0), y_test - y_test.mean(0)
    r = (p * y).sum(0) / np.sqrt((p**2).sum(0) * (y**2).sum(0))
    return float(np.nanmean(r))


def _probe(sdata, key, alpha):
    t = sdata.tables["table"]
    stemst.pp.select_genes(sdata, train_sections=["C2", "C3", "C4", "C5"], n_genes=100)
    y = stemst.pp.transform_counts(t[:, t.var["stemst_panel"].to_numpy()].X, method="log2p1")
    train = (t.obs["section"] != "C6").to_numpy()
    x = t.obsm[key]
    return _ridge_pearson(x[train], y[train], x[~train], y[~train], alpha)


def test_ridge_probe_on_color_stats_c2_to_c6(her2st_c):
    sdata = _with_table(her2st_c, her2st_c.tables["table"].copy())
    embed_patches(sdata, encoder="color_stats", augment=False, progress=False)
    r = _probe(sdata, "X_color_stats", alpha=10.0)
    assert r > 0.3, r  # 0.49 measured: colour alone tracks spot depth


@pytest.mark.slow
def test_ridge_probe_on_default_encoder_c2_to_c6(her2st_c):
    sdata = _with_table(her2st_c, her2st_c.tables["table"].copy())
    embed_patches(sdata, augment=False, progress=False)
    r = _probe(sdata, "X_efficientnet_lite0", alpha=1000.0)
    print(f"ridge probe, efficientnet_lite0, train C2-C5, test C6: mean Pearson {r:.3f}")
    assert r > 0.3, r
