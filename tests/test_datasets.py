import gzip
import struct

import numpy as np
import pytest
import scipy.sparse as sp

import stemst
from stemst import _schema
from stemst.datasets import _her2st

EXPECTED = {"C2": 187, "C3": 180, "C4": 184, "C5": 181, "C6": 178}


def test_her2st_default_sections(her2st_c):
    table = her2st_c.tables["table"]
    counts = table.obs["section"].value_counts().to_dict()
    assert counts == EXPECTED
    assert list(table.obs["section"].cat.categories) == list(EXPECTED)
    assert sp.issparse(table.X) and table.X.dtype == np.int32
    assert table.X.sum() > 1_000_000
    for s in EXPECTED:
        assert _schema.image_key(s) in her2st_c.images
        assert len(her2st_c.shapes[_schema.spots_key(s)]) == EXPECTED[s]
        assert s in her2st_c.coordinate_systems


def test_spot_centres_inside_images(her2st_c):
    table = her2st_c.tables["table"]
    for s in EXPECTED:
        img = _schema.get_image(her2st_c, s)
        xy = table.obsm["spatial"][_schema.section_mask(table, s)]
        _, h, w = img.shape
        assert (xy[:, 0] >= 0).all() and (xy[:, 0] < w).all()
        assert (xy[:, 1] >= 0).all() and (xy[:, 1] < h).all()


def test_section_metadata_and_circles(her2st_c):
    table = her2st_c.tables["table"]
    info = _schema.section_info(table, "C2")
    # 200 µm array step over ~291 px (derived in the data README): ~0.687 µm/px
    assert info.microns_per_pixel == pytest.approx(0.687, abs=0.005)
    assert info.spot_diameter_um == 100.0
    circles = her2st_c.shapes["C2_spots"]
    assert np.allclose(circles["radius"], info.spot_diameter_px / 2)
    # circles and table rows are linked through region / instance keys and agree on positions
    rows = table.obs[table.obs["region"] == "C2_spots"]
    xy = table.obsm["spatial"][table.obs_names.get_indexer(rows.index)]
    geo = circles.loc[rows["spot_id"]].geometry
    assert np.allclose(np.c_[geo.x, geo.y], xy)
    attrs = table.uns["spatialdata_attrs"]
    assert attrs["region_key"] == "region" and attrs["instance_key"] == "spot_id"


def test_counts_match_source_file(her2st_small, data_dir):
    import pandas as pd

    raw = pd.read_csv(data_dir / "her2st/data/ST-cnts/C6.tsv.gz", sep="\t", index_col=0)
    table = her2st_small.tables["table"]
    sub = table[table.obs["section"] == "C6"]
    genes = ["ERBB2", "GAPDH", "KRT19"]
    got = sub[[f"C6_{i}" for i in raw.index], genes].X.toarray()
    assert np.array_equal(got, raw[genes].to_numpy())


def test_a1_low_resolution(data_dir):
    sdata = stemst.datasets.her2st(["A1"], cache_dir=data_dir)
    table = sdata.tables["table"]
    assert table.n_obs == 346
    img = _schema.get_image(sdata, "A1")
    _, h, w = img.shape
    assert w == 2000
    xy = table.obsm["spatial"]
    assert (xy >= 0).all() and (xy[:, 0] < w).all() and (xy[:, 1] < h).all()
    info = _schema.section_info(table, "A1")
    assert 2.5 < info.microns_per_pixel < 4.0
    # the A1 scale comes from the original width recorded in the repository's dims.list (an R data file)
    raw = gzip.open(data_dir / "her2st/app/data/dims.list").read()
    assert struct.pack(">i", _her2st.A1_ORIGINAL_WIDTH) in raw


def test_sections_listing():
    avail = stemst.datasets.her2st_sections()
    assert len(avail) == 35  # patients A-H, as in the data README
    assert {s for s, ok in avail.items() if ok} == {"A1", "C2", "C3", "C4", "C5", "C6"}


def test_cache_dir_from_environment(monkeypatch, data_dir):
    monkeypatch.setenv("STEMST_DATA_DIR", str(data_dir))
    assert _her2st._cache_dir(None) == data_dir / "her2st"
    assert _her2st._cache_dir("/somewhere") == _her2st.Path("/somewhere/her2st")
