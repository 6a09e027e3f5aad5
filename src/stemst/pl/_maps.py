"""Spatial maps over the H&E: measured vs predicted expression, and the prediction's uncertainty."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from stemst._docs import doc_layer, doc_panel_size, doc_params, doc_pred_key, doc_show_save, doc_table_key
from stemst._schema import PREDICTION_KEY, TABLE_KEY, StemstDataError, get_table, section_mask
from stemst.pl._utils import as_list, draw_section, finish, grid
from stemst.tl._data import get_targets


def _prediction(sdata: Any, pred_key: str, genes: list[str]) -> Any:
    pred = get_table(sdata, pred_key)
    missing = [g for g in genes if g not in pred.var_names]
    if missing:
        raise KeyError(
            f"Genes {missing} are not in prediction {pred_key!r}; it predicts e.g. {pred.var_names[:10].tolist()}."
        )
    return pred


def _layer_values(adata: Any, genes: list[str], layer: str | None) -> np.ndarray:
    sub = adata[:, genes]
    if layer is not None and layer not in sub.layers:
        raise KeyError(f"No layer {layer!r} in the prediction table; layers: {list(sub.layers)}.")
    m = sub.layers[layer] if layer else sub.X
    return np.asarray(m.toarray() if hasattr(m, "toarray") else m, dtype=np.float64)


@doc_params(
    pred_key=doc_pred_key, table_key=doc_table_key, layer=doc_layer, panel_size=doc_panel_size, show_save=doc_show_save
)
def expression_maps(
    sdata: Any,
    genes: str | Sequence[str],
    *,
    section: str,
    pred_key: str = PREDICTION_KEY,
    table_key: str = TABLE_KEY,
    layer: str | None = None,
    cmap: str = "viridis",
    panel_size: tuple[float, float] = (4.0, 4.0),
    figsize: tuple[float, float] | None = None,
    show: bool | None = None,
    save: str | Path | None = None,
) -> np.ndarray:
    """Measured and predicted expression of each gene over the H&E of one section, side by side.

    Both panels of a gene share one colour scale (the range of measured and predicted values together), on the
    model's scale: the measured counts go through the prediction's transform (e.g. log2(count + 1)).

    Parameters
    ----------
    sdata
        :class:`~spatialdata.SpatialData` with the counts table and the prediction table.
    genes
        Gene(s) to draw, one row each.
    section
        Section to draw.
    {pred_key}
    {table_key}
    {layer}
    cmap
        Colour map.
    {panel_size}
    {show_save}

    Returns
    -------
    ``(n_genes, 2)`` array of axes: measured left, predicted right.

    Examples
    --------
    >>> key = stemst.tl.predict(model, sdata, sections="C6", n_samples=4, progress=False)
    >>> axes = stemst.pl.expression_maps(sdata, ["GNAS", "CD74"], section="C6", pred_key=key, show=False)
    >>> axes.shape  # one row per gene
    (2, 2)
    """
    genes = as_list(genes)
    pred = _prediction(sdata, pred_key, genes)
    mask = section_mask(pred, section)
    if not mask.any():
        raise StemstDataError(f"Prediction {pred_key!r} has no spots in section {section!r}.")
    pred = pred[mask]
    measured = get_table(sdata, table_key)
    missing = pred.obs_names.difference(measured.obs_names)
    if len(missing):
        raise StemstDataError(
            f"{len(missing)} predicted spots are not in table {table_key!r}, e.g. {missing[:5].tolist()}."
        )
    transform = pred.uns.get(PREDICTION_KEY, {}).get("transform", "log2p1")
    y_true = get_targets(measured[pred.obs_names], genes, transform, layer=layer).astype(np.float64)
    y_pred = _layer_values(pred, genes, None)
    fig, axes = grid(2 * len(genes), ncols=2, panel_size=panel_size, figsize=figsize)
    axes = axes.reshape(len(genes), 2)
    for i, g in enumerate(genes):
        vmin = float(min(y_true[:, i].min(), y_pred[:, i].min()))
        vmax = float(max(y_true[:, i].max(), y_pred[:, i].max()))
        for j, (values, what) in enumerate([(y_true[:, i], "measured"), (y_pred[:, i], "predicted")]):
            coll = draw_section(axes[i, j], sdata, pred, section, values=values, cmap=cmap, vmin=vmin, vmax=vmax)
            axes[i, j].set_title(f"{g} {what}")
        fig.colorbar(coll, ax=axes[i].tolist(), shrink=0.8, label=transform)
    finish(fig, show, save)
    return axes


@doc_params(pred_key=doc_pred_key, panel_size=doc_panel_size, show_save=doc_show_save)
def uncertainty_map(
    sdata: Any,
    genes: str | Sequence[str],
    *,
    section: str,
    pred_key: str = PREDICTION_KEY,
    layer: str = "std",
    cmap: str = "magma",
    ncols: int = 4,
    panel_size: tuple[float, float] = (4.0, 4.0),
    figsize: tuple[float, float] | None = None,
    show: bool | None = None,
    save: str | Path | None = None,
) -> np.ndarray:
    """Map the spread of the model's samples (``layers['std']``) of each gene over the H&E of one section.

    Parameters
    ----------
    sdata
        :class:`~spatialdata.SpatialData` with the prediction table.
    genes
        Gene(s) to draw, one panel each (own colour scale).
    section
        Section to draw.
    {pred_key}
    layer
        Layer to draw (default the sample standard deviation on the model's scale).
    cmap
        Colour map.
    ncols
        Panels per row.
    {panel_size}
    {show_save}

    Returns
    -------
    The axes, one per gene.

    Examples
    --------
    >>> key = stemst.tl.predict(model, sdata, sections="C6", n_samples=4, progress=False)
    >>> axes = stemst.pl.uncertainty_map(sdata, ["GNAS", "CD74"], section="C6", pred_key=key, show=False)
    >>> axes.shape  # one panel per gene
    (2,)
    """
    genes = as_list(genes)
    pred = _prediction(sdata, pred_key, genes)
    mask = section_mask(pred, section)
    if not mask.any():
        raise StemstDataError(f"Prediction {pred_key!r} has no spots in section {section!r}.")
    values = _layer_values(pred[mask], genes, layer)
    if np.allclose(values, 0):
        from stemst._logging import logger

        logger.warning("layers[%r] of %r is zero: the predictor is deterministic, there is no spread.", layer, pred_key)
    fig, axes = grid(len(genes), ncols=ncols, panel_size=panel_size, figsize=figsize)
    for i, (ax, g) in enumerate(zip(axes, genes, strict=True)):
        coll = draw_section(ax, sdata, pred, section, values=values[:, i], cmap=cmap)
        ax.set_title(f"{g} ({layer})")
        fig.colorbar(coll, ax=ax, shrink=0.8)
    finish(fig, show, save)
    return axes
