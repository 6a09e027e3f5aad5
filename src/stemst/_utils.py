"""Small shared utilities."""

from __future__ import annotations

from typing import TypeAlias

import numpy as np
import pandas as pd

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
