"""The fingerprint of a loaded encoder: a digest of what it computes, part of the embedding cache key."""

from __future__ import annotations

import hashlib
import types
from typing import Any

import torch
from torch import nn

from .spec import _Features


def fingerprint(model: Any) -> str:
    """Digest what a loaded encoder computes: its class, structure, ``forward`` code and every weight.

    Two models with the same fingerprint give the same embeddings (up to float nondeterminism); a changed weight,
    layer or ``forward`` gives another. For a plain callable it covers the code and the simple values it closes over
    (numbers, strings, modules), not global state it reads. Used as part of the embedding cache key.

    Parameters
    ----------
    model
        What :meth:`Encoder.load` returns, an :class:`torch.nn.Module` (TorchScript included) or a callable.

    Returns
    -------
    32 hex digits.

    Examples
    --------
    >>> a, b = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)
    >>> fingerprint(a) == fingerprint(a), fingerprint(a) == fingerprint(b)
    (True, False)
    """
    h = hashlib.blake2b(digest_size=16)
    _digest_callable(model.model if isinstance(model, _Features) else model, h, depth=0)
    return h.hexdigest()


def _digest_callable(obj: Any, h: Any, *, depth: int) -> None:
    kind = type(obj)
    h.update(f"{kind.__module__}.{kind.__qualname__}".encode())
    if isinstance(obj, nn.Module):
        h.update(repr(obj).encode())  # layers and their hyper-parameters
        code = getattr(obj, "code", None)  # TorchScript source
        if isinstance(code, str):
            h.update(code.encode())
        else:
            _digest_code(getattr(kind.forward, "__code__", None), h)
        for name, value in obj.state_dict().items():
            t = value.detach().to("cpu").contiguous()
            h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
        return
    fn = obj if isinstance(obj, (types.FunctionType, types.MethodType)) else kind.__call__
    fn = getattr(fn, "__func__", fn)
    h.update(getattr(fn, "__qualname__", "").encode())
    _digest_code(getattr(fn, "__code__", None), h)
    for cell in getattr(fn, "__closure__", None) or ():
        try:
            value = cell.cell_contents
        except ValueError:  # an empty cell
            continue
        if isinstance(value, (nn.Module, types.FunctionType)) and depth < 4:
            _digest_callable(value, h, depth=depth + 1)
        elif value is None or isinstance(value, (bool, int, float, str, bytes, tuple)):
            h.update(repr(value).encode())
        else:
            h.update(type(value).__qualname__.encode())


def _digest_code(code: types.CodeType | None, h: Any) -> None:
    if code is None:
        return
    h.update(code.co_code)
    h.update(repr(code.co_names).encode())
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            _digest_code(const, h)
        elif isinstance(const, frozenset):  # its repr order depends on string hashing, which varies per process
            h.update(repr(sorted(map(repr, const))).encode())
        else:
            h.update(repr(const).encode())
