"""Joint diffusion of neighbourhoods: a spot and its neighbours are denoised together.

Samples then keep the spatial correlation of real tissue. A *neighbourhood* is a spot (token 0) and up to ``K - 1`` spots around it. For training, each row is one
neighbourhood: targets ``(K, n_genes)`` and conditions ``(K, cond_dim + 3)`` = ``[embedding, dx, dy, valid]``
(:func:`pack`), so :func:`stemst.model.train` needs no change. For sampling, a whole section is denoised at once: at
every step each spot's denoised value comes from the network applied to its own neighbourhood of current values
(overlapping windows, one per spot), and the sampler updates all spots together.
"""

from __future__ import annotations

from typing import Any

import torch

from stemst._torch import autocast
from stemst.model.losses import hybrid_loss
from stemst.model.module import DiffusionModel
from stemst.model.samplers import Callback, Spacing, get_sampler, step_grid
from stemst.model.schedule import q_sample

#: extra condition columns of a neighbourhood token: offset from the centre (grid steps, x and y) and validity
EXTRA = 3


def pack(cond: torch.Tensor, neighbours: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """Neighbourhood conditions ``(n, K, cond_dim + 3)`` from per-spot conditions ``(n, cond_dim)``.

    ``neighbours`` ``(n, K)`` holds row indices (token 0 the spot itself, ``-1`` for padding) and ``offsets``
    ``(n, K, 2)`` the positions relative to the centre in grid steps.

    Examples
    --------
    >>> c = torch.arange(6.0).reshape(3, 2)
    >>> nb = torch.tensor([[0, 1], [1, -1], [2, 0]])
    >>> pack(c, nb, torch.zeros(3, 2, 2))[1].tolist()
    [[2.0, 3.0, 0.0, 0.0, 1.0], [0.0, 0.0, 0.0, 0.0, 0.0]]
    """
    valid = neighbours >= 0
    rows = cond[neighbours.clamp_min(0)] * valid[..., None]
    return torch.cat([rows, offsets.to(cond.dtype) * valid[..., None], valid[..., None].to(cond.dtype)], dim=-1)


def gather(y: torch.Tensor, neighbours: torch.Tensor) -> torch.Tensor:
    """Per-spot values ``(n, G)`` -> neighbourhood values ``(n, K, G)`` (padding rows are zeros)."""
    valid = neighbours >= 0
    return y[neighbours.clamp_min(0)] * valid[..., None]


class JointDiffusionModel(DiffusionModel):
    """A :class:`DiffusionModel` whose network (``"neighbourhood"``) denoises a spot together with its neighbours.

    Everything else (statistics, the mean head, the projection of the condition, calibration) is the parent's,
    applied token by token. Train it on neighbourhood rows (:func:`pack`, :func:`gather`); sample it with the
    neighbourhood structure of the spots (:meth:`sample`).

    Examples
    --------
    >>> from stemst.model import NetworkConfig
    >>> m = JointDiffusionModel(4, 3, NetworkConfig("neighbourhood", width=16, depth=1, heads=2))
    >>> cond, nb = torch.randn(5, 3), torch.tensor([[0, 1], [1, 0], [2, 3], [3, 2], [4, -1]])
    >>> m.set_statistics(cond, torch.rand(5, 4))
    >>> loss, _ = m.loss(gather(torch.rand(5, 4), nb), pack(cond, nb, torch.zeros(5, 2, 2)))
    >>> m.sample(cond, neighbours=nb, offsets=torch.zeros(5, 2, 2), n_samples=2, steps=3).shape
    torch.Size([2, 5, 4])
    """

    def _split(self, cond: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return cond[..., :-EXTRA], cond[..., -EXTRA:-1], cond[..., -1] > 0.5

    def loss(
        self,
        y: torch.Tensor,
        cond: torch.Tensor,
        *,
        generator: torch.Generator | None = None,
        rows: slice | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Return the simple loss of every valid token of a batch of neighbourhoods (``y`` ``(B, K, G)``, ``cond`` packed).

        All tokens of a neighbourhood share one diffusion step. Returns ``(loss, mse)`` per valid token (of the
        neighbourhoods ``rows`` only, if given; the random draws are those of the whole batch).
        """
        sched = self.schedule.to(dtype=torch.float32)
        emb, offsets, valid = self._split(cond)
        x0 = self.to_network(self.target(y, emb))
        t = torch.randint(sched.n_steps, (len(y),), generator=generator, device=y.device)
        noise = torch.randn(x0.shape, generator=generator, device=y.device)
        c = self._regularize(self.condition(emb), generator)
        if rows is not None:
            x0, t, noise, c, offsets, valid = x0[rows], t[rows], noise[rows], c[rows], offsets[rows], valid[rows]
        b, k, g = x0.shape
        tt = t.repeat_interleave(k)
        xt = q_sample(sched, x0.reshape(b * k, g), tt, noise.reshape(b * k, g)).reshape(b, k, g)
        with autocast(y.device):
            raw, _ = self.net(xt * valid[..., None], t, c, offsets, valid)
        keep = valid.reshape(-1)
        flat = [a.reshape(b * k, g)[keep] for a in (raw.float(), x0, xt, noise)]
        return hybrid_loss(
            sched, flat[0], None, flat[1], flat[2], tt[keep], flat[3],
            parameterization=self.diffusion.parameterization, vlb_weight=0.0,
        )  # fmt: skip

    @torch.no_grad()
    def network_mean(self, c: torch.Tensor) -> torch.Tensor:
        """Estimate the network's mean of each spot seen alone (a neighbourhood of one token); see the parent's."""
        n = len(c)
        fn = self._joint_fn(
            c, torch.arange(n, device=c.device)[:, None], torch.zeros((n, 1, 2), device=c.device), clip=False
        )
        t = torch.full((n,), self.diffusion.n_steps - 1, device=c.device, dtype=torch.long)
        return fn(torch.zeros((n, self.n_genes), device=c.device), t)[0]

    def _joint_fn(self, c: torch.Tensor, neighbours: torch.Tensor, offsets: torch.Tensor, *, clip: bool) -> Any:
        """Return the sampler's model function over stacked sections: row ``r``'s neighbourhood is ``neighbours[r]``."""
        valid = neighbours >= 0
        idx = neighbours.clamp_min(0)
        cn, offs = c[idx], offsets * valid[..., None]

        def model_fn(x: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, None]:
            with autocast(x.device):
                raw, _ = self.net(x[idx] * valid[..., None], t, cn, offs, valid)
            x0, eps = self._prediction(raw[:, 0].float(), x, t, clip=clip)
            return x0, eps, None

        return model_fn

    @torch.no_grad()
    def sample(  # type: ignore[override]
        self,
        cond: torch.Tensor,
        *,
        neighbours: torch.Tensor | None = None,
        offsets: torch.Tensor | None = None,
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
        """Draw ``n_samples`` joint samples of all spots: ``(n_samples, n, n_genes)`` on the transform's scale.

        Parameters
        ----------
        cond
            ``(n, cond_dim)`` raw conditions of all spots.
        neighbours, offsets
            The neighbourhood of every spot (see :func:`pack`); ``None``: every spot alone.
        n_samples, sampler, steps, spacing, generator, clip, callback, options
            As for :meth:`DiffusionModel.sample`; the ancestral sampler is not supported.
        batch_size
            Rows (spot x sample) per network call; whole samples are kept together (at least one per call).
        """
        if sampler == "ancestral":
            raise ValueError("The joint model samples with 'dpmpp_2m' or 'ddim' (it has no learned variance).")
        n = len(cond)
        if neighbours is None:
            neighbours = torch.arange(n)[:, None]
            offsets = torch.zeros((n, 1, 2))
        fn, ts = get_sampler(sampler), step_grid(sampler, self.diffusion.n_steps, steps, spacing)
        cond = cond.to(self.device, torch.float32)
        neighbours, offsets = neighbours.to(self.device), offsets.to(self.device, torch.float32)
        c_all = self.condition(cond)
        per_call = max(1, (batch_size or self.default_batch_size) // max(n, 1))
        out = torch.empty((n_samples, n, self.n_genes), device=self.device)
        self.eval()
        m = None
        if self.calibrated:
            m = self._joint_fn(c_all, neighbours, offsets, clip=False)(
                torch.zeros((n, self.n_genes), device=self.device),
                torch.full((n,), self.diffusion.n_steps - 1, device=self.device, dtype=torch.long),
            )[0]
        for start in range(0, n_samples, per_call):
            s = min(n_samples, start + per_call) - start
            shift = (torch.arange(s, device=self.device) * n)[:, None, None]
            nb = torch.where(neighbours >= 0, neighbours[None] + shift, -1).reshape(s * n, -1)
            model_fn = self._joint_fn(c_all.repeat(s, 1), nb, offsets.repeat(s, 1, 1), clip=clip)
            x = torch.randn((s * n, self.n_genes), generator=generator, device=self.device)
            x = fn(model_fn, x, self.schedule, ts, generator=generator, callback=callback, **options).reshape(s, n, -1)
            if m is not None:
                x = self.residual_weight * m + self.spread * (x - m)
            out[start : start + s] = x
        y = self.calibrated_output(out)
        return y + self.head(cond) if self.diffusion.head_pcs else y
