"""PyTorch DDP plumbing for ``emorph train`` under ``torchrun`` (env:// rendezvous).

``torchrun --nproc_per_node N -m emorph_deploy train ...`` (or ``torchrun $(which emorph) train ...``) sets
``RANK``/``WORLD_SIZE``/``LOCAL_RANK``/``MASTER_ADDR``/``MASTER_PORT``; :func:`init_distributed` then joins
the process group (``nccl`` on CUDA, ``gloo`` on CPU) and picks the local device. Without those variables the
run is a plain single process. Only rank 0 writes files (checkpoints, logs, progress bar).
"""

from __future__ import annotations

import datetime as _dt
import os
from dataclasses import dataclass
from typing import Any

from emorph_deploy.errors import InputError

__all__ = [
    "DistContext",
    "all_reduce_mean",
    "barrier",
    "cleanup_distributed",
    "init_distributed",
    "is_torchrun",
]


@dataclass(frozen=True)
class DistContext:
    """Where this process sits: ``rank`` of ``world_size`` processes, on ``device``."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: str = "cpu"
    backend: str | None = None  # None = not distributed

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def is_torchrun() -> bool:
    """True when launched by torchrun (or any env:// launcher) with more than one process."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def _resolve_device(device: str, local_rank: int) -> str:
    import torch

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise InputError(
                "device 'cuda' was requested but no CUDA GPU is available; fix: pass --device cpu"
            )
        if device == "cuda":
            device = f"cuda:{local_rank % max(torch.cuda.device_count(), 1)}"
        torch.cuda.set_device(torch.device(device))
    elif device != "cpu":
        raise InputError(f"device must be auto, cpu or cuda[:N]; got {device!r}")
    return device


def init_distributed(device: str = "auto", timeout_s: float = 1800.0) -> DistContext:
    """Join the env:// process group if launched by torchrun, else return a single-process context."""
    import torch.distributed as dist

    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = _resolve_device(device, local_rank)
    if world <= 1:
        return DistContext(0, 1, 0, dev, None)
    if not dist.is_available():
        raise InputError(
            "torch.distributed is not available in this PyTorch build; fix: run without torchrun"
        )
    backend = "nccl" if dev.startswith("cuda") else "gloo"
    if not dist.is_initialized():
        dist.init_process_group(
            backend=backend,
            init_method="env://",
            rank=rank,
            world_size=world,
            timeout=_dt.timedelta(seconds=timeout_s),
        )
    return DistContext(rank, world, local_rank, dev, backend)


def cleanup_distributed() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def barrier(ctx: DistContext) -> None:
    if ctx.distributed:
        import torch.distributed as dist

        dist.barrier()


def all_reduce_mean(ctx: DistContext, values: dict[str, float]) -> dict[str, float]:
    """Mean of scalar metrics over ranks (NaN-aware: a NaN on every rank stays NaN)."""
    if not ctx.distributed or not values:
        return values
    import math

    import torch
    import torch.distributed as dist

    keys = sorted(values)
    vals = torch.tensor([values[k] for k in keys], dtype=torch.float64)
    finite = torch.isfinite(vals)
    sums = torch.where(finite, vals, torch.zeros_like(vals))
    counts = finite.to(torch.float64)
    packed = torch.cat([sums, counts]).to(ctx.device)
    dist.all_reduce(packed, op=dist.ReduceOp.SUM)
    packed = packed.cpu()
    n = len(keys)
    out: dict[str, float] = {}
    for i, k in enumerate(keys):
        c = float(packed[n + i])
        out[k] = float(packed[i]) / c if c > 0 else math.nan
    return out


def broadcast_object(ctx: DistContext, obj: Any, src: int = 0) -> Any:
    """Send a small picklable object from ``src`` to every rank (used for the run decision, not for data)."""
    if not ctx.distributed:
        return obj
    import torch.distributed as dist

    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]
