"""H&E images: reading any common bit depth and mode as RGB uint8, and cheap checks that the spots sit on tissue."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from stemst._errors import StemstDataError, StemstFileError, warn
from stemst._utils import reading

TIFF_SUFFIXES = (".tif", ".tiff", ".btf", ".svs")
#: side (px) of the thumbnail the tissue checks look at
THUMBNAIL_SIDE = 1024
#: an image whose pixel values span at most this many grey levels is blank (a placeholder, not a photograph)
BLANK_RANGE = 2
#: a spot is on tissue when at least this fraction of a spot-wide window around its centre is tissue
SPOT_TISSUE_MIN = 0.1
#: warn when fewer spots than this sit on tissue (correctly placed HER2ST spots: 95-100 %)
ON_TISSUE_WARN = 0.75


# ----------------------------------------------------------------------------------------------------------------
# reading


def _tiff_yxs(arr: Any, axes: str, path: Path) -> Any:
    """Bring a tifffile series array to ``(y, x[, samples])``, dropping singleton extra axes."""
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
            raise StemstFileError(
                path, f"cannot read an H&E image with axes {axes!r} and shape {arr.shape}; expected a 2-D RGB image."
            )
    arr = arr[tuple(index)]
    return arr.transpose([kept.index(a) for a in "YXS" if a in kept])


def _bit_depth(peak: int) -> int:
    """Bits a 16-bit image's values use, from its largest value: 8, 10, 12, 14 or 16.

    Examples
    --------
    >>> _bit_depth(255), _bit_depth(4000), _bit_depth(65535)
    (8, 12, 16)
    """
    return next((bits for bits in (8, 10, 12, 14) if peak < 2**bits), 16)


def _tiff_peak(path: Path, n_levels: int) -> int:
    """Largest value of a TIFF, read on its smallest pyramid level (the whole image once when there is one level)."""
    import dask.array as da
    import tifffile
    import zarr

    with reading(path, "TIFF image"):
        store = tifffile.imread(path, aszarr=True, series=0, level=n_levels - 1)
        return int(da.from_zarr(zarr.open(store, mode="r")).max().compute())


def _read_tiff(path: Path, level: int) -> tuple[Any, tuple[int, int], int | None]:
    import dask.array as da
    import tifffile
    import zarr

    size = path.stat().st_size
    with reading(path, "TIFF image"):
        with tifffile.TiffFile(path) as tf:
            series = tf.series[0]
            axes = series.axes
            shapes = [lvl.shape for lvl in series.levels]
            if 0 <= level < len(shapes):
                pages = [p for p in series.levels[level].pages if p is not None]
                ends = [o + n for p in pages for o, n in zip(p.dataoffsets, p.databytecounts, strict=True) if n]
                if any(end > size for end in ends):
                    raise StemstFileError(
                        path,
                        f"image data runs past the end of the file ({size} bytes): it is truncated. Copy it again.",
                    )
        if not 0 <= level < len(shapes):
            raise ValueError(f"{path} has {len(shapes)} pyramid level(s) {shapes}; level={level} does not exist.")
        store = tifffile.imread(path, aszarr=True, series=0, level=level)
        arr = da.from_zarr(zarr.open(store, mode="r"))
    full = dict(zip(axes, shapes[0], strict=True))
    peak = _tiff_peak(path, len(shapes)) if arr.dtype == np.uint16 else None
    return _tiff_yxs(arr, axes, path), (int(full["Y"]), int(full["X"])), peak


def _png_16bit_colour(path: Path) -> np.ndarray | None:
    """Return a 16-bit RGB(A) PNG's pixels at full depth (Pillow keeps only the high byte), ``None`` for other files.

    Decoded with ``imagecodecs`` (installed with tifffile's codecs); without it, ``None`` with a warning (Pillow's
    high 8 bits are then read, which loses an image whose values use fewer bits).
    """
    from PIL import Image

    with reading(path, "image"), Image.open(path) as im:
        rawmode = im.tile[0][3] if im.format == "PNG" and im.tile else ""
        if not (isinstance(rawmode, str) and rawmode in ("RGB;16B", "RGBA;16B")):
            return None
    try:
        import imagecodecs
    except ImportError:
        warn(
            f"{path} is a 16-bit colour PNG; without the imagecodecs package only its high 8 bits are read, which "
            "loses an image whose values use fewer bits (12-bit data reads nearly black). Install imagecodecs, or "
            "save the image as a 16-bit TIFF.",
            stacklevel=5,
        )
        return None
    with reading(path, "image"):
        return np.asarray(imagecodecs.png_decode(path.read_bytes()))


def _read_pillow(path: Path) -> np.ndarray:
    from PIL import Image

    Image.MAX_IMAGE_PIXELS = None
    deep = _png_16bit_colour(path)
    if deep is not None:
        return deep
    with reading(path, "image"), Image.open(path) as im:
        im.load()
        if im.mode == "P":  # palette: expand, keeping a transparent colour as alpha
            im = im.convert("RGBA" if "transparency" in im.info else "RGB")
        elif im.mode == "PA":
            im = im.convert("RGBA")
        elif im.mode == "1":
            im = im.convert("L")
        elif im.mode in ("CMYK", "YCbCr", "LAB", "HSV"):
            im = im.convert("RGB")
        arr = np.asarray(im)
    if arr.dtype == np.int32 and im.mode == "I" and arr.size and arr.min() >= 0 and arr.max() <= 65535:
        arr = arr.astype(np.uint16)  # Pillow's 32-bit mode holding a 16-bit greyscale image
    return arr


def read_image(path: str | os.PathLike, *, level: int = 0) -> tuple[Any, tuple[int, int]]:
    """Read an H&E image as ``(y, x, 3)`` uint8, whatever its bit depth and mode; TIFFs lazily (dask).

    8- and 16-bit, greyscale, RGB, RGBA (composited over white, like glass) and palette images are converted
    (see :func:`as_uint8_rgb`). A file that cannot be decoded raises a :class:`~stemst.StemstFileError` naming it.

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
    peak = None
    if path.suffix.lower() in TIFF_SUFFIXES:
        arr, full, peak = _read_tiff(path, level)
    elif level != 0:
        raise ValueError(f"{path} is not a TIFF; only level=0 can be read from it.")
    else:
        arr = _read_pillow(path)
        full = (arr.shape[0], arr.shape[1])
    return as_uint8_rgb(arr, what=str(path), peak=peak), full


