"""10x Genomics Visium (Space Ranger output folder)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd

from stemst._errors import StemstFileError
from stemst._logging import logger
from stemst._schema import StemstDataError
from stemst._utils import read_json, reading
from stemst.io._image import read_image
from stemst.io._utils import build, check_section_name, positive_number, require_files

VISIUM_SPOT_DIAMETER_UM = 55.0
FILTERED_COUNTS = "filtered_feature_bc_matrix.h5"
POSITIONS_FILES = ("tissue_positions.csv", "tissue_positions_list.csv")
POSITION_COLUMNS = ["barcode", "in_tissue", "array_row", "array_col", "pxl_row_in_fullres", "pxl_col_in_fullres"]
SCALEFACTORS = "scalefactors_json.json"
IMAGE_FILES = {"hires": "tissue_hires_image.png", "lowres": "tissue_lowres_image.png"}


def _counts_file(path: Path, counts_file: str) -> Path:
    """``counts_file`` in ``path``, or the single ``<prefix>_<counts_file>`` (as in 10x's public downloads)."""
    exact = path / counts_file
    if exact.is_file():
        return exact
    prefixed = sorted(path.glob(f"*_{counts_file}"))
    return prefixed[0] if len(prefixed) == 1 else exact


def _read_positions(spatial: Path) -> tuple[pd.DataFrame, Path]:
    """Spot positions, indexed by barcode, from Space Ranger >= 2 (with header) or < 2 (without) files."""
    for name in POSITIONS_FILES:
        file = spatial / name
        if file.is_file():
            with reading(file, "spot positions CSV"):
                with file.open() as f:
                    has_header = "in_tissue" in f.readline()
                df = pd.read_csv(file, header=0 if has_header else None)
            if not has_header:
                if df.shape[1] != len(POSITION_COLUMNS):
                    raise StemstDataError(
                        f"{file}: expected {len(POSITION_COLUMNS)} columns {POSITION_COLUMNS}, got {df.shape[1]}."
                    )
                df.columns = POSITION_COLUMNS
            missing = [c for c in POSITION_COLUMNS if c not in df.columns]
            if missing:
                raise StemstDataError(f"{file}: missing columns {missing}; columns present: {list(df.columns)}.")
            numeric = df[POSITION_COLUMNS[1:]].apply(pd.to_numeric, errors="coerce")
            incomplete = numeric.isna().any(axis=1).to_numpy()
            if incomplete.any():
                raise StemstFileError(
                    file,
                    f"{int(incomplete.sum())} row(s) with missing or non-numeric values, e.g. row "
                    f"{int(np.flatnonzero(incomplete)[0]) + 1}: {df.iloc[int(np.flatnonzero(incomplete)[0])].tolist()}. "
                    "Is the file truncated? Copy it again from Space Ranger's spatial/ folder.",
                )
            df[POSITION_COLUMNS[1:]] = numeric
            df["barcode"] = df["barcode"].astype(str)
            if df["barcode"].duplicated().any():
                dup = df.loc[df["barcode"].duplicated(), "barcode"].unique()[:5].tolist()
                raise StemstDataError(f"{file}: duplicate spot barcodes, e.g. {dup}.")
            return df.set_index("barcode"), file
    raise FileNotFoundError(
        f"Missing file: {spatial / POSITIONS_FILES[0]} or {spatial / POSITIONS_FILES[1]} "
        "(spot positions from Space Ranger's spatial/ folder)."
    )


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

    The files are read directly rather than through :func:`spatialdata_io.visium`, which keeps spots whose
    position is missing (NaN coordinates) and does not check that counts and positions agree.

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
        If counts and positions disagree (in-tissue spots without counts, counts without positions), spots fall
        outside the image, or counts are not raw integers.

    Examples
    --------
    >>> import stemst
    >>> sdata = stemst.io.visium("V1_Breast_Cancer_Block_A_Section_1/outs", section="BC1")  # doctest: +SKIP
    >>> stemst.io.validate(sdata)  # doctest: +SKIP
    """
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"{path} is not a folder; expected a Space Ranger output folder (.../outs).")
    if image not in ("hires", "lowres", "fullres"):
        raise ValueError(f"image={image!r}; valid values: 'hires', 'lowres', 'fullres'.")
    if var_names not in ("gene_symbols", "gene_ids"):
        raise ValueError(f"var_names={var_names!r}; valid values: 'gene_symbols', 'gene_ids'.")
    if image == "fullres":
        if fullres_image_file is None:
            raise ValueError("image='fullres' needs `fullres_image_file` (the image given to Space Ranger).")
        image_file = Path(fullres_image_file)
        image_file = image_file if image_file.is_absolute() else path / image_file
    elif fullres_image_file is not None:
        raise ValueError(f"`fullres_image_file` is only used with image='fullres', not image={image!r}.")
    else:
        image_file = path / "spatial" / IMAGE_FILES[image]
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
    positions, positions_file = _read_positions(spatial)
    import h5py
    import scanpy as sc

    scalefactors_file = spatial / SCALEFACTORS
    scalefactors = read_json(scalefactors_file, what="Space Ranger scale factors")
    needed = ["spot_diameter_fullres"] + ([] if image == "fullres" else [f"tissue_{image}_scalef"])
    missing = [k for k in needed if k not in scalefactors]
    if missing:
        raise StemstFileError(scalefactors_file, f"missing keys {missing}; keys present: {sorted(scalefactors)}.")
    values = {k: positive_number(scalefactors[k]) for k in needed}
    bad = {k: scalefactors[k] for k, v in values.items() if v is None}
    if bad:
        raise StemstFileError(scalefactors_file, f"{bad} must be positive numbers.")
    scale = 1.0 if image == "fullres" else values[f"tissue_{image}_scalef"]
    spot_diameter_fullres = values["spot_diameter_fullres"]

    with reading(counts_path, "10x HDF5 counts matrix"):
        adata = sc.read_10x_h5(counts_path)
    if var_names == "gene_ids":
        adata.var_names = adata.var["gene_ids"].astype(str).to_numpy()
    if adata.var_names.has_duplicates:
        logger.info("%s: making %d duplicated gene names unique", counts_path.name, adata.var_names.duplicated().sum())
        adata.var_names_make_unique()
    barcodes = pd.Index(adata.obs_names.astype(str))
    if barcodes.has_duplicates:
        raise StemstDataError(
            f"{counts_path}: duplicate barcodes, e.g. {barcodes[barcodes.duplicated()][:5].tolist()}."
        )

    no_position = barcodes.difference(positions.index)
    if len(no_position):
        raise StemstDataError(
            f"{len(no_position)} barcodes in {counts_path.name} have no position in {positions_file.name}, "
            f"e.g. {no_position[:5].tolist()}. Do the two files come from the same Space Ranger run?"
        )
    wanted = positions[positions["in_tissue"] == 1] if in_tissue_only else positions
    no_counts = wanted.index.difference(barcodes)
    if len(no_counts) and in_tissue_only:
        raise StemstDataError(
            f"{len(no_counts)} in-tissue spots listed in {positions_file.name} have no counts in "
            f"{counts_path.name}, e.g. {no_counts[:5].tolist()}. Do the two files come from the same run?"
        )
    keep = barcodes.isin(wanted.index)
    if not keep.all():
        logger.info("Dropping %d spots outside the tissue", int((~keep).sum()))
        adata = adata[keep]
        barcodes = barcodes[keep]
    pos = positions.loc[barcodes]

    library_id = None
    with reading(counts_path, "10x HDF5 counts matrix"), h5py.File(counts_path, "r") as f:
        ids = f.attrs.get("library_ids")
        if ids is not None and len(ids):
            library_id = ids[0].decode() if isinstance(ids[0], bytes) else str(ids[0])
    if section is None:
        section = library_id or (path.parent.name if path.name == "outs" else path.name)
    section = check_section_name(section)

    img, _ = read_image(image_file)
    logger.info("Visium %s: %d spots, %d genes, %s image %s", section, len(barcodes), adata.n_vars, image, img.shape)
    return build(
        section,
        image=img,
        counts=adata.X,
        genes=adata.var_names,
        spot_ids=barcodes,
        coords_fullres=pos[["pxl_col_in_fullres", "pxl_row_in_fullres"]].to_numpy(dtype=np.float64),
        scale=(scale, scale),
        microns_per_fullres_pixel=spot_diameter_um / spot_diameter_fullres,
        spot_diameter_um=spot_diameter_um,
        source=str(path.resolve()),
        image_label=f"{image_file}, scale factor {'1 (full resolution)' if image == 'fullres' else needed[1]!r}",
        obs=pos[["array_row", "array_col"]].astype(np.int32),
        extra={"platform": "10x Visium", "image": image, "library_id": library_id or ""},
    )
