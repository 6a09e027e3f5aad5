"""The encoder spec: :class:`Encoder` (how to build and feed a model) and the wrapper that makes it return features."""

from __future__ import annotations

import importlib.util
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from stemst._errors import StemstDownloadError, StemstError
from stemst._utils import reading

from .hub import _check_hub, _hub_message

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
BIOPTIMUS_MEAN = (0.707223, 0.578729, 0.703617)
BIOPTIMUS_STD = (0.211883, 0.230117, 0.177517)
#: resolution assumed for encoders without a physical scale (ImageNet models): 20x, what most pathology models use
DEFAULT_MPP = 0.5


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
