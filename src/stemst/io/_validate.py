"""Check that a SpatialData follows the stemst data model; zarr read/write that check it."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import scipy.sparse as sp

from stemst._atomic import Swap, replacing
from stemst._errors import StemstFileError
from stemst._schema import (
    INSTANCE_KEY,
    REGION_KEY,
    SECTION_KEY,
    SPATIAL_KEY,
    TABLE_KEY,
    UNS_KEY,
    SectionInfo,
    StemstDataError,
    get_image,
    image_key,
    spots_key,
)
from stemst._utils import reading
from stemst.io._store import check_chunks, recover_store

#: files marking the root of a zarr store (v3, v2)
ZARR_GROUP_FILES = ("zarr.json", ".zgroup")


def _check_section(sdata: Any, table: Any, info: SectionInfo, problems: list[str]) -> None:
    from spatialdata.transformations import get_transformation

    s = info.section
    rows = (table.obs[SECTION_KEY] == s).to_numpy()
    if not rows.any():
        problems.append(f"section {s!r}: no spots in the table")
        return
    regions = pd.unique(table.obs.loc[rows, REGION_KEY].astype(str))
    if list(regions) != [spots_key(s)]:
        problems.append(f"section {s!r}: obs[{REGION_KEY!r}] is {list(regions)}, expected [{spots_key(s)!r}]")
    if image_key(s) not in sdata.images:
        problems.append(f"section {s!r}: no image {image_key(s)!r}")
        shape_hw = None
    else:
        img = get_image(sdata, s, scale=0)
        shape_hw = (int(img.shape[1]), int(img.shape[2]))
        if img.ndim != 3 or img.shape[0] != 3 or img.dtype != np.uint8:
            problems.append(f"section {s!r}: image must be (3, y, x) uint8, got {img.shape} {img.dtype}")
        if s not in get_transformation(sdata.images[image_key(s)], get_all=True):
            problems.append(f"section {s!r}: image is not in coordinate system {s!r}")
    ids = table.obs.loc[rows, INSTANCE_KEY].astype(str).to_numpy()
    xy = np.asarray(table.obsm[SPATIAL_KEY])[rows]
    if pd.Index(ids).has_duplicates:
        problems.append(f"section {s!r}: duplicate obs[{INSTANCE_KEY!r}] values")
    if shape_hw is not None:
        h, w = shape_hw
        out = (xy[:, 0] < 0) | (xy[:, 0] >= w) | (xy[:, 1] < 0) | (xy[:, 1] >= h)
        if out.any():
            problems.append(
                f"section {s!r}: {int(out.sum())} spots outside the {w} x {h} px image, e.g. {ids[out][:3].tolist()}"
            )
    if spots_key(s) not in sdata.shapes:
        problems.append(f"section {s!r}: no circles {spots_key(s)!r}")
        return
    circles = sdata.shapes[spots_key(s)]
    if s not in get_transformation(circles, get_all=True):
        problems.append(f"section {s!r}: circles are not in coordinate system {s!r}")
    if "radius" not in circles.columns:
        problems.append(f"section {s!r}: circles have no 'radius' column")
    elif not np.allclose(circles["radius"].to_numpy(dtype=float), info.spot_diameter_px / 2, rtol=1e-3):
        problems.append(
            f"section {s!r}: circle radius differs from spot_diameter_px / 2 = {info.spot_diameter_px / 2:.3f}"
        )
    index = pd.Index(circles.index.astype(str))
    if len(index) != len(ids) or not index.isin(ids).all():
        problems.append(
            f"section {s!r}: {len(index)} circles but {len(ids)} table rows, or circle ids that are not "
            f"obs[{INSTANCE_KEY!r}] values"
        )
        return
    pos = index.get_indexer(ids)
    cxy = np.column_stack([circles.geometry.x.to_numpy(), circles.geometry.y.to_numpy()])[pos]
    if not np.allclose(cxy, xy, atol=1e-3):
        problems.append(f"section {s!r}: circle centres differ from obsm[{SPATIAL_KEY!r}]")


def _table_problems(table: Any) -> list[str]:
    """Return what is wrong with the counts table itself: obs columns, spot centres, metadata, counts, annotation."""
    problems: list[str] = []
    missing = [c for c in (SECTION_KEY, REGION_KEY, INSTANCE_KEY) if c not in table.obs.columns]
    if missing:
        problems.append(f"obs lacks columns {missing}")
    xy = table.obsm.get(SPATIAL_KEY)
    if xy is None or np.asarray(xy).shape != (table.n_obs, 2):
        problems.append(f"obsm[{SPATIAL_KEY!r}] must be (n_spots, 2) (x, y) in image pixels")
    if not table.uns.get(UNS_KEY, {}).get("sections"):
        problems.append(f"uns[{UNS_KEY!r}]['sections'] is missing (per-section metadata)")
    x = table.X
    if not sp.issparse(x) or x.format != "csr":
        problems.append("X must be a sparse CSR matrix of raw counts")
    data = x.data if sp.issparse(x) else np.asarray(x)
    if data.size and (not np.all(np.isfinite(data)) or np.any(data < 0) or not np.all(np.mod(data, 1) == 0)):
        problems.append("X must hold raw non-negative integer counts")
    attrs = table.uns.get("spatialdata_attrs", {})
    if attrs.get("region_key") != REGION_KEY or attrs.get("instance_key") != INSTANCE_KEY:
        problems.append(f"table is not annotating circles by region_key={REGION_KEY!r}, instance_key={INSTANCE_KEY!r}")
    return problems


def _section_info(name: str, d: Any, problems: list[str]) -> SectionInfo | None:
    """Return the section's metadata, or ``None`` after adding what makes it unusable to ``problems``."""
    try:
        info = SectionInfo.from_dict(d)
    except (KeyError, TypeError, ValueError) as e:
        problems.append(f"section {name!r}: unreadable metadata ({e!r})")
        return None
    if info.section != name or not (info.microns_per_pixel > 0 and info.spot_diameter_um > 0):
        problems.append(f"section {name!r}: metadata has section={info.section!r} or a non-positive size")
        return None
    return info


