"""Draw the unsequenced-slide tutorial's 8 µm map (its cell is tagged skip-execution): tutorials/figures/*.png.

Runs the tutorial's training cells and then its 8 µm cell as they are written, and saves the figure that cell draws,
with the run time of the cell in the log. About 6 GB of memory and several minutes on a 2-core CPU.

    STEMST_DATA_DIR=../shared/data python tutorials/_make_fine_map.py
"""

import logging
import time
import warnings
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

import stemst

OUT = Path(__file__).parent / "figures" / "unsequenced_krt7_8um.png"

warnings.filterwarnings("ignore", category=FutureWarning)
logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
TRAIN, SLIDE = ["C2", "C3", "C4", "C5"], "C6"
sdata = stemst.datasets.her2st([*TRAIN, SLIDE])
stemst.pp.embed_patches(sdata, augment=False, progress=False)
stemst.pp.spatial_context(sdata)
stemst.pp.select_genes(sdata, train_sections=TRAIN, n_genes=100)
model = stemst.tl.fit(sdata, sections=TRAIN, progress=False)
t0 = time.perf_counter()
fine_key = stemst.tl.predict_image(
    model, sdata, SLIDE, spacing_um=8, n_samples=2, key_added="fine", overwrite=True, progress=False
)
seconds = time.perf_counter() - t0
fine = sdata.tables[fine_key]
xy = fine.obsm["spatial"]
fig, ax = plt.subplots(figsize=(7, 7))
ax.scatter(xy[:, 0], xy[:, 1], c=fine[:, "KRT7"].X.ravel(), s=0.2, marker="s", cmap="viridis", linewidths=0)
ax.set(title=f"KRT7, {fine.n_obs:,} grid spots 8 µm apart", aspect="equal")
ax.invert_yaxis()
ax.axis("off")
OUT.parent.mkdir(exist_ok=True)
fig.savefig(OUT, dpi=110, bbox_inches="tight")
print(f"predict_image at 8 µm: {fine.n_obs} grid spots in {seconds:.0f} s; wrote {OUT}")
