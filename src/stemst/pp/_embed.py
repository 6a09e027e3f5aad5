"""Spot-centred H&E patches -> image encoder -> per-spot embeddings in the table."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

import dask
import numpy as np
import torch
import torch.nn.functional as F

from stemst._errors import warn
from stemst._logging import logger
from stemst._schema import (
    SECTION_KEY,
    SPATIAL_KEY,
    TABLE_KEY,
    UNS_KEY,
    StemstDataError,
    check_embedding,
    embedding_key,
    get_image,
    get_table,
    section_info,
    views_key,
)
from stemst._schema import (
    sections as _sections,
)
from stemst._torch import resolve_device
from stemst.io._image import check_spots_on_tissue

from ._encoders import Encoder, dihedral_views, normalise, resolve_encoders

#: value of the pixels of a patch that fall outside the image: white, like the glass around the tissue
PAD_VALUE = 255
#: smallest patch side (in pixels at the chosen pyramid level) that is still embedded
MIN_PATCH_PX = 8
#: the paper's minimum patch side, in pixels at the encoder's native resolution
PAPER_PATCH_PX = 224
#: warn when patches are enlarged more than this to reach the encoder's input size
MAX_UPSAMPLING = 4.0
CLIPPED_KEY = "stemst_patch_clipped"
N_VIEWS = 8


@dataclass(frozen=True)
class PatchPlan:
    """Where and how the patches of one section are read."""

    section: str
    patch_size_um: float
    level: int
    level_mpp: float
    patch_px: int  # side at ``level``
    scale: tuple[float, float]  # level-0 pixels per level pixel, (y, x)
    shape: tuple[int, int]  # (height, width) of the level


def _levels(sdata: Any, section: str) -> list[Any]:
    """All pyramid levels of a section's image, finest first (lazy dask arrays)."""
    levels = [get_image(sdata, section, scale=0)]
    while True:
        nxt = get_image(sdata, section, scale=len(levels))
        if nxt.shape == levels[-1].shape:  # get_image clamps to the coarsest level
            return levels
        levels.append(nxt)


def _graph_layers(arr: Any) -> set[str]:
    graph = getattr(arr, "dask", None)
    return set(graph.layers) if hasattr(graph, "layers") else set()


def _derived(level: Any, finer: list[Any]) -> bool:
    """Whether ``level`` is computed lazily from a finer level (an unsaved pyramid): reading it costs more, not less."""
    mine = _graph_layers(level)
    return bool(mine) and any(f and f <= mine for f in map(_graph_layers, finer))


