"""The torch helpers every module shares: the device, mixed precision and random generators."""

from __future__ import annotations

from contextlib import AbstractContextManager

import torch

from stemst._utils import RNGLike, as_seed


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """Return the :class:`torch.device` for ``device``: ``"auto"`` is CUDA if available, else CPU.

    Every function that takes a ``device`` resolves it here, so that a device this machine does not have is refused
    at once, naming it, instead of failing later inside torch.

    Raises
    ------
    ValueError
        If ``device`` is not a device name, or names a CUDA device (or Apple MPS) this machine's torch cannot use.

    Examples
    --------
    >>> resolve_device("cpu")
    device(type='cpu')
    """
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"device={device!r} is not a device: use 'auto', 'cpu', 'cuda' or 'cuda:N' ({e}).") from None
    if dev.type == "cuda":
        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if n == 0:
            raise ValueError(
                f"device={str(device)!r}, but torch finds no CUDA GPU here (no GPU, no driver, or a CPU-only torch "
                "build). Use device='cpu', or 'auto' to take a GPU only when there is one."
            )
        if dev.index is not None and dev.index >= n:
            raise ValueError(f"device={str(device)!r}, but this machine has {n} CUDA GPU(s): cuda:0 to cuda:{n - 1}.")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"device={str(device)!r}, but Apple's MPS is not available here. Use device='cpu'.")
    return dev


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
