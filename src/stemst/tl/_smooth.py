"""Post-hoc spatial smoothing of a prediction: the cheap competitor of spatial context and joint sampling."""

from __future__ import annotations

from typing import Any

import numpy as np

from stemst._docs import doc_overwrite, doc_params, doc_pred_key
from stemst._logging import logger
from stemst._schema import (
    PREDICTION_KEY,
    SPATIAL_KEY,
    StemstDataError,
    check_table_key_free,
    get_table,
    spot_sections,
)


@doc_params(pred_key=doc_pred_key, overwrite=doc_overwrite)
def smooth(
    sdata: Any,
    pred_key: str = PREDICTION_KEY,
    *,
    weight: float = 0.5,
    key_added: str | None = None,
    overwrite: bool = False,
) -> str:
    """Blend each spot's prediction with the mean prediction of its ring-1 neighbours (same section).

    ``X_new = (1 - weight) X + weight * mean(X over ring-1 neighbours)``; the ring-1 neighbours are the spots one
    grid step away (:func:`stemst.pp.spot_spacing`, :func:`stemst._spatial.ring_graphs`), so a spot with no
    neighbour keeps its value. The expected counts are smoothed the same way; per-spot samples and ``std`` are
    dropped, since a smoothed mean no longer belongs to them. Used as a baseline: it is what spatial context
    should beat.

    Parameters
    ----------
    sdata
        SpatialData holding the prediction table.
    {pred_key}
        The prediction to smooth.
    weight
        Weight of the neighbours' mean, in ``[0, 1]``.
    key_added
        Key of the smoothed table (default ``f"{{pred_key}}_smoothed"``); never the counts table ``"table"``.
    {overwrite}

    Returns
    -------
    The key of the new table: a copy of the prediction with ``X`` and ``layers['counts']`` smoothed, and
    ``uns['stemst_prediction']`` recording ``smoothing_weight`` and the method as ``f"{{method}}+smooth"``.

    Examples
    --------
    >>> ridge = stemst.tl.fit_baseline(sdata, method="ridge", embedding_key="X_color_stats", sections="C2", alpha="hest")
    >>> key = stemst.tl.predict(ridge, sdata, sections="C6", progress=False)
    >>> stemst.tl.smooth(sdata, key, weight=0.5)
    'ridge_prediction_smoothed'
    """
    import anndata as ad

    from stemst._spatial import ring_graphs, spot_spacing

    if not 0.0 <= weight <= 1.0:
        raise ValueError(f"weight must be in [0, 1], got {weight}.")
    pred = get_table(sdata, pred_key)
    key = key_added or f"{pred_key}_smoothed"
    check_table_key_free(sdata, key, overwrite=overwrite)  # never the counts table, even with overwrite=True
    if SPATIAL_KEY not in pred.obsm:
        raise StemstDataError(f"Prediction {pred_key!r} has no obsm[{SPATIAL_KEY!r}]; smoothing needs spot centres.")
    out = pred.copy()
    X = np.asarray(out.X, dtype=np.float64)
    counts = np.asarray(out.layers["counts"], dtype=np.float64) if "counts" in out.layers else None
    secs = spot_sections(out)
    coords = np.asarray(out.obsm[SPATIAL_KEY], dtype=np.float64)
    for s in dict.fromkeys(secs):
        idx = np.flatnonzero(secs == s)
        if len(idx) < 2:
            continue
        sub = ad.AnnData(obs={"i": idx.astype(str)}, obsm={SPATIAL_KEY: coords[idx]})
        (graph,) = ring_graphs(sub, 1, spot_spacing(coords[idx]))
        lonely = np.asarray(graph.sum(1)).ravel() == 0
        for m in (X, counts) if counts is not None else (X,):
            nb = graph @ m[idx]
            nb[lonely] = m[idx][lonely]
            m[idx] = (1 - weight) * m[idx] + weight * nb
    out.X = X.astype(np.float32)
    if counts is not None:
        out.layers["counts"] = counts.astype(np.float32)
    for layer in [k for k in out.layers if k != "counts"]:
        del out.layers[layer]
    if "samples" in out.obsm:
        del out.obsm["samples"]
    params = dict(out.uns.get(PREDICTION_KEY, {}))
    params.update(method=f"{params.get('method', pred_key)}+smooth", smoothing_weight=float(weight), source=pred_key)
    out.uns[PREDICTION_KEY] = params
    sdata.tables[key] = out
    logger.info("Stored the smoothed prediction in sdata.tables[%r]", key)
    return key
