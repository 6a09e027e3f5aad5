"""The test setup itself (conftest.py): each run has its own embedding cache, and without the HER2ST folder the data
tests and doctests skip, naming what to set, instead of erroring or downloading."""

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_embedding_cache_is_this_runs_own():
    cache = Path(os.environ["STEMST_CACHE_DIR"])
    assert cache.name.startswith("stemst-test-cache-") and cache.is_dir()


def test_without_data_tests_and_doctests_skip_and_nothing_is_touched(tmp_path):
    """A user's STEMST_CACHE_DIR is neither read nor written, and an empty data folder gets no download."""
    data, user_cache = tmp_path / "no_data", tmp_path / "user_cache"
    data.mkdir()
    user_cache.mkdir()
    env = {**os.environ, "STEMST_DATA_DIR": str(data), "STEMST_CACHE_DIR": str(user_cache)}
    tests = [
        "src/stemst/datasets/_her2st.py",  # a doctest that loads HER2ST
        "tests/test_pp_context.py::test_context_on_real_her2st_grid",
        "tests/test_test_setup.py::test_embedding_cache_is_this_runs_own",
    ]
    cmd = [sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", *tests]
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert " 2 skipped" in done.stdout.splitlines()[-1], done.stdout
    assert done.stdout.count("set STEMST_DATA_DIR to the folder holding her2st/") == 2, done.stdout
    assert list(data.iterdir()) == [] and list(user_cache.iterdir()) == []
