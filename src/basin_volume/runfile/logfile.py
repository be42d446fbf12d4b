"""The run log's format: a JSONL header, one line per direction, session lines; reading it back."""

from __future__ import annotations

import dataclasses
import json
import math
import os
from pathlib import Path
from typing import Any

from ..jsonfloat import decode, dumps
from ..result import DirectionRecord, ResultFileError, VolumeResult
from .jobs import _timings

FORMAT = "basin_volume.run"
FORMAT_VERSION = 1
RECORDS_SUFFIX = ".records.jsonl"


# ---------------------------------------------------------------------------- paths and io
def records_path(output: str | os.PathLike) -> Path:
    """The run log kept beside a results file: ``x.json`` -> ``x.records.jsonl``.

    Parameters
    ----------
    output : path-like
        The final results file.

    Returns
    -------
    pathlib.Path
    """
    path = Path(output)
    if path.name.endswith(RECORDS_SUFFIX):
        return path
    if path.suffix == ".json":
        return path.with_suffix(RECORDS_SUFFIX)
    return path.with_name(path.name + RECORDS_SUFFIX)




class _Appender:
    """Appends JSON lines to a run log, each flushed and fsynced before returning."""

    def __init__(self, path: Path, fh):
        self.path = path
        self._fh = fh

    @classmethod
    def create(cls, path: Path, header: dict) -> _Appender:
        tmp = path.with_name(path.name + ".tmp")
        with open(tmp, "wb") as fh:
            fh.write((dumps(header) + "\n").encode())
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
        return cls(path, open(path, "ab"))  # noqa: SIM115 - closed by close()

    @classmethod
    def reopen(cls, path: Path, good_bytes: int) -> _Appender:
        fh = open(path, "r+b")  # noqa: SIM115 - closed by close()
        fh.truncate(good_bytes)  # drop a partial last line left by a crash
        fh.seek(good_bytes)
        return cls(path, fh)

    def write(self, obj: dict) -> None:
        self._fh.write((dumps(obj) + "\n").encode())
        self._fh.flush()
        os.fsync(self._fh.fileno())

    def close(self) -> None:
        self._fh.close()


# ---------------------------------------------------------------------------- reading
@dataclasses.dataclass(frozen=True)
class RunLog:
    """A run log read back by :func:`read_run`.

    Attributes
    ----------
    path : pathlib.Path
        The ``.records.jsonl`` file.
    header : dict
        Its first line (settings, configuration, environment).
    records : list of DirectionRecord
        The finished directions, ``0 .. n-1``.
    seconds : list of float
        Wall-clock seconds spent on each direction.
    sessions : int
        How many times the run was started (1 + the number of resumes).
    truncated : bool
        Whether a partial last line (a crash mid-write) was found and left out.
    good_bytes : int
        Length of the file up to the end of the last complete line.
    """

    path: Path
    header: dict
    records: list[DirectionRecord]
    seconds: list[float]
    sessions: int
    truncated: bool
    good_bytes: int

    @property
    def settings(self) -> dict:
        """The header's settings (``dim``, ``measure``, ``cutoff``, ``sigma``, ...)."""
        return self.header["settings"]

    def to_result(self) -> VolumeResult:
        """The finished directions as a (possibly partial) :class:`VolumeResult`.

        Raises
        ------
        ResultFileError
            When the header's settings are damaged (a field missing or out of range).
        """
        s = self.settings
        try:
            fields = {
                "dim": s["dim"],
                "measure": s["measure"],
                "cutoff": float(_number(s["cutoff"])),
                "sigma": float(_number(s["sigma"])),
                "rtol": float(_number(s["rtol"])),
                "seed": s["seed"],
            }
            n_samples = s["n_samples"]
        except KeyError as err:
            raise ResultFileError(f"{self.path}: the header has no {err.args[0]!r}") from None
        except ResultFileError as err:
            raise ResultFileError(f"{self.path}: {err}") from None
        result = VolumeResult.from_records(
            self.records,
            **fields,
            meta={
                "partial": not isinstance(n_samples, int) or len(self.records) < n_samples,
                "run_log": os.fspath(self.path),
                "settings": s,
                "data": self.header.get("data"),
                "config": self.header.get("config", {}),
                "spec": self.header.get("spec", {}),
                "environment": self.header.get("environment", {}),
                "timings": _timings(self.seconds, self.sessions),
            },
        )
        try:  # the same checks as a results file's
            return VolumeResult.from_dict(result.to_dict())
        except ResultFileError as err:
            raise ResultFileError(f"{self.path}: {err}") from None


