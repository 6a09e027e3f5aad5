"""Spot-centred H&E patches -> image encoder -> per-spot embeddings in the table."""

from __future__ import annotations

import hashlib
import json
import os
import re
import time
import uuid
import zlib
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import nullcontext, suppress
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import dask
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from stemst._atomic import check_destination
from stemst._errors import warn
from stemst._logging import logger
from stemst._schema import (
    SECTION_KEY,
    SPATIAL_KEY,
    TABLE_KEY,
    UNS_KEY,
    StemstDataError,
    check_embedding,
    check_key_free,
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

from ._dense import MARGIN_PX, PAD_VALUE, TILE_PX, DenseGeometry, DenseStats, check_tiles, dense_model
from ._encoders import Encoder, dihedral_views, fingerprint, normalise, resolve_encoders
from ._stain import JITTER_BIAS, JITTER_SCALE, STAIN_SPOTS, Stains, fit_stains, hed_jitter, normalise_stains

#: smallest patch side (in pixels at the chosen pyramid level) that is still embedded
MIN_PATCH_PX = 8
#: the paper's minimum patch side, in pixels at the encoder's native resolution
PAPER_PATCH_PX = 224
#: warn when patches are enlarged more than this to reach the encoder's input size
MAX_UPSAMPLING = 4.0
#: fewest spots read together (one dask computation); the encoder then takes their images batch_size at a time
MIN_READ_SPOTS = 8
#: default images per forward pass: small batches keep a CPU's caches warm (16 was fastest for EfficientNet-Lite0
#: on a 2-core CPU, ahead of 32 and 64); a GPU wants large ones
CPU_BATCH_SIZE = 16
CUDA_BATCH_SIZE = 256
CLIPPED_KEY = "stemst_patch_clipped"
N_VIEWS = 8
#: environment variable naming the stemst cache root (embeddings go to its ``embeddings/`` folder)
CACHE_ENV = "STEMST_CACHE_DIR"
#: bump when a change to the embedding pipeline makes earlier cache files invalid
CACHE_VERSION = 1
#: seed of the stain jitter (with the section's name: each section draws its own, reproducible jitter)
JITTER_SEED = 20


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


@dataclass
class _SectionJob:
    """The spots of one section in reading order, and where their cache file is."""

    rows_table: np.ndarray  # the section's table rows, in table order
    rows: np.ndarray  # the same rows in reading order (chunk row by chunk row)
    corners: np.ndarray  # top-left corner of each patch, in reading order
    batches: list[slice]
    full_shape: tuple[int, ...]  # level-0 image shape
    pixels: _PixelHash = field(default_factory=lambda: _PixelHash())
    key: str | None = None
    path: Path | None = None


def _section_job(
    plan: PatchPlan, image: Any, full_shape: tuple[int, ...], coords: np.ndarray, rows: np.ndarray, spots_per_read: int
) -> _SectionJob:
    corners = _windows(coords[rows], plan)
    chunk = int(image.chunksize[1]) if hasattr(image, "chunksize") else plan.shape[0]
    order = _raster_order(corners, chunk)
    batches = list(_batches(len(rows), spots_per_read))
    return _SectionJob(rows, rows[order], corners[order], batches, tuple(int(v) for v in full_shape))


def default_batch_size(device: torch.device) -> int:
    """Images per encoder forward pass when none is given: large on CUDA, small on a CPU."""
    return CUDA_BATCH_SIZE if device.type == "cuda" else CPU_BATCH_SIZE


def _prefetched(tasks: Sequence[Callable[[], Any]], depth: int = 2) -> Iterator[Any]:
    """Yield each task's result in order while a background thread already runs the next ``depth`` tasks.

    Reading patches (dask, numpy, decompression: mostly outside the GIL) then overlaps with the encoder, which keeps
    torch's threads busy in the caller's thread.
    """
    pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="stemst-read")
    pending: deque[Future] = deque(pool.submit(t) for t in tasks[:depth])
    try:
        for nxt in range(depth, len(tasks) + depth):
            result = pending.popleft().result()
            if nxt < len(tasks):
                pending.append(pool.submit(tasks[nxt]))
            yield result
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _uses_conv(model: Any) -> bool:
    return (
        isinstance(model, nn.Module)
        and not isinstance(model, torch.jit.ScriptModule)
        and any(isinstance(m, nn.Conv2d) for m in model.modules())
    )


