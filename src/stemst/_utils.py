"""Small shared utilities."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeAlias

import numpy as np
import pandas as pd

from stemst._errors import StemstError, StemstFileError

#: the random state every stemst function accepts: a seed, a numpy generator, or ``None`` (fresh entropy)
RNGLike: TypeAlias = int | np.random.Generator | None


def as_generator(rng: RNGLike) -> np.random.Generator:
    """Return ``rng`` as a :class:`numpy.random.Generator` (a generator is passed through, not copied).

    Examples
    --------
    >>> as_generator(0).integers(10) == as_generator(0).integers(10)
    np.True_
    """
    return rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)


def as_seed(rng: RNGLike) -> int:
    """Return an int seed for ``rng``: an int as it is, else one drawn from the generator (or fresh entropy).

    Examples
    --------
    >>> as_seed(3)
    3
    """
    return int(rng) if isinstance(rng, int | np.integer) else int(as_generator(rng).integers(2**62))


def markdown_table(df: pd.DataFrame, *, floatfmt: str = ".3f", index: bool = True) -> str:
    """Render ``df`` as a GitHub-flavoured markdown table (no extra dependency).

    Examples
    --------
    >>> print(markdown_table(pd.DataFrame({"r": [0.5]}, index=["ridge"])))
    |  | r |
    |---|---|
    | ridge | 0.500 |
    """

    def fmt(v: object) -> str:
        if isinstance(v, float | np.floating):
            return "nan" if np.isnan(v) else format(float(v), floatfmt)
        return str(v)

    cols = ([df.index.name or ""] if index else []) + [str(c) for c in df.columns]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for idx, row in df.iterrows():
        cells = ([str(idx)] if index else []) + [fmt(v) for v in row.tolist()]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


#: what to do about a file that exists but cannot be read
REREAD_HINT = (
    "It may be truncated (an interrupted copy or download) or not in the expected format: copy or export it again."
)


@contextmanager
def reading(path: str | os.PathLike, what: str, *, hint: str = REREAD_HINT) -> Iterator[None]:
    """Turn any error a dependency raises while reading ``path`` into a :class:`~stemst.StemstFileError` naming it.

    Errors stemst raises itself, and running out of memory, pass through unchanged.

    Parameters
    ----------
    path
        The file being read.
    what
        What the file should hold, e.g. ``"10x HDF5 counts matrix"``.
    hint
        What the user can do about it.

    Examples
    --------
    >>> import torch
    >>> with open("weights.pt", "wb") as f:
    ...     f.write(b"not a torch file")
    16
    >>> with reading("weights.pt", "model weights", hint="Save the model again."):
    ...     state = torch.load("weights.pt", weights_only=True)  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    stemst._errors.StemstFileError: weights.pt: cannot read this model weights (UnpicklingError: ...). Save the model again.
    """
    try:
        yield
    except (StemstError, MemoryError):
        raise
    except Exception as e:  # any dependency's failure on a bad file becomes one named error
        raise StemstFileError(path, f"cannot read this {what} ({type(e).__name__}: {e}). {hint}") from e


def read_json(path: str | os.PathLike, *, what: str) -> dict[str, Any]:
    """Read a JSON object from ``path``, raising a :class:`~stemst.StemstFileError` naming the file if it cannot.

    Examples
    --------
    >>> with open("scalefactors_json.json", "w") as f:
    ...     f.write('{"tissue_hires_scalef": 0.08}')
    29
    >>> read_json("scalefactors_json.json", what="scale factors")
    {'tissue_hires_scalef': 0.08}
    """
    with reading(path, what):
        obj = json.loads(Path(path).read_text(encoding="utf-8"))
    if not isinstance(obj, dict):
        raise StemstFileError(path, f"expected a JSON object ({{...}}) holding the {what}, got {type(obj).__name__}.")
    return obj
