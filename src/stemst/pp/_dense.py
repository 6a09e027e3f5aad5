"""Dense stage statistics: one fully convolutional pass per view over the tissue, then window sums per spot.

The default encoder (:class:`~stemst.pp._encoders.StagePooled` over EfficientNet-Lite0) describes a patch by the
mean and standard deviation of each stage's activations over the patch. Run once over the whole tissue, in
overlapping tiles, its activation maps give those statistics for every spot as window sums of the maps and of their
squares (prefix sums per tile, read at each spot's window), so any number of spots and any grid costs about one pass
of the encoder.

Coordinates: *model pixels* are the image rescaled once to the resolution at which the per-patch path feeds the
network (``patch_px`` pixels of the pyramid level become ``input_size``), so a spot's patch is the same
``input_size`` square of model pixels in both paths.
"""

from __future__ import annotations

import copy
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

import numpy as np
import scipy.sparse as sp
import torch
from torch import nn

from stemst._logging import logger
from stemst._spatial import cover

from ._encoders import Encoder, StagePooled, normalise

#: value of the pixels a patch or tile reads outside the image: white, like the glass around the tissue (both paths)
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
#: window sums by matrix products on the boxes' lattice when a map has at most this many cells per box (the stages
#: of stride 16 and 32 on a fine grid); larger maps use a summed-area table. Measured on one core, 30,276 boxes of an
#: 8 µm grid: 320 channels x 69 x 69 cells 1.95 -> 0.49 s, 40 x 275 x 275 0.29 -> 0.22 s, 32 x 1100 x 1100 0.87 ->
#: 1.47 s (the table wins)
LATTICE_CELLS = 8


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


def _taps_matrix(idx: np.ndarray, weight: np.ndarray, n_in: int) -> sp.csr_matrix:
    """Return the ``(n_out, n_in)`` sparse resampling matrix of one axis' taps."""
    indptr = np.arange(0, idx.size + 1, idx.shape[1])
    return sp.csr_matrix((weight.ravel(), idx.ravel(), indptr), shape=(idx.shape[0], n_in))


def _resample(block: torch.Tensor, iy: np.ndarray, wy: np.ndarray, ix: np.ndarray, wx: np.ndarray) -> torch.Tensor:
    """Separable resampling of a ``(3, h, w)`` block with per-axis taps (indices relative to the block).

    Two sparse products per channel (rows, then columns): the same sums as gathering every tap, ~3x faster.
    """
    rows = _taps_matrix(iy, wy, block.shape[1])
    cols = _taps_matrix(ix, wx, block.shape[2]).T.tocsr()
    b = block.numpy()
    return torch.from_numpy(np.stack([(rows @ b[c]) @ cols for c in range(len(b))]).astype(np.float32, copy=False))


def read_region(image: Any, y0: int, x0: int, h: int, w: int) -> np.ndarray:
    """``(3, h, w)`` uint8 pixels of a lazy ``(c, y, x)`` image from ``(y0, x0)``, white where it runs off the image."""
    height, width = image.shape[1:]
    out = np.full((3, h, w), PAD_VALUE, np.uint8)
    ya, xa, yb, xb = max(y0, 0), max(x0, 0), min(y0 + h, height), min(x0 + w, width)
    if ya < yb and xa < xb:
        out[:, ya - y0 : yb - y0, xa - x0 : xb - x0] = np.asarray(image[:3, ya:yb, xa:xb])
    return out


def read_tile(image: Any, geom: DenseGeometry, oy: int, ox: int, h: int, w: int) -> torch.Tensor:
    """RGB in ``[0, 1]``, ``(3, h, w)`` model pixels from global model position ``(oy, ox)`` (white off-image)."""
    iy, wy = _axis_weights(oy, h, geom.ratio)
    ix, wx = _axis_weights(ox, w, geom.ratio)
    y0, x0 = int(iy.min()), int(ix.min())
    bh, bw = int(iy.max()) - y0 + 1, int(ix.max()) - x0 + 1
    block = torch.from_numpy(read_region(image, y0, x0, bh, bw)).float().div_(255.0)
    return _resample(block, iy - y0, wy, ix - x0, wx)


@dataclass(frozen=True)
class Tile:
    """One read of the tissue: a region of model pixels (margin included) and the patches it holds whole."""

    y0: int
    x0: int
    h: int
    w: int
    rows: np.ndarray  # the patches (rows of the spots) whose statistics this tile computes