def _number(value: Any) -> float:
    """A number of the run log (non-finite ones as the codec's strings)."""
    return decode(value, error=ResultFileError)


def read_run(path: str | os.PathLike) -> RunLog:
    """Read a run log written by :func:`run_to_file` (also while that run is still going).

    Parameters
    ----------
    path : path-like
        The ``.records.jsonl`` file, or the results file it belongs to.

    Returns
    -------
    RunLog

    Raises
    ------
    ResultFileError
        When the file is not a run log, or a line other than the last is damaged.
    """
    path = records_path(path)
    data = path.read_bytes()
    lines = data.split(b"\n")
    # After the final "\n" split leaves b""; anything else there is a partial last line.
    tail = lines.pop()
    truncated = tail != b""
    try:
        header = json.loads(lines[0]) if lines else None
    except (json.JSONDecodeError, UnicodeDecodeError):
        header = None
    if not isinstance(header, dict) or header.get("format") != FORMAT:
        raise ResultFileError(
            f"{path}: not a basin_volume run log (its first line must be a header with "
            f"format={FORMAT!r}); delete it or write to another output"
        )
    if header.get("version") != FORMAT_VERSION:
        raise ResultFileError(f"{path}: unsupported run log version {header.get('version')!r}")
    if not isinstance(header.get("settings"), dict):
        raise ResultFileError(f"{path}: the header has no settings")
    records: list[DirectionRecord] = []
    seconds: list[float] = []
    sessions = 1
    good_bytes = len(lines[0]) + 1
    for lineno, line in enumerate(lines[1:], start=2):
        try:
            entry = json.loads(line)
            if not isinstance(entry, dict):
                raise ValueError("not an object")
        except (json.JSONDecodeError, UnicodeDecodeError, ValueError) as err:
            raise ResultFileError(
                f"{path}: line {lineno} is damaged ({err}); only the last line can be "
                "repaired automatically"
            ) from None
        kind = entry.get("type")
        if kind == "direction":
            record = DirectionRecord.from_json(entry)
            if record.index != len(records):
                raise ResultFileError(
                    f"{path}: line {lineno} holds direction {record.index}, expected {len(records)}"
                )
            records.append(record)
            seconds.append(float(_number(entry.get("seconds", math.nan))))
        elif kind == "session":
            sessions += 1
        else:
            raise ResultFileError(f"{path}: line {lineno} has unknown type {kind!r}")
        good_bytes += len(line) + 1
    return RunLog(path, header, records, seconds, sessions, truncated, good_bytes)


def load_result(path: str | os.PathLike) -> VolumeResult:
    """Read a results file, or the run log of a run that is unfinished or still going.

    Parameters
    ----------
    path : path-like
        A ``.json`` written by :meth:`VolumeResult.save` / :func:`run_to_file`, or a
        ``.records.jsonl`` run log. A ``.json`` that does not exist yet is read from its run
        log when that exists.

    Returns
    -------
    VolumeResult
        For a run log, ``meta["partial"]`` tells whether directions are still missing.
    """
    path = Path(path)
    if path.name.endswith(RECORDS_SUFFIX) or (not path.exists() and records_path(path).exists()):
        return read_run(path).to_result()
    if not path.exists():
        raise FileNotFoundError(f"no results file {path} (nor a run log {records_path(path)})")
    return VolumeResult.load(path)
