"""10x Genomics Visium HD (Space Ranger output folder): one bin size, read with :func:`spatialdata_io.visium_hd`."""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd

from stemst._errors import StemstFileError
from stemst._logging import logger
from stemst._schema import StemstDataError
from stemst._utils import read_json
from stemst.io._image import as_uint8_rgb
from stemst.io._utils import build, check_section_name, require_files
from stemst.io._visium import FILTERED_COUNTS, IMAGE_FILES, SCALEFACTORS, _library_id, call_spatialdata_io
from stemst.io._visium import spots_with_position as _spots_with_position

FEATURE_SLICE = "feature_slice.h5"
POSITIONS_PARQUET = "tissue_positions.parquet"
#: spatialdata-io's suffix of the image elements, by stemst's image name
IMAGE_SUFFIXES = {"hires": "_hires_image", "lowres": "_lowres_image", "fullres": "_full_image"}
#: spatialdata-io's warnings about images stemst does not keep
_NO_FULLRES = "No full resolution image found"


def bin_key(bin_size: int) -> str:
    """Space Ranger's (and spatialdata-io's table) name of the bins of ``bin_size`` µm, e.g. ``square_016um``."""
    return f"square_{int(bin_size):03d}um"


def _element_data(element: Any) -> Any:
    """Return the ``(c, y, x)`` array of an image element (a pyramid's full resolution level)."""
    if hasattr(element, "children") and len(element.children):  # multiscale DataTree
        level = element[sorted(element.children)[0]]
        return next(iter(level.data_vars.values())).data
    return element.data


def _bin_diameter_px(shapes: Any, what: str) -> float:
    """Width of the bins in the shapes' pixels: circles (``radius``) or squares (polygons)."""
    if "radius" in shapes.columns:
        diameters = 2.0 * shapes["radius"].to_numpy(dtype=np.float64)
    else:
        bounds = shapes.geometry.bounds
        diameters = (bounds["maxx"] - bounds["minx"]).to_numpy(dtype=np.float64)
    if not len(diameters) or not np.all(np.isfinite(diameters)) or diameters.min() <= 0:
        raise StemstDataError(f"{what}: the bins have no positive width.")
    if np.ptp(diameters) > 1e-3 * diameters.max():
        raise StemstDataError(f"{what}: bins of different widths ({diameters.min():g}-{diameters.max():g} px).")
    return float(diameters[0])


