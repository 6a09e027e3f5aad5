"""The residual recipe on arrays: mean head, cross-fitted residuals, early stopping and calibration around training.

:func:`fit_recipe` is what :func:`stemst.tl.fit` runs once it has turned the tables into arrays. Everything it
chooses from data is chosen on data held out *inside* the training groups: the head's penalty and rank by
leave-one-group-out, the stopping step on one held-out group, and the spread calibration on that same group. Test
sections are never seen. :func:`build_module` is the one place that picks the module class for a network config.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from stemst._errors import StemstDataError
from stemst._logging import logger
from stemst.metrics import mean_pearson
from stemst.model import distributed
from stemst.model.calibration import LEVELS, coverage, spread_scales, widen
from stemst.model.config import DiffusionConfig, NetworkConfig
from stemst.model.head import cross_fitted_residuals, fit_head
from stemst.model.joint import JointDiffusionModel, gather, pack
from stemst.model.module import DiffusionModel
from stemst.model.presets import Configs
from stemst.model.training import TrainingState, train

#: residual-mean weights tried on the held-out group (0: the head's mean alone)
RESIDUAL_WEIGHTS = (0.0, 0.25, 0.5, 0.75, 1.0)
#: weights tried on the held-out group for the training residuals' mean ``y_mean`` (1: as learned)
OFFSET_WEIGHTS = (1.0, 0.75, 0.5, 0.25, 0.0)
#: held-out rows per network call in the early-stopping loss and the calibration (bounds the memory they need)
EVAL_CHUNK = 4096
#: held-out spots the spread calibration uses at most (a random subset beyond): per-gene scales need no more
CALIBRATION_MAX_SPOTS = 20_000


def chunk_seed(seed: int, k: int) -> int:
    """Seed of the ``k``-th chunk of held-out rows.

    ``seed`` itself for the first, so that a held-out set of one chunk is drawn exactly as a single batch seeded
    ``seed``.

    Examples
    --------
    >>> chunk_seed(7, 0), chunk_seed(7, 1) == chunk_seed(7, 1) != chunk_seed(7, 2)
    (7, True)
    """
    return int(seed) if k == 0 else int(np.random.SeedSequence([int(seed), int(k)]).generate_state(1)[0])


def my_chunks(n: int) -> list[tuple[int, slice]]:
    """Return the chunks of ``n`` held-out rows this process computes: ``(k, rows)``, every ``world_size``-th one.

    Examples
    --------
    >>> my_chunks(10_000)  # one process: all of them
    [(0, slice(0, 4096, None)), (1, slice(4096, 8192, None)), (2, slice(8192, 12288, None))]
    """
    rank, world = distributed.rank(), distributed.world_size()
    starts = range(0, n, EVAL_CHUNK)
    return [(k, slice(start, start + EVAL_CHUNK)) for k, start in enumerate(starts) if k % world == rank]


def prepare_head(
    module: DiffusionModel, cond: torch.Tensor, Y: np.ndarray, groups: np.ndarray, *, seed: int = 0
) -> tuple[np.ndarray, dict]:
    """Set the module's projection and mean head from all training spots; return cross-fitted residuals.

    The head's penalty and rank are chosen by leave-one-group-out (:func:`stemst.model.head.fit_head`); the
    residual of each group comes from a head fitted without it, so the diffusion learns the spread that new
    sections will show, not the smaller in-sample one.
    """
    module.set_projection(cond)
    Z = module.pca_scores(cond.float())[:, : module.diffusion.head_pcs].double().numpy()
    head = fit_head(Z, Y.astype(np.float64), groups)
    bias = head.y_mean - head.z_mean @ head.coef
    module.set_head(torch.as_tensor(head.coef, dtype=torch.float32), torch.as_tensor(bias, dtype=torch.float32))
    residuals = cross_fitted_residuals(Z, Y.astype(np.float64), groups, head).astype(np.float32)
    about = {"alpha": head.alpha, "rank": head.rank, **({"cv": head.cv["best"]} if "best" in head.cv else {})}
    hidden = module.diffusion.head_hidden
    if hidden:  # the average of the linear head and an early-stopped MLP, both cross-fitted by group
        X = cond.double().numpy()
        module.set_mlp_head(*fit_mlp_head(X, Y, hidden=hidden, seed=seed))
        crossed = np.empty_like(residuals)
        for g in np.unique(groups):
            out = groups == g
            w1, b1, w2, b2 = fit_mlp_head(X[~out], Y[~out], hidden=hidden, seed=seed)
            crossed[out] = Y[out] - (np.maximum(X[out] @ w1 + b1, 0) @ w2 + b2)
        residuals = (0.5 * (residuals + crossed)).astype(np.float32)
        about["mlp"] = {"hidden": int(hidden), "alpha": MLP_HEAD_ALPHA}
    logger.info("Mean head: %s", about)
    return residuals, about


#: L2 penalty of the MLP half of the head (the MLP baseline's default, chosen on validation folds inside C2-C5:
#: on the stage features' context, mean Pearson 0.535/0.565/0.572 (C5) and 0.493/0.537/0.561 (C2) for 30/100/300)
MLP_HEAD_ALPHA = 300.0


def fit_mlp_head(
    X: np.ndarray, Y: np.ndarray, *, hidden: int, seed: int = 0, alpha: float = MLP_HEAD_ALPHA
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Fit a one-hidden-layer MLP (scikit-learn, early-stopped on 15% of the rows) and return it as raw weights.

    The input and target standardisations are folded into the weights: ``relu(X @ w1 + b1) @ w2 + b2`` predicts
    ``Y`` from raw ``X``.
    """
    from sklearn.neural_network import MLPRegressor
    from sklearn.preprocessing import StandardScaler
    from threadpoolctl import threadpool_limits

    from stemst._early_stopping import train_early_stopped, validation_rows

    val = validation_rows(np.zeros(len(X)), np.arange(len(X)), None, 0.15, seed)
    xs, ys = StandardScaler().fit(X[~val]), StandardScaler().fit(Y[~val])
    x_tr, x_val = (xs.transform(X[m]).astype(np.float32) for m in (~val, val))
    y_tr, y_val = (ys.transform(Y[m]).astype(np.float32) for m in (~val, val))
    mlp = MLPRegressor(
        hidden_layer_sizes=(int(hidden),),
        alpha=alpha,
        batch_size=min(128, len(x_tr)),
        random_state=np.random.RandomState(seed),
    )
    with threadpool_limits(limits=1, user_api="blas"):
        mlp, _, _ = train_early_stopped(mlp, (x_tr, y_tr), (x_val, y_val), max_epochs=200, patience=10, progress=False)
    (w1, w2), (b1, b2) = mlp.coefs_, mlp.intercepts_
    scale = np.where(xs.scale_ > 0, xs.scale_, 1.0)
    w1f = w1 / scale[:, None]
    b1f = b1 - (xs.mean_ / scale) @ w1
    return w1f, b1f, w2 * ys.scale_, b2 * ys.scale_ + ys.mean_


