"""Gaussian diffusion maths: the noise schedule, the training loss and the samplers, as small pure functions.

Conventions (Ho et al. 2020; Nichol & Dhariwal 2021): ``T`` discrete steps ``t = 0 .. T-1`` with noise levels
``beta_t``; ``abar_t = prod_{s<=t} (1 - beta_s)``; the forward process ``x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps``.
A denoiser is wrapped as ``model_fn(x_t, t) -> (x0_hat, eps_hat, v)`` where ``v`` in ``[-1, 1]`` interpolates the
reverse-step log variance between the posterior variance ``beta_tilde_t`` and ``beta_t`` (improved DDPM's learned
variance); :func:`denoised` turns a network's raw output into that triple for each parameterisation.

Samplers take ``model_fn``, the schedule and the starting noise ``x_T`` and return ``x_0``:

- :func:`sample_ancestral`: the paper's 1000-step DDPM sampler with the learned variance;
- :func:`sample_ddim`: DDIM (eta = 0 is deterministic) on a subsequence of ``steps`` time steps;
- :func:`sample_dpmpp_2m`: DPM-Solver++(2M), the second-order multistep solver in data-prediction form over
  ``lambda = log(alpha / sigma)`` (Lu et al. 2022).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

#: ``(x0_hat, eps_hat, v)`` for noisy ``x`` at integer steps ``t``
ModelFn = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]]

PARAMETERIZATIONS = ("eps", "x0", "v")
SAMPLERS = ("dpmpp_2m", "ddim", "ancestral")


@dataclass(frozen=True)
class Schedule:
    """Precomputed quantities of a discrete noise schedule (float64 tensors of length ``T``)."""

    betas: torch.Tensor
    alphas_cumprod: torch.Tensor
    alphas_cumprod_prev: torch.Tensor
    posterior_variance: torch.Tensor
    posterior_log_variance: torch.Tensor  #: clipped at t = 0 (where the posterior variance is 0)
    posterior_coef_x0: torch.Tensor
    posterior_coef_xt: torch.Tensor

    @property
    def n_steps(self) -> int:
        """Number of diffusion steps ``T``."""
        return len(self.betas)

    def to(self, device: torch.device | str) -> Schedule:
        """Copy of the schedule on ``device``."""
        return Schedule(*(getattr(self, f).to(device) for f in self.__dataclass_fields__))


def linear_betas(n_steps: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02) -> torch.Tensor:
    """Return the linear beta schedule of DDPM (``beta_start .. beta_end`` scaled for ``n_steps`` = 1000)."""
    scale = 1000.0 / n_steps
    return torch.linspace(beta_start * scale, beta_end * scale, n_steps, dtype=torch.float64)


def make_schedule(n_steps: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02) -> Schedule:
    """Build the schedule of a linear-beta DDPM.

    Examples
    --------
    >>> s = make_schedule(1000)
    >>> round(float(s.alphas_cumprod[-1]), 6)
    4e-05
    """
    betas = linear_betas(n_steps, beta_start, beta_end)
    alphas = 1.0 - betas
    abar = torch.cumprod(alphas, 0)
    abar_prev = torch.cat([torch.ones(1, dtype=abar.dtype), abar[:-1]])
    post_var = betas * (1.0 - abar_prev) / (1.0 - abar)
    post_logvar = torch.log(torch.cat([post_var[1:2], post_var[1:]]))
    return Schedule(
        betas=betas,
        alphas_cumprod=abar,
        alphas_cumprod_prev=abar_prev,
        posterior_variance=post_var,
        posterior_log_variance=post_logvar,
        posterior_coef_x0=betas * abar_prev.sqrt() / (1.0 - abar),
        posterior_coef_xt=(1.0 - abar_prev) * alphas.sqrt() / (1.0 - abar),
    )


def _at(values: torch.Tensor, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``values[t]`` broadcast against ``like`` (batch first), in ``like``'s dtype."""
    out = values.to(like.device)[t].to(like.dtype)
    return out.reshape(out.shape + (1,) * (like.ndim - out.ndim))


