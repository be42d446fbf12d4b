"""Pieces shared by the full-scale scripts: devices, torchrun, resumable runs, summaries.

Nothing here is part of the library. The scripts sit beside this file, so
``python experiments/full_scale/<script>.py`` finds it.

Running under ``torchrun``
--------------------------
:func:`basin_volume.run_to_file` shards the directions over the ranks and rank 0 writes the
run log and the result, so runs are resumable direction by direction with any number of
processes. Adaptive runs (a callable source) are saved when done; an interrupted one
restarts, while a finished one is skipped.
"""

from __future__ import annotations

import json
import math
import os
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch

import basin_volume as bv

__all__ = [
    "agree",
    "barrier",
    "cached_tensor",
    "finished",
    "pick_device",
    "print0",
    "run_estimate",
    "setup_distributed",
    "summary_row",
    "write_json",
]


# --------------------------------------------------------------------------- processes
def setup_distributed() -> tuple[int, int, int]:
    """Join torchrun's process group if there is one: ``(rank, world_size, local_rank)``."""
    from basin_volume.distributed import init_from_env, world

    init_from_env()
    rank, size = world()
    return rank, size, int(os.environ.get("LOCAL_RANK", "0"))


def barrier() -> None:
    """Wait for every rank (no-op in a single process)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()


def _rank() -> int:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank()
    return 0


def _world_size() -> int:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_world_size()
    return int(os.environ.get("WORLD_SIZE", "1"))


def agree(value):
    """Rank 0's ``value`` on every rank (so that all ranks take the same branch)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        box = [value]
        torch.distributed.broadcast_object_list(box, src=0)
        return box[0]
    return value


def print0(*args, **kwargs) -> None:
    """``print`` on rank 0 only, flushed."""
    if _rank() == 0:
        print(*args, **kwargs, flush=True)


def pick_device(name: str, local_rank: int = 0) -> torch.device:
    """``"auto"``: ``cuda:LOCAL_RANK`` if CUDA is available, else MPS, else the CPU."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", local_rank)
        mps = getattr(torch.backends, "mps", None)
        if mps is not None and mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"--device {name}: CUDA is not available here; use --device cpu or auto")
    if device.type == "cuda" and device.index is None and _world_size() > 1:
        device = torch.device("cuda", local_rank)
    return device


# --------------------------------------------------------------------------- files
def _plain(value: Any) -> Any:
    """JSON-safe: non-finite floats as strings (as the library writes them), paths as text."""
    if isinstance(value, float) and not math.isfinite(value):
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        return _plain(value.item())
    return value


def write_json(path: str | os.PathLike, data: Any) -> None:
    """Write ``data`` as indented JSON (rank 0 only), atomically."""
    if _rank() != 0:
        return
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(_plain(data), indent=1, allow_nan=False) + "\n")
    os.replace(tmp, path)


def cached_tensor(path: str | os.PathLike, build: Callable[[], torch.Tensor], *, fresh: bool):
    """Load a tensor saved at ``path``, or build it (on rank 0) and save it there first.

    Preconditioner scales are cached this way so that a resumed run uses bit-identical
    scales (the run log checks their fingerprint), even where the computation that made them
    is not deterministic (GPU reductions, a different number of processes).
    """
    path = Path(path)
    if agree(fresh or not path.exists()):
        if _rank() == 0:
            tensor = build().detach().to("cpu", torch.float64)
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(path.name + ".tmp")
            torch.save(tensor, tmp)
            os.replace(tmp, path)
        barrier()
    return torch.load(path, map_location="cpu", weights_only=True)


def finished(path: str | os.PathLike, n_samples: int) -> bv.VolumeResult | None:
    """The result saved at ``path`` if it has at least ``n_samples`` directions."""
    path = Path(path)
    if not path.exists():
        return None
    try:
        result = bv.VolumeResult.load(path)
    except (ValueError, OSError):
        return None
    return result if result.n_samples >= n_samples else None


# --------------------------------------------------------------------------- running
def run_estimate(
    source: bv.VolumeConfig | Callable[[], bv.VolumeResult],
    output: str | os.PathLike,
    *,
    overwrite: bool,
    spec: Mapping[str, Any],
) -> bv.VolumeResult:
    """Run one estimate and save it to ``output``.

    Parameters
    ----------
    source : VolumeConfig or callable
        A model-level configuration (run with :func:`basin_volume.run_to_file`, resumable
        direction by direction, also under torchrun), or a function returning a finished
        :class:`~basin_volume.VolumeResult` (adaptive runs; saved when done).
    output : path-like
        The results JSON.
    overwrite : bool
        Start afresh even if a run log or result exists; otherwise continue it.
    spec : mapping
        Description of the run kept in the result's ``meta["spec"]``.
    """
    output = Path(output)
    if isinstance(source, bv.VolumeConfig):
        if _rank() == 0:
            output.parent.mkdir(parents=True, exist_ok=True)
        return bv.run_to_file(
            source, output, resume=not overwrite, overwrite=overwrite, spec=dict(spec)
        )
    result = source()
    result.meta["spec"] = _plain(dict(spec))
    if _rank() == 0:
        output.parent.mkdir(parents=True, exist_ok=True)
        result.save(output)
    barrier()
    return result


def summary_row(result: bv.VolumeResult, **extra: Any) -> dict:
    """One row of a ``scan.json`` (the format :func:`basin_volume.plot_scan` reads)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", bv.LowESSWarning)
        low, high = result.interval(0.95) if result.n_samples >= 2 else (-math.inf, math.inf)
    return {
        **{k: os.fspath(v) if isinstance(v, os.PathLike) else v for k, v in extra.items()},
        "log_volume": result.log_volume,
        "information_nats": -result.log_volume,
        "low": low,
        "high": high,
        "ess": result.ess,
        "n_samples": result.n_samples,
        "n_failed": result.n_failed,
        "measure": result.measure,
        "cutoff": result.cutoff,
        "dim": result.dim,
    }
