"""Gather model inputs (embeddings) and targets (transformed panel counts) from stemst tables.

Shared by :func:`stemst.tl.fit`, the baselines and :func:`stemst.tl.predict`, so every method sees the same data.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

from stemst._logging import logger
from stemst._schema import (
    PANEL_KEY,
    SECTION_KEY,
    SPATIAL_KEY,
    TABLE_KEY,
    StemstDataError,
    check_raw_counts,
    get_table,
    section_mask,
    spot_sections,
)
from stemst.model.head import spatial_blocks


def as_tables(data: Any, table_key: str = TABLE_KEY) -> list[ad.AnnData]:
    """Return the tables of ``data``: a SpatialData, an AnnData, or a sequence of either."""
    if isinstance(data, ad.AnnData) or hasattr(data, "tables"):
        return [get_table(data, table_key)]
    if isinstance(data, Sequence) and len(data) and not isinstance(data, str):
        return [t for d in data for t in as_tables(d, table_key)]
    raise TypeError(f"Expected a SpatialData, an AnnData or a list of them, got {type(data).__name__}.")


def resolve_genes(adata: ad.AnnData, genes: str | Iterable[str] | None) -> list[str]:
    """Resolve a gene panel: ``None`` (the ``var['stemst_panel']`` flag), a boolean ``var`` column, or names."""
    if genes is None or isinstance(genes, str) and genes in adata.var.columns:
        col = PANEL_KEY if genes is None else genes
        if col not in adata.var.columns:
            raise StemstDataError(
                f"No gene panel: var[{col!r}] is missing. Choose one with stemst.pp.select_genes(..., "
                "train_sections=[...]) or pass genes=[...]."
            )
        names = adata.var_names[adata.var[col].to_numpy(dtype=bool)].tolist()
    else:
        names = [genes] if isinstance(genes, str) else [str(g) for g in genes]
    if not names:
        raise StemstDataError("The gene panel is empty.")
    if len(set(names)) != len(names):
        raise StemstDataError("The gene panel has duplicate names.")
    missing = [g for g in names if g not in adata.var_names]
    if missing:
        raise StemstDataError(f"{len(missing)} panel genes are absent from the table, e.g. {missing[:10]}.")
    return names


def get_embeddings(adata: ad.AnnData, embedding_key: str, *, views: bool = False) -> np.ndarray:
    """Embeddings ``obsm[embedding_key]`` (or their ``(n, 8, d)`` views) as float32, checked to be finite."""
    key = f"{embedding_key}_views" if views else embedding_key
    if key not in adata.obsm:
        known = [k for k in adata.obsm if k.startswith("X_")]
        hint = (
            "Run stemst.pp.embed_patches(..., augment=True) first." if views else "Run stemst.pp.embed_patches first."
        )
        raise KeyError(f"No embedding obsm[{key!r}]; embeddings present: {known}. {hint}")
    x = np.asarray(adata.obsm[key], dtype=np.float32)
    if not np.isfinite(x).all():
        bad = int((~np.isfinite(x.reshape(len(x), -1))).any(1).sum())
        raise StemstDataError(f"obsm[{key!r}] has non-finite values in {bad} spots; re-embed or drop those spots.")
    return x


def _counts_name(layer: str | None) -> str:
    return f"The counts layers[{layer!r}]" if layer else "The counts table's X"


def _sections_of(adata: ad.AnnData) -> np.ndarray | None:
    return adata.obs[SECTION_KEY].astype(str).to_numpy() if SECTION_KEY in adata.obs else None


def get_counts(adata: ad.AnnData, genes: Sequence[str], *, layer: str | None = None) -> np.ndarray:
    """Raw counts of ``genes`` as a dense float64 array (from ``X`` or ``layers[layer]``).

    Raises
    ------
    StemstDataError
        If the values are not raw counts (NaN or infinite, negative, non-integer: normalised or log-transformed data);
        every value of the panel is checked (:func:`stemst._schema.check_raw_counts`).
    """
    sub = adata[:, list(genes)]
    m = sub.layers[layer] if layer else sub.X
    m = m.toarray() if sp.issparse(m) else np.asarray(m)
    what = f"{_counts_name(layer)} (panel genes)"
    check_raw_counts(m, what=what, sections_=_sections_of(adata))
    return m.astype(np.float64)


def library_size(adata: ad.AnnData, *, layer: str | None = None) -> np.ndarray:
    """Total counts of each spot over all genes; refused when a spot's total is NaN or infinite."""
    m = adata.layers[layer] if layer else adata.X
    total = np.asarray(m.sum(axis=1)).ravel().astype(np.float64)
    if not np.isfinite(total).all():
        check_raw_counts(m, what=_counts_name(layer), sections_=_sections_of(adata))
    return total


def get_targets(adata: ad.AnnData, genes: Sequence[str], transform: str, *, layer: str | None = None) -> np.ndarray:
    """Targets on the model scale: ``transform`` applied to the raw counts of ``genes``."""
    from stemst.pp import transform_counts

    counts = get_counts(adata, genes, layer=layer)
    return np.asarray(
        transform_counts(counts, method=transform, library_size=library_size(adata, layer=layer)), np.float32
    )


@dataclass
class TrainingSet:
    """Aligned inputs and targets of the spots used for training."""

    X: np.ndarray  #: (n, d) embeddings of the original patches
    Y: np.ndarray  #: (n, g) targets on the model scale
    views: np.ndarray | None  #: (n, v, d) embeddings of the flips/rotations, view 0 the original, or None
    genes: list[str]
    obs_names: pd.Index
    sections: np.ndarray  #: (n,) section of each spot
    coords: np.ndarray | None = None  #: (n, 2) spot centres (``obsm['spatial']``) when every table has them

    @property
    def n_spots(self) -> int:
        """Number of spots."""
        return len(self.X)


