"""Draw the unsequenced-slide tutorial's 8 µm map, whose cell is tagged skip-execution: tutorials/figures/*.png.

Executes, from ``unsequenced_slide.ipynb`` itself, the setup cells up to the one that trains the model and then the
8 µm cell, and saves the figure that cell draws; prints the cell's run time. About 6 GB of memory and several
minutes on a 2-core CPU.

    STEMST_DATA_DIR=../shared/data python tutorials/_make_fine_map.py
"""

import time
from pathlib import Path

import matplotlib
import nbformat

matplotlib.use("Agg")

HERE = Path(__file__).parent
OUT = HERE / "figures" / "unsequenced_krt7_8um.png"


def main() -> None:
    import matplotlib.pyplot as plt

    cells = [
        c.source for c in nbformat.read(HERE / "unsequenced_slide.ipynb", as_version=4).cells if c.cell_type == "code"
    ]
    train = next(i for i, src in enumerate(cells) if "stemst.tl.fit(" in src)
    fine = next(src for src in cells if "spacing_um=8" in src)
    namespace: dict = {}
    for src in cells[: train + 1]:
        exec(compile(src, "<tutorial cell>", "exec"), namespace)
    start = time.perf_counter()
    exec(compile(fine, "<8 µm cell>", "exec"), namespace)
    seconds = time.perf_counter() - start
    OUT.parent.mkdir(exist_ok=True)
    plt.gcf().savefig(OUT, dpi=110, bbox_inches="tight")
    print(f"8 µm cell: {namespace['fine'].n_obs} grid spots in {seconds:.0f} s; wrote {OUT}")


if __name__ == "__main__":
    main()
