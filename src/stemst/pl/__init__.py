"""Plotting: sections, measured vs predicted maps, variation curves, correlations, uncertainty, shift (OOD) maps, training curves."""

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
