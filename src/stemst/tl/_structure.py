"""Downstream fidelity: whether a prediction table gives the same biology as the measured one in scanpy/squidpy.

One pipeline for every method, as a user would run it on the prediction table: counts -> library normalisation ->
log1p -> PCA -> k-means domains; Moran's I of each gene over the ring-1 spot graph (squidpy); the gene-gene
correlation matrix. Each is compared with the same pipeline on the measured counts of the same spots and genes.
"""

from __future__ import annotations

import warnings
from typing import Any

import anndata as ad
import numpy as np
import scipy.sparse as sp

from stemst._schema import PREDICTION_KEY, SPATIAL_KEY, TABLE_KEY, StemstDataError, get_table
from stemst.tl._data import get_counts
from stemst.tl._evaluate import spot_pairs
from stemst.tl._predict import COUNTS_LAYER, SAMPLES_KEY

#: what :func:`structure_metrics` reports (``gene_corr_distance`` lower is better, the others higher)
STRUCTURE_KEYS = ("domain_ari", "moran_spearman", "svg_overlap", "gene_corr_distance")


def _normalised(counts: np.ndarray) -> ad.AnnData:
    import scanpy as sc

    adata = ad.AnnData(np.clip(np.asarray(counts, np.float64), 0.0, None))
    sc.pp.normalize_total(adata, target_sum=1e4)
    sc.pp.log1p(adata)
    return adata


def _domains(adata: ad.AnnData, n_domains: int, seed: int) -> np.ndarray:
    from sklearn.cluster import KMeans
    from sklearn.decomposition import PCA

    n_comps = max(1, min(15, adata.n_vars - 1, adata.n_obs - 1))
    pcs = PCA(n_components=n_comps, random_state=seed).fit_transform(np.asarray(adata.X))
    return KMeans(n_clusters=n_domains, n_init=10, random_state=seed).fit_predict(pcs)


def _morans_i(adata: ad.AnnData, graph: sp.csr_matrix) -> np.ndarray:
    with warnings.catch_warnings():  # squidpy's docstring tooling (docrep) warns about its own docstrings on import
        warnings.filterwarnings("ignore", category=SyntaxWarning, module="docrep")
        import squidpy as sq

    adata.obsp["spatial_connectivities"] = graph
    with warnings.catch_warnings():  # constant genes have no Moran's I (NaN)
        warnings.simplefilter("ignore", RuntimeWarning)
        df = sq.gr.spatial_autocorr(
            adata, mode="moran", connectivity_key="spatial_connectivities", n_perms=None, copy=True, n_jobs=1
        )
    return df["I"].reindex(adata.var_names).to_numpy(np.float64)


def _gene_corr(x: np.ndarray) -> np.ndarray:
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.corrcoef(x.T)


def structure_metrics(
    sdata: Any,
    *,
    pred_key: str,
    table_key: str = TABLE_KEY,
    sample: int | None = None,
    n_domains: int = 5,
    n_svg: int = 20,
    seed: int = 0,
) -> dict[str, float]:
    """Compare the downstream biology of a prediction table with that of the measured counts of the same spots.

    Both sides go through the same pipeline: counts over the panel -> :func:`scanpy.pp.normalize_total` (1e4) ->
    :func:`scanpy.pp.log1p`; then

    - ``domain_ari``: adjusted Rand index between k-means domains (``n_domains`` clusters on the top principal
      components) of the prediction and of the measurement;
    - ``moran_spearman``: Spearman correlation over genes between the predicted and the measured Moran's I
      (:func:`squidpy.gr.spatial_autocorr` on the ring-1 spot graph, :func:`stemst.metrics.neighbour_pairs`);
    - ``svg_overlap``: the share of the measured top-``n_svg`` spatially variable genes (highest Moran's I) that are
      also among the predicted top ``n_svg``;
    - ``gene_corr_distance``: root mean square difference between the predicted and the measured gene-gene
      Pearson correlation matrices (off-diagonal entries, genes constant on either side left out; lower is better).

    Parameters
    ----------
    sdata
        SpatialData holding the prediction table and the measured counts table.
    pred_key
        The prediction table (from :func:`stemst.tl.predict`).
    table_key
        The measured counts table.
    sample
        ``None``: the predicted expected counts (``layers['counts']``); an integer ``i``: sample ``i`` of
        ``obsm['samples']`` back-transformed to counts (one draw, with the spread and structure of the samples).
    n_domains
        Clusters of the domain comparison.
    n_svg
        Size of the top spatially variable gene sets.
    seed
        Seeds PCA and k-means.

    Returns
    -------
    A dict with the keys of :data:`STRUCTURE_KEYS`.

    Examples
    --------
    >>> key = stemst.tl.predict(model, sdata, sections="C6")  # doctest: +SKIP
    >>> stemst.tl.structure_metrics(sdata, pred_key=key)["domain_ari"]  # doctest: +SKIP
    """
    from scipy.stats import spearmanr
    from sklearn.metrics import adjusted_rand_score

    from stemst.pp import inverse_transform

    pred = get_table(sdata, pred_key)
    measured = get_table(sdata, table_key)[pred.obs_names]
    genes = pred.var_names.tolist()
    if sample is None:
        counts = np.asarray(pred.layers[COUNTS_LAYER], np.float64)
    else:
        if SAMPLES_KEY not in pred.obsm or not 0 <= sample < pred.obsm[SAMPLES_KEY].shape[1]:
            raise StemstDataError(f"Prediction {pred_key!r} has no sample {sample} in obsm[{SAMPLES_KEY!r}].")
        transform = pred.uns.get(PREDICTION_KEY, {}).get("transform", "log2p1")
        counts = inverse_transform(np.asarray(pred.obsm[SAMPLES_KEY][:, sample], np.float64), method=transform)
    pairs = spot_pairs(pred)
    if pairs is None:
        raise StemstDataError(f"Prediction {pred_key!r} has no obsm[{SPATIAL_KEY!r}] (spot centres).")
    p, t = _normalised(counts), _normalised(get_counts(measured, genes))
    ari = adjusted_rand_score(_domains(t, n_domains, seed), _domains(p, n_domains, seed))

    n = pred.n_obs
    graph = sp.coo_matrix((np.ones(2 * len(pairs)), (pairs.ravel(), pairs[:, ::-1].ravel())), shape=(n, n)).tocsr()
    mi_p, mi_t = _morans_i(p, graph), _morans_i(t, graph)
    ok = np.isfinite(mi_p) & np.isfinite(mi_t)
    rho = float(spearmanr(mi_p[ok], mi_t[ok]).statistic) if ok.sum() > 2 else float("nan")
    k = min(n_svg, int(ok.sum()))
    top = lambda mi: set(np.flatnonzero(ok)[np.argsort(-mi[ok])[:k]])  # noqa: E731
    overlap = len(top(mi_p) & top(mi_t)) / k if k else float("nan")

    cp, ct = _gene_corr(np.asarray(p.X)), _gene_corr(np.asarray(t.X))
    off = ~np.eye(len(genes), dtype=bool) & np.isfinite(cp) & np.isfinite(ct)
    dist = float(np.sqrt(np.mean((cp[off] - ct[off]) ** 2))) if off.any() else float("nan")
    return {"domain_ari": float(ari), "moran_spearman": rho, "svg_overlap": float(overlap), "gene_corr_distance": dist}
