"""The engine's diffusion maths against closed forms, and the samplers against an exact denoiser for Gaussian data."""

import math

import numpy as np
import pytest
import torch

from stemst.model import losses as L
from stemst.model import samplers as S
from stemst.model import schedule as D

MU, SD = 1.5, 0.6  # target N(MU, SD^2)


@pytest.fixture(scope="module")
def sched():
    return D.make_schedule(1000)


def test_alpha_bar_closed_form(sched):
    t = np.arange(1000)
    betas = 1e-4 + (0.02 - 1e-4) * t / 999
    np.testing.assert_allclose(sched.betas.numpy(), betas, rtol=1e-12)
    np.testing.assert_allclose(sched.alphas_cumprod.numpy(), np.cumprod(1 - betas), rtol=1e-10)
    assert abs(float(sched.alphas_cumprod[-1]) - 4.0358e-5) < 1e-7
    assert sched.alphas_cumprod_prev[0] == 1.0


def test_q_sample_statistics(sched):
    g = torch.Generator().manual_seed(0)
    x0 = torch.full((200_000,), 2.0, dtype=torch.float64)
    for step in (0, 100, 500, 999):
        t = torch.full_like(x0, step, dtype=torch.long)
        xt = D.q_sample(sched, x0, t, torch.randn(x0.shape, generator=g, dtype=torch.float64))
        abar = float(sched.alphas_cumprod[step])
        assert abs(xt.mean().item() - 2.0 * math.sqrt(abar)) < 0.01
        assert abs(xt.var().item() - (1 - abar)) < 0.01 * max(1 - abar, 0.01) + 1e-4


def test_posterior_formulas(sched):
    """q(x_{t-1} | x_t, x_0) by Bayes' rule on the Gaussian forward process."""
    x0, xt = torch.tensor([0.7], dtype=torch.float64), torch.tensor([-0.3], dtype=torch.float64)
    for step in (1, 10, 400, 999):
        t = torch.tensor([step])
        mean, var, logvar = D.q_posterior(sched, x0, xt, t)
        beta, ab_prev = float(sched.betas[step]), float(sched.alphas_cumprod_prev[step])
        # prior x_{t-1} ~ N(sqrt(ab_prev) x0, 1 - ab_prev); likelihood x_t | x_{t-1} ~ N(sqrt(1-beta) x_{t-1}, beta)
        prec = 1 / (1 - ab_prev) + (1 - beta) / beta
        m = (math.sqrt(ab_prev) * 0.7 / (1 - ab_prev) + math.sqrt(1 - beta) * -0.3 / beta) / prec
        assert abs(float(var) - 1 / prec) < 1e-12
        assert abs(float(mean) - m) < 1e-10
        assert abs(float(logvar) - math.log(1 / prec)) < 1e-9


def test_parameterizations_roundtrip(sched):
    g = torch.Generator().manual_seed(1)
    x0, noise = (
        torch.randn(64, 5, generator=g, dtype=torch.float64),
        torch.randn(64, 5, generator=g, dtype=torch.float64),
    )
    t = torch.randint(0, 1000, (64,), generator=g)
    xt = D.q_sample(sched, x0, t, noise)
    for p in L.PARAMETERIZATIONS:
        x0_hat, eps_hat = L.denoised(sched, L.training_target(sched, x0, noise, t, p), xt, t, p)
        torch.testing.assert_close(x0_hat, x0, rtol=1e-6, atol=1e-6 if p != "eps" else 1e-3)
        torch.testing.assert_close(eps_hat, noise, rtol=1e-6, atol=1e-3 if p == "x0" else 1e-6)


def test_vlb_is_zero_for_exact_posterior(sched):
    x0 = torch.randn(8, 3, dtype=torch.float64)
    t = torch.arange(1, 9) * 100
    xt = D.q_sample(sched, x0, t, torch.randn(8, 3, dtype=torch.float64))
    v = -torch.ones_like(x0)  # beta_tilde: the true posterior variance
    assert L.vlb_term(sched, x0, xt, t, x0, v).abs().max() < 1e-9
    assert (L.vlb_term(sched, x0, xt, t, x0 + 0.1, v) > 0).all()