def _uint16_as_uint8(image: Any, what: str, peak: int | None) -> Any:
    """Scale a 16-bit image to uint8 by the bit depth its values use (:func:`_bit_depth` of the largest value)."""
    if peak is None:
        peak = int(image.max()) if isinstance(image, np.ndarray) else int(image.max().compute())
    bits = _bit_depth(peak)
    if bits < 16:
        warn(
            f"{what} is a 16-bit image whose values use {bits} bits (largest value {peak}): read as {bits}-bit data, "
            f"0-{2**bits - 1} scaled to 0-255 (scaled as 16-bit it would be nearly black). If it is a dark 16-bit "
            "image, convert it to 8-bit yourself.",
            stacklevel=5,
        )
    return (image.astype(np.float32) * (255.0 / (2**bits - 1))).round().clip(0, 255).astype(np.uint8)


def _as_uint8(image: Any, what: str, peak: int | None = None) -> Any:
    """Scale an image of any integer or float type to uint8 (lazily for dask arrays; ``peak``: the largest value)."""
    dtype = image.dtype
    if dtype == np.uint8:
        return image
    if dtype == np.bool_:
        return image.astype(np.uint8) * np.uint8(255)
    lazy = not isinstance(image, np.ndarray)
    if np.issubdtype(dtype, np.unsignedinteger) and dtype.itemsize == 2:
        return _uint16_as_uint8(image, what, peak)
    if lazy:
        raise StemstDataError(f"{what}: cannot read an H&E image of dtype {dtype}; expected 8- or 16-bit RGB.")
    return _in_memory_as_uint8(image, what)


def _in_memory_as_uint8(image: np.ndarray, what: str) -> np.ndarray:
    """Scale an in-memory image of another integer or a float type to uint8, from its range of values."""
    dtype = image.dtype
    finite = np.isfinite(image) if np.issubdtype(dtype, np.floating) else np.ones(image.shape, bool)
    lo = float(image[finite].min()) if finite.any() else 0.0
    hi = float(image[finite].max()) if finite.any() else 0.0
    if np.issubdtype(dtype, np.floating) and finite.all() and lo >= 0 and hi <= 255:
        factor = 255.0 if hi <= 1.0 else 1.0  # floats in [0, 1] (matplotlib's imread) or already 0-255
        return np.clip(np.rint(image * factor), 0, 255).astype(np.uint8)
    if np.issubdtype(dtype, np.integer) and lo >= 0 and hi <= 255:
        return image.astype(np.uint8)
    if np.issubdtype(dtype, np.integer) and lo >= 0 and hi <= 65535:
        return _as_uint8(image.astype(np.uint16), what)
    raise StemstDataError(
        f"{what}: image of dtype {dtype} with values in [{lo}, {hi}]{'' if finite.all() else ' and NaN/inf'}; "
        "expected 8-bit (0-255), 16-bit (0-65535) or floats in [0, 1]."
    )


