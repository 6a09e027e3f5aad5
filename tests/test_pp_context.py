import anndata as ad
import numpy as np
import pytest

import stemst
from stemst._schema import StemstDataError, context_key, ring_key


def _grid_table(n=5, step=10.0, d=3, rng=0):
    """An n x n square grid with random embeddings, in two sections (the second shifted far away)."""
    g = np.random.default_rng(rng)
    xy = np.array([(i * step, j * step) for i in range(n) for j in range(n)], float)
    coords = np.concatenate([xy, xy + 1e6])
    emb = g.normal(size=(2 * n * n, d)).astype(np.float32)
    obs = {"section": np.repeat(["a", "b"], n * n)}
    return ad.AnnData(obs=obs, obsm={"spatial": coords, "X_enc": emb}), emb, xy


def test_spot_spacing_known_grids():
    _, _, xy = _grid_table(step=7.0)
    assert stemst.pp.spot_spacing(xy) == pytest.approx(7.0)
    hexagonal = np.array([(x + 0.5 * (y % 2), y * np.sqrt(3) / 2) for x in range(6) for y in range(6)]) * 100
    assert stemst.pp.spot_spacing(hexagonal) == pytest.approx(100.0)
    with pytest.raises(StemstDataError, match="at least 2"):
        stemst.pp.spot_spacing(xy[:1])


def test_rings_are_neighbour_means_within_each_section():
    adata, emb, xy = _grid_table()
    key = stemst.pp.spatial_context(adata, embedding_key="X_enc", standardize=False)
    assert key == context_key("X_enc")
    r1, r2 = adata.obsm[ring_key("X_enc", 1)], adata.obsm[ring_key("X_enc", 2)]
    # known answer for the centre spot (2, 2) of section a: ring 1 = 8 spots at Chebyshev distance 1 (the
    # diagonals at 1.41 steps fall inside 1.5), ring 2 = the 16 spots with distance in (1.5, 2.5] steps
    centre = 12
    d = np.linalg.norm(xy - xy[centre], axis=1) / 10.0
    np.testing.assert_allclose(r1[centre], emb[:25][(d > 0.5) & (d <= 1.5)].mean(0), rtol=1e-5)
    np.testing.assert_allclose(r2[centre], emb[:25][(d > 1.5) & (d <= 2.5)].mean(0), rtol=1e-5)
    # sections never mix: section b's rings use section b's spots only
    db = np.linalg.norm(xy - xy[centre], axis=1) / 10.0
    np.testing.assert_allclose(r1[25 + centre], emb[25:][(db > 0.5) & (db <= 1.5)].mean(0), rtol=1e-5)
    np.testing.assert_allclose(adata.obsm[key], np.concatenate([emb, r1, r2], 1), rtol=1e-6)
    assert adata.uns["stemst"]["context"][key]["spacing"] == {"a": pytest.approx(10.0), "b": pytest.approx(10.0)}


def test_standardized_per_section_and_isolated_spot_falls_back():
    adata, emb, _ = _grid_table()
    adata.obsm["spatial"][0] = [-1e4, -1e4]  # a spot with no neighbours keeps its own embedding as context
    key = stemst.pp.spatial_context(adata, embedding_key="X_enc")
    ctx = adata.obsm[key]
    for s in ("a", "b"):
        m = (adata.obs["section"] == s).to_numpy()
        np.testing.assert_allclose(ctx[m].mean(0), 0, atol=1e-5)
        np.testing.assert_allclose(ctx[m].std(0), 1, atol=1e-2)
    raw = stemst.pp.spatial_context(adata, embedding_key="X_enc", standardize=False)
    np.testing.assert_allclose(adata.obsm[raw][0, 3:6], emb[0])  # ring 1 of the isolated spot = itself


def test_views_are_averaged_and_errors_named():
    adata, emb, _ = _grid_table()
    views = np.stack([emb, emb + 2.0], axis=1)
    adata.obsm["X_enc_views"] = views
    key = stemst.pp.spatial_context(adata, embedding_key="X_enc", standardize=False)
    np.testing.assert_allclose(adata.obsm[key][:, :3], emb + 1.0, rtol=1e-6)
    with pytest.raises(KeyError, match="embed_patches"):
        stemst.pp.spatial_context(adata, embedding_key="X_other")
    del adata.obsm["spatial"]
    with pytest.raises(StemstDataError, match="spatial"):
        stemst.pp.spatial_context(adata, embedding_key="X_enc")


def test_context_on_real_her2st_grid(her2st_small, sdata_copy):
    """On the real ST grid the fitted spacing is the 200 µm array step, and every spot gets finite context."""
    sdata = sdata_copy(her2st_small)  # the session's shared data stay as loaded
    table = sdata.tables["table"]
    rng = np.random.default_rng(0)
    table.obsm["X_fake"] = rng.normal(size=(table.n_obs, 4)).astype(np.float32)
    key = stemst.pp.spatial_context(sdata, embedding_key="X_fake")
    spacing = table.uns["stemst"]["context"][key]["spacing"]
    for s, px in spacing.items():
        um = px * table.uns["stemst"]["sections"][s]["microns_per_pixel"]
        assert 180 < um < 220  # the legacy ST array: 200 µm centre to centre
    assert table.obsm[key].shape == (table.n_obs, 12)
    assert np.isfinite(table.obsm[key]).all()
    shared = her2st_small.tables["table"]
    assert "X_fake" not in shared.obsm and key not in shared.obsm and "context" not in shared.uns.get("stemst", {})
