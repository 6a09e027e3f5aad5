"""Tools: train the diffusion model, predict, evaluate, and baselines."""

from ._base import Predictor
from ._predict import predict

__all__ = ["Predictor", "predict"]
