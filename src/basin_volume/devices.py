"""Device facts the estimator needs, without naming any device type in the hot paths."""

from __future__ import annotations

import torch

__all__ = ["wide_dtype"]


def wide_dtype(device: torch.device | str) -> torch.dtype:
    """The widest float the device computes in: float64, except on Apple's MPS (float32).

    Log quantities are always accumulated in float64 on the CPU; this is for elementwise work
    done where the model lives.
    """
    return torch.float32 if torch.device(device).type == "mps" else torch.float64
