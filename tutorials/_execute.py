"""Shared by the tutorial generators: write a notebook, or with ``--execute`` execute it in place first.

Each ``_make_<name>.py`` builds its cells and calls :func:`write`. Executing records the wall time and the load
average of the machine in the notebook's metadata (``metadata["stemst"]``) and prints them: tutorials promise a run
time, and on a shared CPU the load says how much of it was this notebook's.
"""

import os
import subprocess
import sys
import time
from pathlib import Path

import nbformat as nbf

HERE = Path(__file__).parent
KERNELSPEC = {"name": "python3", "display_name": "Python 3", "language": "python"}


#: stderr from the environment, not from the tutorial: progress bars, tqdm without ipywidgets, docrep (squidpy)
NOISE = ("%|", "IProgress not found", "docrep/decorators.py")


def _is_noise(output) -> bool:
    return output.output_type == "stream" and output.name == "stderr" and any(n in output.text for n in NOISE)


def _ruff_format(path: Path) -> None:
    """Format the code cells as the pre-commit hook would (ruff reads notebooks), if ruff is installed."""
    try:
        subprocess.run([sys.executable, "-m", "ruff", "format", "--quiet", str(path)], check=True)
    except (OSError, subprocess.CalledProcessError) as e:
        print(f"not formatted with ruff ({e}); run `ruff format {path}` before committing")


def write(cells: list, name: str, *, timeout: int = 1800) -> Path:
    """Write ``tutorials/<name>.ipynb``; executed first if the script was called with ``--execute``."""
    nb = nbf.v4.new_notebook(cells=cells, metadata={"kernelspec": KERNELSPEC})
    out = HERE / f"{name}.ipynb"
    nbf.write(nb, out)
    _ruff_format(out)
    nb = nbf.read(out, as_version=4)
    if "--execute" in sys.argv:
        from nbclient import NotebookClient

        os.environ["MPLBACKEND"] = "module://matplotlib_inline.backend_inline"  # figures into the notebook, even
        # where the shell sets MPLBACKEND=Agg for scripts and tests
        load_before = os.getloadavg()
        start = time.perf_counter()
        NotebookClient(
            nb, timeout=timeout, kernel_name="python3", resources={"metadata": {"path": str(HERE)}}
        ).execute()
        wall = time.perf_counter() - start
        load_after = os.getloadavg()
        for cell in nb.cells:
            if cell.cell_type == "code":
                cell.outputs = [o for o in cell.outputs if not _is_noise(o)]
        nb.metadata["stemst"] = {
            "wall_time_s": round(wall, 1),
            "cpu_count": os.cpu_count(),
            "loadavg_before": [round(x, 2) for x in load_before],
            "loadavg_after": [round(x, 2) for x in load_after],
            "executed": time.strftime("%Y-%m-%d %H:%M"),
        }
        print(
            f"executed {out.name} in {wall / 60:.1f} min on {os.cpu_count()} CPU cores; "
            f"load average before {load_before[0]:.2f}, after {load_after[0]:.2f} (1 min) / {load_after[2]:.2f} (15 min)"
        )
    nbf.write(nb, out)
    print(f"wrote {out}")
    return out
