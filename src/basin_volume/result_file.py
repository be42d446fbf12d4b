"""The results file: a :class:`~basin_volume.VolumeResult` as JSON (never pickle), read back
with every field validated.

Non-finite floats are written by :mod:`basin_volume.jsonfloat`. :meth:`VolumeResult.save` and
:meth:`VolumeResult.load` call :func:`save` and :func:`load` here.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import fields
from typing import TYPE_CHECKING, Any

import torch

from .checks import MAX_RTOL, MAX_SEED
from .jsonfloat import encode
from .records import STATUSES, ResultFileError, _decode, _integer, _record_problem

if TYPE_CHECKING:
    from .result import VolumeResult

__all__ = ["FORMAT", "FORMAT_VERSION", "TENSOR_FIELDS", "from_dict", "load", "save", "to_dict"]

FORMAT = "basin_volume.VolumeResult"
FORMAT_VERSION = 1
TENSOR_FIELDS = (
    "estimates",
    "deltas",
    "props",
    "mults",
    "logabsint",
    "n_evals",
    "radii",
    "slopes",
)
"""The per-direction fields of a :class:`~basin_volume.VolumeResult`, one entry a direction."""
NOT_A_RESULT = "not a Tyche results file"


def to_dict(result: VolumeResult) -> dict:
    """A JSON-ready dictionary (non-finite floats written as strings)."""
    out: dict[str, Any] = {"format": FORMAT, "version": FORMAT_VERSION}
    for f in fields(result):
        value = getattr(result, f.name)
        if isinstance(value, torch.Tensor):
            out[f.name] = [encode(v) for v in value.tolist()]
        elif isinstance(value, tuple):
            out[f.name] = [encode(v) if isinstance(v, float) else v for v in value]
        elif isinstance(value, float):
            out[f.name] = encode(value)
        else:
            out[f.name] = value
    out["log_volume"] = encode(result.log_volume)
    out["ess"] = encode(result.ess)
    out["low_ess"] = result.low_ess
    return out


def save(result: VolumeResult, path: str | os.PathLike) -> None:
    """Write the result as JSON (never pickle), atomically; nothing is left behind when
    writing fails."""
    path = os.fspath(path)
    if os.path.isdir(path):
        raise IsADirectoryError(
            f"{path} is a folder; give a file name such as {os.path.join(path, 'result.json')}"
        )
    tmp = f"{path}.tmp"
    try:
        with open(tmp, "w") as fh:
            json.dump(to_dict(result), fh, indent=1, default=str)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def from_dict(cls: type[VolumeResult], data: dict) -> VolumeResult:
    """A ``cls`` from :func:`to_dict`'s dictionary, every field validated (see
    :meth:`VolumeResult.from_dict <basin_volume.VolumeResult.from_dict>`)."""
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise ResultFileError(f"{NOT_A_RESULT} (missing format={FORMAT!r})")
    if data.get("version") != FORMAT_VERSION:
        raise ResultFileError(f"unsupported result version {data.get('version')!r}")
    kwargs: dict[str, Any] = {}
    try:
        for name in TENSOR_FIELDS:
            values = data[name]
            if not isinstance(values, list):
                raise ResultFileError(f"field {name!r} must be a list")
            if name == "n_evals":
                kwargs[name] = torch.tensor(_field(name, _integer, values), dtype=torch.int64)
            else:
                floats = _field(name, _decode, values)
                kwargs[name] = torch.tensor(floats, dtype=torch.float64)
        status = data["status"]
        if not isinstance(status, list) or not all(isinstance(s, str) for s in status):
            raise ResultFileError("field 'status' must be a list of strings")
        kwargs["status"] = tuple(status)
        for name, kind in (("dim", int), ("measure", str), ("seed", int), ("meta", dict)):
            if not isinstance(data[name], kind) or isinstance(data[name], bool):
                raise ResultFileError(f"field {name!r} must be {kind.__name__}")
            kwargs[name] = data[name]
        for name in ("cutoff", "sigma", "rtol"):
            try:
                kwargs[name] = float(_decode(data[name]))
            except ResultFileError as err:
                raise ResultFileError(f"field {name!r}: {err}") from None
        kwargs["method"] = data.get("method", "is")  # files before SMC existed: "is"
        if kwargs["method"] not in ("is", "smc"):
            raise ResultFileError(
                f"field 'method' must be 'is' or 'smc', got {kwargs['method']!r}"
            )
        replicas = data.get("replicas", [])
        if not isinstance(replicas, list) or (kwargs["method"] == "smc") != bool(replicas):
            raise ResultFileError(
                "field 'replicas' must be a list of numbers, non-empty exactly when "
                "method is 'smc'"
            )
        try:
            kwargs["replicas"] = tuple(float(_decode(v)) for v in replicas)
        except ResultFileError as err:
            raise ResultFileError(f"field 'replicas': {err}") from None
    except KeyError as err:
        raise ResultFileError(f"missing field {err.args[0]!r}") from None
    lengths = {name: len(kwargs[name]) for name in (*TENSOR_FIELDS, "status")}
    if len(set(lengths.values())) > 1:
        raise ResultFileError(
            f"the per-direction fields have different lengths {lengths}; every one must "
            "hold one entry per direction"
        )
    _check_settings(kwargs)
    result = cls(**kwargs)
    _check_directions(result)
    _check_derived(result, data)
    return result


def load(cls: type[VolumeResult], path: str | os.PathLike) -> VolumeResult:
    """A ``cls`` read from a file :func:`save` wrote; errors name the file and the field."""
    where = os.fspath(path)
    try:
        with open(path, encoding="utf-8") as fh:
            text = fh.read()
    except UnicodeDecodeError:
        raise ResultFileError(
            f"{where}: {NOT_A_RESULT} (it is binary, not JSON text; results are never "
            "pickled)"
        ) from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        if _is_run_log(text):
            raise ResultFileError(
                f"{where} is a run log (one JSON line per direction), not a results file; "
                "read it with basin_volume.load_result"
            ) from None
        raise ResultFileError(f"{where}: {NOT_A_RESULT} (not valid JSON: {err})") from None
    try:
        return from_dict(cls, data)
    except ResultFileError as err:
        raise ResultFileError(f"{where}: {err}") from None


def _is_run_log(text: str) -> bool:
    try:
        header = json.loads(text.split("\n", 1)[0])
    except json.JSONDecodeError:
        return False
    return isinstance(header, dict) and header.get("format") == "basin_volume.run"


def _field(name: str, convert, values: list) -> list:
    """``convert`` applied to every entry of field ``name``, errors naming the field."""
    out = []
    for k, v in enumerate(values):
        try:
            out.append(convert(v))
        except ResultFileError as err:
            raise ResultFileError(f"entry {k} of field {name!r}: {err}") from None
    return out


def _check_settings(kwargs: dict) -> None:
    """The run's settings are in range (as the estimator would have accepted them)."""
    measure, sigma = kwargs["measure"], kwargs["sigma"]
    gaussian_sigma = math.isfinite(sigma) and sigma > 0
    checks = (
        ("dim", 1 <= kwargs["dim"] < 2**63, "a positive 64-bit integer"),
        ("measure", measure in ("gaussian", "uniform"), "'gaussian' or 'uniform'"),
        ("cutoff", math.isfinite(kwargs["cutoff"]) and kwargs["cutoff"] > 0, "a positive number"),
        ("rtol", 0 < kwargs["rtol"] <= MAX_RTOL, f"a number in (0, {MAX_RTOL}]"),
        ("seed", 0 <= kwargs["seed"] <= MAX_SEED, "an integer in 0 ... 2**63 - 1"),
        (
            "sigma",
            gaussian_sigma if measure == "gaussian" else gaussian_sigma or math.isnan(sigma),
            "a positive number (NaN for the uniform measure)",
        ),
    )
    for name, ok, what in checks:
        if not ok:
            raise ResultFileError(f"field {name!r} must be {what}, found {kwargs[name]!r}")
    bad = [s for s in kwargs["status"] if s not in STATUSES]
    if bad:
        raise ResultFileError(
            f"field 'status' holds unknown status {bad[0]!r}; known: {sorted(STATUSES)}"
        )


