"""Preprocessing: spot-centred H&E patch embeddings, the gene panel and the target transform."""

from ._transform import TRANSFORMS, inverse_transform, transform_counts

__all__ = ["transform_counts", "inverse_transform", "TRANSFORMS"]
