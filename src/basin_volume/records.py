"""One direction's record, as every callback receives it and every file stores it."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from .jsonfloat import decode, encode
from .radius import RayStatus

__all__ = ["DirectionRecord", "ResultFileError"]

STATUSES = frozenset(s.value for s in RayStatus)
"""The statuses a direction may end with (:class:`~basin_volume.radius.RayStatus`)."""


class ResultFileError(ValueError):
    """A results file is not a valid saved :class:`VolumeResult`."""


def _decode(x: Any) -> float:
    return decode(x, error=ResultFileError)


@dataclass(frozen=True)
class DirectionRecord:
    """Everything kept about one direction (one row of a :class:`VolumeResult`)."""

    index: int
    estimate: float
    delta: float
    prop: float
    radius: float
    logabsint: float
    n_evals: int
    status: str
    slope: float

    def to_json(self) -> dict:
        return {k: encode(v) for k, v in self.__dict__.items()}

    @classmethod
    def from_json(cls, data: dict) -> DirectionRecord:
        try:
            record = cls(
                index=_integer(data["index"]),
                estimate=float(_decode(data["estimate"])),
                delta=float(_decode(data["delta"])),
                prop=float(_decode(data["prop"])),
                radius=float(_decode(data["radius"])),
                logabsint=float(_decode(data["logabsint"])),
                n_evals=_integer(data["n_evals"]),
                status=data["status"],
                slope=float(_decode(data["slope"])),
            )
        except (KeyError, TypeError, ResultFileError) as err:
            raise ResultFileError(f"malformed direction record {data!r}: {err}") from None
        problem = _record_problem(record)
        if problem:
            raise ResultFileError(f"malformed direction record {data!r}: {problem}")
        return record


def _integer(x: Any) -> int:
    if isinstance(x, bool) or not isinstance(x, int) or not -(2**63) <= x < 2**63:
        raise ResultFileError(f"expected a 64-bit integer, found {x!r}")
    return x


def _record_problem(r: DirectionRecord) -> str | None:
    """What is impossible about one direction's values (``None`` when nothing)."""
    checks = (
        (r.index >= 0, f"index {r.index} is negative"),
        (isinstance(r.status, str) and r.status in STATUSES, f"unknown status {r.status!r}"),
        (not math.isnan(r.estimate), "estimate is NaN"),
        (r.prop > 0 and math.isfinite(r.prop), f"prop {r.prop!r} is not a positive number"),
        (r.radius >= 0, f"radius {r.radius!r} is not >= 0"),
        (not math.isnan(r.logabsint), "logabsint is NaN"),
        (r.n_evals >= 0, f"n_evals {r.n_evals} is negative"),
    )
    return next((message for ok, message in checks if not ok), None)
