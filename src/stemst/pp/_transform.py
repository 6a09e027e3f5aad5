"""Target transforms: raw counts <-> the values the model learns, in one place.

Each transform is a pair of small pure functions (forward, inverse) registered under a name, so a fitted model can
store the name and map its predictions back to counts.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import scipy.sparse as sp

#: target sum of the counts-per-10k normalisation
CP10K = 1e4


@dataclass(frozen=True)
class TargetTransform:
    """A named count transform.

    Attributes
    ----------
    name
        Registry name (stored by models).
    forward
        ``(counts, library_size) -> values``; ``library_size`` is ``None`` or one value per row.
    inverse
        ``(values, library_size) -> counts`` (floats, not rounded).
    needs_library_size
        Whether the transform depends on each spot's total count.
    description
        One line for the docs and error messages.
    """

    name: str
    forward: Callable[[np.ndarray, np.ndarray | None], np.ndarray]
    inverse: Callable[[np.ndarray, np.ndarray | None], np.ndarray]
    needs_library_size: bool
    description: str


def _log2p1(counts: np.ndarray, library_size: np.ndarray | None = None) -> np.ndarray:
    return np.log2(counts + 1.0)


def _inv_log2p1(values: np.ndarray, library_size: np.ndarray | None = None) -> np.ndarray:
    return np.exp2(values) - 1.0


def _lib_column(library_size: np.ndarray | None, counts: np.ndarray) -> np.ndarray:
    if library_size is None:
        library_size = counts.sum(axis=-1)
    lib = np.asarray(library_size, dtype=np.float64)
    lib = lib.reshape(lib.shape + (1,)) if lib.ndim == counts.ndim - 1 else lib
    return np.where(lib > 0, lib, 1.0)


def _log1p_cp10k(counts: np.ndarray, library_size: np.ndarray | None = None) -> np.ndarray:
    return np.log1p(counts / _lib_column(library_size, counts) * CP10K)


def _inv_log1p_cp10k(values: np.ndarray, library_size: np.ndarray | None = None) -> np.ndarray:
    cp10k = np.expm1(values)
    if library_size is None:
        return cp10k
    return cp10k * _lib_column(library_size, values) / CP10K


TRANSFORMS: dict[str, TargetTransform] = {
    "log2p1": TargetTransform(
        "log2p1", _log2p1, _inv_log2p1, False, "log2(count + 1), no library-size normalisation (the Stem paper)"
    ),
    "log1p_cp10k": TargetTransform(
        "log1p_cp10k",
        _log1p_cp10k,
        _inv_log1p_cp10k,
        True,
        "natural log1p of counts per 10,000 (library size = the spot's total over the given genes unless passed)",
    ),
}


def get_transform(method: str) -> TargetTransform:
    """Look up a target transform by name.

    Parameters
    ----------
    method
        A key of :data:`TRANSFORMS`.

    Returns
    -------
    The :class:`TargetTransform`.
    """
    try:
        return TRANSFORMS[method]
    except KeyError:
        raise ValueError(f"Unknown target transform {method!r}; known: {sorted(TRANSFORMS)}.") from None


def _dense(x: Any) -> np.ndarray:
    if sp.issparse(x):
        x = x.toarray()
    elif hasattr(x, "detach"):  # torch tensor
        x = x.detach().cpu().numpy()
    return np.asarray(x, dtype=np.float64)


def transform_counts(
    counts: Any, *, method: str = "log2p1", library_size: np.ndarray | None = None, dtype: Any = np.float32
) -> np.ndarray:
    """Map raw counts to model targets.

    Parameters
    ----------
    counts
        Raw counts, ``(n_spots, n_genes)`` (dense, sparse or a torch tensor).
    method
        ``"log2p1"``: ``log2(count + 1)`` (the Stem paper; no normalisation, so spot depth stays in the target).
        ``"log1p_cp10k"``: ``log1p(count / library_size * 1e4)``.
    library_size
        Per-spot total counts for ``"log1p_cp10k"``; default: the row sums of ``counts``. Pass the total over *all*
        genes when ``counts`` holds only a panel. Ignored by ``"log2p1"``.
    dtype
        Output dtype.

    Returns
    -------
    Dense array of the same shape as ``counts``.

    Examples
    --------
    >>> import numpy as np
    >>> from stemst.pp import transform_counts, inverse_transform
    >>> y = transform_counts(np.array([[0, 1, 3]]), method="log2p1")
    >>> y.tolist()
    [[0.0, 1.0, 2.0]]
    >>> inverse_transform(y, method="log2p1").tolist()
    [[0.0, 1.0, 3.0]]
    """
    t = get_transform(method)
    x = _dense(counts)
    if np.any(x < 0):
        raise ValueError("transform_counts expects non-negative raw counts.")
    lib = None if library_size is None else _dense(library_size)
    return t.forward(x, lib).astype(dtype, copy=False)


def inverse_transform(
    values: Any, *, method: str = "log2p1", library_size: np.ndarray | None = None, dtype: Any = np.float32
) -> np.ndarray:
    """Map model targets back to counts (expected-count scale, not rounded).

    Parameters
    ----------
    values
        Transformed values, any shape whose last axis is genes.
    method
        Name used in :func:`transform_counts`.
    library_size
        For ``"log1p_cp10k"``: per-spot totals to scale back to counts; ``None`` returns counts per 10k.
    dtype
        Output dtype.

    Returns
    -------
    Dense array of the same shape as ``values``.

    Examples
    --------
    >>> import numpy as np
    >>> from stemst.pp import inverse_transform
    >>> inverse_transform(np.log1p(np.array([[1e4, 0.0]])), method="log1p_cp10k", library_size=np.array([20.0])).tolist()
    [[20.0, 0.0]]
    """
    t = get_transform(method)
    lib = None if library_size is None else _dense(library_size)
    return t.inverse(_dense(values), lib).astype(dtype, copy=False)
