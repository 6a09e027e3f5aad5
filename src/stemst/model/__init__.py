"""The diffusion engine: pure torch, no AnnData or SpatialData.

One module per concept:

- :mod:`~stemst.model.schedule`: the noise schedule, the forward process and its posterior;
- :mod:`~stemst.model.losses`: parameterisations and improved DDPM's hybrid loss;
- :mod:`~stemst.model.samplers`: ancestral, DDIM and DPM-Solver++(2M) over a step grid, and their registry;
- :mod:`~stemst.model.networks`: the denoisers (gene-token transformer, residual MLP);
- :mod:`~stemst.model.module`: :class:`DiffusionModel`, the network with its schedule and statistics;
- :mod:`~stemst.model.joint`: :class:`JointDiffusionModel`, which denoises a spot with its neighbours;
- :mod:`~stemst.model.training`: the training loop;
- :mod:`~stemst.model.recipe`: the residual recipe on arrays (mean head, early stopping, calibration);
- :mod:`~stemst.model.config`: the settings, grouped and validated;
- :mod:`~stemst.model.presets`: the tuned settings the package uses by default.

:mod:`stemst.tl` wraps it for data in SpatialData / AnnData (:func:`stemst.tl.fit`, :class:`stemst.tl.StemstModel`).
"""

from .config import DiffusionConfig, NetworkConfig, RecipeConfig, TrainingConfig
from .joint import JointDiffusionModel
from .module import DiffusionModel
from .presets import DEFAULT_PRESET, Configs, Preset
from .recipe import RecipeResult, build_module, fit_recipe
from .training import TrainingResult, TrainingState, ema_decay_at, ema_update, lr_at, train, train_step

__all__ = [
    "DiffusionModel",
    "JointDiffusionModel",
    "NetworkConfig",
    "DiffusionConfig",
    "TrainingConfig",
    "RecipeConfig",
    "Preset",
    "Configs",
    "DEFAULT_PRESET",
    "build_module",
    "fit_recipe",
    "RecipeResult",
    "train",
    "train_step",
    "TrainingState",
    "TrainingResult",
    "ema_update",
    "ema_decay_at",
    "lr_at",
]
