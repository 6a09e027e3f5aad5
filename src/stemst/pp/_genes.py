"""The gene panel: which genes the model predicts, chosen on training sections only."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

from stemst._docs import doc_params, doc_table_key
from stemst._errors import warn
from stemst._logging import logger
from stemst._schema import (
    N_SECTIONS_KEY,
    PANEL_KEY,
    SECTION_KEY,
    TABLE_KEY,
    UNS_KEY,
    StemstDataError,
    check_key_free,
    check_raw_counts,
    get_table,
    section_mask,
)
from stemst._schema import sections as _sections

DEFAULT_EXCLUDE = ("MT-", "RPS", "RPL")


def _column_stats(x: Any) -> tuple[np.ndarray, np.ndarray]:
    """Per-gene mean and standard deviation (ddof=0) of a spots x genes matrix, sparse or dense."""
    if sp.issparse(x):
        x = x.tocsc().astype(np.float64)
        mean = np.asarray(x.mean(axis=0)).ravel()
        sq = np.asarray(x.multiply(x).mean(axis=0)).ravel()
    else:
        x = np.asarray(x, dtype=np.float64)
        mean, sq = x.mean(axis=0), (x * x).mean(axis=0)
    return mean, np.sqrt(np.maximum(sq - mean**2, 0.0))


def _excluded(genes: pd.Index, exclude: Sequence[str]) -> np.ndarray:
    upper = genes.str.upper()
    mask = np.zeros(len(genes), dtype=bool)
    for prefix in exclude:
        mask |= np.asarray(upper.str.startswith(prefix.upper()), dtype=bool)
    return mask


def _top_hvg_per_section(adata: ad.AnnData, train: list[str], n_top: int) -> set[str]:
    """Union over sections of the top ``n_top`` HVGs (seurat flavour on normalize_total + log1p counts)."""
    import scanpy as sc

    union: set[str] = set()
    for s in train:
        sub = ad.AnnData(X=adata.X[section_mask(adata, s)].astype(np.float32), var=pd.DataFrame(index=adata.var_names))
        sc.pp.filter_genes(sub, min_cells=1)  # genes never seen in this section cannot be variable in it
        sc.pp.normalize_total(sub)
        sc.pp.log1p(sub)
        sc.pp.highly_variable_genes(sub, flavor="seurat", n_top_genes=min(n_top, sub.n_vars))
        union.update(sub.var_names[sub.var["highly_variable"].to_numpy()])
    return union


def hmhvg_intersection(mean: np.ndarray, std: np.ndarray, n_genes: int) -> tuple[np.ndarray, int]:
    """Apply the HMHVG step: keep the genes in both the top-N by mean and the top-N by std, N chosen to give about ``n_genes``.

    The size of the intersection never decreases with N, so N is found by bisection as the smallest N giving at
    least ``n_genes`` (or the one closest to it).

    Parameters
    ----------
    mean, std
        Per-gene mean and standard deviation of the pooled raw counts.
    n_genes
        Target panel size.

    Returns
    -------
    Indices of the chosen genes (by decreasing mean) and the N used.

    Examples
    --------
    >>> import numpy as np
    >>> from stemst.pp._genes import hmhvg_intersection
    >>> mean = np.array([5.0, 4.0, 3.0, 2.0, 1.0])
    >>> std = np.array([1.0, 5.0, 4.0, 3.0, 2.0])
    >>> idx, n = hmhvg_intersection(mean, std, 2)
    >>> idx.tolist(), n
    ([1, 2], 3)
    """
    g = len(mean)
    by_mean = np.argsort(-mean, kind="stable")
    by_std = np.argsort(-std, kind="stable")
    rank_mean = np.empty(g, dtype=np.int64)
    rank_mean[by_mean] = np.arange(g)
    rank_std = np.empty(g, dtype=np.int64)
    rank_std[by_std] = np.arange(g)
    worst = np.maximum(rank_mean, rank_std)  # a gene is in the intersection at N iff worst < N

    def size(n: int) -> int:
        return int((worst < n).sum())

    lo, hi = 1, g
    while lo < hi:
        mid = (lo + hi) // 2
        if size(mid) >= n_genes:
            hi = mid
        else:
            lo = mid + 1
    n = lo
    if n > 1 and abs(size(n - 1) - n_genes) < abs(size(n) - n_genes):
        n -= 1
    chosen = np.flatnonzero(worst < n)
    return chosen[np.argsort(rank_mean[chosen])], n


def _is_panel_record(entry: Any) -> bool:
    """Whether ``uns[key_added]`` is what :func:`select_genes` stores there."""
    return isinstance(entry, dict) and {"genes", "train_sections", "method"} <= set(entry)


def _resolve_train(adata: ad.AnnData, train_sections: str | Sequence[str]) -> list[str]:
    known = _sections(adata)
    if isinstance(train_sections, str) and train_sections == "all":
        logger.warning(
            "select_genes: choosing the panel on all sections %s. Evaluating on any of them afterwards leaks test "
            "information into the panel; pass train_sections=[...] to choose on training sections only.",
            known,
        )
        return known
    train = [train_sections] if isinstance(train_sections, str) else [str(s) for s in train_sections]
    if not train:
        raise ValueError("train_sections is empty.")
    unknown = [s for s in train if s not in known]
    if unknown:
        raise StemstDataError(f"Unknown train_sections {unknown}; the table has {known}.")
    return train


def _unmeasured(adata: ad.AnnData, genes: Sequence[str], train: list[str]) -> dict[str, list[str]]:
    """Find the genes absent from the file of some training section.

    Such a gene is all-zero there while ``var['n_sections']`` says it was not measured in every section (the union
    table fills unmeasured genes with zeros).
    """
    n_all = len(_sections(adata))
    if N_SECTIONS_KEY not in adata.var or not genes:
        return {}
    cols = adata.var_names.get_indexer(genes)
    partial = adata.var[N_SECTIONS_KEY].to_numpy()[cols] < n_all
    if not partial.any():
        return {}
    out: dict[str, list[str]] = {}
    x = adata.X[:, cols[partial]]
    names = np.asarray(genes)[partial]
    for s in train:
        total = np.asarray(x[section_mask(adata, s)].sum(axis=0)).ravel()
        for g in names[total == 0]:
            out.setdefault(str(g), []).append(s)
    return out


def _warn_capped(n_genes: int, available: int, what: str, remedy: str) -> None:
    """Warn that a panel of ``n_genes`` cannot be had from ``available`` genes; the panel takes them all."""
    if n_genes > available:
        warn(
            f"select_genes: n_genes={n_genes} exceeds the {available} {what}; the panel has at most {available} "
            f"genes. Ask for fewer genes{' or ' + remedy if remedy else ''}.",
            stacklevel=4,
        )


def _given_panel(genes: Sequence[str], var_names: pd.Index, absent: dict[str, Any]) -> list[str]:
    """Check a given panel: every gene in the table and measured in every training section."""
    panel = [str(g) for g in genes]
    missing = [g for g in panel if g not in var_names]
    if missing:
        raise KeyError(f"{len(missing)} panel genes are not in the table, e.g. {missing[:10]}.")
    if absent:
        example = ", ".join(f"{g} (not in {v})" for g, v in list(absent.items())[:5])
        raise StemstDataError(
            f"{len(absent)} panel genes were not measured in some training sections: {example}. "
            "Drop them from the panel or from train_sections."
        )
    return panel


def _hmhvg_panel(
    adata: ad.AnnData,
    train: list[str],
    mask: np.ndarray,
    var_names: pd.Index,
    usable: np.ndarray,
    *,
    n_genes: int,
    n_top_hvg: int,
) -> tuple[list[str], dict[str, Any]]:
    """Return the Stem paper's panel (see :func:`select_genes`) and the parameters it records."""
    candidates = _top_hvg_per_section(adata, train, n_top_hvg)
    cols = np.flatnonzero(var_names.isin(list(candidates)) & usable)
    _warn_capped(
        n_genes,
        len(cols),
        f"candidate genes (the union of each training section's top n_top_hvg={n_top_hvg} highly variable genes, "
        "minus the excluded prefixes)",
        "raise n_top_hvg",
    )
    mean, std = _column_stats(adata.X[mask][:, cols])
    idx, n_used = hmhvg_intersection(mean, std, min(n_genes, len(cols)))
    about = {"method": "hmhvg", "n_top_hvg": int(n_top_hvg), "n_candidates": int(len(cols)), "top_n": int(n_used)}
    return var_names[cols[idx]].tolist(), about