def plan_section(
    sdata: Any, adata: Any, section: str, *, encoders: list[Encoder], patch_size_um: float | None
) -> tuple[PatchPlan, Any]:
    """Choose the patch size and the coarsest pyramid level that still resolves the encoders' input size."""
    info = section_info(adata, section)
    if patch_size_um is None:
        patch_um = max(info.spot_diameter_um, PAPER_PATCH_PX * max(e.native_mpp for e in encoders))
    else:
        patch_um = float(patch_size_um)
        if not patch_um > 0:
            raise ValueError(f"patch_size_um must be positive, got {patch_size_um}.")
    wanted_mpp = patch_um / max(e.input_size for e in encoders)
    levels = _levels(sdata, section)
    h0, w0 = levels[0].shape[1:]
    extent_um = max(h0, w0) * info.microns_per_pixel
    if patch_um > extent_um:
        raise StemstDataError(
            f"Section {section!r}: patch_size_um={patch_um:g} is larger than the whole image ({w0} x {h0} px at "
            f"{info.microns_per_pixel:.3g} µm/px = {extent_um:.0f} µm across). Patches are usually one to a few spot "
            f"diameters ({info.spot_diameter_um:g} µm here); leave patch_size_um=None for the paper's rule."
        )
    chosen = 0
    for k, arr in enumerate(levels):
        sy, sx = h0 / arr.shape[1], w0 / arr.shape[2]
        if info.microns_per_pixel * max(sy, sx) <= wanted_mpp * 1.001 and not _derived(arr, levels[:k]):
            chosen = k
    arr = levels[chosen]
    scale = (h0 / arr.shape[1], w0 / arr.shape[2])
    level_mpp = info.microns_per_pixel * float(np.mean(scale))
    patch_px = int(round(patch_um / level_mpp))
    if patch_px < MIN_PATCH_PX:
        raise StemstDataError(
            f"Section {section!r}: a {patch_um:.1f} µm patch is only {patch_px} px at the image's {level_mpp:.2f} "
            f"µm/px (minimum {MIN_PATCH_PX} px). Use a larger patch_size_um or a higher-resolution image."
        )
    upsampling = max(e.input_size for e in encoders) / patch_px
    if upsampling > MAX_UPSAMPLING:
        warn(
            f"Section {section!r}: a {patch_um:.0f} µm patch is {patch_px} px at the image's {level_mpp:.2f} µm/px and "
            f"is enlarged {upsampling:.1f}x to the encoder's {max(e.input_size for e in encoders)} px: the encoder "
            "sees blurred, upsampled tissue, unlike what it was trained on. Use a higher-resolution image (e.g. the "
            "full-resolution image rather than hires/lowres) if there is one, and check the scale factor.",
            stacklevel=5,
        )
    elif level_mpp > wanted_mpp * 1.001:
        logger.info(
            "Section %s: the image (%.2f µm/px) is coarser than the encoders need (%.2f µm/px); patches are upsampled.",
            section,
            level_mpp,
            wanted_mpp,
        )
    plan = PatchPlan(section, patch_um, chosen, level_mpp, patch_px, scale, (int(arr.shape[1]), int(arr.shape[2])))
    return plan, arr


def _check_tissue(sdata: Any, adata: Any, section: str, coords: np.ndarray) -> None:
    """Raise for a blank image, warn when most spots sit on background; reads a thumbnail of a stored level."""
    levels = _levels(sdata, section)
    stored = [k for k, arr in enumerate(levels) if not _derived(arr, levels[:k])]
    image = levels[stored[-1]]
    step = levels[0].shape[2] / image.shape[2]
    info = section_info(adata, section)
    check_spots_on_tissue(
        image, coords / step, info.spot_diameter_px / step, what=f"Section {section!r} ({info.source})", stacklevel=5
    )


def _windows(centres_xy: np.ndarray, plan: PatchPlan) -> np.ndarray:
    """Top-left corner ``(y0, x0)`` of each patch at the plan's level (may be negative or run past the image)."""
    cy = centres_xy[:, 1] / plan.scale[0]
    cx = centres_xy[:, 0] / plan.scale[1]
    half = plan.patch_px / 2.0
    return np.stack([np.round(cy - half), np.round(cx - half)], axis=1).astype(np.int64)


