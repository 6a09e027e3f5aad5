import logging
import os

import numpy as np
import pytest
import spatialdata as sd
import timm
import torch

import stemst
from stemst import _schema
from stemst._errors import StemstWarning
from stemst._schema import StemstDataError, assemble, make_section
from stemst.pp import Encoder, embed_patches
from stemst.pp._embed import CLIPPED_KEY, _Embedder, _prefetched, plan_section
from stemst.pp._encoders import ColorStats, dihedral_views, fingerprint, normalise, resolve_encoders


@pytest.fixture(autouse=True)
def cache_dir(tmp_path, monkeypatch):
    """Every test gets its own empty embedding cache (never the user's)."""
    folder = tmp_path / "stemst_cache"
    monkeypatch.setenv("STEMST_CACHE_DIR", str(folder))
    return folder / "embeddings"


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
    embed_patches(sdata, augment=False, progress=False, cache=False)
    return sdata


def test_default_encoder_embeds_every_c2_spot(c2_default):
    t = c2_default.tables["table"]
    x = t.obsm["X_efficientnet_lite0"]
    assert x.shape == (187, 1632) and x.dtype == np.float32 and np.isfinite(x).all()
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
    assert v.shape == (len(rows), 8, 1632) and np.isfinite(v).all()
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


# ---------------------------------------------------------------------------------------------------------------
# throughput: channels-last batches, read-ahead


def test_prefetched_keeps_order_and_raises():
    assert list(_prefetched([lambda i=i: i * i for i in range(7)], depth=3)) == [i * i for i in range(7)]
    assert list(_prefetched([])) == []

    def boom():
        raise OSError("disk")

    with pytest.raises(OSError, match="disk"):
        list(_prefetched([lambda: 1, boom, lambda: 3]))


def test_channels_last_batches_match_the_plain_computation():
    """The fast path (normalise once, views stacked channels-last, channels-last model) equals the textbook one."""
    torch.manual_seed(0)
    net = timm.create_model("test_resnet", pretrained=False, num_classes=0).eval()
    enc = Encoder("tiny", build=lambda: net, input_size=96, mean=(0.5, 0.4, 0.3), std=(0.2, 0.25, 0.3))
    patches = np.random.default_rng(0).integers(0, 256, (3, 3, 80, 80), dtype=np.uint8)
    fast = _Embedder([enc], torch.device("cpu"), batch_size=8)
    assert fast.channels_last == [True]
    got = fast(patches, augment=True)
    with torch.inference_mode():
        img = torch.nn.functional.interpolate(
            torch.from_numpy(patches).float() / 255, size=(96, 96), mode="bilinear", antialias=True
        )
        views = normalise(dihedral_views(img), enc.mean, enc.std).flatten(0, 1)
        want = net.to(memory_format=torch.contiguous_format)(views.contiguous()).reshape(3, 8, -1).numpy()
    assert got.shape == want.shape == (3, 8, net.num_features)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