class _Embedder:
    """Run a set of encoders on uint8 patches (with optional dihedral views).

    Convolutional torch models run in channels-last memory format (faster on CPU and GPU), falling back to the
    default format if a model cannot take it; on CUDA the encoders run in bf16 autocast.
    """

    def __init__(self, encoders: list[Encoder], device: torch.device, batch_size: int):
        self.encoders = encoders
        self.device = device
        self.batch_size = max(1, int(batch_size))
        self.models = [e.load(device) for e in encoders]
        self.fingerprints = [fingerprint(m) for m in self.models]
        self.channels_last = [_uses_conv(m) for m in self.models]
        for model, cl in zip(self.models, self.channels_last, strict=True):
            if cl:
                model.to(memory_format=torch.channels_last)

    def _forward(self, i: int, img: torch.Tensor) -> torch.Tensor:
        autocast = torch.autocast("cuda", dtype=torch.bfloat16) if self.device.type == "cuda" else nullcontext()
        with autocast:
            if not self.channels_last[i]:
                return self.models[i](img.contiguous()).float()
            try:
                return self.models[i](img).float()
            except RuntimeError as e:  # e.g. a custom forward that calls .view() on a channels-last tensor
                logger.info("Encoder %r failed in channels-last format (%s); using the default format.", i, e)
                self.channels_last[i] = False
                self.models[i].to(memory_format=torch.contiguous_format)
                return self.models[i](img.contiguous()).float()

    @torch.inference_mode()
    def __call__(self, patches: np.ndarray, *, augment: bool) -> np.ndarray:
        """``(n, 3, s, s)`` uint8 -> ``(n, views, D)`` float32 features."""
        x = torch.from_numpy(patches).to(self.device, non_blocking=True)
        parts = []
        for i, enc in enumerate(self.encoders):
            img = x.float().div_(255.0)
            if img.shape[-1] != enc.input_size:
                img = F.interpolate(
                    img, size=(enc.input_size,) * 2, mode="bilinear", antialias=True, align_corners=False
                )
            # per-channel normalisation commutes with flips and rotations: normalise once, before making the views
            img = normalise(img, enc.mean, enc.std)
            # the views are stacked channels-last, (n, v, H, W, C), so the batch needs no further copy
            nhwc = img.permute(0, 2, 3, 1)
            views = dihedral_views(nhwc, dims=(1, 2)) if augment else nhwc[:, None].contiguous()
            n, v = views.shape[:2]
            batch = views.flatten(0, 1).permute(0, 3, 1, 2)  # (n * v, C, H, W), channels-last strides
            feats = [self._forward(i, batch[sl]) for sl in _batches(len(batch), self.batch_size)]
            parts.append(torch.cat(feats).reshape(n, v, -1))
        return torch.cat(parts, dim=-1).cpu().numpy()


# ----------------------------------------------------------------------------------------------------------------
# the embedding cache: one .npz per (section, settings), verified against the pixels actually read


def default_cache_dir() -> Path:
    """Folder of the embedding cache: ``$STEMST_CACHE_DIR/embeddings``, else ``pooch.os_cache("stemst")/embeddings``."""
    root = os.environ.get(CACHE_ENV)
    if root:
        return Path(root).expanduser() / "embeddings"
    import pooch

    return Path(pooch.os_cache("stemst")) / "embeddings"


def _cache_folder(cache: bool | str | os.PathLike | None) -> Path | None:
    if cache is False or cache is None:
        return None
    return default_cache_dir() if cache is True else Path(cache).expanduser()


def _digest(*parts: bytes) -> str:
    h = hashlib.blake2b(digest_size=16)
    for part in parts:
        h.update(part)
    return h.hexdigest()


class _PixelHash:
    """Running digest of the patches read for a section, in reading order: the image part of the cache check."""

    def __init__(self) -> None:
        self._h = hashlib.blake2b(digest_size=16)

    def update(self, patches: np.ndarray) -> None:
        self._h.update(np.ascontiguousarray(patches).data)

    def hexdigest(self) -> str:
        return self._h.hexdigest()


def _cache_path(folder: Path, section: str, key: str) -> Path:
    safe = re.sub(r"[^A-Za-z0-9_.-]", "_", section)[:64]
    return folder / f"{safe}-{_digest(key.encode())[:20]}.npz"


def _read_cache(
    path: Path, key: str, pixels: str | None, n_spots: int, n_views: int
) -> tuple[np.ndarray, np.ndarray] | None:
    """Return the cached ``(features, clipped)`` if ``path`` was made with ``key`` from the same pixels, else None.

    ``pixels=None`` skips the pixel check (``verify_cache=False``).

    An unreadable or inconsistent file is reported with a warning and ignored: the section is embedded again.
    """
    try:
        with np.load(path, allow_pickle=False) as z:
            stored_key, stored_pixels = str(z["key"]), str(z["pixels"])
            feats, clipped = np.asarray(z["features"], np.float32), np.asarray(z["clipped"], bool)
        if feats.ndim != 3 or feats.shape[:2] != (n_spots, n_views) or clipped.shape != (n_spots,):
            raise ValueError(f"features {feats.shape}, clipped {clipped.shape} for {n_spots} spots x {n_views} views")
        if not np.isfinite(feats).all():
            raise ValueError("non-finite features")
    except Exception as e:  # noqa: BLE001  (a truncated or foreign file fails in many ways: zip, zlib, key, shape)
        warn(
            f"Ignoring the unreadable embedding cache file {path} ({type(e).__name__}: {e}); embedding again.",
            stacklevel=4,
        )
        return None
    if stored_key != key:  # a digest collision, or a file renamed by hand
        return None
    if pixels is not None and stored_pixels != pixels:
        logger.info("Cache %s: the image pixels under the spots changed; embedding again.", path.name)
        return None
    return feats, clipped