@dataclass
class EarlyStopping:
    """Training callback: every ``every`` steps, the EMA's loss on held-out pairs; keeps the best weights.

    The loss is averaged over ``repeats`` draws of steps and noise from a fixed seed, so successive evaluations
    differ by the weights only. Training stops after ``patience`` evaluations without improvement.
    """

    cond: torch.Tensor
    y: torch.Tensor
    every: int
    patience: int = 8
    repeats: int = 8
    seed: int = 0
    best: float = float("inf")
    best_step: int = 0
    since_best: int = 0  #: evaluations since the best one
    best_state: dict[str, torch.Tensor] | None = None
    curve: list[dict[str, float]] = field(default_factory=list)

    @torch.no_grad()
    def loss(self, module: DiffusionModel) -> float:
        """Mean held-out loss of ``module``.

        The held-out rows are evaluated :data:`EVAL_CHUNK` at a time, each chunk with its own seed
        (:func:`chunk_seed`); under ``torchrun`` each process evaluates every ``world_size``-th chunk and the sums are
        added up across the processes, so the value does not depend on how many processes compute it.
        """
        was = module.training
        module.eval()
        total = torch.zeros((), dtype=torch.float64, device=module.device)
        for k, rows in my_chunks(len(self.y)):
            gen = torch.Generator(module.device).manual_seed(chunk_seed(self.seed, k))
            c, y = self.cond[rows].to(module.device), self.y[rows].to(module.device)
            for _ in range(self.repeats):
                total += module.loss(y, c, generator=gen)[1].double().sum()
        module.train(was)
        return float(distributed.all_sum(total)) / (len(self.y) * self.repeats)

    def __call__(self, state: TrainingState) -> bool:
        """Evaluate when due; return whether training should stop."""
        if self.curve and state.step < self.curve[-1]["step"] + self.every:
            return False
        value = self.loss(state.ema)
        state.history[-1]["val_mse"] = value
        self.curve.append({"step": state.step, "val_mse": value})
        if value < self.best:
            self.best, self.best_step, self.since_best = value, state.step, 0
            self.best_state = copy.deepcopy(state.ema.state_dict())
        else:
            self.since_best += 1
        return self.since_best >= self.patience

    def restore(self, module: DiffusionModel) -> None:
        """Load the best weights seen into ``module``."""
        if self.best_state is not None:
            module.load_state_dict(self.best_state)


