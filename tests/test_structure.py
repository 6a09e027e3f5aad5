"""Downstream fidelity (domains, Moran's I, gene-gene correlation) on real HER2ST C6 counts, with known answers."""

import anndata as ad
import numpy as np
import pytest

import stemst
from stemst.tl._data import get_counts


def prediction_from(table, counts, genes, samples=None):
    pred = ad.AnnData(np.log2(counts + 1).astype(np.float32), obs=table.obs[["section"]].copy())
    pred.obs_names, pred.var_names = table.obs_names, genes
    pred.layers["counts"] = counts.astype(np.float32)
    pred.obsm["spatial"] = np.asarray(table.obsm["spatial"])
    if samples is not None:
        pred.obsm["samples"] = samples.astype(np.float32)
    pred.uns["stemst_prediction"] = {"method": "test", "transform": "log2p1"}
    return pred


@pytest.fixture(scope="module")
def c6(her2st_small, sdata_copy):
    sdata = sdata_copy(her2st_small)
    table = sdata.tables["table"]
    table = table[table.obs["section"] == "C6"]
    genes = table.var_names[np.argsort(-np.asarray(table.X.sum(0)).ravel())[:40]].tolist()
    return sdata, table, genes, get_counts(table, genes)


def test_the_measurement_itself_scores_perfectly(c6):
    sdata, table, genes, counts = c6
    sdata.tables["same"] = prediction_from(table, counts, genes)
    res = stemst.tl.structure_metrics(sdata, pred_key="same")
    assert res["domain_ari"] == pytest.approx(1.0)
    assert res["moran_spearman"] == pytest.approx(1.0)
    assert res["svg_overlap"] == 1.0
    assert res["gene_corr_distance"] == pytest.approx(0.0, abs=1e-12)


def test_spots_shuffled_lose_domains_and_spatial_structure_but_keep_gene_correlation(c6):
    sdata, table, genes, counts = c6
    perm = np.random.default_rng(0).permutation(len(counts))
    samples = np.log2(counts[perm] + 1)[:, None]  # one sample: the shuffled counts again, on the log2 scale
    sdata.tables["shuffled"] = prediction_from(table, counts[perm], genes, samples=samples)
    res = stemst.tl.structure_metrics(sdata, pred_key="shuffled")
    assert abs(res["domain_ari"]) < 0.05
    assert res["moran_spearman"] < 0.5  # Moran's I of shuffled spots is ~0 for every gene
    assert res["gene_corr_distance"] == pytest.approx(0.0, abs=1e-12)  # same spots' profiles, only moved
    one = stemst.tl.structure_metrics(sdata, pred_key="shuffled", sample=0)
    assert one["domain_ari"] == pytest.approx(res["domain_ari"]) and one["gene_corr_distance"] < 1e-6
    with pytest.raises(stemst._schema.StemstDataError, match="no sample 3"):
        stemst.tl.structure_metrics(sdata, pred_key="shuffled", sample=3)


def test_gene_corr_distance_sees_lost_gene_gene_structure(c6):
    """Each gene's values permuted independently: same margins, no gene-gene correlation left."""
    sdata, table, genes, counts = c6
    rng = np.random.default_rng(1)
    indep = np.stack([rng.permutation(c) for c in counts.T], axis=1)
    sdata.tables["indep"] = prediction_from(table, indep, genes)
    assert stemst.tl.structure_metrics(sdata, pred_key="indep")["gene_corr_distance"] > 0.1
