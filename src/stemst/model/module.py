"""The diffusion model as one :class:`torch.nn.Module`: denoiser, noise schedule and normalisation statistics.

Expression ``y`` (on the target transform's scale) and the condition (an image embedding) never reach the network
as they are: :meth:`DiffusionModel.target` subtracts the mean head's prediction (when the module has one),
:meth:`~DiffusionModel.to_network` / :meth:`~DiffusionModel.from_network` map that to and from the network's data
space and :meth:`~DiffusionModel.condition` standardises (and optionally projects) the condition; both
:meth:`loss` and :meth:`sample` go through them. :meth:`~DiffusionModel.sample` finally applies the spread
calibration (``residual_weight``, ``spread``) fitted on held-out data.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from stemst._torch import autocast
from stemst.model.config import DiffusionConfig, NetworkConfig
from stemst.model.losses import denoised, hybrid_loss
from stemst.model.samplers import Callback, Spacing, get_sampler, step_grid
from stemst.model.schedule import Schedule, make_schedule, q_sample

#: rows of raw conditions standardised and projected at a time (:meth:`DiffusionModel.pca_scores`)
SCORE_CHUNK = 16_384


class DiffusionModel(nn.Module):
    """A conditional diffusion model of ``n_genes`` values given a ``cond_dim``-d condition.

    Buffers: the schedule (float64, rebuilt from ``diffusion``, not saved) and, saved in :meth:`state_dict`, the
    statistics ``emb_mean``, ``emb_std`` (condition standardisation), ``y_mean``, ``y_std`` (target scaling),
    ``y_min``, ``y_max`` (training range of the target, for clipping the data prediction while sampling); with
    ``diffusion.n_pcs``: ``pca_axes`` ``(cond_dim, k)`` and ``pca_sd`` ``(k,)``; with ``diffusion.head_pcs``: the mean
    head ``head_coef`` ``(head_pcs, n_genes)`` and ``head_bias``; always: the calibration ``residual_weight`` (weight
    of the network's mean of the target, 1 = as learned) and ``spread`` (per-gene factor on the samples' deviations
    from that mean, 1 = as learned). Set them from training data with :meth:`set_projection`, :meth:`set_head`,
    :meth:`set_statistics` (in that order) and :meth:`set_calibration`.

    Parameters
    ----------
    n_genes
        Values per sample.
    cond_dim
        Width of the condition.
    network
        The denoiser (:class:`~stemst.model.NetworkConfig`).
    diffusion
        Schedule, parameterisation, loss and data space (:class:`~stemst.model.DiffusionConfig`).

    Examples
    --------
    >>> m = DiffusionModel(5, 3, NetworkConfig(width=16, depth=1))
    >>> m.set_statistics(torch.randn(40, 3), torch.rand(40, 5))
    >>> loss, mse = m.loss(torch.rand(8, 5), torch.randn(8, 3))
    >>> m.sample(torch.randn(2, 3), n_samples=4, steps=5).shape
    torch.Size([4, 2, 5])
    """

    emb_mean: torch.Tensor
    emb_std: torch.Tensor
    y_mean: torch.Tensor
    y_std: torch.Tensor
    y_min: torch.Tensor
    y_max: torch.Tensor

    def __init__(
        self,
        n_genes: int,
        cond_dim: int,
        network: NetworkConfig | None = None,
        diffusion: DiffusionConfig | None = None,
    ) -> None:
        super().__init__()
        self.n_genes, self.cond_dim = int(n_genes), int(cond_dim)
        self.network = network or NetworkConfig()
        self.diffusion = diffusion or DiffusionConfig()
        d = self.diffusion
        self.net = self.network.build(self.n_genes, d.cond_pcs or self.cond_dim)
        for name, values in make_schedule(d.n_steps, d.beta_start, d.beta_end).as_dict().items():
            self.register_buffer(f"schedule_{name}", values, persistent=False)
        for name, size, fill in (
            ("emb_mean", cond_dim, 0.0),
            ("emb_std", cond_dim, 1.0),
            ("y_mean", n_genes, 0.0),
            ("y_std", n_genes, 1.0),
            ("y_min", n_genes, -math.inf),
            ("y_max", n_genes, math.inf),
        ):
            self.register_buffer(name, torch.full((size,), fill))
        if d.n_pcs:
            self.register_buffer("pca_axes", torch.eye(cond_dim, d.n_pcs))
            self.register_buffer("pca_sd", torch.ones(d.n_pcs))
        if d.head_pcs:
            self.register_buffer("head_coef", torch.zeros(d.head_pcs, n_genes))
            self.register_buffer("head_bias", torch.zeros(n_genes))
        if d.head_pcs and d.head_hidden:  # the nonlinear half of the mean head (buffers: never trained here)
            self.register_buffer("mlp_w1", torch.zeros(cond_dim, d.head_hidden))
            self.register_buffer("mlp_b1", torch.zeros(d.head_hidden))
            self.register_buffer("mlp_w2", torch.zeros(d.head_hidden, n_genes))
            self.register_buffer("mlp_b2", torch.zeros(n_genes))
        self.register_buffer("residual_weight", torch.ones(()))
        self.register_buffer("offset_weight", torch.ones(()))
        self.register_buffer("spread", torch.ones(n_genes))

    @property
    def schedule(self) -> Schedule:
        """The noise schedule, on the module's device (float64)."""
        return Schedule(**{name: getattr(self, f"schedule_{name}") for name in Schedule.__dataclass_fields__})

    @property
    def device(self) -> torch.device:
        """Device of the weights."""
        return self.y_mean.device

    @torch.no_grad()
    def set_projection(self, cond: torch.Tensor) -> None:
        """Set the condition standardisation and (with ``diffusion.n_pcs``) its principal axes from ``(n, cond_dim)``."""
        cond64 = cond.double()
        self.emb_mean.copy_(cond64.mean(0))
        self.emb_std.copy_(cond64.std(0, correction=0).clamp_min(1e-6))
        if self.diffusion.n_pcs:
            z = (cond64 - cond64.mean(0)) / self.emb_std.double()
            _, s, vt = torch.linalg.svd(z, full_matrices=False)
            k = self.diffusion.n_pcs
            if k > len(s):
                raise ValueError(f"{k} principal components need at least {k} conditions, got {len(cond)}.")
            self.pca_axes.copy_(vt[:k].T)
            self.pca_sd.copy_((s[:k] / math.sqrt(len(z))).clamp_min(1e-6))

    def pca_scores(self, cond: torch.Tensor) -> torch.Tensor:
        """Scores of raw conditions ``(n, cond_dim)`` on the kept principal axes, ``(n, n_pcs)`` (not whitened).

        Many conditions are scored :data:`SCORE_CHUNK` rows at a time, so the standardised copies stay small (an
        8 µm grid over a section has ~84,000 spots of 4,896-d context: 1.6 GB a copy).
        """
        if len(cond) > SCORE_CHUNK:
            return torch.cat([self.pca_scores(cond[i : i + SCORE_CHUNK]) for i in range(0, len(cond), SCORE_CHUNK)])
        return ((cond - self.emb_mean) / self.emb_std) @ self.pca_axes

    @torch.no_grad()
    def set_head(self, coef: torch.Tensor, bias: torch.Tensor) -> None:
        """Set the mean head: ``head(cond) = pca_scores(cond)[:, :head_pcs] @ coef + bias``."""
        self.head_coef.copy_(coef)
        self.head_bias.copy_(bias)

    @torch.no_grad()
    def set_mlp_head(self, w1: torch.Tensor, b1: torch.Tensor, w2: torch.Tensor, b2: torch.Tensor) -> None:
        """Set the nonlinear half of the head: ``relu(cond @ w1 + b1) @ w2 + b2`` on raw conditions."""
        for name, value in zip(("mlp_w1", "mlp_b1", "mlp_w2", "mlp_b2"), (w1, b1, w2, b2), strict=True):
            getattr(self, name).copy_(torch.as_tensor(value, dtype=torch.float32))

    def linear_head(self, cond: torch.Tensor) -> torch.Tensor:
        """Return the linear head's prediction: ``pca_scores(cond)[:, :head_pcs] @ coef + bias``."""
        return self.pca_scores(cond)[..., : self.diffusion.head_pcs] @ self.head_coef + self.head_bias

    def mlp_head(self, cond: torch.Tensor) -> torch.Tensor:
        """Return the nonlinear head's prediction (``diffusion.head_hidden``)."""
        return torch.relu(cond @ self.mlp_w1 + self.mlp_b1) @ self.mlp_w2 + self.mlp_b2

    def head(self, cond: torch.Tensor) -> torch.Tensor:
        """Return the mean head's prediction ``(n, n_genes)`` on the transform's scale (zeros when there is no head).

        The linear head, or with ``diffusion.head_hidden`` the average of the linear and the nonlinear head.
        """
        if not self.diffusion.head_pcs:
            return torch.zeros((len(cond), self.n_genes), device=cond.device)
        if self.diffusion.head_hidden:
            return 0.5 * (self.linear_head(cond) + self.mlp_head(cond))
        return self.linear_head(cond)

    def target(self, y: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """Return what the diffusion models: ``y`` minus the mean head's prediction (``y`` itself without a head)."""
        return y - self.head(cond) if self.diffusion.head_pcs else y

    @torch.no_grad()
    def set_calibration(
        self, residual_weight: float, spread: torch.Tensor | float, offset_weight: float | None = None
    ) -> None:
        """Set the calibration applied by :meth:`sample`: ``mean + residual_weight * m + spread * (x - m)``.

        ``offset_weight`` (unchanged when ``None``) weighs the target's training mean ``y_mean`` that
        :meth:`from_network` adds back (see :meth:`calibrated_output`).
        """
        self.residual_weight.fill_(float(residual_weight))
        self.spread.copy_(torch.as_tensor(spread, dtype=torch.float32).expand(self.n_genes))
        if offset_weight is not None:
            self.offset_weight.fill_(float(offset_weight))

    def calibrated_output(self, x: torch.Tensor) -> torch.Tensor:
        """:meth:`from_network`, with the target's training mean ``y_mean`` weighted by ``offset_weight``.

        ``y_mean`` is the mean of the cross-fitted residuals of the training sections; whether a new section's
        residuals share it is decided on held-out data (:func:`stemst.model.recipe.calibrate`).
        """
        return self.from_network(x) - (1.0 - self.offset_weight) * self.y_mean

    @torch.no_grad()
    def set_statistics(self, cond: torch.Tensor, y: torch.Tensor, *, projection: bool = True) -> None:
        """Set the normalisation statistics from training conditions ``(n, cond_dim)`` and targets ``(m, n_genes)``.

        Sets the projection first (:meth:`set_projection`; skipped with ``projection=False``, when it was set on
        other rows); the target (``y`` minus the head, see :meth:`target`; then ``m == n``) is standardised per gene
        when ``target_scaling == "standardize"``.
        """
        if projection:
            self.set_projection(cond)
        y = self.target(y.float(), cond.float())
        if self.diffusion.target_scaling == "standardize":
            self.y_mean.copy_(y.mean(0))
            self.y_std.copy_(y.std(0).clamp_min(1e-3))
        self.y_min.copy_(y.min(0).values)
        self.y_max.copy_(y.max(0).values)

    # ---------------------------------------------------------------------------------------------------------------
    # the one place that maps between the user's space and the network's
    def condition(self, cond: torch.Tensor) -> torch.Tensor:
        """Raw conditions ``(n, cond_dim)`` as the network sees them: standardised, or whitened top PCs."""
        k = self.diffusion.cond_pcs
        if k:
            return self.pca_scores(cond)[..., :k] / self.pca_sd[:k]
        return (cond - self.emb_mean) / self.emb_std

    def _regularize(self, c: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        d = self.diffusion
        if not self.training or (d.cond_noise == 0 and d.cond_dropout == 0):
            return c
        noise = torch.randn(c.shape, generator=generator, device=c.device)
        keep = torch.rand((*c.shape[:-1], 1), generator=generator, device=c.device) >= d.cond_dropout
        return (c + d.cond_noise * noise) * keep

    def to_network(self, y: torch.Tensor) -> torch.Tensor:
        """Targets ``(n, n_genes)`` on the transform's scale -> the network's data space."""
        return (y - self.y_mean) / self.y_std

    def from_network(self, x: torch.Tensor) -> torch.Tensor:
        """Inverse of :meth:`to_network`."""
        return x * self.y_std + self.y_mean

    def _clip_range(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        if self.diffusion.clip_margin is None:
            return None
        lo, hi = self.to_network(self.y_min), self.to_network(self.y_max)
        width = hi - lo
        return lo - self.diffusion.clip_margin * width, hi + self.diffusion.clip_margin * width

    # ---------------------------------------------------------------------------------------------------------------
    def forward(self, *args: Any, **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """Return the training loss (:meth:`loss`, same arguments): what DistributedDataParallel runs."""
        return self.loss(*args, **kwargs)

    def loss(
        self,
        y: torch.Tensor,
        cond: torch.Tensor,
        *,
        generator: torch.Generator | None = None,
        rows: slice | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Hybrid loss (:func:`~stemst.model.losses.hybrid_loss`) of a batch, at random steps and noise.

        Parameters
        ----------
        y
            ``(B, n_genes)`` clean targets on the transform's scale.
        cond
            ``(B, cond_dim)`` raw conditions.
        generator
            Draws the time steps, then the noise (then, in training mode, the condition's noise and dropout).
        rows
            Compute the loss of these rows of the batch only (one process's share under data parallelism); the
            random draws are those of the whole batch, so the shares of several processes make up the whole.

        Returns
        -------
        ``(loss, mse)`` per sample, each ``(B,)`` (or the rows'); train on ``loss.mean()``.
        """
        sched = self.schedule.to(dtype=torch.float32)
        x0 = self.to_network(self.target(y, cond))
        t = torch.randint(sched.n_steps, (len(x0),), generator=generator, device=x0.device)
        noise = torch.randn(x0.shape, generator=generator, device=x0.device)
        c = self._regularize(self.condition(cond), generator)
        if rows is not None:
            x0, t, noise, c = x0[rows], t[rows], noise[rows], c[rows]
        xt = q_sample(sched, x0, t, noise)
        with autocast(x0.device):
            raw, v = self.net(xt, t, c)
        d = self.diffusion
        return hybrid_loss(
            sched, raw.float(), v, x0, xt, t, noise, parameterization=d.parameterization, vlb_weight=d.vlb_weight
        )

    def denoise(
        self, x: torch.Tensor, t: torch.Tensor, c: torch.Tensor, *, clip: bool = True
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """One network evaluation as the samplers want it: ``(x0_hat, eps_hat, v)`` in the network's space.

        ``c`` is the standardised condition (:meth:`condition`). With ``clip``, the data prediction is clipped to
        the training range widened by ``clip_margin`` and the noise estimate made consistent with it.
        """
        with autocast(x.device):
            raw, v = self.net(x, t, c)
        x0, eps = self._prediction(raw, x, t, clip=clip)
        return x0, eps, (v.float() if v is not None else None)

    def _prediction(
        self, raw: torch.Tensor, x: torch.Tensor, t: torch.Tensor, *, clip: bool
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(x0_hat, eps_hat)`` from the network's output, the data prediction clipped (see :meth:`denoise`)."""
        sched = self.schedule
        x0, eps = denoised(sched, raw.float(), x, t, self.diffusion.parameterization)
        bounds = self._clip_range() if clip else None
        if bounds is not None:
            x0c = torch.maximum(torch.minimum(x0, bounds[1]), bounds[0])
            abar = sched.alphas_cumprod[t].float()[:, None]
            eps = torch.where(x0c == x0, eps, (x - abar.sqrt() * x0c) / (1 - abar).sqrt())
            x0 = x0c
        return x0, eps

    @torch.no_grad()
    def network_mean(self, c: torch.Tensor) -> torch.Tensor:
        """Estimate the target's conditional mean in the network's space from standardised conditions ``c``.

        The data prediction at the last step from the noise's mode: at ``t = T`` the noisy input carries no
        information about the data, so the prediction is the mean given the condition (one network evaluation).
        """
        t = torch.full((len(c),), self.diffusion.n_steps - 1, device=c.device, dtype=torch.long)
        return self.denoise(torch.zeros((len(c), self.n_genes), device=c.device), t, c, clip=False)[0]

    @torch.no_grad()
    def mean(self, cond: torch.Tensor, *, calibrated: bool = True) -> torch.Tensor:
        """Point prediction ``(n, n_genes)`` on the transform's scale: the head plus the (weighted) network mean.

        With ``calibrated`` the network mean is weighted by ``residual_weight``, as in :meth:`sample`, whose
        samples are centred on it.
        """
        self.eval()
        cond = cond.to(self.device, torch.float32)
        m = self.network_mean(self.condition(cond))
        if not calibrated:
            return self.head(cond) + self.from_network(m)
        return self.head(cond) + self.calibrated_output(self.residual_weight * m)

    @property
    def calibrated(self) -> bool:
        """Whether :meth:`set_calibration` changed the samples (a weight or a spread other than 1)."""
        return bool(self.residual_weight != 1 or self.offset_weight != 1 or (self.spread != 1).any())

    @property
    def default_batch_size(self) -> int:
        """Rows per network call while sampling: 8192 for the MLP, 1024 for the transformer (a quarter on a CPU)."""
        size = 8192 if self.network.architecture == "mlp" else 1024
        return size if self.device.type == "cuda" else size // 4

    @torch.no_grad()
    def sample(
        self,
        cond: torch.Tensor,
        *,
        n_samples: int = 1,
        sampler: str = "dpmpp_2m",
        steps: int = 25,
        spacing: Spacing = "quadratic",
        generator: torch.Generator | None = None,
        batch_size: int | None = None,
        clip: bool = True,
        callback: Callback | None = None,
        **options: Any,
    ) -> torch.Tensor:
        """Draw ``n_samples`` values per condition.

        All conditions x samples are batched together (``batch_size`` rows per network call; row ``r`` is sample
        ``r // n`` of condition ``r % n``), so for a fixed ``generator`` and ``batch_size`` the result is reproducible.

        Parameters
        ----------
        cond
            ``(n, cond_dim)`` raw conditions.
        n_samples
            Samples per condition.
        sampler
            A name in :data:`stemst.model.samplers.REGISTRY`: ``"dpmpp_2m"`` (default), ``"ddim"`` or ``"ancestral"``
            (the paper's, every training step: ``steps`` does not apply).
        steps, spacing
            The step grid (:func:`~stemst.model.samplers.step_grid`): network evaluations per sample.
        generator
            Draws the starting noise (and any per-step noise).
        batch_size
            Rows per network call; default :attr:`default_batch_size`.
        clip
            Clip the data prediction to the training range (see :meth:`denoise`).
        callback
            Called after every step of every batch with the sampler's state dict.
        **options
            Passed to the sampler (``eta`` for DDIM).

        Returns
        -------
        ``(n_samples, n, n_genes)`` float32 samples on the transform's scale.
        """
        fn = get_sampler(sampler)
        ts = step_grid(sampler, self.diffusion.n_steps, steps, spacing)
        batch_size = batch_size or self.default_batch_size
        sched = self.schedule
        c_all = self.condition(cond.to(self.device, torch.float32))
        n, rows = len(c_all), len(c_all) * n_samples
        out = torch.empty((rows, self.n_genes), dtype=torch.float32, device=self.device)
        self.eval()
        for start in range(0, rows, batch_size):
            stop = min(rows, start + batch_size)
            c = c_all[torch.arange(start, stop, device=self.device) % n]
            x = torch.randn((stop - start, self.n_genes), generator=generator, device=self.device)

            def model_fn(x: torch.Tensor, t: torch.Tensor, c: torch.Tensor = c) -> tuple[torch.Tensor, ...]:
                return self.denoise(x, t, c, clip=clip)

            x = fn(model_fn, x, sched, ts, generator=generator, callback=callback, **options)
            if self.calibrated:
                m = self.network_mean(c)
                x = self.residual_weight * m + self.spread * (x - m)
            out[start:stop] = x
        y = self.calibrated_output(out).reshape(n_samples, n, self.n_genes)
        return y + self.head(cond.to(self.device, torch.float32)) if self.diffusion.head_pcs else y