def plan_tiles(starts: np.ndarray, geom: DenseGeometry) -> list[Tile]:
    """Group the patches (top-left corners ``starts``, model px) by the ``tile_px`` square holding their corner.

    Each tile reads the bounding box of its patches, rounded out to the encoder's stride, plus ``margin_px`` on every
    side: every patch is computed whole in one tile (no partial sums across tiles) and no pixel far from a patch is
    read, so a grid over irregular tissue costs about the tissue's area, not its bounding box's.
    """
    t, p, m = geom.tile_px, geom.input_size, geom.margin_px
    _, group = np.unique(np.floor(starts / t).astype(np.int64), axis=0, return_inverse=True)
    order = np.argsort(group.ravel(), kind="stable")
    tiles = []
    for rows in np.split(order, np.flatnonzero(np.diff(group.ravel()[order])) + 1):
        lo = np.floor(starts[rows].min(0) / STRIDE).astype(np.int64) * STRIDE - m
        hi = np.ceil((starts[rows].max(0) + p) / STRIDE).astype(np.int64) * STRIDE + m
        tiles.append(Tile(int(lo[0]), int(lo[1]), int(hi[0] - lo[0]), int(hi[1] - lo[1]), rows))
    return tiles


def _integral(x: torch.Tensor) -> torch.Tensor:
    """Summed-area table of a ``(c, h, w)`` map and of its square: ``((h + 1) * (w + 1), 2c)`` float64, row-major.

    The prefix sums run as one vectorised add per row and per column (``torch.cumsum`` along a strided axis is ~30x
    slower on a CPU).
    """
    c, h, w = x.shape
    out = torch.empty((h + 1, w + 1, 2 * c), dtype=torch.float64)
    out[0], out[:, 0] = 0.0, 0.0
    body = out[1:, 1:]
    body[..., :c] = x.permute(1, 2, 0)
    torch.square(body[..., :c], out=body[..., c:])
    for i in range(1, h):
        body[i] += body[i - 1]
    for j in range(1, w):
        body[:, j] += body[:, j - 1]
    return out.view(-1, 2 * c)


def _window_sums(table: torch.Tensor, shape: tuple[int, int], box: torch.Tensor) -> torch.Tensor:
    """Return the sums over fractional boxes ``(n, 4)`` = ``(y0, x0, y1, x1)`` in cells of a flat table, ``(n, 2c)``.

    The table is read at fractional positions bilinearly (area-weighted cells): 4 corners x 4 taps per box, gathered
    at once. ``shape`` is the map's ``(h, w)`` in cells.
    """
    h, w = shape
    y = box[:, [2, 0, 2, 0]].double()  # corners (y1, x1) + (y0, x0) - (y0, x1) - (y1, x0)
    x = box[:, [3, 1, 1, 3]].double()
    sign = torch.tensor([1.0, 1.0, -1.0, -1.0], dtype=torch.float64)
    y0, x0 = y.floor().clamp(0, h - 1), x.floor().clamp(0, w - 1)
    fy, fx = (y - y0).clamp(0, 1), (x - x0).clamp(0, 1)
    iy, ix = y0.long(), x0.long()
    taps = [
        (iy, ix, (1 - fy) * (1 - fx)),
        (iy, ix + 1, (1 - fy) * fx),
        (iy + 1, ix, fy * (1 - fx)),
        (iy + 1, ix + 1, fy * fx),
    ]
    idx = torch.cat([a * (w + 1) + b for a, b, _ in taps], 1)  # (n, 16)
    weight = torch.cat([wt * sign for _, _, wt in taps], 1)
    rows = table.index_select(0, idx.reshape(-1)).view(len(box), 16, -1)
    return torch.bmm(weight[:, None], rows)[:, 0]


