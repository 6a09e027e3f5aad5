"""HEST-1k samples (Jaume et al., NeurIPS 2024; https://huggingface.co/datasets/MahmoodLab/hest)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from stemst._logging import logger
from stemst._schema import StemstDataError
from stemst._utils import read_json, reading
from stemst.io._image import read_image
from stemst.io._utils import build, check_section_name, counts_matrix, obs_columns, positive_number, require_files

#: metadata keys holding the WSI's pixel size, in order of preference (HEST's own reader uses the estimate)
PIXEL_SIZE_KEYS = ("pixel_size_um_estimated", "pixel_size_um_embedded")
#: spot diameter (µm) by ``st_technology`` when the metadata has no ``spot_diameter``
TECHNOLOGY_SPOT_DIAMETER_UM = {"visium": 55.0, "spatial transcriptomics": 100.0}


def hest(
    root: str | os.PathLike,
    sample_id: str,
    *,
    section: str | None = None,
    level: int = 0,
    layer: str | None = None,
    microns_per_pixel: float | None = None,
    spot_diameter_um: float | None = None,
) -> Any:
    """Read one HEST-1k sample in the stemst data model.

    Files read, as laid out by HEST's download (``root`` holds the folders):

    - ``wsis/<sample_id>.tif``: the whole-slide H&E image (pyramidal or plain TIFF), read lazily.
    - ``st/<sample_id>.h5ad``: counts in ``X`` (or ``layer``), spot centres in full-resolution WSI pixels
      in ``obsm["spatial"]`` as ``(x, y)``.
    - ``metadata/<sample_id>.json``: pixel size ``pixel_size_um_estimated`` (else ``pixel_size_um_embedded``),
      spot diameter ``spot_diameter`` (µm; else from ``st_technology``: Visium 55 µm, legacy ST 100 µm).

    Parameters
    ----------
    root
        Folder with HEST's ``wsis/``, ``st/`` and ``metadata/`` folders.
    sample_id
        Sample id, e.g. ``"TENX95"``.
    section
        Section name; defaults to ``sample_id``.
    level
        Pyramid level of the WSI to keep (0 = full resolution); coordinates and pixel size follow.
    layer
        Layer of the h5ad holding raw counts; ``X`` if ``None``.
    microns_per_pixel
        Full-resolution pixel size, overriding the metadata.
    spot_diameter_um
        Spot diameter, overriding the metadata.

    Returns
    -------
    :class:`~spatialdata.SpatialData` with one section in the stemst data model.

    Raises
    ------
    FileNotFoundError
        If one of the three files is missing.
    StemstDataError
        If the pixel size or spot diameter cannot be found, spots fall outside the image, or counts are not raw.

    Examples
    --------
    With a HEST-1k download (not shipped with stemst)::

        import stemst
        sdata = stemst.io.hest("hest_data", "TENX95", level=1)
    """
    import anndata as ad

    root = Path(root)
    sample_id = str(sample_id)
    wsi = root / "wsis" / f"{sample_id}.tif"
    st = root / "st" / f"{sample_id}.h5ad"
    meta_file = root / "metadata" / f"{sample_id}.json"
    require_files(
        {"whole-slide H&E image": wsi, "spots x genes counts with obsm['spatial']": st, "sample metadata": meta_file},
        hint="Expected HEST-1k's layout: <root>/wsis, <root>/st, <root>/metadata.",
    )
    section = check_section_name(sample_id if section is None else section)
    meta = read_json(meta_file, what="HEST sample metadata")

    mpp = positive_number(microns_per_pixel)
    if microns_per_pixel is not None and mpp is None:
        raise StemstDataError(f"microns_per_pixel must be a positive number, got {microns_per_pixel!r}.")
    for key in PIXEL_SIZE_KEYS:
        if mpp is None:
            mpp = positive_number(meta.get(key))
    if mpp is None:
        raise StemstDataError(
            f"{meta_file}: no pixel size (keys {list(PIXEL_SIZE_KEYS)} absent or empty); "
            "pass `microns_per_pixel=` (µm per full-resolution pixel)."
        )
    diameter = (
        positive_number(spot_diameter_um)
        if spot_diameter_um is not None
        else positive_number(meta.get("spot_diameter"))
    )
    technology = str(meta.get("st_technology", ""))
    if diameter is None and spot_diameter_um is None:
        diameter = TECHNOLOGY_SPOT_DIAMETER_UM.get(technology.lower())
    if diameter is None:
        raise StemstDataError(
            f"{meta_file}: no spot diameter ('spot_diameter' absent and st_technology={technology!r} unknown); "
            "pass `spot_diameter_um=`."
        )

    with reading(st, "AnnData (.h5ad) of spots x genes"):
        adata = ad.read_h5ad(st)
    if "spatial" not in adata.obsm:
        raise StemstDataError(f"{st}: no obsm['spatial'] (spot centres); obsm keys: {list(adata.obsm.keys())}.")
    coords = np.asarray(adata.obsm["spatial"], dtype=np.float64)[:, :2]
    img, (h0, w0) = read_image(wsi, level=level)
    scale = (img.shape[1] / w0, img.shape[0] / h0)
    logger.info(
        "HEST %s: %d spots, %d genes, image %s (level %d)", sample_id, adata.n_obs, adata.n_vars, img.shape, level
    )
    return build(
        section,
        image=img,
        counts=counts_matrix(adata, layer, what=str(st)),
        genes=adata.var_names,
        spot_ids=adata.obs_names,
        coords_fullres=coords,
        scale=scale,
        microns_per_fullres_pixel=mpp,
        spot_diameter_um=diameter,
        source=str(root.resolve() / sample_id),
        image_label=str(wsi),
        obs=obs_columns(adata.obs),
        extra={"platform": technology or "HEST-1k", "sample_id": sample_id, "level": level},
    )
