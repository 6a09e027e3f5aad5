"""The torch helpers every module shares: the device, mixed precision and random generators."""

from __future__ import annotations

from contextlib import AbstractContextManager

import torch

from stemst._utils import RNGLike, as_seed


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """Return the :class:`torch.device` for ``device``: ``"auto"`` is CUDA if available, else CPU.

    Examples
    --------
    >>> resolve_device("cpu")
    device(type='cpu')
    """
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def autocast(device: torch.device) -> AbstractContextManager:
    """Return bf16 autocast on CUDA, a no-op context elsewhere.

    Examples
    --------
    >>> with autocast(torch.device("cpu")):
    ...     y = torch.ones(2) * 2
    """
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return torch.autocast("cpu", enabled=False)


def torch_generator(rng: RNGLike, device: torch.device) -> torch.Generator:
    """Return a seeded :class:`torch.Generator` on ``device``.

    An int seeds it directly; a numpy generator (or ``None``: fresh entropy) draws the seed.

    Examples
    --------
    >>> g = torch_generator(0, torch.device("cpu"))
    >>> torch.equal(torch.rand(2, generator=g), torch.rand(2, generator=torch_generator(0, torch.device("cpu"))))
    True
    """
    return torch.Generator(device=device).manual_seed(as_seed(rng))