def _spans(edges: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Return the distinct ``(start, end)`` rows of ``edges`` ``(n, 2)`` and each row's index among them."""
    unique, index = np.unique(edges, axis=0, return_inverse=True)
    return unique, index.ravel()


def _lattice_sums(x: torch.Tensor, rows: tuple, cols: tuple) -> np.ndarray:
    """Return box sums (as :func:`_box_sums`) from the lattice of the boxes' distinct row spans x column spans.

    ``rows`` and ``cols`` are :func:`_spans` of each box's ``(y0, y1)`` and ``(x0, x1)``; after the lattice, one read
    per box. Two matrix products per channel (cell coverage of each row span, of each column span), float64: on a
    small map with many channels (the deep stages) far cheaper than reading a summed-area table at 16 taps per box.
    """
    c, h, w = x.shape
    (rows_u, row), (cols_u, col) = rows, cols
    wy = torch.from_numpy(cover(rows_u[:, 0], rows_u[:, 1], h))
    wx = torch.from_numpy(cover(cols_u[:, 0], cols_u[:, 1], w).T.copy())
    m = x.double()
    lattice = torch.cat([wy @ m @ wx, wy @ (m * m) @ wx]).permute(1, 2, 0).reshape(-1, 2 * c)
    return lattice[torch.from_numpy(row * len(cols_u) + col)].numpy()


def _box_sums(x: torch.Tensor, boxes: np.ndarray) -> np.ndarray:
    """Return the sums of a ``(c, h, w)`` map and of its square over boxes ``(n, 4)`` = ``(y0, x0, y1, x1)`` in cells.

    ``(n, 2c)`` float64, each edge cell weighted by the fraction the box covers. Boxes on a lattice (a grid's) over a
    map of at most :data:`LATTICE_CELLS` cells per box use :func:`_lattice_sums`; others a summed-area table.
    """
    n, (h, w) = len(boxes), x.shape[1:]
    if h * w <= LATTICE_CELLS * n:
        rows, cols = _spans(boxes[:, [0, 2]]), _spans(boxes[:, [1, 3]])
        if len(rows[0]) * len(cols[0]) <= 4 * n + 4096:
            return _lattice_sums(x, rows, cols)
    return _window_sums(_integral(x), (h, w), torch.from_numpy(boxes)).numpy()


def _view_of(x: torch.Tensor, view: int) -> torch.Tensor:
    """View ``view`` of :func:`~stemst.pp._encoders.dihedral_views` of a ``(..., H, W)`` tensor (``H`` and ``W`` may differ)."""
    if view >= 4:
        x = x.flip(-1)
    return torch.rot90(x, view % 4, dims=(-2, -1)) if view % 4 else x


def view_boxes(boxes: np.ndarray, view: int, h: int, w: int) -> np.ndarray:
    """Boxes ``(n, 4)`` = ``(y0, x0, y1, x1)`` in a ``(h, w)`` region, in the frame of :func:`_view_of`'s ``view``.

    A flip maps ``x`` to ``w - x``; a quarter turn (:func:`torch.rot90`) maps ``(y, x)`` to ``(w - x, y)`` in a
    ``(w, h)`` region. The statistics are then read from the maps as the network returned them, never turned back.

    Examples
    --------
    >>> view_boxes(np.array([[0.0, 1.0, 2.0, 4.0]]), 1, 3, 5)
    array([[1., 0., 4., 2.]])
    """
    y0, x0, y1, x1 = np.asarray(boxes, np.float64).T
    if view >= 4:
        x0, x1 = w - x1, w - x0
    for _ in range(view % 4):
        y0, x0, y1, x1 = w - x1, y0, w - x0, y1
        h, w = w, h
    return np.stack([y0, x0, y1, x1], axis=1)


def fold_batchnorm(net: nn.Module) -> nn.Module:
    """Return a copy of ``net`` with every batch norm that directly follows a convolution folded into it.

    Inference only: the convolution's weights take the norm's scale and shift, the norm is replaced by its
    activation. The maps agree with the unfolded network's to float rounding (~1e-6 relative) and a dense pass,
    memory-bound on large tiles, skips one read and write of every activation map.
    """
    net = copy.deepcopy(net)
    for parent in list(net.modules()):
        before = None
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.BatchNorm2d) and isinstance(before, nn.Conv2d) and child.running_var is not None:
                scale = child.weight / torch.sqrt(child.running_var + child.eps)
                bias = before.bias if before.bias is not None else torch.zeros_like(scale)
                before.weight = nn.Parameter(before.weight * scale[:, None, None, None], requires_grad=False)
                before.bias = nn.Parameter((bias - child.running_mean) * scale + child.bias, requires_grad=False)
                setattr(
                    parent,
                    name,
                    nn.Sequential(getattr(child, "drop", nn.Identity()), getattr(child, "act", nn.Identity())),
                )
            before = child
    return net


