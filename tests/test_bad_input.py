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

import anndata as ad
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


# ------------------------------------------------------------------------------------------------------------------
# issue 23, silently wrong: counts that are not raw counts, a diverging fit, panel sizes


@pytest.fixture(scope="module")
def two_sections(her2st_small) -> ad.AnnData:
    """C2 and C6 (the 3000 most expressed genes), with random 8-d embeddings obsm['X_rand'] and a 20-gene panel: a cheap model input."""
    full = her2st_small.tables["table"]
    table = full[:, np.argsort(-np.asarray(full.X.sum(0)).ravel())[:3000]].copy()
    table.obsm["X_rand"] = np.random.default_rng(0).normal(size=(table.n_obs, 8)).astype(np.float32)
    top = np.argsort(-np.asarray(table.X.sum(0)).ravel())[:20]
    table.var[_schema.PANEL_KEY] = np.isin(np.arange(table.n_vars), top)
    return table


def _spoil(table: ad.AnnData, how: str) -> ad.AnnData:
    """A copy of ``table`` whose X is normalised + log1p, or has NaN / inf / negative values in 3 C6 spots."""
    import scanpy as sc

    bad = table.copy()
    if how == "log1p":
        sc.pp.normalize_total(bad)
        sc.pp.log1p(bad)
        return bad
    x = bad.X.astype(np.float64).tolil()
    rows = np.flatnonzero(bad.obs["section"].to_numpy() == "C6")[:3]
    cols = np.flatnonzero(bad.var[_schema.PANEL_KEY].to_numpy())[:1]
    x[rows, cols[0]] = {"nan": np.nan, "inf": np.inf, "negative": -2.0}[how]
    bad.X = x.tocsr()
    return bad


@pytest.mark.parametrize(
    ("how", "problem"),
    [("log1p", "non-integer"), ("nan", "NaN or infinite"), ("inf", "NaN or infinite"), ("negative", "negative")],
)
def test_counts_that_are_not_raw_are_refused_by_select_genes_and_fit(two_sections, how, problem):
    bad = _spoil(two_sections, how)
    n_spots = r"\d+" if how == "log1p" else 3
    where = r"\['C2', 'C6'\]" if how == "log1p" else r"\['C6'\]"
    match = rf"X.* holds {problem} values .* in {n_spots} of \d+ spots \(sections {where}\).*raw .*counts.*layer="
    with pytest.raises(StemstDataError, match=match):
        stemst.pp.select_genes(bad, train_sections=["C2", "C6"], n_genes=20, inplace=False)
    with pytest.raises(StemstDataError, match=match):
        stemst.tl.fit(bad, embedding_key="X_rand", validation=None, steps=2, progress=False)
    with pytest.raises(StemstDataError, match=match):  # the baselines and evaluation read the same targets
        stemst.tl.fit_baseline(bad, method="ridge", embedding_key="X_rand")


def test_diverging_fit_stops_naming_lr(two_sections):
    with pytest.raises(FloatingPointError, match=r"loss exploded from .* at step \d+: training diverged.*lr=1e\+06"):
        stemst.tl.fit(
            two_sections,
            embedding_key="X_rand",
            validation=None,
            diffusion={"head_pcs": None},
            training={"lr": 1e6},
            steps=50,
            progress=False,
        )


@pytest.mark.parametrize("n_genes", [0, -5, 2.5])
def test_select_genes_refuses_a_panel_size_below_one(two_sections, n_genes):
    for method in ("hmhvg", "hvg"):
        with pytest.raises(ValueError, match=rf"n_genes must be a whole number >= 1, got {n_genes}"):
            stemst.pp.select_genes(two_sections, train_sections=["C2"], method=method, n_genes=n_genes, inplace=False)


def test_select_genes_warns_when_the_panel_size_is_capped(two_sections):
    with pytest.warns(StemstWarning, match=r"n_genes=5000 exceeds the (\d+) candidate genes.*raise n_top_hvg"):
        panel = stemst.pp.select_genes(two_sections, train_sections=["C2"], n_genes=5000, n_top_hvg=300, inplace=False)
    assert 0 < len(panel) <= 300


# ------------------------------------------------------------------------------------------------------------------
# issue 23: images whose 16 bits hold fewer, a blank hires image, a counts file without genes


