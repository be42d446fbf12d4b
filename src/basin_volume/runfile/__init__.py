r"""Results files: every direction on disk as it finishes, exact resume, a final JSON result.

A run writing to ``results.json`` keeps a *run log* beside it, ``results.records.jsonl``
(see :func:`records_path`). Its first line is a header with everything needed to check that a
later run continues the same computation::

    {"format": "basin_volume.run", "version": 1, "created": ..., "settings": {...},
     "config": {...}, "spec": {...}, "environment": {...}}

``settings`` holds what fixes the directions and their values: ``dim``, ``measure``,
``cutoff``, ``sigma`` (resolved), ``rtol``, ``seed``, ``n_samples``, a SHA-256 of the centre's
bytes and a fingerprint of the preconditioner; ``data`` fingerprints the evaluation data (a
SHA-256 of the inputs or texts, or, for a bare ``fn``, its value at one fixed nearby point).
``environment`` records the library, torch and Python versions and the device. Then one line
per finished direction, in index order::

    {"type": "direction", "index": 0, "estimate": -5531.2, ..., "seconds": 0.41}

each written, flushed and ``fsync``-ed as soon as the direction finishes, and a
``{"type": "session", ...}`` line each time the run is resumed. A crash can at worst leave a
partial last line; :func:`read_run` detects it and the resumed run computes that direction
again. Because direction ``k`` depends only on the seed and ``k`` (and the radius search's
starting point only on the directions before it), a resumed run gives exactly the result of an
uninterrupted one, direction for direction.

Under ``torchrun`` rank 0 alone reads and writes the files: it checks the output, opens or
resumes the run log and tells the other ranks where to start; every rank then runs its share
of the directions and rank 0 logs each round's records as they are shared (see
:mod:`basin_volume.distributed`). The number of processes may change between sessions.
Per-direction seconds are then rank 0's clock as records arrive: a round's directions arrive
together, so only their sum is meaningful.

When the run completes, the full :class:`~basin_volume.VolumeResult` is written to
``results.json`` as JSON (never pickle), with the configuration, environment and timings in its
``meta``; :meth:`VolumeResult.load` reads it back and :func:`load_result` reads either file.

A run holds an exclusive lock on its run log for its whole life (``fcntl.flock`` on
``results.records.jsonl.lock``, which names the holder's PID and is removed when the run
ends; the kernel drops the lock if the process dies). A second process on the same run log
refuses with :class:`RunInUseError` naming that PID, so two sessions never interleave their
lines.

Modules: ``logfile`` (the format), ``lock`` (one process per log), ``fingerprint`` (what ties
a log to its computation), ``jobs`` (a source as one job), ``resume`` (the compatibility
check), ``run`` (running to a file) and ``sweep`` (``scan``).
"""

from .jobs import Source
from .lock import RunInUseError, RunLock
from .logfile import RunLog, load_result, read_run, records_path
from .resume import OutputExistsError, ResumeError, check_output, check_writable
from .run import estimate_to_file, run_to_file
from .sweep import scan

__all__ = [
    "OutputExistsError",
    "ResumeError",
    "RunInUseError",
    "RunLock",
    "RunLog",
    "Source",
    "check_output",
    "check_writable",
    "estimate_to_file",
    "load_result",
    "read_run",
    "records_path",
    "run_to_file",
    "scan",
]