def _check_directions(result: VolumeResult) -> None:
    """Every direction's values are possible."""
    for record in result.records():
        problem = _record_problem(record)
        if problem:
            raise ResultFileError(f"direction {record.index}: {problem}")
    radii = result.mults * result.props
    ok = (radii == result.radii) | torch.isclose(radii, result.radii, rtol=1e-9, atol=0.0)
    if not bool(ok.all()):
        k = int((~ok).nonzero()[0])
        raise ResultFileError(
            f"entry {k} of field 'mults' ({float(result.mults[k])!r}) is not radii / props "
            f"({float(result.radii[k])!r} / {float(result.props[k])!r})"
        )


def _check_derived(result: VolumeResult, data: dict) -> None:
    """Stored summaries (``log_volume``, ``ess``, ``low_ess``) agree with the estimates."""
    for name in ("log_volume", "ess"):
        if name not in data:
            continue
        try:
            stored = float(_decode(data[name]))
        except ResultFileError as err:
            raise ResultFileError(f"field {name!r}: {err}") from None
        actual = getattr(result, name)
        same = stored == actual or (math.isnan(stored) and math.isnan(actual))
        if not (same or math.isclose(stored, actual, rel_tol=1e-9, abs_tol=1e-12)):
            raise ResultFileError(
                f"field {name!r} is {stored!r} but the estimates give {actual!r}; the file "
                "was altered or damaged"
            )
    if "low_ess" in data and data["low_ess"] is not result.low_ess:
        raise ResultFileError(
            f"field 'low_ess' is {data['low_ess']!r} but the estimates give {result.low_ess!r}"
        )
