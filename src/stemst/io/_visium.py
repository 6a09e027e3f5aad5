"""10x Genomics Visium (Space Ranger output folder), read with :func:`spatialdata_io.visium` and checked by stemst."""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal, NoReturn

import numpy as np
import pandas as pd

from stemst._errors import StemstFileError, warn
from stemst._logging import logger
from stemst._schema import StemstDataError
from stemst._utils import read_json, reading
from stemst.io._image import read_image
from stemst.io._utils import build, check_section_name, positive_number, require_files

VISIUM_SPOT_DIAMETER_UM = 55.0
FILTERED_COUNTS = "filtered_feature_bc_matrix.h5"
#: Space Ranger 1, then >= 2; looked for in spatialdata-io's order
POSITIONS_FILES = ("tissue_positions_list.csv", "tissue_positions.csv")
SCALEFACTORS = "scalefactors_json.json"
IMAGE_FILES = {"hires": "tissue_hires_image.png", "lowres": "tissue_lowres_image.png"}
#: obs columns spatialdata-io merges in from the positions file
POSITION_COLUMNS = ["in_tissue", "array_row", "array_col"]
#: spots with counts but no position beyond this fraction mean mismatched files or a positions file cut short
MAX_UNPLACED = 0.01
#: another image to try when the chosen one is blank
BLANK_HINTS = {
    "hires": "Try the other images of the folder: image='lowres', or image='fullres' with fullres_image_file=.",
    "lowres": "Try image='hires', or image='fullres' with fullres_image_file=.",
    "fullres": "Try image='hires' or image='lowres', or check fullres_image_file.",
}
#: spatialdata-io's warning about a column it converts itself; not something the user can act on
_SDIO_NOISE = "Converting `region_key: region` to categorical dtype"


def _counts_file(path: Path, counts_file: str) -> Path:
    """``counts_file`` in ``path``, or the single ``<prefix>_<counts_file>`` (as in 10x's public downloads)."""
    exact = path / counts_file
    if exact.is_file():
        return exact
    prefixed = sorted(path.glob(f"*_{counts_file}"))
    return prefixed[0] if len(prefixed) == 1 else exact


def _positions_file(spatial: Path) -> Path:
    for name in POSITIONS_FILES:
        if (spatial / name).is_file():
            return spatial / name
    raise FileNotFoundError(
        f"Missing file: {spatial / POSITIONS_FILES[0]} or {spatial / POSITIONS_FILES[1]} "
        "(spot positions from Space Ranger's spatial/ folder)."
    )


def _listed_spots(file: Path) -> pd.Series:
    """``in_tissue`` of every barcode the positions file lists, for the counts-vs-positions checks.

    spatialdata-io reads the positions of the barcodes that have counts; the spots it leaves out (in tissue but
    without counts) and incomplete rows (a truncated copy) are only visible in the file itself.
    """
    with reading(file, "spot positions CSV"):
        df = pd.read_csv(file, header=None, usecols=[0, 1], names=["barcode", "in_tissue"], dtype=str)
    if len(df) and df["in_tissue"].iloc[0] == "in_tissue":  # header (Space Ranger >= 2)
        df = df.iloc[1:]
    in_tissue = pd.to_numeric(df["in_tissue"], errors="coerce")
    bad = in_tissue.isna().to_numpy()
    if bad.any():
        _incomplete(file, int(bad.sum()), df["barcode"].iloc[int(np.flatnonzero(bad)[0])])
    barcodes = df["barcode"].astype(str)
    if barcodes.duplicated().any():
        dup = barcodes[barcodes.duplicated()].unique()[:5].tolist()
        raise StemstDataError(f"{file}: duplicate spot barcodes, e.g. {dup}.")
    return pd.Series(in_tissue.to_numpy(), index=pd.Index(barcodes.to_numpy()), name="in_tissue")


def _incomplete(file: Path, n: int, example: Any) -> NoReturn:
    raise StemstFileError(
        file,
        f"{n} row(s) with missing or non-numeric values, e.g. the row of barcode {str(example)!r}. "
        "Is the file truncated? Copy it again from Space Ranger's spatial/ folder.",
    )


def _check_scalefactors(file: Path, keys: Sequence[str]) -> dict[str, float]:
    """Return the positive numbers ``keys`` of a Space Ranger scale factors file, with errors naming it."""
    scalefactors = read_json(file, what="Space Ranger scale factors")
    missing = [k for k in keys if k not in scalefactors]
    if missing:
        raise StemstFileError(file, f"missing keys {missing}; keys present: {sorted(scalefactors)}.")
    values = {k: positive_number(scalefactors[k]) for k in keys}
    bad = {k: scalefactors[k] for k, v in values.items() if v is None}
    if bad:
        raise StemstFileError(file, f"{bad} must be positive numbers.")
    return values  # type: ignore[return-value]


