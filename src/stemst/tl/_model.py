"""The trained Stem model: a denoiser, its diffusion schedule and everything needed to sample, save and reload it."""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from stemst.tl import _diffusion as D
from stemst.tl._base import Predictor
from stemst.tl._nets import build_denoiser, n_parameters

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "weights.pt"
FORMAT_VERSION = 1
#: statistics stored with the weights (tensors), see :class:`StemstModel`
STAT_KEYS = ("emb_mean", "emb_std", "y_mean", "y_std", "y_min", "y_max")


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``"auto"``: CUDA if available, else CPU; anything else is passed to :class:`torch.device`."""
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def torch_generator(rng: Any, device: torch.device) -> torch.Generator:
    """Return a :class:`torch.Generator` on ``device`` from an int seed, a numpy Generator, a torch Generator or ``None``."""
    if isinstance(rng, torch.Generator):
        return rng
    if isinstance(rng, np.random.Generator):
        seed = int(rng.integers(2**62))
    elif rng is None:
        seed = int(np.random.default_rng().integers(2**62))
    else:
        seed = int(rng)
    return torch.Generator(device=device).manual_seed(seed)


def autocast(device: torch.device) -> Any:
    """bf16 autocast on CUDA; a no-op elsewhere."""
    return (
        torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else torch.autocast("cpu", enabled=False)
    )


class StemstModel(Predictor):
    """A trained Stem conditional diffusion model (see :func:`stemst.tl.fit`).

    The denoiser holds the exponential moving average (EMA) of the training weights, which is what sampling uses.
    Inputs are standardised with the training embeddings' mean and standard deviation, targets (on the ``transform``
    scale) with their per-gene statistics when ``config['target_scaling'] == "standardize"``.

    Attributes
    ----------
    net
        The denoiser (:mod:`stemst.tl._nets`), in eval mode.
    config
        JSON-serialisable settings: architecture and sizes, diffusion, training settings, steps trained.
    stats
        Tensors: ``emb_mean``, ``emb_std`` (embedding standardisation), ``y_mean``, ``y_std`` (target scaling),
        ``y_min``, ``y_max`` (training range on the model scale, used to clip the data prediction while sampling).
    history
        Training curve: one dict per logged step with ``step``, ``loss``, ``mse``, ``lr``, ``time`` (seconds).

    Examples
    --------
    >>> model = stemst.tl.fit(sdata, sections=["C2", "C3"], architecture="mlp", steps=500)  # doctest: +SKIP
    >>> samples = model.sample(X, n_samples=20, steps=25)  # (20, n, genes)  # doctest: +SKIP
    >>> model.save("model/"); model = stemst.tl.StemstModel.load("model/")  # doctest: +SKIP
    """

    method = "stemst"
    stochastic = True

    def __init__(
        self,
        *,
        net: nn.Module,
        config: dict[str, Any],
        stats: dict[str, torch.Tensor],
        history: list[dict[str, float]] | None = None,
    ) -> None:
        super().__init__(
            genes=config["genes"],
            embedding_key=config["embedding_key"],
            transform=config["transform"],
            encoder=config.get("encoder"),
        )
        self.net = net.eval()
        self.config = config
        self.stats = {k: stats[k].detach().to(torch.float32).cpu() for k in STAT_KEYS}
        self.history = list(history or [])
        self.embedding_dim = int(config["cond_dim"])
        d = config["diffusion"]
        self.schedule = D.make_schedule(d["n_steps"], d["beta_start"], d["beta_end"])

    # ---------------------------------------------------------------------------------------------------------------
    @classmethod
    def build(cls, config: dict[str, Any], stats: dict[str, torch.Tensor], **kwargs: Any) -> StemstModel:
        """Build a model with a freshly initialised denoiser for ``config``."""
        net = build_denoiser(config["architecture"], len(config["genes"]), int(config["cond_dim"]), **config["net"])
        return cls(net=net, config=config, stats=stats, **kwargs)

    @property
    def device(self) -> torch.device:
        """Device of the denoiser."""
        return next(self.net.parameters()).device

    def to(self, device: str | torch.device) -> StemstModel:
        """Move the denoiser to ``device`` (``"auto"``: CUDA if available); returns ``self``."""
        self.net.to(resolve_device(device))
        return self

    @property
    def steps_trained(self) -> int:
        """Optimisation steps the weights have seen."""
        return int(self.config.get("steps_trained", 0))

    def params(self) -> dict[str, Any]:
        """Return the settings recorded with a prediction."""
        return {
            **super().params(),
            "architecture": self.config["architecture"],
            "steps_trained": self.steps_trained,
            "parameterization": self.config["diffusion"]["parameterization"],
        }

    # ---------------------------------------------------------------------------------------------------------------
    # scaling between the user's scale and the network's
    def _scale_x(self, X: np.ndarray, device: torch.device) -> torch.Tensor:
        x = torch.as_tensor(np.asarray(X, dtype=np.float32), device=device)
        return (x - self.stats["emb_mean"].to(device)) / self.stats["emb_std"].to(device)

    def scale_y(self, y: torch.Tensor) -> torch.Tensor:
        """Model-scale targets -> the network's data space."""
        return (y - self.stats["y_mean"].to(y.device)) / self.stats["y_std"].to(y.device)

    def unscale_y(self, y: torch.Tensor) -> torch.Tensor:
        """Inverse of :meth:`scale_y`."""
        return y * self.stats["y_std"].to(y.device) + self.stats["y_mean"].to(y.device)

    def _clip_range(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor] | None:
        margin = float(self.config.get("clip_margin", 0.0) or 0.0)
        if self.config.get("clip_margin") is None:
            return None
        lo, hi = self.scale_y(self.stats["y_min"].to(device)), self.scale_y(self.stats["y_max"].to(device))
        width = hi - lo
        return lo - margin * width, hi + margin * width

    def model_fn(self, cond: torch.Tensor, *, clip: bool = True) -> D.ModelFn:
        """Wrap the denoiser as ``(x_t, t) -> (x0_hat, eps_hat, v)`` for embeddings ``cond`` (already standardised)."""
        sched = self.schedule
        param = self.config["diffusion"]["parameterization"]
        rng_ = self._clip_range(cond.device) if clip else None
        dev = cond.device

        def fn(x: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
            with autocast(dev):
                raw, v = self.net(x, t, cond)
            raw = raw.float()
            x0, eps = D.denoised(sched, raw, x, t, param)
            if rng_ is not None:
                x0c = torch.maximum(torch.minimum(x0, rng_[1]), rng_[0])
                abar = sched.alphas_cumprod.to(dev)[t].float()[:, None]
                eps = torch.where(x0c == x0, eps, (x - abar.sqrt() * x0c) / (1 - abar).sqrt())
                x0 = x0c
            return x0, eps, (v.float() if v is not None else None)

        return fn

    # ---------------------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def sample(
        self,
        X: np.ndarray,
        *,
        n_samples: int = 20,
        sampler: str = "dpmpp_2m",
        steps: int = 25,
        batch_size: int | None = None,
        rng: Any = None,
        progress: bool = True,
        clip: bool = True,
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
            1000-step DDPM sampler with the learned variance; ``steps`` is ignored).
        steps
            Network evaluations for the fast samplers.
        batch_size
            Rows (spot x sample) per network call; default 8192 for the MLP, 1024 for the transformer (CPU: a
            quarter of that).
        rng
            Seed, numpy or torch generator. For a fixed seed and ``batch_size`` the samples are reproducible.
        progress
            Show a progress bar.
        clip
            Clip the data prediction to the training range (widened by ``config['clip_margin']``) at every step.
        **kwargs
            Passed to the sampler (``spacing``, ``eta`` for DDIM).

        Returns
        -------
        ``(n_samples, n, n_genes)`` float32 samples on the ``transform`` scale, clipped at 0 (the transforms' floor).
        """
        from tqdm.auto import tqdm

        if sampler not in D.SAMPLERS:
            raise ValueError(f"Unknown sampler {sampler!r}; known: {list(D.SAMPLERS)}.")
        X = np.asarray(X, dtype=np.float32)
        if X.ndim != 2 or X.shape[1] != self.embedding_dim:
            raise ValueError(f"X must be (n, {self.embedding_dim}) embeddings, got shape {X.shape}.")
        if not np.isfinite(X).all():
            raise ValueError("X has non-finite values.")
        if n_samples < 1:
            raise ValueError(f"n_samples must be >= 1, got {n_samples}.")
        dev = self.device
        n, g = len(X), self.n_genes
        if batch_size is None:
            batch_size = 8192 if self.config["architecture"] == "mlp" else 1024
            batch_size = batch_size if dev.type == "cuda" else batch_size // 4
        gen = torch_generator(rng, dev)
        cond_all = self._scale_x(X, dev)
        rows = n * n_samples
        out = torch.empty((rows, g), dtype=torch.float32, device=dev)
        n_eval = D.n_evaluations(sampler, steps, self.schedule.n_steps, kwargs.get("spacing", "quadratic"))
        n_batches = math.ceil(rows / batch_size)
        bar = tqdm(total=n_batches * n_eval, desc=f"sampling ({sampler})", disable=not progress, leave=False)
        sched = self.schedule.to(dev)
        self.net.eval()
        for start in range(0, rows, batch_size):
            stop = min(rows, start + batch_size)
            cond = cond_all[torch.arange(start, stop, device=dev) % n]  # row r = sample r // n of spot r % n
            x = torch.randn((stop - start, g), generator=gen, device=dev, dtype=torch.float32)
            fn = self.model_fn(cond, clip=clip)
            out[start:stop] = D.run_sampler(
                sampler, fn, sched, x, steps=steps, generator=gen, callback=lambda: bar.update(1), **kwargs
            )
        bar.close()
        # both target transforms map counts to values >= 0; a sample below that is numerical spill-over
        y = self.unscale_y(out).clamp_min(0.0).reshape(n_samples, n, g)
        return y.cpu().numpy().astype(np.float32)

    def predict_mean(self, X: np.ndarray, *, n_samples: int = 20, **kwargs: Any) -> np.ndarray:
        """Mean of :meth:`sample` over the samples, ``(n, n_genes)``."""
        return self.sample(X, n_samples=n_samples, **kwargs).mean(0)

    # ---------------------------------------------------------------------------------------------------------------
    def state_tensors(self) -> dict[str, torch.Tensor]:
        """All tensors to store: ``net.*`` weights and the statistics."""
        out = {f"net.{k}": v.detach().cpu() for k, v in self.net.state_dict().items()}
        out.update({f"stats.{k}": v for k, v in self.stats.items()})
        return out

    def save(self, path: str | os.PathLike, *, overwrite: bool = False) -> Path:
        """Save to a folder: ``config.json`` (settings, genes, history) and ``weights.pt`` (tensors only).

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
        path = Path(path)
        if path.exists() and not overwrite:
            raise FileExistsError(f"{path} exists; pass overwrite=True to replace it.")
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
        try:
            (tmp / CONFIG_FILE).write_text(
                json.dumps({"format_version": FORMAT_VERSION, "config": self.config, "history": self.history}, indent=1)
            )
            torch.save(self.state_tensors(), tmp / WEIGHTS_FILE)
            if path.exists():
                shutil.rmtree(path)
            os.replace(tmp, path)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike, *, device: str | torch.device = "auto") -> StemstModel:
        """Load a model written by :meth:`save` (only tensors and JSON are read; no pickled objects).

        Parameters
        ----------
        path
            Folder written by :meth:`save`.
        device
            Where to put the denoiser; ``"auto"``: CUDA if available, else CPU.
        """
        path = Path(path)
        if not (path / CONFIG_FILE).exists() or not (path / WEIGHTS_FILE).exists():
            raise FileNotFoundError(f"{path} is not a saved stemst model (needs {CONFIG_FILE} and {WEIGHTS_FILE}).")
        meta = json.loads((path / CONFIG_FILE).read_text())
        if meta.get("format_version", 0) > FORMAT_VERSION:
            raise ValueError(f"{path} was saved by a newer stemst (format {meta['format_version']}); upgrade stemst.")
        tensors = torch.load(path / WEIGHTS_FILE, map_location="cpu", weights_only=True)
        return cls.from_tensors(meta["config"], tensors, history=meta.get("history"), device=device)

    @classmethod
    def from_tensors(
        cls,
        config: dict[str, Any],
        tensors: dict[str, torch.Tensor],
        *,
        history: list[dict[str, float]] | None = None,
        device: str | torch.device = "auto",
    ) -> StemstModel:
        """Rebuild a model from :meth:`state_tensors` output and its config."""
        stats = {k: tensors[f"stats.{k}"] for k in STAT_KEYS}
        model = cls.build(config, stats, history=history)
        model.net.load_state_dict({k[4:]: v for k, v in tensors.items() if k.startswith("net.")})
        return model.to(device)

    def __repr__(self) -> str:
        c = self.config
        net = c["net"]
        size = f"depth={net.get('depth')}, width={net.get('width')}"
        if c["architecture"] == "transformer":
            size += f", heads={net.get('heads')}"
        loss = f"{self.history[-1]['loss']:.4f}" if self.history else "n/a"
        return (
            f"StemstModel({c['architecture']} {size}, {n_parameters(self.net):,} parameters, "
            f"{self.n_genes} genes, embedding_key={self.embedding_key!r}, transform={self.transform!r}, "
            f"{c['diffusion']['parameterization']}-prediction, steps trained={self.steps_trained}, final loss={loss})"
        )
