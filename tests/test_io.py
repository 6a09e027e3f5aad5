"""stemst.io readers on files written, in each tool's layout, from real HER2ST pixels and counts."""

from __future__ import annotations

import json
import warnings

import anndata as ad
import h5py
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from PIL import Image

import stemst
from stemst import _schema

DOWN = 4  # the "full-resolution" image written to disk is the HER2ST crop shrunk by this factor
HIRES_SIDE = 600
LOWRES_SIDE = 250
ST_STEP_UM = 200.0  # legacy ST array: 200 µm between neighbouring spot centres


def _parts(sdata, section: str) -> dict:
    """Real pixels (cropped around the spots and shrunk DOWN x) and counts of one HER2ST section."""
    table = sdata.tables["table"]
    rows = _schema.section_mask(table, section)
    sub = table[rows]
    xy = np.asarray(sub.obsm["spatial"], dtype=float)
    img = _schema.get_image(sdata, section)
    margin = 160
    x0, y0 = (np.floor(xy.min(0)) - margin).astype(int).clip(0)
    x1, y1 = np.ceil(xy.max(0)) + margin
    x1 = int(x0 + (min(x1, img.shape[2]) - x0) // DOWN * DOWN)
    y1 = int(y0 + (min(y1, img.shape[1]) - y0) // DOWN * DOWN)
    crop = np.asarray(img[:, y0:y1, x0:x1]).transpose(1, 2, 0)
    full = np.asarray(Image.fromarray(crop).resize((crop.shape[1] // DOWN, crop.shape[0] // DOWN), Image.BOX))
    counts = sp.csr_matrix(sub.X).astype(np.int32)
    genes = table.var_names[np.asarray(counts.sum(0)).ravel() > 0]  # genes measured here, as a 10x file would hold
    counts = counts[:, table.var_names.get_indexer(genes)]
    return {
        "section": section,
        "image": full,
        "coords": (xy - [x0, y0]) / DOWN,  # (x, y) in pixels of `image`
        "counts": counts,
        "genes": list(genes),
        "barcodes": sub.obs[_schema.INSTANCE_KEY].astype(str).tolist(),
        "array_row": sub.obs["array_row"].to_numpy(),
        "array_col": sub.obs["array_col"].to_numpy(),
        "mpp": _schema.section_info(table, section).microns_per_pixel * DOWN,
    }


@pytest.fixture(scope="module")
def c2(her2st_small):
    return _parts(her2st_small, "C2")


@pytest.fixture(scope="module")
def c6(her2st_small):
    return _parts(her2st_small, "C6")


def _resize(image: np.ndarray, side: int) -> tuple[np.ndarray, float]:
    s = side / max(image.shape[:2])
    size = (round(image.shape[1] * s), round(image.shape[0] * s))
    return np.asarray(Image.fromarray(image).resize(size, Image.LANCZOS)), s


def write_10x_h5(file, counts: sp.csr_matrix, barcodes, genes, *, library_id: str | None = "lib1") -> None:
    """10x Genomics feature-barcode matrix HDF5 (Cell Ranger >= 3): genes x barcodes in CSC = our CSR."""
    counts = sp.csr_matrix(counts)
    with h5py.File(file, "w") as f:
        if library_id is not None:
            f.attrs["library_ids"] = np.array([library_id.encode()])
        m = f.create_group("matrix")
        m.create_dataset("data", data=counts.data.astype(np.int32))
        m.create_dataset("indices", data=counts.indices.astype(np.int64))
        m.create_dataset("indptr", data=counts.indptr.astype(np.int64))
        m.create_dataset("shape", data=np.array([counts.shape[1], counts.shape[0]], dtype=np.int32))
        m.create_dataset("barcodes", data=np.array([b.encode() for b in barcodes]))
        feats = m.create_group("features")
        feats.create_dataset("name", data=np.array([g.encode() for g in genes]))
        feats.create_dataset("id", data=np.array([f"ENSG{i:011d}".encode() for i in range(len(genes))]))
        feats.create_dataset("feature_type", data=np.array([b"Gene Expression"] * len(genes)))
        feats.create_dataset("genome", data=np.array([b"GRCh38"] * len(genes)))
        feats.create_dataset("_all_tag_keys", data=np.array([b"genome"]))


def write_visium(root, parts: dict, *, positions_file: str = "tissue_positions.csv", off_tissue: int = 3) -> dict:
    """A Space Ranger ``outs`` folder: counts h5, spatial/ positions, scale factors, hires/lowres png, full-res tif."""
    import tifffile

    spatial = root / "spatial"
    spatial.mkdir(parents=True)
    write_10x_h5(root / "filtered_feature_bc_matrix.h5", parts["counts"], parts["barcodes"], parts["genes"])
    full = parts["image"]
    hires, s_hi = _resize(full, HIRES_SIDE)
    lowres, s_lo = _resize(full, LOWRES_SIDE)
    Image.fromarray(hires).save(spatial / "tissue_hires_image.png")
    Image.fromarray(lowres).save(spatial / "tissue_lowres_image.png")
    tifffile.imwrite(root / "fullres.tif", full, photometric="rgb", tile=(256, 256))
    spot_px = 100.0 / parts["mpp"]  # ST spots are 100 µm wide
    scalefactors = {"tissue_hires_scalef": s_hi, "tissue_lowres_scalef": s_lo, "spot_diameter_fullres": spot_px}
    scalefactors["fiducial_diameter_fullres"] = 1.6 * spot_px
    (spatial / "scalefactors_json.json").write_text(json.dumps(scalefactors))
    xy = parts["coords"]
    pos = pd.DataFrame(
        {
            "barcode": parts["barcodes"],
            "in_tissue": 1,
            "array_row": parts["array_row"],
            "array_col": parts["array_col"],
            "pxl_row_in_fullres": np.rint(xy[:, 1]).astype(int),
            "pxl_col_in_fullres": np.rint(xy[:, 0]).astype(int),
        }
    )
    # background spots: listed, not in tissue, no counts in the filtered matrix
    bg = pd.DataFrame(
        {
            "barcode": [f"BG{i}" for i in range(off_tissue)],
            "in_tissue": 0,
            "array_row": 0,
            "array_col": np.arange(off_tissue),
            "pxl_row_in_fullres": 5,
            "pxl_col_in_fullres": 5 + 10 * np.arange(off_tissue),
        }
    )
    pos = pd.concat([pos, bg]).sample(frac=1.0, random_state=0)  # file order differs from the matrix order
    pos.to_csv(spatial / positions_file, index=False, header=positions_file == "tissue_positions.csv")
    return {"scalefactors": scalefactors, "hires": hires, "lowres": lowres, "positions": pos}


def _expected_coords(parts: dict, scale: float) -> np.ndarray:
    return np.rint(parts["coords"]) * scale


def _check_common(sdata, parts: dict, section: str, *, coords: np.ndarray, mpp: float) -> None:
    stemst.io.validate(sdata)
    table = sdata.tables["table"]
    assert _schema.sections(table) == [section]
    assert table.n_obs == len(parts["barcodes"])
    order = pd.Index(table.obs[_schema.INSTANCE_KEY].astype(str)).get_indexer(parts["barcodes"])
    assert (order >= 0).all()
    x = table.X[order][:, table.var_names.get_indexer(parts["genes"])]
    assert x.dtype.kind == "i"
    assert x.sum() == parts["counts"].sum() > 100_000
    assert (x != parts["counts"]).nnz == 0
    got = np.asarray(table.obsm["spatial"])[order]
    np.testing.assert_allclose(got, coords, atol=1e-6)
    img = _schema.get_image(sdata, section)
    assert (got >= 0).all() and (got[:, 0] < img.shape[2]).all() and (got[:, 1] < img.shape[1]).all()
    info = _schema.section_info(table, section)
    assert info.microns_per_pixel == pytest.approx(mpp, rel=0.01)
    # independent check of the pixel size: neighbouring ST spots are 200 µm apart
    step_px = np.polyfit(parts["array_col"], got[:, 0], 1)[0]
    assert step_px * info.microns_per_pixel == pytest.approx(ST_STEP_UM, rel=0.02)
    circles = sdata.shapes[_schema.spots_key(section)]
    np.testing.assert_allclose(circles["radius"], info.spot_diameter_px / 2)


def _patch_mean(img_cyx, xy, half: int) -> np.ndarray:
    x, y = np.rint(xy).astype(int)
    return np.asarray(img_cyx[:, y - half : y + half + 1, x - half : x + half + 1]).reshape(3, -1).mean(1)


@pytest.mark.parametrize(
    ("positions_file", "image"),
    [("tissue_positions.csv", "hires"), ("tissue_positions_list.csv", "lowres"), ("tissue_positions.csv", "fullres")],
)
def test_visium(tmp_path, c2, positions_file, image):
    out = tmp_path / "outs"
    written = write_visium(out, c2, positions_file=positions_file)
    kwargs = {"fullres_image_file": "fullres.tif"} if image == "fullres" else {}
    sdata = stemst.io.visium(out, image=image, spot_diameter_um=100.0, **kwargs)
    scale = 1.0 if image == "fullres" else written["scalefactors"][f"tissue_{image}_scalef"]
    _check_common(sdata, c2, "lib1", coords=_expected_coords(c2, scale), mpp=c2["mpp"] / scale)
    table = sdata.tables["table"]
    assert not table.obs[_schema.INSTANCE_KEY].str.startswith("BG").any()  # off-tissue spots dropped
    assert set(table.obs.columns) >= {"array_row", "array_col"}
    img = _schema.get_image(sdata, "lib1")
    expected_shape = c2["image"].shape if image == "fullres" else written[image].shape
    assert img.shape == (3, *expected_shape[:2])
    if image == "fullres":
        np.testing.assert_array_equal(
            np.asarray(img[:, 100:103, 200:203]), c2["image"][100:103, 200:203].transpose(2, 0, 1)
        )
    else:  # the kept image shows the same tissue under each spot as the full-resolution one
        full = c2["image"].transpose(2, 0, 1)
        xy = np.asarray(table.obsm["spatial"])
        for i in range(0, table.n_obs, 40):
            a = _patch_mean(img, xy[i], 2)
            b = _patch_mean(full, xy[i] / scale, round(2 / scale))
            assert np.abs(a - b).max() < 25


def test_visium_section_name_and_gene_ids(tmp_path, c2):
    out = tmp_path / "sampleA" / "outs"
    write_visium(out, c2)
    write_10x_h5(out / "filtered_feature_bc_matrix.h5", c2["counts"], c2["barcodes"], c2["genes"], library_id=None)
    sdata = stemst.io.visium(out, var_names="gene_ids", spot_diameter_um=100.0)
    assert _schema.sections(sdata.tables["table"]) == ["sampleA"]
    assert sdata.tables["table"].var_names[0].startswith("ENSG")
    named = stemst.io.visium(out, section="my_slide")
    assert "my_slide_he" in named.images
    # default Visium spot (55 µm): the pixel size follows from spot_diameter_fullres
    info = _schema.section_info(named.tables["table"], "my_slide")
    assert info.microns_per_pixel == pytest.approx(55.0 / (100.0 / c2["mpp"]) / info.extra["image_scale"])


def test_visium_spots_without_counts(tmp_path, c2):
    out = tmp_path / "outs"
    written = write_visium(out, c2)
    pos = written["positions"]
    pos.loc[pos["barcode"] == "BG0", "in_tissue"] = 1  # an in-tissue spot the matrix does not have
    pos.to_csv(out / "spatial" / "tissue_positions.csv", index=False)
    with pytest.raises(stemst.StemstDataError, match=r"1 in-tissue spots .* have no counts.*BG0"):
        stemst.io.visium(out)
    # counts without a position: spatialdata-io keeps them with NaN coordinates, stemst drops them with a warning
    pos.loc[pos["barcode"] == "BG0", "in_tissue"] = 0
    pos = pos[pos["barcode"] != c2["barcodes"][0]]
    pos.to_csv(out / "spatial" / "tissue_positions.csv", index=False)
    n = len(c2["barcodes"])
    with pytest.warns(stemst.StemstWarning, match=rf"1 of {n} barcodes with counts have no position.*dropped"):
        table = stemst.io.visium(out).tables["table"]
    assert table.n_obs == n - 1 and c2["barcodes"][0] not in set(table.obs[_schema.INSTANCE_KEY])
    pos.iloc[: n // 2].to_csv(out / "spatial" / "tissue_positions.csv", index=False)  # more than a few: refused
    with pytest.raises(stemst.StemstDataError, match=rf"of the {n} barcodes with counts have no position.*complete"):
        stemst.io.visium(out)


def test_visium_missing_files(tmp_path, c2):
    out = tmp_path / "outs"
    write_visium(out, c2)
    (out / "spatial" / "tissue_hires_image.png").unlink()
    with pytest.raises(FileNotFoundError, match=r"tissue_hires_image\.png \(hires H&E image\)"):
        stemst.io.visium(out)
    assert stemst.io.visium(out, image="lowres").tables["table"].n_obs == len(c2["barcodes"])
    with pytest.raises(ValueError, match="needs `fullres_image_file`"):
        stemst.io.visium(out, image="fullres")
    (out / "spatial" / "tissue_positions.csv").unlink()
    with pytest.raises(FileNotFoundError, match="tissue_positions"):
        stemst.io.visium(out, image="lowres")


def write_visium_hd(root, parts: dict, *, bin_size: int, off_tissue: int = 3) -> dict:
    """A Visium HD Space Ranger ``outs`` folder holding the HER2ST spots as bins of ``bin_size`` µm."""
    spatial = root / "spatial"
    bins = root / "binned_outputs" / f"square_{bin_size:03d}um"
    (bins / "spatial").mkdir(parents=True)
    spatial.mkdir(parents=True)
    layout = {"hd_layout_json": json.dumps({"file_format": "1.0"})}
    with h5py.File(root / "feature_slice.h5", "w") as f:
        f.attrs["metadata_json"] = json.dumps(layout)
    write_10x_h5(bins / "filtered_feature_bc_matrix.h5", parts["counts"], parts["barcodes"], parts["genes"])
    hires, s_hi = _resize(parts["image"], HIRES_SIDE)
    lowres, s_lo = _resize(parts["image"], LOWRES_SIDE)
    Image.fromarray(hires).save(spatial / "tissue_hires_image.png")
    Image.fromarray(lowres).save(spatial / "tissue_lowres_image.png")
    import tifffile

    tifffile.imwrite(root / "fullres.tif", parts["image"], photometric="rgb", tile=(256, 256))
    bin_px = bin_size / parts["mpp"]
    scalefactors = {"tissue_hires_scalef": s_hi, "tissue_lowres_scalef": s_lo, "spot_diameter_fullres": bin_px}
    (spatial / "scalefactors_json.json").write_text(json.dumps(scalefactors))
    scalefactors |= {"bin_size_um": float(bin_size), "microns_per_pixel": parts["mpp"]}
    (bins / "spatial" / "scalefactors_json.json").write_text(json.dumps(scalefactors))
    xy = parts["coords"]
    n = len(parts["barcodes"])
    pd.DataFrame(
        {
            "barcode": parts["barcodes"] + [f"BG{i}" for i in range(off_tissue)],
            "in_tissue": np.r_[np.ones(n, np.int32), np.zeros(off_tissue, np.int32)],
            "array_row": np.r_[parts["array_row"], np.zeros(off_tissue, int)].astype(np.int32),
            "array_col": np.r_[parts["array_col"], np.arange(off_tissue)].astype(np.int32),
            "pxl_row_in_fullres": np.r_[xy[:, 1], np.full(off_tissue, 5.0)],
            "pxl_col_in_fullres": np.r_[xy[:, 0], 5.0 + 10 * np.arange(off_tissue)],
        }
    ).to_parquet(bins / "spatial" / "tissue_positions.parquet", index=False)
    return {"hires": hires, "scalefactors": scalefactors}


@pytest.mark.parametrize("image", ["hires", "lowres", "fullres"])
def test_visium_hd_bins_as_spots(tmp_path, c2, image):
    # the HER2ST spots (100 µm) stand in for bins of 100 µm: real pixels and counts in the Visium HD layout
    written = write_visium_hd(tmp_path / "hd" / "outs", c2, bin_size=100)
    kwargs = {"fullres_image_file": "fullres.tif"} if image == "fullres" else {}
    with warnings.catch_warnings():
        warnings.simplefilter("error", stemst.StemstWarning)
        sdata = stemst.io.visium_hd(tmp_path / "hd" / "outs", bin_size=100, image=image, **kwargs)
    scale = 1.0 if image == "fullres" else written["scalefactors"][f"tissue_{image}_scalef"]
    _check_common(sdata, c2, "hd", coords=c2["coords"] * scale, mpp=c2["mpp"] / scale)
    info = _schema.section_info(sdata.tables["table"], "hd")
    assert info.spot_diameter_um == 100.0 and info.extra["bin_size_um"] == 100
    assert info.extra["platform"] == "10x Visium HD"
    assert not sdata.tables["table"].obs[_schema.INSTANCE_KEY].str.startswith("BG").any()
    if image != "lowres":  # the kept image is the file's pixels
        img = np.asarray(_schema.get_image(sdata, "hd"))
        expected = c2["image"] if image == "fullres" else written["hires"]
        np.testing.assert_array_equal(img, expected.transpose(2, 0, 1))


def test_visium_hd_conversion_of_what_spatialdata_io_returns(tmp_path, c2):
    """spatialdata-io's default output (square bins) gives the same spots as the reader's (circles)."""
    import spatialdata_io

    from stemst.io._utils import build
    from stemst.io._visium_hd import spots_from_bins

    root = tmp_path / "outs"
    write_visium_hd(root, c2, bin_size=100)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        raw = spatialdata_io.visium_hd(root, dataset_id="slide", bin_size=100, load_segmentations_only=False)
    assert "slide_square_100um" in raw.shapes and "radius" not in raw.shapes["slide_square_100um"].columns
    sdata = build(**spots_from_bins(raw, bin_size=100, section="S1"))
    stemst.io.validate(sdata)
    ref = stemst.io.visium_hd(root, bin_size=100, section="S1")
    a, b = sdata.tables["table"], ref.tables["table"]
    assert list(a.obs_names) == list(b.obs_names) and (a.X != b.X).nnz == 0
    np.testing.assert_allclose(a.obsm["spatial"], b.obsm["spatial"])
    assert a.uns["stemst"]["sections"]["S1"]["microns_per_pixel"] == pytest.approx(
        b.uns["stemst"]["sections"]["S1"]["microns_per_pixel"]
    )
    with pytest.raises(stemst.StemstDataError, match=r"No table 'square_016um'.*\['square_100um'\]"):
        spots_from_bins(raw, bin_size=16, section="S1")
    with pytest.raises(FileNotFoundError, match=r"No bins of 16 µm.*\['square_100um'\]"):
        stemst.io.visium_hd(root)


def write_hest(root, parts: dict, sample_id: str, *, meta: dict | None = None) -> None:
    """HEST-1k layout: pyramidal tif, h5ad with obsm['spatial'] in full-res pixels, metadata json."""
    import tifffile

    for d in ("wsis", "st", "metadata"):
        (root / d).mkdir(parents=True, exist_ok=True)
    full = parts["image"]
    with tifffile.TiffWriter(root / "wsis" / f"{sample_id}.tif", bigtiff=False) as tw:
        tw.write(full, photometric="rgb", tile=(256, 256), subifds=1, compression="zlib")
        tw.write(full[::2, ::2], photometric="rgb", tile=(256, 256), subfiletype=1, compression="zlib")
    obs = pd.DataFrame(
        {"array_row": parts["array_row"], "array_col": parts["array_col"], "in_tissue": 1},
        index=pd.Index(parts["barcodes"]),
    )
    adata = ad.AnnData(X=parts["counts"].astype(np.float32), obs=obs, var=pd.DataFrame(index=parts["genes"]))
    adata.obsm["spatial"] = parts["coords"]
    adata.write_h5ad(root / "st" / f"{sample_id}.h5ad")
    if meta is None:
        meta = {
            "pixel_size_um_embedded": None,
            "pixel_size_um_estimated": parts["mpp"],
            "fullres_px_width": full.shape[1],
            "fullres_px_height": full.shape[0],
            "spot_diameter": 100.0,
            "inter_spot_dist": 200.0,
            "st_technology": "Spatial Transcriptomics",
        }
    (root / "metadata" / f"{sample_id}.json").write_text(json.dumps(meta))


def test_hest(tmp_path, c6):
    import dask.array as da

    write_hest(tmp_path, c6, "HER2C6")
    sdata = stemst.io.hest(tmp_path, "HER2C6")
    _check_common(sdata, c6, "HER2C6", coords=c6["coords"], mpp=c6["mpp"])
    img = _schema.get_image(sdata, "HER2C6")
    assert isinstance(img, da.Array) and img.shape == (3, *c6["image"].shape[:2])
    np.testing.assert_array_equal(
        np.asarray(img[:, 300:304, 500:504]), c6["image"][300:304, 500:504].transpose(2, 0, 1)
    )
    # pyramid level 1: half the pixels, twice the pixel size, coordinates follow
    half = stemst.io.hest(tmp_path, "HER2C6", level=1, section="c6_low")
    sy, sx = (np.array(c6["image"].shape[:2]) + 1) // 2 / np.array(c6["image"].shape[:2])
    _check_common(half, c6, "c6_low", coords=c6["coords"] * [sx, sy], mpp=c6["mpp"] / sx)


def test_hest_metadata_keys(tmp_path, c6):
    meta = {"pixel_size_um_embedded": c6["mpp"], "st_technology": "Spatial Transcriptomics"}
    write_hest(tmp_path, c6, "S1", meta=meta)
    info = _schema.section_info(stemst.io.hest(tmp_path, "S1").tables["table"], "S1")
    assert info.microns_per_pixel == pytest.approx(c6["mpp"]) and info.spot_diameter_um == 100.0
    (tmp_path / "metadata" / "S1.json").write_text(json.dumps({"st_technology": "Xenium"}))
    with pytest.raises(stemst.StemstDataError, match="pixel_size_um_estimated.*microns_per_pixel="):
        stemst.io.hest(tmp_path, "S1")
    with pytest.raises(stemst.StemstDataError, match="spot_diameter_um="):
        stemst.io.hest(tmp_path, "S1", microns_per_pixel=c6["mpp"])
    sdata = stemst.io.hest(tmp_path, "S1", microns_per_pixel=c6["mpp"], spot_diameter_um=100.0)
    assert _schema.section_info(sdata.tables["table"], "S1").spot_diameter_px == pytest.approx(100 / c6["mpp"])


def test_hest_missing_files(tmp_path, c6):
    write_hest(tmp_path, c6, "S1")
    (tmp_path / "st" / "S1.h5ad").unlink()
    (tmp_path / "metadata" / "S1.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"S1\.h5ad \(spots x genes.*S1\.json \(sample metadata\)"):
        stemst.io.hest(tmp_path, "S1")


def _scanpy_adata(parts: dict) -> tuple[ad.AnnData, dict]:
    hires, s_hi = _resize(parts["image"], HIRES_SIDE)
    lowres, s_lo = _resize(parts["image"], LOWRES_SIDE)
    obs = pd.DataFrame({"array_row": parts["array_row"], "array_col": parts["array_col"]}, index=parts["barcodes"])
    adata = ad.AnnData(X=parts["counts"].astype(np.float32), obs=obs, var=pd.DataFrame(index=parts["genes"]))
    adata.obsm["spatial"] = np.rint(parts["coords"]).astype(np.int64)
    adata.uns["spatial"] = {
        "V1_C2": {
            # scanpy.read_visium stores the png as floats in [0, 1] (matplotlib's imread)
            "images": {"hires": hires.astype(np.float32) / 255, "lowres": lowres},
            "scalefactors": {
                "tissue_hires_scalef": s_hi,
                "tissue_lowres_scalef": s_lo,
                "spot_diameter_fullres": 100.0 / parts["mpp"],
            },
        }
    }
    return adata, {"hires": (hires, s_hi), "lowres": (lowres, s_lo)}


@pytest.mark.parametrize("image", ["hires", "lowres"])
def test_from_anndata(c2, image):
    adata, imgs = _scanpy_adata(c2)
    before = adata.copy()
    sdata = stemst.io.from_anndata(adata, image=image, spot_diameter_um=100.0)
    pixels, scale = imgs[image]
    _check_common(sdata, c2, "V1_C2", coords=_expected_coords(c2, scale), mpp=c2["mpp"] / scale)
    np.testing.assert_array_equal(np.asarray(_schema.get_image(sdata, "V1_C2")), pixels.transpose(2, 0, 1))
    assert adata.uns["spatial"].keys() == before.uns["spatial"].keys() and (adata.X != before.X).nnz == 0
    # a pixel size given by the user wins over the one derived from the spot diameter
    given = stemst.io.from_anndata(adata, image=image, spot_diameter_um=100.0, microns_per_pixel=1.0, section="x")
    assert _schema.section_info(given.tables["table"], "x").microns_per_pixel == pytest.approx(1.0 / scale)


def test_from_anndata_bad_keys(c2):
    adata, _ = _scanpy_adata(c2)
    with pytest.raises(KeyError, match=r"No image 'fullres'.*\['hires', 'lowres'\]"):
        stemst.io.from_anndata(adata, image="fullres")
    with pytest.raises(KeyError, match=r"libraries: \['V1_C2'\]"):
        stemst.io.from_anndata(adata, library_id="other")
    del adata.uns["spatial"]["V1_C2"]["scalefactors"]["spot_diameter_fullres"]
    with pytest.raises(stemst.StemstDataError, match="microns_per_pixel="):
        stemst.io.from_anndata(adata)
    with pytest.raises(KeyError, match="layers present"):
        stemst.io.from_anndata(adata, layer="counts", microns_per_pixel=1.0)


def test_zarr_pair_validates(tmp_path, c2):
    adata, _ = _scanpy_adata(c2)
    sdata = stemst.io.from_anndata(adata, spot_diameter_um=100.0)
    stemst.io.write_zarr(sdata, tmp_path / "a.zarr")
    back = stemst.io.read_zarr(tmp_path / "a.zarr")
    assert (back.tables["table"].X != sdata.tables["table"].X).nnz == 0
    sdata.tables["table"].obsm["spatial"][0] = [1e6, 1e6]  # now the table disagrees with the circles and the image
    with pytest.raises(stemst.StemstDataError, match="outside the .* image.*\n- .*circle centres differ"):
        stemst.io.write_zarr(sdata, tmp_path / "b.zarr")
    assert not (tmp_path / "b.zarr").exists()
    with pytest.raises(FileNotFoundError, match=r"b\.zarr"):
        stemst.io.read_zarr(tmp_path / "b.zarr")


def test_concatenate_sections(her2st_small, data_dir):
    import stemst

    a1 = stemst.datasets.her2st(["A1"], cache_dir=data_dir)
    both = stemst.io.concatenate([her2st_small, a1])
    table = both.tables["table"]
    assert table.obs["section"].value_counts().to_dict() == {"C2": 187, "C6": 178, "A1": 346}
    stemst.io.validate(both)
    # counts of a gene are carried over exactly, per section
    for src in (her2st_small, a1):
        t = src.tables["table"]
        assert np.array_equal(table[t.obs_names, "ERBB2"].X.toarray(), t[:, "ERBB2"].X.toarray())
    assert (
        table.uns["stemst"]["sections"]["A1"]["microns_per_pixel"]
        == a1.tables["table"].uns["stemst"]["sections"]["A1"]["microns_per_pixel"]
    )
    with pytest.raises(stemst.StemstDataError, match="more than one"):
        stemst.io.concatenate([her2st_small, her2st_small])
