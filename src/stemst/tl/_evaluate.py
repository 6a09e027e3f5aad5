"""Compare a prediction table with the measured counts: per-gene and summary metrics, a library-size yardstick."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import anndata as ad
import numpy as np
import pandas as pd

from stemst._docs import (
    doc_genes_subset,
    doc_layer,
    doc_overwrite,
    doc_params,
    doc_pred_key,
    doc_sections,
    doc_table_key,
    doc_transform,
)
from stemst._logging import logger
from stemst._schema import (
    MEASURED_KEY,
    PREDICTION_KEY,
    SECTION_KEY,
    SPATIAL_KEY,
    TABLE_KEY,
    StemstDataError,
    check_table_key_free,
    get_table,
    section_mask,
    spot_sections,
)
from stemst._utils import RNGLike
from stemst.metrics import COVERAGE_LEVELS, PCC_KS, crps_per_gene, gene_metrics, neighbour_pairs, summary_metrics
from stemst.tl._base import Predictor
from stemst.tl._data import get_counts, get_targets, library_size, resolve_genes

#: ``uns`` key of the evaluation results in the prediction table (default ``key_added``)
EVALUATION_KEY = "stemst_evaluation"
#: suffix of the metrics computed on library-normalised values
NORM_SUFFIX = "_norm"
#: target sum of the library normalisation used by :func:`normalized_expression`
NORM_TARGET = 1e4
#: ``obsm`` key of the yardstick's only input, ``log1p`` of the spot's total count
LOG_TOTAL_KEY = "X_log1p_total"


@dataclass
class Evaluation:
    """Result of :func:`stemst.tl.evaluate`.

    Attributes
    ----------
    per_gene
        One row per gene: ``pearson``, ``spearman``, ``mse``, ``mae``, ``var_ratio``, ``mean_pred``, ``mean_true``,
        ``var_pred``, ``var_true`` and, when the table has samples, ``crps``, ``variogram`` (neighbouring spots, when
        the table has spot centres), ``coverage_50`` / ``coverage_90`` on the model's scale and ``crps_counts`` on
        the count scale, and the same with the suffix ``_norm`` on library-normalised values (see
        :func:`normalized_expression`; no coverage there).
    summary
        Flat dict: the keys of :func:`stemst.metrics.summary_metrics` on the model's scale (with samples: the proper
        scores ``crps``, ``energy_score`` and ``variogram_score``), ``crps_counts``, the same with the suffix
        ``_norm``, and ``method``, ``transform``, ``pred_key``.
    """

    per_gene: pd.DataFrame
    summary: dict[str, Any] = field(default_factory=dict)

    def __repr__(self) -> str:
        keys = ("mean_pearson", "pcc_10", "pcc_50", "mse", "rvd", "mean_pearson_norm")
        shown = ", ".join(f"{k}={self.summary[k]:.3f}" for k in keys if k in self.summary)
        return f"Evaluation({self.summary.get('method', '?')}, {len(self.per_gene)} genes, {shown})"


def normalized_expression(counts: np.ndarray) -> np.ndarray:
    """Library-normalised values ``log1p(1e4 * c / total)``, ``total`` being each spot's sum over the given genes.

    Used to compare predicted and measured expression without spot depth: both the measured counts and the
    predicted counts (``layers['counts']`` of a prediction table) are normalised by their own total over
    the *same* gene panel, so a prediction that gets the composition of a spot right scores well even when it
    misses the depth. (The total over all genes is not available for a prediction, hence the panel total; spots
    with a zero total get zeros, and negative expected counts, which a regression can produce, count as zero.)

    Examples
    --------
    >>> normalized_expression(np.array([[1.0, 3.0], [0.0, 0.0]])).round(3).tolist()
    [[7.824, 8.923], [0.0, 0.0]]
    """
    c = np.clip(np.asarray(counts, dtype=np.float64), 0.0, None)
    total = c.sum(1, keepdims=True)
    return np.log1p(NORM_TARGET * c / np.where(total > 0, total, 1.0))


def _prediction_params(pred: ad.AnnData, pred_key: str) -> dict[str, Any]:
    params = pred.uns.get(PREDICTION_KEY)
    if params is None:
        raise StemstDataError(
            f"Table {pred_key!r} has no uns[{PREDICTION_KEY!r}]; is it a prediction table made by stemst.tl.predict?"
        )
    return dict(params)


def _aligned_measurement(pred: ad.AnnData, measured: ad.AnnData, pred_key: str, table_key: str) -> ad.AnnData:
    missing = pred.obs_names.difference(measured.obs_names)
    if len(missing):
        raise StemstDataError(
            f"{len(missing)} spots of prediction {pred_key!r} are not in table {table_key!r}, e.g. "
            f"{missing[:5].tolist()}; evaluate against the table the embeddings came from."
        )
    return measured[pred.obs_names]


def spot_pairs(pred: ad.AnnData) -> np.ndarray | None:
    """Ring-1 neighbouring spot pairs of a prediction table (``None`` without spot centres)."""
    if SPATIAL_KEY not in pred.obsm:
        return None
    return neighbour_pairs(np.asarray(pred.obsm[SPATIAL_KEY])[:, :2], spot_sections(pred))


@doc_params(
    pred_key=doc_pred_key,
    table_key=doc_table_key,
    layer=doc_layer,
    genes=doc_genes_subset,
    sections=doc_sections,
)
def evaluate(
    sdata: Any,
    *,
    pred_key: str = PREDICTION_KEY,
    table_key: str = TABLE_KEY,
    layer: str | None = None,
    genes: Iterable[str] | None = None,
    sections: str | Iterable[str] | None = None,
    normalized: bool = True,
    ks: Sequence[int] = PCC_KS,
    levels: Sequence[float] = COVERAGE_LEVELS,
    key_added: str | None = EVALUATION_KEY,
) -> Evaluation:
    """Compare predicted with measured expression, gene by gene and overall.

    The prediction table's spots are matched to the counts table by ``obs_names`` (those an adapted model was
    adapted on, ``obs['adapt_measured']``, are left out: see :func:`stemst.tl.adapt`); the measured targets are the
    counts transformed with the model's own transform (``uns['stemst_prediction']['transform']``, e.g.
    log2(count + 1)), so predicted ``X`` and measured values are on the same scale.

    Parameters
    ----------
    sdata
        :class:`~spatialdata.SpatialData` holding both tables.
    {pred_key}
        Also a yardstick from :func:`stemst.tl.library_size_yardstick`.
    {table_key}
        The measured counts are read from it.
    {layer}
    {genes}
    {sections}
    normalized
        Also compute every metric on library-normalised values (:func:`normalized_expression`), which removes spot
        depth from both sides.
    ks
        PCC-k values (``NaN`` when fewer genes have a defined correlation, see :func:`stemst.metrics.pcc_at_k`).
    levels
        Central sample-interval levels for the calibration (needs ``obsm['samples']`` with >= 2 samples).
    key_added
        Store the results in the prediction table: the summary in ``uns[key_added]`` and the per-gene metrics as
        ``var`` columns. ``None`` stores nothing.

    Returns
    -------
    An :class:`Evaluation` with ``.per_gene`` (DataFrame) and ``.summary`` (dict). With ``key_added``, also sets
    in ``sdata.tables[pred_key]``:

    - ``uns[key_added]``: ``{{"summary": ..., "params": ...}}``;
    - ``var[col]`` for each column ``col`` of ``.per_gene``.

    Examples
    --------
    >>> key = stemst.tl.predict(model, sdata, sections="C6", progress=False)
    >>> res = stemst.tl.evaluate(sdata, pred_key=key)
    >>> res.per_gene.shape[0], -1 <= res.summary["mean_pearson"] <= 1
    (20, True)
    """
    pred = get_table(sdata, pred_key)
    params = _prediction_params(pred, pred_key)
    transform = params.get("transform", "log2p1")
    pred = _scored_spots(pred, pred_key, sections)
    panel = pred.var_names.tolist() if genes is None else resolve_genes(pred, list(genes))
    measured = _aligned_measurement(pred, get_table(sdata, table_key), pred_key, table_key)
    resolve_genes(measured, panel)
    logger.info("Evaluating %s: %d spots x %d genes (transform %s)", pred_key, pred.n_obs, len(panel), transform)

    sub = pred[:, panel]
    y_pred = np.asarray(sub.X, dtype=np.float64)
    y_true = get_targets(measured, panel, transform, layer=layer).astype(np.float64)
    samples = (
        np.asarray(sub.obsm["samples"])[:, :, pred.var_names.get_indexer(panel)] if "samples" in sub.obsm else None
    )
    pairs = spot_pairs(sub) if samples is not None else None
    per_gene = pd.DataFrame(
        gene_metrics(y_pred, y_true, samples=samples, levels=levels, pairs=pairs), index=pd.Index(panel)
    )
    summary: dict[str, Any] = summary_metrics(y_pred, y_true, samples=samples, ks=ks, levels=levels, pairs=pairs)
    if samples is not None:  # the CRPS of the expected counts' scale: how far off the predicted counts are
        from stemst.pp import inverse_transform

        per_gene["crps_counts"] = crps_per_gene(
            inverse_transform(samples, method=transform), get_counts(measured, panel, layer=layer)
        )
        summary["crps_counts"] = float(per_gene["crps_counts"].mean())
    if normalized:
        if "counts" not in sub.layers:
            raise StemstDataError(
                f"Prediction {pred_key!r} has no layers['counts'] (expected counts); pass normalized=False."
            )
        n_pred = normalized_expression(np.asarray(sub.layers["counts"], dtype=np.float64))
        n_true = normalized_expression(get_counts(measured, panel, layer=layer))
        for k, v in gene_metrics(n_pred, n_true).items():
            per_gene[k + NORM_SUFFIX] = v
        norm = summary_metrics(n_pred, n_true, ks=ks)
        summary.update({k + NORM_SUFFIX: v for k, v in norm.items() if k not in ("n_spots", "n_genes")})
    summary.update(method=str(params.get("method", pred_key)), transform=transform, pred_key=pred_key)

    if key_added is not None:
        run = {"table_key": table_key, "layer": layer, "normalized": normalized, "n_genes": len(panel)}
        if sections is not None:
            run["sections"] = [sections] if isinstance(sections, str) else list(sections)
        _store_evaluation(get_table(sdata, pred_key), key_added, per_gene, summary, run)
    return Evaluation(per_gene=per_gene, summary=summary)


def _scored_spots(pred: ad.AnnData, pred_key: str, sections: str | Iterable[str] | None) -> ad.AnnData:
    """Return the prediction's spots to score: those of ``sections``, less those an adapted model was adapted on."""
    if sections is not None:
        mask = section_mask(pred, sections)
        if not mask.any():
            raise StemstDataError(f"Prediction {pred_key!r} has no spots in sections {sections!r}.")
        pred = pred[mask]
    if MEASURED_KEY in pred.obs and pred.obs[MEASURED_KEY].to_numpy(bool).any():  # what stemst.tl.adapt measured
        logger.info("Skipping the %d spots the model was adapted on", int(pred.obs[MEASURED_KEY].sum()))
        pred = pred[~pred.obs[MEASURED_KEY].to_numpy(bool)]
    return pred


