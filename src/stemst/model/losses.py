"""The training loss: what the network regresses on (its parameterisation) and improved DDPM's hybrid loss.

The network's mean output is the noise (``"eps"``, the paper's), the clean data (``"x0"``) or the velocity
``v = sqrt(abar) eps - sqrt(1 - abar) x0`` (``"v"``); :func:`denoised` turns it into the data and noise estimates
the samplers use, :func:`training_target` gives what it is trained to match.
"""

from __future__ import annotations

import math
from typing import Literal

import torch

from stemst.model.schedule import Schedule, extract, model_log_variance, q_posterior

Parameterization = Literal["eps", "x0", "v"]
PARAMETERIZATIONS: tuple[str, ...] = ("eps", "x0", "v")


def _unknown(parameterization: str) -> ValueError:
    return ValueError(f"Unknown parameterization {parameterization!r}; known: {list(PARAMETERIZATIONS)}.")


def denoised(
    sched: Schedule, raw: torch.Tensor, xt: torch.Tensor, t: torch.Tensor, parameterization: Parameterization = "eps"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Turn a network's mean output ``raw`` into ``(x0_hat, eps_hat)``.

    Examples
    --------
    >>> from stemst.model.schedule import make_schedule
    >>> x0, eps = denoised(make_schedule(), torch.zeros(1, 2), torch.ones(1, 2), torch.tensor([0]), "x0")
    >>> x0.tolist()
    [[0.0, 0.0]]
    """
    abar = extract(sched.alphas_cumprod, t, xt)
    a, s = abar.sqrt(), (1.0 - abar).sqrt()
    if parameterization == "eps":
        return (xt - s * raw) / a, raw
    if parameterization == "x0":
        return raw, (xt - a * raw) / s
    if parameterization == "v":
        return a * xt - s * raw, s * xt + a * raw
    raise _unknown(parameterization)


def training_target(
    sched: Schedule, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor, parameterization: Parameterization = "eps"
) -> torch.Tensor:
    """Return what the network's mean output regresses on, for each parameterisation."""
    if parameterization == "eps":
        return noise
    if parameterization == "x0":
        return x0
    if parameterization == "v":
        abar = extract(sched.alphas_cumprod, t, x0)
        return abar.sqrt() * noise - (1.0 - abar).sqrt() * x0
    raise _unknown(parameterization)


def normal_kl(mean1: torch.Tensor, logvar1: torch.Tensor, mean2: torch.Tensor, logvar2: torch.Tensor) -> torch.Tensor:
    """KL(N(mean1, exp(logvar1)) || N(mean2, exp(logvar2))), elementwise, in nats.

    Examples
    --------
    >>> z = torch.zeros(1)
    >>> normal_kl(z, z, z, z).item()
    0.0
    """
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
    parameterization: Parameterization = "eps",
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
