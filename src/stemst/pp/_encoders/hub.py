"""Hugging Face hub checks: fail fast, naming the encoder and what to do, when hub weights cannot be had."""

from __future__ import annotations

from pathlib import Path

from stemst._errors import StemstDownloadError

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