def _store_evaluation(
    table: ad.AnnData, key: str, per_gene: pd.DataFrame, summary: dict[str, Any], run: dict[str, Any]
) -> None:
    """Write the per-gene metrics as ``var`` columns and the summary with its settings in ``uns[key]``."""
    for col in per_gene.columns:
        table.var[col] = per_gene[col].reindex(table.var_names).to_numpy()
    table.uns[key] = {
        "summary": {k: v for k, v in summary.items() if v is not None},
        "params": {k: v for k, v in run.items() if v is not None},
    }


@doc_params(table_key=doc_table_key)
def compare(
    sdata: Any,
    pred_keys: Sequence[str],
    *,
    table_key: str = TABLE_KEY,
    names: Sequence[str] | None = None,
    **kwargs: Any,
) -> pd.DataFrame:
    """Evaluate several prediction tables side by side.

    Parameters
    ----------
    sdata
        :class:`~spatialdata.SpatialData` holding the tables.
    pred_keys
        Prediction tables to compare.
    {table_key}
    names
        Row labels (default: the prediction keys).
    **kwargs
        Passed to :func:`evaluate` (e.g. ``genes=``, ``sections=``, ``key_added=None``).

    Returns
    -------
    One row per prediction, one column per summary metric (raw and ``_norm``), ``method`` and ``transform``.

    Examples
    --------
    >>> ridge = stemst.tl.fit_baseline(sdata, method="ridge", embedding_key="X_color_stats", sections="C2", alpha="hest")
    >>> keys = [stemst.tl.predict(m, sdata, sections="C6", progress=False) for m in (model, ridge)]
    >>> keys.append(stemst.tl.library_size_yardstick(sdata, train_sections="C2", test_sections="C6"))
    >>> stemst.tl.compare(sdata, keys).index.tolist()
    ['stemst_prediction', 'ridge_prediction', 'library_size_prediction']
    """
    names = list(pred_keys) if names is None else list(names)
    if len(names) != len(pred_keys):
        raise ValueError(f"{len(names)} names for {len(pred_keys)} prediction tables.")
    rows = [evaluate(sdata, pred_key=k, table_key=table_key, **kwargs).summary for k in pred_keys]
    df = pd.DataFrame(rows, index=pd.Index(names, name="prediction"))
    first = ["method", "transform", "pred_key"]
    return df[first + [c for c in df.columns if c not in first]]


