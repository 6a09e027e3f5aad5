"""Build tutorials/downstream.ipynb (run with --execute to execute it in place; about 6 minutes on a laptop CPU)."""

import nbformat as nbf
from _execute import write

md, code = nbf.v4.new_markdown_cell, nbf.v4.new_code_cell

cells = [
    md("""# Downstream analysis: spatial domains and spatially variable genes from predicted expression

A prediction of expression from H&E is worth as much as what it lets you conclude. Two analyses that almost every
spatial transcriptomics study runs are

- **spatial domains**: cluster the spots by expression (Leiden) and look at where the clusters lie;
- **spatially variable genes**: rank genes by spatial autocorrelation (Moran's I).

This tutorial runs both on a section whose expression the model never saw, once on the *measured* counts and once
on the *predicted* expression, and asks whether they agree: do the domains match (adjusted Rand index), are the
domains' marker genes predicted, and do the same genes come out spatially variable?

Data and model as in the *Quickstart*: HER2ST, one HER2-positive tumour, legacy Spatial Transcriptomics (100 µm
spots, 200 µm apart). We train on sections C2-C5 and analyse C6. Limits to keep in mind throughout: one patient,
178 spots in the test section, a 100-gene panel, and an ImageNet encoder (not a pathology model). To stay within a
few minutes on a laptop CPU, patches are embedded without their 8 flips and rotations (`augment=False`), which
costs a little accuracy."""),
    code("""import time
import warnings

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import scanpy as sc
import squidpy as sq
from scipy.optimize import linear_sum_assignment
from scipy.stats import pearsonr, spearmanr
from sklearn.cluster import KMeans
from sklearn.metrics import adjusted_rand_score

import stemst

warnings.filterwarnings("ignore", category=FutureWarning)
warnings.filterwarnings("ignore", message="No data for colormapping")  # squidpy, categorical colours
sc.settings.verbosity = "error"  # squidpy asks for a library_id when drawing without an image
T0 = time.perf_counter()
TRAIN, TEST = ["C2", "C3", "C4", "C5"], "C6\""""),
    md("""## Train on C2-C5, predict C6

The steps of the *Quickstart*, in one cell: embed every spot's patch, add the embeddings of its neighbours
(spatial context), choose the gene panel on the training sections only, fit (C5 is held out inside `fit` for early
stopping and calibration) and predict the test section with 20 samples per spot."""),
    code("""sdata = stemst.datasets.her2st([*TRAIN, TEST])
stemst.pp.embed_patches(sdata, augment=False, progress=False)
stemst.pp.spatial_context(sdata)
stemst.pp.select_genes(sdata, train_sections=TRAIN, n_genes=100)
model = stemst.tl.fit(sdata, sections=TRAIN, progress=False)
key = stemst.tl.predict(model, sdata, sections=TEST, progress=False)
pred = sdata.tables[key]
stemst.tl.evaluate(sdata, pred_key=key)"""),
    md("""## Measured and predicted, on the same footing

The prediction table `pred` holds, for each C6 spot, the mean of the samples in `X` (log2(count + 1), the model's
scale), their spread in `layers["std"]` and the samples themselves in `obsm["samples"]`. For a fair comparison the
measured side gets the same genes and the same scale: log2(count + 1) of the panel genes. Both tables list the
spots in the same order."""),
    code("""table = sdata.tables["table"]
measured = table[table.obs["section"] == TEST, model.genes].copy()
measured.X = np.log2(measured.X.toarray().astype(np.float32) + 1)
assert (measured.obs_names == pred.obs_names).all()
measured"""),
    md("""## Spatial domains

The usual scanpy recipe on each table: PCA, a k-nearest-neighbour graph in expression space, Leiden clustering.
With 178 spots, a low resolution (0.3) gives a few domains; it is also where Leiden gives nearly the same clusters
from different random seeds on the measured data, which matters: agreement with a reference cannot exceed the
reference's agreement with itself."""),
    code("""def domains(adata, *, resolution=0.3, seed=0, key_added="domain"):
    sc.pp.pca(adata, n_comps=15, random_state=seed)
    sc.pp.neighbors(adata, n_neighbors=15, random_state=seed)
    sc.tl.leiden(adata, resolution=resolution, flavor="igraph", n_iterations=-1, directed=False,
                 random_state=seed, key_added=key_added)
    return adata.obs[key_added]


domains(measured)
domains(pred)
stability = adjusted_rand_score(measured.obs["domain"], domains(measured.copy(), seed=1))
ari = adjusted_rand_score(measured.obs["domain"], pred.obs["domain"])
k = measured.obs["domain"].nunique()
by_position = KMeans(k, n_init=10, random_state=0).fit_predict(measured.obsm["spatial"])
ari_position = adjusted_rand_score(measured.obs["domain"], by_position)
pd.Series({"domains (measured / predicted)": f"{k} / {pred.obs['domain'].nunique()}",
           "ARI predicted vs measured": round(ari, 3),
           "ARI measured, seed 0 vs seed 1": round(stability, 3),
           f"ARI position only (k-means of x, y, k={k})": round(ari_position, 3)}).to_frame("value")"""),
    md("""The adjusted Rand index (ARI) is 0 for labels that agree no better than chance and 1 for identical partitions.
The last row is a yardstick: domains are spatially coherent, so any partition of the section into compact pieces
agrees with them somewhat. Predicted domains have to beat "position only" before they say anything that the
spots' positions alone would not.

To draw both partitions with the same colours, each predicted domain takes the label of the measured domain it
overlaps most (one-to-one, Hungarian assignment on the contingency table); predicted domains left over keep a
label of their own."""),
    code("""overlap = pd.crosstab(pred.obs["domain"], measured.obs["domain"])
rows, cols = linear_sum_assignment(-overlap.to_numpy())
rename = {overlap.index[r]: overlap.columns[c] for r, c in zip(rows, cols, strict=True)}
extra = (f"p{d}" for d in overlap.index if d not in rename)
rename |= {d: next(extra) for d in overlap.index if d not in rename}
measured.obs["predicted domain"] = pred.obs["domain"].map(rename).astype("category")
measured.obs["measured domain"] = measured.obs["domain"]
overlap.rename(index=rename).sort_index()"""),
    code("""sq.pl.spatial_scatter(measured, color=["measured domain", "predicted domain"], shape=None, size=80, wspace=0.3,
                      figsize=(4.5, 4))"""),
    md("""**What to look at.** Each dot is a spot of C6 at its position on the slide (image coordinates). Where the two
maps share a colour, the domain found in predicted expression is the one found in measured expression. Differences
at domain borders are expected; the predicted expression is smoother than the measured one (each prediction
averages samples and uses the neighbouring spots' images), so its domains are more compact.

ARI judges the partition. A more forgiving question is whether the *expression differences* between the measured
domains are predicted: for each measured domain, the log2 fold change of every panel gene (domain vs the rest of
the section) in measured against predicted expression."""),
    code("""groups = measured.obs["measured domain"]
fig, axes = plt.subplots(1, groups.cat.categories.size, figsize=(3.6 * groups.cat.categories.size, 3.4))
rows = []
for ax, d in zip(np.atleast_1d(axes), groups.cat.categories, strict=True):
    inside = (groups == d).to_numpy()
    lfc_measured = measured.X[inside].mean(0) - measured.X[~inside].mean(0)
    lfc_predicted = pred.X[inside].mean(0) - pred.X[~inside].mean(0)
    top_measured = set(measured.var_names[np.argsort(-lfc_measured)[:10]])
    top_predicted = set(measured.var_names[np.argsort(-lfc_predicted)[:10]])
    r = pearsonr(lfc_measured, lfc_predicted)[0]
    rows.append({"domain": d, "spots": int(inside.sum()), "r (log2 fold changes)": round(r, 2),
                 "top-10 markers shared": len(top_measured & top_predicted)})
    ax.scatter(lfc_measured, lfc_predicted, s=10)
    lim = np.abs(np.r_[lfc_measured, lfc_predicted]).max() * 1.05
    ax.plot([-lim, lim], [-lim, lim], lw=0.8, color="grey")
    ax.set(xlabel="log2 fold change, measured", ylabel="predicted", title=f"domain {d} (r = {r:.2f})")
fig.tight_layout()
pd.DataFrame(rows).set_index("domain")"""),
    md("""Points near the diagonal are genes whose enrichment in the domain the model predicts at its measured size; points
flattened towards the horizontal axis are under-predicted differences (the prediction is a conditional mean and
shrinks contrasts). A domain with strongly negative fold changes for almost every gene is often a domain of
low-depth spots rather than a tissue type: on raw log counts, spot depth (cellularity) moves all genes together.
In this run, domains 0 and 1 differ from the rest mostly in depth (nearly every gene up, or down), and the model
predicts that shift; domain 2 is where gene-specific differences show, and those are predicted in the right
direction but at a fraction of their measured size.

## Spatially variable genes: Moran's I

squidpy's `spatial_neighbors` builds the spot graph; legacy ST spots lie on a square grid, so each spot has up to 4
direct neighbours (`coord_type="grid", n_neighs=4`; use `n_neighs=6` for Visium's hexagonal grid).
`spatial_autocorr` then computes Moran's I of every gene: near 1 when neighbours have similar values, near 0 for
spatially random values.

We compute it three times: on the measured values, on the predicted mean, and on each of the 20 samples (averaged
over the samples). The graph is built once per table; the samples share the prediction table's graph."""),
    code("""genes = list(model.genes)


def morans_i(adata):
    if "spatial_connectivities" not in adata.obsp:
        sq.gr.spatial_neighbors(adata, coord_type="grid", n_neighs=4)
    sq.gr.spatial_autocorr(adata, mode="moran", genes=genes, n_perms=None, n_jobs=1)
    return adata.uns["moranI"]["I"].reindex(genes)


moran = pd.DataFrame({"measured": morans_i(measured), "predicted mean": morans_i(pred)})
draw = pred.copy()
per_sample = []
for j in range(pred.obsm["samples"].shape[1]):
    draw.X = pred.obsm["samples"][:, j, :]
    per_sample.append(morans_i(draw))
moran["predicted samples"] = pd.concat(per_sample, axis=1).mean(1)
moran.describe().loc[["mean", "std", "min", "max"]].round(3)"""),
    code("""TOP = 20
rows = {}
for col in ["predicted mean", "predicted samples"]:
    shared = set(moran[col].nlargest(TOP).index) & set(moran["measured"].nlargest(TOP).index)
    rows[col] = {"Spearman r with measured": spearmanr(moran[col], moran["measured"])[0],
                 f"top-{TOP} genes shared": len(shared)}
pd.DataFrame(rows).T.round(2)"""),
    code("""fig, axes = plt.subplots(1, 2, figsize=(8, 3.6), sharex=True)
for ax, col in zip(axes, ["predicted mean", "predicted samples"], strict=True):
    ax.scatter(moran["measured"], moran[col], s=10)
    for g in moran["measured"].nlargest(5).index:
        ax.annotate(g, (moran.loc[g, "measured"], moran.loc[g, col]), fontsize=7)
    ax.set(xlabel="Moran's I, measured", ylabel=f"Moran's I, {col}", title=col)
fig.tight_layout()"""),
    md("""**What to look at.** Each dot is a gene. The predicted *mean* is spatially smooth for every gene (Moran's I
high across the panel, with little spread between genes): it averages 20 samples, and each spot's prediction uses
its neighbours' patches, so neighbouring predictions are alike whatever the gene. Its Moran's I says more about the
model than about the gene, and its ranking of the genes agrees only weakly with the measured one (Spearman r in
the table above). Each *sample* keeps the spread the model learned around the mean; on the samples, genes with a
strong predicted spatial pattern stand out from genes whose predicted variation is mostly noise, and the ranking
moves much closer to the measured one. The top-20 lists overlap about as much either way, and well above chance
(about 4 genes of 20 for random lists from a 101-gene panel). To rank spatially variable genes on predicted
expression, use the samples, not the mean.

Finally, the genes with the highest measured Moran's I, measured and predicted over the H&E (one colour scale per
gene):"""),
    code("""svg = moran["measured"].nlargest(3).index.tolist()
stemst.pl.expression_maps(sdata, svg, pred_key=key, section=TEST);"""),
    md("""## Summary

On a held-out section of the training patient:

- the **expression differences between the measured domains** are largely predicted (fold changes correlate at
  r ≈ 0.7-0.8), though shrunk;
- the **domains found on predicted expression** agree with the measured ones only as well as a partition of the
  section by position alone (ARI table): the prediction is smoother than the data and Leiden cuts it elsewhere;
- **Moran's I** of the predicted mean is inflated for all genes; computed on the samples, it ranks the genes much
  like the measured data.

What this does not show: other patients (a section of another patient scores near zero in *Benchmarks*: stain and
resolution shifts are real), other tissues, or a whole-transcriptome panel. Domains and Moran's I on raw log
counts also partly reflect spot depth (cellularity), which moves all genes together; `sc.pp.normalize_total` on
the measured counts and on `pred.layers["counts"]` gives a depth-free comparison, on which the predictions are
weaker (`mean_pearson_norm` in the evaluation above)."""),
    code("""print(f"run time {(time.perf_counter() - T0) / 60:.1f} min")"""),
]

write(cells, "downstream")
