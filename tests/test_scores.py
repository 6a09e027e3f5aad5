"""Proper scores: known answers, the closed-form Gaussian CRPS, and propriety (the true distribution wins)."""

import numpy as np
import pytest
from scipy.stats import norm

from stemst.metrics import crps_per_gene, crps_per_spot, energy_score, neighbour_pairs, variogram_score


def gaussian_crps(mu, sigma, y):
    z = (y - mu) / sigma
    return sigma * (z * (2 * norm.cdf(z) - 1) + 2 * norm.pdf(z) - 1 / np.sqrt(np.pi))


def test_crps_matches_the_gaussian_closed_form():
    rng = np.random.default_rng(0)
    y = np.array([[-1.0, 0.0, 2.5]])
    samples = rng.normal(size=(1, 200_000, 3))
    np.testing.assert_allclose(crps_per_spot(samples, y)[0], gaussian_crps(0.0, 1.0, y[0]), atol=5e-3)


def test_fair_crps_is_unbiased_for_few_samples():
    """With 3 samples per spot, the fair estimator averages to the true CRPS (the plain one would be too high)."""
    rng = np.random.default_rng(1)
    y = np.full((20_000, 1), 0.7)
    samples = rng.normal(size=(20_000, 3, 1))
    assert crps_per_gene(samples, y)[0] == pytest.approx(gaussian_crps(0.0, 1.0, 0.7), abs=0.01)


def test_crps_is_proper_and_one_sample_is_the_absolute_error():
    rng = np.random.default_rng(2)
    y = rng.normal(size=(5000, 4))
    scores = {s: crps_per_gene(rng.normal(scale=s, size=(5000, 10, 4)), y).mean() for s in (0.5, 1.0, 2.0)}
    assert scores[1.0] < scores[0.5] and scores[1.0] < scores[2.0]
    point = rng.normal(size=(5000, 1, 4))
    np.testing.assert_allclose(crps_per_spot(point, y), np.abs(point[:, 0] - y))


def test_energy_score_in_one_dimension_is_the_crps_and_rewards_gene_gene_structure():
    rng = np.random.default_rng(3)
    samples, y = rng.normal(size=(50, 8, 1)), rng.normal(size=(50, 1))
    np.testing.assert_allclose(energy_score(samples, y), crps_per_spot(samples, y)[:, 0])
    # truth: two genes that move together; samples with the same margins, with and without that correlation
    cov = np.array([[1.0, 0.9], [0.9, 1.0]])
    y = rng.multivariate_normal([0, 0], cov, size=4000)
    joint = rng.multivariate_normal([0, 0], cov, size=(4000, 10))
    indep = rng.normal(size=(4000, 10, 2))
    assert energy_score(joint, y).mean() < energy_score(indep, y).mean() - 0.01
    # per gene, the two are the same distribution: CRPS cannot tell them apart
    assert crps_per_gene(joint, y).mean() == pytest.approx(crps_per_gene(indep, y).mean(), abs=0.01)


def test_variogram_score_rewards_spatially_correlated_samples():
    rng = np.random.default_rng(4)
    coords = np.array([[x, y] for x in range(40) for y in range(40)], float)
    pairs = neighbour_pairs(coords)
    # on a square grid, ring 1 (within 1.5 steps) holds the 4 edge and 4 diagonal neighbours, each pair once
    assert len(pairs) == 2 * 40 * 39 + 2 * 39 * 39
    assert (pairs[:, 0] < pairs[:, 1]).all()

    def field(shape):  # unit-variance noise, correlated between neighbours through a shared smooth component
        smooth = rng.normal(size=(*shape[:-1], 1))  # one value per sample, shared by all spots
        return np.sqrt(0.8) * smooth[None] + np.sqrt(0.2) * rng.normal(size=(len(coords), *shape))

    y = field((1,))
    joint = field((30, 1))  # same correlation as the truth
    indep = rng.normal(size=(len(coords), 30, 1))
    assert variogram_score(joint, y, pairs)[0] < 0.5 * variogram_score(indep, y, pairs)[0]
    assert np.isnan(variogram_score(joint, y, np.zeros((0, 2), int))).all()


def test_scores_refuse_mismatched_shapes():
    with pytest.raises(ValueError, match="n_spots, n_samples, n_genes"):
        crps_per_gene(np.zeros((3, 2, 4)), np.zeros((3, 5)))
