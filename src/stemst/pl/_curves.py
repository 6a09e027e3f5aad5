"""Non-spatial plots: gene variation curves, per-gene correlation of methods, the training loss curve."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from stemst._docs import (
    doc_ax,
    doc_genes_subset,
    doc_params,
    doc_pred_key,
    doc_sections,
    doc_show_save,
    doc_table_key,
)
from stemst._schema import PREDICTION_KEY, TABLE_KEY
from stemst.pl._utils import as_list, finish


def _per_gene(sdata: Any, pred_keys: Sequence[str], table_key: str, **kwargs: Any) -> dict[str, pd.DataFrame]:
    from stemst.tl import evaluate

    return {k: evaluate(sdata, pred_key=k, table_key=table_key, key_added=None, **kwargs).per_gene for k in pred_keys}


def _new_axes(ax: Any, figsize: tuple[float, float]) -> tuple[Any, Any]:
    import matplotlib.pyplot as plt

    if ax is None:
        fig, ax = plt.subplots(figsize=figsize, layout="constrained")
    return ax.figure, ax


@doc_params(
    pred_key=doc_pred_key,
    table_key=doc_table_key,
    genes=doc_genes_subset,
    sections=doc_sections,
    show_save=doc_show_save,
)
def variation_curves(
    sdata: Any,
    *,
    pred_key: str | Sequence[str] = PREDICTION_KEY,
    table_key: str = TABLE_KEY,
    genes: Sequence[str] | None = None,
    sections: str | Sequence[str] | None = None,
    figsize: tuple[float, float] = (10.0, 3.5),
    show: bool | None = None,
    save: str | Path | None = None,
) -> np.ndarray:
    """Gene variation curves (the Stem paper's figure): each gene's mean and variance across spots.

    Genes are ordered by the measured value on the x axis; the measured curve is a line and each prediction is a
    set of points, so a method that shrinks towards the mean shows predicted variances below the measured curve.

    Parameters
    ----------
    sdata
        :class:`~spatialdata.SpatialData` with the counts table and the prediction table(s).
    {pred_key}
        One or several, overlaid.
    {table_key}
    {genes}
    {sections}
    figsize
        Figure size in inches.
    {show_save}

    Returns
    -------
    Two axes: mean, variance (on the model's scale).

    Examples
    --------
    >>> ridge = stemst.tl.fit_baseline(sdata, method="ridge", embedding_key="X_color_stats", sections="C2", alpha="hest")
    >>> [stemst.tl.predict(m, sdata, sections="C6", progress=False) for m in (model, ridge)]
    ['stemst_prediction', 'ridge_prediction']
    >>> axes = stemst.pl.variation_curves(sdata, pred_key=["stemst_prediction", "ridge_prediction"], show=False)
    >>> axes.shape
    (2,)
    """
    import matplotlib.pyplot as plt

    keys = as_list(pred_key)
    per_gene = _per_gene(sdata, keys, table_key, genes=genes, sections=sections, normalized=False)
    fig, axes = plt.subplots(1, 2, figsize=figsize, layout="constrained")
    first = per_gene[keys[0]]
    for ax, stat in zip(axes, ("mean", "var"), strict=True):
        order = np.argsort(first[f"{stat}_true"].to_numpy(), kind="stable")
        x = np.arange(len(order))
        ax.plot(x, first[f"{stat}_true"].to_numpy()[order], color="black", lw=1.5, label="measured")
        for k in keys:
            df = per_gene[k].reindex(first.index)
            ax.scatter(x, df[f"{stat}_pred"].to_numpy()[order], s=8, alpha=0.8, label=k)
        ax.set_xlabel(f"genes, ordered by measured {stat}")
        ax.set_ylabel("mean across spots" if stat == "mean" else "variance across spots")
        ax.set_title(f"Gene {'mean' if stat == 'mean' else 'variance'}")
    axes[0].legend(frameon=False, fontsize="small")
    finish(fig, show, save)
    return axes


@doc_params(table_key=doc_table_key, ax=doc_ax, show_save=doc_show_save)
def gene_correlation(
    data: Any,
    *,
    pred_keys: Sequence[str] | None = None,
    table_key: str = TABLE_KEY,
    metric: str = "pearson",
    kind: str = "sorted",
    genes: Sequence[str] | None = None,
    ax: Any = None,
    figsize: tuple[float, float] = (5.0, 3.5),
    show: bool | None = None,
    save: str | Path | None = None,
) -> Any:
    """Per-gene correlation between predicted and measured expression, for several methods.

    Parameters
    ----------
    data
        A :class:`~spatialdata.SpatialData` (then ``pred_keys`` are evaluated with :func:`stemst.tl.evaluate`), or a
        mapping ``name -> Evaluation`` or ``name -> per-gene DataFrame``.
    pred_keys
        Prediction tables to compare (SpatialData input).
    {table_key}
    metric
        A per-gene column, e.g. ``"pearson"``, ``"spearman"``, ``"pearson_norm"``.
    kind
        ``"sorted"``: each method's values sorted in decreasing order (a PCC-k curve: its mean up to rank k is
        PCC-k); ``"box"``: one box per method.
    genes
        Genes to include (SpatialData input).
    {ax}
    figsize
        Size of a new figure in inches.
    {show_save}

    Returns
    -------
    The axes.

    Examples
    --------
    >>> keys = []
    >>> for method, setting in (("ridge", dict(alpha="hest")), ("knn", dict(k=10))):
    ...     m = stemst.tl.fit_baseline(sdata, method=method, embedding_key="X_color_stats", sections="C2", **setting)
    ...     keys.append(stemst.tl.predict(m, sdata, sections="C6", progress=False))
    >>> keys.append(stemst.tl.predict(model, sdata, sections="C6", progress=False))
    >>> ax = stemst.pl.gene_correlation(sdata, pred_keys=keys, show=False)
    >>> [t.get_text() for t in ax.get_legend().get_texts()]  # doctest: +ELLIPSIS
    ['ridge_prediction (mean 0...)', 'knn_prediction (mean 0...)', 'stemst_prediction (mean 0...)']
    """
    if kind not in ("sorted", "box"):
        raise ValueError(f"kind must be 'sorted' or 'box', got {kind!r}.")
    if isinstance(data, Mapping):
        tables = {str(k): getattr(v, "per_gene", v) for k, v in data.items()}
    else:
        if not pred_keys:
            raise ValueError("Pass pred_keys=[...] with a SpatialData input.")
        tables = _per_gene(data, list(pred_keys), table_key, genes=genes, normalized=metric.endswith("_norm"))
    for name, df in tables.items():
        if metric not in df.columns:
            raise KeyError(f"No per-gene metric {metric!r} for {name!r}; available: {list(df.columns)}.")
    values = {name: df[metric].dropna().to_numpy() for name, df in tables.items()}
    fig, ax = _new_axes(ax, figsize)
    if kind == "sorted":
        for name, v in values.items():
            ax.plot(np.arange(1, len(v) + 1), np.sort(v)[::-1], lw=1.5, label=f"{name} (mean {v.mean():.2f})")
        ax.set_xlabel("gene rank")
        ax.legend(frameon=False, fontsize="small")
    else:
        ax.boxplot(list(values.values()), tick_labels=list(values))
        ax.tick_params(axis="x", rotation=30)
    ax.axhline(0, color="grey", lw=0.5)
    ax.set_ylabel(f"per-gene {metric}")
    finish(fig, show, save)
    return ax


@doc_params(ax=doc_ax, show_save=doc_show_save)
def training_curve(
    model: Any,
    *,
    smooth: int | None = None,
    log: bool = True,
    ax: Any = None,
    figsize: tuple[float, float] = (5.0, 3.5),
    show: bool | None = None,
    save: str | Path | None = None,
) -> Any:
    """Plot the training loss against the step, raw and smoothed.

    Parameters
    ----------
    model
        Anything with a ``.history`` that converts to a DataFrame with ``step`` and ``loss`` columns (a list of dicts
        or a DataFrame), e.g. a :class:`~stemst.tl.StemstModel` or an MLP baseline; or such a history itself.
        A ``val_loss`` column (MLP baseline) or ``val_mse`` column (stemst's held-out loss, which stops training
        early) is drawn too, with the step whose weights were kept.
    smooth
        Window (in records) of the centred rolling mean; default about 2% of the records, at least 1.
    log
        Logarithmic loss axis.
    {ax}
    figsize
        Size of a new figure in inches.
    {show_save}

    Returns
    -------
    The axes.

    Examples
    --------
    >>> ax = stemst.pl.training_curve(model, show=False)
    >>> ax.get_xlabel()
    'step'
    """
    history = getattr(model, "history", model)
    df = pd.DataFrame(history)
    if not {"step", "loss"} <= set(df.columns) or df.empty:
        raise ValueError(f"The training history needs 'step' and 'loss' records; got columns {list(df.columns)}.")
    df = df.sort_values("step")
    window = smooth or max(1, len(df) // 50)
    fig, ax = _new_axes(ax, figsize)
    ax.plot(df["step"], df["loss"], color="tab:blue", alpha=0.25, lw=0.8, label="loss")
    ax.plot(
        df["step"],
        df["loss"].rolling(window, center=True, min_periods=1).mean(),
        color="tab:blue",
        lw=1.8,
        label=f"loss (mean of {window})",
    )
    for col, label in (("val_loss", "validation loss"), ("val_mse", "held-out MSE")):
        if col in df.columns:
            val = df.dropna(subset=[col])
            ax.plot(val["step"], val[col], "o-", color="tab:orange", ms=3, lw=1.2, label=label)
    best = getattr(model, "training", {}).get("early_stopping", {}).get("best_step")
    if best:
        ax.axvline(best, color="tab:orange", ls=":", lw=1, label=f"weights kept (step {best})")
    if log and (df["loss"] > 0).all():
        ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.legend(frameon=False, fontsize="small")
    finish(fig, show, save)
    return ax