def _write_cache(path: Path, key: str, pixels: str, feats: np.ndarray, clipped: np.ndarray) -> None:
    """Write atomically (a temporary file, then rename), so that a killed run never leaves a partial file."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as f:
            np.savez(f, key=np.array(key), pixels=np.array(pixels), features=feats, clipped=clipped)
        os.replace(tmp, path)
    except OSError as e:
        with suppress(OSError):  # under a file, even the temporary file's path is invalid
            tmp.unlink(missing_ok=True)
        warn(f"Could not write the embedding cache file {path} ({e}); the embeddings are not cached.", stacklevel=4)


def _section_key(
    plan: PatchPlan, image: Any, coords: np.ndarray, embedder: _Embedder, n_views: int, full_shape: Any, stain: dict
) -> str:
    """Every setting that makes a section's embeddings, as canonical JSON (the cache file name is its digest)."""
    key = {
        "version": CACHE_VERSION,
        "section": plan.section,
        "encoders": [
            {"name": e.name, "input_size": int(e.input_size), "mean": list(e.mean), "std": list(e.std), "model": fp}
            for e, fp in zip(embedder.encoders, embedder.fingerprints, strict=True)
        ],
        "precision": "bf16-autocast" if embedder.device.type == "cuda" else "float32",
        "patch_size_um": float(plan.patch_size_um),
        "patch_px": int(plan.patch_px),
        "level": int(plan.level),
        "level_shape": [int(v) for v in image.shape],
        "level0_shape": [int(v) for v in full_shape],
        "dtype": str(image.dtype),
        "views": int(n_views),
        "resample": "bilinear-antialias",
        "pad_value": PAD_VALUE,
        "n_spots": len(coords),
        "coords": _digest(np.ascontiguousarray(coords, dtype=np.float64).tobytes()),
    }
    if stain:  # absent when off, so that the cache files made before these options stay valid
        key["stain"] = stain
    return json.dumps(key, sort_keys=True)


