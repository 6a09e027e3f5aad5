"""Evaluation metrics: small pure numpy functions on ``(n_spots, n_genes)`` arrays (as :mod:`scanpy.metrics`)."""

from ._metrics import (
    COVERAGE_LEVELS,
    PCC_KS,
    gene_metrics,
    interval_coverage,
    mae_per_gene,
    mean_pearson,
    mse_per_gene,
    pcc_at_k,
    pearson_per_gene,
    relative_variance_distance,
    spearman_per_gene,
    summary_metrics,
    variance_ratio,
)
from ._scores import (
    crps_per_gene,
    crps_per_spot,
    energy_score,
    neighbour_pairs,
    variogram_score,
)

__all__ = [
    "pearson_per_gene",
    "mean_pearson",
    "spearman_per_gene",
    "mse_per_gene",
    "mae_per_gene",
    "variance_ratio",
    "pcc_at_k",
    "relative_variance_distance",
    "interval_coverage",
    "gene_metrics",
    "summary_metrics",
    "crps_per_spot",
    "crps_per_gene",
    "energy_score",
    "variogram_score",
    "neighbour_pairs",
    "PCC_KS",
    "COVERAGE_LEVELS",
]
