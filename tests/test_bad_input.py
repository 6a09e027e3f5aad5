"""Bad input gets a stemst error or warning that names the file or key and what to check (issue 10), on real data.

The inputs are HER2ST section C2 (shrunk 8x) written as a Space Ranger folder, then altered or corrupted. Every
failing call must leave the object it was given as it was.
"""

from __future__ import annotations

import copy
import gc
import json
import shutil
import struct
import warnings
import zlib

import h5py
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch
from PIL import Image

import stemst
from stemst import _schema
from stemst._errors import StemstDataError, StemstDownloadError, StemstError, StemstFileError, StemstWarning
from stemst.datasets import _her2st
from stemst.pp._encoders import ColorStats, Encoder

DOWN = 8


@pytest.fixture(scope="module")
def c2(her2st_small) -> dict:
    """Section C2: image shrunk DOWN x (real pixels), counts of the 60 most expressed genes, spot centres."""
    table = her2st_small.tables["table"]
    sub = table[_schema.section_mask(table, "C2")]
    img = np.asarray(_schema.get_image(her2st_small, "C2")).transpose(1, 2, 0)
    small = np.asarray(Image.fromarray(img).resize((img.shape[1] // DOWN, img.shape[0] // DOWN), Image.BOX))
    top = np.argsort(-np.asarray(sub.X.sum(0)).ravel())[:60]
    return {
        "image": small,
        "counts": sp.csr_matrix(sub.X[:, top]),
        "genes": list(sub.var_names[top]),
        "barcodes": sub.obs["spot_id"].astype(str).tolist(),
        "xy": np.asarray(sub.obsm["spatial"]),  # full-resolution pixels
        "mpp": _schema.section_info(table, "C2").microns_per_pixel,
    }


def write_visium(root, c2: dict, *, image=None, scalef: float = 1 / DOWN, swap_xy: bool = False):
    """A Space Ranger folder holding C2: counts h5, positions csv, scale factors json, hires png."""
    spatial = root / "spatial"
    spatial.mkdir(parents=True)
    counts = c2["counts"]
    with h5py.File(root / "filtered_feature_bc_matrix.h5", "w") as f:
        m = f.create_group("matrix")
        m.create_dataset("data", data=counts.data.astype(np.int32))
        m.create_dataset("indices", data=counts.indices.astype(np.int64))
        m.create_dataset("indptr", data=counts.indptr.astype(np.int64))
        m.create_dataset("shape", data=np.array([counts.shape[1], counts.shape[0]], dtype=np.int32))
        m.create_dataset("barcodes", data=np.array([b.encode() for b in c2["barcodes"]]))
        feats = m.create_group("features")
        feats.create_dataset("name", data=np.array([g.encode() for g in c2["genes"]]))
        feats.create_dataset("id", data=np.array([f"ENSG{i:011d}".encode() for i in range(len(c2["genes"]))]))
        feats.create_dataset("feature_type", data=np.array([b"Gene Expression"] * len(c2["genes"])))
        feats.create_dataset("genome", data=np.array([b"GRCh38"] * len(c2["genes"])))
        feats.create_dataset("_all_tag_keys", data=np.array([b"genome"]))
    x, y = np.rint(c2["xy"]).astype(int).T
    if swap_xy:
        x, y = y, x
    pd.DataFrame(
        {"barcode": c2["barcodes"], "in_tissue": 1, "array_row": 0, "array_col": 0, "pxl_row_in_fullres": y}
        | {"pxl_col_in_fullres": x}
    ).to_csv(spatial / "tissue_positions.csv", index=False)
    sf = {"tissue_hires_scalef": scalef, "tissue_lowres_scalef": scalef / 4, "spot_diameter_fullres": 100 / c2["mpp"]}
    (spatial / "scalefactors_json.json").write_text(json.dumps(sf))
    image = c2["image"] if image is None else image
    if isinstance(image, bytes):
        (spatial / "tissue_hires_image.png").write_bytes(image)
    else:
        (image if isinstance(image, Image.Image) else Image.fromarray(image)).save(spatial / "tissue_hires_image.png")
    return root


def png16(rgb16: np.ndarray) -> bytes:
    """A 16-bit RGB PNG (Pillow cannot write one)."""
    h, w, _ = rgb16.shape

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    rows = b"".join(b"\0" + row.astype(">u2").tobytes() for row in rgb16)
    header = struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b"")


def image_of(sdata) -> np.ndarray:
    return np.asarray(_schema.get_image(sdata, "C2")).transpose(1, 2, 0)


def snapshot(sdata) -> dict:
    """What a failing call must not change."""
    t = sdata.tables["table"]
    return {
        "tables": list(sdata.tables),
        "images": list(sdata.images),
        "shapes": list(sdata.shapes),
        "obs": list(t.obs.columns),
        "obsm": {k: np.asarray(v).copy() for k, v in t.obsm.items()},
        "uns": copy.deepcopy(t.uns.get("stemst")),
        "X": t.X.copy(),
    }


def assert_unchanged(sdata, before: dict) -> None:
    after = snapshot(sdata)
    assert {k: after[k] for k in ("tables", "images", "shapes", "obs")} == {
        k: before[k] for k in ("tables", "images", "shapes", "obs")
    }
    assert after["obsm"].keys() == before["obsm"].keys()
    assert all(np.array_equal(after["obsm"][k], v, equal_nan=True) for k, v in before["obsm"].items())
    assert after["uns"] == before["uns"]
    assert (after["X"] != before["X"]).nnz == 0


@pytest.fixture(scope="module")
def c2_sdata(c2, tmp_path_factory):
    return stemst.io.visium(write_visium(tmp_path_factory.mktemp("v") / "outs", c2), section="C2")


# ------------------------------------------------------------------------------------------------------------------
# item 2: every bit depth and mode, blank images, spots off the tissue, constant or NaN embeddings


def test_png_bit_depths_and_modes_read_as_the_8bit_rgb_image(tmp_path, c2, c2_sdata):
    rgb = c2["image"]
    ref = image_of(c2_sdata)
    rgb16 = rgb.astype(np.uint16) * 257
    alpha = np.dstack([rgb, np.full(rgb.shape[:2], 255, np.uint8)])
    cases = {
        "rgb16": png16(rgb16),
        "rgba": Image.fromarray(alpha, "RGBA"),
        "palette": Image.fromarray(rgb).quantize(256),
    }
    for name, image in cases.items():
        got = image_of(stemst.io.visium(write_visium(tmp_path / name, c2, image=image), section="C2"))
        tol = 12 if name == "palette" else 0
        assert got.shape == ref.shape and np.abs(got.astype(int) - ref).mean() <= tol, name
    grey16 = (rgb.mean(-1) * 257).astype(np.uint16)
    root = write_visium(tmp_path / "g16", c2, image=Image.fromarray(grey16))
    # spatialdata-io, which reads the Visium folder, cannot read a greyscale PNG: refused naming the file
    with pytest.raises(StemstFileError, match=r"tissue_hires_image\.png: is a greyscale image.*save it as RGB"):
        stemst.io.visium(root, section="C2")
    with warnings.catch_warnings(record=True) as caught:  # stemst's own image reader takes it, as grey RGB
        warnings.simplefilter("always")
        got, _ = stemst.io._image.read_image(root / "spatial" / "tissue_hires_image.png")
    assert len(caught) == 1 and "is a greyscale image" in str(caught[0].message)
    assert np.array_equal(got[..., 0], got[..., 2]) and abs(got.mean() - rgb.mean()) < 1  # not all white


def test_16bit_and_greyscale_tiffs_read_as_8bit_rgb(tmp_path, c2):
    import tifffile

    rgb = c2["image"]
    tifffile.imwrite(tmp_path / "rgb16.tif", rgb.astype(np.uint16) * 257, photometric="rgb", tile=(128, 128))
    got, full = stemst.io._image.read_image(tmp_path / "rgb16.tif")
    assert full == rgb.shape[:2] and np.array_equal(np.asarray(got), rgb)
    tifffile.imwrite(tmp_path / "grey.tif", rgb[..., 1], photometric="minisblack")
    with pytest.warns(StemstWarning, match="grey.tif is a greyscale image"):
        got, _ = stemst.io._image.read_image(tmp_path / "grey.tif")
    assert np.array_equal(np.asarray(got), np.repeat(rgb[..., 1:2], 3, axis=-1))


def test_blank_image_is_refused_naming_the_file(tmp_path, c2):
    root = write_visium(tmp_path / "outs", c2, image=np.full_like(c2["image"], 255))
    with pytest.raises(StemstDataError, match=r"tissue_hires_image\.png.* blank"):
        stemst.io.visium(root, section="C2")


@pytest.mark.parametrize(
    ("change", "cause"), [({"scalef": 1 / DOWN / 2}, "x2"), ({"swap_xy": True}, "x and y swapped")]
)
def test_spots_off_tissue_warn_with_the_likely_cause(tmp_path, c2, change, cause):
    root = write_visium(tmp_path / "outs", c2, **change)
    with pytest.warns(StemstWarning, match=rf"sit on tissue\..*{cause}.*scale factor.*coordinate order"):
        stemst.io.visium(root, section="C2")


def test_correct_data_gives_no_warning(tmp_path, c2):
    with warnings.catch_warnings():
        warnings.simplefilter("error", StemstWarning)
        stemst.io.visium(write_visium(tmp_path / "outs", c2), section="C2")


def test_blank_image_refused_at_embed_patches(c2_sdata):
    table = c2_sdata.tables["table"]
    info = _schema.section_info(table, "C2")
    blank = _schema.assemble(
        [
            _schema.make_section(
                "C2",
                image=np.full_like(image_of(c2_sdata), 240),
                counts=table.X,
                genes=table.var_names,
                spot_ids=table.obs["spot_id"],
                coords=table.obsm["spatial"],
                microns_per_pixel=info.microns_per_pixel,
                spot_diameter_um=info.spot_diameter_um,
            )
        ]
    )
    before = snapshot(blank)
    with pytest.raises(StemstDataError, match="blank"):
        stemst.pp.embed_patches(blank, encoder="color_stats", augment=False, progress=False)
    assert_unchanged(blank, before)


@pytest.mark.parametrize(("output", "match"), [(0.0, "same embedding"), (np.nan, "NaN")])
def test_constant_or_nan_embeddings_refused(c2_sdata, output, match):
    enc = Encoder("broken", build=lambda: lambda x: torch.full((len(x), 4), output), input_size=16)
    before = snapshot(c2_sdata)
    with pytest.raises(StemstDataError, match=match):
        stemst.pp.embed_patches(c2_sdata, encoder=enc, augment=False, progress=False)
    assert_unchanged(c2_sdata, before)


# ------------------------------------------------------------------------------------------------------------------
# items 4 and 7: patch size bounded by the image, heavy upsampling warned


def test_patch_size_bounded_by_the_image(c2_sdata):
    before = snapshot(c2_sdata)
    with pytest.raises(StemstDataError, match=r"patch_size_um=100000 is larger than the whole image"):
        stemst.pp.embed_patches(c2_sdata, encoder="color_stats", patch_size_um=1e5, progress=False)
    assert_unchanged(c2_sdata, before)


def test_large_upsampling_warns(c2_sdata):
    enc = Encoder("cs224", ColorStats, input_size=224, mean=(0.0,) * 3, std=(1.0,) * 3)
    try:
        with pytest.warns(StemstWarning, match=r"enlarged \d+\.\dx"):
            stemst.pp.embed_patches(c2_sdata, encoder=enc, augment=False, progress=False, key_added="X_tmp")
    finally:  # the module's shared SpatialData stays as it was, whatever happened
        c2_sdata.tables["table"].obsm.pop("X_tmp", None)


# ------------------------------------------------------------------------------------------------------------------
# item 6: unreadable files, hub encoders and dataset files without network


@pytest.mark.parametrize(
    "name",
    ["spatial/tissue_hires_image.png", "filtered_feature_bc_matrix.h5", "spatial/scalefactors_json.json"]
    + ["spatial/tissue_positions.csv"],
)
def test_truncated_files_give_a_stemst_error_naming_the_file(tmp_path, c2, name):
    root = write_visium(tmp_path / "outs", c2)
    data = (root / name).read_bytes()
    for offset in np.random.default_rng(len(name)).integers(0, int(len(data) * 0.95), size=3):
        (root / name).write_bytes(data[:offset])
        with pytest.raises(StemstError, match=name.split("/")[-1].replace(".", r"\.")):
            stemst.io.visium(root, section="C2")


def test_truncated_tiff_and_corrupt_checkpoint(tmp_path, c2):
    import tifffile

    tif = tmp_path / "full.tif"
    tifffile.imwrite(tif, c2["image"], photometric="rgb", tile=(128, 128))
    data = tif.read_bytes()
    for offset in np.random.default_rng(1).integers(0, len(data) - 1, size=3):
        tif.write_bytes(data[:offset])
        with pytest.raises(StemstFileError, match="full.tif"):
            stemst.io._image.read_image(tif)
    ckpt = tmp_path / "enc.pt"
    torch.save({"arch": "resnet18", "state_dict": {}}, ckpt)
    ckpt.write_bytes(ckpt.read_bytes()[:100])
    with pytest.raises(StemstFileError, match="enc.pt"):
        stemst.pp._encoders.resolve_encoder(str(ckpt))


def test_folder_that_is_not_a_zarr_store(tmp_path):
    (tmp_path / "notes.txt").write_text("not zarr")
    with pytest.raises(StemstFileError, match="not a zarr store"):
        stemst.io.read_zarr(tmp_path)


def test_hub_encoder_offline_fails_fast_naming_it(c2_sdata, monkeypatch, tmp_path):
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path))
    before = snapshot(c2_sdata)
    with (
        pytest.raises(StemstDownloadError, match=r"'uni'.*MahmoodLab/uni.*HF_HUB_OFFLINE.*checkpoint="),
        pytest.warns(StemstWarning, match="enlarged"),  # UNI wants 0.5 µm/px; this image is 3 µm/px
    ):
        stemst.pp.embed_patches(c2_sdata, encoder="uni", progress=False)
    assert_unchanged(c2_sdata, before)