def _exact_gaussian_model(sched):
    """The optimal denoiser for x_0 ~ N(MU, SD^2): posterior mean of x_0, and the exact reverse-step variance as v."""
    abar_all = sched.alphas_cumprod
    lo_all, hi_all = sched.posterior_log_variance, torch.log(sched.betas)

    def model_fn(x, t):
        abar = abar_all[t].to(x.dtype)[:, None]
        a, s2 = abar.sqrt(), 1 - abar
        x0_hat = MU + a * SD**2 * (x - a * MU) / (abar * SD**2 + s2)
        eps = (x - a * x0_hat) / s2.sqrt()
        var_x0 = SD**2 * s2 / (abar * SD**2 + s2)
        var = (
            sched.posterior_variance[t].to(x.dtype)[:, None]
            + sched.posterior_coef_x0[t].to(x.dtype)[:, None] ** 2 * var_x0
        )
        lo, hi = lo_all[t].to(x.dtype)[:, None], hi_all[t].to(x.dtype)[:, None]
        v = (2 * (torch.log(var) - lo) / (hi - lo) - 1).clamp(-1, 1)
        return x0_hat, eps, v

    return model_fn


@pytest.mark.parametrize(
    ("sampler", "steps", "tol_mean", "tol_sd"),
    [
        ("ancestral", 1000, 0.02, 0.03),
        ("ddim", 50, 0.02, 0.04),
        ("dpmpp_2m", 20, 0.02, 0.05),
        ("dpmpp_2m", 10, 0.03, 0.12),
    ],
)
def test_samplers_reproduce_gaussian(sched, sampler, steps, tol_mean, tol_sd):
    g = torch.Generator().manual_seed(0)
    n = 20_000 if sampler != "ancestral" else 5_000
    x = torch.randn(n, 1, generator=g, dtype=torch.float64)
    ts = S.step_grid(sampler, sched.n_steps, steps)
    out = S.REGISTRY[sampler](_exact_gaussian_model(sched), x, sched, ts, generator=g)
    assert abs(out.mean().item() - MU) < tol_mean + 3 * SD / math.sqrt(n)
    assert abs(out.std().item() - SD) < tol_sd * SD + 3 * SD / math.sqrt(2 * n)


def test_sampling_timesteps():
    assert S.timesteps(1000, 1) == [999]
    ts = S.timesteps(1000, 25)
    assert len(ts) == 25 and ts[0] == 999 and ts[-1] == 0 and ts == sorted(ts, reverse=True)
    assert S.timesteps(1000, 4, "uniform") == [999, 666, 333, 0]
    assert S.timesteps(1000, 3) == [999, 250, 0]
    assert len(S.step_grid("ancestral", 1000, 25)) == 1000
    with pytest.raises(ValueError, match="known"):
        S.step_grid("euler", 1000, 10)
    with pytest.raises(ValueError, match="steps"):
        S.timesteps(1000, 0)
    with pytest.raises(ValueError, match="consecutive"):
        S.sample_ancestral(lambda x, t: (x, x, None), torch.zeros(1, 1), D.make_schedule(10), [9, 5, 0])


def test_sampler_callback_gets_state_per_step(sched):
    states = []
    x = torch.randn(4, 1, dtype=torch.float64)
    ts = S.step_grid("dpmpp_2m", sched.n_steps, 6)
    out = S.REGISTRY["dpmpp_2m"](_exact_gaussian_model(sched), x, sched, ts, callback=states.append)
    assert [s["i"] for s in states] == list(range(len(ts))) and [s["t"] for s in states] == ts
    assert set(states[0]) == {"x", "i", "t", "denoised"}
    torch.testing.assert_close(states[-1]["x"], out)
