"""Spatial context: each spot's embedding beside the mean embeddings of its neighbour rings on the spot grid."""

from __future__ import annotations

import time
from typing import Any

import anndata as ad
import numpy as np

from stemst._docs import doc_embedding_key, doc_params, doc_table_key
from stemst._logging import logger
from stemst._schema import (
    SPATIAL_KEY,
    TABLE_KEY,
    UNS_KEY,
    StemstDataError,
    context_key,
    get_table,
    ring_key,
    spot_sections,
)
from stemst._spatial import ring_graphs, spot_spacing


def _standardize(x: np.ndarray) -> np.ndarray:
    return (x - x.mean(0)) / (x.std(0) + 1e-3)


@doc_params(embedding_key=doc_embedding_key, table_key=doc_table_key)
def spatial_context(
    data: Any,
    *,
    embedding_key: str = "X_efficientnet_lite0",
    n_rings: int = 2,
    use_views: bool = True,
    standardize: bool = True,
    table_key: str = TABLE_KEY,
) -> str:
    """Add each spot's spatial context to its image embedding.

    For every section on its own: the spot graph is built from the spot centres and the grid spacing (the median
    nearest-neighbour distance, :func:`spot_spacing`), ring ``k`` holding the spots ``k`` grid steps away; each
    spot's own embedding is the mean of its 8 flips/rotations (when present: test-time augmentation), and its
    context the mean own-embedding over each ring (a spot with an empty ring takes the next inner one). On
    HER2ST, ridge regression on own + ring-1 + ring-2 scores 0.03 higher mean Pearson than on the own patch
    alone (validation sections inside C2-C5).

    Parameters
    ----------
    data
        SpatialData or AnnData with ``obsm[embedding_key]`` (see :func:`stemst.pp.embed_patches`).
    {embedding_key}
        Here the per-spot image embedding, ``"X_<encoder>"``.
    n_rings
        Neighbour rings to add.
    use_views
        Use the mean over the views ``obsm[f"{{embedding_key}}_views"]`` as the own embedding when present.
    standardize
        Standardise every feature within each section (zero mean, unit variance), which removes stain and
        scanner shifts between sections; predictions are compared within a section, so nothing is lost.
    {table_key}

    Returns
    -------
    The key of the context features, ``f"{{embedding_key}}_context"``. Sets in the table:

    - ``obsm[f"{{embedding_key}}_ring{{k}}"]``: mean own-embedding of ring ``k``, for ``k = 1..n_rings``;
    - ``obsm[f"{{embedding_key}}_context"]``: ``[own, ring1, ..., ring_n]`` concatenated, ``(n, (1 + n_rings) d)``,
      standardised per section if ``standardize`` (the input of :func:`stemst.tl.fit` and the baselines);
    - ``uns['stemst']['context'][key]``: the settings and each section's grid spacing.

    Examples
    --------
    >>> key = stemst.pp.spatial_context(sdata, embedding_key="X_color_stats")  # sdata: HER2ST C2 and C6
    >>> key, sdata.tables["table"].obsm[key].shape  # own, ring-1 and ring-2 means of the 30 features
    ('X_color_stats_context', (365, 90))
    """
    t0 = time.perf_counter()
    table = get_table(data, table_key)
    if embedding_key not in table.obsm:
        known = [k for k in table.obsm if k.startswith("X_")]
        raise KeyError(f"No embedding obsm[{embedding_key!r}] (present: {known}). Run stemst.pp.embed_patches first.")
    if SPATIAL_KEY not in table.obsm:
        raise StemstDataError(f"The table has no obsm[{SPATIAL_KEY!r}] spot centres; spatial context needs them.")
    if n_rings < 1:
        raise ValueError(f"n_rings must be >= 1, got {n_rings}.")
    views = f"{embedding_key}_views"
    own = np.asarray(table.obsm[views] if use_views and views in table.obsm else table.obsm[embedding_key])
    own = own.mean(1) if own.ndim == 3 else own
    own = own.astype(np.float32)
    if not np.isfinite(own).all():
        raise StemstDataError(f"obsm[{embedding_key!r}] has non-finite values; re-embed those spots first.")
    coords = np.asarray(table.obsm[SPATIAL_KEY], dtype=np.float64)
    secs = spot_sections(table)
    rings = np.zeros((n_rings, *own.shape), np.float32)
    context = np.zeros((own.shape[0], (1 + n_rings) * own.shape[1]), np.float32)
    spacings = {}
    for s in dict.fromkeys(secs):
        idx = np.flatnonzero(secs == s)
        if len(idx) < 2:
            logger.warning("Section %r has %d spot(s): its spatial context is its own embedding.", s, len(idx))
            rings[:, idx] = own[idx]
        else:
            sub = ad.AnnData(obs={"i": idx.astype(str)}, obsm={SPATIAL_KEY: coords[idx]})
            spacings[s] = spot_spacing(coords[idx])
            inner = own[idx]
            for k, graph in enumerate(ring_graphs(sub, n_rings, spacings[s])):
                ring = graph @ own[idx]
                empty = np.asarray(graph.sum(1)).ravel() == 0
                ring[empty] = inner[empty]
                rings[k, idx] = inner = ring.astype(np.float32)
        block = np.concatenate([own[idx], *rings[:, idx]], axis=1)
        context[idx] = _standardize(block) if standardize and len(idx) > 1 else block
    for k in range(n_rings):
        table.obsm[ring_key(embedding_key, k + 1)] = rings[k]
    key = context_key(embedding_key)
    table.obsm[key] = context
    settings = {
        "embedding_key": embedding_key,
        "n_rings": int(n_rings),
        "use_views": bool(use_views and views in table.obsm),
        "standardize": bool(standardize),
        "spacing": {k: float(v) for k, v in spacings.items()},
    }
    table.uns.setdefault(UNS_KEY, {}).setdefault("context", {})[key] = settings
    emb = table.uns[UNS_KEY].get("embeddings", {}).get(embedding_key)
    if emb is not None:  # so that models trained on the context know the encoder behind it
        table.uns[UNS_KEY]["embeddings"][key] = {**dict(emb), "context": settings}
    logger.info(
        "Spatial context %s: %d spots, %d rings, %d features (%.1f s)",
        key,
        table.n_obs,
        n_rings,
        context.shape[1],
        time.perf_counter() - t0,
    )
    return key