def as_uint8_rgb(image: Any, *, what: str, peak: int | None = None) -> Any:
    """Convert a ``(y, x)`` or ``(y, x, channels)`` image of any common bit depth and mode to ``(y, x, 3)`` uint8.

    16-bit values are scaled by 255 / 65535, floats in [0, 1] by 255. A 16-bit image whose largest value fits in
    fewer bits (8, 10, 12 or 14: a camera's 12-bit data in a 16-bit file) is scaled by that depth instead, with a
    :class:`~stemst.StemstWarning`, so that it is not read nearly black (or, with 8-bit values, blank). An alpha channel is composited over white
    (transparent = glass). Greyscale is copied into the three channels, with a :class:`~stemst.StemstWarning`:
    encoders expect stained colour, and a greyscale file is often the wrong file (a mask, a fluorescence channel).

    Parameters
    ----------
    image
        numpy or dask array.
    what
        How to name the image in messages (a file path, an AnnData key).
    peak
        The largest value of a 16-bit image, if known (a pyramid's smallest level gives it cheaply); else computed.

    Returns
    -------
    The image, lazily converted if it was a dask array.

    Examples
    --------
    >>> as_uint8_rgb(np.full((2, 2, 3), 65535, np.uint16), what="demo")[0, 0].tolist()
    [255, 255, 255]
    """
    if not hasattr(image, "dask"):
        image = np.asarray(image)
    if image.ndim == 2:
        image = image[:, :, None]
    if image.ndim != 3 or image.shape[-1] not in (1, 2, 3, 4):
        raise StemstDataError(f"{what}: expected a (y, x, 3) RGB image, got shape {image.shape}.")
    image = _as_uint8(image, what, peak)
    if image.shape[-1] in (2, 4):
        alpha = image[:, :, -1:].astype(np.float32) / 255.0
        image = (image[:, :, :-1].astype(np.float32) * alpha + 255.0 * (1.0 - alpha)).round().astype(np.uint8)
    if image.shape[-1] == 1:
        warn(
            f"{what} is a greyscale image; read as grey RGB. H&E encoders expect a stained colour image: is this "
            "the right file (not a mask or a single channel)?",
            stacklevel=4,
        )
        image = image[:, :, [0, 0, 0]]
    return image


# ----------------------------------------------------------------------------------------------------------------
# checks


def tissue_mask(image: np.ndarray, *, min_saturation: float | None = None, max_brightness: float = 0.92) -> np.ndarray:
    """Boolean tissue mask of an RGB ``(c, y, x)`` uint8 image: saturated, not-white pixels.

    Saturation is ``(max - min) / max`` over the channels; its threshold is Otsu's on the image unless given. Glass
    is bright and grey, H&E-stained tissue is coloured.

    Examples
    --------
    >>> img = np.full((3, 4, 4), 240, np.uint8)  # white glass
    >>> img[:, :, :2] = np.array([200, 80, 120], np.uint8)[:, None, None]  # a pink band
    >>> tissue_mask(img).sum(0).tolist()
    [4, 4, 0, 0]
    """
    rgb = np.asarray(image, dtype=np.float32) / 255.0
    mx, mn = rgb.max(0), rgb.min(0)
    sat = np.where(mx > 0, (mx - mn) / np.maximum(mx, 1e-6), 0.0)
    if min_saturation is None:
        min_saturation = _otsu(sat)
    return (sat > min_saturation) & (rgb.mean(0) < max_brightness)


def _otsu(values: np.ndarray, bins: int = 256) -> float:
    hist, edges = np.histogram(values.ravel(), bins=bins, range=(0.0, 1.0))
    p = hist / max(hist.sum(), 1)
    centres = (edges[:-1] + edges[1:]) / 2
    w0 = np.cumsum(p)
    m0 = np.cumsum(p * centres)
    between = (m0[-1] * w0 - m0) ** 2 / np.maximum(w0 * (1 - w0), 1e-12)
    return float(centres[int(np.argmax(between))])


