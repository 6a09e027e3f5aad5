"""What stemst raises and warns, so users can catch or filter it by kind.

- :class:`StemstError`: the base of every error stemst raises on its own.
- :class:`StemstDataError`: the input does not fit the data model or looks wrong (also a :class:`ValueError`).
- :class:`StemstFileError`: a file exists but cannot be read (truncated, corrupt, wrong format); ``.path`` names it.
- :class:`StemstDownloadError`: something needed from the network (a dataset file, hub weights) cannot be had.
- :class:`StemstWarning`: the input is usable but probably not what the user meant (wrong image, scale, resolution).

Errors and warnings say what to check or do; progress and routine notes go to the package logger instead.
"""

from __future__ import annotations

import os
import warnings


class StemstError(Exception):
    """Base class of the errors raised by stemst."""


class StemstDataError(StemstError, ValueError):
    """Raised when input data does not fit the stemst data model; the message says what to fix."""


class StemstFileError(StemstDataError):
    """Raised when a file cannot be read; ``path`` is the file, the message says what to do about it."""

    def __init__(self, path: str | os.PathLike, message: str):
        self.path = str(path)
        super().__init__(f"{self.path}: {message}")


class StemstDownloadError(StemstError, ConnectionError):
    """Raised when a dataset file or model weights cannot be downloaded; the message says how to supply them."""


class StemstWarning(UserWarning):
    """Warned when the input is usable but probably wrong (e.g. spots off the tissue, heavy upsampling)."""


def warn(message: str, *, stacklevel: int = 3) -> None:
    """Issue a :class:`StemstWarning` attributed to the caller's caller (the user's line, by default)."""
    warnings.warn(message, StemstWarning, stacklevel=stacklevel)