def embed_patches(
    sdata: Any,
    *,
    encoder: Any = "efficientnet_lite0",
    table_key: str = TABLE_KEY,
    sections: str | list[str] | None = None,
    patch_size_um: float | None = None,
    batch_size: int | None = None,
    augment: bool = True,
    device: str | torch.device = "auto",
    progress: bool = True,
    key_added: str | None = None,
    cache: bool | str | os.PathLike = True,
    verify_cache: bool = True,
    dense: bool = False,
    tile_px: int = TILE_PX,
    margin_px: int = MARGIN_PX,
    stain_norm: bool | Mapping[str, Any] | Any = False,
    stain_jitter: int = 0,
) -> None:
    """Embed a square H&E patch centred on every spot with an image encoder.

    For each section the patch has a fixed physical size, so slides scanned at different resolutions give comparable
    patches. It is read lazily, batch by batch, from the coarsest pyramid level that still has the resolution the
    encoder needs (the slide is never loaded whole; levels computed on the fly from a finer one, as in a pyramid not
    yet written to disk, are skipped because reading them costs more), resampled to the encoder's input size
    (bilinear, antialiased), normalised with the encoder's own mean/std and embedded under
    :func:`torch.inference_mode`. A background thread reads the next batch of patches while the encoder runs;
    convolutional encoders run in channels-last memory format.

    **Cache.** The embeddings of each section are saved to one file per (section, settings) in the cache folder, and
    a later call with the same settings reads them instead of running the encoder (logged at INFO level;
    ``cache_hit`` in the settings in ``uns``). The settings are: the encoders (name, input size, normalisation and a
    digest of the loaded model: its class, layers, ``forward`` code and every weight), the precision (bf16 on CUDA,
    float32 elsewhere), the patch size in µm and px, the pyramid level and the image's shape, the number of views, the
    spots' coordinates (in table order), and the pixels themselves: before a file is used, the section's patches are
    read again and their digest compared with the stored one (cheap next to the encoder: about 1 ms per spot for an
    image in memory), so an image edited even under a single spot is embedded again. Anything that differs means a new
    embedding, never a stale one. Files are written atomically; an unreadable file is embedded again with a warning.
    ``batch_size``, ``progress`` and ``key_added`` are not part of the key. For a custom callable encoder the digest
    covers its code and the simple values it closes over, not global state it reads: pass ``cache=False`` if that
    changes. Delete the folder to empty the cache. With ``verify_cache=False`` the pixel check is skipped and a file
    is used when every other setting matches: for files this same pipeline has just written (as ``stemst prepare``
    does under ``torchrun``, where rank 0 gathers what the other processes embedded), or for slides too large to
    read twice that are known not to have changed.

    Parameters
    ----------
    sdata
        A :class:`~spatialdata.SpatialData` in the stemst layout (:mod:`stemst.datasets`, :mod:`stemst.io`).
    encoder
        A registered name (:func:`stemst.pp.list_encoders`; default: EfficientNet-Lite0 with ImageNet weights, which
        works offline, described by the mean and std of each of its stages on a 160 px patch, 1632-d; ``"efficientnet_lite0_head"``
        gives its pooled 1280-d head instead), ``"timm:<architecture>"`` (hub weights), a checkpoint path (a TorchScript file or a dict
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
        Images per forward pass (with ``augment``, each spot contributes 8 images). Default: 256 on CUDA, 16 on
        other devices.
    augment
        Also embed the 8 flips/rotations of each patch (the dihedral group; view 0 is the original).
    device
        ``"auto"`` (CUDA if available, else CPU) or a torch device. On CUDA the encoder runs in bf16 autocast.
    progress
        Show a progress bar.
    key_added
        Embedding key; default ``"X_<encoder>"`` (``"X_<a>+<b>"`` for a list). Neither it nor ``key_added + "_views"``
        may name an ``obsm`` entry this function did not write (the spot centres, context features, a user's
        array): that is refused before any work.
    cache
        ``True``: use the default cache folder, ``$STEMST_CACHE_DIR/embeddings`` if that variable is set, else
        ``embeddings/`` in the user's cache (``pooch.os_cache("stemst")``, e.g. ``~/.cache/stemst`` on Linux); if it
        cannot be written, the embeddings are not cached (a warning). A path: use that folder, checked to be
        writable before any work. ``False``: neither read nor write a cache.
    verify_cache
        Read a section's patches again and compare their digest with the cached file's before using it (default).
        ``False`` trusts the other settings (image shape, spot centres, encoder, patch size, views) and reads no
        pixels on a cache hit; an image edited in place is then not noticed.
    dense
        Compute the default encoder's stage statistics from dense activation maps: the network runs once per view
        over the tissue under the spots (overlapping tiles, read lazily, rescaled once to the resolution the
        per-patch path feeds it) and each spot's mean and std per stage are window sums of the maps and of their
        squares. The cost is about one encoder pass per view over the covered tissue, whatever the number of spots
        and however much their patches overlap (a fine grid: :func:`stemst.tl.predict_image`); for sparse spots
        the per-patch path is cheaper. Features differ from per-patch ones where a patch's own edge padding
        reaches into the network (the two deepest stages). Encoders that are not fully convolutional (ViTs, pooled
        heads, callables) embed per patch (INFO log). The dense path neither reads nor writes the cache.
    tile_px, margin_px
        Dense path: side of a tile's core and of the margin read around it, in model pixels, multiples of 32.
        Margins under 256 px leave visible seams in the deepest stages.
    stain_norm
        Re-stain every patch to a reference before embedding it (Macenko et al. 2009): each section's haematoxylin
        and eosin vectors are estimated once, from the patches of 64 of its spots, and each pixel is unmixed with
        them and mixed again with the reference's. ``True``: the reference is estimated from the sections embedded
        in this call, pooled (embed the training sections this way). A recorded reference, to embed a new slide
        like the training slides: a trained model (the reference of its training embeddings), or the record
        ``uns["stemst"]["embeddings"][key]["stain_norm"]`` of a table embedded with ``stain_norm=True``. On
        HER2ST (train C2-C4, validation C5) it did not make predictions more robust to a stain change, so it is off
        by default (``docs/new_patient.md``).
    stain_jitter
        Also embed this many stain-jittered copies of each patch (HED jitter after Tellez et al. 2018: each patch's
        haematoxylin, eosin and DAB optical densities scaled by U(0.95, 1.05) and shifted by U(-0.05, 0.05), drawn
        per patch from a seed fixed per section; each copy with the same flips/rotations as the original), appended
        as extra views after the plain ones: they enter the own embedding of :func:`stemst.pp.spatial_context` (the
        mean over the views) and the training pairs of a model fitted on these embeddings with
        ``recipe={"augment": True}``. For training sections; a new slide is embedded without it (in a table of its
        own: a table's sections share one number of views). On the same validation it did not help either.

    Returns
    -------
    Nothing; adds to the table:

    - ``obsm[key]``: ``(n_spots, D)`` float32 embedding of the original patch.
    - ``obsm[key + "_views"]`` (with ``augment`` or ``stain_jitter``): ``(n_spots, v, D)`` float32, the 8 dihedral
      views of the patch (1 without ``augment``), then the same views of each stain-jittered copy.
    - ``obs["stemst_patch_clipped"]``: True where the patch ran off the image; the missing pixels are padded with
      white (255), like the glass around the tissue.
    - ``uns["stemst"]["embeddings"][key]``: the settings (encoder, patch size in µm and px, pyramid level, ...;
      ``cache_hit`` per section: whether the embeddings were read from the cache); with ``stain_norm``, its
      ``"stain_norm"`` entry holds the ``"reference"`` stains and each section's own (``"sections"``); with
      ``stain_jitter``, ``"stain_jitter"`` holds the number of copies and the jitter's range.

    Examples
    --------
    >>> import stemst
    >>> sdata = stemst.datasets.her2st(["C2"])
    >>> stemst.pp.embed_patches(sdata, encoder="color_stats", augment=False, progress=False)
    >>> sdata.tables["table"].obsm["X_color_stats"].shape
    (187, 30)
    """
    run = _start_run(sdata, table_key=table_key, encoder=encoder, sections=sections, key_added=key_added, cache=cache)
    reference = _stain_options(stain_norm, stain_jitter, dense=dense)
    plans = {
        s: plan_section(sdata, run.adata, s, encoders=run.encoders, patch_size_um=patch_size_um) for s in run.chosen
    }
    for s in run.chosen:
        _check_tissue(sdata, run.adata, s, run.coords[run.section_of == s])
    dev = resolve_device(device)
    batch_size = default_batch_size(dev) if batch_size is None else int(batch_size)
    run.embedder = _Embedder(run.encoders, dev, batch_size)
    run.augment, run.jitter = augment, int(stain_jitter)
    run.n_views = (N_VIEWS if augment else 1) * (1 + run.jitter)
    _check_views_fit(run)
    dense_net = _dense_net(run.embedder, dense)
    if dense_net is not None:
        tile_px, margin_px = check_tiles(tile_px, margin_px)
    spots_per_read = max(MIN_READ_SPOTS, int(batch_size) // run.n_views)  # the encoder takes them batch_size at a time
    n_total = int(np.isin(run.section_of, run.chosen).sum())
    logger.info("Embedding %d spots with %s on %s (%d view(s) each).", n_total, run.name, dev, run.n_views)
    start = time.perf_counter()
    run.jobs = {
        s: _section_job(*plans[s], get_image(sdata, s).shape, run.coords, np.flatnonzero(run.section_of == s),
                        spots_per_read)
        for s in run.chosen
    }  # fmt: skip
    if stain_norm is not False:
        _fit_run_stains(run, plans, reference)
    with _progress_bar(n_total, run.name, progress) as bar:
        if dense_net is not None:
            for s in run.chosen:
                _encode_dense(run, s, plans[s], dense_net, tile_px=tile_px, margin_px=margin_px, bar=bar)
        else:
            todo = _cache_lookup(run, plans, verify_cache=verify_cache, bar=bar)
            _encode_patches(run, plans, todo, bar=bar)
    _store_run(run, plans, key_added=key_added, elapsed=time.perf_counter() - start, dense=dense_net)


def _check_views_fit(run: _Run) -> None:
    """Refuse to embed some sections with another number of views than the other sections' stored ones."""
    vkey = f"{run.key}_views"
    old = run.adata.obsm.get(vkey)
    if old is None or run.n_views == 1 or np.shape(old)[1] == run.n_views or np.isin(run.section_of, run.chosen).all():
        return
    raise StemstDataError(
        f"obsm[{vkey!r}] holds {np.shape(old)[1]} views per spot and this call would make {run.n_views} "
        "(augment or stain_jitter differ), so the other sections' views would be lost. Embed these sections with "
        "the same settings, under another key_added, or in a table of their own (a new slide's SpatialData)."
    )


def _stain_options(stain_norm: Any, stain_jitter: Any, *, dense: bool) -> Stains | None:
    """Check the stain options; return the given reference (None for ``stain_norm=True`` or off)."""
    if isinstance(stain_jitter, bool) or not isinstance(stain_jitter, int | np.integer) or stain_jitter < 0:
        raise ValueError(f"stain_jitter must be a whole number of jittered copies >= 0, got {stain_jitter!r}.")
    if dense and (stain_norm is not False or stain_jitter):
        raise ValueError("stain_norm and stain_jitter act on each patch's pixels; use them with dense=False.")
    if stain_norm is True or stain_norm is False:
        return None
    if isinstance(stain_norm, Mapping):
        record = stain_norm.get("reference", stain_norm)
    elif isinstance(getattr(stain_norm, "encoder", None), Mapping):  # a trained model
        record = stain_norm.encoder.get("stain_norm")
        if not record:
            raise StemstDataError(
                "stain_norm: the model was trained on embeddings made without stain normalisation, so it has no "
                "reference; embed with stain_norm=False, as its training sections were."
            )
        record = record["reference"]
    else:
        raise TypeError(
            "stain_norm must be True/False, a trained model or a recorded reference "
            f"(uns['stemst']['embeddings'][key]['stain_norm']), got {type(stain_norm).__name__}."
        )
    return Stains.from_dict(record)


def _fit_run_stains(run: _Run, plans: dict, reference: Stains | None) -> None:
    """Estimate each section's stains from the patches of up to STAIN_SPOTS spots; the reference if not given."""
    pixels = {}
    for s in run.chosen:
        plan, image = plans[s]
        corners = run.jobs[s].corners
        pick = np.unique(np.linspace(0, len(corners) - 1, min(STAIN_SPOTS, len(corners))).astype(int))
        patches, _ = read_patches(image, corners[pick], plan.patch_px)
        pixels[s] = np.moveaxis(patches, 1, -1).reshape(-1, 3)
        run.stains[s] = fit_stains(pixels[s], what=f"stain_norm: section {s!r}")
    run.reference = reference or fit_stains(np.concatenate(list(pixels.values())), what="stain_norm: the reference")


def _embed_batch(run: _Run, s: str, patches: np.ndarray) -> np.ndarray:
    """Embed one batch of a section's patches: re-stained if asked, then the plain views and the jittered ones."""
    if run.reference is not None:
        patches = normalise_stains(patches, run.stains[s], run.reference)
    views = [run.embedder(patches, augment=run.augment)]
    for _ in range(run.jitter):
        views.append(run.embedder(hed_jitter(patches, run.jitter_rng(s)), augment=run.augment))
    return np.concatenate(views, axis=1)


@dataclass
class _Run:
    """One call of :func:`embed_patches`: what it embeds and what it has embedded so far."""

    adata: Any
    encoders: list[Encoder]
    name: str
    key: str
    folder: Path | None
    coords: np.ndarray
    section_of: np.ndarray
    chosen: list[str]
    embedder: Any = None
    n_views: int = 1
    augment: bool = False
    jitter: int = 0
    stains: dict[str, Stains] = field(default_factory=dict)  # each section's own, with stain_norm
    reference: Stains | None = None
    rngs: dict[str, np.random.Generator] = field(default_factory=dict)
    jobs: dict[str, _SectionJob] = field(default_factory=dict)
    feats: np.ndarray | None = None
    clipped: np.ndarray | None = None
    cache_hit: dict[str, bool] = field(default_factory=dict)

    def jitter_rng(self, section: str) -> np.random.Generator:
        """Return the section's own random stream for the stain jitter (seeded by the section's name)."""
        if section not in self.rngs:
            self.rngs[section] = np.random.default_rng([JITTER_SEED, zlib.crc32(section.encode())])
        return self.rngs[section]

    def stain_key(self, section: str) -> dict:
        """Return the stain settings of a section's embeddings (part of its cache key; empty when both are off)."""
        out: dict[str, Any] = {}
        if self.reference is not None:
            out["norm"] = {"reference": self.reference.to_dict(), "source": self.stains[section].to_dict()}
        if self.jitter:
            out["jitter"] = {"copies": self.jitter, "scale": JITTER_SCALE, "bias": JITTER_BIAS, "seed": JITTER_SEED}
        return out

    def put(self, rows: np.ndarray, values: np.ndarray, clip: np.ndarray) -> None:
        """Store features ``(len(rows), views, D)`` and the clipped flags of table rows ``rows``."""
        if self.feats is None:
            self.feats = np.full((self.adata.n_obs, self.n_views, values.shape[-1]), np.nan, dtype=np.float32)
        self.feats[rows] = values
        self.clipped[rows] = clip


def _start_run(sdata: Any, *, table_key: str, encoder: Any, sections: Any, key_added: str | None, cache: Any) -> _Run:
    """Check the inputs (before any work: a refusal leaves the table as it was) and resolve the encoders."""
    if not hasattr(sdata, "images"):
        raise TypeError(
            f"embed_patches needs a SpatialData with the H&E images, got {type(sdata).__name__}; "
            "load data with stemst.datasets or stemst.io."
        )
    adata = get_table(sdata, table_key)
    encoders = resolve_encoders(encoder)
    name = "+".join(e.name for e in encoders)
    key = key_added or embedding_key(name)
    for k in (key, f"{key}_views"):
        check_key_free(adata, "obsm", k, owned=_owned_keys(adata))
    folder = _cache_folder(cache)
    if folder is not None and cache is not True:  # the default cache only warns if it cannot be written
        check_destination(folder, what="the embedding cache", argument="cache")
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
    run = _Run(adata, encoders, name, key, folder, coords, section_of, chosen)
    run.clipped = np.zeros(adata.n_obs, dtype=bool)
    run.cache_hit = dict.fromkeys(chosen, False)
    return run


def _progress_bar(total: int, name: str, progress: bool) -> Any:
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=f"embed {name}", unit="spot", disable=not progress)


