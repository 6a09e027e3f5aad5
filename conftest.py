"""Test settings for the whole repository: the tests in tests/ and the doctests under src/stemst.

Real HER2ST data come from ``$STEMST_DATA_DIR``, else ../shared/data; tests never download them and skip (naming
the folder to set) where they are absent. The embedding cache is a fresh temporary folder for every run, so a
user's own cache is neither read nor written. Doctests run in a temporary working directory; ``sdata`` (HER2ST C2
and C6 with colour-statistics embeddings and a 20-gene panel, a copy for each doctest) and ``model`` (a small
model fitted on C2) are there for the examples that use them.
"""

import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("MPLBACKEND", "Agg")
# torch's OpenMP threads otherwise busy-wait, which is ~30x slower on a small shared CPU
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
# embeddings cached by one test run must not speed up (or leak into) another, nor touch the user's cache
_CACHE = tempfile.mkdtemp(prefix="stemst-test-cache-")
os.environ["STEMST_CACHE_DIR"] = _CACHE
_SHARED = Path(__file__).resolve().parent.parent / "shared" / "data"
if "STEMST_DATA_DIR" not in os.environ and (_SHARED / "her2st").is_dir():
    os.environ["STEMST_DATA_DIR"] = str(_SHARED)
NO_DATA = (
    "HER2ST data not found: set STEMST_DATA_DIR to the folder holding her2st/ (tests never download; "
    "`stemst.datasets.her2st(cache_dir=...)` fetches the files once)"
)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """Remove this run's embedding cache."""
    shutil.rmtree(_CACHE, ignore_errors=True)


def her2st_folder() -> Path | None:
    """Return the folder holding ``her2st/``, or ``None`` when there is none."""
    path = os.environ.get("STEMST_DATA_DIR")
    return Path(path) if path and (Path(path) / "her2st").is_dir() else None


@pytest.fixture(scope="session")
def data_dir() -> Path:
    """Cache folder holding ``her2st/``; the test is skipped without it."""
    path = her2st_folder()
    if path is None:
        pytest.skip(NO_DATA)
    return path


@pytest.fixture(scope="session")
def her2st_c(data_dir):
    """Sections C2-C6 (one patient)."""
    import stemst

    return stemst.datasets.her2st(["C2", "C3", "C4", "C5", "C6"], cache_dir=data_dir)


@pytest.fixture(scope="session")
def her2st_small(data_dir):
    """Sections C2 and C6."""
    import stemst

    return stemst.datasets.her2st(["C2", "C6"], cache_dir=data_dir)


@pytest.fixture(scope="session")
def sdata_copy():
    """Make ``sdata_copy(sdata, table=None)``: the same images and shapes with a copy of the table (or ``table``).

    Tests that add embeddings, panels or predictions work on such a copy, so the shared session fixtures stay as
    loaded.
    """
    import spatialdata as sd

    def make(sdata, table=None):
        table = sdata.tables["table"].copy() if table is None else table
        return sd.SpatialData(images=dict(sdata.images), shapes=dict(sdata.shapes), tables={"table": table})

    return make


@pytest.fixture(scope="session")
def section_crop():
    """Make ``crop(sdata, section, size)``: a square of a section around its centre spot.

    The ``size`` px square of the image and the spots at least 100 px inside it, as keyword arguments of
    :func:`stemst._schema.make_section`.
    """

    def crop(sdata, section: str, size: int) -> dict:
        import numpy as np

        from stemst import _schema

        t = sdata.tables["table"]
        sec = t[(t.obs["section"] == section).to_numpy()]
        xy = np.asarray(sec.obsm["spatial"])
        x0, y0 = (np.median(xy, axis=0) - size // 2).astype(int)
        inside = ((xy >= [x0 + 100, y0 + 100]) & (xy < [x0 + size - 100, y0 + size - 100])).all(1)
        info = _schema.section_info(t, section)
        sub = sec[inside]
        return {
            "image": np.asarray(_schema.get_image(sdata, section)[:, y0 : y0 + size, x0 : x0 + size]),
            "counts": sub.X,
            "genes": sub.var_names,
            "spot_ids": sub.obs_names,
            "coords": xy[inside] - [x0, y0],
            "microns_per_pixel": info.microns_per_pixel,
            "spot_diameter_um": info.spot_diameter_um,
        }

    return crop


@pytest.fixture(scope="session")
def doctest_sdata(her2st_small, sdata_copy):
    """C2 and C6 with colour-statistics embeddings and a 20-gene panel chosen on C2."""
    import stemst

    sdata = sdata_copy(her2st_small)
    stemst.pp.embed_patches(sdata, encoder="color_stats", augment=False, progress=False)
    stemst.pp.select_genes(sdata, train_sections=["C2"], n_genes=20)
    return sdata


@pytest.fixture(scope="session")
def doctest_model(doctest_sdata):
    """Train a small MLP model briefly on C2's colour statistics."""
    import stemst

    kw = {
        "architecture": "mlp",
        "network": {"width": 32, "depth": 1},
        "steps": 20,
        "validation": None,
        "progress": False,
    }
    return stemst.tl.fit(doctest_sdata, embedding_key="X_color_stats", sections="C2", **kw)


def _uses(name: str, source: str) -> bool:
    """Whether the doctest's code names ``name`` (not as an attribute, as in ``stemst.model``, nor in a string)."""
    code = re.sub(r"\"[^\"]*\"|'[^']*'", "", source)
    return re.search(rf"(?<![\w.]){name}\b", code) is not None


@pytest.fixture(autouse=True)
def _doctest_environment(request: pytest.FixtureRequest, doctest_namespace: dict) -> Iterator[None]:
    """For doctests: a temporary working directory, the data they use, and a skip (not a download) without it."""
    test = getattr(request.node, "dtest", None)
    if test is None:
        yield
        return
    source = "".join(example.source for example in test.examples)
    request.getfixturevalue("monkeypatch").chdir(request.getfixturevalue("tmp_path"))
    import numpy as np

    import stemst

    doctest_namespace.update(stemst=stemst, np=np)
    if "her2st(" in source or _uses("sdata", source) or _uses("model", source):
        if her2st_folder() is None:
            pytest.skip(NO_DATA)
    if _uses("sdata", source):
        doctest_namespace["sdata"] = request.getfixturevalue("sdata_copy")(request.getfixturevalue("doctest_sdata"))
    if _uses("model", source):
        doctest_namespace["model"] = request.getfixturevalue("doctest_model")
    yield
    if "stemst.pl." in source:
        import matplotlib.pyplot as plt

        plt.close("all")
