"""The training loop of the diffusion engine.

AdamW with an optional warm-up and cosine decay, gradient clipping, an EMA of the weights, atomic checkpoints with
exact resume, a guard against a NaN loss, a callback and the training curve.

:func:`train_step` is one optimisation step (what :func:`stemst.tl.fit` runs and ``benchmarks/train.py`` times);
:func:`train` runs it ``config.steps`` times around a :class:`~stemst.model.DiffusionModel`.
"""

from __future__ import annotations

import copy
import json
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from stemst._atomic import check_destination
from stemst._errors import StemstFileError
from stemst._logging import logger
from stemst._torch import resolve_device, torch_generator
from stemst._utils import reading
from stemst.model import distributed
from stemst.model.config import TrainingConfig
from stemst.model.module import DiffusionModel

CHECKPOINT_FILE = "checkpoint.pt"
#: what a checkpoint holds
CHECKPOINT_KEYS = ("run", "module", "ema", "optimizer", "rng", "step", "history")
#: training stops when the loss exceeds this multiple of its first value (a diverging run: lr too high)
DIVERGENCE_FACTOR = 1e6


def ema_decay_at(step: int, decay: float) -> float:
    """EMA decay after ``step`` updates: ``min(decay, (1 + step) / (10 + step))``.

    The warm-up lets a short run (a few thousand steps on a CPU) still average over its recent weights instead of
    keeping mostly the random initialisation, while long runs use ``decay`` (0.9999, the paper's).

    Examples
    --------
    >>> ema_decay_at(0, 0.9999), ema_decay_at(10**6, 0.9999)
    (0.1, 0.9999)
    """
    return min(decay, (1.0 + step) / (10.0 + step))


@torch.no_grad()
def ema_update(ema: nn.Module, model: nn.Module, decay: float) -> None:
    """Move the parameters of ``ema`` towards those of ``model``: ``ema = decay * ema + (1 - decay) * model``.

    Examples
    --------
    >>> a, b = nn.Linear(2, 1), nn.Linear(2, 1)
    >>> ema_update(a, b, 0.0)
    >>> torch.equal(a.weight, b.weight)
    True
    """
    torch._foreach_lerp_(list(ema.parameters()), [p.detach() for p in model.parameters()], 1.0 - decay)


def lr_at(step: int, config: TrainingConfig) -> float:
    """Learning rate at ``step``: linear warm-up, then constant or cosine decay to 10 % of ``config.lr``.

    Examples
    --------
    >>> lr_at(0, TrainingConfig(lr=1.0, warmup_steps=4))
    0.25
    """
    scale = min(1.0, (step + 1) / config.warmup_steps) if config.warmup_steps > 0 else 1.0
    if config.lr_schedule == "cosine":
        progress = min(1.0, step / max(1, config.steps or 1))
        scale *= 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))
    return config.lr * scale