def _reads(run: _Run, plans: dict, s: str) -> list[Callable[[], tuple[np.ndarray, np.ndarray]]]:
    plan, image = plans[s]
    return [partial(read_patches, image, run.jobs[s].corners[sl], plan.patch_px) for sl in run.jobs[s].batches]


def _cache_lookup(run: _Run, plans: dict, *, verify_cache: bool, bar: Any) -> list[str]:
    """Fill in the sections found in the cache; return the sections still to embed."""
    todo = []
    for s in run.chosen:
        job = run.jobs[s]
        if run.folder is not None:
            plan, image = plans[s]
            job.key = _section_key(
                plan, image, run.coords[job.rows_table], run.embedder, run.n_views, job.full_shape, run.stain_key(s)
            )
            job.path = _cache_path(run.folder, s, job.key)
            found = _read_section_cache(run, plans, s, verify_cache) if job.path.is_file() else None
            if found is not None:
                run.put(job.rows_table, *found)
                run.cache_hit[s] = True
                bar.update(len(job.rows))
                logger.info("Section %s: embeddings read from the cache (%s); encoder not run.", s, job.path)
                continue
        todo.append(s)
    return todo


def _read_section_cache(run: _Run, plans: dict, s: str, verify_cache: bool) -> tuple[np.ndarray, np.ndarray] | None:
    job = run.jobs[s]
    digest = None
    if verify_cache:
        pixels = _PixelHash()
        for patches, _ in _prefetched(_reads(run, plans, s)):
            pixels.update(patches)
        digest = pixels.hexdigest()
    return _read_cache(job.path, job.key, digest, len(job.rows), run.n_views)


