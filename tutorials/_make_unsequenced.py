"""Build tutorials/unsequenced_slide.ipynb (run with --execute to execute it in place; about 7 minutes on a laptop CPU)."""

import nbformat as nbf
from _execute import write

md, code = nbf.v4.new_markdown_cell, nbf.v4.new_code_cell

cells = [
    md("""# A slide that was never sequenced: expression and its uncertainty on a grid

H&E slides are everywhere; spatial transcriptomics is rare. A model trained on sequenced sections can map
expression over any H&E slide of the same kind: `stemst.tl.predict_image` lays a grid of pseudo-spots over the
tissue, embeds the patch under each one with the model's own encoder and patch size, and samples expression there.
Because stemst's predictions are samples of a diffusion model, each grid point also gets an **uncertainty**: the
spread of its samples.

The slide here is HER2ST section C6. It *was* sequenced, which lets us check the grid predictions against measured
spots at the end, but the model is trained on C2-C5 and `predict_image` reads only C6's image and pixel size,
never its spots or counts.

Limits: one patient (the model has only seen this tumour), an ImageNet encoder, a 100-gene panel. On a slide from
another lab, scanner or patient, expect weaker predictions (see *Benchmarks*: a section of another patient scores
near zero). To keep the run to a few minutes on a laptop CPU, patches are embedded without their 8 flips and
rotations (`augment=False`)."""),
    code("""import time
import warnings

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from scipy.spatial import cKDTree
from scipy.stats import pearsonr

import stemst

warnings.filterwarnings("ignore", category=FutureWarning)
T0 = time.perf_counter()
TRAIN, SLIDE = ["C2", "C3", "C4", "C5"], "C6\""""),
    md("""## Train on the sequenced sections

As in the *Quickstart*: embeddings with spatial context, a gene panel chosen on the training sections, the model
(C5 held out inside `fit` for early stopping and for calibrating the spread of the samples). The embedding step
below also embeds C6's spots; we use them only for the check at the end."""),
    code("""sdata = stemst.datasets.her2st([*TRAIN, SLIDE])
stemst.pp.embed_patches(sdata, augment=False, progress=False)
stemst.pp.spatial_context(sdata)
stemst.pp.select_genes(sdata, train_sections=TRAIN, n_genes=100)
model = stemst.tl.fit(sdata, sections=TRAIN, progress=False)
model"""),
    md("""## Predict on a grid over the tissue

`predict_image` finds the tissue on a thumbnail (saturated, not-white pixels), keeps the grid points whose cell is
at least 25 % tissue (`min_tissue`), and stores the grid as circles `C6_grid` with a prediction table. The default
spacing is the model's patch size (112 µm here), so neighbouring patches touch; a finer `spacing_um` gives a
smoother map at a proportional cost.

A slide of your own needs to be in stemst's data model first, with its pixel size; the readers of *Your own
data* take sequenced data, and stemst has no reader yet for an image without spots."""),
    code("""grid_key = stemst.tl.predict_image(model, sdata, SLIDE, keep_samples=True, progress=False)
grid = sdata.tables[grid_key]
grid"""),
    code("""n_spots = int((sdata.tables["table"].obs["section"] == SLIDE).sum())
print(f"{grid.n_obs} grid points over the tissue of {SLIDE}, where the ST array had {n_spots} spots")"""),
    md("""## Predicted expression

The grid prediction has the layout of any stemst prediction: `X` the model's mean (log2(count + 1)),
`layers["std"]` their standard deviation, `obsm["samples"]` the samples (kept here with `keep_samples=True`, to check
the intervals below; on a fine grid they are large, and by default only the mean and std are stored). Three genes of the panel that mark three
compartments of a breast tumour: KRT7 (a keratin of the epithelial, here tumour, cells), COL1A1 (collagen of the
fibrous stroma) and IGKC (immunoglobulin kappa, from plasma cells and B cells). `stemst.pl.uncertainty_map` draws
any layer of a prediction over the H&E; we copy the mean into a layer to draw it the same way."""),
    code("""genes = ["KRT7", "COL1A1", "IGKC"]
grid.layers["mean"] = grid.X.copy()
stemst.pl.uncertainty_map(sdata, genes, section=SLIDE, pred_key=grid_key, layer="mean", cmap="viridis", ncols=3);"""),
    md("""**What to look at.** Each circle is a grid point, coloured by the predicted mean (one colour scale per gene).
The three maps look much alike: high where the tissue is dense, low at the sparse left end of the section. On raw
log counts, much of what the model predicts is how much RNA a spot yields (its cellularity), which moves all genes
together; the differences between the compartments are smaller, on top of that. The maps are smooth: each
prediction also uses its neighbours' patches (spatial context) and is the model's mean, not a sample.

## Uncertainty

The standard deviation of the 20 samples at each grid point, on the same log2 scale:"""),
    code("""stemst.pl.uncertainty_map(sdata, genes, section=SLIDE, pred_key=grid_key, ncols=3);"""),
    md("""A summary over the whole panel, the mean standard deviation over all genes at each grid point, shows where the
model is least sure overall:"""),
    code("""grid.obs["mean std"] = grid.layers["std"].mean(1)
stemst.pl.sections(sdata, sections=SLIDE, color="mean std", table_key=grid_key, cmap="magma");"""),
    md("""**What to look at.** The spread is not uniform: it depends on the gene (genes with more measured spread between
similar-looking spots get wider samples) and on the place: it is lowest at the sparse left end, where predicted
expression is near zero and, on the log scale, has little room to vary. Part of the speckle from one grid point to the next is
sampling noise: a standard deviation estimated from 20 samples is itself uncertain by about 16 %
(1/sqrt(2 x 19)); more samples (`n_samples=` in `predict_image`) smooth it, at a proportional cost. The spread was calibrated on the held-out training
section C5, so that, there, a 90 % interval of the samples holds about 90 % of the measured values. Whether that
carries over to a new slide is what the next section checks.

## Checking against the measured spots

C6 was sequenced, so we can compare. Each measured spot takes the prediction of the nearest grid point (at most
half a grid step away). As a reference, the usual spot-level prediction `stemst.tl.predict` on C6's own spots
(patches centred on the spots) is evaluated the same way."""),
    code("""table = sdata.tables["table"]
spots = table[table.obs["section"] == SLIDE]
measured = np.log2(spots[:, model.genes].X.toarray() + 1)
distance, nearest = cKDTree(grid.obsm["spatial"]).query(spots.obsm["spatial"])
assert list(grid.var_names) == list(model.genes)
on_grid = {"X": grid.X[nearest], "std": grid.layers["std"][nearest], "samples": grid.obsm["samples"][nearest]}

spot_key = stemst.tl.predict(model, sdata, sections=SLIDE, progress=False)
at_spots = sdata.tables[spot_key][spots.obs_names]
at_spots = {"X": at_spots.X, "samples": at_spots.obsm["samples"]}


def per_gene_pearson(pred):
    return np.array([pearsonr(pred[:, j], measured[:, j])[0] for j in range(measured.shape[1])])


def coverage_90(samples):
    lo, hi = np.quantile(samples, [0.05, 0.95], axis=1)
    return float(((measured >= lo) & (measured <= hi)).mean())


mpp = table.uns["stemst"]["sections"][SLIDE]["microns_per_pixel"]
print(f"distance spot -> nearest grid point: median {np.median(distance) * mpp:.0f} µm, max {distance.max() * mpp:.0f} µm")
pd.DataFrame({
    "mean Pearson r over genes": [per_gene_pearson(on_grid["X"]).mean(), per_gene_pearson(at_spots["X"]).mean()],
    "90% interval coverage": [coverage_90(on_grid["samples"]), coverage_90(at_spots["samples"])],
}, index=["grid (predict_image)", "spots (predict)"]).round(3)"""),
    md("""The grid predictions come from patches that are not centred on the spots (tens of µm off), yet they score about
as well as the spot-level predictions: a patch shifted by less than half a spot shows much the same tissue. Both
are far from perfect (see *Quickstart* and *Benchmarks* for what the numbers mean). The coverage column says how
often the measured value falls inside the 90 % interval of the samples: 0.9 would mean the uncertainty is
calibrated on this slide; a little less means slightly over-confident.

Does a larger predicted spread go with a larger error? Group all spot x gene pairs by their predicted standard
deviation (five equal-sized bins) and compare the error:"""),
    code("""std = on_grid["std"].ravel()
error = np.abs(on_grid["X"] - measured).ravel()
bins = pd.qcut(std, 5)
summary = pd.DataFrame({"predicted std": std, "absolute error": error}).groupby(bins, observed=True).mean()
ax = summary.plot(x="predicted std", y="absolute error", marker="o", legend=False, figsize=(4, 3.2))
lim = summary.to_numpy().max() * 1.1
ax.plot([0, lim], [0, lim * np.sqrt(2 / np.pi)], lw=0.8, color="grey", ls="--")
ax.set(xlabel="predicted std (bin mean)", ylabel="mean |predicted - measured|", xlim=(0, lim), ylim=(0, lim))
summary.round(3)"""),
    md("""The dashed line is what a calibrated Gaussian prediction would give: the mean absolute error of a normal
variable is about 0.8 times its standard deviation. Points near the line mean the spread is the right size;
points above it mean the model is over-confident there, below it under-confident. An increasing curve means the
uncertainty ranks predictions: where the model says it is unsure, it is more often wrong.

Here the curve rises, but it is much flatter than the line: where the model is surest, its errors are larger than
its spread says, and where it is least sure, smaller. Overall the intervals hold about as many measured values as
they claim, but the spread separates good from bad predictions only weakly; read it as a relative flag (this
gene, this region is less certain), not as an error bar for a single spot."""),
    md("""## At Visium HD resolution: an 8 µm grid over the whole section

On a grid this fine `predict_image` embeds *densely* by itself (`dense="auto"`, the default): the encoder runs
once per view over the tissue, in tiles fitted to the grid spots' patches and read lazily from the image, and every
grid spot's features are window sums of the activation maps, rather than one patch per spot. What grows with the
number of spots is the sampling: by default (`n_samples=None`) `predict_image` draws 20 samples per grid spot,
fewer on a grid this large (4 here, logged); two keep it shorter (the mean comes from the model's mean head either
way; the std is a two-sample one). The spatial context is taken at the training spots' spacing, whatever the
grid's. Each point is a 112 µm patch's prediction placed every 8 µm: the map is finer-grained, not sharper than
the patch.

Dense features differ a little from the per-patch ones this model was trained on (in the encoder's deepest
stages), so the cell below warns, and the out-of-distribution score flags most grid spots. For a map you will
rely on, train on dense features (`stemst.pp.embed_patches(sdata, dense=True)` before `fit`): on validation
sections such a model scores as the per-patch one does (*Scaling*, `docs/benchmarks_embed.md`), and
`predict_image` then embeds every grid densely.

This cell is tagged `skip-execution`, so it does not run when the notebook is executed for the docs or the tests;
the figure under it is what it draws (`tutorials/_make_fine_map.py` runs this notebook's training cells and this
cell: 78,660 grid spots in 171 s on the shared 2-core CPU, one view as everywhere in this notebook).
With all 8 views (`augment=True`) `benchmarks/embed.py` times the same grid."""),
    code(
        """fine_key = stemst.tl.predict_image(
    model, sdata, SLIDE, spacing_um=8, n_samples=2, key_added="fine", overwrite=True, progress=False
)
fine = sdata.tables[fine_key]
# one pixel per grid spot: the grid's columns and rows from its centres (x, y), glass left empty
xy = fine.obsm["spatial"]
step = np.diff(np.unique(xy[:, 0])).min()
col, row = np.round((xy - xy.min(0)) / step).astype(int).T
image = np.full((row.max() + 1, col.max() + 1), np.nan)
image[row, col] = fine[:, "KRT7"].X.ravel()
fig, ax = plt.subplots(figsize=(7, 7))
ax.imshow(image, cmap="viridis", interpolation="nearest")
ax.set(title=f"KRT7, {fine.n_obs:,} grid spots 8 µm apart")
ax.axis("off");""",
        metadata={"tags": ["skip-execution"]},
    ),
    md("""![KRT7 predicted over section C6 on an 8 µm grid](figures/unsequenced_krt7_8um.png)"""),
    md("""## Summary

`predict_image` turns a trained model into an expression map over any H&E slide of the same kind, with a
per-point uncertainty. On this slide the grid predictions agree with the measured spots about as well as the
spot-level predictions do, and the sample intervals are about as wide as they should be overall, while the spread
ranks individual predictions only weakly. The spread alone does not say whether a slide is like the training data:
on a new stain, scanner or patient, predictions can be wrong *and* confident. The out-of-distribution score does
say it: `predict` and `predict_image` score every spot against the training spots and warn when most of a section
lies outside them, as for A1 above. A warning says *that* the slide differs, not by how much the predictions are
off; a few measured spots of the new kind (`stemst.tl.adapt`) correct the levels and the intervals, not the
ranking of the spots. Check a sequenced section of the new kind before trusting a map."""),
    code("""print(f"run time {(time.perf_counter() - T0) / 60:.1f} min")"""),
]

