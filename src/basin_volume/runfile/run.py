"""Running to a file: every direction logged as it finishes, the result written at the end."""

from __future__ import annotations

import datetime
import os
import time
from collections.abc import Callable, Mapping
from typing import Any

import torch

from ..distributed import from_rank0, init_from_env
from ..jsonfloat import jsonable
from ..result import DirectionRecord, VolumeResult
from .jobs import Source, _job, _timings
from .lock import RunLock
from .resume import _open_run, _OpenRun, check_output


def run_to_file(
    source: Source,
    output: str | os.PathLike,
    *,
    resume: bool = False,
    overwrite: bool = False,
    spec: Mapping[str, Any] | None = None,
    callback: Callable[[DirectionRecord], None] | None = None,
) -> VolumeResult:
    """Run an estimate, saving each direction as it finishes; resumable after any crash.

    Parameters
    ----------
    source : VolumeConfig, VolumeEstimator or mapping
        What to run: a model-level configuration (or an estimator built from one), or the
        arguments of :func:`basin_volume.estimate` as a mapping holding ``fn``, ``center`` and
        any settings (``n_samples``, ``cutoff``, ...).
    output : path-like
        The final results file (JSON). The run log is written beside it, see
        :func:`records_path`.
    resume : bool
        Continue the run log of ``output`` if there is one (a run with the same settings,
        model and data; ``n_samples`` may be raised). The result equals that of an
        uninterrupted run, direction for direction. Without a run log a new run starts.
    overwrite : bool
        Replace an existing ``output`` and run log. Without ``resume`` or ``overwrite`` an
        existing one is an error, so no finished work is lost by accident.
    spec : mapping, optional
        Extra JSON-able description of the run kept in the header and result (the command
        line uses it for the model and data names); on resume its entries must match.
    callback : callable, optional
        Called with each direction's :class:`DirectionRecord` after it is safely on disk.

    Returns
    -------
    VolumeResult
        Also written to ``output``; ``meta`` holds ``config``, ``spec``, ``environment``,
        ``timings`` (seconds per direction, sessions) and ``run_log``.

    Raises
    ------
    FileExistsError
        ``output`` or its run log exists and neither ``resume`` nor ``overwrite`` is set.
    ResumeError
        The run log was made by a different run (the message names the setting).
    RunInUseError
        Another process is running on the same run log (the message names its PID).
    ResultFileError
        With ``resume``: the run log is empty or damaged (``overwrite`` starts again).

    Examples
    --------
    A run of 4 directions, then resumed to 6: the first 4 are read back, not recomputed.

    >>> import os, tempfile, torch
    >>> out = os.path.join(tempfile.mkdtemp(), "quadratic.json")
    >>> source = {"fn": lambda th: 0.5 * th.square().sum(), "progress": False,
    ...           "center": torch.ones(4, dtype=torch.float64), "n_samples": 4}
    >>> first = run_to_file(source, out)
    >>> more = run_to_file({**source, "n_samples": 6}, out, resume=True)
    >>> more.n_samples, torch.equal(more.estimates[:4], first.estimates)
    (6, True)

    A model-level run works the same way, e.g.
    ``run_to_file(VolumeConfig(model_type="mlp", n_samples=20), "digits.json")``.
    """
    if resume and overwrite:
        raise ValueError("resume and overwrite exclude each other: pick one")
    init_from_env()
    spec = dict(spec or {})
    # Under torchrun rank 0 alone reads and writes files; the other ranks learn its outcome
    # (or its error) through from_rank0, each step a collective call on every rank.
    paths = from_rank0(lambda: check_output(output, resume=resume, overwrite=overwrite))
    job = _job(source)
    run: _OpenRun | None = None

    def open_run() -> VolumeResult | None:
        nonlocal run
        lock = RunLock.acquire(paths[1])  # held until the result is written
        try:
            run = _open_run(job, *paths, resume=resume, spec=spec)
        except BaseException:
            lock.release()
            raise
        run.lock = lock
        return run.prev

    prev = from_rank0(open_run)
    if run is None:  # another rank: records reach rank 0 through the estimator
        return job.run(lambda record: None, prev)

    started = last = time.perf_counter()

    def on_record(record: DirectionRecord) -> None:
        nonlocal last
        now = time.perf_counter()
        run.writer.write({"type": "direction", **record.to_json(), "seconds": now - last})
        run.seconds.append(now - last)
        last = now
        if callback is not None:
            callback(record)

    try:
        try:
            result = job.run(on_record, prev)
        finally:
            run.writer.close()
        result.meta.update(
            {
                "settings": jsonable(job.settings),
                "data": jsonable(run.data),
                "config": jsonable(job.config),
                "spec": jsonable(spec),
                "environment": run.environment,
                "created": run.created,
                "finished": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
                "timings": {
                    **_timings(run.seconds, run.sessions),
                    "this_session_seconds": time.perf_counter() - started,
                },
                "run_log": os.fspath(run.log_path),
            }
        )
        result.save(run.output)
    finally:
        run.lock.release()
    return result


def estimate_to_file(
    fn: Callable[[torch.Tensor], torch.Tensor | float],
    center: torch.Tensor,
    output: str | os.PathLike,
    *,
    resume: bool = False,
    overwrite: bool = False,
    spec: Mapping[str, Any] | None = None,
    callback: Callable[[DirectionRecord], None] | None = None,
    **estimate_kwargs: Any,
) -> VolumeResult:
    """:func:`basin_volume.estimate` with incremental saving and exact resume.

    Parameters
    ----------
    fn, center
        As in :func:`basin_volume.estimate`.
    output, resume, overwrite, spec, callback
        As in :func:`run_to_file`.
    **estimate_kwargs
        Any other argument of :func:`basin_volume.estimate` (``n_samples``, ``cutoff``,
        ``measure``, ``sigma``, ``preconditioner``, ``rtol``, ``seed``, ``progress``, ...).

    Returns
    -------
    VolumeResult
    """
    return run_to_file(
        {"fn": fn, "center": center, **estimate_kwargs},
        output,
        resume=resume,
        overwrite=overwrite,
        spec=spec,
        callback=callback,
    )
