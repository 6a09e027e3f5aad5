"""Plots render real figures from HER2ST (C2, C6) and hold the right data."""

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import pytest
from matplotlib.collections import PatchCollection

import stemst
from stemst._schema import section_mask
from stemst.tl import Predictor
from stemst.tl._data import get_targets, library_size


class Jitter(Predictor):
    """A stochastic stand-in predictor: samples around the embedding (the measured log2 targets) with noise."""

    method = "jitter"
    stochastic = True

    def __init__(self, genes):
        super().__init__(genes=genes, embedding_key="X_truth")

    def sample(self, X, *, n_samples=1, rng=None, progress=True, **kwargs):
        rng = np.random.default_rng(rng)
        scale = np.linspace(0.1, 1.0, X.shape[0])[None, :, None]  # spread grows along the spots
        return (X[None] + scale * rng.normal(size=(n_samples, *X.shape))).astype(np.float32)


@pytest.fixture(scope="module")
def sdata(her2st_small, sdata_copy):
    table = her2st_small.tables["table"].copy()
    genes = table.var_names[np.argsort(-np.asarray(table.X.mean(0)).ravel())[:20]].tolist()
    table.obsm["X_truth"] = get_targets(table, genes, "log2p1")
    data = sdata_copy(her2st_small, table)
    stemst.tl.predict(Jitter(genes), data, sections="C6", n_samples=8, key_added="jitter", progress=False)
    stemst.tl.library_size_yardstick(data, train_sections="C2", test_sections="C6", genes=genes)
    data.genes = genes
    yield data
    plt.close("all")


def circles(ax):
    colls = [c for c in ax.collections if isinstance(c, PatchCollection)]
    assert len(colls) == 1
    return colls[0]


def test_sections(sdata, tmp_path):
    table = sdata.tables["table"]
    axes = stemst.pl.sections(sdata, save=tmp_path / "sections.png")
    assert (tmp_path / "sections.png").stat().st_size > 10_000
    assert [ax.get_title() for ax in axes] == ["C2 (187 spots)", "C6 (178 spots)"]
    for ax, s in zip(axes, ["C2", "C6"], strict=True):
        assert len(circles(ax).get_paths()) == int(section_mask(table, s).sum())
        assert len(ax.images) == 1  # the H&E
        x0, x1 = ax.get_xlim()
        assert 0 < x1 - x0 < 9500  # cropped to the spots, in full-resolution pixels
    axes = stemst.pl.sections(sdata, sections="C6", color="total_counts", show=False)
    np.testing.assert_allclose(circles(axes[0]).get_array(), library_size(table[section_mask(table, "C6")]))
    with pytest.raises(KeyError, match="neither"):
        stemst.pl.sections(sdata, color="not_a_column", show=False)


def test_expression_maps(sdata, tmp_path):
    genes = sdata.genes[:2]
    axes = stemst.pl.expression_maps(
        sdata, genes, section="C6", pred_key="library_size_prediction", save=tmp_path / "m.pdf"
    )
    assert (tmp_path / "m.pdf").exists() and axes.shape == (2, 2)
    table, pred = sdata.tables["table"], sdata.tables["library_size_prediction"]
    measured = get_targets(table[pred.obs_names], genes, "log2p1")
    for i, g in enumerate(genes):
        left, right = circles(axes[i, 0]), circles(axes[i, 1])
        assert len(left.get_paths()) == len(right.get_paths()) == 178
        assert left.get_clim() == right.get_clim()  # one colour scale per gene
        np.testing.assert_allclose(left.get_array(), measured[:, i], rtol=1e-6)
        np.testing.assert_allclose(right.get_array(), pred[:, g].X.ravel(), rtol=1e-6)
        assert axes[i, 0].get_title() == f"{g} measured"
    # circles have the physical spot size, in full-resolution pixels
    diameter = stemst._schema.section_info(table, "C6").spot_diameter_px
    assert circles(axes[0, 0]).get_paths()[0].get_extents().width == pytest.approx(diameter, rel=1e-3)
    with pytest.raises(KeyError, match="not in prediction"):
        stemst.pl.expression_maps(sdata, ["NOPE"], section="C6", pred_key="jitter", show=False)


