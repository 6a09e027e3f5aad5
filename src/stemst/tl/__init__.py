"""Tools: train the diffusion model, predict, evaluate, and baselines (metrics: :mod:`stemst.metrics`)."""

from ._adapt import adapt, adaptation_curve
from ._base import Predictor
from ._baselines import KNNBaseline, MLPBaseline, RidgeBaseline, fit_baseline
from ._evaluate import Evaluation, compare, evaluate, library_size_yardstick, normalized_expression
from ._fit import fit
from ._model import StemstModel
from ._noise import NoisyBaseline
from ._predict import predict, predict_image
from ._smooth import smooth
from ._structure import structure_metrics

__all__ = [
    "Predictor",
    "predict",
    "predict_image",
    "adapt",
    "adaptation_curve",
    "smooth",
    "fit",
    "StemstModel",
    "evaluate",
    "compare",
    "structure_metrics",
    "Evaluation",
    "library_size_yardstick",
    "normalized_expression",
    "fit_baseline",
    "RidgeBaseline",
    "KNNBaseline",
    "MLPBaseline",
    "NoisyBaseline",
]
