"""Overview of all sections: H&E with the spots."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

from stemst._docs import doc_panel_size, doc_params, doc_sections, doc_show_save
from stemst._schema import TABLE_KEY, get_table, section_mask
from stemst._schema import sections as table_sections
from stemst.pl._utils import draw_section, finish, grid


def _spot_values(adata: Any, color: str, mask: np.ndarray, layer: str | None) -> np.ndarray:
    import scipy.sparse as sp

    if color == "total_counts":
        m = adata.layers[layer] if layer else adata.X
        return np.asarray(m[mask].sum(axis=1)).ravel().astype(np.float64)
    if color in adata.obs.columns:
        return adata.obs[color].to_numpy(dtype=np.float64)[mask]
    if color in adata.var_names:
        col = adata[mask, color]
        m = col.layers[layer] if layer else col.X
        return (m.toarray() if sp.issparse(m) else np.asarray(m)).ravel().astype(np.float64)
    raise KeyError(
        f"color={color!r} is neither 'total_counts', a numeric obs column ({list(adata.obs.columns)}) nor a gene."
    )


@doc_params(sections=doc_sections, panel_size=doc_panel_size, show_save=doc_show_save)
def sections(
    sdata: Any,
    *,
    sections: str | Iterable[str] | None = None,
    color: str | None = None,
    table_key: str = TABLE_KEY,
    layer: str | None = None,
    cmap: str = "viridis",
    crop: bool = True,
    ncols: int = 5,
    panel_size: tuple[float, float] = (3.5, 3.5),
    figsize: tuple[float, float] | None = None,
    show: bool | None = None,
    save: str | Path | None = None,
) -> np.ndarray:
    """Overview figure: every section's H&E with its spots drawn at their physical size.

    Parameters
    ----------
    sdata
        :class:`~spatialdata.SpatialData` in the stemst data model.
    {sections}
        One panel each.
    color
        ``None`` draws spot outlines; ``"total_counts"``, a numeric ``obs`` column or a gene name fills the spots
        (one colour scale per panel).
    table_key
        Table with the spots (the counts table or a prediction table).
    layer
        Layer for ``color`` (``X`` if ``None``).
    cmap
        Colour map for ``color``.
    crop
        Zoom each panel to its spots; ``False`` shows the whole image.
    ncols
        Panels per row.
    {panel_size}
    {show_save}

    Returns
    -------
    The axes, one per section, titled with the section name and its number of spots.

    Examples
    --------
    >>> axes = stemst.pl.sections(sdata, color="total_counts", show=False)  # sdata: HER2ST C2 and C6
    >>> axes.shape
    (2,)
    """
    adata = get_table(sdata, table_key)
    names = table_sections(adata) if sections is None else ([sections] if isinstance(sections, str) else list(sections))
    if not names:
        raise ValueError("No sections to plot.")
    fig, axes = grid(len(names), ncols=ncols, panel_size=panel_size, figsize=figsize)
    for ax, s in zip(axes, names, strict=True):
        mask = section_mask(adata, s)
        values = None if color is None else _spot_values(adata, color, mask, layer)
        coll = draw_section(ax, sdata, adata, s, values=values, cmap=cmap, crop=crop)
        ax.set_title(f"{s} ({int(mask.sum())} spots)")
        if values is not None:
            fig.colorbar(coll, ax=ax, shrink=0.7, label=color)
    finish(fig, show, save)
    return axes
