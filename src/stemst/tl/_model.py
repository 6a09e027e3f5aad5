"""The trained Stem model for users: the engine's module with its gene panel and encoder, sampling, save / load."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from stemst._atomic import Swap, check_destination, recover, replacing
from stemst._errors import StemstFileError
from stemst._torch import resolve_device, torch_generator
from stemst._utils import RNGLike, read_json, reading
from stemst._version import __version__
from stemst.model import DiffusionConfig, DiffusionModel, JointDiffusionModel, NetworkConfig, build_module
from stemst.model.networks import n_parameters
from stemst.model.samplers import step_grid
from stemst.tl._base import Predictor

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "weights.pt"
#: 2 (stemst after 0.1.0): ``weights.pt`` holds :meth:`DiffusionModel.state_dict`, the settings are grouped as the
#: engine's configs; 1 (stemst 0.1.0): ``net.*`` and ``stats.*`` tensors, flat settings (converted on load)
FORMAT_VERSION = 2
#: buffers added to format 2 later (identity when absent: the samples as the network draws them)
CALIBRATION_BUFFERS = ("residual_weight", "offset_weight", "spread")


def _upgrade_format_1(config: dict[str, Any], tensors: dict[str, torch.Tensor]) -> tuple[dict, dict]:
    """Config and weights of a model saved by stemst 0.1.0 (format 1) in today's layout."""
    new = {k: config[k] for k in ("genes", "embedding_key", "transform", "cond_dim")}
    new["encoder"] = config.get("encoder", {})
    new["network"] = {"architecture": config["architecture"], **config["net"]}
    new["diffusion"] = {**config["diffusion"], **{k: config[k] for k in ("target_scaling", "clip_margin")}}
    new["training"] = {
        **config.get("training", {}),
        "steps_trained": config.get("steps_trained", 0),
        "final_loss": config.get("final_loss"),
    }
    state = {k.removeprefix("stats."): v for k, v in tensors.items()}
    return new, state


def _check_format(path: Path, meta: dict[str, Any]) -> None:
    """Refuse a model folder whose ``config.json`` has no known format version, saying what to do."""
    version = meta.get("format_version")
    if version in (1, FORMAT_VERSION):
        return
    if version is None or "stemst_version" not in meta:
        raise StemstFileError(
            path / CONFIG_FILE,
            f"has no {'format_version' if version is None else 'stemst_version'}: it was not written by "
            "StemstModel.save, or was edited. Restore the folder from a copy, or save the model again.",
        )
    writer = meta["stemst_version"]
    remedy = (
        "The file was edited (this very version writes other formats): restore it, or save the model again."
        if str(writer) == __version__
        else f"Load it with stemst {writer}, which wrote it, or upgrade stemst."
    )
    raise StemstFileError(
        path / CONFIG_FILE,
        f"is in model format {version!r}, written by stemst {writer}; this stemst ({__version__}) reads formats 1 "
        f"to {FORMAT_VERSION}. {remedy}",
    )


