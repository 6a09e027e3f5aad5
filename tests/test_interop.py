"""A predicted table goes as it is into spatialdata-plot, scanpy and squidpy (issue 12 item 3), on real HER2ST data.

A tiny stemst model is trained on section C2 (colour-statistics embeddings, 30 genes) and predicts C2 and C6; no
test converts the prediction before handing it to the other tool.
"""

from __future__ import annotations

import warnings

import matplotlib
import numpy as np
import pytest

import stemst
from stemst import _schema

matplotlib.use("Agg")

EMBEDDING = "X_color_stats"


@pytest.fixture(scope="module")
def predicted(her2st_small, sdata_copy):
    """The SpatialData holding the counts and a prediction table of C2 and C6, and the prediction's key."""
    sdata = sdata_copy(her2st_small)
    stemst.pp.embed_patches(sdata, encoder="color_stats", augment=False, progress=False)
    stemst.pp.select_genes(sdata, train_sections=["C2"], n_genes=30)
    model = stemst.tl.fit(
        sdata,
        sections="C2",
        embedding_key=EMBEDDING,
        steps=20,
        network={"width": 32, "depth": 1},
        validation=None,
        recipe={"calibrate": False},
    )
    key = stemst.tl.predict(model, sdata, n_samples=5, rng=0, progress=False)
    return sdata, key


def _level_2(sdata, section: str):
    """Pyramid level 2 of a section's H&E as a single-scale image, placed over the full-resolution pixels."""
    from spatialdata.models import Image2DModel
    from spatialdata.transformations import Scale

    full = _schema.get_image(sdata, section).shape
    small = np.asarray(_schema.get_image(sdata, section, scale=2))
    factors = [full[1] / small.shape[1], full[2] / small.shape[2]]
    return Image2DModel.parse(small, dims=("c", "y", "x"), transformations={section: Scale(factors, axes=("y", "x"))})


def test_spatialdata_plot_draws_a_predicted_gene_and_its_uncertainty_over_the_he(predicted):
    import matplotlib.pyplot as plt
    import spatialdata as sd
    import spatialdata_plot  # noqa: F401  (registers the .pl accessor)

    sdata, key = predicted
    table = sdata.tables[key]
    c6 = table[table.obs["section"] == "C6"]
    plotted = sd.SpatialData(  # the same table and circles; the H&E cropped to pyramid level 2 to keep the test fast
        images={"C6_he": _level_2(sdata, "C6")}, shapes={"C6_spots": sdata.shapes["C6_spots"]}, tables={key: table}
    )
    gene = "ERBB2" if "ERBB2" in table.var_names else str(table.var_names[0])
    cmap = matplotlib.colormaps["viridis"]  # spatialdata-plot's default for continuous values
    fig, axes = plt.subplots(1, 2, figsize=(8, 4))
    try:
        for ax, layer in zip(axes, [None, "std"], strict=True):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)  # spatialdata's note that C2 is not in `plotted`
                (
                    plotted.pl.render_images("C6_he")
                    .pl.render_shapes("C6_spots", color=gene, table_name=key, table_layer=layer)
                    .pl.show(coordinate_systems="C6", ax=ax)
                )
            assert len(ax.images) == 1  # the H&E behind the spots
            faces = ax.collections[0].get_facecolors()
            values = np.asarray(c6[:, gene].X if layer is None else c6[:, gene].layers[layer]).ravel()
            assert len(faces) == c6.n_obs == len(plotted.shapes["C6_spots"]) and np.ptp(values) > 0
            # the spot with the highest value gets the top colour, the lowest the bottom one
            np.testing.assert_allclose(faces[np.argmax(values)], cmap(1.0), atol=1e-3)
            np.testing.assert_allclose(faces[np.argmin(values)], cmap(0.0), atol=1e-3)
    finally:
        plt.close(fig)


def test_scanpy_clusters_the_predicted_table(predicted):
    import scanpy as sc

    sdata, key = predicted
    table = sdata.tables[key]
    sc.pp.pca(table, n_comps=10)
    sc.pp.neighbors(table, n_neighbors=10, use_rep="X_pca", method="gauss")
    sc.tl.leiden(table, flavor="igraph", n_iterations=2, random_state=0)
    clusters = table.obs["leiden"]
    assert clusters.nunique() >= 2
    # the clusters separate the predicted expression: most of the variance of PC 1 lies between clusters
    pc1 = table.obsm["X_pca"][:, 0]
    means = {c: pc1[(clusters == c).to_numpy()].mean() for c in clusters.cat.categories}
    between = np.sum([(clusters == c).sum() * (m - pc1.mean()) ** 2 for c, m in means.items()])
    assert between / np.sum((pc1 - pc1.mean()) ** 2) > 0.5


def test_squidpy_scores_the_predicted_table_per_section(predicted):
    import squidpy as sq

    sdata, key = predicted
    table = sdata.tables[key]
    sq.gr.spatial_neighbors(table, coord_type="generic", n_neighs=6, library_key="section")
    graph = table.obsp["spatial_connectivities"].copy()
    rows, cols = graph.nonzero()
    sections = table.obs["section"].cat.codes.to_numpy()
    assert graph.nnz >= 6 * table.n_obs and (sections[rows] == sections[cols]).all()  # no edge across sections
    sq.gr.spatial_autocorr(table, mode="moran", n_perms=None, show_progress_bar=False)
    moran = table.uns["moranI"]
    assert set(moran.index) == set(table.var_names) and moran["I"].notna().all()
    assert (moran["I"] > 0).mean() > 0.8  # predictions from neighbouring patches are alike
    # the same graph from the SpatialData, through the circles the table annotates
    circles = {_schema.spots_key(s): s for s in ("C2", "C6")}
    sq.gr.spatial_neighbors(
        sdata,
        table_key=key,
        elements_to_coordinate_systems=circles,
        coord_type="generic",
        n_neighs=6,
        library_key="section",
    )
    assert (sdata.tables[key].obsp["spatial_connectivities"] != graph).nnz == 0