def _check_colour_pngs(spatial: Path) -> None:
    """Refuse the greyscale PNGs that :func:`spatialdata_io.visium` cannot read, naming the file."""
    from PIL import Image

    for name in IMAGE_FILES.values():
        file = spatial / name
        if not file.is_file():
            continue
        with reading(file, "image"), Image.open(file) as im:
            mode = im.mode
        if mode in ("1", "L", "LA", "I", "F") or mode.startswith("I;"):
            raise StemstFileError(
                file,
                f"is a greyscale image (mode {mode!r}); spatialdata_io.visium, which reads Visium folders for stemst, "
                "needs colour PNGs. H&E is a colour image: is this the right file (not a mask or a single channel)? "
                "To use it anyway, save it as RGB.",
            )


def spots_with_position(
    obs: pd.DataFrame, xy: np.ndarray, *, file: Path, listed: pd.Index | None = None, stacklevel: int = 4
) -> np.ndarray:
    """Mask of the spots that have a position: a few without one are dropped with a warning, more raise.

    Up to :data:`MAX_UNPLACED` of the spots may lack a position (dropped, with a warning naming them). More mean
    that the files do not belong together or that the positions file was cut short at a line end; a row the file
    holds but incompletely (cut short mid-row, or edited) is refused too.

    Parameters
    ----------
    obs
        The table's ``obs`` as a spatialdata-io reader returns it (positions file columns merged in).
    xy
        The table's ``obsm["spatial"]``.
    file
        The positions file, for messages.
    listed
        Barcodes the positions file lists; a listed barcode with a missing value is a damaged file (an error), an
        unlisted one a spot without a position (dropped). ``None``: every spot without a position is dropped.
    stacklevel
        Passed to the warning (4: the caller's caller).

    Returns
    -------
    Boolean mask over the rows of ``obs``.
    """
    values = obs[[c for c in POSITION_COLUMNS if c in obs.columns]].apply(pd.to_numeric, errors="coerce")
    xy = np.asarray(xy, dtype=np.float64)
    placed = np.isfinite(xy).all(axis=1) & values.notna().all(axis=1).to_numpy()
    if listed is not None:
        damaged = ~placed & obs.index.isin(listed)
        if damaged.any():
            _incomplete(file, int(damaged.sum()), obs.index[damaged][0])
    unplaced = int((~placed).sum())
    if unplaced > MAX_UNPLACED * len(obs):
        raise StemstDataError(
            f"{unplaced} of the {len(obs)} barcodes with counts have no position in {file.name}, e.g. "
            f"{obs.index[~placed][:5].tolist()}. Is {file.name} complete (not cut short), and do the counts and the "
            "positions come from the same Space Ranger run?"
        )
    if unplaced:
        warn(
            f"{unplaced} of {len(obs)} barcodes with counts have no position in {file.name}, e.g. "
            f"{obs.index[~placed][:5].tolist()}; they are dropped. Do the counts and the positions come from the same "
            "Space Ranger run?",
            stacklevel=stacklevel,
        )
    return placed


def call_spatialdata_io(reader: Any, path: Path, what: str, **kwargs: Any) -> Any:
    """Run a spatialdata-io ``reader``; any failure becomes a :class:`~stemst.StemstFileError` naming ``path``."""
    with reading(path, what), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=_SDIO_NOISE)
        return reader(path, **kwargs)


def _image_file(path: Path, image: str, fullres_image_file: str | os.PathLike | None, var_names: str) -> Path:
    """Check the reader's options; return the image file to keep."""
    if not path.is_dir():
        raise FileNotFoundError(f"{path} is not a folder; expected a Space Ranger output folder (.../outs).")
    if image not in ("hires", "lowres", "fullres"):
        raise ValueError(f"image={image!r}; valid values: 'hires', 'lowres', 'fullres'.")
    if var_names not in ("gene_symbols", "gene_ids"):
        raise ValueError(f"var_names={var_names!r}; valid values: 'gene_symbols', 'gene_ids'.")
    if image != "fullres":
        if fullres_image_file is not None:
            raise ValueError(f"`fullres_image_file` is only used with image='fullres', not image={image!r}.")
        return path / "spatial" / IMAGE_FILES[image]
    if fullres_image_file is None:
        raise ValueError("image='fullres' needs `fullres_image_file` (the image given to Space Ranger).")
    image_file = Path(fullres_image_file)
    return image_file if image_file.is_absolute() else path / image_file