def validate(sdata: Any, *, table_key: str = TABLE_KEY) -> None:
    """Check that ``sdata`` follows the stemst data model; raise listing every problem found.

    Checked: the table's obs columns, ``obsm["spatial"]`` and per-section metadata; raw integer, non-negative
    counts in a CSR matrix; per section an RGB uint8 image and circles in the section's coordinate system,
    circles matching the table's spots (ids, centres, radius from the metadata), and spots inside the image.

    Parameters
    ----------
    sdata
        :class:`~spatialdata.SpatialData` to check.
    table_key
        Name of the counts table.

    Raises
    ------
    StemstDataError
        Listing every deviation from the data model.

    Examples
    --------
    >>> import stemst
    >>> sdata = stemst.datasets.her2st(["C2"])
    >>> stemst.io.validate(sdata)
    """
    if table_key not in sdata.tables:
        raise StemstDataError(f"No table {table_key!r}; tables present: {list(sdata.tables.keys())}.")
    table = sdata.tables[table_key]
    problems = _table_problems(table)
    infos = table.uns.get(UNS_KEY, {}).get("sections")
    if problems or not infos:
        raise StemstDataError("Not in the stemst data model:\n- " + "\n- ".join(problems))
    known = set(infos)
    in_obs = set(pd.unique(table.obs[SECTION_KEY].astype(str)))
    if in_obs - known:
        problems.append(f"obs[{SECTION_KEY!r}] has sections without metadata: {sorted(in_obs - known)}")
    for name, d in infos.items():
        info = _section_info(name, d, problems)
        if info is not None:
            _check_section(sdata, table, info, problems)
    if problems:
        raise StemstDataError("Not in the stemst data model:\n- " + "\n- ".join(problems))


def read_zarr(path: str | os.PathLike, *, check: bool = True) -> Any:
    """Read a SpatialData zarr store written by :func:`write_zarr` (or ``sdata.write``) and validate it.

    The leftovers of a write of the store or of one of its tables that was interrupted (``.NAME.stemst-*`` folders
    beside it) are resolved first, with a warning naming them: a missing store or table is restored from the whole
    copy left there. A counts table whose chunk files are missing on disk is refused (zarr would read zeros).

    Parameters
    ----------
    path
        ``.zarr`` folder.
    check
        Run :func:`validate` on the result.

    Returns
    -------
    :class:`~spatialdata.SpatialData`, images lazily backed by the store.

    Examples
    --------
    >>> import stemst
    >>> stemst.io.write_zarr(stemst.datasets.her2st("A1"), "her2st_a1.zarr")
    >>> stemst.io.read_zarr("her2st_a1.zarr").tables["table"].n_obs
    346
    """
    import spatialdata as sd

    path = Path(path)
    recover_store(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist; expected a SpatialData .zarr folder.")
    if not path.is_dir() or not any((path / f).is_file() for f in ZARR_GROUP_FILES):
        raise StemstFileError(
            path,
            "not a zarr store (a folder with zarr.json, or .zgroup for zarr v2); give the .zarr folder written by "
            "stemst.io.write_zarr or SpatialData.write.",
        )
    with reading(path, "SpatialData zarr store", hint="Write it again with stemst.io.write_zarr."):
        check_chunks(path, TABLE_KEY)  # first: a CSR matrix with missing parts may not even load
        sdata = sd.read_zarr(path)
    if check:
        validate(sdata)
    return sdata


def write_zarr(sdata: Any, path: str | os.PathLike, *, overwrite: bool = False) -> None:
    """Validate ``sdata`` and write it as a SpatialData zarr store; nothing is written if it is invalid.

    An existing store is replaced only once the new one is complete (write-new-then-swap: the new store is written
    to ``.NAME.stemst-new`` beside it, then renamed into place), so a run killed at any moment leaves the old store
    or the new one, whole; the next call (or :func:`read_zarr`) resolves the leftovers, warning naming them.

    Parameters
    ----------
    sdata
        Object in the stemst data model.
    path
        Target ``.zarr`` folder.
    overwrite
        Replace an existing store. A folder that is not a zarr store, or the store ``sdata`` reads its images from,
        is never replaced.

    Examples
    --------
    >>> import stemst
    >>> stemst.io.write_zarr(stemst.datasets.her2st("A1"), "her2st_a1.zarr")
    >>> sorted(stemst.io.read_zarr("her2st_a1.zarr").images)
    ['A1_he']
    """
    import anndata as ad
    from spatialdata import get_dask_backing_files

    path = Path(path)
    validate(sdata)
    recover_store(path)  # so that no leftover of its tables is restored into the new store later
    if path.exists() and overwrite:
        if not any((path / f).is_file() for f in ZARR_GROUP_FILES):
            raise StemstFileError(path, "exists and is not a zarr store; stemst replaces only zarr stores.")
        if any(Path(f).resolve().is_relative_to(path.resolve()) for f in get_dask_backing_files(sdata)):
            raise StemstDataError(
                f"Cannot overwrite {path}: this SpatialData reads its images from it. Write it to another path."
            )
    # an explicit choice (no sharding: the layout every zarr reader knows) instead of a warning per array written
    with replacing(Swap.of(path), overwrite=overwrite) as new, ad.settings.override(auto_shard_zarr_v3=False):
        sdata.write(new, update_sdata_path=False)
    sdata.path = path