def test_uncertainty_map(sdata, tmp_path):
    genes = sdata.genes[:3]
    axes = stemst.pl.uncertainty_map(sdata, genes, section="C6", pred_key="jitter", save=tmp_path / "u.png")
    assert (tmp_path / "u.png").exists() and len(axes) == 3
    std = sdata.tables["jitter"][:, genes[1]].layers["std"].ravel()
    np.testing.assert_allclose(circles(axes[1]).get_array(), std)
    assert np.corrcoef(std, np.arange(len(std)))[0, 1] > 0.5  # the spread grows along the spots, as simulated


def test_variation_curves(sdata, tmp_path):
    axes = stemst.pl.variation_curves(sdata, pred_key=["jitter", "library_size_prediction"], save=tmp_path / "v.png")
    assert (tmp_path / "v.png").exists() and len(axes) == 2
    res = stemst.tl.evaluate(sdata, pred_key="jitter", key_added=None).per_gene
    line = axes[1].lines[0].get_ydata()
    np.testing.assert_allclose(line, np.sort(res["var_true"].to_numpy()))  # measured variance, ascending
    assert len(axes[1].collections) == 2  # one point set per prediction


def test_gene_correlation(sdata, tmp_path):
    keys = ["jitter", "library_size_prediction"]
    ax = stemst.pl.gene_correlation(sdata, pred_keys=keys, save=tmp_path / "c.png")
    assert (tmp_path / "c.png").exists() and len(ax.lines) == 3  # two curves and the zero line
    r = stemst.tl.evaluate(sdata, pred_key="jitter", key_added=None).per_gene["pearson"].to_numpy()
    np.testing.assert_allclose(ax.lines[0].get_ydata(), np.sort(r)[::-1])
    res = {k: stemst.tl.evaluate(sdata, pred_key=k, key_added=None) for k in keys}
    ax = stemst.pl.gene_correlation(res, kind="box", metric="spearman", show=False)
    assert [t.get_text() for t in ax.get_xticklabels()] == keys
    with pytest.raises(KeyError, match="No per-gene metric"):
        stemst.pl.gene_correlation(res, metric="nope", show=False)


def test_training_curve(tmp_path):
    class Model:
        history = [{"step": s, "loss": 1.0 / s + 0.01 * (s % 3)} for s in range(1, 201)]

    ax = stemst.pl.training_curve(Model(), smooth=10, save=tmp_path / "t.png")
    assert (tmp_path / "t.png").exists()
    raw, smooth = ax.lines[0], ax.lines[1]
    np.testing.assert_allclose(raw.get_ydata(), [h["loss"] for h in Model.history])
    expected = pd.Series(raw.get_ydata()).rolling(10, center=True, min_periods=1).mean()
    np.testing.assert_allclose(smooth.get_ydata(), expected)
    assert ax.get_yscale() == "log"
    val = pd.DataFrame({"step": [1, 2, 3], "loss": [3.0, 2.0, 1.0], "val_loss": [np.nan, 2.5, 1.5]})
    ax = stemst.pl.training_curve(val, show=False)
    assert len(ax.lines) == 3 and list(ax.lines[2].get_ydata()) == [2.5, 1.5]

    class Stopped:  # a stemst model: held-out MSE every other record, the kept step marked
        history = [{"step": s, "loss": 1.0, **({"val_mse": 0.9 + s / 100} if s % 2 else {})} for s in range(1, 7)]
        training = {"early_stopping": {"best_step": 1}}

    ax = stemst.pl.training_curve(Stopped(), show=False)
    np.testing.assert_allclose(ax.lines[2].get_ydata(), [0.91, 0.93, 0.95])
    assert list(ax.lines[3].get_xdata()) == [1, 1]
    with pytest.raises(ValueError, match="'step' and 'loss'"):
        stemst.pl.training_curve([{"epoch": 1}], show=False)
