"""Bad input through make_section / assemble / the readers, and the zarr round trip of the data model."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

import stemst
from stemst import _schema
from stemst._schema import StemstDataError, assemble, make_section


@pytest.fixture(scope="module")
def c2_kwargs(her2st_small) -> dict:
    """make_section arguments from real C2 data: a 700 x 600 px crop around the central spot and its neighbours."""
    table = her2st_small.tables["table"]
    sub = table[_schema.section_mask(table, "C2")]
    xy = np.asarray(sub.obsm["spatial"], dtype=float)
    centre = xy[np.argmin(np.linalg.norm(xy - xy.mean(0), axis=1))]
    x0, y0 = centre.astype(int) - [350, 300]
    inside = (xy[:, 0] >= x0) & (xy[:, 0] < x0 + 700) & (xy[:, 1] >= y0) & (xy[:, 1] < y0 + 600)
    image = np.asarray(_schema.get_image(her2st_small, "C2")[:, y0 : y0 + 600, x0 : x0 + 700])
    return {
        "image": image,
        "counts": sp.csr_matrix(sub.X[inside]),
        "genes": list(sub.var_names),
        "spot_ids": sub.obs[_schema.INSTANCE_KEY][inside].astype(str).tolist(),
        "coords": xy[inside] - [x0, y0],
        "microns_per_pixel": 0.69,
        "spot_diameter_um": 100.0,
    }


def test_make_section_ok(c2_kwargs):
    sec = make_section("C2", **c2_kwargs)
    assert sec.counts.dtype == np.int32 and sec.counts.shape[0] == len(c2_kwargs["spot_ids"]) >= 4
    sdata = assemble([sec])
    stemst.io.validate(sdata)


def test_make_section_spots_outside_image(c2_kwargs):
    coords = c2_kwargs["coords"].copy()
    coords[1] = [700.5, 10]  # one pixel past the right edge
    with pytest.raises(StemstDataError, match=r"1 spot centres fall outside the 700 x 600 px image.*scale factor"):
        make_section("C2", **{**c2_kwargs, "coords": coords})


def test_make_section_duplicate_spot_ids(c2_kwargs):
    ids = list(c2_kwargs["spot_ids"])
    ids[1] = ids[0]
    with pytest.raises(StemstDataError, match=rf"duplicate spot ids, e.g. \['{ids[0]}'\]"):
        make_section("C2", **{**c2_kwargs, "spot_ids": ids})


@pytest.mark.parametrize(
    ("transform", "match"),
    [
        (lambda m: m.multiply(1e4 / m.sum(1)).tocsr(), "not integers"),  # normalise_total
        (lambda m: m.log1p(), "not integers"),
        (lambda m: m - 2 * sp.eye(m.shape[0], m.shape[1], format="csr"), "negative"),
        (lambda m: m.astype(float).multiply(np.where(np.arange(m.shape[1]) == 3, np.nan, 1.0)).tocsr(), "NaN"),
    ],
)
def test_make_section_bad_counts(c2_kwargs, transform, match):
    counts = sp.csr_matrix(transform(c2_kwargs["counts"].astype(np.float64)))
    with pytest.raises(StemstDataError, match=match):
        make_section("C2", **{**c2_kwargs, "counts": counts})


def test_make_section_shape_mismatches(c2_kwargs):
    with pytest.raises(StemstDataError, match="count columns but"):
        make_section("C2", **{**c2_kwargs, "genes": c2_kwargs["genes"][:-1]})
    with pytest.raises(StemstDataError, match="must agree"):
        make_section("C2", **{**c2_kwargs, "coords": c2_kwargs["coords"][:-1]})
    genes = list(c2_kwargs["genes"])
    genes[1] = genes[0]
    with pytest.raises(StemstDataError, match="duplicate gene names"):
        make_section("C2", **{**c2_kwargs, "genes": genes})
    with pytest.raises(StemstDataError, match="microns_per_pixel must be positive"):
        make_section("C2", **{**c2_kwargs, "microns_per_pixel": 0.0})
    with pytest.raises(StemstDataError, match="uint8"):
        make_section("C2", **{**c2_kwargs, "image": c2_kwargs["image"].astype(np.float32)})


def test_assemble_bad_input(c2_kwargs):
    sec = make_section("C2", **c2_kwargs)
    with pytest.raises(StemstDataError, match="unique"):
        assemble([sec, sec])
    with pytest.raises(StemstDataError, match="No sections"):
        assemble([])


def test_her2st_unknown_section(data_dir):
    with pytest.raises(StemstDataError, match=r"Unknown HER2ST sections \['Z9'\]; known sections: \[.*'C2'"):
        stemst.datasets.her2st(["Z9"], cache_dir=data_dir)


def test_her2st_section_without_image(data_dir):
    with pytest.raises(StemstDataError, match=r"\['B1'\] have counts but no H&E image.*sections with images: \['A1'"):
        stemst.datasets.her2st(["C2", "B1"], cache_dir=data_dir)  # checked before anything is loaded


# ----------------------------------------------------------------------------------------------------------------
# the same problems arriving through the readers: clear errors, inputs untouched, nothing written


def _adata(c2_kwargs: dict) -> ad.AnnData:
    img = c2_kwargs["image"].transpose(1, 2, 0)
    adata = ad.AnnData(
        X=c2_kwargs["counts"].astype(np.float32),
        obs=pd.DataFrame(index=c2_kwargs["spot_ids"]),
        var=pd.DataFrame(index=c2_kwargs["genes"]),
    )
    adata.obsm["spatial"] = c2_kwargs["coords"] * 2  # full resolution = twice the stored image
    scalefactors = {"tissue_hires_scalef": 0.5, "spot_diameter_fullres": 100 / 0.345}
    adata.uns["spatial"] = {"lib": {"images": {"hires": img}, "scalefactors": scalefactors}}
    return adata


def test_reader_bad_input(c2_kwargs, tmp_path):
    good = _adata(c2_kwargs)
    sdata = stemst.io.from_anndata(good, spot_diameter_um=100.0)
    assert _schema.section_info(sdata.tables["table"], "lib").microns_per_pixel == pytest.approx(0.69)

    outside = good.copy()
    outside.obsm["spatial"][0] = [-10, 5]
    dup = good.copy()
    dup.obs_names = [dup.obs_names[0]] * 2 + list(dup.obs_names[2:])
    normalised = good.copy()
    normalised.X = normalised.X.multiply(1e4 / normalised.X.sum(1)).tocsr()
    negative = good.copy()
    x = negative.X.tolil()
    x[0, 0] = -1
    negative.X = x.tocsr()
    cases = [(outside, "outside the 700 x 600 px image"), (dup, "duplicate spot ids"), (normalised, "not integers")]
    for adata, match in [*cases, (negative, "negative")]:
        before = adata.copy()
        with pytest.raises(StemstDataError, match=match):
            stemst.io.from_anndata(adata)
        np.testing.assert_array_equal(adata.obsm["spatial"], before.obsm["spatial"])
        assert (adata.X != before.X).nnz == 0 and list(adata.obs_names) == list(before.obs_names)
    assert list(tmp_path.iterdir()) == []


def test_reader_missing_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="Space Ranger output folder"):
        stemst.io.visium(tmp_path / "nope")
    (tmp_path / "outs" / "spatial").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match=r"filtered_feature_bc_matrix\.h5 \(counts matrix, 10x HDF5\)"):
        stemst.io.visium(tmp_path / "outs")
    with pytest.raises(FileNotFoundError, match=r"wsis/S1\.tif \(whole-slide H&E image\).*st/S1\.h5ad.*S1\.json"):
        stemst.io.hest(tmp_path, "S1")
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["outs", "spatial"]


def test_reader_bad_section_name(c2_kwargs):
    with pytest.raises(ValueError, match="'my slide' is not valid"):
        stemst.io.from_anndata(_adata(c2_kwargs), section="my slide", spot_diameter_um=100.0)


# ----------------------------------------------------------------------------------------------------------------
# zarr round trip


def _quarter_resolution(sdata, monkeypatch) -> object:
    """C2 and C6 with their real counts and spots on a 4x subsampled image, stored multiscale."""
    table = sdata.tables["table"]
    parts = []
    for s in _schema.sections(table):
        sub = table[_schema.section_mask(table, s)]
        info = _schema.section_info(table, s)
        parts.append(
            make_section(
                s,
                image=np.asarray(_schema.get_image(sdata, s)[:, ::4, ::4]),
                counts=sub.X,
                genes=sub.var_names,
                spot_ids=sub.obs[_schema.INSTANCE_KEY],
                coords=np.asarray(sub.obsm["spatial"]) / 4,
                microns_per_pixel=info.microns_per_pixel * 4,
                spot_diameter_um=info.spot_diameter_um,
                source=info.source,
                obs=sub.obs[["array_row", "array_col"]],
                extra=info.extra,
            )
        )
    monkeypatch.setattr(_schema, "MULTISCALE_THRESHOLD", 1024)  # ~2400 px images -> a 3-level pyramid
    return assemble(parts)


def _check_round_trip(sdata, path) -> None:
    import spatialdata as sd
    from spatialdata.transformations import get_transformation

    sdata.write(path)
    back = sd.read_zarr(path)
    stemst.io.validate(back)
    names = _schema.sections(sdata.tables["table"])
    assert set(back.coordinate_systems) == set(sdata.coordinate_systems) == set(names)
    for s in names:
        assert len(back.images[f"{s}_he"].children) == len(sdata.images[f"{s}_he"].children) >= 3
        for scale in (0, 1):
            a = _schema.get_image(sdata, s, scale)
            b = _schema.get_image(back, s, scale)
            assert a.shape == b.shape and b.dtype == np.uint8
            y, x = a.shape[1] // 2, a.shape[2] // 2
            np.testing.assert_array_equal(
                np.asarray(a[:, y : y + 4, x : x + 4]), np.asarray(b[:, y : y + 4, x : x + 4])
            )
        c0, c1 = sdata.shapes[_schema.spots_key(s)], back.shapes[_schema.spots_key(s)]
        np.testing.assert_allclose(c1["radius"], c0["radius"])
        assert list(c1.index.astype(str)) == list(c0.index.astype(str))
        np.testing.assert_allclose(c1.geometry.x, c0.geometry.x)
        np.testing.assert_allclose(c1.geometry.y, c0.geometry.y)
        for el0, el1 in ((sdata.images[f"{s}_he"], back.images[f"{s}_he"]), (c0, c1)):
            assert get_transformation(el1, get_all=True).keys() == get_transformation(el0, get_all=True).keys() == {s}
    t0, t1 = sdata.tables["table"], back.tables["table"]
    assert sp.issparse(t1.X) and t1.X.dtype == t0.X.dtype and (t1.X != t0.X).nnz == 0
    pd.testing.assert_frame_equal(t1.obs, t0.obs)
    pd.testing.assert_frame_equal(t1.var, t0.var)
    np.testing.assert_array_equal(t1.obsm["spatial"], t0.obsm["spatial"])
    for s in names:
        assert _schema.section_info(t1, s) == _schema.section_info(t0, s)
    assert stemst.io.read_zarr(path).tables["table"].n_obs == t0.n_obs


def test_zarr_round_trip(her2st_small, tmp_path, monkeypatch):
    sdata = _quarter_resolution(her2st_small, monkeypatch)
    assert _schema.section_info(sdata.tables["table"], "C2").spot_diameter_px == pytest.approx(
        _schema.section_info(her2st_small.tables["table"], "C2").spot_diameter_px / 4
    )
    _check_round_trip(sdata, tmp_path / "x.zarr")


@pytest.mark.slow
def test_zarr_round_trip_full_resolution(her2st_small, tmp_path):
    _check_round_trip(her2st_small, tmp_path / "x.zarr")