class StemstModel(Predictor):
    """A trained Stem conditional diffusion model (see :func:`stemst.tl.fit`).

    Parameters
    ----------
    module
        The engine: denoiser (with the exponential moving average of the training weights, which is what sampling
        uses), noise schedule and normalisation statistics.
    genes, embedding_key, transform, encoder
        What the model predicts and from which embeddings (see :class:`~stemst.tl.Predictor`).
    training
        JSON-ready record of the training: its settings, the data it saw, ``steps_trained`` and ``final_loss``.
    history
        Training curve: one dict per logged step with ``step``, ``loss``, ``mse``, ``lr``, ``time`` (seconds).
    ood
        The training spots' embedding reference of the out-of-distribution score (:mod:`stemst.tl._ood`), or
        ``None`` (models saved before it existed: no score).
    adaptation
        Set by :func:`stemst.tl.adapt`: the per-gene offsets and spread scales :func:`stemst.tl.predict` applies.

    Examples
    --------
    >>> model  # doctest: +ELLIPSIS
    StemstModel(mlp depth=1, width=32, ...)
    >>> X = sdata.tables["table"].obsm["X_color_stats"][:5]
    >>> model.sample(X, n_samples=20, steps=25, progress=False).shape  # (samples, spots, genes)
    (20, 5, 20)
    >>> path = model.save("model")
    >>> stemst.tl.StemstModel.load(path).genes == model.genes
    True
    """

    method = "stemst"
    stochastic = True

    @property
    def spatial(self) -> bool:
        """Whether sampling needs the spots' neighbourhoods (the joint model): :func:`stemst.tl.predict` passes them."""
        return isinstance(self.module, JointDiffusionModel)

    def __init__(
        self,
        module: DiffusionModel,
        *,
        genes: list[str],
        embedding_key: str,
        transform: str = "log2p1",
        encoder: dict | None = None,
        training: dict[str, Any] | None = None,
        history: list[dict[str, float]] | None = None,
        ood: dict[str, Any] | None = None,
        adaptation: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(genes=genes, embedding_key=embedding_key, transform=transform, encoder=encoder)
        if module.n_genes != len(self.genes):
            raise ValueError(f"The module predicts {module.n_genes} genes, the panel has {len(self.genes)}.")
        self.module = module.eval()
        self.training = dict(training or {})
        self.history = list(history or [])
        self.ood = ood
        self.adaptation = adaptation

    @property
    def embedding_dim(self) -> int:
        """Width of the embeddings the model expects."""
        return self.module.cond_dim

    @property
    def config(self) -> dict[str, Any]:
        """JSON-ready settings: the panel, the embeddings, the network, the diffusion and the training record."""
        return {
            "genes": self.genes,
            "embedding_key": self.embedding_key,
            "encoder": self.encoder,
            "transform": self.transform,
            "cond_dim": self.embedding_dim,
            "network": self.module.network.as_dict(),
            "diffusion": self.module.diffusion.as_dict(),
            "training": self.training,
            "ood": self.ood,
            "adaptation": self.adaptation,
        }

    @classmethod
    def from_config(
        cls,
        config: dict[str, Any],
        state_dict: dict[str, torch.Tensor] | None = None,
        *,
        history: list[dict[str, float]] | None = None,
    ) -> StemstModel:
        """Rebuild a model from :attr:`config` and, if given, the module's ``state_dict``."""
        module = build_module(
            len(config["genes"]),
            int(config["cond_dim"]),
            NetworkConfig(**config["network"]),
            DiffusionConfig(**config["diffusion"]),
        )
        if state_dict is not None:
            defaults = {k: v for k, v in module.state_dict().items() if k in CALIBRATION_BUFFERS}
            module.load_state_dict({**defaults, **state_dict})  # models saved before calibration existed
        keys = ("genes", "embedding_key", "transform", "encoder", "training", "ood", "adaptation")
        return cls(module, **{k: config.get(k) for k in keys}, history=history)

    @property
    def device(self) -> torch.device:
        """Device of the weights."""
        return self.module.device

    def to(self, device: str | torch.device) -> StemstModel:
        """Move the weights to ``device`` (``"auto"``: CUDA if available); returns ``self``."""
        self.module.to(resolve_device(device))
        return self

    @property
    def steps_trained(self) -> int:
        """Optimisation steps the weights have seen."""
        return int(self.training.get("steps_trained", 0))

    def params(self) -> dict[str, Any]:
        """Return the settings recorded with a prediction."""
        return {
            **super().params(),
            "architecture": self.module.network.architecture,
            "steps_trained": self.steps_trained,
            "parameterization": self.module.diffusion.parameterization,
        }

    # ---------------------------------------------------------------------------------------------------------------
    def sample(
        self,
        X: np.ndarray,
        *,
        n_samples: int = 20,
        sampler: str = "dpmpp_2m",
        steps: int = 25,
        batch_size: int | None = None,
        rng: RNGLike = None,
        progress: bool = True,
        clip: bool = True,
        coords: np.ndarray | None = None,
        sections: np.ndarray | None = None,
        **kwargs: Any,
    ) -> np.ndarray:
        """Draw expression samples for each spot.

        All spots x samples are batched together on the model's device (``batch_size`` rows per network call).

        Parameters
        ----------
        X
            ``(n, d)`` embeddings made by the model's encoder (standardised internally).
        n_samples
            Samples per spot.
        sampler
            ``"dpmpp_2m"`` (DPM-Solver++(2M), default), ``"ddim"`` (deterministic DDIM) or ``"ancestral"`` (the paper's
            1000-step DDPM sampler with the learned variance; ``steps`` is ignored); see
            :data:`stemst.model.samplers.REGISTRY`.
        steps
            Network evaluations for the fast samplers.
        batch_size
            Rows (spot x sample) per network call; default 8192 for the MLP, 1024 for the transformer (CPU: a
            quarter of that).
        rng
            Seed or numpy generator. For a fixed seed and ``batch_size`` the samples are reproducible.
        progress
            Show a progress bar.
        clip
            Clip the data prediction to the training range (widened by the ``clip_margin`` of the diffusion
            settings) at every step.
        coords, sections
            ``(n, 2)`` spot centres and ``(n,)`` sections: the joint model (:attr:`spatial`) samples every section's
            spots together, each with its ring-1 neighbours (:func:`stemst._spatial.neighbourhoods`); without
            them each spot is sampled alone. Ignored by the per-spot model.
        **kwargs
            Passed to :meth:`stemst.model.DiffusionModel.sample` (``spacing``; ``eta`` for DDIM).

        Returns
        -------
        ``(n_samples, n, n_genes)`` float32 samples on the ``transform`` scale, clipped at 0 (the transforms' floor).
        """
        from tqdm.auto import tqdm

        grid = step_grid(sampler, self.module.diffusion.n_steps, steps, kwargs.get("spacing", "quadratic"))
        X = np.asarray(X, dtype=np.float32)
        if X.ndim != 2 or X.shape[1] != self.embedding_dim:
            raise ValueError(f"X must be (n, {self.embedding_dim}) embeddings, got shape {X.shape}.")
        if not np.isfinite(X).all():
            raise ValueError("X has non-finite values.")
        if n_samples < 1:
            raise ValueError(f"n_samples must be >= 1, got {n_samples}.")
        batch_size = batch_size or self.module.default_batch_size
        total = math.ceil(len(X) * n_samples / batch_size) * len(grid)
        if self.spatial and coords is not None:
            from stemst._spatial import neighbourhoods

            nb, off = neighbourhoods(coords, sections)
            kwargs.update(neighbours=torch.as_tensor(nb), offsets=torch.as_tensor(off))
            total = math.ceil(n_samples / max(1, batch_size // len(X))) * len(grid)
        with tqdm(total=total, desc=f"sampling ({sampler})", disable=not progress, leave=False) as bar:
            y = self.module.sample(
                torch.as_tensor(X),
                n_samples=n_samples,
                sampler=sampler,
                steps=steps,
                generator=torch_generator(rng, self.device),
                batch_size=batch_size,
                clip=clip,
                callback=lambda state: bar.update(1),
                **kwargs,
            )
        # both target transforms map counts to values >= 0; a sample below that is numerical spill-over
        return y.clamp_min(0.0).cpu().numpy().astype(np.float32)

    def predict_mean(self, X: np.ndarray, *, n_samples: int = 20, **kwargs: Any) -> np.ndarray:
        """Return the conditional mean ``(n, n_genes)``: see :meth:`point_estimate` (samples only without a head)."""
        if self.module.diffusion.head_pcs:
            return self.point_estimate(X, None)
        return self.sample(X, n_samples=n_samples, **kwargs).mean(0)

    def point_estimate(self, X: np.ndarray, samples: np.ndarray | None) -> np.ndarray:
        """Return the model's mean, clipped at 0; without a mean head, the mean of ``samples``.

        With a head: the head plus the calibrated network mean, what the samples are centred on, free of their
        Monte Carlo noise.
        """
        if not self.module.diffusion.head_pcs:
            return samples.mean(0)
        X = np.asarray(X, np.float32)
        step = self.module.default_batch_size  # rows per network call, as in sampling: bounded memory
        means = [self.module.mean(torch.as_tensor(X[i : i + step]).to(self.device)) for i in range(0, len(X), step)]
        return torch.cat(means).clamp_min(0.0).cpu().numpy().astype(np.float32)

    # ---------------------------------------------------------------------------------------------------------------
    def save(self, path: str | os.PathLike, *, overwrite: bool = False) -> Path:
        """Save to a folder: ``config.json`` (settings, genes, history) and ``weights.pt`` (tensors only).

        The folder is written beside ``path`` and swapped into place (:func:`stemst._atomic.replacing`), so a crash
        never leaves half a model, nor loses the model being replaced; the next :meth:`save` or :meth:`load` resolves
        what a crash left.

        Parameters
        ----------
        path
            Folder to create.
        overwrite
            Replace an existing folder.

        Returns
        -------
        The folder.
        """
        path = check_destination(path, what="the model", argument="path")
        meta = {
            "format_version": FORMAT_VERSION,
            "stemst_version": __version__,
            "config": self.config,
            "history": self.history,
        }
        with replacing(Swap.of(path), overwrite=overwrite) as tmp:
            tmp.mkdir()
            (tmp / CONFIG_FILE).write_text(json.dumps(meta, indent=1))
            torch.save({k: v.detach().cpu() for k, v in self.module.state_dict().items()}, tmp / WEIGHTS_FILE)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike, *, device: str | torch.device = "auto") -> StemstModel:
        """Load a model written by :meth:`save` (only tensors and JSON are read; no pickled objects).

        Models saved by stemst 0.1.0 (format 1) are converted on load.

        Parameters
        ----------
        path
            Folder written by :meth:`save`.
        device
            Where to put the weights; ``"auto"``: CUDA if available, else CPU.
        """
        path = Path(path)
        dev = resolve_device(device)
        recover(Swap.of(path))
        if not (path / CONFIG_FILE).exists() or not (path / WEIGHTS_FILE).exists():
            raise FileNotFoundError(f"{path} is not a saved stemst model (needs {CONFIG_FILE} and {WEIGHTS_FILE}).")
        meta = read_json(path / CONFIG_FILE, what="stemst model settings")
        _check_format(path, meta)
        hint = "Save the model again, or copy the folder anew."
        with reading(path / WEIGHTS_FILE, "stemst model weights", hint=hint):
            state = torch.load(path / WEIGHTS_FILE, map_location="cpu", weights_only=True)
        # settings and weights that do not fit together (an edited config, weights from another model)
        with reading(path, f"stemst model: {CONFIG_FILE} and {WEIGHTS_FILE} do not match", hint=hint):
            config = meta["config"]
            if meta["format_version"] == 1:
                config, state = _upgrade_format_1(config, state)
            model = cls.from_config(config, state, history=meta.get("history"))
        return model.to(dev)

    def __repr__(self) -> str:
        net = self.module.network
        size = f"depth={net.depth}, width={net.width}"
        if net.architecture == "transformer":
            size += f", heads={net.heads}"
        loss = f"{self.history[-1]['loss']:.4f}" if self.history else "n/a"
        return (
            f"StemstModel({net.architecture} {size}, {n_parameters(self.module.net):,} parameters, "
            f"{self.n_genes} genes, embedding_key={self.embedding_key!r}, transform={self.transform!r}, "
            f"{self.module.diffusion.parameterization}-prediction, steps trained={self.steps_trained}, "
            f"final loss={loss})"
        )
