"""Resume: the output checks and the comparison of a run log's header with the new run."""

from __future__ import annotations

import dataclasses
import datetime
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ..jsonfloat import decode, is_nonfinite, jsonable
from ..result import VolumeResult
from ..settings import first_difference
from .fingerprint import PROBE_RTOL, _environment
from .jobs import _Job
from .lock import RunLock
from .logfile import FORMAT, FORMAT_VERSION, _Appender, _number, read_run, records_path


class ResumeError(ValueError):
    """A run log cannot be continued by this run (different settings, model or data).

    Attributes
    ----------
    field : str
        The setting that differs (``"cutoff"``, ``"model"``, ``"data"``, ``"text_key"``...).
    """

    def __init__(self, message: str, *, field: str):
        super().__init__(message)
        self.field = field


def _check_resumable(
    where: str, old: Mapping, n_done: int, job: _Job, data: Any, spec: Mapping
) -> None:
    """Compare an earlier run's header (``old``: settings, data, config, spec) with this one."""
    settings = job.settings
    prev = {
        k: (_number(v) if k in ("cutoff", "sigma", "rtol") else v)
        for k, v in old.get("settings", {}).items()
    }
    where = f"cannot resume {where}"
    if prev.get("dim") != settings["dim"] or prev.get("center_sha256") != settings["center_sha256"]:
        dims = (
            f" ({prev.get('dim')} parameters then, {settings['dim']} now)"
            if prev.get("dim") != settings["dim"]
            else ""
        )
        raise ResumeError(
            f"{where}: the model's parameters differ from the ones that run started with{dims}; "
            "resume with the same model (and dtype) or write to a new output",
            field="model",
        )
    name = first_difference(prev, settings, ("measure", "cutoff", "sigma", "rtol", "seed"))
    if name is not None:
        raise ResumeError(
            f"{where}: it was started with {name}={prev.get(name)!r} but this run has "
            f"{name}={settings[name]!r}; use the same {name} or write to a new output",
            field=name,
        )
    if prev.get("preconditioner") != settings["preconditioner"]:
        raise ResumeError(
            f"{where}: the preconditioner differs from the one that run started with; use the "
            "same preconditioner settings or write to a new output",
            field="preconditioner",
        )
    old_data = old.get("data")
    if is_nonfinite(old_data):
        old_data = decode(old_data)
    if isinstance(data, float) and isinstance(old_data, int | float):
        changed = not (
            (math.isnan(old_data) and math.isnan(data))
            or math.isclose(old_data, data, rel_tol=PROBE_RTOL, abs_tol=1e-12)
        )
    else:
        changed = old_data != data
    if changed:
        raise ResumeError(
            f"{where}: the evaluation data differ from that run's (or the objective gives "
            "another value at a fixed check point); resume with the same data (a random "
            "objective must be made deterministic) or write to a new output",
            field="data",
        )
    for then, now in ((old.get("config") or {}, job.config), (old.get("spec") or {}, spec)):
        names = sorted((set(then) | set(now)) - RESUME_FREE)
        name = first_difference(jsonable(then), jsonable(now), names)
        if name is not None:
            raise ResumeError(
                f"{where}: it was started with {name}={then.get(name)!r} but this run has "
                f"{name}={now.get(name)!r}; use the same {name} or write to a new output",
                field=name,
            )
    if n_done > settings["n_samples"]:
        raise ResumeError(
            f"{where}: it already has {n_done} directions, more than "
            f"n_samples={settings['n_samples']}; ask for at least that many",
            field="n_samples",
        )


RESUME_FREE = frozenset(
    {"n_samples", "progress", "data_batch_size", "cache_mode", "cache_budget_bytes"}
    | {"model_batch_size", "low_memory", "model", "tokenizer", "dataset", "inputs"}
    | {"preconditioner", "sigma", "optimizer", "optimizer_state", "fn", "compile"}
    | {"parameters", "device", "quiet", "output", "resume", "overwrite", "data", "output_dir"}
    | {"basin", "labels", "loss_fn"}  # through the data fingerprint, so old logs resume
    | {"method", "budget", "replicas", "n_moves", "bidirectional"}  # run logs: IS only
)
"""Configuration fields and command-line entries that may change on resume: they do not
change any direction's result beyond float rounding (the model, data, preconditioner and sigma
are compared through the settings and the data fingerprint instead of their descriptions; the
parameter selection through the centre's size and hash, so logs written before it was
recorded still resume; where and how the output is written is no part of the result)."""