def spots_from_bins(
    sdata: Any,
    *,
    bin_size: int = 16,
    section: str,
    image: Literal["hires", "lowres", "fullres"] = "hires",
    in_tissue_only: bool = True,
    var_names: Literal["gene_symbols", "gene_ids"] = "gene_symbols",
    source: str = "",
    stacklevel: int = 5,
) -> dict[str, Any]:
    """Turn one bin size of a :func:`spatialdata_io.visium_hd` object into the pieces of a stemst section.

    The bins become the spots: centre = bin centre, spot diameter = ``bin_size`` µm (the circle inscribed in the
    square bin). The pixel size is the bin size over the bins' width in full-resolution pixels (Space Ranger's
    ``spot_diameter_fullres``), and the kept image's scale to full resolution is its transformation to the dataset's
    coordinate system.

    Parameters
    ----------
    sdata
        What :func:`spatialdata_io.visium_hd` returns: table ``square_<bin>um`` annotating shapes
        ``<dataset_id>_square_<bin>um`` (circles or squares) with ``obsm["spatial"]`` the bin centres in
        full-resolution pixels, and images ``<dataset_id>_hires_image`` / ``_lowres_image`` / ``_full_image``.
    bin_size
        Bin size in µm.
    section, image, in_tissue_only, var_names
        As in :func:`stemst.io.visium_hd`.
    source
        Provenance stored with the section.
    stacklevel
        Passed to the warning about bins without a position.

    Returns
    -------
    Keyword arguments of :func:`stemst.io._utils.build`.
    """
    from spatialdata.transformations import get_transformation

    key = bin_key(bin_size)
    if key not in sdata.tables:
        raise StemstDataError(f"No table {key!r} (bins of {bin_size} µm); tables present: {list(sdata.tables)}.")
    table = sdata.tables[key]
    region = table.uns.get("spatialdata_attrs", {}).get("region")
    region = region[0] if isinstance(region, list | tuple) and len(region) == 1 else region
    if not isinstance(region, str) or region not in sdata.shapes or not region.endswith(f"_{key}"):
        raise StemstDataError(f"Table {key!r} does not annotate shapes '<dataset_id>_{key}' (region: {region!r}).")
    dataset_id = region[: -len(key) - 1]
    image_key = dataset_id + IMAGE_SUFFIXES[image]
    if image_key not in sdata.images:
        raise StemstDataError(
            f"No {image} image {image_key!r}; images present: {list(sdata.images)}."
            + (" Pass fullres_image_file= (the microscope image given to Space Ranger)." if image == "fullres" else "")
        )
    to_fullres = get_transformation(sdata.images[image_key], to_coordinate_system=dataset_id)
    m = to_fullres.to_affine_matrix(input_axes=("x", "y"), output_axes=("x", "y"))
    if not np.allclose([m[0, 1], m[1, 0], m[0, 2], m[1, 2]], 0) or min(m[0, 0], m[1, 1]) <= 0:
        raise StemstDataError(f"{image_key}: only a scaling to full resolution is supported, got {m[:2].tolist()}.")
    scale = (1.0 / m[0, 0], 1.0 / m[1, 1])
    bin_px = _bin_diameter_px(sdata.shapes[region], f"shapes {region!r}")

    names = pd.Index(table.obs_names.astype(str))
    if names.has_duplicates:
        raise StemstDataError(f"Table {key!r}: duplicate bin barcodes, e.g. {names[names.duplicated()][:5].tolist()}.")
    keep = _spots_with_position(
        table.obs.set_axis(names), table.obsm["spatial"], file=Path(POSITIONS_PARQUET), stacklevel=stacklevel
    )
    if in_tissue_only and "in_tissue" in table.obs.columns:
        keep &= pd.to_numeric(table.obs["in_tissue"], errors="coerce").to_numpy() == 1
    if not keep.any():
        raise StemstDataError(f"Table {key!r}: no bin in the tissue has a position.")
    genes = table.var["gene_ids"].astype(str).to_numpy() if var_names == "gene_ids" else table.var_names
    data = _element_data(sdata.images[image_key])
    pixels = as_uint8_rgb(data.transpose(1, 2, 0), what=image_key)
    if image != "fullres":
        pixels = np.asarray(pixels)  # small: in memory, so the reader checks that the bins sit on tissue
    obs = table.obs.loc[keep, [c for c in ("array_row", "array_col") if c in table.obs.columns]]
    return {
        "section": section,
        "image": pixels,
        "counts": table.X[keep],
        "genes": genes,
        "spot_ids": names[keep],
        "coords_fullres": np.asarray(table.obsm["spatial"], dtype=np.float64)[keep],
        "scale": scale,
        "microns_per_fullres_pixel": float(bin_size) / bin_px,
        "spot_diameter_um": float(bin_size),
        "source": source,
        "image_label": f"{image} image of the Visium HD folder",
        "obs": obs.astype(np.int32).set_axis(names[keep]),
        "extra": {"platform": "10x Visium HD", "bin_size_um": int(bin_size), "image": image},
    }


def _check_options(path: Path, image: str, var_names: str, fullres_image_file: Any) -> None:
    """Refuse a path that is not a folder and options that are not known or do not go together."""
    if not path.is_dir():
        raise FileNotFoundError(f"{path} is not a folder; expected a Visium HD Space Ranger output folder (.../outs).")
    if image not in IMAGE_SUFFIXES:
        raise ValueError(f"image={image!r}; valid values: {list(IMAGE_SUFFIXES)}.")
    if var_names not in ("gene_symbols", "gene_ids"):
        raise ValueError(f"var_names={var_names!r}; valid values: 'gene_symbols', 'gene_ids'.")
    if fullres_image_file is not None and image != "fullres":
        raise ValueError(f"`fullres_image_file` is only used with image='fullres', not image={image!r}.")


def _layout(
    path: Path, bin_size: float, image: str, fullres_image_file: str | os.PathLike | None
) -> tuple[Path, str | None, dict[str, Path]]:
    """Return the bin folder, the file prefix of the run (or ``None``) and the files to read, by what they hold."""
    bins = path / "binned_outputs" / bin_key(bin_size)
    if not bins.is_dir():
        present = sorted(p.name for p in (path / "binned_outputs").glob("square_*um") if p.is_dir())
        raise FileNotFoundError(f"No bins of {bin_size} µm: {bins} is missing; bin folders present: {present}.")
    prefixed = sorted(path.glob(f"*_{FEATURE_SLICE}"))
    prefix = prefixed[0].name[: -len(FEATURE_SLICE) - 1] if len(prefixed) == 1 else None
    files = {
        "layout metadata, HDF5": path / FEATURE_SLICE if prefix is None else prefixed[0],
        "counts matrix, 10x HDF5": bins / FILTERED_COUNTS,
        "bin positions, Parquet": bins / "spatial" / POSITIONS_PARQUET,
        "scale factors, JSON": bins / "spatial" / SCALEFACTORS,
    }
    if image != "fullres":
        files[f"{image} H&E image"] = path / "spatial" / IMAGE_FILES[image]
    elif fullres_image_file is not None:
        given = Path(fullres_image_file)
        files["full-resolution H&E image"] = given if given.is_absolute() else path / given
    return bins, prefix, files


