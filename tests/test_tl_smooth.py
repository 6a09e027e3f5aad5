"""tl.smooth: known answers on a tiny square grid (ring-1 neighbours include the diagonals, sections never mix)."""

import anndata as ad
import numpy as np
import pytest
import spatialdata as sd

import stemst
from stemst._schema import StemstDataError


def _grid_prediction() -> sd.SpatialData:
    """Sections a and b on the same 3 x 3 grid (step 10), spot ``3 i + j`` at ``(10 i, 10 j)``; gene g0 holds the
    spot's index (times 10 in section b), g1 the constant 7. Section a has one more spot, far from the others."""
    xy = np.array([(10.0 * i, 10.0 * j) for i in range(3) for j in range(3)])
    coords = np.concatenate([xy, [[1000.0, 1000.0]], xy])
    g0 = np.concatenate([np.arange(9.0), [100.0], 10 * np.arange(9.0)])
    X = np.c_[g0, np.full(19, 7.0)].astype(np.float32)
    pred = ad.AnnData(
        X=X,
        obs={"section": ["a"] * 10 + ["b"] * 9},
        obsm={"spatial": coords, "samples": np.repeat(X[:, None], 4, axis=1)},
        layers={"counts": 3 * X, "std": np.ones_like(X)},
        uns={"stemst_prediction": {"method": "ridge"}},
    )
    pred.var_names = ["g0", "g1"]
    return sd.SpatialData(tables={"pred": pred})


def test_smooth_known_answers_on_a_grid():
    sdata = _grid_prediction()
    key = stemst.tl.smooth(sdata, "pred", weight=0.5)
    assert key == "pred_smoothed"
    out = sdata.tables[key]
    g0 = out.X[:, 0]
    # centre (index 4): its 8 neighbours average 4, so it stays 4
    assert g0[4] == pytest.approx(4.0)
    # corner 0: neighbours 1, 3, 4 (mean 8/3) -> 0.5 * 0 + 0.5 * 8/3; edge 1: 0, 2, 3, 4, 5 (mean 2.8) -> 1.9
    assert g0[0] == pytest.approx(4 / 3) and g0[1] == pytest.approx(1.9)
    assert g0[9] == 100.0  # the far spot has no neighbour: it keeps its value
    # section b: the same grid, values x 10: its own neighbours only (the same coordinates as section a's)
    np.testing.assert_allclose(out.X[10:, 0], 10 * g0[:9], rtol=1e-6)
    np.testing.assert_allclose(out.X[:, 1], 7.0)  # a constant stays constant
    np.testing.assert_allclose(out.layers["counts"], 3 * out.X, rtol=1e-6)  # counts smoothed the same way
    assert "std" not in out.layers and "samples" not in out.obsm
    assert out.uns["stemst_prediction"] == {"method": "ridge+smooth", "smoothing_weight": 0.5, "source": "pred"}
    before = sdata.tables["pred"]
    np.testing.assert_array_equal(before.X[:10, 0], np.r_[np.arange(9.0), 100.0])  # the input is unchanged
    assert "std" in before.layers and "samples" in before.obsm


@pytest.mark.parametrize(("weight", "corner"), [(0.0, 0.0), (1.0, 8 / 3)])
def test_smooth_weight_ends(weight, corner):
    sdata = _grid_prediction()
    key = stemst.tl.smooth(sdata, "pred", weight=weight, key_added="s")
    assert sdata.tables[key].X[0, 0] == pytest.approx(corner)


def test_smooth_refuses_bad_weight_an_existing_key_and_missing_centres():
    sdata = _grid_prediction()
    with pytest.raises(ValueError, match="weight"):
        stemst.tl.smooth(sdata, "pred", weight=1.5)
    stemst.tl.smooth(sdata, "pred")
    with pytest.raises(StemstDataError, match="overwrite=True"):
        stemst.tl.smooth(sdata, "pred")
    stemst.tl.smooth(sdata, "pred", weight=1.0, overwrite=True)
    assert sdata.tables["pred_smoothed"].X[0, 0] == pytest.approx(8 / 3)
    del sdata.tables["pred"].obsm["spatial"]
    with pytest.raises(StemstDataError, match="spatial"):
        stemst.tl.smooth(sdata, "pred", key_added="other")
