"""Samplers: flat functions from starting noise ``x_T`` to ``x_0`` over a grid of time steps built once outside them.

Every sampler has the signature ``sampler(model_fn, x, sched, ts, *, generator=None, callback=None, **options)``:

- ``model_fn(x_t, t) -> (x0_hat, eps_hat, v)`` is the wrapped denoiser (:meth:`stemst.model.DiffusionModel.denoise`);
- ``ts`` the integer steps to visit, from high noise down to 0 (:func:`step_grid`);
- ``callback``, if given, is called after every step with a state dict ``{"x", "i", "t", "denoised"}`` (the new
  ``x``, the step's index in ``ts``, its time step and the data prediction).

:data:`REGISTRY` maps the names users pass (``sampler="dpmpp_2m"``) to the functions:

- :func:`sample_ancestral`: the paper's 1000-step DDPM sampler with the learned variance;
- :func:`sample_ddim`: DDIM (``eta = 0`` is deterministic) on a subsequence of time steps;
- :func:`sample_dpmpp_2m`: DPM-Solver++(2M), the second-order multistep solver in data-prediction form over
  ``lambda = log(alpha / sigma)`` (Lu et al. 2022).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any, Literal, Protocol

import torch

from stemst.model.schedule import Schedule, model_log_variance, q_posterior

#: ``(x0_hat, eps_hat, v)`` for noisy ``x`` at integer steps ``t``
ModelFn = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]]
#: called after every step with ``{"x", "i", "t", "denoised"}``
Callback = Callable[[dict[str, Any]], None]
Spacing = Literal["quadratic", "uniform"]


class Sampler(Protocol):
    """The signature shared by the samplers of :data:`REGISTRY`."""

    def __call__(
        self,
        model_fn: ModelFn,
        x: torch.Tensor,
        sched: Schedule,
        ts: Sequence[int],
        *,
        generator: torch.Generator | None = None,
        callback: Callback | None = None,
    ) -> torch.Tensor:
        """Run the sampler from ``x`` over ``ts``; return the final ``x_0``."""


def timesteps(n_train_steps: int, steps: int, spacing: Spacing = "quadratic") -> list[int]:
    """Return ``steps`` distinct integer time steps from ``T - 1`` down to 0.

    ``spacing="quadratic"`` (default) places them at ``(T - 1) u^2`` for ``u`` evenly spaced in [1, 0], which keeps the
    log-SNR increments even enough for the multistep solver (uniform spacing leaves one huge log-SNR jump into
    ``t = 0`` with the linear schedule); ``"uniform"`` spaces them evenly in ``t``.

    Examples
    --------
    >>> timesteps(1000, 3)
    [999, 250, 0]
    >>> timesteps(1000, 4, "uniform")
    [999, 666, 333, 0]
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


def _tvec(t: int, x: torch.Tensor) -> torch.Tensor:
    return torch.full((x.shape[0],), t, device=x.device, dtype=torch.long)


@torch.no_grad()
def sample_ancestral(
    model_fn: ModelFn,
    x: torch.Tensor,
    sched: Schedule,
    ts: Sequence[int],
    *,
    generator: torch.Generator | None = None,
    callback: Callback | None = None,
) -> torch.Tensor:
    """DDPM's ancestral sampler with the model's learned variance; ``ts`` must be consecutive steps down to 0.

    Parameters
    ----------
    model_fn
        ``(x_t, t) -> (x0_hat, eps_hat, v)``.
    x
        Starting noise ``x_T ~ N(0, I)``.
    sched
        The training schedule.
    ts
        ``T - 1, T - 2, ..., 0`` (see :func:`step_grid`).
    generator
        Random generator for the per-step noise.
    callback
        Called after every step with the state dict.
    """
    if list(ts) != list(range(ts[0], -1, -1)):
        raise ValueError("The ancestral sampler visits every step: ts must be consecutive down to 0.")
    for i, t in enumerate(ts):
        tt = _tvec(t, x)
        x0_hat, _, v = model_fn(x, tt)
        mean, _, _ = q_posterior(sched, x0_hat, x, tt)
        if t > 0:
            logvar = model_log_variance(sched, tt, v, x)
            noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
            x = mean + torch.exp(0.5 * logvar) * noise
        else:
            x = mean
        if callback is not None:
            callback({"x": x, "i": i, "t": t, "denoised": x0_hat})
    return x


