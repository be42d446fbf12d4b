"""The one JSON codec of the project: non-finite floats as the strings ``"nan"``, ``"inf"``
and ``"-inf"``.

Strict JSON has no NaN or infinity, yet a basin estimate can be ``-inf`` (no direction held
mass) and a failed direction ``nan``. Results files, run logs, scan tables and the command
line's JSON output all write such floats as strings and read them back with :func:`decode`.

>>> encode(float("-inf")), encode(1.5), encode(3)
('-inf', 1.5, 3)
>>> decode("nan") != decode("nan"), decode("-inf"), decode(2)
(True, -inf, 2.0)
>>> dumps({"log_volume": float("nan"), "n": 2})
'{"log_volume":"nan","n":2}'
"""

from __future__ import annotations

import enum
import json
import math
import os
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

__all__ = ["NONFINITE", "decode", "dumps", "encode", "is_nonfinite", "jsonable"]

NONFINITE = ("nan", "inf", "-inf")
"""How non-finite floats are written."""


def encode(x: Any) -> Any:
    """``x``, with a non-finite float as its string (``"nan"``, ``"inf"``, ``"-inf"``)."""
    if isinstance(x, float) and not math.isfinite(x):
        return "nan" if math.isnan(x) else ("inf" if x > 0 else "-inf")
    return x


def is_nonfinite(x: Any) -> bool:
    """Whether ``x`` is one of the strings :func:`encode` writes for a non-finite float."""
    return isinstance(x, str) and x in NONFINITE


def decode(x: Any, *, error: type[Exception] = ValueError) -> float:
    """The float that :func:`encode` wrote as ``x``.

    Parameters
    ----------
    x : int, float or str
        A number, or one of ``"nan"``, ``"inf"``, ``"-inf"``.
    error : type of Exception
        Raised, with a message saying what was found, when ``x`` is not such a value.
    """
    if isinstance(x, str):
        if x in NONFINITE:
            return float(x)
        raise error(f"expected a number or 'nan'/'inf'/'-inf', found {x!r}")
    if isinstance(x, bool) or not isinstance(x, int | float):
        raise error(f"expected a number, found {x!r}")
    try:
        return float(x)
    except OverflowError:  # an integer beyond float range
        raise error(f"expected a number within float range, found {x!r}") from None


def jsonable(value: Any) -> Any:
    """Plain JSON values: non-finite floats as strings, tensors and objects by description."""
    if isinstance(value, enum.Enum):
        return jsonable(value.value)
    if isinstance(value, np.generic) and isinstance(value.item(), bool | int | float):
        return jsonable(value.item())
    if isinstance(value, bool) or value is None or isinstance(value, str | int):
        return value
    if isinstance(value, float):
        return encode(value)
    if isinstance(value, Mapping):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [jsonable(v) for v in value]
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if isinstance(value, torch.Tensor):
        if value.numel() == 1:
            return jsonable(value.item())
        return f"Tensor(shape={list(value.shape)}, dtype={str(value.dtype).removeprefix('torch.')})"
    return type(value).__name__


def dumps(obj: Any) -> str:
    """One compact line of strict JSON (see :func:`jsonable`)."""
    return json.dumps(jsonable(obj), separators=(",", ":"), allow_nan=False)
