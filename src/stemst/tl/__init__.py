"""Tools: train the diffusion model, predict, evaluate, and baselines."""

from ._base import Predictor
from ._baselines import KNNBaseline, MLPBaseline, RidgeBaseline, fit_baseline
from ._evaluate import Evaluation, compare, evaluate, library_size_yardstick, normalized_expression
from ._fit import fit
from ._metrics import (
    interval_coverage,
    pcc_at_k,
    pearson_per_gene,
    relative_variance_distance,
    spearman_per_gene,
    summary_metrics,
    variance_ratio,
)
from ._model import StemstModel
from ._predict import predict, predict_image

__all__ = [
    "Predictor",
    "predict",
    "predict_image",
    "fit",
    "StemstModel",
    "evaluate",
    "compare",
    "Evaluation",
    "library_size_yardstick",
    "normalized_expression",
    "fit_baseline",
    "RidgeBaseline",
    "KNNBaseline",
    "MLPBaseline",
    "pearson_per_gene",
    "spearman_per_gene",
    "variance_ratio",
    "pcc_at_k",
    "relative_variance_distance",
    "interval_coverage",
    "summary_metrics",
]