def visium_hd(
    path: str | os.PathLike,
    bin_size: int = 16,
    *,
    section: str | None = None,
    image: Literal["hires", "lowres", "fullres"] = "hires",
    fullres_image_file: str | os.PathLike | None = None,
    in_tissue_only: bool = True,
    var_names: Literal["gene_symbols", "gene_ids"] = "gene_symbols",
) -> Any:
    """Read one bin size of a 10x Genomics Visium HD Space Ranger folder, the bins as spots, in the stemst data model.

    The folder is read by :func:`spatialdata_io.visium_hd`; stemst keeps the bins of ``bin_size`` µm as its spots
    (centre = bin centre, diameter = ``bin_size``), drops the odd bin without a position (with a warning), keeps the
    in-tissue bins and derives the pixel size from the scale factors (bin size over ``spot_diameter_fullres``).
    Files read (names as Space Ranger writes them):

    - ``<path>/feature_slice.h5`` (or ``<prefix>_feature_slice.h5``): the layout metadata spatialdata-io needs.
    - ``<path>/binned_outputs/square_<bin>um/filtered_feature_bc_matrix.h5``: counts per bin, 10x HDF5.
    - ``<path>/binned_outputs/square_<bin>um/spatial/tissue_positions.parquet``: bin centres in full-resolution
      pixels, and ``spatial/scalefactors_json.json`` with ``bin_size_um`` and ``spot_diameter_fullres``.
    - the image: ``<path>/spatial/tissue_hires_image.png`` or ``tissue_lowres_image.png``, or with
      ``image="fullres"`` the microscope image (``fullres_image_file``, else the one in ``microscope_image/``).

    Parameters
    ----------
    path
        Space Ranger output folder (usually ``.../outs``).
    bin_size
        Bin size in µm; Space Ranger writes 2, 8 and 16. Small bins make many spots: 16 µm bins are close to
        single-cell scale and still cheap to embed.
    section
        Section name. Defaults to the prefix of ``<prefix>_feature_slice.h5``, else the folder's name (its parent's
        for ``outs``).
    image
        Which image to keep. Bin centres are scaled to it and ``microns_per_pixel`` refers to it.
    fullres_image_file
        Full-resolution image, absolute or relative to ``path``, for ``image="fullres"``.
    in_tissue_only
        Keep only bins marked ``in_tissue == 1``.
    var_names
        Name genes by symbol (made unique) or by Ensembl id.

    Returns
    -------
    :class:`~spatialdata.SpatialData` with one section in the stemst data model.

    Raises
    ------
    FileNotFoundError
        If a file above is missing, or there are no bins of ``bin_size`` (the message lists the bin sizes present).
    StemstDataError
        If bins lack positions, fall outside the image, or counts are not raw integers.
    StemstFileError
        If a file cannot be read.

    Examples
    --------
    With Space Ranger's output folder of a Visium HD sample (not shipped with stemst)::

        import stemst
        sdata = stemst.io.visium_hd("Visium_HD_Human_Colon_Cancer/outs", bin_size=16)
        stemst.io.validate(sdata)
    """
    import spatialdata_io

    path = Path(path)
    _check_options(path, image, var_names, fullres_image_file)
    bins, prefix, files = _layout(path, bin_size, image, fullres_image_file)
    counts_path = files["counts matrix, 10x HDF5"]
    fullres_image_file = files.get("full-resolution H&E image")
    require_files(files, hint="Expected a Visium HD Space Ranger output folder (see stemst.io.visium_hd).")
    factors = read_json(bins / "spatial" / SCALEFACTORS, what="Space Ranger scale factors")
    if factors.get("bin_size_um") is not None and float(factors["bin_size_um"]) != float(bin_size):
        raise StemstFileError(
            bins / "spatial" / SCALEFACTORS, f"bin_size_um is {factors['bin_size_um']}, expected {bin_size}."
        )
    _library_id(counts_path)  # a truncated or foreign counts file, named
    if section is None:
        section = prefix or (path.parent.name if path.name == "outs" else path.name)
    section = check_section_name(section)

    with warnings.catch_warnings():
        if image != "fullres":
            warnings.filterwarnings("ignore", message=_NO_FULLRES)
        raw = call_spatialdata_io(
            spatialdata_io.visium_hd,
            path,
            "Visium HD folder (read by spatialdata_io.visium_hd)",
            dataset_id=prefix or section,
            load_segmentations_only=False,
            bin_size=int(bin_size),
            bins_as_squares=False,
            fullres_image_file=fullres_image_file,
        )
    parts = spots_from_bins(
        raw,
        bin_size=bin_size,
        section=section,
        image=image,
        in_tissue_only=in_tissue_only,
        var_names=var_names,
        source=str(path.resolve()),
    )
    parts["image_label"] = str(files.get(f"{image} H&E image", fullres_image_file or "microscope image"))
    logger.info("Visium HD %s: %d bins of %d µm, %s image", section, len(parts["spot_ids"]), bin_size, image)
    return build(**parts)
