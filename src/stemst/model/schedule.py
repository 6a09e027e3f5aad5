"""The noise schedule of a discrete Gaussian diffusion: betas, the forward process and its posterior.

Conventions (Ho et al. 2020; Nichol & Dhariwal 2021): ``T`` discrete steps ``t = 0 .. T-1`` with noise levels
``beta_t``; ``abar_t = prod_{s<=t} (1 - beta_s)``; the forward process ``x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps``.
A reverse step's log variance is interpolated by the network's ``v`` in ``[-1, 1]`` between the posterior variance
``beta_tilde_t`` and ``beta_t`` (improved DDPM's learned variance, :func:`model_log_variance`).
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch


@dataclass(frozen=True)
class Schedule:
    """Precomputed quantities of a discrete noise schedule (tensors of length ``T``, float64 as built)."""

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

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> Schedule:
        """Copy of the schedule on ``device`` and/or in ``dtype``.

        Examples
        --------
        >>> make_schedule(10).to(dtype=torch.float32).betas.dtype
        torch.float32
        """
        return Schedule(**{f.name: getattr(self, f.name).to(device=device, dtype=dtype) for f in fields(self)})

    def as_dict(self) -> dict[str, torch.Tensor]:
        """Return the tensors by field name (what :class:`~stemst.model.DiffusionModel` registers as buffers)."""
        return {f.name: getattr(self, f.name) for f in fields(self)}


def linear_betas(n_steps: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02) -> torch.Tensor:
    """Return the linear beta schedule of DDPM (``beta_start .. beta_end`` scaled for ``n_steps`` = 1000).

    Examples
    --------
    >>> linear_betas(1000)[[0, -1]].tolist()
    [0.0001, 0.02]
    """
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


def extract(values: torch.Tensor, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Return ``values[t]`` broadcast against ``like`` (batch first), in ``like``'s dtype and on its device.

    Examples
    --------
    >>> extract(torch.arange(5.0), torch.tensor([1, 3]), torch.zeros(2, 4)).shape
    torch.Size([2, 1])
    """
    out = values.to(like.device)[t].to(like.dtype)
    return out.reshape(out.shape + (1,) * (like.ndim - out.ndim))


def q_sample(sched: Schedule, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """Draw ``x_t ~ q(x_t | x_0)`` given the noise.

    Examples
    --------
    >>> q_sample(make_schedule(), torch.ones(1, 3), torch.tensor([0]), torch.zeros(1, 3)).round(decimals=4).tolist()
    [[1.0, 1.0, 1.0]]
    """
    abar = extract(sched.alphas_cumprod, t, x0)
    return abar.sqrt() * x0 + (1.0 - abar).sqrt() * noise


def q_posterior(
    sched: Schedule, x0: torch.Tensor, xt: torch.Tensor, t: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Mean, variance and (clipped) log variance of ``q(x_{t-1} | x_t, x_0)``."""
    mean = extract(sched.posterior_coef_x0, t, xt) * x0 + extract(sched.posterior_coef_xt, t, xt) * xt
    return mean, extract(sched.posterior_variance, t, xt), extract(sched.posterior_log_variance, t, xt)


def model_log_variance(sched: Schedule, t: torch.Tensor, v: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    """Log variance of a reverse step: ``v`` in [-1, 1] interpolates log(beta_tilde_t) (-1) and log(beta_t) (+1).

    ``v = None`` (no learned variance) gives the posterior variance ``beta_tilde_t``.
    """
    lo = extract(sched.posterior_log_variance, t, like)
    if v is None:
        return lo.expand_as(like)
    hi = extract(torch.log(sched.betas), t, like)
    frac = (v.to(like.dtype) + 1.0) / 2.0
    return frac * hi + (1.0 - frac) * lo
