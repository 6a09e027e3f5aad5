"""Readers for your own data, each giving one section in the stemst data model (see :mod:`stemst._schema`).

- :func:`visium`: a 10x Space Ranger output folder.
- :func:`visium_hd`: a 10x Visium HD Space Ranger output folder, one bin size as the spots.
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
from ._visium_hd import visium_hd

__all__ = ["concatenate", "from_anndata", "hest", "read_zarr", "validate", "visium", "visium_hd", "write_zarr"]
