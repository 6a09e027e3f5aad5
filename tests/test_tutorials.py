"""The tutorials run end to end: the short one in the default test run, the others with ``-m slow``.

Each notebook is executed on a copy in ``tmp_path`` by a kernel of the Python running the tests (a kernelspec
written on the fly), so a fresh clone with ``pip install -e ".[test]"`` needs no ``jupyter kernelspec install``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

TUTORIALS = Path(__file__).resolve().parents[1] / "tutorials"
KERNEL = "stemst-tests"


@pytest.fixture
def kernel(tmp_path, monkeypatch) -> str:
    """A kernelspec named KERNEL that starts ``sys.executable`` (found through ``JUPYTER_PATH``)."""
    spec = tmp_path / "jupyter" / "kernels" / KERNEL
    spec.mkdir(parents=True)
    argv = [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"]
    (spec / "kernel.json").write_text(json.dumps({"argv": argv, "display_name": KERNEL, "language": "python"}))
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter"))
    monkeypatch.setenv("MPLBACKEND", "Agg")
    monkeypatch.setenv("STEMST_CACHE_DIR", str(tmp_path / "cache"))  # no embeddings from earlier runs
    monkeypatch.setenv("TMPDIR", str(tmp_path))  # files the notebooks write to tempfile folders
    return KERNEL


def execute(name: str, workdir: Path, kernel: str, *, timeout: int):
    """Execute a copy of ``tutorials/<name>.ipynb`` in ``workdir``; a failing cell raises with its traceback."""
    import nbformat
    from nbclient import NotebookClient

    nb = nbformat.read(TUTORIALS / f"{name}.ipynb", as_version=4)
    for cell in nb.cells:
        if cell.cell_type == "code":
            cell.outputs, cell.execution_count = [], None
    nbformat.write(nb, workdir / f"{name}.ipynb")  # the copy, so that files the notebook writes land here
    NotebookClient(nb, timeout=timeout, kernel_name=kernel, resources={"metadata": {"path": str(workdir)}}).execute()
    return nb


def _outputs(nb) -> list[str]:
    return [
        o.get("text", "") + str(o.get("data", {}).get("text/plain", ""))
        for c in nb.cells
        if c.cell_type == "code"
        for o in c.outputs
    ]


def test_own_data_tutorial(tmp_path, kernel):
    """Visium folder, HEST sample and AnnData read, combined, embedded from a local checkpoint, ridge smoke test."""
    nb = execute("own_data", tmp_path, kernel, timeout=600)
    text = "\n".join(_outputs(nb))
    assert "Evaluation(ridge, 100 genes" in text
    assert not any(o.output_type == "error" for c in nb.cells if c.cell_type == "code" for o in c.outputs)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["her2st_quickstart", "downstream", "unsequenced_slide"])
def test_long_tutorial(tmp_path, kernel, name):
    execute(name, tmp_path, kernel, timeout=1800)
