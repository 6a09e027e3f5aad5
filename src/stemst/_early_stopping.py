"""Early-stopped training of a scikit-learn network, shared by the MLP baseline and the mean head's MLP half.

:func:`validation_rows` holds out a training section or a random share of the spots; :func:`train_early_stopped`
trains one ``partial_fit`` epoch at a time and keeps the network of the lowest held-out error.
"""

from __future__ import annotations

import copy
from typing import Any

import numpy as np

from stemst._errors import StemstDataError


def validation_rows(
    groups: np.ndarray, spots: np.ndarray, val_section: str | None, fraction: float, seed: int
) -> np.ndarray:
    """Boolean mask of the held-out rows: a training section, or a random ``fraction`` of the spots (views together)."""
    if val_section is not None:
        val = groups == val_section
        if not val.any() or val.all():
            raise StemstDataError(
                f"val_section={val_section!r} must be one of several training sections {np.unique(groups).tolist()}."
            )
        return val
    from sklearn.model_selection import GroupShuffleSplit

    if not 0 < fraction < 1:
        raise ValueError(f"validation_fraction must be in (0, 1), got {fraction}.")
    split = GroupShuffleSplit(n_splits=1, test_size=fraction, random_state=seed)
    _, held = next(split.split(spots, groups=spots))
    val = np.zeros(len(spots), dtype=bool)
    val[held] = True
    return val


def train_early_stopped(
    mlp: Any,
    train: tuple[np.ndarray, np.ndarray],
    held_out: tuple[np.ndarray, np.ndarray],
    *,
    max_epochs: int,
    patience: int,
    progress: bool,
) -> tuple[Any, float, list[dict]]:
    """Train one ``partial_fit`` epoch at a time, scoring the held-out rows after each.

    Returns a copy of the network of the lowest held-out MSE, that MSE, and the history (one record per epoch).
    """
    from tqdm.auto import tqdm

    history: list[dict] = []
    best, best_mlp, wait = np.inf, mlp, 0
    steps_per_epoch = int(np.ceil(len(train[0]) / mlp.batch_size))
    for epoch in tqdm(range(1, max_epochs + 1), desc="mlp", disable=not progress):
        mlp.partial_fit(*train)
        val_loss = float(np.mean((mlp.predict(held_out[0]) - held_out[1]) ** 2))
        record = {"epoch": epoch, "step": epoch * steps_per_epoch, "loss": float(mlp.loss_), "val_loss": val_loss}
        history.append(record)
        if val_loss < best:
            best, best_mlp, wait = val_loss, copy.deepcopy(mlp), 0
            record["best"] = True
        else:
            wait += 1
            if wait >= patience:
                break
    return best_mlp, best, history