def _encode_patches(run: _Run, plans: dict, todo: list[str], *, bar: Any) -> None:
    """Embed the patches of the sections in ``todo``, checking and caching each section once it is complete."""
    tasks = [(s, sl) for s in todo for sl in run.jobs[s].batches]
    readers = [r for t in todo for r in _reads(run, plans, t)]
    for (s, sl), (patches, clip) in zip(tasks, _prefetched(readers), strict=True):
        job = run.jobs[s]
        job.pixels.update(patches)
        run.put(job.rows[sl], _embed_batch(run, s, patches), clip)
        bar.update(len(patches))
        if sl.stop == len(job.rows):  # the section is complete: check it, then cache it
            _section_done(run, s)
            if job.path is not None:
                rows = job.rows_table
                _write_cache(job.path, job.key, job.pixels.hexdigest(), run.feats[rows], run.clipped[rows])


def _section_done(run: _Run, s: str) -> None:
    check_embedding(run.feats[run.jobs[s].rows_table], what=f"The {run.name} embeddings of section {s!r}")


def _dense_net(embedder: _Embedder, dense: bool) -> Any:
    """Return the network to run densely, or None (``dense=False``, or an encoder that is not fully convolutional)."""
    if not dense:
        return None
    nets = [dense_model(m) for m in embedder.models]
    if len(nets) != 1 or nets[0] is None:
        logger.info(
            "dense=True: encoder %s is not a fully convolutional stage-statistics network (ViTs, pooled heads, "
            "callables); embedding per patch instead.",
            "+".join(e.name for e in embedder.encoders),
        )
        return None
    return nets[0]