def read_patches(image: Any, corners: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Read square ``size`` px patches at ``corners`` from a lazy ``(c, y, x)`` image, padding with white.

    Only the pixels of these patches are computed (one dask graph for the batch, so shared chunks load once).

    Returns
    -------
    ``(n, 3, size, size)`` uint8 patches and an ``(n,)`` bool array, True where a patch ran off the image.
    """
    h, w = image.shape[1:]
    out = np.full((len(corners), 3, size, size), PAD_VALUE, dtype=np.uint8)
    y0, x0 = corners[:, 0], corners[:, 1]
    ya, xa = np.clip(y0, 0, h), np.clip(x0, 0, w)
    yb, xb = np.clip(y0 + size, 0, h), np.clip(x0 + size, 0, w)
    clipped = (ya != y0) | (xa != x0) | (yb != y0 + size) | (xb != x0 + size)
    lazy = [image[:3, ya[i] : yb[i], xa[i] : xb[i]] for i in range(len(corners))]
    for i, block in enumerate(dask.compute(*lazy) if hasattr(image, "dask") else lazy):
        out[i, :, ya[i] - y0[i] : yb[i] - y0[i], xa[i] - x0[i] : xb[i] - x0[i]] = np.asarray(block)
    return out, clipped


def _raster_order(corners: np.ndarray, chunk: int) -> np.ndarray:
    """Order spots chunk-row by chunk-row, left to right, so a batch touches few image chunks."""
    return np.lexsort((corners[:, 1], corners[:, 0] // max(chunk, 1)))


def _batches(n: int, size: int) -> Iterator[slice]:
    for start in range(0, n, size):
        yield slice(start, min(start + size, n))


class _Embedder:
    """Run a set of encoders on uint8 patches (with optional dihedral views), in bf16 autocast on CUDA."""

    def __init__(self, encoders: list[Encoder], device: torch.device, batch_size: int):
        self.encoders = encoders
        self.device = device
        self.batch_size = max(1, int(batch_size))
        self.models = [e.load(device) for e in encoders]

    @torch.inference_mode()
    def __call__(self, patches: np.ndarray, *, augment: bool) -> np.ndarray:
        """``(n, 3, s, s)`` uint8 -> ``(n, views, D)`` float32 features."""
        x = torch.from_numpy(patches).to(self.device, non_blocking=True)
        parts = []
        for enc, model in zip(self.encoders, self.models, strict=True):
            img = x.float().div_(255.0)
            if img.shape[-1] != enc.input_size:
                img = F.interpolate(
                    img, size=(enc.input_size,) * 2, mode="bilinear", antialias=True, align_corners=False
                )
            img = dihedral_views(img) if augment else img[:, None]
            n, v = img.shape[:2]
            img = normalise(img.flatten(0, 1), enc.mean, enc.std)
            autocast = torch.autocast("cuda", dtype=torch.bfloat16) if self.device.type == "cuda" else nullcontext()
            feats = []
            with autocast:
                for sl in _batches(len(img), self.batch_size):
                    feats.append(model(img[sl]).float())
            parts.append(torch.cat(feats).reshape(n, v, -1))
        return torch.cat(parts, dim=-1).cpu().numpy()


def embed_patches(
    sdata: Any,
    *,
    encoder: Any = "efficientnet_lite0",
    table_key: str = TABLE_KEY,
    sections: str | list[str] | None = None,
    patch_size_um: float | None = None,
    batch_size: int = 64,
    augment: bool = True,
    device: str | torch.device = "auto",
    progress: bool = True,
    key_added: str | None = None,
) -> None:
    """Embed a square H&E patch centred on every spot with an image encoder.

    For each section the patch has a fixed physical size, so slides scanned at different resolutions give comparable
    patches. It is read lazily, batch by batch, from the coarsest pyramid level that still has the resolution the
    encoder needs (the slide is never loaded whole; levels computed on the fly from a finer one, as in a pyramid not
    yet written to disk, are skipped because reading them costs more), resampled to the encoder's input size (bilinear, antialiased),
    normalised with the encoder's own mean/std and embedded under :func:`torch.inference_mode`.

    Parameters
    ----------
    sdata
        A :class:`~spatialdata.SpatialData` in the stemst layout (:mod:`stemst.datasets`, :mod:`stemst.io`).
    encoder
        A registered name (:func:`stemst.pp.list_encoders`; default: EfficientNet-Lite0 with ImageNet weights, which
        works offline), ``"timm:<architecture>"`` (hub weights), a checkpoint path (a TorchScript file or a dict
        ``{"arch": <timm name>, "state_dict": ...}``), an :class:`~stemst.pp.Encoder`, a :class:`torch.nn.Module` or
        any callable ``(B, 3, H, W) -> (B, D)``. A list concatenates the embeddings of several encoders.
    table_key
        Table holding the spots.
    sections
        Sections to embed (default all). Rows of other sections are left as they were (NaN if new).
    patch_size_um
        Side of the patch in µm. Default: the paper's rule, the larger of the spot diameter and 224 px at the
        encoder's native resolution (``224 * native_mpp``; 112 µm for the 0.5 µm/px models).
    batch_size
        Images per forward pass (with ``augment``, each spot contributes 8 images).
    augment
        Also embed the 8 flips/rotations of each patch (the dihedral group; view 0 is the original).
    device
        ``"auto"`` (CUDA if available, else CPU) or a torch device. On CUDA the encoder runs in bf16 autocast.
    progress
        Show a progress bar.
    key_added
        Embedding key; default ``"X_<encoder>"`` (``"X_<a>+<b>"`` for a list).

    Returns
    -------
    Nothing; adds to the table:

    - ``obsm[key]``: ``(n_spots, D)`` float32 embedding of the original patch.
    - ``obsm[key + "_views"]`` (with ``augment``): ``(n_spots, 8, D)`` float32, the 8 dihedral views.
    - ``obs["stemst_patch_clipped"]``: True where the patch ran off the image; the missing pixels are padded with
      white (255), like the glass around the tissue.
    - ``uns["stemst"]["embeddings"][key]``: the settings (encoder, patch size in µm and px, pyramid level, ...).

    Examples
    --------
    >>> import stemst
    >>> sdata = stemst.datasets.her2st(["C2"])  # doctest: +SKIP
    >>> stemst.pp.embed_patches(sdata, encoder="color_stats", augment=False, progress=False)  # doctest: +SKIP
    >>> sdata.tables["table"].obsm["X_color_stats"].shape  # doctest: +SKIP
    (187, 30)
    """
    from tqdm.auto import tqdm

    if not hasattr(sdata, "images"):
        raise TypeError(
            f"embed_patches needs a SpatialData with the H&E images, got {type(sdata).__name__}; "
            "load data with stemst.datasets or stemst.io."
        )
    adata = get_table(sdata, table_key)
    encoders = resolve_encoders(encoder)
    name = "+".join(e.name for e in encoders)
    key = key_added or embedding_key(name)
    if SPATIAL_KEY not in adata.obsm:
        raise StemstDataError(
            f"The table has no obsm[{SPATIAL_KEY!r}] spot coordinates; load data with stemst.datasets or stemst.io."
        )
    coords = np.asarray(adata.obsm[SPATIAL_KEY], dtype=np.float64)
    if coords.ndim != 2 or coords.shape[1] != 2 or not np.isfinite(coords).all():
        raise StemstDataError(f"obsm[{SPATIAL_KEY!r}] must be finite (n, 2) pixel coordinates, got {coords.shape}.")
    known = _sections(adata)
    chosen = known if sections is None else [sections] if isinstance(sections, str) else list(sections)
    unknown = [s for s in chosen if s not in known]
    if unknown:
        raise StemstDataError(f"Unknown sections {unknown}; the table has {known}.")
    section_of = adata.obs[SECTION_KEY].astype(str).to_numpy()
    chosen = [s for s in chosen if (section_of == s).any()]
    if not chosen:
        raise StemstDataError("No spots to embed in the requested sections.")

    plans = {s: plan_section(sdata, adata, s, encoders=encoders, patch_size_um=patch_size_um) for s in chosen}
    for s in chosen:
        _check_tissue(sdata, adata, s, coords[section_of == s])
    dev = resolve_device(device)
    embedder = _Embedder(encoders, dev, batch_size)
    n_views = N_VIEWS if augment else 1
    spots_per_batch = max(1, int(batch_size) // n_views)
    n_total = int(np.isin(section_of, chosen).sum())
    logger.info("Embedding %d spots with %s on %s (%d view(s) each).", n_total, name, dev, n_views)
    start = time.perf_counter()

    feats: np.ndarray | None = None
    clipped = np.zeros(adata.n_obs, dtype=bool)
    bar = tqdm(total=n_total, desc=f"embed {name}", unit="spot", disable=not progress)
    for s in chosen:
        plan, image = plans[s]
        rows = np.flatnonzero(section_of == s)
        corners = _windows(coords[rows], plan)
        chunk = int(image.chunksize[1]) if hasattr(image, "chunksize") else plan.shape[0]
        order = _raster_order(corners, chunk)
        rows, corners = rows[order], corners[order]
        for sl in _batches(len(rows), spots_per_batch):
            patches, clip = read_patches(image, corners[sl], plan.patch_px)
            out = embedder(patches, augment=augment)
            if feats is None:
                feats = np.full((adata.n_obs, n_views, out.shape[-1]), np.nan, dtype=np.float32)
            feats[rows[sl]] = out
            clipped[rows[sl]] = clip
            bar.update(len(patches))
    bar.close()
    assert feats is not None
    for s in chosen:
        check_embedding(feats[section_of == s], what=f"The {name} embeddings of section {s!r}")
    done = np.isin(section_of, chosen)
    _store(adata, key, feats, done, augment=augment)
    old = adata.obs[CLIPPED_KEY].to_numpy(bool) if CLIPPED_KEY in adata.obs else np.zeros(adata.n_obs, bool)
    adata.obs[CLIPPED_KEY] = np.where(done, clipped, old)
    elapsed = time.perf_counter() - start
    settings = {
        "encoder": name,
        "encoders": [e.name for e in encoders],
        "dim": int(feats.shape[-1]),
        "input_size": [int(e.input_size) for e in encoders],
        "mean": [list(map(float, e.mean)) for e in encoders],
        "std": [list(map(float, e.std)) for e in encoders],
        "native_mpp": [float(e.native_mpp) for e in encoders],
        "patch_size_um": {s: float(p.patch_size_um) for s, (p, _) in plans.items()},
        "patch_px": {s: int(p.patch_px) for s, (p, _) in plans.items()},
        "level": {s: int(p.level) for s, (p, _) in plans.items()},
        "level_mpp": {s: float(p.level_mpp) for s, (p, _) in plans.items()},
        "views": int(n_views),
        "views_key": views_key(name) if key_added is None else f"{key}_views",
        "view_order": "rot90 x k for k=0..3, then horizontal flip + rot90 x k",
        "pad_value": PAD_VALUE,
        "n_clipped": int(clipped[done].sum()),
        "device": str(dev),
    }
    emb = adata.uns.setdefault(UNS_KEY, {}).setdefault("embeddings", {})
    prev = emb.get(key, {})
    for field in ("patch_size_um", "patch_px", "level", "level_mpp"):  # keep other sections' settings
        if isinstance(prev.get(field), dict):
            settings[field] = {**prev[field], **settings[field]}
    emb[key] = settings
    logger.info(
        "Embedded %d spots in %.1f s (%.1f spots/s); obsm[%r] is %d-d, %d patch(es) padded.",
        n_total,
        elapsed,
        n_total / max(elapsed, 1e-9),
        key,
        feats.shape[-1],
        settings["n_clipped"],
    )


def _store(adata: Any, key: str, feats: np.ndarray, done: np.ndarray, *, augment: bool) -> None:
    """Write the new rows into ``obsm[key]`` (and the views), keeping other rows of a compatible existing entry."""
    vkey = f"{key}_views"
    targets = [(key, feats[:, 0])] + ([(vkey, feats)] if augment else [])
    for k, new in targets:
        old = adata.obsm.get(k)
        if old is not None and np.shape(old) == new.shape and not done.all():
            new = np.where(done.reshape((-1,) + (1,) * (new.ndim - 1)), new, np.asarray(old, np.float32))
        adata.obsm[k] = np.ascontiguousarray(new, dtype=np.float32)
    if not augment and vkey in adata.obsm:
        logger.info("Removing obsm[%r]: it no longer matches obsm[%r] (re-embedded without augment).", vkey, key)
        del adata.obsm[vkey]
