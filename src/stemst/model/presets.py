"""The package's tuned settings in one place: the preset :func:`stemst.tl.fit`, the CLI and the benchmarks share.

A :class:`Preset` holds one config of each kind. :meth:`Preset.resolve` combines it with what a caller gives:
a config object replaces the preset's, a dict overrides single fields of it, and the short keyword arguments of
:func:`stemst.tl.fit` (architecture, steps, batch size, seed) override last.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Any, NamedTuple, TypeVar

from stemst.model.config import DiffusionConfig, NetworkConfig, RecipeConfig, TrainingConfig

C = TypeVar("C", NetworkConfig, DiffusionConfig, TrainingConfig, RecipeConfig)


class Configs(NamedTuple):
    """One config of each kind: what a training run is made from."""

    network: NetworkConfig
    diffusion: DiffusionConfig
    training: TrainingConfig
    recipe: RecipeConfig


def _merge(base: C, given: C | dict[str, Any] | None, kind: type[C], argument: str) -> C:
    """``given`` when it is a config, ``base`` with the fields of a dict replaced, else ``base``."""
    if given is None:
        return base
    if isinstance(given, kind):
        return given
    if not isinstance(given, dict):
        raise TypeError(f"{argument} must be a {kind.__name__} or a dict of its fields, got {type(given).__name__}.")
    known = {f.name for f in fields(kind)}
    unknown = sorted(set(given) - known)
    if unknown:
        raise TypeError(f"{argument} has no field(s) {unknown}; {kind.__name__} has {sorted(known)}.")
    return replace(base, **given)


@dataclass(frozen=True)
class Preset:
    """A named set of configs.

    Examples
    --------
    >>> DEFAULT_PRESET.resolve(architecture="transformer", training={"lr": 3e-4}, steps=50).training.steps
    50
    """

    name: str
    network: NetworkConfig
    diffusion: DiffusionConfig
    training: TrainingConfig
    recipe: RecipeConfig

    def resolve(
        self,
        *,
        architecture: str | None = None,
        network: NetworkConfig | dict[str, Any] | None = None,
        diffusion: DiffusionConfig | dict[str, Any] | None = None,
        training: TrainingConfig | dict[str, Any] | None = None,
        recipe: RecipeConfig | dict[str, Any] | None = None,
        steps: int | None = None,
        batch_size: int | None = None,
        seed: int | None = None,
    ) -> Configs:
        """Return the configs of a run: the preset's, with what is given in their place.

        ``architecture`` (``"auto"``: the preset's) picks the denoiser; a ``network`` dict adds sizes to it, a
        :class:`NetworkConfig` replaces both. A denoiser without a learned variance gets ``vlb_weight = 0``, so the
        record says what was trained.
        """
        arch = self.network.architecture if architecture in (None, "auto") else architecture
        if isinstance(network, NetworkConfig):
            if architecture not in (None, "auto") and network.architecture != architecture:
                raise ValueError(
                    f"architecture={architecture!r} disagrees with network=NetworkConfig({network.architecture!r}); "
                    "give one of them."
                )
            net = network
        else:
            given = (network or {}).get("architecture")
            if given is not None and architecture not in (None, "auto") and given != architecture:
                raise ValueError(
                    f"architecture={architecture!r} disagrees with network={{'architecture': {given!r}, ...}}; give "
                    "one of them."
                )
            net = _merge(
                NetworkConfig(given or arch),
                {"architecture": given or arch, **(network or {})},
                NetworkConfig,
                "network",
            )
        diff = _merge(self.diffusion, diffusion, DiffusionConfig, "diffusion")
        if not net.learn_variance:
            diff = replace(diff, vlb_weight=0.0)
        train = _merge(self.training, training, TrainingConfig, "training")
        given = {"steps": steps, "batch_size": batch_size, "seed": seed}
        train = replace(train, **{k: v for k, v in given.items() if v is not None})
        return Configs(net, diff, train, _merge(self.recipe, recipe, RecipeConfig, "recipe"))


#: the settings :func:`stemst.tl.fit` uses unless told otherwise, chosen on validation folds inside HER2ST C2-C5
#: (``docs/model.md``): the residual MLP, v-prediction, a mean head on 256 principal components averaged with a
#: 256-wide MLP head, the network seeing 8 whitened components with noise 1.0 and dropout 0.3; AdamW at the
#: architecture's learning rate, the default batch, held-out early stopping with patience 8 and calibration
DEFAULT_PRESET = Preset(
    name="residual_mlp",
    network=NetworkConfig("mlp"),
    diffusion=DiffusionConfig(
        parameterization="v", head_pcs=256, head_hidden=256, cond_pcs=8, cond_noise=1.0, cond_dropout=0.3
    ),
    training=TrainingConfig(),
    recipe=RecipeConfig(),
)
