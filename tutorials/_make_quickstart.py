"""Build tutorials/her2st_quickstart.ipynb (run with --execute to execute it in place)."""

import nbformat as nbf
from _execute import write

md, code = nbf.v4.new_markdown_cell, nbf.v4.new_code_cell

cells = [
    md("""# Quickstart: expression from H&E on HER2ST

This tutorial predicts the expression of a gene panel at every spot of a held-out breast-cancer section from its H&E
image alone, with stemst's diffusion model, and checks the prediction against the measured counts and against simpler
methods. It runs on a laptop CPU in about 10 minutes.

Data: five serial sections (C2-C6) of one HER2-positive tumour, legacy Spatial Transcriptomics (100 µm spots),
from Andersson et al., *Nature Communications* 2021. We train on C2-C5 and predict C6."""),
    code("""import warnings

import numpy as np
import scanpy as sc
import squidpy as sq

import stemst

warnings.filterwarnings("ignore", category=FutureWarning)
TRAIN, TEST = ["C2", "C3", "C4", "C5"], "C6\""""),
    md("""## Load the data

`stemst.datasets.her2st` downloads the sections once (checksummed) and returns a `SpatialData`: per section an H&E
image (`<section>_he`) and the spots as circles (`<section>_spots`), and one table of raw counts that annotates the
circles. See the *Data model* page for every slot."""),
    code("""sdata = stemst.datasets.her2st([*TRAIN, TEST])
sdata"""),
    code("""table = sdata.tables["table"]
table.obs["section"].value_counts().sort_index()"""),
    code("""stemst.pl.sections(sdata, color="total_counts");"""),
    md("""## Embed the spots' H&E patches

For every spot, a patch centred on it at a fixed physical size is cut from the image, resampled to the encoder's input
and embedded. The default encoder, EfficientNet-Lite0 with ImageNet weights, ships with stemst's dependencies and
works offline; a patch is described by the mean and spread of each of its stages' feature maps (1632 numbers),
which suit tissue better than its final ImageNet features. With access to the Hugging Face hub, pathology encoders
such as UNI or H-optimus are one argument away (`encoder="uni"`). With `augment=True` (the default) the 8
flips/rotations of each patch are embedded too; the model trains on them as extra pairs."""),
    code("""stemst.pp.embed_patches(sdata)
table.obsm["X_efficientnet_lite0"].shape, table.obsm["X_efficientnet_lite0_views"].shape"""),
    md("""## Add each spot's spatial context

Neighbouring spots look alike and express alike. `stemst.pp.spatial_context` gives every spot its own embedding (the
mean over its 8 views) together with the mean embedding of its ring-1 and ring-2 neighbours on the spot grid, each
section standardised on its own. On validation sections inside C2-C5 this lifted a ridge regression's mean Pearson
r from 0.538 to 0.573 (with the encoder's ImageNet features; see the model page of the docs); `fit` uses these
features when they exist."""),
    code("""key_ctx = stemst.pp.spatial_context(sdata)
key_ctx, table.obsm[key_ctx].shape"""),
    md("""## Choose the gene panel on the training sections only

The paper's HMHVG rule: highly variable genes of each training section, then the genes that are both highly expressed
and highly variable in the pooled counts. Choosing the panel with the test section would leak information, so
`train_sections` is required."""),
    code("""stemst.pp.select_genes(sdata, train_sections=TRAIN, n_genes=100)
panel = table.var_names[table.var["stemst_panel"]].tolist()
len(panel), panel[:10]"""),
    md("""## Train the diffusion model

`stemst.tl.fit` fits a mean head (reduced-rank ridge regression, its penalty chosen section by section) and a
diffusion model of what the head misses. It holds out the last training section (C5): training stops when the
held-out loss stops improving, and the spread of the samples is calibrated there so that their intervals mean what
they say. `architecture="neighbourhood"` denoises each spot together with its neighbours (samples with spatial
correlation, at three times the cost); on a GPU the paper's gene-token transformer is `architecture="transformer"`."""),
    code("""model = stemst.tl.fit(sdata, sections=TRAIN)
model"""),
    code("""stemst.pl.training_curve(model);"""),
    md("""## Predict the held-out section

`stemst.tl.predict` draws 20 samples per spot with a fast sampler and stores a new table linked to the same spots:
`X` is the model's mean (what the samples are centred on), `layers["std"]` the samples' spread, `layers["counts"]` expected counts, and
`obsm["samples"]` the samples themselves."""),
    code("""key = stemst.tl.predict(model, sdata, sections=TEST)
pred = sdata.tables[key]
pred"""),
    md("""## How good is it?

`stemst.tl.evaluate` compares predicted with measured expression gene by gene. We also fit three baselines on the same
features and panel (ridge regression, k-nearest neighbours, a small MLP), and a *library-size yardstick* that
predicts each gene from the test spot's own measured depth: it is not a method (it reads the test counts), but it
shows how much of a per-gene correlation on raw log counts is explained by spot depth alone. The `_norm` columns
repeat every metric on library-normalised values."""),
    code("""keys = [key]
for method in ["ridge", "knn", "mlp"]:
    baseline = stemst.tl.fit_baseline(sdata, method=method, sections=TRAIN, embedding_key=model.embedding_key)
    keys.append(stemst.tl.predict(baseline, sdata, sections=TEST))
keys.append(stemst.tl.library_size_yardstick(sdata, train_sections=TRAIN, test_sections=[TEST], genes=model.genes))
cols = ["mean_pearson", "pcc_50", "mse", "rvd", "rvd_samples", "coverage_50", "coverage_90", "mean_pearson_norm"]
stemst.tl.compare(sdata, keys)[cols].round(3)"""),
    code("""result = stemst.tl.evaluate(sdata, pred_key=key)
top = result.per_gene.sort_values("pearson", ascending=False)
top.head(10)[["pearson", "spearman", "mse", "var_ratio", "coverage_90"]].round(3)"""),
    md("""## Look at it

Measured and predicted expression over the H&E, one colour scale per gene:"""),
    code("""genes = top.index[:3].tolist()
stemst.pl.expression_maps(sdata, genes, pred_key=key, section=TEST);"""),
    md("""The diffusion model's samples give each prediction an uncertainty:"""),
    code("""stemst.pl.uncertainty_map(sdata, genes[:2], pred_key=key, section=TEST);"""),
    md("""The gene variation curves of the paper: per-gene mean and variance across spots, predicted against measured.
Every point prediction (stemst's mean included) shrinks the variance across spots; single samples keep it
(`rvd_samples` in the table above, against `rvd` of the means)."""),
    code("""stemst.pl.variation_curves(sdata, pred_key=key);"""),
    code("""stemst.pl.gene_correlation(sdata, pred_keys=keys[:-1]);"""),
    md("""## Downstream with scanpy and squidpy

The predicted table is an ordinary AnnData linked to the spots, so the usual tools apply: clusters of predicted
expression, and spatial autocorrelation (Moran's I) of predicted against measured genes."""),
    code("""sc.pp.pca(pred, n_comps=20)
sc.pp.neighbors(pred, n_neighbors=10)
sc.tl.leiden(pred, resolution=0.5, flavor="igraph", n_iterations=2, directed=False)
pred.obs["leiden"].value_counts()"""),
    code("""sq.gr.spatial_neighbors(pred, coord_type="generic", n_neighs=6)
sq.gr.spatial_autocorr(pred, mode="moran", genes=genes, n_perms=None)
measured = table[table.obs["section"] == TEST].copy()
sq.gr.spatial_neighbors(measured, coord_type="generic", n_neighs=6)
measured.X = measured.X.astype(np.float32)
sc.pp.log1p(measured, base=2)
sq.gr.spatial_autocorr(measured, mode="moran", genes=genes, n_perms=None)
import pandas as pd

pd.DataFrame({"Moran's I predicted": pred.uns["moranI"]["I"], "Moran's I measured": measured.uns["moranI"]["I"]}).round(3)"""),
    md("""## Save the model

A model is a folder with its settings (`config.json`: genes, encoder, transform, architecture, training history) and
its weights; load it on any device."""),
    code("""import tempfile

path = model.save(tempfile.mkdtemp() + "/her2st_model")
stemst.tl.StemstModel.load(path, device="cpu")"""),
]

write(cells, "her2st_quickstart", timeout=3600)