@pytest.mark.parametrize("bits", [8, 12])
def test_16bit_image_holding_fewer_bits_reads_as_the_image_with_a_warning(tmp_path, c2, c2_sdata, bits):
    import tifffile

    rgb = c2["image"]
    fewer = np.rint(rgb.astype(np.float64) * (2**bits - 1) / 255).astype(np.uint16)
    root = write_visium(tmp_path / "outs", c2, image=png16(fewer))
    with pytest.warns(StemstWarning, match=rf"16-bit image whose values use {bits} bits.*0-{2**bits - 1} scaled"):
        got = image_of(stemst.io.visium(root, section="C2"))
    assert np.abs(got.astype(int) - image_of(c2_sdata)).max() <= 1  # not nearly black, not "blank"
    tifffile.imwrite(tmp_path / "fewer.tif", fewer, photometric="rgb", tile=(128, 128))
    with pytest.warns(StemstWarning, match=rf"fewer\.tif is a 16-bit image whose values use {bits} bits"):
        lazy, _ = stemst.io._image.read_image(tmp_path / "fewer.tif")
    assert np.abs(np.asarray(lazy).astype(int) - rgb).max() <= 1


def test_blank_hires_image_suggests_the_other_images(tmp_path, c2):
    root = write_visium(tmp_path / "outs", c2, image=np.full_like(c2["image"], 250))
    with pytest.raises(StemstDataError, match=r"tissue_hires_image\.png.* blank.*image='lowres'"):
        stemst.io.visium(root, section="C2")


def test_visium_counts_file_without_genes_is_refused_naming_it(tmp_path, c2):
    empty = {**c2, "counts": sp.csr_matrix((len(c2["barcodes"]), 0), dtype=np.int32), "genes": []}
    root = write_visium(tmp_path / "outs", empty)
    with pytest.raises(StemstFileError, match=r"filtered_feature_bc_matrix\.h5: holds no genes \(\d+ barcodes x 0"):
        stemst.io.visium(root, section="C2")


# ------------------------------------------------------------------------------------------------------------------
# issue 23: unbounded predictions, devices this machine lacks, saved files that do not fit, too few spots


@pytest.fixture(scope="module")
def tiny_model(two_sections):
    """A 3-step MLP on the random embeddings: enough to exercise the checks around a model."""
    model = stemst.tl.fit(
        two_sections,
        embedding_key="X_rand",
        validation=None,
        diffusion={"head_pcs": None},
        steps=3,
        network={"width": 16, "depth": 1},
        progress=False,
    )
    model.encoder = {"encoder": "color_stats", "patch_size_um": 100.0}
    return model


def test_predict_refuses_samples_beyond_max_memory_and_warns_above_the_lower_limit(
    two_sections, tiny_model, monkeypatch
):
    with pytest.raises(
        StemstDataError,
        match=r"365 spots x 1,000,000 samples x 20 genes would hold about 116\.8 GB of samples, more than max_memory_gb=16",
    ):
        stemst.tl.predict(tiny_model, two_sections, n_samples=10**6, progress=False)
    with pytest.raises(ValueError, match=r"n_samples must be a whole number >= 1, got 0"):
        stemst.tl.predict(tiny_model, two_sections, n_samples=0, progress=False)
    monkeypatch.setattr(stemst.tl._predict, "WARN_MEMORY_GB", 1e-4)
    with pytest.warns(StemstWarning, match=r"365 spots x 2 samples x 20 genes holds about 0\.0 GB"):
        out = stemst.tl.predict(tiny_model, two_sections, n_samples=2, steps=2, progress=False)
    assert out.obsm["samples"].shape == (two_sections.n_obs, 2, 20)


@pytest.mark.parametrize(
    ("spacing", "error"),
    [
        (
            2.0,
            r"spacing_um=2 lays about [\d,]+ grid spots over the tissue of section 'C2', more than max_spots=250,000.*"
            r"about \d+ µm gives 250,000.*raise max_spots",
        ),
        (float("nan"), r"spacing_um must be a positive number.*nan"),
        (-100.0, r"spacing_um must be a positive number.*-100"),
    ],
)
def test_predict_image_refuses_a_grid_too_fine_or_a_bad_spacing(
    her2st_small, sdata_copy, tiny_model, spacing, error, monkeypatch
):
    sdata = sdata_copy(her2st_small)
    before = snapshot(sdata)
    monkeypatch.setattr(stemst.pp, "embed_patches", None)  # refused before anything is embedded
    with pytest.raises(ValueError, match=error):
        stemst.tl.predict_image(tiny_model, sdata, "C2", spacing_um=spacing, progress=False)
    assert_unchanged(sdata, before)


