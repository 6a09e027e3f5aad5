"""Image transforms shared by the embedding paths: the 8 dihedral views and per-channel normalisation."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch


def dihedral_views(x: torch.Tensor, *, dims: tuple[int, int] = (-2, -1)) -> torch.Tensor:
    """Stack the 8 flips/rotations of a square image batch ``(B, C, H, W)`` -> ``(B, 8, C, H, W)``; view 0 is ``x``.

    Views 0-3 rotate by 0, 90, 180, 270 degrees; views 4-7 do the same after a horizontal flip. ``dims`` names the
    (height, width) axes: ``(1, 2)`` for a channels-last ``(B, H, W, C)`` batch, giving ``(B, 8, H, W, C)``.
    """
    flipped = x.flip(dims[1])
    views = [torch.rot90(x, k, dims=dims) for k in range(4)]
    views += [torch.rot90(flipped, k, dims=dims) for k in range(4)]
    return torch.stack(views, dim=1)


def normalise(x: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """``(x - mean) / std`` per channel for a ``(..., 3, H, W)`` batch in ``[0, 1]``."""
    m = torch.as_tensor(np.asarray(mean, np.float32), device=x.device).view(3, 1, 1)
    s = torch.as_tensor(np.asarray(std, np.float32), device=x.device).view(3, 1, 1)
    return (x - m) / s
