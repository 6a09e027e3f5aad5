"""tl.evaluate, tl.compare and the library-size yardstick on real HER2ST sections (C2 train, C6 test)."""

import numpy as np
import pytest

import stemst
from stemst._schema import StemstDataError
from stemst.tl import Predictor
from stemst.tl._data import get_targets, library_size


class NoisyOracle(Predictor):
    """Reads the measured targets (+ noise) from obsm and samples around them: a predictor with known quality."""

    method = "oracle"
    stochastic = True

    def __init__(self, genes, *, spread):
        super().__init__(genes=genes, embedding_key="X_oracle")
        self.spread = spread

    def sample(self, X, *, n_samples=1, rng=None, progress=True, **kwargs):
        rng = np.random.default_rng(rng)
        return (X[None] + self.spread * rng.normal(size=(n_samples, *X.shape))).astype(np.float32)


def top_genes(table, n):
    mean = np.asarray(table.X.mean(0)).ravel()
    return table.var_names[np.argsort(-mean)[:n]].tolist()


@pytest.fixture(scope="module")
def sdata(her2st_small, sdata_copy):
    """C2 + C6 with a copied table: obsm['X_oracle'] = C6's log2 targets + N(0, 0.5) noise, a yardstick and oracles."""
    table = her2st_small.tables["table"].copy()
    genes = top_genes(table, 30)
    y = get_targets(table, genes, "log2p1")
    table.obsm["X_oracle"] = (y + 0.5 * np.random.default_rng(0).normal(size=y.shape)).astype(np.float32)
    data = sdata_copy(her2st_small, table)
    stemst.tl.predict(
        NoisyOracle(genes, spread=0.5), data, sections="C6", n_samples=60, key_added="calibrated", progress=False
    )
    stemst.tl.predict(
        NoisyOracle(genes, spread=0.1), data, sections="C6", n_samples=60, key_added="narrow", progress=False
    )
    stemst.tl.library_size_yardstick(data, train_sections="C2", test_sections="C6", genes=genes)
    data.genes = genes
    return data


def test_yardstick_table_and_fit(sdata):
    table, pred = sdata.tables["table"], sdata.tables["library_size_prediction"]
    c2, c6 = table[table.obs["section"] == "C2"], table[table.obs["section"] == "C6"]
    assert pred.obs_names.equals(c6.obs_names)
    assert pred.var_names.tolist() == sdata.genes
    assert pred.uns["stemst_prediction"]["method"] == "library_size"
    assert {"std", "counts"} <= set(pred.layers)
    # gene 0: the least-squares line of log2(count + 1) on log1p(total) over C2, evaluated at C6's own totals
    g = sdata.genes[0]
    b, a = np.polyfit(np.log1p(library_size(c2)), get_targets(c2, [g], "log2p1")[:, 0], 1)
    np.testing.assert_allclose(pred[:, g].X.ravel(), a + b * np.log1p(library_size(c6)), rtol=1e-4, atol=1e-4)
    res = stemst.tl.evaluate(sdata, pred_key="library_size_prediction", key_added=None)
    assert res.summary["mean_pearson"] > 0.4  # spot depth alone explains much of the raw per-gene correlation
    with pytest.raises(StemstDataError, match="No test sections"):
        stemst.tl.library_size_yardstick(sdata, train_sections=["C2", "C6"], genes=sdata.genes, overwrite=True)