@torch.no_grad()
def _shared_samples(module: DiffusionModel, cond: torch.Tensor, *, n_samples: int, steps: int, seed: int) -> np.ndarray:
    """Draw the samples minus the head, ``(n_samples, n, genes)``, :data:`EVAL_CHUNK` spots at a time.

    Each chunk has its own seed (:func:`chunk_seed`); under ``torchrun`` each process samples every ``world_size``-th
    chunk and the chunks are added up across the processes, so every process gets the samples one process would
    draw, at ``1/world_size`` of the cost.
    """
    out = torch.zeros((n_samples, len(cond), module.n_genes), dtype=torch.float32, device=module.device)
    for k, rows in my_chunks(len(cond)):
        c = cond[rows]
        gen = torch.Generator(module.device).manual_seed(chunk_seed(seed, k))
        out[:, rows] = module.sample(c, n_samples=n_samples, steps=steps, generator=gen) - module.head(c)
    return distributed.all_sum(out).cpu().numpy()


@torch.no_grad()
def calibrate(
    module: DiffusionModel,
    cond: torch.Tensor,
    residuals: np.ndarray,
    Y: np.ndarray,
    *,
    n_samples: int = 30,
    steps: int = 25,
    seed: int = 0,
    space: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> dict[str, Any]:
    """Choose the residual-mean weight, the offset weight and the per-gene spread on held-out spots; set them.

    ``residuals`` are the held-out spots' cross-fitted residuals and ``Y`` their targets, so ``Y - residuals`` is
    what a head fitted without them predicts. The weight maximises the held-out mean Pearson r of that prediction
    plus the weighted network mean; the offset weight (on ``module.y_mean``, the training sections' mean
    cross-fitted residual, which Pearson r cannot see) minimises that prediction's held-out squared error; the
    spread makes the central intervals of the samples hold their nominal share of the held-out values
    (:func:`stemst.model.calibration.spread_scales`).
    """
    module.eval()
    n_held = len(Y)
    if space is None and n_held > CALIBRATION_MAX_SPOTS:  # a random subset (the joint model keeps whole sections)
        keep = np.sort(np.random.default_rng(seed).choice(n_held, CALIBRATION_MAX_SPOTS, replace=False))
        cond, residuals, Y = cond[torch.as_tensor(keep)], residuals[keep], Y[keep]
    cond = cond.to(module.device, torch.float32)
    base = Y - residuals
    m = (
        torch.cat(
            [
                module.from_network(module.network_mean(module.condition(cond[i : i + EVAL_CHUNK]))) - module.y_mean
                for i in range(0, len(cond), EVAL_CHUNK)
            ]
        )
        .cpu()
        .numpy()
    )
    offset = module.y_mean.cpu().numpy()
    scores = [mean_pearson(base + offset + w * m, Y, undefined=-1.0) for w in RESIDUAL_WEIGHTS]
    weight = RESIDUAL_WEIGHTS[int(np.argmax(np.round(scores, 4)))]
    # Pearson r ignores a gene's level: the training residuals' mean is kept only as far as it lowers held-out MSE
    errors = [float(np.mean((base + a * offset + weight * m - Y) ** 2)) for a in OFFSET_WEIGHTS]
    offset_weight = OFFSET_WEIGHTS[int(np.argmin(np.round(errors, 5)))]
    module.set_calibration(weight, 1.0, offset_weight)
    if space is None:
        samples = _shared_samples(module, cond, n_samples=n_samples, steps=steps, seed=seed)
    else:  # neighbourhoods index into the whole held-out set: sampled at once, on every process
        gen = torch.Generator(module.device).manual_seed(seed)
        drawn = module.sample(
            cond, n_samples=n_samples, steps=steps, generator=gen, neighbours=space[0], offsets=space[1]
        )
        samples = (drawn - module.head(cond)).cpu().numpy()
    before = {f"coverage_{round(q * 100)}": coverage(samples, residuals, q) for q in LEVELS}
    scales = spread_scales(samples, residuals)
    module.set_calibration(weight, torch.as_tensor(scales, dtype=torch.float32))
    after = {f"coverage_{round(q * 100)}": coverage(widen(samples, scales), residuals, q) for q in LEVELS}
    about = {
        "residual_weight": weight,
        "weights_tried": list(RESIDUAL_WEIGHTS),
        "mean_pearson_by_weight": [float(s) for s in scores],
        "offset_weight": offset_weight,
        "offset_weights_tried": list(OFFSET_WEIGHTS),
        "mse_by_offset_weight": errors,
        "spread_median": float(np.median(scales)),
        "coverage_before": before,
        "coverage_after": after,
        "n_spots": len(Y),
        "n_held_out": n_held,
    }
    logger.info("Calibration on %d held-out spots: %s", len(Y), about)
    return about


def build_module(n_genes: int, cond_dim: int, network: NetworkConfig, diffusion: DiffusionConfig) -> DiffusionModel:
    """Return a fresh module for ``network``: the joint model for a spatial network, else the per-spot one."""
    kind = JointDiffusionModel if network.spatial else DiffusionModel
    return kind(n_genes, cond_dim, network, diffusion)


def check_cross_fitting(groups: np.ndarray) -> None:
    """Refuse too few spots for the mean head: it is cross-fitted by group, each fit on at least 2 other spots."""
    names, sizes = np.unique(groups, return_counts=True)
    if len(names) < 2 or (len(groups) - sizes).min() < 2:
        raise StemstDataError(
            f"fit with the mean head (head_pcs set) cross-fits it over groups of spots (the sections, or spatial "
            f"blocks of a single section), fitting each without its own group on at least 2 other spots: the "
            f"{len(groups)} training spots make {len(names)} group(s) of {sizes.tolist()} spots. Train on more spots "
            "or sections, or pass diffusion={'head_pcs': None}."
        )


def spot_neighbourhoods(
    coords: np.ndarray, sections: np.ndarray, rows: np.ndarray | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Neighbourhoods (indices, offsets) of the spots, or of the subset ``rows`` (indices local to it)."""
    from stemst._spatial import neighbourhoods

    keep = np.ones(len(coords), bool) if rows is None else rows
    nb, off = neighbourhoods(coords[keep], sections[keep])
    return torch.as_tensor(nb), torch.as_tensor(off)


@dataclass
class RecipeResult:
    """Outcome of :func:`fit_recipe`."""

    module: DiffusionModel  #: the EMA weights of the best held-out step, calibrated: the model to sample from
    history: list[dict[str, float]]  #: the training curve (``val_mse`` where it was measured)
    steps: int  #: steps trained
    record: dict[str, Any]  #: held-out group, head, training settings, early stopping and calibration choices


def _start(pairs: np.ndarray, Y: np.ndarray, groups: np.ndarray, configs: Configs) -> tuple:
    """Build the module, fit its head and statistics; return it, the conditions, targets, residuals and record."""
    network, diffusion, training, _ = configs
    if diffusion.head_pcs:
        check_cross_fitting(groups)
    diffusion = diffusion.fitted(len(Y), pairs.shape[1])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(training.seed)
        module = build_module(Y.shape[1], pairs.shape[1], network, diffusion)
    cond, y = torch.as_tensor(pairs), torch.as_tensor(Y)
    record: dict[str, Any] = {}
    residuals = None
    if diffusion.head_pcs:
        residuals, record["head"] = prepare_head(module, cond, Y, groups, seed=training.seed)
        y = module.head(cond) + torch.as_tensor(residuals)  # the diffusion learns the cross-fitted residuals
    return module, cond, y, residuals, record


def fit_recipe(
    pairs: np.ndarray,
    Y: np.ndarray,
    groups: np.ndarray,
    held: str | None,
    configs: Configs,
    *,
    coords: np.ndarray | None = None,
    sections: np.ndarray | None = None,
    device: torch.device,
    callback: Callable[[TrainingState, dict[str, Any]], bool | None] | None = None,
    **train_kwargs: Any,
) -> RecipeResult:
    """Train a module on arrays with the residual recipe.

    Parameters
    ----------
    pairs
        ``(n * v, cond_dim)`` conditions, ``v`` views per spot (row ``i * v + k``: view ``k`` of spot ``i``).
    Y
        ``(n, genes)`` targets.
    groups, held
        The group of each spot (cross-fitting) and the one held out for stopping and calibration (``None``: none).
    configs
        The run's configs (:meth:`stemst.model.presets.Preset.resolve`).
    coords, sections
        ``(n, 2)`` spot centres and ``(n,)`` sections: the neighbourhoods of a spatial network.
    device
        The resolved device.
    callback
        Called as ``callback(state, record)`` at every history entry; ``True`` stops training.
    **train_kwargs
        ``checkpoint_dir``, ``resume``, ``run_info``, ``progress`` of :func:`stemst.model.train`.
    """
    network, diffusion, training, recipe = configs
    module, cond, y, residuals, record = _start(pairs, Y, groups, configs)
    record = {"validation": held, **record}
    fit_rows = torch.as_tensor(groups != held) if held is not None else torch.ones(len(Y), dtype=torch.bool)
    rows = fit_rows.repeat_interleave(len(pairs) // len(Y))
    module.set_statistics(cond[rows], y[fit_rows], projection=not module.diffusion.head_pcs)
    training = training.resolved(int(rows.sum()), default_lr=network.default_lr)
    if network.spatial:  # each training row becomes a neighbourhood: the spot and its ring-1 neighbours
        space = spot_neighbourhoods(coords, sections)
        cond, y = pack(cond, *space), gather(y, space[0])
    record.update(training.as_dict())
    stopper = None
    if held is not None:
        every = max(1, training.steps // 40)
        stopper = EarlyStopping(cond[~rows], y[~fit_rows], every=every, patience=recipe.patience, seed=training.seed)

    def on_log(state: TrainingState) -> bool | None:
        stop = stopper(state) if stopper is not None else False
        return bool(callback(state, record)) or stop if callback else stop

    result = train(module, cond[rows], y[fit_rows], training, device=device, callback=on_log, **train_kwargs)
    if stopper is not None:
        stopper.restore(result.ema)
        record["early_stopping"] = {"best_step": stopper.best_step, "val_mse": stopper.best, "curve": stopper.curve}
        if recipe.calibrate and module.diffusion.head_pcs:
            held_rows = ~fit_rows.numpy()
            space = spot_neighbourhoods(coords, sections, held_rows) if network.spatial else None
            args = (torch.as_tensor(pairs)[~rows], residuals[held_rows], Y[held_rows])
            record["calibration"] = calibrate(result.ema, *args, seed=training.seed, space=space)
    return RecipeResult(result.ema, result.history, result.steps, record)
