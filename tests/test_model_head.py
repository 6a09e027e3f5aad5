import numpy as np
import pytest

from stemst.metrics import interval_coverage, mean_pearson
from stemst.model.calibration import spread_scales
from stemst.model.head import cross_fitted_residuals, fit_head, reduce_rank, ridge_path


def _low_rank(n=240, k=20, g=30, rank=2, noise=1.0, seed=0):
    rng = np.random.default_rng(seed)
    Z = rng.normal(size=(n, k))
    B = rng.normal(size=(k, rank)) @ rng.normal(size=(rank, g)) / np.sqrt(k)
    return Z, Z @ B + noise * rng.normal(size=(n, g)), np.repeat(np.arange(4), n // 4)


def test_ridge_path_shrinks_monotonically_to_zero():
    Z, Y, _ = _low_rank()
    coefs, _, _ = ridge_path(Z, Y, [0.0, 1.0, 100.0, 1e8])
    norms = [np.linalg.norm(c) for c in coefs]
    assert norms == sorted(norms, reverse=True)
    assert norms[-1] < 1e-3 * norms[0]
    ols = np.linalg.lstsq(np.c_[Z, np.ones(len(Z))], Y, rcond=None)[0][:-1]
    np.testing.assert_allclose(coefs[0], ols, atol=1e-8)


def test_reduce_rank_gives_fitted_values_of_that_rank():
    Z, Y, _ = _low_rank(rank=5)
    (coef,), zm, _ = ridge_path(Z, Y, [1.0])
    for r in (1, 3):
        assert np.linalg.matrix_rank((Z - zm) @ reduce_rank(coef, Z - zm, r), tol=1e-8) == r
    assert reduce_rank(coef, Z - zm, None) is coef


def test_fit_head_picks_low_rank_and_beats_chance_on_new_data():
    Z, Y, _ = _low_rank(n=480, rank=2, noise=2.0)
    train, test = slice(0, 240), slice(240, None)
    head = fit_head(Z[train], Y[train], np.repeat(np.arange(4), 60))
    assert head.cv["best"]["rank"] in (3, 10)  # the truth is rank 2: a low rank wins on held-out groups
    assert mean_pearson(head.predict(Z[test]), Y[test]) > 0.3
    shuffled = np.random.default_rng(1).permutation(Y[test])
    assert abs(mean_pearson(head.predict(Z[test]), shuffled)) < 0.1
    single = fit_head(Z[train], Y[train], np.zeros(240))
    assert "one group" in single.cv["note"] and single.rank is None


def test_cross_fitted_residuals_are_wider_than_in_sample():
    Z, Y, groups = _low_rank(noise=2.0)
    head = fit_head(Z, Y, groups)
    cross = cross_fitted_residuals(Z, Y, groups, head)
    inside = Y - head.predict(Z)
    assert cross.std() > inside.std()
    np.testing.assert_allclose(cross_fitted_residuals(Z, Y, np.zeros(len(Z)), head), inside)


def test_spread_scales_recover_known_factors():
    rng = np.random.default_rng(0)
    truth = np.array([3.0, 0.5, 1.0])
    y = rng.normal(size=(500, 3)) * truth
    samples = rng.normal(size=(100, 500, 3))
    s = spread_scales(samples, y)
    np.testing.assert_allclose(s, truth, rtol=0.12)
    cov = interval_coverage((samples * s).transpose(1, 0, 2), y, 0.9)
    np.testing.assert_allclose(cov, 0.9, atol=0.04)
    # with few spots, one scale for all genes
    s_few = spread_scales(samples[:, :20], y[:20])
    assert len(set(np.round(s_few, 6))) == 1


@pytest.mark.parametrize(
    ("level", "expected"),
    # samples 1..100: the central 50% interval is [25.75, 75.25], the central 90% one [5.95, 95.05]
    [(0.5, [True, False, False, False, False]), (0.9, [True, True, True, False, False])],
)
def test_interval_coverage_known_answer(level, expected):
    samples = np.arange(1, 101, dtype=float)[None, :, None]  # 1..100
    y = np.array([50.0, 10.0, 90.0, 99.9, 0.0])[:, None]
    for i, hit in enumerate(expected):
        assert interval_coverage(samples, y[i : i + 1], level).tolist() == [float(hit)]


def test_mlp_head_learns_a_nonlinear_map_and_lives_in_the_module():
    import torch

    from stemst.model import DiffusionConfig, DiffusionModel, NetworkConfig
    from stemst.model.recipe import fit_mlp_head

    rng = np.random.default_rng(0)
    X = rng.normal(size=(600, 8)) * 3 + 5  # raw scale: the standardisation is folded into the weights
    Y = np.c_[np.abs(X[:, 0] - 5), np.maximum(X[:, 1] - 5, 0), (X[:, 2] - 5) ** 2 / 3] + 0.1 * rng.normal(size=(600, 3))
    train, new = slice(0, 450), slice(450, None)
    w1, b1, w2, b2 = fit_mlp_head(X[train], Y[train], hidden=32, seed=0, alpha=1e-3)
    pred = np.maximum(X[new] @ w1 + b1, 0) @ w2 + b2
    # a linear head cannot fit |x|, relu(x), x^2 (correlation ~0 for the symmetric ones); the MLP does
    assert mean_pearson(pred, Y[new]) > 0.8
    m = DiffusionModel(3, 8, NetworkConfig(width=16, depth=1), DiffusionConfig(head_pcs=4, head_hidden=32))
    m.set_projection(torch.as_tensor(X, dtype=torch.float32))
    m.set_mlp_head(*(torch.as_tensor(a) for a in (w1, b1, w2, b2)))
    out = m.mlp_head(torch.as_tensor(X[new], dtype=torch.float32)).numpy()
    np.testing.assert_allclose(out, pred, rtol=1e-4, atol=1e-4)
    # the head is the average of the (here zero) linear head and the MLP; the MLP weights are buffers, not parameters
    head = m.head(torch.as_tensor(X[new], dtype=torch.float32)).numpy()
    np.testing.assert_allclose(head, 0.5 * pred, rtol=1e-4, atol=1e-4)
    assert "mlp_w1" in m.state_dict() and all(not n.startswith("mlp_") for n, _ in m.named_parameters())


def test_pca_scores_of_many_conditions_are_computed_in_chunks_with_the_same_result(monkeypatch):
    import torch

    import stemst.model.module as module
    from stemst.model import DiffusionConfig, DiffusionModel, NetworkConfig

    X = torch.as_tensor(np.random.default_rng(1).normal(size=(1000, 12)) * 2 + 3, dtype=torch.float32)
    m = DiffusionModel(3, 12, NetworkConfig(width=16, depth=1), DiffusionConfig(head_pcs=6, cond_pcs=4))
    m.set_projection(X)
    whole = m.pca_scores(X)
    monkeypatch.setattr(module, "SCORE_CHUNK", 64)  # 16 chunks, the last one short
    chunked = m.pca_scores(X)
    assert chunked.shape == whole.shape == (1000, m.pca_axes.shape[1])
    torch.testing.assert_close(chunked, whole, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(m.condition(X), whole[:, :4] / m.pca_sd[:4], rtol=1e-5, atol=1e-5)
