"""Sharding directions over processes with :mod:`torch.distributed` (``torchrun``).

Directions are independent. Every rank evaluates the first
:data:`~basin_volume.ray_loop.WARMUP` directions itself (they fix the radius search's first
guess); the rest go in rounds of ``W * model_batch_size`` directions, rank ``r`` taking every
``W``-th, and each round's records are shared with every rank (:func:`gather_records`)
before the next. Direction ``k`` uses the same seed whatever ``W`` is, so each direction's
result is the same as in a single-process run, and every rank holds every finished
direction, so rank 0 can write them all to a run log as they come.

Under ``torchrun`` a failing rank makes the launcher stop the others, so a job never hangs on
a dead peer; when this module creates the process group itself it also sets a finite
collective timeout.
"""

from __future__ import annotations

import atexit
import datetime
import os
from collections.abc import Callable
from typing import Any, TypeVar

import torch
import torch.distributed as dist

__all__ = ["broadcast_object", "from_rank0", "gather_records", "init_from_env", "world"]

TIMEOUT = datetime.timedelta(minutes=10)
T = TypeVar("T")


def init_from_env() -> bool:
    """Join the process group described by torchrun's environment, if any and not yet joined.

    Returns whether a multi-process group is active. The backend is NCCL when CUDA is
    available and gloo otherwise (override with ``BASIN_VOLUME_BACKEND``).
    """
    if not dist.is_available():
        return False
    if dist.is_initialized():
        return dist.get_world_size() > 1
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    backend = os.environ.get("BASIN_VOLUME_BACKEND") or (
        "nccl" if torch.cuda.is_available() else "gloo"
    )
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend=backend, timeout=TIMEOUT)
    if backend == "gloo":
        # A gloo group left alive at exit can abort the process; NCCL's teardown waits for
        # the peers, which would hang a rank that exits on an error, so it is left to exit.
        atexit.register(_shutdown)
    return dist.get_world_size() > 1


def _shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def world() -> tuple[int, int]:
    """``(rank, world_size)``; ``(0, 1)`` outside a process group."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def gather_records(records: list) -> list:
    """Every rank's records, merged by index (every rank gets the full list); a collective
    call, so every rank must make it."""
    _, size = world()
    if size == 1:
        return sorted(records, key=lambda r: r.index)
    parts: list = [None] * size
    dist.all_gather_object(parts, records)
    merged = {}
    for part in parts:
        for record in part:
            merged.setdefault(record.index, record)
    return [merged[k] for k in sorted(merged)]


def broadcast_object(obj: Any) -> Any:
    """``obj`` as rank 0 has it, on every rank (pickled by :mod:`torch.distributed`; for small
    objects). A collective call."""
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def from_rank0(compute: Callable[[], T]) -> T:
    """``compute()`` run on rank 0 only and its value returned on every rank; outside a
    process group simply ``compute()``.

    A tensor travels by :func:`torch.distributed.broadcast` (no pickling of large data) and
    comes back on the CPU on every rank; anything else by :func:`broadcast_object`. An
    exception on rank 0 is raised there and reported on every other rank, so no rank waits
    for a value that will never come. A collective call: every rank must make it.
    """
    rank, size = world()
    if size == 1:
        return compute()
    value: Any = None
    if rank == 0:
        try:
            value = compute()
        except BaseException as err:
            broadcast_object(("error", f"{type(err).__name__}: {err}"))
            raise
        if isinstance(value, torch.Tensor):
            value = value.detach().contiguous()
            head = ("tensor", tuple(value.shape), value.dtype)
        else:
            head = ("object", value)
        broadcast_object(head)
    else:
        head = broadcast_object(None)
    if head[0] == "error":
        raise RuntimeError(f"rank 0 failed: {head[1]}")
    if head[0] == "object":
        return head[1]
    _, shape, dtype = head
    device = torch.device("cpu")
    if dist.get_backend() == "nccl":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    buf = value.to(device) if rank == 0 else torch.empty(shape, dtype=dtype, device=device)
    dist.broadcast(buf, src=0)
    return buf.cpu()