# a section before the summary: the same model on a section of another patient
new_patient = [
    md("""## Using a model on a new patient

Everything above stays inside patient C. A slide from another patient, lab or scanner is where a map can be wrong
*and* confident, so stemst checks every predicted section against the training data (*Using a model on a new
patient* in the docs). Section A1 of HER2ST comes from patient A, and its image was scanned at a lower resolution.
`predict` scores each spot's image embedding against the training spots' (`obs["ood_score"]`, above 1 for about
5 % of the spots of an unseen section like the training ones) and warns about a section most of whose spots score
above 1."""),
    code("""other = stemst.datasets.her2st("A1")
stemst.pp.embed_patches(other, augment=False, progress=False)
stemst.pp.spatial_context(other)
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always", stemst.StemstWarning)
    a1_key = stemst.tl.predict(model, other, sections="A1", progress=False)
for w in caught:
    print(w.message)
other.tables[a1_key].uns["stemst_ood"]"""),
    code("""stemst.pl.ood_map(other, section="A1", pred_key=a1_key);"""),
    md("""The model was never told what patient A's sequencing depth was, nor how its tissue looks under another scanner.
A few measured spots of the new section are enough to correct the levels and the width of the intervals without
retraining: `stemst.tl.adapt` re-estimates a per-gene offset and the spread scale on them, and `evaluate` scores
the other spots. `adaptation_curve` does this for 0, 5, 10, 20 and 50 measured spots (drawn at random, seed 0)."""),
    code("""with warnings.catch_warnings():
    warnings.simplefilter("ignore", stemst.StemstWarning)  # A1's warnings, shown above, once per adapted model
    curve = stemst.tl.adaptation_curve(model, other, section="A1")
curve.round(3)"""),
    md("""**What to look at.** With no measured spot the intervals of A1 hold far fewer measured values than they claim.
With 20 they are about as wide as they should be, and the MSE falls, because the levels now match the new run.
The per-gene correlation does not move: a per-gene offset does not change which spots rank high, and on this
patient the image features carry little of that ranking. Adaptation makes the numbers honest; only a better
encoder or more training patients would make the map right. To correct the depth alone (no measured spots, a known
depth of the new run), pass `depth=` to `predict` or `predict_image`."""),
]
cells[-2:-2] = new_patient

write(cells, "unsequenced_slide")