def training_set(
    data: Any,
    *,
    embedding_key: str,
    genes: str | Iterable[str] | None = None,
    transform: str = "log2p1",
    sections: str | Iterable[str] | None = None,
    views: bool = False,
    table_key: str = TABLE_KEY,
    layer: str | None = None,
    drop_empty: bool = True,
) -> TrainingSet:
    """Collect embeddings and targets from one or several tables.

    Parameters
    ----------
    data
        SpatialData, AnnData, or a list of them.
    embedding_key
        ``obsm`` key of the embeddings.
    genes
        Gene panel (see :func:`resolve_genes`); resolved on the first table, required in all.
    transform
        Target transform name (see :func:`stemst.pp.transform_counts`).
    sections
        Restrict to these sections (all if ``None``).
    views
        Also collect the augmented views ``obsm[f"{embedding_key}_views"]``.
    table_key
        Table key for SpatialData inputs.
    layer
        Counts layer (``X`` if ``None``).
    drop_empty
        Drop spots whose panel counts are all zero (as the paper does).
    """
    tables = as_tables(data, table_key)
    panel = resolve_genes(tables[0], genes)
    xs, ys, vs, names, secs, xy = [], [], [], [], [], []
    n_dropped = 0
    for t in tables:
        mask = section_mask(t, sections) if SECTION_KEY in t.obs or sections is not None else np.ones(t.n_obs, bool)
        if not mask.any():
            continue
        t = t[mask]
        resolve_genes(t, panel)
        x = get_embeddings(t, embedding_key)
        y = get_targets(t, panel, transform, layer=layer)
        v = get_embeddings(t, embedding_key, views=True) if views else None
        if drop_empty:
            keep = get_counts(t, panel, layer=layer).sum(1) > 0
            n_dropped += int((~keep).sum())
            if (~keep).any():
                logger.info("Dropping %d spots with no counts in the panel", int((~keep).sum()))
            x, y = x[keep], y[keep]
            v = v[keep] if v is not None else None
            t = t[keep]
        xs.append(x)
        ys.append(y)
        vs.append(v)
        names.append(t.obs_names.to_numpy())
        xy.append(np.asarray(t.obsm[SPATIAL_KEY], np.float64)[:, :2] if SPATIAL_KEY in t.obsm else None)
        secs.append(spot_sections(t))
    if not xs or sum(len(x) for x in xs) == 0:
        if n_dropped:
            raise StemstDataError(
                f"All {n_dropped} selected spots have zero counts in the {len(panel)}-gene panel, so none can be "
                "trained on or scored. Check the panel (stemst.pp.select_genes on the training sections) and that "
                "the counts table holds raw counts."
            )
        raise StemstDataError(f"No spots selected (sections={sections!r}).")
    dims = {x.shape[1] for x in xs}
    if len(dims) > 1:
        raise StemstDataError(f"Embeddings {embedding_key!r} differ in width across tables: {sorted(dims)}.")
    return TrainingSet(
        X=np.concatenate(xs),
        Y=np.concatenate(ys),
        views=np.concatenate(vs) if views else None,
        genes=panel,
        obs_names=pd.Index(np.concatenate(names)),
        sections=np.concatenate(secs),
        coords=np.concatenate(xy) if all(c is not None for c in xy) else None,
    )


def training_pairs(
    tables: list[ad.AnnData],
    *,
    embedding_key: str,
    genes: str | Iterable[str] | None = None,
    transform: str = "log2p1",
    sections: str | Iterable[str] | None = None,
    augment: bool = True,
) -> tuple[TrainingSet, np.ndarray]:
    """Collect the training set and its ``(n * v, d)`` conditions: ``v`` views of each spot in a row (1 without).

    With ``augment``, the embeddings of the 8 flips/rotations ``obsm[f"{embedding_key}_views"]`` are the
    conditions (falling back to the originals, with a warning, when a table lacks them); ``TrainingSet.views`` is
    ``None`` when they are not used.
    """
    views = bool(augment) and all(f"{embedding_key}_views" in t.obsm for t in tables)
    if augment and not views:
        logger.warning(
            "augment=True but obsm[%r] is missing; training on the original patches only. Run "
            "stemst.pp.embed_patches(..., augment=True) for the 8 flips/rotations.",
            f"{embedding_key}_views",
        )
    ts = training_set(
        tables, embedding_key=embedding_key, genes=genes, transform=transform, sections=sections, views=views
    )
    return ts, (ts.views.reshape(-1, ts.views.shape[-1]) if views else ts.X)


#: spatial blocks used as groups when the training data is a single section
N_BLOCKS = 4


def holdout_groups(ts: TrainingSet, validation: str | None) -> tuple[np.ndarray, str | None]:
    """Return the groups for cross-fitting (sections, or spatial blocks of a single section) and the held-out one.

    ``validation``: ``"auto"`` (the last group), a section name, or ``None`` (nothing held out).
    """
    sections = ts.sections.astype(str)
    if len(np.unique(sections)) >= 2:
        groups = sections
    elif ts.n_spots >= 4 * N_BLOCKS:
        coords = ts.coords if ts.coords is not None else np.arange(ts.n_spots, dtype=float)[:, None].repeat(2, 1)
        groups = np.array([f"block{b}" for b in spatial_blocks(coords, N_BLOCKS)])
    else:
        groups = np.zeros(ts.n_spots, str)
    names = list(dict.fromkeys(groups.tolist()))
    if validation is None or len(names) < 2:
        return groups, None
    if validation == "auto":
        return groups, names[-1]
    if validation not in names:
        raise ValueError(f"validation={validation!r} is not one of the training groups {names}.")
    return groups, validation