def thumbnail(image: Any, max_side: int = THUMBNAIL_SIDE) -> tuple[np.ndarray, int]:
    """Every ``step``-th pixel of a ``(3, y, x)`` image, so that the longest side is at most ``max_side``.

    Returns
    -------
    The ``(3, y', x')`` uint8 thumbnail (computed) and ``step``.
    """
    step = max(1, int(np.ceil(max(image.shape[1:]) / max_side)))
    return np.asarray(image[:, ::step, ::step]), step


def check_not_blank(thumb: np.ndarray, *, what: str, hint: str = "") -> None:
    """Raise if the image holds no picture: every pixel (of the thumbnail) within :data:`BLANK_RANGE` grey levels.

    ``hint`` ends the message (another image to try).
    """
    lo, hi = int(thumb.min()), int(thumb.max())
    if hi - lo <= BLANK_RANGE:
        raise StemstDataError(
            f"{what} is blank (every pixel between {lo} and {hi}): a placeholder or an empty export, not an H&E "
            f"image. Use the real H&E image of this section.{' ' + hint if hint else ''}"
        )


def _on_tissue(smoothed: np.ndarray, xy: np.ndarray) -> float:
    """Fraction of the centres ``xy`` (thumbnail pixels) inside the thumbnail and on tissue."""
    ij = np.rint(xy).astype(np.int64)
    h, w = smoothed.shape
    inside = (ij[:, 0] >= 0) & (ij[:, 0] < w) & (ij[:, 1] >= 0) & (ij[:, 1] < h)
    hits = smoothed[ij[inside, 1], ij[inside, 0]] >= SPOT_TISSUE_MIN
    return float(hits.sum()) / max(len(xy), 1)


def check_spots_on_tissue(
    image: Any, coords: np.ndarray, spot_diameter_px: float, *, what: str, stacklevel: int = 4, blank_hint: str = ""
) -> float:
    """Check that the spots sit on tissue; raise for a blank image, warn when most spots are on background.

    The tissue mask (:func:`tissue_mask`) of a thumbnail is averaged over a spot-wide window; a spot is on
    tissue when at least :data:`SPOT_TISSUE_MIN` of its window is. When fewer than :data:`ON_TISSUE_WARN` of the
    spots are, or when swapping x/y or rescaling the coordinates would put clearly more of them on tissue, a
    :class:`~stemst.StemstWarning` names the likely cause.

    Parameters
    ----------
    image
        ``(3, y, x)`` uint8 image, numpy or dask (only a thumbnail is read).
    coords
        ``(n, 2)`` spot centres ``(x, y)`` in pixels of ``image``.
    spot_diameter_px
        Spot diameter in pixels of ``image``.
    what
        How to name the section and its image in messages.
    stacklevel
        Passed on to the warning.
    blank_hint
        Ends the message about a blank image (another image to try).

    Returns
    -------
    The fraction of spots on tissue; NaN for a greyscale image, where stain colour cannot mark the tissue.

    Raises
    ------
    StemstDataError
        If the image is blank (see :func:`check_not_blank`).
    """
    from scipy.ndimage import uniform_filter

    thumb, step = thumbnail(image)
    check_not_blank(thumb, what=what, hint=blank_hint)
    if (thumb == thumb[:1]).all():
        return float("nan")  # greyscale (warned when read): no stain colour to tell tissue from glass
    window = max(1, int(round(spot_diameter_px / step)))
    smoothed = uniform_filter(tissue_mask(thumb).astype(np.float32), size=window)
    xy = np.asarray(coords, dtype=np.float64) / step
    frac = _on_tissue(smoothed, xy)
    alternatives = {
        "with x and y swapped": _on_tissue(smoothed, xy[:, ::-1]),
        "with the coordinates x2 (the image is twice the size the scale factor implies)": _on_tissue(smoothed, xy * 2),
        "with the coordinates x0.5 (the image is half the size the scale factor implies)": _on_tissue(smoothed, xy / 2),
    }
    best = max(alternatives, key=alternatives.get)
    if frac < ON_TISSUE_WARN or (frac < 0.9 and alternatives[best] >= 0.95):
        better = f" {alternatives[best]:.0%} would be {best}." if alternatives[best] > frac + 0.1 else ""
        warn(
            f"{what}: only {frac:.0%} of the {len(xy)} spots sit on tissue.{better} Check the scale factor (are the "
            "coordinates at this image's resolution?), the image choice (hires/lowres/full resolution, the right "
            "section) and the coordinate order (obsm['spatial'] is (x, y) = (column, row)).",
            stacklevel=stacklevel,
        )
    return frac
