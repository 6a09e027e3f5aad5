"""Readers for your own data, each giving one section in the stemst data model (see :mod:`stemst._schema`).

- :func:`visium`: a 10x Space Ranger output folder.
- :func:`hest`: a HEST-1k sample (``wsis/``, ``st/``, ``metadata/``).
- :func:`from_anndata`: a scanpy-style AnnData with ``uns["spatial"]``.
- :func:`concatenate`: several objects into one.
- :func:`validate`, :func:`read_zarr`, :func:`write_zarr`: check and store objects in the data model.
"""

from ._anndata import from_anndata
from ._concat import concatenate
from ._hest import hest
from ._validate import read_zarr, validate, write_zarr
from ._visium import visium

__all__ = ["concatenate", "from_anndata", "hest", "read_zarr", "validate", "visium", "write_zarr"]