class DenseStats:
    """Stage statistics of the default encoder for many spots from one dense pass per view.

    Parameters
    ----------
    encoder
        The encoder spec (input size, normalisation).
    net
        Its loaded :class:`StagePooled` network (:func:`dense_model`); its batch norms are folded into a copy.
    geom
        Patch and tile sizes.
    device
        Torch device the network runs on.
    """

    def __init__(self, encoder: Encoder, net: StagePooled, geom: DenseGeometry, device: torch.device):
        self.encoder, self.geom, self.device = encoder, geom, device
        self.net = fold_batchnorm(net).eval().to(device).to(memory_format=torch.channels_last)

    def windows(self, corners: np.ndarray) -> np.ndarray:
        """Each patch's top-left corner in model pixels, from its corner ``(y0, x0)`` at the pyramid level."""
        return corners.astype(np.float64) * self.geom.ratio

    def tiles(self, starts: np.ndarray) -> list[Tile]:
        """Return the tiles that compute the patches starting at ``starts`` (model px): :func:`plan_tiles`."""
        return plan_tiles(starts, self.geom)

    @torch.inference_mode()
    def view_features(self, x: torch.Tensor, boxes: np.ndarray, view: int) -> np.ndarray:
        """Features ``(n, D)`` of the patches ``boxes`` (model px in the tile) in view ``view`` of a tile ``x``."""
        h, w = x.shape[-2:]
        xv = _view_of(x, view)[None].to(self.device).contiguous(memory_format=torch.channels_last)
        autocast = torch.autocast("cuda", dtype=torch.bfloat16) if self.device.type == "cuda" else nullcontext()
        with autocast:
            maps = stage_maps(self.net, xv)
        vbox = view_boxes(boxes, view, h, w)
        p, parts = self.geom.input_size, []
        for fmap in maps:
            stride = xv.shape[-2] / fmap.shape[-2]
            fmap, cells = _crop_to_boxes(fmap[0], vbox / stride)
            parts += _mean_std(_box_sums(fmap.float().cpu(), cells), (p / stride) ** 2)
        return np.concatenate(parts, axis=1)

    def run(self, image: Any, corners: np.ndarray, *, views: int, mean_views: bool) -> np.ndarray:
        """Features of the patches at ``corners`` (level pixels): ``(n, views, D)``, or ``(n, D)`` with ``mean_views``.

        Each tile is read and resampled once; its views are passes of the network over the flipped / turned tile.
        """
        starts, p = self.windows(corners), self.geom.input_size
        tiles = self.tiles(starts)
        n = len(corners)
        out = np.zeros((n, self.net.dim) if mean_views else (n, views, self.net.dim), np.float32)
        logger.info("Dense pass: %d spots, %d tiles (%.0f M model px, margins included), %d view(s).", n, len(tiles),
                    sum(t.h * t.w for t in tiles) / 1e6, views)  # fmt: skip
        for tile in tiles:
            rgb = read_tile(image, self.geom, tile.y0, tile.x0, tile.h, tile.w)
            x = normalise(rgb, self.encoder.mean, self.encoder.std)
            rel = starts[tile.rows] - [tile.y0, tile.x0]
            boxes = np.concatenate([rel, rel + p], axis=1)
            for view in range(views):
                feats = self.view_features(x, boxes, view)
                if mean_views:
                    out[tile.rows] += feats / views
                else:
                    out[tile.rows, view] = feats
        return out


def _crop_to_boxes(fmap: torch.Tensor, cells: np.ndarray) -> tuple[torch.Tensor, np.ndarray]:
    """Crop a ``(c, h, w)`` map to the cells its boxes (in cells) touch, and move the boxes with it.

    The margin around the patches feeds the network, never a window: its summed-area table is not built.
    """
    lo = np.clip(np.floor(cells[:, :2].min(0)).astype(np.int64), 0, None)
    hi = np.minimum(np.ceil(cells[:, 2:].max(0)).astype(np.int64), fmap.shape[-2:])
    return fmap[:, lo[0] : hi[0], lo[1] : hi[1]], cells - np.tile(lo, 2)


def _mean_std(sums: np.ndarray, n: float) -> list[np.ndarray]:
    """Mean and (unbiased, as :meth:`torch.Tensor.std`) std from the sums of a map and of its square over n cells."""
    c = sums.shape[1] // 2
    mean = sums[:, :c] / n
    var = (sums[:, c:] - n * mean**2) / max(n - 1, 1.0)
    return [mean.astype(np.float32), np.sqrt(np.clip(var, 0, None)).astype(np.float32)]
