"""Small shared utilities."""

from __future__ import annotations

import numpy as np
import pandas as pd


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
