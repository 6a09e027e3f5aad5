"""Image encoders: a registry of name -> :class:`Encoder` spec (how to build the model and feed it).

An encoder is anything that maps a normalised image batch ``(B, 3, H, W)`` to features ``(B, D)``. A spec says how
to build it (lazily: hub weights are fetched only when the encoder is used), its input size, its normalisation and
the physical resolution it was trained at, which sets the default patch size of :func:`stemst.pp.embed_patches`.

The parts: :mod:`.spec` (the :class:`Encoder` spec), :mod:`.hub` (hub checks), :mod:`.models` (the built-in models),
:mod:`.registry` (the built-in encoders, one declaration each, and resolving what a user passed),
:mod:`.fingerprint` (the digest in the embedding cache key) and :mod:`.transforms` (views and normalisation).
"""

from .fingerprint import fingerprint
from .hub import HUB_TIMEOUT_S
from .models import ColorStats, StagePooled, _Conch, _efficientnet_lite0, _HFCls, _Virchow2
from .registry import BUILTIN, hub_encoder, list_encoders, register_encoder, resolve_encoder, resolve_encoders
from .spec import (
    BIOPTIMUS_MEAN,
    BIOPTIMUS_STD,
    DEFAULT_MPP,
    IMAGENET_MEAN,
    IMAGENET_STD,
    OPENAI_CLIP_MEAN,
    OPENAI_CLIP_STD,
    Encoder,
)
from .transforms import dihedral_views, normalise

# The fingerprint hashes a module's class with the module it is defined in, and every embedding cache key holds the
# fingerprint: the model classes keep the module they had before this package was split, so caches stay valid.
for _cls in (StagePooled, ColorStats, _Virchow2, _HFCls, _Conch):
    _cls.__module__ = __name__
del _cls

__all__ = [
    "BIOPTIMUS_MEAN",
    "BIOPTIMUS_STD",
    "BUILTIN",
    "DEFAULT_MPP",
    "HUB_TIMEOUT_S",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "OPENAI_CLIP_MEAN",
    "OPENAI_CLIP_STD",
    "ColorStats",
    "Encoder",
    "StagePooled",
    "dihedral_views",
    "fingerprint",
    "hub_encoder",
    "list_encoders",
    "normalise",
    "register_encoder",
    "resolve_encoder",
    "resolve_encoders",
]
