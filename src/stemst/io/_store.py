"""Zarr stores on disk: tables replaced by write-new-then-swap, leftovers of interrupted writes, missing chunks."""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any

from stemst._atomic import TAG, Swap, recover, replacing
from stemst._errors import StemstFileError

#: element types whose folders a stemst swap replaces inside a store
TABLES = "tables"


def table_swap(store: str | os.PathLike, key: str) -> Swap:
    """Return the folders used to replace table ``key`` of ``store``: beside the store, never inside it.

    Examples
    --------
    >>> table_swap("data/her2st.zarr", "table").old
    PosixPath('data/.her2st.zarr.stemst-tables.table-old')
    """
    store = Path(store)
    return Swap.of(store / TABLES / key, anchor=store, label=f"{TABLES}.{key}")


def consolidate(store: str | os.PathLike) -> None:
    """Write the store's consolidated metadata again, from the folders as they are now."""
    import zarr

    group = zarr.open_group(Path(store), mode="r+", use_consolidated=False)
    with warnings.catch_warnings():  # parquet shapes are not zarr arrays: zarr says so, harmlessly
        warnings.filterwarnings("ignore", category=zarr.errors.ZarrUserWarning)
        zarr.consolidate_metadata(group.store)
    group.store.close()


def recover_store(store: str | os.PathLike) -> None:
    """Resolve the leftovers of an interrupted replacement of ``store`` or of one of its tables, warning naming them.

    See :func:`stemst._atomic.recover`: a missing store or table is restored from the complete copy left beside
    the store; other leftovers are deleted.
    """
    store = Path(store)
    recover(Swap.of(store))
    prefix = f".{store.name}{TAG}{TABLES}."
    keys = {p.name[len(prefix) :].rsplit("-", 1)[0] for p in store.parent.glob(f"{prefix}*")}
    for key in sorted(keys):
        recover(table_swap(store, key), after=lambda: consolidate(store))


def write_table(sdata: Any, key: str) -> None:
    """Write ``sdata.tables[key]`` into the store ``sdata`` is backed by, replacing the table there, if any.

    The table is written as a store of its own beside the store, then moved in (write-new-then-swap,
    :func:`stemst._atomic.replacing`), and the store's metadata consolidated: a run killed at any moment leaves
    the old table or the new one, whole, and the next :func:`stemst.io.read_zarr` resolves the leftovers.
    """
    import anndata as ad
    import spatialdata as sd

    store = Path(sdata.path)
    with (
        replacing(table_swap(store, key), overwrite=True, after=lambda: consolidate(store)) as new,
        ad.settings.override(auto_shard_zarr_v3=False),  # as stemst.io.write_zarr
        warnings.catch_warnings(),
    ):
        # the table is written without the shapes it annotates: expected
        warnings.filterwarnings("ignore", message="The table is annotating", category=UserWarning)
        sd.SpatialData(tables={key: sdata.tables[key]}).write(new, consolidate_metadata=False)


def check_chunks(store: str | os.PathLike, table_key: str) -> None:
    """Raise if the counts ``X`` of table ``table_key`` lacks chunk files: zarr would read them as zeros.

    A CSR matrix's ``data`` and ``indices`` never hold a chunk that zarr would skip writing (all zero counts, all
    in the first gene), and its ``indptr`` must end at the number of stored counts.
    """
    import zarr

    root = Path(store) / TABLES / table_key / "X"
    if not root.is_dir():
        return
    group = zarr.open(root, mode="r", use_consolidated=False)
    if not isinstance(group, zarr.Group):  # dense counts: an all-zero chunk is legitimately not written
        return
    arrays = dict(group.arrays())
    missing = [
        f"X/{name} ({a.nchunks - a.nchunks_initialized} of {a.nchunks} chunks)"
        for name, a in arrays.items()
        if name in ("data", "indices") and a.nchunks_initialized < a.nchunks
    ]
    if "indptr" in arrays and "data" in arrays and arrays["indptr"].size:
        end = int(arrays["indptr"][-1])
        if end != arrays["data"].shape[0]:
            missing.append(f"X/indptr (ends at {end}, but X/data holds {arrays['data'].shape[0]} values)")
    if missing:
        raise StemstFileError(
            store,
            f"the counts of table {table_key!r} are incomplete: {'; '.join(missing)} are missing on disk, and would "
            "read as zeros. The store was copied or written only in part: copy it again, or write it again with "
            "stemst.io.write_zarr.",
        )