def check_writable(output: str | os.PathLike) -> Path:
    """Make sure ``output`` (and its run log) can be written; create missing parent folders.

    Parameters
    ----------
    output : path-like

    Returns
    -------
    pathlib.Path

    Raises
    ------
    OSError
        With a message naming the path, when it cannot be written.
    """
    path = Path(output)
    if path.is_dir():
        raise IsADirectoryError(f"{path} is a folder; give a file name such as {path}/results.json")
    for ancestor in path.parents:
        if ancestor.exists():
            if not ancestor.is_dir():
                raise NotADirectoryError(f"cannot write {path}: {ancestor} is a file, not a folder")
            break
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        probe = path.with_name(f".{path.name}.write-test")
        with open(probe, "wb"):
            pass
        probe.unlink()
    except OSError as err:
        raise PermissionError(f"cannot write {path}: {err.strerror or err}") from None
    return path


@dataclasses.dataclass
class _OpenRun:
    """A run log opened for appending, with what an earlier session left."""

    output: Path
    log_path: Path
    writer: _Appender
    prev: VolumeResult | None
    data: Any
    seconds: list[float]
    sessions: int
    created: str
    environment: dict
    lock: RunLock | None = None


class OutputExistsError(FileExistsError):
    """The results file or its run log exists and neither resume nor overwrite was asked for.

    Attributes
    ----------
    path : pathlib.Path
        The file that exists.
    """

    def __init__(self, message: str, path: Path):
        super().__init__(message)
        self.path = path


def check_output(
    output: str | os.PathLike, *, resume: bool, overwrite: bool
) -> tuple[Path, Path]:
    """The results file and its run log, checked writable and not clobbered by accident.

    The one output check of :func:`run_to_file`, :func:`scan` and the command line.

    Raises
    ------
    OSError
        When the path cannot be written (:func:`check_writable`).
    OutputExistsError
        When a file exists and neither ``resume`` nor ``overwrite`` is set.
    ValueError
        When ``output`` names a run log rather than a results file.
    """
    output = check_writable(output)
    log_path = records_path(output)
    if output == log_path:
        raise ValueError(f"output must be the results file, not the run log {log_path}")
    if not resume and not overwrite:
        for existing in (output, log_path):
            if existing.exists():
                raise OutputExistsError(
                    f"{existing} exists; pass resume=True to continue that run or "
                    "overwrite=True to replace it",
                    existing,
                )
    return output, log_path


def _open_run(job: _Job, output: Path, log_path: Path, *, resume: bool, spec: dict) -> _OpenRun:
    """Create the run log, or reopen it (or rebuild it from ``output``) for a resume."""
    data = job.data()
    header = {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "settings": job.settings,
        "data": data,
        "config": job.config,
        "spec": spec,
        "environment": _environment(job.device),
    }

    prev: VolumeResult | None = None
    seconds: list[float] = []
    sessions = 1
    first = header
    log = read_run(log_path) if resume and log_path.exists() else None
    if log is not None:
        _check_resumable(str(log_path), log.header, len(log.records), job, data, spec)
        prev = log.to_result() if log.records else None
        seconds, sessions, first = list(log.seconds), log.sessions + 1, log.header
        writer = _Appender.reopen(log_path, log.good_bytes)
        writer.write(
            {
                "type": "session",
                "started": header["created"],
                "done": len(log.records),
                "repaired_partial_line": log.truncated,
                "n_samples": job.settings["n_samples"],
                "environment": header["environment"],
            }
        )
    elif resume and output.exists():
        # A finished run whose log is gone: its results file holds the same header fields.
        prev = VolumeResult.load(output)
        _check_resumable(str(output), prev.meta, prev.n_samples, job, data, spec)
        timings = prev.meta.get("timings", {})
        seconds = list(timings.get("per_direction_seconds", [math.nan] * prev.n_samples))
        sessions = int(timings.get("sessions", 1)) + 1
        first = {"created": prev.meta.get("created", header["created"])}
        writer = _Appender.create(log_path, header)
        for record, secs in zip(prev.records(), seconds, strict=False):
            writer.write({"type": "direction", **record.to_json(), "seconds": secs})
    else:
        if output.exists():
            output.unlink()
        writer = _Appender.create(log_path, header)
    return _OpenRun(
        output=output,
        log_path=log_path,
        writer=writer,
        prev=prev,
        data=data,
        seconds=seconds,
        sessions=sessions,
        created=first["created"],
        environment=header["environment"],
    )