def _checked_spots(
    adata: Any, counts_path: Path, positions_file: Path, listed: pd.Series, *, var_names: str, in_tissue_only: bool
) -> Any:
    """Return the spots spatialdata-io read, checked against the positions file and kept as the options say."""
    if adata.n_vars == 0:
        raise StemstFileError(
            counts_path,
            f"holds no genes ({adata.n_obs} barcodes x 0 features): nothing to train on or predict. Use the counts "
            "matrix Space Ranger wrote for this run (filtered_feature_bc_matrix.h5), copied whole.",
        )
    adata.obs_names = adata.obs_names.astype(str)
    if adata.obs_names.has_duplicates:
        dup = adata.obs_names[adata.obs_names.duplicated()][:5].tolist()
        raise StemstDataError(f"{counts_path}: duplicate barcodes, e.g. {dup}.")
    if var_names == "gene_ids":
        adata.var_names = adata.var["gene_ids"].astype(str).to_numpy()
    no_counts = listed.index[listed.to_numpy() == 1].difference(adata.obs_names)
    if len(no_counts) and in_tissue_only:
        raise StemstDataError(
            f"{len(no_counts)} in-tissue spots listed in {positions_file.name} have no counts in "
            f"{counts_path.name}, e.g. {no_counts[:5].tolist()}. Do the two files come from the same run?"
        )
    keep = spots_with_position(adata.obs, adata.obsm["spatial"], file=positions_file, listed=listed.index)
    if in_tissue_only:
        outside = keep & (pd.to_numeric(adata.obs["in_tissue"], errors="coerce").to_numpy() != 1)
        if outside.any():
            logger.info("Dropping %d spots outside the tissue", int(outside.sum()))
        keep &= ~outside
    return adata[keep]


