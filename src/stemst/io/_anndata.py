"""Scanpy/squidpy-style AnnData with ``uns["spatial"]`` (e.g. from :func:`scanpy.read_visium`)."""

from __future__ import annotations

from typing import Any

import numpy as np

from stemst._logging import logger
from stemst._schema import StemstDataError
from stemst.io._image import as_uint8_rgb
from stemst.io._utils import build, check_section_name, counts_matrix, obs_columns, positive_number
from stemst.io._visium import VISIUM_SPOT_DIAMETER_UM


def from_anndata(
    adata: Any,
    *,
    library_id: str | None = None,
    image: str = "hires",
    section: str | None = None,
    layer: str | None = None,
    microns_per_pixel: float | None = None,
    spot_diameter_um: float = VISIUM_SPOT_DIAMETER_UM,
) -> Any:
    """Convert a scanpy-style spatial AnnData to the stemst data model.

    Reads ``adata.uns["spatial"][library_id]["images"][image]`` (the H&E image; 8- or 16-bit, or floats in [0, 1]),
    ``adata.uns["spatial"][library_id]["scalefactors"]`` (``tissue_<image>_scalef`` and, if the pixel size is
    not given, ``spot_diameter_fullres``) and ``adata.obsm["spatial"]`` (spot centres ``(x, y)`` in
    full-resolution pixels). ``adata`` is not modified.

    Parameters
    ----------
    adata
        AnnData with raw counts and the ``uns["spatial"]`` layout written by :func:`scanpy.read_visium`.
    library_id
        Key in ``uns["spatial"]``; may be left out when there is only one.
    image
        Image key in ``uns["spatial"][library_id]["images"]``, usually ``"hires"`` or ``"lowres"``.
    section
        Section name; defaults to ``library_id``.
    layer
        Layer holding raw counts; ``X`` if ``None``.
    microns_per_pixel
        Pixel size of the full-resolution frame of ``obsm["spatial"]``. If ``None``, derived as
        ``spot_diameter_um / spot_diameter_fullres``.
    spot_diameter_um
        Physical spot diameter (Visium: 55 µm).

    Returns
    -------
    :class:`~spatialdata.SpatialData` with one section in the stemst data model.

    Examples
    --------
    With scanpy's Visium reader (it downloads the sample)::

        import scanpy as sc, stemst
        adata = sc.datasets.visium_sge("V1_Human_Lymph_Node")
        sdata = stemst.io.from_anndata(adata, section="lymph_node")
    """
    spatial = adata.uns.get("spatial")
    if not isinstance(spatial, dict) or not spatial:
        raise KeyError(
            "adata.uns['spatial'] is missing or empty; expected {library_id: {'images': ..., 'scalefactors': ...}}."
        )
    if library_id is None:
        if len(spatial) != 1:
            raise KeyError(f"adata.uns['spatial'] holds several libraries {list(spatial)}; pass `library_id=`.")
        library_id = next(iter(spatial))
    if library_id not in spatial:
        raise KeyError(f"library_id={library_id!r} not in adata.uns['spatial']; libraries: {list(spatial)}.")
    lib = spatial[library_id]
    images = lib.get("images", {}) or {}
    if image not in images:
        raise KeyError(f"No image {image!r} in adata.uns['spatial'][{library_id!r}]['images']; images: {list(images)}.")
    scalefactors = lib.get("scalefactors", {}) or {}
    scale_key = f"tissue_{image}_scalef"
    if scale_key not in scalefactors:
        raise KeyError(
            f"No scale factor {scale_key!r} in adata.uns['spatial'][{library_id!r}]['scalefactors']; "
            f"keys: {list(scalefactors)}."
        )
    if microns_per_pixel is None:
        diameter_px = scalefactors.get("spot_diameter_fullres")
        if diameter_px is None:
            raise StemstDataError(
                "Cannot derive the pixel size: no 'spot_diameter_fullres' in the scale factors; "
                "pass `microns_per_pixel=` (µm per full-resolution pixel)."
            )
        if positive_number(diameter_px) is None:
            raise StemstDataError(f"spot_diameter_fullres must be a positive number, got {diameter_px!r}.")
        microns_per_pixel = spot_diameter_um / float(diameter_px)
    if "spatial" not in adata.obsm:
        raise StemstDataError(f"No obsm['spatial'] (spot centres); obsm keys: {list(adata.obsm.keys())}.")
    section = check_section_name(library_id if section is None else section)
    where = f"uns['spatial'][{library_id!r}]['images'][{image!r}]"
    img = as_uint8_rgb(images[image], what=where)
    scale = positive_number(scalefactors[scale_key])
    if scale is None:
        raise StemstDataError(
            f"adata.uns['spatial'][{library_id!r}]['scalefactors'][{scale_key!r}] must be a positive number, "
            f"got {scalefactors[scale_key]!r}."
        )
    logger.info("AnnData %s: %d spots, %d genes, %s image %s", section, adata.n_obs, adata.n_vars, image, img.shape)
    return build(
        section,
        image=img,
        counts=counts_matrix(adata, layer, what="adata"),
        genes=adata.var_names,
        spot_ids=adata.obs_names,
        coords_fullres=np.asarray(adata.obsm["spatial"], dtype=np.float64)[:, :2],
        scale=(scale, scale),
        microns_per_fullres_pixel=float(microns_per_pixel),
        spot_diameter_um=spot_diameter_um,
        source=f"AnnData uns['spatial'][{library_id!r}]",
        image_label=f"AnnData {where}, scale factor {scale_key!r}",
        obs=obs_columns(adata.obs),
        extra={"library_id": str(library_id), "image": image},
    )