class LibrarySizeYardstick(Predictor):
    """Each gene predicted from the spot's own depth: ``a_g + b_g * log1p(total count)``, fitted by least squares.

    Its input is ``log1p`` of the *test* spot's measured total count, so it uses test information: a yardstick of
    how much per-gene correlation spot depth alone explains, not a method.
    """

    method = "library_size"

    def __init__(self, *, genes: list[str], transform: str, coef: np.ndarray) -> None:
        super().__init__(genes=genes, embedding_key=LOG_TOTAL_KEY, transform=transform)
        self.coef = np.asarray(coef, dtype=np.float64)  #: (2, n_genes): intercept and slope

    def sample(
        self, X: np.ndarray, *, n_samples: int = 1, rng: RNGLike = None, progress: bool = True, **kwargs: Any
    ) -> np.ndarray:
        """Return the fitted line at each spot's log total, repeated ``n_samples`` times."""
        y = self.coef[0] + np.asarray(X, dtype=np.float64)[:, :1] * self.coef[1]
        return np.broadcast_to(y.astype(np.float32), (n_samples, *y.shape)).copy()


def _log_total(adata: ad.AnnData, layer: str | None) -> np.ndarray:
    return np.log1p(library_size(adata, layer=layer))[:, None].astype(np.float32)


