"""Settings of the diffusion engine, grouped and validated when they are made (before any data is touched).

- :class:`NetworkConfig`: which denoiser and its sizes;
- :class:`DiffusionConfig`: the noise schedule, the parameterisation, the loss, the data space and sampling clip;
- :class:`TrainingConfig`: optimiser, schedule of the learning rate, EMA, steps, logging and checkpoints;
- :class:`RecipeConfig`: what the residual recipe does with held-out data (stopping, calibration) and the target.

The tuned combination the package uses by default is :data:`stemst.model.presets.DEFAULT_PRESET`.

Each converts to and from a JSON-ready dict (:meth:`as_dict`, ``Config(**d)``): a saved model records them.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace
from typing import Any, Literal

from torch import nn

from stemst._errors import warn
from stemst.model.losses import PARAMETERIZATIONS, Parameterization
from stemst.model.networks import ARCHITECTURES, DEFAULTS

Architecture = Literal["mlp", "transformer", "neighbourhood"]
TargetScaling = Literal["standardize", "none"]
LRSchedule = Literal["constant", "cosine"]
#: pairs per step when :attr:`TrainingConfig.batch_size` is ``None`` (or all pairs when there are fewer)
DEFAULT_BATCH_SIZE = 256
#: the learning rate :meth:`TrainingConfig.resolved` uses when ``lr`` is ``None`` and it is given no other
DEFAULT_LR = 1e-3


def _choice(name: str, value: str, known: tuple[str, ...] | list[str]) -> None:
    if value not in known:
        raise ValueError(f"Unknown {name} {value!r}; known: {list(known)}.")


def _at_least(name: str, value: float | None, low: float) -> None:
    if value is not None and not value >= low:
        raise ValueError(f"{name} must be >= {low}, got {value}.")


class _Config:
    def as_dict(self) -> dict[str, Any]:
        """Return the settings as a JSON-ready dict."""
        return asdict(self)  # type: ignore[call-overload]


@dataclass(frozen=True)
class NetworkConfig(_Config):
    """The denoiser: ``"mlp"`` (residual MLP over the gene vector; minutes on a CPU) or ``"transformer"`` (the paper's).

    Sizes left ``None`` take the architecture's defaults (:data:`stemst.model.networks.DEFAULTS`; transformer:
    depth 12, width 384, 6 heads, MLP ratio 4, the paper's; mlp: 3, 256, -, 2). ``dropout`` applies to the MLP only.

    Examples
    --------
    >>> NetworkConfig("transformer", depth=2).width
    384
    """

    architecture: Architecture = "mlp"
    depth: int | None = None
    width: int | None = None
    heads: int | None = None
    mlp_ratio: float | None = None
    dropout: float = 0.0
    learn_variance: bool = True

    def __post_init__(self) -> None:
        _choice("architecture", self.architecture, sorted(ARCHITECTURES))
        for name, default in DEFAULTS[self.architecture].items():
            if getattr(self, name) is None:
                object.__setattr__(self, name, default)
        for name in ("depth", "width", "heads"):
            _at_least(name, getattr(self, name), 1)
        _at_least("mlp_ratio", self.mlp_ratio, 0)
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}.")
        if self.spatial and self.learn_variance:
            object.__setattr__(self, "learn_variance", False)  # trained on the simple loss only
        if self.architecture != "mlp" and self.width % self.heads:
            raise ValueError(f"width ({self.width}) must be divisible by heads ({self.heads}).")

    @property
    def spatial(self) -> bool:
        """Whether the denoiser works on neighbourhoods of spots (``"neighbourhood"``: the joint model)."""
        return self.architecture == "neighbourhood"

    @property
    def default_lr(self) -> float:
        """AdamW learning rate that suits the architecture: 1e-4 for the transformer (the paper's), 1e-3 for the MLP."""
        return 1e-4 if self.architecture == "transformer" else 1e-3

    def build(self, n_genes: int, cond_dim: int) -> nn.Module:
        """Return a freshly initialised denoiser for ``n_genes`` genes and ``cond_dim``-d conditions."""
        kwargs = {"depth": self.depth, "width": self.width, "heads": self.heads, "mlp_ratio": self.mlp_ratio}
        if self.architecture == "mlp":
            kwargs["dropout"] = self.dropout
        return ARCHITECTURES[self.architecture](n_genes, cond_dim, learn_variance=self.learn_variance, **kwargs)


@dataclass(frozen=True)
class DiffusionConfig(_Config):
    """The diffusion process and the space the network works in.

    Attributes
    ----------
    n_steps
        ``T`` of the linear beta schedule (``beta_start .. beta_end`` for T = 1000, scaled for other T).
    parameterization
        What the network predicts: ``"v"`` (velocity, default), ``"eps"`` (noise, the paper's) or ``"x0"`` (data).
    vlb_weight
        ``lambda`` of the hybrid loss ``L_simple + lambda L_vlb`` (paper: 0.001); used with a learned variance.
    target_scaling
        ``"standardize"``: per-gene zero mean, unit variance in the network's space; ``"none"``: values as they are.
    clip_margin
        While sampling, clip the data prediction to the training range widened by this fraction (``None``: never).
    head_pcs
        With a number, the module holds a linear *mean head* on the top ``head_pcs`` principal components of the
        standardised condition (fitted in closed form, see :mod:`stemst.model.head`) and the diffusion models the
        residual around it; ``None``: the diffusion models the expression itself (the paper's).
    head_hidden
        With a number (and ``head_pcs``; without it ``head_hidden`` is dropped), the mean head is the average of
        the linear head and a one-hidden-layer ReLU network of this width on the standardised condition (fitted
        outside the module, e.g. by :func:`stemst.tl.fit`, and stored as buffers, never trained by the diffusion's
        optimiser).
    cond_pcs
        With a number, the network sees the top ``cond_pcs`` principal components of the condition, whitened, in
        place of the whole standardised condition: a low-dimensional condition a few hundred spots cannot memorise.
    cond_noise, cond_dropout
        While training, add Gaussian noise of this standard deviation to the network's condition, and replace it by
        zeros (the mean condition) with this probability: both keep the network from keying on single spots.

    Examples
    --------
    >>> DiffusionConfig(parameterization="eps").n_steps
    1000
    """

    n_steps: int = 1000
    beta_start: float = 1e-4
    beta_end: float = 0.02
    parameterization: Parameterization = "v"
    vlb_weight: float = 1e-3
    target_scaling: TargetScaling = "standardize"
    clip_margin: float | None = 0.1
    head_pcs: int | None = None
    head_hidden: int | None = None
    cond_pcs: int | None = None
    cond_noise: float = 0.0
    cond_dropout: float = 0.0

    def __post_init__(self) -> None:
        _at_least("n_steps", self.n_steps, 2)
        _at_least("head_pcs", self.head_pcs, 1)
        _at_least("head_hidden", self.head_hidden, 1)
        _at_least("cond_pcs", self.cond_pcs, 1)
        _at_least("cond_noise", self.cond_noise, 0)
        if not 0.0 <= self.cond_dropout < 1.0:
            raise ValueError(f"cond_dropout must be in [0, 1), got {self.cond_dropout}.")
        if not 0.0 < self.beta_start < self.beta_end < self.n_steps / 1000.0:
            raise ValueError(f"Need 0 < beta_start < beta_end < T / 1000, got {self.beta_start}, {self.beta_end}.")
        _choice("parameterization", self.parameterization, PARAMETERIZATIONS)
        _choice("target_scaling", self.target_scaling, ("standardize", "none"))
        _at_least("vlb_weight", self.vlb_weight, 0)
        _at_least("clip_margin", self.clip_margin, 0)
        if self.head_pcs is None and self.head_hidden is not None:
            object.__setattr__(self, "head_hidden", None)  # the nonlinear half exists only beside the linear head

    def fitted(self, n: int, dim: int) -> DiffusionConfig:
        """Copy with the component counts capped at what ``n`` conditions of width ``dim`` can give."""
        cap = max(1, min(n, dim))
        return replace(
            self,
            head_pcs=min(self.head_pcs, cap) if self.head_pcs else None,
            cond_pcs=min(self.cond_pcs, cap) if self.cond_pcs else None,
        )

    @property
    def n_pcs(self) -> int:
        """Principal axes of the condition the module keeps (0: none)."""
        return max(self.head_pcs or 0, self.cond_pcs or 0)


@dataclass(frozen=True)
class TrainingConfig(_Config):
    """Optimisation settings of :func:`stemst.model.train`.

    Attributes
    ----------
    steps
        Optimisation steps; ``None``: ``epochs`` passes over the training pairs, or 2000 steps if both are ``None``
        (see :meth:`resolved`).
    epochs
        Alternative to ``steps``: passes over the training pairs (spots x views).
    batch_size
        Pairs per step; ``None``: :data:`DEFAULT_BATCH_SIZE`, or all pairs when there are fewer (a larger explicit
        one is capped with a warning by :meth:`resolved`).
    lr, weight_decay
        AdamW settings; ``lr=None``: the architecture's (:attr:`NetworkConfig.default_lr`).
    lr_schedule
        ``"constant"`` (paper) or ``"cosine"`` (decays to 10 % of ``lr`` over ``steps``).
    warmup_steps
        Linear learning-rate warm-up.
    max_grad_norm
        Clip the gradient norm (``None``: no clipping).
    ema_decay
        Maximum EMA decay (see :func:`stemst.model.ema_decay_at`).
    seed
        Seed of the initialisation and of the training draws.
    log_every
        Steps between history entries (``None``: ``steps // 200``, at least 1).
    checkpoint_every
        Steps between checkpoints (when the loop is given a folder).

    Examples
    --------
    >>> TrainingConfig(epochs=2, batch_size=100).resolved(n_pairs=1000).steps
    20
    """

    steps: int | None = None
    epochs: float | None = None
    batch_size: int | None = None
    lr: float | None = None
    weight_decay: float = 0.0
    lr_schedule: LRSchedule = "constant"
    warmup_steps: int = 0
    max_grad_norm: float | None = 1.0
    ema_decay: float = 0.9999
    seed: int = 0
    log_every: int | None = None
    checkpoint_every: int = 1000

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "log_every", "checkpoint_every"):
            _at_least(name, getattr(self, name), 1)
        if self.epochs is not None and not self.epochs > 0:
            raise ValueError(f"epochs must be > 0, got {self.epochs}.")
        if self.lr is not None and not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}.")
        _at_least("weight_decay", self.weight_decay, 0)
        _choice("lr_schedule", self.lr_schedule, ("constant", "cosine"))
        _at_least("warmup_steps", self.warmup_steps, 0)
        if self.max_grad_norm is not None and not self.max_grad_norm > 0:
            raise ValueError(f"max_grad_norm must be > 0 or None, got {self.max_grad_norm}.")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"ema_decay must be in [0, 1), got {self.ema_decay}.")

    def resolved(self, n_pairs: int, *, default_lr: float = DEFAULT_LR) -> TrainingConfig:
        """Copy with ``batch_size``, ``lr``, ``steps`` and ``log_every`` made concrete for ``n_pairs`` training pairs.

        The one place the batch is chosen: ``None`` takes :data:`DEFAULT_BATCH_SIZE` or all pairs when there are
        fewer; an explicit batch larger than ``n_pairs`` is capped with a warning (it would only repeat pairs).
        Resolving a resolved config changes nothing.
        """
        batch = min(DEFAULT_BATCH_SIZE, n_pairs) if self.batch_size is None else self.batch_size
        if batch > n_pairs:
            warn(
                f"batch_size={batch} exceeds the {n_pairs} training pairs; using {n_pairs} (a larger batch only "
                "repeats pairs and costs time and memory).",
                stacklevel=3,
            )
            batch = n_pairs
        steps = self.steps
        if steps is None:
            steps = math.ceil(self.epochs * n_pairs / batch) if self.epochs is not None else 2000
        return replace(
            self,
            batch_size=int(batch),
            lr=default_lr if self.lr is None else self.lr,
            steps=int(steps),
            log_every=self.log_every or max(1, int(steps) // 200),
        )


@dataclass(frozen=True)
class RecipeConfig(_Config):
    """What :func:`stemst.model.recipe.fit_recipe` does around the training loop, and the target it learns.

    Attributes
    ----------
    patience
        Held-out evaluations without improvement before training stops (one every ``steps // 40`` steps).
    calibrate
        Calibrate the residual-mean weight and the spread of the samples on the held-out group (with a mean head).
    augment
        Train on the embeddings of the 8 flips/rotations of each patch (7 augmented : 1 original, the paper's
        ratio); only without a mean head and with a per-spot network.
    transform
        The target scale (:func:`stemst.pp.transform_counts`): ``"log2p1"``, ``log2(count + 1)``, the paper's.

    Examples
    --------
    >>> RecipeConfig(patience=4).calibrate
    True
    """

    patience: int = 8
    calibrate: bool = True
    augment: bool = False
    transform: str = "log2p1"

    def __post_init__(self) -> None:
        _at_least("patience", self.patience, 1)