def test_evaluate_known_quality(sdata):
    res = stemst.tl.evaluate(sdata, pred_key="calibrated")
    pg, s = res.per_gene, res.summary
    assert pg.index.tolist() == sdata.genes and len(pg) == 30
    # X is the mean of samples around truth + N(0, 0.5): errors near the noise variance, strong correlations
    assert s["mse"] == pytest.approx(0.25, rel=0.25)
    assert s["mae"] == pytest.approx(0.5 * np.sqrt(2 / np.pi), rel=0.2)
    assert 0.6 < s["mean_pearson"] < 1.0 and s["pcc_10"] >= s["mean_pearson"]
    assert np.isnan(s["pcc_50"]) and s["n_genes"] == 30 and s["n_spots"] == 178
    # sample spread (0.5) matches the error spread (0.5): calibrated intervals
    assert s["coverage_50"] == pytest.approx(0.5, abs=0.1)
    assert s["coverage_90"] == pytest.approx(0.9, abs=0.07)
    narrow = stemst.tl.evaluate(sdata, pred_key="narrow", key_added=None).summary
    assert narrow["coverage_90"] < 0.4  # over-confident samples cover far less than 90%
    # normalised metrics exist and are finite
    assert 0.3 < s["mean_pearson_norm"] <= 1.0 and np.isfinite(pg["pearson_norm"]).all()
    assert "coverage_50_norm" not in pg.columns
    # stored in the prediction table
    pred = sdata.tables["calibrated"]
    assert pred.uns["stemst_evaluation"]["summary"]["mean_pearson"] == s["mean_pearson"]
    np.testing.assert_allclose(pred.var["pearson"].to_numpy(), pg["pearson"].to_numpy())
    assert repr(res).startswith("Evaluation(oracle, 30 genes")


def test_evaluate_exact_prediction_is_perfect(sdata):
    res = stemst.tl.evaluate(sdata, pred_key="narrow", genes=sdata.genes[:5], key_added=None)
    assert len(res.per_gene) == 5
    table = sdata.tables["table"]
    pred = sdata.tables["narrow"].copy()
    c6 = table[pred.obs_names]
    pred.X = get_targets(c6, pred.var_names, "log2p1")
    pred.layers["counts"] = c6[:, pred.var_names].X.toarray().astype(np.float32)
    sdata.tables["exact"] = pred
    s = stemst.tl.evaluate(sdata, pred_key="exact", key_added=None).summary
    assert s["mean_pearson"] == pytest.approx(1.0) and s["mse"] == pytest.approx(0.0, abs=1e-10)
    assert s["rvd"] == pytest.approx(0.0, abs=1e-10) and s["mean_pearson_norm"] == pytest.approx(1.0)


def test_evaluate_reads_the_model_transform(sdata):
    key = stemst.tl.library_size_yardstick(
        sdata, train_sections="C2", test_sections="C6", genes=sdata.genes, transform="log1p_cp10k", key_added="ls_cp10k"
    )
    s = stemst.tl.evaluate(sdata, pred_key=key, key_added=None).summary
    assert s["transform"] == "log1p_cp10k"
    # measured targets on the cp10k scale are of order log1p(1e4 * share) ~ 3-8, not log2 counts
    assert s["mse"] < 5


def test_compare_and_errors(sdata):
    df = stemst.tl.compare(sdata, ["calibrated", "library_size_prediction"], key_added=None)
    assert df.index.tolist() == ["calibrated", "library_size_prediction"]
    assert df.loc["calibrated", "method"] == "oracle"
    assert {"mean_pearson", "pcc_10", "rvd", "mse", "mean_pearson_norm"} <= set(df.columns)
    assert df.loc["calibrated", "mean_pearson"] > df.loc["library_size_prediction", "mean_pearson"]
    with pytest.raises(KeyError, match="No table 'missing'"):
        stemst.tl.evaluate(sdata, pred_key="missing")
    with pytest.raises(StemstDataError, match="is it a prediction table"):
        stemst.tl.evaluate(sdata, pred_key="table")
    with pytest.raises(StemstDataError, match="absent"):
        stemst.tl.evaluate(sdata, pred_key="calibrated", genes=["NOT_A_GENE"])


def test_normalized_expression_hand_values():
    out = stemst.tl.normalized_expression(np.array([[1.0, 3.0], [0.0, 0.0], [-1.0, 1.0]]))
    np.testing.assert_allclose(out, [[np.log1p(2500), np.log1p(7500)], [0, 0], [0, np.log1p(1e4)]])