def q_sample(sched: Schedule, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """Draw ``x_t ~ q(x_t | x_0)`` given the noise."""
    abar = _at(sched.alphas_cumprod, t, x0)
    return abar.sqrt() * x0 + (1.0 - abar).sqrt() * noise


def q_posterior(
    sched: Schedule, x0: torch.Tensor, xt: torch.Tensor, t: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Mean, variance and (clipped) log variance of ``q(x_{t-1} | x_t, x_0)``."""
    mean = _at(sched.posterior_coef_x0, t, xt) * x0 + _at(sched.posterior_coef_xt, t, xt) * xt
    return mean, _at(sched.posterior_variance, t, xt), _at(sched.posterior_log_variance, t, xt)


def model_log_variance(sched: Schedule, t: torch.Tensor, v: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    """Log variance of a reverse step: ``v`` in [-1, 1] interpolates log(beta_tilde_t) (-1) and log(beta_t) (+1).

    ``v = None`` (no learned variance) gives the posterior variance ``beta_tilde_t``.
    """
    lo = _at(sched.posterior_log_variance, t, like)
    if v is None:
        return lo.expand_as(like)
    hi = _at(torch.log(sched.betas), t, like)
    frac = (v.to(like.dtype) + 1.0) / 2.0
    return frac * hi + (1.0 - frac) * lo


def denoised(
    sched: Schedule, raw: torch.Tensor, xt: torch.Tensor, t: torch.Tensor, parameterization: str = "eps"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Turn a network's mean output into ``(x0_hat, eps_hat)``.

    Parameters
    ----------
    raw
        The network's output: the noise (``"eps"``, the paper), the clean data (``"x0"``) or the velocity
        ``v = sqrt(abar) eps - sqrt(1 - abar) x0`` (``"v"``).
    """
    abar = _at(sched.alphas_cumprod, t, xt)
    a, s = abar.sqrt(), (1.0 - abar).sqrt()
    if parameterization == "eps":
        return (xt - s * raw) / a, raw
    if parameterization == "x0":
        return raw, (xt - a * raw) / s
    if parameterization == "v":
        return a * xt - s * raw, s * xt + a * raw
    raise ValueError(f"Unknown parameterization {parameterization!r}; known: {list(PARAMETERIZATIONS)}.")


def training_target(
    sched: Schedule, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor, parameterization: str = "eps"
) -> torch.Tensor:
    """Return what the network's mean output regresses on, for each parameterisation."""
    if parameterization == "eps":
        return noise
    if parameterization == "x0":
        return x0
    if parameterization == "v":
        abar = _at(sched.alphas_cumprod, t, x0)
        return abar.sqrt() * noise - (1.0 - abar).sqrt() * x0
    raise ValueError(f"Unknown parameterization {parameterization!r}; known: {list(PARAMETERIZATIONS)}.")


def normal_kl(mean1: torch.Tensor, logvar1: torch.Tensor, mean2: torch.Tensor, logvar2: torch.Tensor) -> torch.Tensor:
    """KL(N(mean1, exp(logvar1)) || N(mean2, exp(logvar2))), elementwise, in nats."""
    return 0.5 * (logvar2 - logvar1 + torch.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * torch.exp(-logvar2) - 1.0)


def gaussian_nll(x: torch.Tensor, mean: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """Negative log density of ``x`` under N(mean, exp(logvar)), elementwise, in nats."""
    return 0.5 * (math.log(2 * math.pi) + logvar + (x - mean) ** 2 * torch.exp(-logvar))


def vlb_term(
    sched: Schedule, x0: torch.Tensor, xt: torch.Tensor, t: torch.Tensor, x0_hat: torch.Tensor, v: torch.Tensor
) -> torch.Tensor:
    """Per-sample variational bound term ``L_t`` in bits per dimension.

    ``KL(q(x_{t-1} | x_t, x_0) || p(x_{t-1} | x_t))`` for ``t > 0``, the decoder NLL ``-log p(x_0 | x_1)`` (a Gaussian
    density: expression is continuous) for ``t = 0``.
    """
    true_mean, _, true_logvar = q_posterior(sched, x0, xt, t)
    model_mean, _, _ = q_posterior(sched, x0_hat, xt, t)
    model_logvar = model_log_variance(sched, t, v, xt)
    kl = normal_kl(true_mean, true_logvar, model_mean, model_logvar)
    nll = gaussian_nll(x0, model_mean, model_logvar)
    per_dim = torch.where((t == 0).reshape(-1, *[1] * (xt.ndim - 1)), nll, kl)
    return per_dim.mean(dim=tuple(range(1, xt.ndim))) / math.log(2.0)


def hybrid_loss(
    sched: Schedule,
    raw: torch.Tensor,
    v: torch.Tensor | None,
    x0: torch.Tensor,
    xt: torch.Tensor,
    t: torch.Tensor,
    noise: torch.Tensor,
    *,
    parameterization: str = "eps",
    vlb_weight: float = 1e-3,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Improved-DDPM hybrid loss ``L_simple + lambda * L_vlb``, per sample.

    ``L_simple`` is the mean squared error of the network's mean output against :func:`training_target`.
    ``L_vlb = T * E_t[L_t]`` is estimated at the sampled ``t`` by ``T * L_t`` (bits per dimension), so with
    ``lambda = 0.001`` and ``T = 1000`` the term is ``L_t`` itself, as in the paper. The mean prediction is detached in
    ``L_vlb``: it trains only the variance output ``v`` (Nichol & Dhariwal 2021).

    Returns
    -------
    ``(loss, mse)``, each of shape ``(batch,)``.
    """
    target = training_target(sched, x0, noise, t, parameterization)
    mse = ((raw.float() - target) ** 2).mean(dim=tuple(range(1, x0.ndim)))
    if v is None or vlb_weight == 0:
        return mse, mse
    x0_hat, _ = denoised(sched, raw.detach().float(), xt, t, parameterization)
    vlb = vlb_term(sched, x0, xt, t, x0_hat, v.float())
    return mse + vlb_weight * sched.n_steps * vlb, mse


# ------------------------------------------------------------------------------------------------------------------
# samplers


def sampling_timesteps(n_train_steps: int, steps: int, spacing: str = "quadratic") -> list[int]:
    """Return ``steps`` distinct integer time steps from ``T - 1`` down to 0.

    ``spacing="quadratic"`` (default) places them at ``(T - 1) u^2`` for ``u`` evenly spaced in [1, 0], which keeps the
    log-SNR increments even enough for the multistep solver (uniform spacing leaves one huge log-SNR jump into
    ``t = 0`` with the linear schedule); ``"uniform"`` spaces them evenly in ``t``.
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}.")
    steps = min(steps, n_train_steps)
    u = torch.linspace(1.0, 0.0, steps, dtype=torch.float64)
    if spacing == "quadratic":
        u = u**2
    elif spacing != "uniform":
        raise ValueError(f"Unknown spacing {spacing!r}; known: ['quadratic', 'uniform'].")
    ts = ((n_train_steps - 1) * u).round().long().tolist()
    return sorted(set(ts), reverse=True)


def _tick(callback: Callable[[], None] | None) -> None:
    if callback is not None:
        callback()


def _tvec(t: int, x: torch.Tensor) -> torch.Tensor:
    return torch.full((x.shape[0],), t, device=x.device, dtype=torch.long)


@torch.no_grad()
def sample_ancestral(
    model_fn: ModelFn,
    sched: Schedule,
    x: torch.Tensor,
    *,
    generator: torch.Generator | None = None,
    callback: Callable[[], None] | None = None,
) -> torch.Tensor:
    """Sample with DDPM's ancestral sampler over all ``T`` steps, with the model's learned variance.

    Parameters
    ----------
    model_fn
        ``(x_t, t) -> (x0_hat, eps_hat, v)``.
    sched
        The training schedule.
    x
        Starting noise ``x_T ~ N(0, I)``.
    generator
        Random generator for the per-step noise.
    callback
        Called after every step (progress bars).
    """
    for t in range(sched.n_steps - 1, -1, -1):
        tt = _tvec(t, x)
        x0_hat, _, v = model_fn(x, tt)
        mean, _, _ = q_posterior(sched, x0_hat, x, tt)
        if t > 0:
            logvar = model_log_variance(sched, tt, v, x)
            noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
            x = mean + torch.exp(0.5 * logvar) * noise
        else:
            x = mean
        _tick(callback)
    return x


@torch.no_grad()
def sample_ddim(
    model_fn: ModelFn,
    sched: Schedule,
    x: torch.Tensor,
    *,
    steps: int = 50,
    eta: float = 0.0,
    spacing: str = "quadratic",
    generator: torch.Generator | None = None,
    callback: Callable[[], None] | None = None,
) -> torch.Tensor:
    """DDIM (Song et al. 2021) on ``steps`` evenly spaced time steps; ``eta = 0`` is the deterministic ODE sampler.

    The last step goes to ``abar = 1``, i.e. it returns the final data prediction. ``spacing``: see
    :func:`sampling_timesteps`.
    """
    ts = sampling_timesteps(sched.n_steps, steps, spacing)
    abar = sched.alphas_cumprod
    for i, t in enumerate(ts):
        x0_hat, eps, _ = model_fn(x, _tvec(t, x))
        a_t = float(abar[t])
        a_next = float(abar[ts[i + 1]]) if i + 1 < len(ts) else 1.0
        sigma = eta * math.sqrt((1 - a_next) / (1 - a_t) * (1 - a_t / a_next)) if a_next < 1.0 else 0.0
        x = math.sqrt(a_next) * x0_hat + math.sqrt(max(1 - a_next - sigma**2, 0.0)) * eps
        if sigma > 0:
            x = x + sigma * torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        _tick(callback)
    return x


@torch.no_grad()
def sample_dpmpp_2m(
    model_fn: ModelFn,
    sched: Schedule,
    x: torch.Tensor,
    *,
    steps: int = 25,
    spacing: str = "quadratic",
    generator: torch.Generator | None = None,
    callback: Callable[[], None] | None = None,
) -> torch.Tensor:
    """DPM-Solver++(2M): second-order multistep ODE solver in data-prediction form over ``lambda = log(alpha/sigma)``.

    With ``alpha_t = sqrt(abar_t)``, ``sigma_t = sqrt(1 - abar_t)`` and ``h = lambda_next - lambda_t``, a step is
    ``x_next = sigma_next / sigma_t * x - alpha_next * (exp(-h) - 1) * D`` where ``D`` is the data prediction, corrected
    with the previous one, ``D = (1 + 1/(2r)) x0_t - 1/(2r) x0_prev`` with ``r = h_prev / h``. The first step and
    the last (to ``sigma = 0``, which returns ``D``) are first order. ``spacing``: see :func:`sampling_timesteps`;
    ``generator`` is unused (deterministic).
    """
    ts = sampling_timesteps(sched.n_steps, steps, spacing)
    abar = sched.alphas_cumprod.double()
    alpha = lambda t: math.sqrt(float(abar[t]))  # noqa: E731
    sigma = lambda t: math.sqrt(1.0 - float(abar[t]))  # noqa: E731
    lam = lambda t: math.log(alpha(t) / sigma(t))  # noqa: E731
    x0_prev, h_prev = None, None
    for i, t in enumerate(ts):
        x0_hat, _, _ = model_fn(x, _tvec(t, x))
        if i + 1 == len(ts):  # final step to sigma = 0
            x = x0_hat
        else:
            s = ts[i + 1]
            h = lam(s) - lam(t)
            d = x0_hat
            if x0_prev is not None:
                r = h_prev / h
                d = (1.0 + 0.5 / r) * x0_hat - (0.5 / r) * x0_prev
            x = (sigma(s) / sigma(t)) * x - alpha(s) * math.expm1(-h) * d
            x0_prev, h_prev = x0_hat, h
        _tick(callback)
    return x


def n_evaluations(sampler: str, steps: int, n_train_steps: int = 1000, spacing: str = "quadratic") -> int:
    """Network evaluations one sampler run takes."""
    if sampler == "ancestral":
        return n_train_steps
    if sampler in SAMPLERS:
        return len(sampling_timesteps(n_train_steps, steps, spacing))
    raise ValueError(f"Unknown sampler {sampler!r}; known: {list(SAMPLERS)}.")


def run_sampler(
    sampler: str,
    model_fn: ModelFn,
    sched: Schedule,
    x: torch.Tensor,
    *,
    steps: int = 25,
    generator: torch.Generator | None = None,
    callback: Callable[[], None] | None = None,
    **kwargs,
) -> torch.Tensor:
    """Dispatch to a sampler by name (``"dpmpp_2m"``, ``"ddim"`` or ``"ancestral"``; ``steps`` unused by the last).

    ``kwargs`` go to the sampler (``spacing``; ``eta`` for DDIM).
    """
    if sampler == "dpmpp_2m":
        return sample_dpmpp_2m(model_fn, sched, x, steps=steps, generator=generator, callback=callback, **kwargs)
    if sampler == "ddim":
        return sample_ddim(model_fn, sched, x, steps=steps, generator=generator, callback=callback, **kwargs)
    if sampler == "ancestral":
        return sample_ancestral(model_fn, sched, x, generator=generator, callback=callback)
    raise ValueError(f"Unknown sampler {sampler!r}; known: {list(SAMPLERS)}.")