@torch.no_grad()
def sample_ddim(
    model_fn: ModelFn,
    x: torch.Tensor,
    sched: Schedule,
    ts: Sequence[int],
    *,
    eta: float = 0.0,
    generator: torch.Generator | None = None,
    callback: Callback | None = None,
) -> torch.Tensor:
    """DDIM (Song et al. 2021) over ``ts``; ``eta = 0`` is the deterministic ODE sampler.

    The last step goes to ``abar = 1``, i.e. it returns the final data prediction. ``generator`` draws the extra
    noise when ``eta > 0``.
    """
    abar = sched.alphas_cumprod
    for i, t in enumerate(ts):
        x0_hat, eps, _ = model_fn(x, _tvec(t, x))
        a_t = float(abar[t])
        a_next = float(abar[ts[i + 1]]) if i + 1 < len(ts) else 1.0
        sigma = eta * math.sqrt((1 - a_next) / (1 - a_t) * (1 - a_t / a_next)) if a_next < 1.0 else 0.0
        x = math.sqrt(a_next) * x0_hat + math.sqrt(max(1 - a_next - sigma**2, 0.0)) * eps
        if sigma > 0:
            x = x + sigma * torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        if callback is not None:
            callback({"x": x, "i": i, "t": t, "denoised": x0_hat})
    return x


@torch.no_grad()
def sample_dpmpp_2m(
    model_fn: ModelFn,
    x: torch.Tensor,
    sched: Schedule,
    ts: Sequence[int],
    *,
    generator: torch.Generator | None = None,
    callback: Callback | None = None,
) -> torch.Tensor:
    """DPM-Solver++(2M): second-order multistep ODE solver in data-prediction form over ``lambda = log(alpha/sigma)``.

    With ``alpha_t = sqrt(abar_t)``, ``sigma_t = sqrt(1 - abar_t)`` and ``h = lambda_next - lambda_t``, a step is
    ``x_next = sigma_next / sigma_t * x - alpha_next * (exp(-h) - 1) * D`` where ``D`` is the data prediction, corrected
    with the previous one, ``D = (1 + 1/(2r)) x0_t - 1/(2r) x0_prev`` with ``r = h_prev / h``. The first step and
    the last (to ``sigma = 0``, which returns ``D``) are first order. Deterministic: ``generator`` is unused.
    """
    abar = sched.alphas_cumprod.double()
    alpha = {t: math.sqrt(float(abar[t])) for t in ts}
    sigma = {t: math.sqrt(1.0 - float(abar[t])) for t in ts}
    lam = {t: math.log(alpha[t] / sigma[t]) for t in ts}
    x0_prev, h_prev = None, None
    for i, t in enumerate(ts):
        x0_hat, _, _ = model_fn(x, _tvec(t, x))
        if i + 1 == len(ts):  # final step to sigma = 0
            x = x0_hat
        else:
            s = ts[i + 1]
            h = lam[s] - lam[t]
            d = x0_hat
            if x0_prev is not None:
                r = h_prev / h
                d = (1.0 + 0.5 / r) * x0_hat - (0.5 / r) * x0_prev
            x = (sigma[s] / sigma[t]) * x - alpha[s] * math.expm1(-h) * d
            x0_prev, h_prev = x0_hat, h
        if callback is not None:
            callback({"x": x, "i": i, "t": t, "denoised": x0_hat})
    return x


#: the samplers by name
REGISTRY: dict[str, Sampler] = {"dpmpp_2m": sample_dpmpp_2m, "ddim": sample_ddim, "ancestral": sample_ancestral}
#: samplers that visit every training step (``steps`` does not apply to them)
EVERY_STEP = frozenset({"ancestral"})


def get_sampler(name: str) -> Sampler:
    """Return the sampler registered as ``name``; a clear error names the known ones.

    Examples
    --------
    >>> get_sampler("ddim").__name__
    'sample_ddim'
    """
    if name not in REGISTRY:
        raise ValueError(f"Unknown sampler {name!r}; known: {list(REGISTRY)}.")
    return REGISTRY[name]


def step_grid(sampler: str, n_train_steps: int, steps: int, spacing: Spacing = "quadratic") -> list[int]:
    """Time steps ``sampler`` visits: every training step for :data:`EVERY_STEP` samplers, else :func:`timesteps`.

    Its length is the number of network evaluations per sample.

    Examples
    --------
    >>> len(step_grid("ancestral", 1000, 25)), len(step_grid("dpmpp_2m", 1000, 25))
    (1000, 25)
    """
    get_sampler(sampler)
    if sampler in EVERY_STEP:
        return list(range(n_train_steps - 1, -1, -1))
    return timesteps(n_train_steps, steps, spacing)
