"""Shared fixtures: real HER2ST data from the cache in ../shared/data (never downloaded in tests)."""

import os
import tempfile
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# torch's OpenMP threads otherwise busy-wait, which is ~30x slower on a small shared CPU
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
# embeddings cached by one test run must not speed up (or leak into) another, nor fill the user's cache
os.environ.setdefault("STEMST_CACHE_DIR", tempfile.mkdtemp(prefix="stemst-test-cache-"))
_SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
if "STEMST_DATA_DIR" not in os.environ and _SHARED.exists():
    os.environ["STEMST_DATA_DIR"] = str(_SHARED)


@pytest.fixture(scope="session")
def data_dir() -> Path:
    """Cache folder holding ``her2st/``."""
    path = Path(os.environ["STEMST_DATA_DIR"])
    if not (path / "her2st").exists():
        pytest.fail(f"HER2ST data not found under {path}; set STEMST_DATA_DIR to the folder holding her2st/.")
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