def test_a_cuda_device_without_a_gpu_is_named_everywhere(two_sections, tiny_model, c2_sdata, tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    match = r"device='cuda', but torch finds no CUDA GPU here.*device='cpu'"
    with pytest.raises(ValueError, match=match):
        stemst.tl.fit(two_sections, embedding_key="X_rand", device="cuda", progress=False)
    with pytest.raises(ValueError, match=match):
        stemst.pp.embed_patches(c2_sdata, encoder="color_stats", device="cuda", progress=False)
    saved = tiny_model.save(tmp_path / "m")
    with pytest.raises(ValueError, match=match):
        stemst.tl.StemstModel.load(saved, device="cuda")
    with pytest.raises(ValueError, match=r"device='gpu' is not a device: use 'auto', 'cpu', 'cuda'"):
        stemst.tl.StemstModel.load(saved, device="gpu")
    assert "X_color_stats" not in c2_sdata.tables["table"].obsm
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(ValueError, match=r"device='cuda:3', but this machine has 1 CUDA GPU\(s\): cuda:0 to cuda:0"):
        stemst.tl.StemstModel.load(saved, device="cuda:3")


def test_checkpoint_lacking_keys_is_named(two_sections, tmp_path):
    torch.save({"module": {}, "step": 3}, tmp_path / "checkpoint.pt")
    with pytest.raises(
        StemstFileError,
        match=r"checkpoint\.pt: is not a whole stemst training checkpoint: it lacks "
        r"\['run', 'ema', 'optimizer', 'rng', 'history'\]\. Delete it",
    ):
        stemst.tl.fit(
            two_sections,
            embedding_key="X_rand",
            diffusion={"head_pcs": None},
            steps=3,
            checkpoint_dir=tmp_path,
            resume=True,
            progress=False,
        )


def test_saved_model_whose_config_and_weights_disagree_or_lack_a_version(tiny_model, tmp_path):
    saved = tiny_model.save(tmp_path / "m")
    meta = json.loads((saved / "config.json").read_text())
    meta["config"]["network"]["width"] = 32
    (saved / "config.json").write_text(json.dumps(meta))
    with pytest.raises(
        StemstFileError,
        match=rf"(?s){saved}: cannot read this stemst model: config\.json and weights\.pt "
        r"do not match \(RuntimeError.*size mismatch",
    ):
        stemst.tl.StemstModel.load(saved)
    meta["config"]["network"]["width"] = 16
    del meta["format_version"]
    (saved / "config.json").write_text(json.dumps(meta))
    with pytest.raises(
        StemstFileError,
        match=r"config\.json: has no format_version: it was not written by "
        r"StemstModel\.save, or was edited",
    ) as caught:
        stemst.tl.StemstModel.load(saved)
    assert "the stemst version that wrote it" not in str(caught.value)
    meta["format_version"] = 99
    (saved / "config.json").write_text(json.dumps(meta))
    with pytest.raises(StemstFileError, match=r"model format 99, written by stemst .*The file was edited"):
        stemst.tl.StemstModel.load(saved)


@pytest.mark.parametrize("n_spots", [2, 4, 6])
def test_fit_on_too_few_spots_says_so(two_sections, n_spots):
    c2 = two_sections[np.flatnonzero(two_sections.obs["section"] == "C2")[:n_spots]].copy()
    with pytest.raises(StemstDataError, match=rf"the {n_spots} training spots make 1 group\(s\).*head_pcs.: None"):
        stemst.tl.fit(c2, embedding_key="X_rand", steps=3, progress=False)
    one_each = two_sections[[0, int(np.flatnonzero(two_sections.obs["section"] == "C6")[0])]].copy()
    with pytest.raises(StemstDataError, match=r"the 2 training spots make 2 group\(s\) of \[1, 1\] spots"):
        stemst.tl.fit(one_each, embedding_key="X_rand", steps=3, progress=False)


# ------------------------------------------------------------------------------------------------------------------
# issue 23: the command line finds what `stemst prepare` wrote, and prints errors without a traceback


def test_cli_fit_after_prepare_with_another_encoder_and_errors_without_traceback(
    c2_sdata, tmp_path, capsys, monkeypatch
):
    from stemst._cli import main

    store = tmp_path / "c2.zarr"
    stemst.io.write_zarr(c2_sdata, store)
    args = ["--encoder", "color_stats", "--no-augment", "--genes", "10", "--no-progress"]
    assert main(["prepare", str(store), "--train-sections", "C2", *args]) == 0
    assert main(["fit", str(store), "--out", str(tmp_path / "m"), "--steps", "3", "--no-progress"]) == 0
    model = stemst.tl.StemstModel.load(tmp_path / "m")
    assert model.embedding_key == "X_color_stats_context" and model.encoder["encoder"] == "color_stats"
    capsys.readouterr()
    assert main(["predict", str(store), "--model", str(tmp_path / "none"), "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert "stemst predict: error: FileNotFoundError:" in err and "is not a saved stemst model" in err
    assert "Traceback" not in err and "--verbose prints the traceback" in err
    assert main(["predict", str(store), "--model", str(tmp_path / "none"), "--verbose"]) == 1
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err and "stemst predict: error: FileNotFoundError" in err
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert main(["predict", str(store), "--model", str(tmp_path / "m"), "--device", "cuda"]) == 1
    assert "stemst predict: error: ValueError: device='cuda', but torch finds no CUDA GPU" in capsys.readouterr().err
