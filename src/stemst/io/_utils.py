"""Pieces shared by the readers: file checks and the common "full-resolution spots" step."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from stemst._schema import StemstDataError, assemble, make_section
from stemst.io._image import check_spots_on_tissue


def require_files(files: Mapping[str, Path], *, hint: str = "") -> None:
    """Raise one :class:`FileNotFoundError` naming every missing file and what it should hold.

    ``files`` maps a description ("counts matrix (10x HDF5)") to the expected path.
    """
    missing = [f"{path} ({what})" for what, path in files.items() if not Path(path).is_file()]
    if missing:
        raise FileNotFoundError("Missing file(s): " + "; ".join(missing) + (f". {hint}" if hint else "."))


def positive_number(value: Any) -> float | None:
    """``value`` as a finite positive float, or ``None`` if it is not one (missing, text, NaN, zero, negative)."""
    try:
        x = float(value)
    except (TypeError, ValueError):
        return None
    return x if np.isfinite(x) and x > 0 else None


def check_section_name(section: str) -> str:
    """Check that ``section`` can name SpatialData elements and a coordinate system."""
    section = str(section)
    if not section or section.startswith("__") or not all(c.isalnum() or c in "_-." for c in section):
        raise ValueError(
            f"Section name {section!r} is not valid: use letters, digits, '_', '-' and '.' only "
            "(pass `section=` to choose one)."
        )
    return section


def counts_matrix(adata: Any, layer: str | None, *, what: str) -> Any:
    """``adata.X`` or ``adata.layers[layer]``, with a clear error for a missing layer."""
    if layer is None:
        if adata.X is None:
            raise StemstDataError(f"{what}: the AnnData has no X; pass `layer=` naming the raw counts layer.")
        return adata.X
    if layer not in adata.layers:
        raise KeyError(f"{what}: no layer {layer!r}; layers present: {list(adata.layers.keys())}.")
    return adata.layers[layer]


def obs_columns(obs: pd.DataFrame, columns: Sequence[str] = ("array_row", "array_col")) -> pd.DataFrame:
    """Return the stemst per-spot annotations present in ``obs``."""
    return pd.DataFrame({c: obs[c].to_numpy() for c in columns if c in obs.columns}, index=obs.index)


def build(
    section: str,
    *,
    image: Any,
    counts: Any,
    genes: Sequence[str],
    spot_ids: Sequence[str],
    coords_fullres: np.ndarray,
    scale: tuple[float, float],
    microns_per_fullres_pixel: float,
    spot_diameter_um: float,
    source: str,
    image_label: str,
    obs: pd.DataFrame | None = None,
    extra: Mapping[str, Any] | None = None,
    blank_hint: str = "",
) -> Any:
    """Scale full-resolution spot centres ``(x, y)`` into the kept image and build a one-section SpatialData.

    ``scale`` is ``(sx, sy)``: pixels of the kept image per full-resolution pixel. An image in memory is checked
    (:func:`~stemst.io._image.check_spots_on_tissue`, ``image_label`` naming it): a blank image raises, spots mostly
    on background warn (``blank_hint``: another image to try, said when the image is blank). Lazy images are checked by :func:`stemst.pp.embed_patches`, which reads a coarse level.
    """
    sx, sy = float(scale[0]), float(scale[1])
    if not (np.isfinite(sx) and np.isfinite(sy) and sx > 0 and sy > 0):
        raise StemstDataError(f"Section {section!r}: image scale factors must be positive, got {scale}.")
    coords = np.asarray(coords_fullres, dtype=np.float64)
    if coords.ndim != 2 or coords.shape[1] != 2:
        raise StemstDataError(f"Section {section!r}: spot coordinates must be (n, 2) (x, y), got {coords.shape}.")
    coords = coords * np.array([sx, sy])
    info = {"image_scale": sx, "microns_per_fullres_pixel": float(microns_per_fullres_pixel)}
    part = make_section(
        section,
        image=image,
        counts=counts,
        genes=genes,
        spot_ids=spot_ids,
        coords=coords,
        microns_per_pixel=float(microns_per_fullres_pixel) / sx,
        spot_diameter_um=spot_diameter_um,
        source=source,
        obs=obs,
        extra={**info, **dict(extra or {})},
    )
    if isinstance(part.image, np.ndarray):
        check_spots_on_tissue(
            part.image,
            part.coords,
            part.info.spot_diameter_px,
            what=f"Section {section!r} ({image_label})",
            stacklevel=5,
            blank_hint=blank_hint,
        )
    return assemble([part])