def visium(
    path: str | os.PathLike,
    *,
    section: str | None = None,
    image: Literal["hires", "lowres", "fullres"] = "hires",
    fullres_image_file: str | os.PathLike | None = None,
    counts_file: str = FILTERED_COUNTS,
    spot_diameter_um: float = VISIUM_SPOT_DIAMETER_UM,
    in_tissue_only: bool = True,
    var_names: Literal["gene_symbols", "gene_ids"] = "gene_symbols",
) -> Any:
    """Read a 10x Genomics Visium Space Ranger output folder in the stemst data model.

    Counts and spot positions are read by :func:`spatialdata_io.visium`; stemst checks them, reads the one image it
    keeps with its own reader (any bit depth or mode; TIFFs lazily) and lays the section out in its data model.
    Files read (names as Space Ranger writes them):

    - ``<path>/filtered_feature_bc_matrix.h5`` (or ``counts_file``; a single ``<prefix>_<counts_file>`` is also
      found): raw UMI counts, 10x HDF5 format.
    - ``<path>/spatial/tissue_positions.csv`` (Space Ranger >= 2, with header) or
      ``spatial/tissue_positions_list.csv`` (Space Ranger 1, no header): barcode, in_tissue, array_row, array_col,
      pxl_row_in_fullres, pxl_col_in_fullres.
    - ``<path>/spatial/scalefactors_json.json``: ``tissue_hires_scalef``, ``tissue_lowres_scalef``,
      ``spot_diameter_fullres``.
    - the image: ``spatial/tissue_hires_image.png``, ``spatial/tissue_lowres_image.png`` or, with
      ``image="fullres"``, ``fullres_image_file`` (the microscope image given to Space Ranger; TIFFs are read lazily).

    On top of spatialdata-io, stemst drops the odd spot with counts but no position (with a warning;
    spatialdata-io keeps them with NaN coordinates) and refuses more than a few (:data:`MAX_UNPLACED`), checks that
    every in-tissue spot has counts, refuses incomplete rows of the positions file, derives the pixel size from the
    scale factors and keeps only the in-tissue spots.

    Parameters
    ----------
    path
        Space Ranger output folder (usually ``.../outs``).
    section
        Section name (coordinate system and element prefix). Defaults to the library id stored in the counts
        file, else the folder's name (its parent's for ``outs``).
    image
        Which image to keep. Spot coordinates are scaled to it and ``microns_per_pixel`` refers to it.
    fullres_image_file
        Full-resolution image, absolute or relative to ``path``; needed for ``image="fullres"``.
    counts_file
        Counts file name inside ``path``; e.g. ``"raw_feature_bc_matrix.h5"``.
    spot_diameter_um
        Physical spot diameter. With ``spot_diameter_fullres`` from the scale factors it fixes the pixel size:
        ``microns_per_pixel = spot_diameter_um / spot_diameter_fullres / scalef``.
    in_tissue_only
        Keep only spots marked ``in_tissue == 1``. Spots with counts outside the tissue (a raw matrix) are dropped.
    var_names
        Name genes by symbol (made unique by appending ``-1``, ``-2``, ...) or by Ensembl id.

    Returns
    -------
    :class:`~spatialdata.SpatialData` with one section in the stemst data model.

    Raises
    ------
    FileNotFoundError
        If a file above is missing.
    StemstDataError
        If counts and positions disagree (in-tissue spots without counts, many spots without a position), spots fall
        outside the image, or counts are not raw integers.
    StemstFileError
        If a file cannot be read (truncated, corrupt, a greyscale PNG that spatialdata-io cannot read), or the counts
        matrix holds no genes.

    Warns
    -----
    StemstWarning
        If some spots with counts have no position (they are dropped), or most spots sit off the tissue.

    Examples
    --------
    With Space Ranger's output folder of a sample (not shipped with stemst)::

        import stemst
        sdata = stemst.io.visium("V1_Breast_Cancer_Block_A_Section_1/outs", section="BC1")
        stemst.io.validate(sdata)
    """
    path = Path(path)
    image_file = _image_file(path, image, fullres_image_file, var_names)
    spatial = path / "spatial"
    counts_path = _counts_file(path, counts_file)
    require_files(
        {
            "counts matrix, 10x HDF5": counts_path,
            "scale factors, JSON": spatial / SCALEFACTORS,
            f"{image} H&E image": image_file,
        },
        hint="Expected a Space Ranger output folder (see stemst.io.visium's docstring for the layout).",
    )
    positions_file = _positions_file(spatial)
    # checked here so that problems are named by file; spatialdata-io needs both image scale factors
    factors = _check_scalefactors(
        spatial / SCALEFACTORS, ["spot_diameter_fullres", "tissue_hires_scalef", "tissue_lowres_scalef"]
    )
    scale = 1.0 if image == "fullres" else factors[f"tissue_{image}_scalef"]
    listed = _listed_spots(positions_file)
    library_id = _library_id(counts_path)
    if section is None:
        section = library_id or (path.parent.name if path.name == "outs" else path.name)
    section = check_section_name(section)
    _check_colour_pngs(spatial)
    img, _ = read_image(image_file)

    import spatialdata_io

    raw = call_spatialdata_io(
        spatialdata_io.visium,
        path,
        "Space Ranger folder (read by spatialdata_io.visium)",
        dataset_id=section,
        counts_file=counts_path.name,
        tissue_positions_file=positions_file.relative_to(path),
    )
    adata = _checked_spots(
        raw.tables["table"], counts_path, positions_file, listed, var_names=var_names, in_tissue_only=in_tissue_only
    )
    logger.info("Visium %s: %d spots, %d genes, %s image %s", section, adata.n_obs, adata.n_vars, image, img.shape)
    return build(
        section,
        image=img,
        counts=adata.X,
        genes=adata.var_names,
        spot_ids=adata.obs_names,
        coords_fullres=np.asarray(adata.obsm["spatial"], dtype=np.float64),
        scale=(scale, scale),
        microns_per_fullres_pixel=spot_diameter_um / factors["spot_diameter_fullres"],
        spot_diameter_um=spot_diameter_um,
        source=str(path.resolve()),
        image_label=f"{image_file}, scale factor "
        + ("1 (full resolution)" if image == "fullres" else f"'tissue_{image}_scalef'"),
        obs=adata.obs[["array_row", "array_col"]].astype(np.int32),
        extra={"platform": "10x Visium", "image": image, "library_id": library_id or ""},
        blank_hint=BLANK_HINTS[image],
    )


def _library_id(counts_path: Path) -> str | None:
    """Return the library id of a 10x HDF5 file (``None`` if absent); opening it catches a truncated copy."""
    import h5py

    with reading(counts_path, "10x HDF5 counts matrix"), h5py.File(counts_path, "r") as f:
        if "matrix" not in f:
            raise StemstFileError(counts_path, f"no 'matrix' group (groups: {list(f)}); is it a 10x HDF5 file?")
        ids = f.attrs.get("library_ids")
        if ids is not None and len(ids):
            return ids[0].decode() if isinstance(ids[0], bytes) else str(ids[0])
    return None
