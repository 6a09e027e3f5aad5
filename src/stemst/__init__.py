"""stemst: spatial gene expression from H&E histology with a conditional diffusion model."""

from . import datasets, io, metrics, pl, pp, tl
from ._errors import StemstDownloadError, StemstError, StemstFileError, StemstWarning
from ._schema import StemstDataError
from ._version import __version__

__all__ = [
    "datasets",
    "io",
    "metrics",
    "pl",
    "pp",
    "tl",
    "StemstError",
    "StemstDataError",
    "StemstFileError",
    "StemstDownloadError",
    "StemstWarning",
]
