"""Device facts the estimator needs, without naming any device type in the hot paths."""

from __future__ import annotations

import os

import torch

__all__ = ["available_ram_bytes", "default_device", "wide_dtype"]


def wide_dtype(device: torch.device | str) -> torch.dtype:
    """The widest float the device computes in: float64, except on Apple's MPS (float32).

    Log quantities are always accumulated in float64 on the CPU; this is for elementwise work
    done where the model lives.
    """
    return torch.float32 if torch.device(device).type == "mps" else torch.float64


def default_device() -> torch.device:
    """Where a model goes when the user names no device: this process's GPU (``cuda`` at
    torchrun's ``LOCAL_RANK``), else Apple's MPS, else the CPU."""
    if torch.cuda.is_available():
        local_rank, count = int(os.environ.get("LOCAL_RANK", "0")), torch.cuda.device_count()
        if local_rank >= count:
            raise RuntimeError(
                f"LOCAL_RANK={local_rank} but this machine shows {count} GPU(s): launch at "
                "most one process per GPU (torchrun --nproc_per_node)"
            )
        return torch.device("cuda", local_rank)
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def available_ram_bytes() -> int | None:
    """Host memory available now (``None`` where the OS does not say)."""
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None