def _encode_dense(run: _Run, s: str, plan_image: tuple, net: Any, *, tile_px: int, margin_px: int, bar: Any) -> None:
    """Embed one section's spots from dense activation maps (no cache: the pass costs about one read of it)."""
    plan, image = plan_image
    job = run.jobs[s]
    enc = run.encoders[0]
    geom = DenseGeometry(plan.patch_px, int(enc.input_size), tile_px, margin_px)
    stats = DenseStats(enc, net, geom, run.embedder.device)
    feats = stats.run(image, job.corners, views=run.n_views, mean_views=False)
    h, w = plan.shape
    c = job.corners
    clip = (c[:, 0] < 0) | (c[:, 1] < 0) | (c[:, 0] + plan.patch_px > h) | (c[:, 1] + plan.patch_px > w)
    run.put(job.rows, feats, clip)
    bar.update(len(job.rows))
    _section_done(run, s)


def _store_run(run: _Run, plans: dict, *, key_added: str | None, elapsed: float, dense: Any) -> None:
    """Write the embeddings, the clipped flags and the settings into the table."""
    adata, feats, clipped = run.adata, run.feats, run.clipped
    assert feats is not None
    done = np.isin(run.section_of, run.chosen)
    _store(adata, run.key, feats, done, views=run.n_views > 1)
    old = adata.obs[CLIPPED_KEY].to_numpy(bool) if CLIPPED_KEY in adata.obs else np.zeros(adata.n_obs, bool)
    adata.obs[CLIPPED_KEY] = np.where(done, clipped, old)
    settings = _settings(run, plans, done, key_added=key_added)
    if dense is not None:
        settings["dense"] = True
    emb = adata.uns.setdefault(UNS_KEY, {}).setdefault("embeddings", {})
    prev = emb.get(run.key, {})
    for entry in ("patch_size_um", "patch_px", "level", "level_mpp", "cache_hit"):  # keep other sections' settings
        if isinstance(prev.get(entry), dict):
            settings[entry] = {**prev[entry], **settings[entry]}
    if run.reference is not None:
        settings["stain_norm"] = _stain_record(run, prev.get("stain_norm"))
    if run.jitter:
        settings["stain_jitter"] = {"copies": run.jitter, "scale": JITTER_SCALE, "bias": JITTER_BIAS}
    emb[run.key] = settings
    n_total = int(done.sum())
    logger.info(
        "Embedded %d spots in %.1f s (%.1f spots/s; %d of %d section(s) read from the cache); obsm[%r] is %d-d, "
        "%d patch(es) padded.",
        n_total,
        elapsed,
        n_total / max(elapsed, 1e-9),
        sum(run.cache_hit.values()),
        len(run.chosen),
        run.key,
        feats.shape[-1],
        settings["n_clipped"],
    )


