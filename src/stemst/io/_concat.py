"""Combine several stemst SpatialData objects (e.g. one per reader call) into one."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from stemst._schema import (
    INSTANCE_KEY,
    REGION_KEY,
    SECTION_KEY,
    SPATIAL_KEY,
    TABLE_KEY,
    StemstDataError,
    assemble,
    get_image,
    get_table,
    make_section,
    section_info,
    section_mask,
    sections,
)
from stemst.io._validate import validate


def concatenate(sdatas: Sequence[Any]) -> Any:
    """Combine stemst SpatialData objects with distinct section names into one.

    Sections are rebuilt through the data model, so the result has one counts table over the union of genes
    (absent genes count as 0), every section's image, circles and metadata. Only raw data is carried over:
    concatenate before :func:`stemst.pp.embed_patches` and :func:`stemst.pp.select_genes`.

    Parameters
    ----------
    sdatas
        Objects made by :mod:`stemst.io` readers or :mod:`stemst.datasets`.

    Returns
    -------
    A new :class:`~spatialdata.SpatialData`.

    Examples
    --------
    >>> c = stemst.datasets.her2st(["C2", "C6"])  # e.g. two stemst.io.visium(...) reads
    >>> a = stemst.datasets.her2st("A1")
    >>> both = stemst.io.concatenate([c, a])
    >>> both.tables["table"].obs["section"].value_counts().to_dict()
    {'A1': 346, 'C2': 187, 'C6': 178}
    """
    if not sdatas:
        raise ValueError("Nothing to concatenate.")
    parts, seen = [], set()
    for sdata in sdatas:
        validate(sdata)
        table = get_table(sdata, TABLE_KEY)
        for s in sections(table):
            if s in seen:
                raise StemstDataError(f"Section {s!r} appears in more than one object; rename one with `section=`.")
            seen.add(s)
            info = section_info(table, s)
            sub = table[section_mask(table, s)]
            keep = [c for c in sub.obs.columns if c not in (SECTION_KEY, REGION_KEY, INSTANCE_KEY)]
            parts.append(
                make_section(
                    s,
                    image=get_image(sdata, s),
                    counts=sub.X,
                    genes=sub.var_names,
                    spot_ids=sub.obs[INSTANCE_KEY].astype(str).to_numpy(),
                    coords=np.asarray(sub.obsm[SPATIAL_KEY]),
                    microns_per_pixel=info.microns_per_pixel,
                    spot_diameter_um=info.spot_diameter_um,
                    source=info.source,
                    obs=sub.obs[keep].reset_index(drop=True),
                    extra=info.extra,
                )
            )
    return assemble(parts)