@doc_params(transform=doc_transform, table_key=doc_table_key, layer=doc_layer, overwrite=doc_overwrite)
def library_size_yardstick(
    sdata: Any,
    *,
    train_sections: str | Iterable[str],
    test_sections: str | Iterable[str] | None = None,
    genes: str | Iterable[str] | None = None,
    transform: str = "log2p1",
    table_key: str = TABLE_KEY,
    layer: str | None = None,
    key_added: str = "library_size_prediction",
    overwrite: bool = False,
) -> str:
    """Predict each gene from the test spot's own total count (a yardstick, not a method).

    Fits ``y_g = a_g + b_g * log1p(total)`` per gene on the training spots (``y`` the transformed counts, ``total``
    the spot's count over all genes), then applies it to each test spot's *measured* total. Because it reads the
    test spots' depth, it shows how much of a method's per-gene correlation spot depth alone explains; on HER2ST
    (log2(count + 1)) it reaches a mean Pearson of about 0.64, above every image baseline.

    Parameters
    ----------
    sdata
        :class:`~spatialdata.SpatialData` with the counts table.
    train_sections
        Sections to fit the lines on.
    test_sections
        Sections to predict (default: all sections not in ``train_sections``).
    genes
        Gene panel (see :func:`stemst.tl._data.resolve_genes`; default ``var['stemst_panel']``).
    {transform}
        Use the one of the model being compared.
    {table_key}
    {layer}
    key_added
        Name of the prediction table; never ``table_key``.
    {overwrite}

    Returns
    -------
    ``key_added``; ``sdata.tables[key_added]`` is a prediction table in the format of :func:`stemst.tl.predict`
    with ``uns['stemst_prediction']['method'] == 'library_size'``.

    Examples
    --------
    >>> key = stemst.tl.library_size_yardstick(sdata, train_sections="C2", test_sections="C6")
    >>> stemst.tl.evaluate(sdata, pred_key=key).summary["mean_pearson"] > 0.3  # the measured depth tells much
    True
    """
    from stemst.tl._predict import predict

    check_table_key_free(sdata, key_added, overwrite=overwrite, counts_key=table_key)
    table = get_table(sdata, table_key)
    panel = resolve_genes(table, genes)
    train = table[section_mask(table, train_sections)]
    if train.n_obs < 2:
        raise StemstDataError(f"Need at least 2 training spots in sections {train_sections!r}.")
    if test_sections is None:
        test_sections = [s for s in table.obs[SECTION_KEY].cat.categories if s not in set(train.obs[SECTION_KEY])]
        if not test_sections:
            raise StemstDataError("No test sections: every section is a training section; pass test_sections=.")
    x = _log_total(train, layer)[:, 0].astype(np.float64)
    y = get_targets(train, panel, transform, layer=layer).astype(np.float64)
    design = np.column_stack([np.ones_like(x), x])
    coef, *_ = np.linalg.lstsq(design, y, rcond=None)
    model = LibrarySizeYardstick(genes=panel, transform=transform, coef=coef)

    test = table[section_mask(table, test_sections)]
    # a light copy of the test spots whose only "embedding" is their log total count
    src = ad.AnnData(obs=test.obs.copy(), obsm={**test.obsm, LOG_TOTAL_KEY: _log_total(test, layer)})
    src.uns.update({k: v for k, v in test.uns.items() if k == "stemst"})
    out = predict(model, src, n_samples=1, keep_samples=False, progress=False)
    return _store_prediction(sdata, out, key_added)


def _store_prediction(sdata: Any, out: ad.AnnData, key: str) -> str:
    """Link a prediction table made from an AnnData to the spots' circles and store it in ``sdata.tables[key]``."""
    from spatialdata.models import TableModel

    from stemst._schema import INSTANCE_KEY, REGION_KEY

    out.obs[REGION_KEY] = pd.Categorical(out.obs[REGION_KEY].astype(str))
    out = TableModel.parse(
        out, region=list(out.obs[REGION_KEY].cat.categories), region_key=REGION_KEY, instance_key=INSTANCE_KEY
    )
    sdata.tables[key] = out
    logger.info("Stored predictions in sdata.tables[%r]", key)
    return key
