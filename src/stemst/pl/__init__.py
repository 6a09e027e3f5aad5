"""Plotting: sections, expression, uncertainty and OOD maps, variation curves, correlations, training curves."""

from ._curves import gene_correlation, training_curve, variation_curves
from ._maps import expression_maps, uncertainty_map
from ._ood import ood_map
from ._sections import sections

__all__ = [
    "sections",
    "expression_maps",
    "uncertainty_map",
    "ood_map",
    "variation_curves",
    "gene_correlation",
    "training_curve",
]
