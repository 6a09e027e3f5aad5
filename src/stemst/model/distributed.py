"""Data-parallel training with PyTorch's own engine: a process group from ``torchrun``'s environment and DDP.

Under ``torchrun --nproc_per_node=N ...`` (one node) or ``torchrun --nnodes=M --rdzv_backend=c10d
--rdzv_endpoint=HOST:PORT ...`` (several nodes), every process sees ``RANK``, ``LOCAL_RANK`` and ``WORLD_SIZE``.
:func:`init` starts the process group from them (NCCL when CUDA is available, gloo on CPU); the training loop
(:func:`stemst.model.train`) then wraps the module in :class:`~torch.nn.parallel.DistributedDataParallel` and
splits each global batch across the processes:

- every process draws the same global batch, the same diffusion steps and the same noise (one seed), and computes
  the loss of its own share of the rows; the gradient is averaged by DDP and weighted by the rows each process
  had, so ``N`` processes with a global batch ``B`` take the same steps as one process with batch ``B`` (within
  float tolerance);
- the held-out loss of early stopping and the calibration's samples are shared: each process computes every
  ``world_size``-th chunk of the held-out rows and the results are added up (:func:`all_sum`); the EMA is
  computed identically on every process; rank 0 alone writes checkpoints and saved models, and the others wait for
  it (:func:`barrier`).

Outside ``torchrun`` (no ``WORLD_SIZE`` or ``WORLD_SIZE=1``) nothing here does anything: one process is a world of one.
"""

from __future__ import annotations

import datetime
import os

import torch
import torch.distributed as dist

from stemst._logging import logger

#: how long a collective waits for the other processes before failing (a crashed rank must not hang the others)
TIMEOUT = datetime.timedelta(minutes=30)


def env_world_size() -> int:
    """``WORLD_SIZE`` as torchrun sets it (1 when not launched by torchrun).

    Examples
    --------
    >>> env_world_size() >= 1
    True
    """
    return int(os.environ.get("WORLD_SIZE", "1"))


def active() -> bool:
    """Whether a process group of more than one process is running."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    """Return this process's rank (0 without a process group)."""
    return dist.get_rank() if active() else 0


def world_size() -> int:
    """Return the number of processes (1 without a process group)."""
    return dist.get_world_size() if active() else 1


def is_main() -> bool:
    """Whether this process writes files and shows progress (rank 0, or the only process).

    Examples
    --------
    >>> is_main()
    True
    """
    return rank() == 0


def init(backend: str | None = None) -> bool:
    """Start the process group from torchrun's environment, once; return whether training is distributed.

    Parameters
    ----------
    backend
        ``"nccl"`` or ``"gloo"``; default NCCL when CUDA is available, else gloo.

    Returns
    -------
    True when ``WORLD_SIZE > 1`` (the group is started here or was started by the caller), else False.

    Raises
    ------
    RuntimeError
        If ``WORLD_SIZE > 1`` but ``RANK`` or the rendezvous address is missing (the script was not launched by
        torchrun), naming what is missing.
    """
    if active():
        return True
    if env_world_size() <= 1:
        return False
    missing = [k for k in ("RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
    if missing:
        raise RuntimeError(
            f"WORLD_SIZE={env_world_size()} but {', '.join(missing)} not set: launch with torchrun "
            "(e.g. `torchrun --nproc_per_node=2 -m stemst fit STORE.zarr --out MODEL`)."
        )
    cuda = torch.cuda.is_available()
    backend = backend or ("nccl" if cuda else "gloo")
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    dist.init_process_group(backend=backend, timeout=TIMEOUT)
    logger.info("Process group started: rank %d of %d (%s).", dist.get_rank(), dist.get_world_size(), backend)
    return True


def device(dev: torch.device) -> torch.device:
    """Return this process's device: ``cuda:LOCAL_RANK`` for an unnumbered CUDA device under torchrun, else ``dev``."""
    if dev.type == "cuda" and dev.index is None and active():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return dev


def shard(n: int) -> slice:
    """Return the rows of a batch of ``n`` that this process computes (contiguous; sizes differ by <= 1).

    Examples
    --------
    >>> shard(10)
    slice(0, 10, None)
    """
    r, w = rank(), world_size()
    return slice(n * r // w, n * (r + 1) // w)


def wrap(module: torch.nn.Module, dev: torch.device) -> torch.nn.Module:
    """Wrap ``module`` in DDP when distributed (its parameters broadcast from rank 0); else return it as it is.

    The buffers (the data statistics) are the same on every process and are not re-broadcast at each step.
    """
    if not active():
        return module
    from torch.nn.parallel import DistributedDataParallel

    ids = [dev.index] if dev.type == "cuda" else None
    return DistributedDataParallel(module, device_ids=ids, forward_sync_buffers=False)


def all_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum ``t`` over the processes (``t`` itself when not distributed); ``t`` is reduced in place."""
    if active():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def agree(flag: bool, dev: torch.device) -> bool:
    """Return rank 0's value of ``flag`` on every process (so that all stop at the same step)."""
    if not active():
        return bool(flag)
    t = torch.tensor([int(bool(flag))], device=dev)
    dist.broadcast(t, src=0)
    return bool(t.item())


def barrier() -> None:
    """Wait for every process (no-op without a process group)."""
    if active():
        dist.barrier()
