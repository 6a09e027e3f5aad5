"""Metrics: small pure functions checked against hand-computed values."""

import numpy as np
import pytest
from scipy.stats import pearsonr, spearmanr

from stemst.metrics import (
    gene_metrics,
    interval_coverage,
    mae_per_gene,
    mse_per_gene,
    pcc_at_k,
    pearson_per_gene,
    relative_variance_distance,
    spearman_per_gene,
    summary_metrics,
    variance_ratio,
)


def col(*values):
    return np.array(values, dtype=float)[:, None]


def test_pearson_hand_values():
    # centred pred (-1, 0, 1), true (-1, 1, 0): sum of products 1, norms sqrt(2) each -> r = 0.5
    assert pearson_per_gene(col(1, 2, 3), col(1, 3, 2))[0] == pytest.approx(0.5)
    assert pearson_per_gene(col(1, 2, 3), col(3, 2, 1))[0] == pytest.approx(-1.0)
    # invariant to shift and positive scale
    assert pearson_per_gene(col(10, 20, 30), col(1, 3, 2))[0] == pytest.approx(0.5)


def test_spearman_hand_values_with_ties():
    # ranks of true (1, 1, 2) are (1.5, 1.5, 3): centred (-0.5, -0.5, 1) vs (-1, 0, 1) -> 1.5 / sqrt(1.5 * 2)
    assert spearman_per_gene(col(1, 2, 3), col(1, 1, 2))[0] == pytest.approx(1.5 / np.sqrt(3))
    # monotone but non-linear: Spearman 1, Pearson below 1
    x = col(1, 2, 3, 4)
    assert spearman_per_gene(x, x**3)[0] == pytest.approx(1.0)
    assert pearson_per_gene(x, x**3)[0] < 0.99


def test_correlations_match_scipy():
    rng = np.random.default_rng(0)
    pred, true = rng.normal(size=(40, 5)), rng.normal(size=(40, 5))
    true[:, 0] = np.round(true[:, 0])  # ties
    for g in range(5):
        assert pearson_per_gene(pred, true)[g] == pytest.approx(pearsonr(pred[:, g], true[:, g])[0])
        assert spearman_per_gene(pred, true)[g] == pytest.approx(spearmanr(pred[:, g], true[:, g])[0])


def test_constant_genes_are_nan_and_counted():
    pred = np.array([[1.0, 5, 1], [2, 5, 2], [3, 5, 4]])
    true = np.array([[0.1, 1, 2], [0.1, 2, 1], [0.1, 3, 3]])  # gene 0 constant in truth (float), gene 1 in pred
    r = pearson_per_gene(pred, true)
    assert np.isnan(r[0]) and np.isnan(r[1]) and np.isfinite(r[2])
    s = summary_metrics(pred, true, ks=(1, 2))
    assert s["n_undefined"] == 2
    assert s["mean_pearson"] == pytest.approx(r[2])  # NaNs excluded from the mean
    assert s["pcc_1"] == pytest.approx(r[2])
    assert np.isnan(s["pcc_2"])  # fewer defined genes than k


def test_errors_per_gene_and_overall():
    pred = np.array([[0.0, 0], [2, 0]])
    true = np.array([[1.0, 0], [1, 3]])
    np.testing.assert_allclose(mse_per_gene(pred, true), [1.0, 4.5])
    np.testing.assert_allclose(mae_per_gene(pred, true), [1.0, 1.5])
    s = summary_metrics(pred, true)
    assert s["mse"] == pytest.approx((1 + 1 + 0 + 9) / 4)
    assert s["mae"] == pytest.approx((1 + 1 + 0 + 3) / 4)


def test_variance_ratio_and_rvd():
    pred = np.array([[0.0, 0, 1], [1, 2, 1]])  # variances 0.25, 1, 0
    true = np.array([[0.0, 0, 1], [2, 2, 1]])  # variances 1, 1, 0 (gene 2 constant)
    vr = variance_ratio(pred, true)
    assert vr[0] == pytest.approx(0.25) and vr[1] == pytest.approx(1.0) and np.isnan(vr[2])
    # ((0.25 - 1)^2 / 1 + 0) / 2 genes with a non-constant measurement
    assert relative_variance_distance(pred, true) == pytest.approx(0.28125)
    assert relative_variance_distance(true, true) == 0.0


def test_pcc_at_k():
    r = np.array([0.1, 0.9, np.nan, 0.5, -0.2])
    assert pcc_at_k(r, 1) == pytest.approx(0.9)
    assert pcc_at_k(r, 2) == pytest.approx(0.7)
    assert pcc_at_k(r, 4) == pytest.approx((0.9 + 0.5 + 0.1 - 0.2) / 4)
    assert np.isnan(pcc_at_k(r, 5))  # only 4 defined correlations
    with pytest.raises(ValueError, match="k must be"):
        pcc_at_k(r, 0)


def test_interval_coverage_hand_values():
    # 101 samples 0..100 at every spot: central 50% interval [25, 75], 90% interval [5, 95]
    samples = np.tile(np.arange(101.0)[None, :, None], (4, 1, 2))
    true = np.array([[10.0, 4], [30, 5], [50, 96], [80, 100]])
    np.testing.assert_allclose(interval_coverage(samples, true, 0.5), [0.5, 0.0])
    np.testing.assert_allclose(interval_coverage(samples, true, 0.9), [1.0, 0.25])  # ends included
    s = summary_metrics(samples.mean(1), true, samples=samples)
    assert s["coverage_50"] == pytest.approx(0.25)
    assert s["coverage_90"] == pytest.approx(0.625)
    with pytest.raises(ValueError, match="level"):
        interval_coverage(samples, true, 1.0)
    with pytest.raises(ValueError, match="n_spots, n_samples, n_genes"):
        interval_coverage(samples.transpose(1, 0, 2), true, 0.5)


def test_calibrated_samples_cover_their_level():
    rng = np.random.default_rng(1)
    mu = rng.normal(size=(2000, 3))
    true = mu + rng.normal(size=mu.shape)
    samples = mu[:, None, :] + rng.normal(size=(2000, 200, 3))
    assert interval_coverage(samples, true, 0.5).mean() == pytest.approx(0.5, abs=0.03)
    assert interval_coverage(samples, true, 0.9).mean() == pytest.approx(0.9, abs=0.03)
    narrow = mu[:, None, :] + 0.3 * rng.normal(size=(2000, 200, 3))
    assert interval_coverage(narrow, true, 0.9).mean() < 0.5


def test_summary_and_gene_metrics_keys():
    rng = np.random.default_rng(0)
    y = rng.normal(size=(30, 12))
    s = summary_metrics(y, y)
    assert s["mean_pearson"] == pytest.approx(1.0) and s["mse"] == 0.0 and s["rvd"] == 0.0
    assert np.isnan(s["pcc_50"]) and s["pcc_10"] == pytest.approx(1.0)
    assert (s["n_spots"], s["n_genes"], s["n_undefined"]) == (30, 12, 0)
    assert "coverage_50" not in s  # no samples
    g = gene_metrics(y, 2 * y, samples=np.repeat(y[:, None], 3, axis=1))
    assert set(g) >= {"pearson", "spearman", "mse", "mae", "var_ratio", "mean_true", "var_pred", "coverage_90"}
    np.testing.assert_allclose(g["var_ratio"], 0.25)
    with pytest.raises(ValueError, match="same shape"):
        summary_metrics(y, y[:, :3])
