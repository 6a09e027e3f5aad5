"""Parameter descriptions shared across the public API, written once (scanpy's ``_doc_params`` pattern).

A docstring names a shared block by a placeholder on a line of its own, e.g. ``{table_key}`` in the Parameters
section, and the function is decorated with ``@doc_params(table_key=doc_table_key)``. The decorator dedents the
docstring and formats the placeholders in with :meth:`str.format`, so literal braces elsewhere in a decorated
docstring are written doubled (``{{`` and ``}}``). Each block is a complete numpydoc entry (name line, then the
description indented by four spaces), written without the docstring's own indentation.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def doc_params(**blocks: str) -> Callable[[T], T]:
    """Format ``{name}`` placeholders in the decorated object's docstring with the shared ``blocks``.

    Examples
    --------
    >>> @doc_params(progress=doc_progress)
    ... def f(*, progress=True):
    ...     '''Do something.
    ...
    ...     Parameters
    ...     ----------
    ...     {progress}
    ...     '''
    >>> f.__doc__.splitlines()[-2:]
    ['progress', '    Show a progress bar.']
    """

    def decorate(obj: T) -> T:
        if obj.__doc__:  # None under python -OO
            obj.__doc__ = inspect.cleandoc(obj.__doc__).format_map(blocks)
        return obj

    return decorate


# ---------------------------------------------------------------------------------------------------------------
# data and keys

doc_table_key = """\
table_key
    Key of the counts table in ``sdata.tables`` (the spots, their counts and embeddings); ignored when the input
    is an :class:`~anndata.AnnData`."""

doc_sections = """\
sections
    Use only the spots of these sections (a name or a list of names; all sections if ``None``)."""

doc_embedding_key = """\
embedding_key
    ``obsm`` key of the per-spot embeddings: ``"X_<encoder>"`` from :func:`stemst.pp.embed_patches`, or
    ``"X_<encoder>_context"`` from :func:`stemst.pp.spatial_context`."""

doc_layer = """\
layer
    Layer of the counts table holding the raw counts (``X`` if ``None``)."""

doc_transform = """\
transform
    Target transform of the counts (see :func:`stemst.pp.transform_counts`), e.g. ``"log2p1"`` for log2(count + 1)."""

doc_pred_key = """\
pred_key
    Key of a prediction table in ``sdata.tables`` (made by :func:`stemst.tl.predict`)."""

doc_genes_subset = """\
genes
    Use only these genes (default: the whole predicted panel)."""

doc_overwrite = """\
overwrite
    Replace an existing table of that name (never the counts table); by default an existing name is refused before
    anything is computed."""

# ---------------------------------------------------------------------------------------------------------------
# running

doc_rng = """\
rng
    Random state: a seed, a :class:`numpy.random.Generator`, or ``None`` for fresh entropy. The same seed gives the
    same result."""

doc_progress = """\
progress
    Show a progress bar."""

# ---------------------------------------------------------------------------------------------------------------
# plotting

doc_ax = """\
ax
    Axes to draw on (default: a new figure)."""

doc_panel_size = """\
panel_size
    Size of one panel in inches (ignored if ``figsize`` is given).
figsize
    Figure size in inches."""

doc_show_save = """\
show
    Show the figure (default: unless ``save`` is given).
save
    Save the figure to this path (any format matplotlib writes, chosen by the extension)."""