class _ViewNet(torch.nn.Module):
    """A conv net whose forward needs a contiguous tensor (``.view``), as older code often does."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 3)

    def forward(self, x):
        y = self.conv(x)
        return y.view(y.shape[0], -1).reshape(len(y), 4, -1).mean(-1)


def test_channels_last_falls_back_for_models_that_need_contiguous_input():
    enc = Encoder("viewnet", build=_ViewNet, input_size=16)
    emb = _Embedder([enc], torch.device("cpu"), batch_size=4)
    out = emb(np.full((2, 3, 16, 16), 128, np.uint8), augment=True)
    assert out.shape == (2, 8, 4) and np.isfinite(out).all() and emb.channels_last == [False]


# ---------------------------------------------------------------------------------------------------------------
# the embedding cache (on a crop of HER2ST C2)


class CountingColorStats(ColorStats):
    """The colour-statistics encoder, counting the images it is called on."""

    images = 0

    def forward(self, x):
        CountingColorStats.images += len(x)
        return super().forward(x)


def _counting(name="counting"):
    return Encoder(name, build=CountingColorStats, input_size=64, mean=(0.0,) * 3, std=(1.0,) * 3)


@pytest.fixture(scope="module")
def c2_crop(her2st_c, section_crop):
    """A 1600 x 1600 px crop of C2 (0.69 µm/px) around its centre spot, with the spots that lie in it."""
    return make_section("C2", **section_crop(her2st_c, "C2", 1600))


def _crop_sdata(sec, *, image=None, coords=None):
    kw = {f: getattr(sec, f) for f in ("counts", "genes", "spot_ids", "coords")}
    kw["coords"] = kw["coords"] if coords is None else coords
    info = sec.info
    return assemble(
        [
            make_section(
                "C2",
                image=sec.image if image is None else image,
                microns_per_pixel=info.microns_per_pixel,
                spot_diameter_um=info.spot_diameter_um,
                **kw,
            )
        ]
    )


def _run(sdata, **kw):
    before = CountingColorStats.images
    embed_patches(sdata, **{"encoder": _counting(), "progress": False, **kw})
    t = sdata.tables["table"]
    key = kw.get("key_added", f"X_{kw.get('encoder', _counting()).name}")
    views = t.obsm.get(f"{key}_views")
    return CountingColorStats.images - before, t.obsm[key], views, t.uns["stemst"]["embeddings"][key]


def test_cache_hit_skips_the_encoder_with_identical_arrays(c2_crop, cache_dir, caplog):
    n = len(c2_crop.spot_ids)
    assert n >= 10
    calls, x, views, settings = _run(_crop_sdata(c2_crop))
    assert calls == n * 8 and settings["cache_hit"] == {"C2": False}
    files = list(cache_dir.glob("C2-*.npz"))
    assert len(files) == 1 and not list(cache_dir.glob(".*.tmp"))
    with caplog.at_level(logging.INFO, logger="stemst"):
        calls, x2, views2, settings = _run(_crop_sdata(c2_crop))  # a fresh SpatialData, as in a new session
    assert calls == 0 and settings["cache_hit"] == {"C2": True}
    assert "read from the cache" in caplog.text
    np.testing.assert_array_equal(x2, x)
    np.testing.assert_array_equal(views2, views)
    assert list(cache_dir.glob("C2-*.npz")) == files
    # the cached values are what the encoder gives: the same as without a cache
    calls, x3, _, settings = _run(_crop_sdata(c2_crop), cache=False)
    assert calls == n * 8 and settings["cache_hit"] == {"C2": False} and settings["cache_dir"] is None
    np.testing.assert_allclose(x3, x, rtol=1e-6, atol=1e-6)


def test_changed_settings_are_embedded_again(c2_crop, cache_dir):
    n = len(c2_crop.spot_ids)
    assert _run(_crop_sdata(c2_crop))[0] == n * 8
    assert _run(_crop_sdata(c2_crop), patch_size_um=100.0)[0] == n * 8  # patch size
    assert _run(_crop_sdata(c2_crop), augment=False)[0] == n  # views
    moved = c2_crop.coords.copy()
    moved[0] += [3.0, 0.0]
    assert _run(_crop_sdata(c2_crop, coords=moved))[0] == n * 8  # one spot moved by 3 px
    edited = c2_crop.image.copy()
    x, y = np.round(c2_crop.coords[-1]).astype(int)
    edited[:, y - 2 : y + 2, x - 2 : x + 2] = 0  # 16 pixels under the last spot
    calls, x_edit, _, _ = _run(_crop_sdata(c2_crop, image=edited))
    assert calls == n * 8
    assert len(list(cache_dir.glob("C2-*.npz"))) == 4  # the edited image rewrote its settings' file
    # another encoder: same name, other code or weights
    other = Encoder("counting", build=ColorStats, input_size=64, mean=(0.0,) * 3, std=(1.0,) * 3)
    embed_patches(_crop_sdata(c2_crop), encoder=other, progress=False)
    assert len(list(cache_dir.glob("C2-*.npz"))) == 5
    # and each of these settings is now a hit
    for kw in ({"patch_size_um": 100.0}, {"augment": False}):
        assert _run(_crop_sdata(c2_crop), **kw)[0] == 0
    assert _run(_crop_sdata(c2_crop, coords=moved))[0] == 0
    calls, again, _, _ = _run(_crop_sdata(c2_crop, image=edited))
    assert calls == 0
    np.testing.assert_array_equal(again, x_edit)
    assert _run(_crop_sdata(c2_crop))[0] == n * 8  # the original image's pixels no longer match that file


def test_unverified_cache_reads_no_pixels(c2_crop, cache_dir, monkeypatch):
    import stemst.pp._embed as embed_module

    reads = []
    real = embed_module.read_patches

    def counting(image, corners, patch_px):
        reads.append(len(corners))
        return real(image, corners, patch_px)

    monkeypatch.setattr(embed_module, "read_patches", counting)
    n = len(c2_crop.spot_ids)
    _, x, views, _ = _run(_crop_sdata(c2_crop))
    assert sum(reads) == n  # embedded: every patch read once
    reads.clear()
    calls, x2, _, settings = _run(_crop_sdata(c2_crop))
    assert calls == 0 and sum(reads) == n and settings["cache_hit"] == {"C2": True}  # verified: read again
    reads.clear()
    calls, x3, views3, settings = _run(_crop_sdata(c2_crop), verify_cache=False)
    assert calls == 0 and reads == [] and settings["cache_hit"] == {"C2": True}  # trusted: no pixel read
    np.testing.assert_array_equal(x3, x)
    np.testing.assert_array_equal(views3, views)
    # the trade-off, documented: an image edited under a spot goes unnoticed without the check, not with it
    edited = c2_crop.image.copy()
    cx, cy = np.round(c2_crop.coords[-1]).astype(int)
    edited[:, cy - 2 : cy + 2, cx - 2 : cx + 2] = 0
    assert _run(_crop_sdata(c2_crop, image=edited), verify_cache=False)[0] == 0
    assert _run(_crop_sdata(c2_crop, image=edited))[0] == n * 8
    # a changed setting is still a miss without the pixel check
    moved = c2_crop.coords.copy()
    moved[0] += [3.0, 0.0]
    assert _run(_crop_sdata(c2_crop, coords=moved), verify_cache=False)[0] == n * 8


def test_fingerprint_follows_weights_code_and_closures():
    torch.manual_seed(0)
    a = timm.create_model("test_resnet", pretrained=False, num_classes=0)
    b = timm.create_model("test_resnet", pretrained=False, num_classes=0)
    assert fingerprint(a) == fingerprint(a) != fingerprint(b)
    b.load_state_dict(a.state_dict())
    assert fingerprint(a) == fingerprint(b)
    with torch.no_grad():
        next(b.parameters())[0].add_(1e-3)
    assert fingerprint(a) != fingerprint(b)
    assert fingerprint(ColorStats()) == fingerprint(ColorStats()) != fingerprint(CountingColorStats())

    def scaled(k):
        return lambda x: x.mean((-2, -1)) * k

    assert fingerprint(scaled(2.0)) == fingerprint(scaled(2.0)) != fingerprint(scaled(3.0))
    assert fingerprint(lambda x: x.mean((-2, -1))) != fingerprint(lambda x: x.amax((-2, -1)))


def test_truncated_cache_file_is_embedded_again_with_a_warning(c2_crop, cache_dir):
    n = len(c2_crop.spot_ids)
    _, x, _, _ = _run(_crop_sdata(c2_crop))
    (path,) = cache_dir.glob("C2-*.npz")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.warns(StemstWarning, match="unreadable embedding cache"):
        calls, x2, _, settings = _run(_crop_sdata(c2_crop))
    assert calls == n * 8 and settings["cache_hit"] == {"C2": False}
    np.testing.assert_allclose(x2, x, rtol=1e-6, atol=1e-6)
    assert path.stat().st_size == len(data)  # rewritten whole
    assert _run(_crop_sdata(c2_crop))[0] == 0


def test_cache_false_never_writes_and_a_path_chooses_the_folder(c2_crop, cache_dir, tmp_path):
    n = len(c2_crop.spot_ids)
    assert _run(_crop_sdata(c2_crop), cache=False)[0] == n * 8
    assert _run(_crop_sdata(c2_crop), cache=False)[0] == n * 8
    assert not cache_dir.exists()
    mine = tmp_path / "my cache"
    assert _run(_crop_sdata(c2_crop), cache=mine)[0] == n * 8
    assert _run(_crop_sdata(c2_crop), cache=str(mine))[0] == 0
    assert len(list(mine.glob("C2-*.npz"))) == 1 and not cache_dir.exists()
    assert os.environ["STEMST_CACHE_DIR"] in str(stemst.pp._embed.default_cache_dir())


def test_cache_is_per_section_and_restores_the_clipped_flags(her2st_c, cache_dir):
    """Sections are cached apart: embedding C2 alone, then C2 + C6, runs the encoder on C6 only."""
    t = her2st_c.tables["table"]
    rows = np.concatenate([np.flatnonzero((t.obs["section"] == s).to_numpy())[:6] for s in ("C2", "C6")])
    sdata = _with_table(her2st_c, t[rows].copy())
    assert _run(sdata, sections="C2", augment=False)[0] == 6
    calls, x, _, settings = _run(sdata, augment=False)
    assert calls == 6 and settings["cache_hit"] == {"C2": True, "C6": False}
    clipped = sdata.tables["table"].obs[CLIPPED_KEY].to_numpy().copy()
    fresh = _with_table(her2st_c, t[rows].copy())
    calls, x2, _, settings = _run(fresh, augment=False)
    assert calls == 0 and settings["cache_hit"] == {"C2": True, "C6": True}
    np.testing.assert_array_equal(x2, x)
    np.testing.assert_array_equal(fresh.tables["table"].obs[CLIPPED_KEY].to_numpy(), clipped)
