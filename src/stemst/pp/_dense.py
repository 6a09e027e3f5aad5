"""Dense stage statistics: one fully convolutional pass per view over the tissue, then window sums per spot.

The default encoder (:class:`~stemst.pp._encoders.StagePooled` over EfficientNet-Lite0) describes a patch by the
mean and standard deviation of each stage's activations over the patch. Run once over the whole tissue, in
overlapping tiles, its activation maps give those statistics for every spot as window sums of the maps and of their
squares (a summed-area table per tile), so any number of spots and any grid costs about one pass of the encoder.

Coordinates: *model pixels* are the image rescaled once to the resolution at which the per-patch path feeds the
network (``patch_px`` pixels of the pyramid level become ``input_size``), so a spot's patch is the same
``input_size`` square of model pixels in both paths.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from stemst._logging import logger

from ._encoders import Encoder, StagePooled, dihedral_views, normalise

#: value of pixels outside the image: white, like the glass (the per-patch path pads the same way)
PAD_VALUE = 255

#: total stride of the encoder: tile origins, tile sizes and margins are multiples of it, so every stage's cell grid
#: is the same in every tile (no seams from misaligned cells)
STRIDE = 32
#: default side of a tile's core (model pixels) and of the margin read around it; the margin hides the tile's own
#: zero padding from the core. Measured on HER2ST C2 (largest difference per stage against a tile with a 512 px
#: margin, relative to the stage's largest value): margin 64 -> 0.04 / 0.41 / 0.60 in stages 4 / 5 / 6, 128 -> 0.001 /
#: 0.12 / 0.23, 256 -> 0 / 0.003 / 0.007, 384 -> 0 (shallower stages 0 at any margin). 256 hides the seams; a 2048 px
#: core keeps the margin's extra work to 1.56x the core's area
TILE_PX = 2048
MARGIN_PX = 256
#: fewest / most model pixels for a tile core
MIN_TILE_PX = 128
MAX_TILE_PX = 8192


@dataclass(frozen=True)
class DenseGeometry:
    """How one section is read for the dense pass."""

    patch_px: int  # patch side at the pyramid level (the per-patch path's window)
    input_size: int  # patch side in model pixels
    tile_px: int
    margin_px: int

    @property
    def ratio(self) -> float:
        """Model pixels per level pixel."""
        return self.input_size / self.patch_px


def check_tiles(tile_px: Any, margin_px: Any) -> tuple[int, int]:
    """Validate ``tile_px`` / ``margin_px``: whole multiples of 32 model pixels, tile within 128-8192, margin >= 0.

    Examples
    --------
    >>> check_tiles(1024, 64)
    (1024, 64)
    """
    for name, value, low, high in (("tile_px", tile_px, MIN_TILE_PX, MAX_TILE_PX), ("margin_px", margin_px, 0, 4096)):
        if isinstance(value, bool) or not isinstance(value, int | np.integer) or not low <= value <= high:
            raise ValueError(f"{name} must be a whole number of pixels in [{low}, {high}], got {value!r}.")
        if value % STRIDE:
            raise ValueError(
                f"{name}={value} must be a multiple of {STRIDE} (the encoder's total stride), e.g. "
                f"{STRIDE * max(1, round(value / STRIDE))}."
            )
    return int(tile_px), int(margin_px)


def dense_model(model: Any) -> StagePooled | None:
    """Return the :class:`StagePooled` inside a loaded encoder if it can run densely (no global pooling), else None."""
    inner = getattr(model, "model", model)
    if not isinstance(inner, StagePooled):
        return None
    blocks = inner.model.blocks
    if any(isinstance(m, nn.AdaptiveAvgPool2d | nn.AdaptiveMaxPool2d) for m in blocks.modules()):
        return None
    if any(not isinstance(getattr(m, "se", nn.Identity()), nn.Identity) for m in blocks.modules()):
        return None  # squeeze-and-excitation pools over the whole input: a tile is not a patch
    return inner


def stage_maps(net: StagePooled, x: torch.Tensor) -> list[torch.Tensor]:
    """Return the activation maps whose mean and std :class:`StagePooled` returns: the stem, then each stage."""
    m = net.model
    x = m.bn1(m.conv_stem(x))
    maps = [x]
    for stage in m.blocks:
        x = stage(x)
        maps.append(x)
    return maps


def _axis_weights(start: int, n_out: int, ratio: float) -> tuple[np.ndarray, np.ndarray]:
    """Antialiased linear resampling along one axis: input index and weight of every tap, ``(n_out, taps)``.

    Output pixel ``i`` (global model coordinate ``start + i``) sits at input coordinate ``(i + 0.5) / ratio - 0.5``;
    its triangle filter is ``max(1, 1 / ratio)`` input pixels wide on each side (a box-like average when shrinking).
    The weights depend on global coordinates only, so overlapping tiles resample their shared pixels identically.
    """
    support = max(1.0, 1.0 / ratio)
    centre = (start + np.arange(n_out) + 0.5) / ratio - 0.5
    taps = int(np.ceil(2 * support)) + 1
    first = np.floor(centre - support).astype(np.int64) + 1
    idx = first[:, None] + np.arange(taps)[None, :]
    w = np.clip(1.0 - np.abs(idx - centre[:, None]) / support, 0.0, None)
    w /= w.sum(1, keepdims=True)
    return idx, w.astype(np.float32)


def _resample(block: torch.Tensor, iy: np.ndarray, wy: np.ndarray, ix: np.ndarray, wx: np.ndarray) -> torch.Tensor:
    """Separable resampling of a ``(3, h, w)`` block with per-axis taps (indices relative to the block)."""
    n_y, n_x = iy.shape[0], ix.shape[0]
    rows = block[:, torch.from_numpy(iy.reshape(-1))].reshape(3, n_y, iy.shape[1], -1)
    rows = (rows * torch.from_numpy(wy)[None, :, :, None]).sum(2)
    cols = rows[:, :, torch.from_numpy(ix.reshape(-1))].reshape(3, n_y, n_x, ix.shape[1])
    return (cols * torch.from_numpy(wx)[None, None]).sum(3)


def read_region(image: Any, y0: int, x0: int, h: int, w: int) -> np.ndarray:
    """``(3, h, w)`` uint8 pixels of a lazy ``(c, y, x)`` image from ``(y0, x0)``, white where it runs off the image."""
    height, width = image.shape[1:]
    out = np.full((3, h, w), PAD_VALUE, np.uint8)
    ya, xa, yb, xb = max(y0, 0), max(x0, 0), min(y0 + h, height), min(x0 + w, width)
    if ya < yb and xa < xb:
        out[:, ya - y0 : yb - y0, xa - x0 : xb - x0] = np.asarray(image[:3, ya:yb, xa:xb])
    return out


def read_tile(image: Any, geom: DenseGeometry, oy: int, ox: int, size: int) -> torch.Tensor:
    """RGB in ``[0, 1]``, ``(3, size, size)`` model pixels from global model position ``(oy, ox)`` (white off-image)."""
    iy, wy = _axis_weights(oy, size, geom.ratio)
    ix, wx = _axis_weights(ox, size, geom.ratio)
    y0, x0 = int(iy.min()), int(ix.min())
    h, w = int(iy.max()) - y0 + 1, int(ix.max()) - x0 + 1
    block = torch.from_numpy(read_region(image, y0, x0, h, w)).float().div_(255.0)
    return _resample(block, iy - y0, wy, ix - x0, wx)


def _integral(x: torch.Tensor) -> torch.Tensor:
    """Summed-area table ``(h + 1, w + 1, c)`` in float64 of a ``(c, h, w)`` map."""
    c, h, w = x.shape
    out = torch.zeros((h + 1, w + 1, c), dtype=torch.float64)
    out[1:, 1:] = x.permute(1, 2, 0).double().cumsum(0).cumsum(1)
    return out


def _lookup(table: torch.Tensor, y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Read the summed-area table at fractional cell positions (bilinear: area-weighted cells), ``(n, c)``."""
    h, w = table.shape[0] - 1, table.shape[1] - 1
    y0 = y.floor().clamp(0, h - 1).long()
    x0 = x.floor().clamp(0, w - 1).long()
    fy, fx = (y - y0).clamp(0, 1)[:, None], (x - x0).clamp(0, 1)[:, None]
    y1, x1 = (y0 + 1).clamp(max=h), (x0 + 1).clamp(max=w)
    top = table[y0, x0] * (1 - fx) + table[y0, x1] * fx
    bottom = table[y1, x0] * (1 - fx) + table[y1, x1] * fx
    return top * (1 - fy) + bottom * fy