def _settings(run: _Run, plans: dict, done: np.ndarray, *, key_added: str | None) -> dict:
    encoders = run.encoders
    return {
        "encoder": run.name,
        "encoders": [e.name for e in encoders],
        "dim": int(run.feats.shape[-1]),
        "input_size": [int(e.input_size) for e in encoders],
        "mean": [list(map(float, e.mean)) for e in encoders],
        "std": [list(map(float, e.std)) for e in encoders],
        "native_mpp": [float(e.native_mpp) for e in encoders],
        "patch_size_um": {s: float(p.patch_size_um) for s, (p, _) in plans.items()},
        "patch_px": {s: int(p.patch_px) for s, (p, _) in plans.items()},
        "level": {s: int(p.level) for s, (p, _) in plans.items()},
        "level_mpp": {s: float(p.level_mpp) for s, (p, _) in plans.items()},
        "views": int(run.n_views),
        "views_key": views_key(run.name) if key_added is None else f"{run.key}_views",
        "view_order": "rot90 x k for k=0..3, then horizontal flip + rot90 x k"
        + (f"; the same for {run.jitter} stain-jittered copies after the plain patch" if run.jitter else ""),
        "pad_value": PAD_VALUE,
        "n_clipped": int(run.clipped[done].sum()),
        "device": str(run.embedder.device),
        "cache_hit": run.cache_hit,
        "cache_dir": None if run.folder is None else str(run.folder),
    }


def _stain_record(run: _Run, prev: Any) -> dict:
    """Return the reference and each section's stains, keeping sections embedded earlier to the same reference."""
    sections = {s: run.stains[s].to_dict() for s in run.chosen}
    reference = run.reference.to_dict()
    same = isinstance(prev, Mapping) and all(
        np.array_equal(np.asarray(prev.get("reference", {}).get(k)), v) for k, v in reference.items()
    )
    if same:
        sections = {**dict(prev.get("sections", {})), **sections}
    return {"method": "macenko", "reference": reference, "sections": sections}


def _owned_keys(adata: Any) -> set[str]:
    """``obsm`` keys of the embeddings :func:`embed_patches` wrote (not the context features recorded beside them)."""
    record = adata.uns.get(UNS_KEY, {}).get("embeddings", {})
    mine = {k: v for k, v in record.items() if isinstance(v, dict) and "context" not in v}
    return set(mine) | {str(v["views_key"]) for v in mine.values() if v.get("views_key")}


def _store(adata: Any, key: str, feats: np.ndarray, done: np.ndarray, *, views: bool) -> None:
    """Write the new rows into ``obsm[key]`` (and the views), keeping other rows of a compatible existing entry."""
    vkey = f"{key}_views"
    targets = [(key, feats[:, 0])] + ([(vkey, feats)] if views else [])
    for k, new in targets:
        old = adata.obsm.get(k)
        if old is not None and np.shape(old) == new.shape and not done.all():
            new = np.where(done.reshape((-1,) + (1,) * (new.ndim - 1)), new, np.asarray(old, np.float32))
        adata.obsm[k] = np.ascontiguousarray(new, dtype=np.float32)
    if not views and vkey in adata.obsm:
        logger.info("Removing obsm[%r]: it no longer matches obsm[%r] (re-embedded without augment).", vkey, key)
        del adata.obsm[vkey]