def train_step(
    module: DiffusionModel,
    optimizer: torch.optim.Optimizer,
    ema: DiffusionModel,
    cond: torch.Tensor,
    y: torch.Tensor,
    *,
    step: int,
    config: TrainingConfig,
    generator: torch.Generator,
    parallel: nn.Module | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One optimisation step on a batch drawn from the training pairs, then the EMA update.

    Parameters
    ----------
    module, optimizer, ema
        The model being trained, its optimiser and the EMA copy.
    cond
        ``(n * v, cond_dim)`` raw conditions; row ``i * v + k`` is view ``k`` of target ``i``.
    y
        ``(n, n_genes)`` targets on the transform's scale.
    step
        Steps taken before this one (sets the learning rate and the EMA decay).
    config
        The training settings.
    generator
        Draws the batch, then (in :meth:`~stemst.model.DiffusionModel.loss`) the time steps and the noise.
    parallel
        ``module`` wrapped in :class:`~torch.nn.parallel.DistributedDataParallel` (:func:`stemst.model.distributed.wrap`):
        every process draws the same global batch and computes the loss of its share of the rows; the gradient is
        weighted so that the step equals one process's step on the whole batch.

    Returns
    -------
    The (global) batch's mean loss and mean squared error, detached.
    """
    lr = lr_at(step, config)
    for group in optimizer.param_groups:
        group["lr"] = lr
    idx = torch.randint(len(cond), (config.batch_size,), generator=generator, device=cond.device)
    y_b, c_b = y[idx // (len(cond) // len(y))], cond[idx]
    if parallel is None:
        loss, mse = module.loss(y_b, c_b, generator=generator)
        objective, loss, mse = loss.mean(), loss.detach().mean(), mse.detach().mean()
    else:  # this process's rows; counts (tokens may differ between rows) and sums over all processes
        loss, mse = parallel(y_b, c_b, generator=generator, rows=distributed.shard(config.batch_size))
        totals = torch.stack(
            [torch.tensor(float(loss.numel()), device=loss.device), loss.detach().sum(), mse.detach().sum()]
        )
        count, loss_sum, mse_sum = distributed.all_sum(totals)
        objective = loss.sum() * (distributed.world_size() / count)  # DDP averages: sum over all rows / count
        loss, mse = loss_sum / count, mse_sum / count
    optimizer.zero_grad(set_to_none=True)
    objective.backward()
    if config.max_grad_norm is not None:
        torch.nn.utils.clip_grad_norm_(list(module.parameters()), config.max_grad_norm)
    optimizer.step()
    ema_update(ema, module, ema_decay_at(step, config.ema_decay))
    return loss, mse


@dataclass
class TrainingState:
    """What the callback of :func:`train` sees at every history entry."""

    step: int  #: steps taken
    module: DiffusionModel  #: the weights being trained
    ema: DiffusionModel  #: their moving average (what sampling uses), in eval mode
    history: list[dict[str, float]] = field(default_factory=list)  #: the training curve so far


@dataclass
class TrainingResult:
    """Outcome of :func:`train`."""

    ema: DiffusionModel  #: the EMA weights, in eval mode: the model to sample from
    history: list[dict[str, float]]  #: one dict per logged step: ``step``, ``loss``, ``mse``, ``lr``, ``time`` (s)
    steps: int  #: steps trained in all (including those before a resume)
    stopped: bool  #: whether the callback stopped training


def _atomic_save(obj: dict[str, Any], path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


#: training settings a resumed run may change (the rest must match the checkpoint's)
RESUMABLE = ("steps", "epochs", "log_every", "checkpoint_every")


def _run_description(module: DiffusionModel, run_info: dict[str, Any] | None) -> dict[str, Any]:
    """Return the settings a checkpoint must share with a run that resumes from it, JSON-normalised."""
    desc = {
        "n_genes": module.n_genes,
        "cond_dim": module.cond_dim,
        "network": module.network.as_dict(),
        "diffusion": module.diffusion.as_dict(),
        **(run_info or {}),
    }
    return json.loads(json.dumps(desc))


def _check_loss(
    values: np.ndarray, step: int, reference: float, config: TrainingConfig, last_ckpt: int | None, ckpt: Path | None
) -> None:
    """Stop a run whose losses (those of the steps up to ``step``) are NaN or infinite or have exploded.

    A loss above :data:`DIVERGENCE_FACTOR` times ``reference`` (the run's first loss) is a diverged run.
    """
    diverged = ~np.isfinite(values) | (values > DIVERGENCE_FACTOR * max(abs(reference), 1e-8))
    bad = np.flatnonzero(diverged)
    if not bad.size:
        return
    first = step - len(values) + int(bad[0]) + 1
    where = f"; the last good checkpoint (step {last_ckpt}) is in {ckpt}" if last_ckpt else ""
    what = "became" if not np.isfinite(values[bad[0]]) else f"exploded from {reference:.4g} to"
    raise FloatingPointError(
        f"The training loss {what} {values[bad[0]]:.4g} at step {first}: training diverged{where}. Lower lr "
        f"(lr={config.lr:g} here), keep max_grad_norm set, or check the inputs for extreme values."
    )


def train(
    module: DiffusionModel,
    cond: torch.Tensor,
    y: torch.Tensor,
    config: TrainingConfig,
    *,
    device: str | torch.device = "auto",
    checkpoint_dir: str | os.PathLike | None = None,
    resume: bool = False,
    run_info: dict[str, Any] | None = None,
    callback: Callable[[TrainingState], bool | None] | None = None,
    progress: bool = True,
) -> TrainingResult:
    """Train ``module`` on pairs (condition, target) with :func:`train_step`.

    Parameters
    ----------
    module
        The model, initialised and with its statistics set (:meth:`~stemst.model.DiffusionModel.set_statistics`);
        trained in place.
    cond
        ``(n * v, cond_dim)`` raw conditions, ``v`` views per target (row ``i * v + k``: view ``k`` of target ``i``).
    y
        ``(n, n_genes)`` targets on the transform's scale.
    config
        Training settings; ``steps`` and ``log_every`` are resolved for ``len(cond)`` pairs
        (:meth:`~stemst.model.TrainingConfig.resolved`).
    device
        ``"auto"`` (CUDA if available, else CPU) or a torch device; on CUDA, TF32 matmuls are enabled. Under
        ``torchrun`` (a process group started by :func:`stemst.model.distributed.init`), each process uses
        ``cuda:LOCAL_RANK``, the module is wrapped in DDP and ``config.batch_size`` is the global batch, split
        across the processes; rank 0 alone writes the checkpoint.
    checkpoint_dir
        Folder for ``checkpoint.pt`` (weights, EMA, optimiser, generator state, step, history), written atomically
        every ``config.checkpoint_every`` steps and at the end.
    resume
        Continue from ``checkpoint_dir/checkpoint.pt`` if it exists, exactly as if the run had never stopped.
    run_info
        JSON-ready settings beyond the module's own (e.g. the genes) that a resumed run must share.
    callback
        Called with a :class:`TrainingState` at every history entry; returning ``True`` stops training (e.g.
        early stopping on held-out data, evaluated with ``state.ema``).
    progress
        Show a progress bar with the loss.

    Returns
    -------
    The EMA weights, the training curve and the steps taken.

    Raises
    ------
    FloatingPointError
        If the loss becomes NaN or infinite, or explodes (above :data:`DIVERGENCE_FACTOR` times its first value); the
        message names the step and ``lr``, and the last checkpoint (if any) is kept.

    Examples
    --------
    >>> from stemst.model import DiffusionModel, NetworkConfig, TrainingConfig
    >>> m = DiffusionModel(5, 3, NetworkConfig(width=16, depth=1))
    >>> cond, y = torch.randn(64, 3), torch.rand(64, 5)
    >>> m.set_statistics(cond, y)
    >>> result = train(m, cond, y, TrainingConfig(steps=20, batch_size=16), device="cpu", progress=False)
    >>> result.steps, len(result.history)
    (20, 20)
    """
    from tqdm.auto import tqdm

    if len(y) == 0 or len(cond) % len(y):
        raise ValueError(f"cond must have a whole number of rows per target: got {len(cond)} and {len(y)}.")
    ckpt = Checkpoint.at(checkpoint_dir, resume=resume)
    config = config.resolved(len(cond), default_lr=module.network.default_lr)
    dev = distributed.device(resolve_device(device))
    _log_start(module, cond, y, config, dev)
    module.to(dev).train()
    ema = copy.deepcopy(module).eval().requires_grad_(False)
    opt = torch.optim.AdamW(module.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    parallel = distributed.wrap(module, dev) if distributed.active() else None
    gen = torch_generator(config.seed, dev)
    run = _run_description(
        module, {**(run_info or {}), **{k: v for k, v in config.as_dict().items() if k not in RESUMABLE}}
    )
    parts = {"module": module, "ema": ema, "optimizer": opt}
    step, history = ckpt.restore(run, parts, gen) if ckpt is not None else (0, [])
    log = _Log(config, history, ckpt, last_ckpt=step or None)
    cond, y = cond.to(dev), y.to(dev)
    stopped = False
    desc = f"fit {module.network.architecture}"
    with tqdm(total=config.steps, initial=step, desc=desc, disable=not (progress and distributed.is_main())) as bar:
        while step < config.steps:
            log.add(*train_step(module, opt, ema, cond, y, step=step, config=config, generator=gen, parallel=parallel))
            step += 1
            if log.due(step):
                bar.set_postfix(loss=f"{log.write(step)['loss']:.4f}")
                if log.at_checkpoint(step):
                    log.save(run, parts, gen, step)
                stop = callback is not None and callback(TrainingState(step, module, ema, log.history))
                if distributed.agree(bool(stop), dev):  # rank 0 decides, so that all processes stop together
                    logger.info("Stopped by the callback at step %d", step)
                    stopped = True
                    break
            bar.update(1)
    if ckpt is not None and log.last_ckpt != step:
        log.save(run, parts, gen, step)
    history = log.history
    logger.info("Finished training: %d steps, loss %.4f", step, history[-1]["loss"] if history else float("nan"))
    return TrainingResult(ema=ema.eval(), history=history, steps=step, stopped=stopped)


def _log_start(
    module: DiffusionModel, cond: torch.Tensor, y: torch.Tensor, config: TrainingConfig, dev: torch.device
) -> None:
    """Log what is trained where; on CUDA, allow TF32 matmuls."""
    logger.info(
        "Training %s on %d targets x %d view(s), %d genes, %d-d conditions, %d steps on %s",
        module.network.architecture,
        len(y),
        len(cond) // len(y),
        module.n_genes,
        module.cond_dim,
        config.steps,
        dev,
    )
    if dev.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True


@dataclass
class Checkpoint:
    """``checkpoint.pt`` in a folder: written atomically by rank 0, read back for an exact resume."""

    path: Path
    resume: bool

    @classmethod
    def at(cls, folder: str | os.PathLike | None, *, resume: bool) -> Checkpoint | None:
        """Return the checkpoint in ``folder`` (checked to be writable), or ``None`` without a folder."""
        if folder is None:
            if resume:
                raise ValueError("resume=True needs a checkpoint_dir.")
            return None
        check_destination(folder, what="the training checkpoint", argument="checkpoint_dir")
        return cls(Path(folder) / CHECKPOINT_FILE, resume)

    def restore(
        self, run: dict[str, Any], parts: dict[str, Any], gen: torch.Generator
    ) -> tuple[int, list[dict[str, float]]]:
        """Load the state into ``parts`` and ``gen`` when resuming from an existing file; return step and history."""
        if not (self.resume and self.path.exists()):
            if distributed.is_main():
                self.path.parent.mkdir(parents=True, exist_ok=True)
            return 0, []
        hint = "Delete it to start afresh, or point checkpoint_dir elsewhere."
        with reading(self.path, "training checkpoint", hint=hint):
            state = torch.load(self.path, map_location="cpu", weights_only=True)
        missing = [k for k in CHECKPOINT_KEYS if not isinstance(state, dict) or k not in state]
        if missing:
            raise StemstFileError(self.path, f"is not a whole stemst training checkpoint: it lacks {missing}. {hint}")
        old = json.loads(state["run"])
        diff = [k for k in sorted(run.keys() | old.keys()) if old.get(k) != run.get(k)]
        if diff:
            raise ValueError(f"Cannot resume from {self.path}: the settings differ in {diff}.")
        with reading(self.path, "training checkpoint of this model", hint="Delete it to start afresh."):
            for name, part in parts.items():
                part.load_state_dict(state[name])
            gen.set_state(state["rng"])
        logger.info("Resuming from %s at step %d", self.path, int(state["step"]))
        return int(state["step"]), json.loads(state["history"])

    def save(self, state: dict[str, Any]) -> None:
        """Write ``state`` (rank 0; the others wait, so that nobody reads a file being replaced)."""
        if distributed.is_main():
            _atomic_save(state, self.path)
        distributed.barrier()


@dataclass
class _Log:
    """The training curve: losses of the steps since the last entry, the NaN / divergence guard, the checkpoints."""

    config: TrainingConfig
    history: list[dict[str, float]]
    ckpt: Checkpoint | None
    last_ckpt: int | None = None
    losses: list[torch.Tensor] = field(default_factory=list)
    mses: list[torch.Tensor] = field(default_factory=list)
    reference: float | None = None  #: the run's first loss, which a diverging run's loss leaves far behind
    t0: float = 0.0

    def __post_init__(self) -> None:
        self.t0 = time.perf_counter() - (self.history[-1]["time"] if self.history else 0.0)

    def add(self, loss: torch.Tensor, mse: torch.Tensor) -> None:
        """Keep one step's (detached) loss and MSE."""
        self.losses.append(loss)
        self.mses.append(mse)

    def at_checkpoint(self, step: int) -> bool:
        """Whether a checkpoint is due after ``step`` steps."""
        return self.ckpt is not None and (step % self.config.checkpoint_every == 0 or step == self.config.steps)

    def due(self, step: int) -> bool:
        """Whether a history entry is due after ``step`` steps."""
        return step % self.config.log_every == 0 or step == self.config.steps or self.at_checkpoint(step)

    def write(self, step: int) -> dict[str, float]:
        """Check the losses since the last entry (:func:`_check_loss`) and append their means to the history."""
        values = torch.stack(self.losses).cpu().numpy()
        if self.reference is None:
            self.reference = float(self.history[0]["loss"]) if self.history else float(values[0])
        where = self.ckpt.path if self.ckpt is not None else None
        _check_loss(values, step, self.reference, self.config, self.last_ckpt, where)
        entry = {
            "step": step,
            "loss": float(values.mean()),
            "mse": float(torch.stack(self.mses).mean()),
            "lr": lr_at(step - 1, self.config),
            "time": time.perf_counter() - self.t0,
        }
        self.history.append(entry)
        self.losses, self.mses = [], []
        return entry

    def save(self, run: dict[str, Any], parts: dict[str, Any], gen: torch.Generator, step: int) -> None:
        """Write the checkpoint of ``step``."""
        state = {"run": json.dumps(run), **{k: v.state_dict() for k, v in parts.items()}}
        state.update(rng=gen.get_state(), step=step, history=json.dumps(self.history))
        self.ckpt.save(state)
        self.last_ckpt = step