def _window_sums(table: torch.Tensor, box: torch.Tensor) -> torch.Tensor:
    """Return the sums over fractional boxes ``(n, 4)`` = ``(y0, x0, y1, x1)`` in cells of a summed-area table."""
    y0, x0, y1, x1 = box.unbind(1)
    return _lookup(table, y1, x1) - _lookup(table, y0, x1) - _lookup(table, y1, x0) + _lookup(table, y0, x0)


def _view_of(x: torch.Tensor, view: int) -> torch.Tensor:
    """View ``view`` of :func:`dihedral_views` of a ``(..., H, W)`` tensor."""
    return dihedral_views(x[None], dims=(-2, -1))[0, view] if view else x


def _view_back(x: torch.Tensor, view: int) -> torch.Tensor:
    """Undo :func:`_view_of` on ``(..., H, W)`` maps."""
    if view >= 4:
        return torch.rot90(x, -(view - 4), dims=(-2, -1)).flip(-1)
    return torch.rot90(x, -view, dims=(-2, -1))


class DenseStats:
    """Stage statistics of the default encoder for many spots from one dense pass per view.

    Parameters
    ----------
    encoder
        The encoder spec (input size, normalisation).
    net
        Its loaded :class:`StagePooled` network (:func:`dense_model`).
    geom
        Patch and tile sizes.
    device
        Torch device the network runs on.
    """

    def __init__(self, encoder: Encoder, net: StagePooled, geom: DenseGeometry, device: torch.device):
        self.encoder, self.net, self.geom, self.device = encoder, net, geom, device

    def windows(self, corners: np.ndarray) -> np.ndarray:
        """Each patch's top-left corner in model pixels, from its corner ``(y0, x0)`` at the pyramid level."""
        return corners.astype(np.float64) * self.geom.ratio

    def tiles(self, starts: np.ndarray) -> list[tuple[int, int]]:
        """Tile indices ``(ty, tx)`` whose core meets at least one patch (patches start at ``starts``, model px)."""
        t, p = self.geom.tile_px, self.geom.input_size
        lo = np.floor(starts / t).astype(np.int64)
        hi = np.floor((starts + p - 1e-6) / t).astype(np.int64)
        found: set[tuple[int, int]] = set()
        for dy in range(int((hi - lo)[:, 0].max()) + 1):
            for dx in range(int((hi - lo)[:, 1].max()) + 1):
                ok = (lo[:, 0] + dy <= hi[:, 0]) & (lo[:, 1] + dx <= hi[:, 1])
                found.update(map(tuple, (lo[ok] + [dy, dx]).tolist()))
        return sorted(found)

    @torch.inference_mode()
    def tile_maps(self, image: Any, ty: int, tx: int, view: int) -> list[torch.Tensor]:
        """Activation maps of one tile's core in view ``view``, oriented as the slide, float32 on the CPU."""
        t, m = self.geom.tile_px, self.geom.margin_px
        rgb = read_tile(image, self.geom, ty * t - m, tx * t - m, t + 2 * m)
        x = normalise(rgb, self.encoder.mean, self.encoder.std)
        x = _view_of(x, view)[None].to(self.device).contiguous(memory_format=torch.channels_last)
        autocast = torch.autocast("cuda", dtype=torch.bfloat16) if self.device.type == "cuda" else nullcontext()
        with autocast:
            maps = stage_maps(self.net, x)
        out = []
        for fmap in maps:
            stride = (t + 2 * m) // fmap.shape[-1]
            core = _view_back(fmap[0].float(), view)
            out.append(core[:, m // stride : (m + t) // stride, m // stride : (m + t) // stride].cpu())
        return out

    def accumulate(
        self, sums: list[np.ndarray], maps: list[torch.Tensor], starts: np.ndarray, rows: np.ndarray, ty: int, tx: int
    ) -> None:
        """Add each patch's share of this tile (sum and sum of squares per stage) to ``sums`` (rows ``rows``)."""
        t, p = self.geom.tile_px, self.geom.input_size
        origin = np.array([ty * t, tx * t], np.float64)
        rel = np.concatenate([starts[rows] - origin, starts[rows] + p - origin], axis=1)
        for k, fmap in enumerate(maps):
            stride = t / fmap.shape[-1]
            box = torch.from_numpy(np.clip(rel / stride, 0, fmap.shape[-1]))
            sums[k][rows] += _window_sums(_integral(torch.cat([fmap, fmap.square()])), box).numpy()

    def finish(self, sums: list[np.ndarray]) -> np.ndarray:
        """Mean and (unbiased, as :meth:`torch.Tensor.std`) std of every stage, in :class:`StagePooled`'s order."""
        p, parts = self.geom.input_size, []
        for k, acc in enumerate(sums):
            c = acc.shape[1] // 2
            stride = self.geom.tile_px / self._cells[k]
            n = (p / stride) ** 2
            mean = acc[:, :c] / n
            var = (acc[:, c:] - n * mean**2) / max(n - 1, 1.0)
            parts += [mean, np.sqrt(np.clip(var, 0, None))]
        return np.concatenate(parts, axis=1).astype(np.float32)

    def run(self, image: Any, corners: np.ndarray, *, views: int, mean_views: bool, progress: Any = None) -> np.ndarray:
        """Features of the patches at ``corners`` (level pixels): ``(n, views, D)``, or ``(n, D)`` with ``mean_views``.

        Views are passes over the whole tissue, one after the other; only one view's sums are held at a time.
        """
        starts = self.windows(corners)
        tiles = self.tiles(starts)
        bins = _tile_members(starts, self.geom, tiles)
        n = len(corners)
        out = np.zeros((n, self.net.dim) if mean_views else (n, views, self.net.dim), np.float32)
        logger.info("Dense pass: %d spots, %d tiles of %d px (+%d margin), %d view(s).", n, len(tiles),
                    self.geom.tile_px, self.geom.margin_px, views)  # fmt: skip
        for view in range(views):
            sums: list[np.ndarray] | None = None
            for (ty, tx), rows in zip(tiles, bins, strict=True):
                maps = self.tile_maps(image, ty, tx, view)
                if sums is None:
                    self._cells = [fm.shape[-1] for fm in maps]
                    sums = [np.zeros((n, 2 * fm.shape[0]), np.float64) for fm in maps]
                self.accumulate(sums, maps, starts, rows, ty, tx)
                if progress is not None:
                    progress.update(1)
            feats = self.finish(sums)
            if mean_views:
                out += feats / views
            else:
                out[:, view] = feats
        return out


def _tile_members(starts: np.ndarray, geom: DenseGeometry, tiles: list[tuple[int, int]]) -> list[np.ndarray]:
    """For each tile, the rows of the patches that meet its core."""
    t, p = geom.tile_px, geom.input_size
    lo = np.floor(starts / t).astype(np.int64)
    hi = np.floor((starts + p - 1e-6) / t).astype(np.int64)
    out = []
    for ty, tx in tiles:
        ok = (lo[:, 0] <= ty) & (ty <= hi[:, 0]) & (lo[:, 1] <= tx) & (tx <= hi[:, 1])
        out.append(np.flatnonzero(ok))
    return out
