"""Preprocessing: spot-centred H&E patch embeddings, the gene panel and the target transform."""

from ._context import spatial_context, spot_spacing
from ._embed import embed_patches
from ._encoders import Encoder, list_encoders, register_encoder
from ._genes import select_genes
from ._grid import grid_spots, tissue_mask
from ._transform import TRANSFORMS, inverse_transform, transform_counts

__all__ = [
    "embed_patches",
    "spatial_context",
    "spot_spacing",
    "select_genes",
    "grid_spots",
    "tissue_mask",
    "Encoder",
    "list_encoders",
    "register_encoder",
    "transform_counts",
    "inverse_transform",
    "TRANSFORMS",
]