def _hvg_panel(
    adata: ad.AnnData, train: list[str], mask: np.ndarray, var_names: pd.Index, usable: np.ndarray, *, n_genes: int
) -> list[str]:
    """Return the top ``n_genes`` highly variable genes of the pooled training spots (sections as batches)."""
    import scanpy as sc

    sub = ad.AnnData(
        X=adata.X[mask][:, usable].astype(np.float32),
        obs=pd.DataFrame({SECTION_KEY: adata.obs[SECTION_KEY].to_numpy()[mask].astype(str)}),
        var=pd.DataFrame(index=var_names[usable]),
    )
    sc.pp.filter_genes(sub, min_cells=1)
    _warn_capped(n_genes, sub.n_vars, "genes expressed in the training sections (minus the excluded prefixes)", "")
    sc.pp.normalize_total(sub)
    sc.pp.log1p(sub)
    batch = SECTION_KEY if len(train) > 1 else None
    sc.pp.highly_variable_genes(sub, flavor="seurat", n_top_genes=min(n_genes, sub.n_vars), batch_key=batch)
    hv = sub.var[sub.var["highly_variable"]]
    order = ["highly_variable_nbatches", "dispersions_norm"] if batch else ["dispersions_norm"]
    return hv.sort_values(order, ascending=False).index.tolist()