def test_dataset_without_network_or_with_a_corrupt_cache(tmp_path, data_dir, monkeypatch):
    monkeypatch.setattr(_her2st, "HER2ST_URL", "http://127.0.0.1:9/")  # nothing listens: refused at once
    with pytest.raises(StemstDownloadError, match=r"ST-cnts/C2\.tsv\.gz.*STEMST_DATA_DIR"):
        stemst.datasets.her2st("C2", cache_dir=tmp_path)
    rel = "her2st/data/ST-cnts/C2.tsv.gz"
    (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(data_dir / rel, tmp_path / rel)
    with open(tmp_path / rel, "r+b") as f:
        f.seek(100)
        f.write(b"corrupt")
    with pytest.raises(StemstFileError, match=r"C2\.tsv\.gz.*SHA-256.*Delete it"):
        stemst.datasets.her2st("C2", cache_dir=tmp_path)


# ------------------------------------------------------------------------------------------------------------------
# item 9: no alarming noise; helpers for the tl layer (item 1)


def test_no_autosharding_warnings_and_no_unclosed_files(tmp_path, c2):
    root = write_visium(tmp_path / "outs", c2)
    gc.collect()  # earlier tests' lazy TIFF readers
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        sdata = stemst.io.visium(root, section="C2")
        gc.collect()
        stemst.io.write_zarr(sdata, tmp_path / "c2.zarr")
    noise = [str(w.message) for w in caught if w.category in (ResourceWarning, UserWarning)]
    assert noise == []
    assert stemst.io.read_zarr(tmp_path / "c2.zarr").tables["table"].n_obs == sdata.tables["table"].n_obs


def test_check_table_key_free(c2_sdata):
    with pytest.raises(StemstDataError, match="destroy the raw counts"):
        _schema.check_table_key_free(c2_sdata, "table", overwrite=True)
    c2_sdata.tables["pred"] = c2_sdata.tables["table"][:2].copy()
    try:
        with pytest.raises(StemstDataError, match="overwrite=True"):
            _schema.check_table_key_free(c2_sdata, "pred")
        _schema.check_table_key_free(c2_sdata, "pred", overwrite=True)
        _schema.check_table_key_free(c2_sdata, "new")
    finally:  # the module's shared SpatialData stays as it was, whatever happened
        del c2_sdata.tables["pred"]
