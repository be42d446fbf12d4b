"""Sharding directions over processes with :mod:`torch.distributed` (``torchrun``).

Directions are independent. Every rank evaluates the first
:data:`~basin_volume.estimator.WARMUP` directions itself (they fix the radius search's first
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

import datetime
import os

import torch
import torch.distributed as dist

__all__ = ["gather_records", "init_from_env", "world"]

TIMEOUT = datetime.timedelta(minutes=10)


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
    return dist.get_world_size() > 1


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