@doc_params(table_key=doc_table_key)
def select_genes(
    data: Any,
    *,
    train_sections: str | Sequence[str],
    method: Literal["hmhvg", "hvg"] = "hmhvg",
    n_genes: int = 200,
    genes: Sequence[str] | None = None,
    n_top_hvg: int = 2000,
    exclude: Sequence[str] = DEFAULT_EXCLUDE,
    table_key: str = TABLE_KEY,
    key_added: str = PANEL_KEY,
    inplace: bool = True,
) -> list[str] | None:
    """Choose the gene panel the model predicts, from training sections only.

    **Leakage.** The panel is part of the model: choosing it with the spots you later evaluate on selects genes that
    happen to vary (and so correlate) on the test section and inflates the metrics. Pass only training sections;
    ``train_sections="all"`` is allowed but logs a warning, and the sections used are stored in ``uns`` so that
    :func:`stemst.tl.evaluate` can warn when a test section was among them.

    Parameters
    ----------
    data
        A :class:`~spatialdata.SpatialData` or the :class:`~anndata.AnnData` counts table (raw counts in ``X``).
    train_sections
        Sections to choose on (required), or ``"all"``.
    method
        ``"hmhvg"`` (the Stem paper): the union of each training section's top ``n_top_hvg`` highly variable genes
        (scanpy ``flavor="seurat"`` after ``normalize_total`` + ``log1p``, per section), minus ``exclude``; then the
        genes both among the top-N by mean and the top-N by standard deviation of the pooled raw counts, N chosen so
        that about ``n_genes`` remain (exactly ``n_genes`` is not always reachable: ties enter together).
        ``"hvg"``: the top ``n_genes`` highly variable genes of the pooled training spots (scanpy
        ``flavor="seurat"`` on ``normalize_total`` + ``log1p`` values, ``batch_key`` = section so that genes
        variable in several sections rank first; ``seurat_v3`` would need the optional ``scikit-misc``), minus
        ``exclude``.
    n_genes
        Target panel size (>= 1); when fewer genes are eligible (the ``"hmhvg"`` candidates, the genes expressed),
        the panel takes them all, with a :class:`~stemst.StemstWarning`.
    genes
        Use this panel instead of choosing one (validated: every gene must be in the table and measured in every
        training section).
    n_top_hvg
        Highly variable genes per section for ``"hmhvg"``.
    exclude
        Case-insensitive gene-name prefixes never put in the panel (mitochondrial and ribosomal genes).
    {table_key}
    key_added
        ``var`` column flagging the panel and ``uns`` key of the parameters. An existing column or ``uns`` entry
        of that name is replaced only if it is an earlier panel (or the default ``"stemst_panel"``); a data model
        column (``n_sections``) or another column is refused before any work.
    inplace
        Write to the table; otherwise return the gene list.

    Returns
    -------
    With ``inplace=False`` the panel genes (ordered by decreasing mean count for ``"hmhvg"``, by HVG rank for
    ``"hvg"``). With ``inplace=True`` nothing; sets ``var[key_added]`` (bool) and ``uns[key_added]`` =
    ``{{"method", "train_sections", "n_genes", "genes", ...}}``.

    Raises
    ------
    StemstDataError
        If a panel gene was not measured in a training section, or if ``X`` of the training sections does not hold
        raw counts (NaN or infinite, negative or non-integer values: normalised or log-transformed data).

    Examples
    --------
    >>> import stemst
    >>> stemst.pp.select_genes(sdata, train_sections=["C2"], n_genes=100)  # sdata: HER2ST C2 and C6
    >>> int(sdata.tables["table"].var["stemst_panel"].sum())
    100
    """
    adata = get_table(data, table_key)
    if SECTION_KEY not in adata.obs:
        raise StemstDataError(f"The table has no obs[{SECTION_KEY!r}]; load data with stemst.datasets or stemst.io.")
    if inplace:  # before any work: a refusal leaves the table as it was
        owned = [key_added] if key_added == PANEL_KEY or _is_panel_record(adata.uns.get(key_added)) else []
        check_key_free(adata, "var", key_added, owned=owned)
        check_key_free(adata, "uns", key_added, owned=owned)
    train = _resolve_train(adata, train_sections)
    mask = section_mask(adata, train)
    if genes is None and (isinstance(n_genes, bool) or not isinstance(n_genes, int | np.integer) or n_genes < 1):
        raise ValueError(f"n_genes must be a whole number >= 1, got {n_genes!r}.")
    check_raw_counts(
        adata.X[mask], what=f"X of table {table_key!r}", sections_=adata.obs[SECTION_KEY].astype(str).to_numpy()[mask]
    )
    var_names = pd.Index(adata.var_names.astype(str))
    params: dict[str, Any] = {"train_sections": train, "exclude": list(exclude)}
    checked = var_names.tolist() if genes is None else [str(g) for g in genes if str(g) in var_names]
    absent = _unmeasured(adata, checked, train)
    usable = ~_excluded(var_names, exclude) & ~var_names.isin(list(absent))
    if genes is not None:
        panel = _given_panel(genes, var_names, absent)
        params["method"] = "given"
    elif method == "hmhvg":
        panel, about = _hmhvg_panel(adata, train, mask, var_names, usable, n_genes=n_genes, n_top_hvg=n_top_hvg)
        params.update(about)
    elif method == "hvg":
        panel = _hvg_panel(adata, train, mask, var_names, usable, n_genes=n_genes)
        params.update(method="hvg", flavor="seurat")
    else:
        raise ValueError(f"Unknown method {method!r}; choose 'hmhvg' or 'hvg'.")
    if genes is None and absent:
        logger.info("select_genes: %d genes not measured in every training section are not eligible.", len(absent))
    if not panel:
        raise StemstDataError("The gene panel came out empty; check the training sections and n_genes.")
    logger.info("Gene panel (%s): %d genes chosen on sections %s.", params["method"], len(panel), train)
    if not inplace:
        return panel
    adata.var[key_added] = var_names.isin(panel)
    adata.uns[key_added] = {**params, "n_genes": len(panel), "genes": panel}
    adata.uns.setdefault(UNS_KEY, {})["panel"] = {"key": key_added, "train_sections": train}
    return None
