"""Checks of scalar settings shared by the estimator, the configuration and the results files.

Settings arrive as Python numbers, numpy scalars (``np.float32(0.01)``, ``np.int64(4)``) or
0-d tensors (``torch.tensor(0.01)``); :func:`as_number` turns the last two into the first, so
everything downstream (arithmetic, JSON, comparisons on resume) sees plain ``int``/``float``.
"""

from __future__ import annotations

import math
import numbers
from typing import Any

import torch

__all__ = ["MAX_RTOL", "MAX_SEED", "as_number", "check_positive", "check_rtol", "check_seed"]

MAX_RTOL = 0.5
"""Largest ``rtol`` accepted: a radius is accepted when ``|delta - cutoff| <= rtol * cutoff``,
so with ``rtol >= 1`` a point with delta near 0, deep inside the basin, would count as its
edge. At 0.5 every accepted delta lies in ``[cutoff / 2, 3 cutoff / 2]``."""

MAX_SEED = 2**63 - 1
"""Largest seed: seeds are mixed as 64-bit words, so a wider one would alias a smaller one."""


def as_number(value: Any) -> Any:
    """A numpy scalar or a one-element real tensor as a Python ``int``/``float``; anything
    else (including ``bool`` and Python numbers) unchanged."""
    if value is None or isinstance(value, bool) or type(value) in (int, float):
        return value
    if isinstance(value, torch.Tensor):
        if value.numel() != 1 or value.dtype.is_complex or value.dtype == torch.bool:
            return value
        if value.device.type == "meta":
            return value
        return value.item()
    if isinstance(value, numbers.Integral) and not isinstance(value, bool):
        return int(value)
    if isinstance(value, numbers.Real) and type(value).__module__ == "numpy":
        if str(getattr(value, "dtype", "")) == "bool":
            return value
        return float(value)
    return value


def check_positive(name: str, value: Any, *, integer: bool = False) -> int | float:
    """``value`` as a Python number, insisting that it is positive and finite (and an
    integer when ``integer``); a ``ValueError`` naming ``name`` otherwise."""
    value = as_number(value)
    ok = isinstance(value, int) if integer else isinstance(value, int | float)
    if isinstance(value, bool) or not ok or not math.isfinite(value) or value <= 0:
        kind = "a positive integer" if integer else "a positive finite number"
        raise ValueError(f"{name} must be {kind}, got {value!r}")
    return value


def check_bidirectional(value: Any) -> bool | None:
    """``bidirectional`` as ``True``, ``False`` or ``None`` (on without a budget)."""
    if value is not None and not isinstance(value, bool):
        raise ValueError(
            f"bidirectional must be True, False or None (on without a budget), got {value!r}"
        )
    return value


def check_rtol(value: Any) -> float:
    """``rtol`` as a float in ``(0, MAX_RTOL]``."""
    value = check_positive("rtol", value)
    if value > MAX_RTOL:
        raise ValueError(
            f"rtol must be at most {MAX_RTOL} (each radius is found to |delta - cutoff| <= "
            f"rtol * cutoff, so rtol >= 1 accepts points deep inside the basin as its edge), "
            f"got {value!r}; the default is 0.01"
        )
    return float(value)


def check_seed(value: Any) -> int:
    """``seed`` as an int in ``0 ... MAX_SEED``."""
    value = as_number(value)
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError(f"seed must be an int, got {value!r}")
    if not 0 <= value <= MAX_SEED:
        raise ValueError(
            f"seed must be in 0 ... 2**63 - 1 (seeds are mixed as 64-bit words, so a wider one "
            f"would repeat a smaller one's directions), got {value!r}"
        )
    return value
