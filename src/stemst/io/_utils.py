"""Pieces shared by the readers: file checks, image reading, and the common "full-resolution spots" step."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from stemst._schema import StemstDataError, assemble, make_section

TIFF_SUFFIXES = (".tif", ".tiff", ".btf", ".svs")


def require_files(files: Mapping[str, Path], *, hint: str = "") -> None:
    """Raise one :class:`FileNotFoundError` naming every missing file and what it should hold.

    ``files`` maps a description ("counts matrix (10x HDF5)") to the expected path.
    """
    missing = [f"{path} ({what})" for what, path in files.items() if not Path(path).is_file()]
    if missing:
        raise FileNotFoundError("Missing file(s): " + "; ".join(missing) + (f". {hint}" if hint else "."))


def check_section_name(section: str) -> str:
    """Check that ``section`` can name SpatialData elements and a coordinate system."""
    section = str(section)
    if not section or section.startswith("__") or not all(c.isalnum() or c in "_-." for c in section):
        raise ValueError(
            f"Section name {section!r} is not valid: use letters, digits, '_', '-' and '.' only "
            "(pass `section=` to choose one)."
        )
    return section


def _tiff_yxs(arr: Any, axes: str, path: Path) -> Any:
    """Bring a tifffile series array to ``(y, x, samples)``, dropping singleton extra axes."""
    axes = axes.replace("C", "S") if "S" not in axes else axes
    index = []
    kept = []
    for ax, n in zip(axes, arr.shape, strict=True):
        if ax in "YXS":
            index.append(slice(None))
            kept.append(ax)
        elif n == 1:
            index.append(0)
        else:
            raise StemstDataError(
                f"{path}: cannot read an H&E image with axes {axes!r} and shape {arr.shape}; expected a 2-D RGB image."
            )
    arr = arr[tuple(index)]
    if "S" not in kept:
        raise StemstDataError(f"{path}: the image has no colour channels (axes {axes!r}); expected an RGB H&E image.")
    return arr.transpose([kept.index(a) for a in "YXS"])


def read_image(path: str | os.PathLike, *, level: int = 0) -> tuple[Any, tuple[int, int]]:
    """Read an RGB image as ``(y, x, c)``; TIFFs lazily (dask, via tifffile's zarr interface).

    Parameters
    ----------
    path
        Image file (TIFF, possibly pyramidal; or anything Pillow reads).
    level
        Pyramid level to read (TIFF only; 0 is full resolution).

    Returns
    -------
    The image and the ``(height, width)`` of pyramid level 0.
    """
    path = Path(path)
    if path.suffix.lower() in TIFF_SUFFIXES or path.name.lower().endswith(".ome.tif"):
        import dask.array as da
        import tifffile
        import zarr

        with tifffile.TiffFile(path) as tf:
            series = tf.series[0]
            axes = series.axes
            shapes = [lvl.shape for lvl in series.levels]
            dtype = series.dtype
        if not 0 <= level < len(shapes):
            raise ValueError(f"{path} has {len(shapes)} pyramid level(s) {shapes}; level={level} does not exist.")
        if dtype != np.uint8:
            raise StemstDataError(f"{path}: expected an 8-bit RGB H&E image, got dtype {dtype}.")
        store = tifffile.imread(path, aszarr=True, series=0, level=level)
        arr = _tiff_yxs(da.from_zarr(zarr.open(store, mode="r")), axes, path)
        full = dict(zip(axes, shapes[0], strict=True))
        return arr, (int(full["Y"]), int(full["X"]))
    if level != 0:
        raise ValueError(f"{path} is not a TIFF; only level=0 can be read from it.")
    from PIL import Image

    Image.MAX_IMAGE_PIXELS = None
    with Image.open(path) as im:
        arr = np.asarray(im.convert("RGB"))
    return arr, (arr.shape[0], arr.shape[1])


def to_uint8_rgb(image: Any, *, what: str) -> Any:
    """Convert an in-memory image to uint8: floats in [0, 1] (e.g. from matplotlib's ``imread``) are scaled by 255."""
    image = np.asarray(image)
    if image.dtype == np.uint8:
        return image
    if np.issubdtype(image.dtype, np.floating):
        finite = image[np.isfinite(image)]
        hi = float(finite.max()) if finite.size else 0.0
        lo = float(finite.min()) if finite.size else 0.0
        if finite.size != image.size or lo < 0 or hi > 255:
            raise StemstDataError(f"{what}: float image with values outside [0, 255] or non-finite values.")
        factor = 255.0 if hi <= 1.0 else 1.0
        return np.clip(np.rint(image * factor), 0, 255).astype(np.uint8)
    if np.issubdtype(image.dtype, np.integer) and image.size and image.min() >= 0 and image.max() <= 255:
        return image.astype(np.uint8)
    raise StemstDataError(f"{what}: expected an 8-bit RGB image (or floats in [0, 1]), got dtype {image.dtype}.")


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
    obs: pd.DataFrame | None = None,
    extra: Mapping[str, Any] | None = None,
) -> Any:
    """Scale full-resolution spot centres ``(x, y)`` into the kept image and build a one-section SpatialData.

    ``scale`` is ``(sx, sy)``: pixels of the kept image per full-resolution pixel.
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
    return assemble([part])
