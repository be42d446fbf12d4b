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
"""

from __future__ import annotations

import dataclasses
import datetime
import enum
import errno
import hashlib
import inspect
import itertools
import json
import math
import os
import platform
import sys
import time
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import checks
from .adaptive import PreconditionerType
from .config import VolumeConfig, VolumeEstimator
from .distributed import from_rank0, init_from_env, world
from .estimator import Measure, _check_center, estimate
from .result import DirectionRecord, ResultFileError, VolumeResult

try:  # POSIX; elsewhere the lock file is created exclusively instead
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None

__all__ = [
    "ResumeError",
    "RunInUseError",
    "RunLog",
    "check_writable",
    "estimate_to_file",
    "load_result",
    "read_run",
    "records_path",
    "run_to_file",
    "scan",
]

FORMAT = "basin_volume.run"
FORMAT_VERSION = 1
RECORDS_SUFFIX = ".records.jsonl"
PROBE_SEED = 20240607
PROBE_RTOL = 1e-3
_CHUNK = 1 << 22

Source = VolumeConfig | VolumeEstimator | Mapping[str, Any]
"""What :func:`run_to_file` runs: a model-level config or estimator, or the arguments of
:func:`basin_volume.estimate` as a mapping that includes ``fn`` and ``center``."""


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


class RunInUseError(RuntimeError):
    """Another process holds the run log: it is running (writing) the same run.

    Attributes
    ----------
    path : pathlib.Path
        The run log.
    pid : int or None
        The process holding it (``None`` when it could not be read).
    """

    def __init__(self, message: str, *, path: Path, pid: int | None):
        super().__init__(message)
        self.path = path
        self.pid = pid


class RunLock:
    """An exclusive lock on a run log for the life of a run (see the module notes).

    Use :meth:`acquire`; :meth:`release` (idempotent) unlocks and removes the lock file.
    """

    def __init__(self, path: Path, fd: int):
        self.path = path
        self._fd: int | None = fd

    @staticmethod
    def lock_path(log_path: Path) -> Path:
        """The lock file of a run log: ``x.records.jsonl`` -> ``x.records.jsonl.lock``."""
        return log_path.with_name(log_path.name + ".lock")

    @classmethod
    def acquire(cls, log_path: str | os.PathLike) -> RunLock:
        """Lock the run log at ``log_path``, or raise :class:`RunInUseError`."""
        log_path = Path(log_path)
        path = cls.lock_path(log_path)
        if fcntl is None:  # Windows
            return cls._acquire_exclusive(log_path, path)
        while True:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as err:
                if err.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    warnings.warn(  # e.g. a network file system without locks: run unlocked
                        f"cannot lock {log_path} ({err.strerror or err}); a second process on "
                        "this run log would not be refused",
                        RuntimeWarning,
                        stacklevel=2,
                    )
                    break
                pid = _read_pid(path)
                os.close(fd)
                raise _in_use(log_path, pid, "") from None
            try:  # the file may have been removed by its last holder since we opened it
                same = os.path.samestat(os.fstat(fd), os.stat(path))
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        return cls(path, fd)

    @classmethod
    def _acquire_exclusive(cls, log_path: Path, path: Path) -> RunLock:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            hint = (
                f"; this platform has no fcntl locks, so a crashed run leaves {path} behind: "
                "if that process is not running, delete the file"
            )
            raise _in_use(log_path, _read_pid(path), hint) from None
        os.write(fd, f"{os.getpid()}\n".encode())
        return cls(path, fd)

    def release(self) -> None:
        """Unlock and remove the lock file (while still holding it, so no one is cut out)."""
        if self._fd is None:
            return
        try:
            self.path.unlink()
        except FileNotFoundError:
            pass
        os.close(self._fd)
        self._fd = None


def _read_pid(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def _in_use(log_path: Path, pid: int | None, hint: str) -> RunInUseError:
    who = f"process {pid}" if pid is not None else "another process (PID unknown)"
    return RunInUseError(
        f"{log_path} is in use: {who} is running this run; wait for it to finish (or stop it) "
        f"before resuming, or write to another output{hint}",
        path=log_path,
        pid=pid,
    )


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


def _jsonable(value: Any) -> Any:
    """Plain JSON values: non-finite floats as strings, tensors and objects by description."""
    if isinstance(value, enum.Enum):
        return _jsonable(value.value)
    if isinstance(value, np.generic) and isinstance(value.item(), bool | int | float):
        return _jsonable(value.item())
    if isinstance(value, bool) or value is None or isinstance(value, str | int):
        return value
    if isinstance(value, float):
        if math.isfinite(value):
            return value
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if isinstance(value, torch.Tensor):
        if value.numel() == 1:
            return _jsonable(value.item())
        return f"Tensor(shape={list(value.shape)}, dtype={str(value.dtype).removeprefix('torch.')})"
    return type(value).__name__


def _dumps(obj: Any) -> str:
    return json.dumps(_jsonable(obj), separators=(",", ":"), allow_nan=False)


class _Appender:
    """Appends JSON lines to a run log, each flushed and fsynced before returning."""

    def __init__(self, path: Path, fh):
        self.path = path
        self._fh = fh

    @classmethod
    def create(cls, path: Path, header: dict) -> _Appender:
        tmp = path.with_name(path.name + ".tmp")
        with open(tmp, "wb") as fh:
            fh.write((_dumps(header) + "\n").encode())
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
        self._fh.write((_dumps(obj) + "\n").encode())
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
    if isinstance(value, str) and value in ("nan", "inf", "-inf"):
        return float(value)
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ResultFileError(f"expected a number in the run log header, found {value!r}")
    return value


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


# ---------------------------------------------------------------------------- fingerprints
def _update(digest, tensor: torch.Tensor) -> None:
    for chunk in tensor.detach().reshape(-1).split(_CHUNK):
        digest.update(chunk.contiguous().cpu().view(torch.uint8).numpy().tobytes())


def _sha256(tensor: torch.Tensor) -> str:
    digest = hashlib.sha256(f"{tensor.dtype}:{tensor.numel()}:".encode())
    _update(digest, tensor)
    return digest.hexdigest()


def _center_stats(tensors: Iterable[torch.Tensor]) -> tuple[int, str, float]:
    """``(D, sha256 of the bytes, sum of squares in float64)``, streamed chunk by chunk so a
    large model is never copied whole."""
    digest = hashlib.sha256()
    dim, squares, dtypes = 0, 0.0, []
    for tensor in tensors:
        flat = tensor.detach().reshape(-1)
        dim += flat.numel()
        dtypes.append(str(flat.dtype))
        for chunk in flat.split(_CHUNK):
            digest.update(chunk.contiguous().cpu().view(torch.uint8).numpy().tobytes())
            squares += float(chunk.double().square().sum())
    digest.update(f"{sorted(set(dtypes))}:{dim}".encode())
    return dim, digest.hexdigest(), squares


def _preconditioner_fingerprint(pre: Any, dim: int) -> str | None:
    """A hash that changes when the proposal would: scales, or P applied to a fixed vector."""
    if pre is None:
        return None
    if isinstance(pre, torch.Tensor):
        return "scales:" + _sha256(pre)
    if hasattr(pre, "apply"):
        u = torch.randn(
            dim, generator=torch.Generator().manual_seed(PROBE_SEED), dtype=torch.float64
        )
        return f"{type(pre).__name__}:" + _sha256(pre.apply(u))
    return repr(pre)


def _texts(dataset: Any, text_key: str, limit: int) -> Iterator[str]:
    for item in itertools.islice(iter(dataset), limit):
        if isinstance(item, str):
            yield item
        elif isinstance(item, Mapping):
            yield str(item.get(text_key))
        else:
            yield repr(item)


def _data_fingerprint(cfg: VolumeConfig) -> str | None:
    """SHA-256 of the evaluation data: classifier inputs and/or the texts a language model
    reads (the first ``val_size``, or up to 100000 with chunking)."""
    digest, used = hashlib.sha256(), False
    if isinstance(cfg.inputs, torch.Tensor):
        digest.update(f"inputs:{cfg.inputs.dtype}:{list(cfg.inputs.shape)}:".encode())
        _update(digest, cfg.inputs)
        used = True
    elif cfg.inputs is not None:  # a DataLoader or batches
        from .inputs import batches_sha256, is_batch_source

        if is_batch_source(cfg.inputs):
            digest.update(f"batches:{batches_sha256(cfg.inputs)}:".encode())
            used = True
    if getattr(cfg.basin, "value", cfg.basin) == "loss":  # KL runs keep their old digests
        digest.update(f"loss:{type(cfg.loss_fn).__name__}:".encode())
        if isinstance(cfg.labels, torch.Tensor):
            _update(digest, cfg.labels)
        used = True
    if cfg.dataset is not None:
        limit = 100_000 if cfg.chunking else int(cfg.val_size)
        try:
            for text in _texts(cfg.dataset, cfg.text_key, limit):
                digest.update(text.encode("utf-8", "surrogatepass") + b"\0")
        except TypeError:  # not iterable: its description is all there is
            digest.update(repr(cfg.dataset).encode())
        used = True
    return digest.hexdigest() if used else None


def _probe(fn: Callable, center: torch.Tensor) -> float:
    """``fn`` at one fixed point near the centre (1% of its norm away, direction fixed): the
    fingerprint of an objective that is only known as a function."""
    gen = torch.Generator().manual_seed(PROBE_SEED)
    step = torch.empty_like(center)
    for chunk in step.split(_CHUNK):
        chunk.copy_(torch.randn(chunk.numel(), generator=gen, dtype=torch.float32))
    norm = float(torch.linalg.vector_norm(center.detach().double()))
    scale = 1e-2 * (norm if norm > 0 else 1.0) / math.sqrt(center.numel())
    with torch.no_grad():
        value = fn(center.detach() + scale * step)
    if isinstance(value, torch.Tensor):
        value = value.detach().reshape(-1)[0].to("cpu", torch.float64)
    return float(value)


def _environment(device: torch.device | str) -> dict:
    from . import __version__

    env = {
        "basin_volume": __version__,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "device": str(device),
    }
    for name in ("numpy", "transformers", "datasets"):
        module = sys.modules.get(name)
        if module is not None:
            env[name] = getattr(module, "__version__", "unknown")
    device = torch.device(device)
    if device.type == "cuda" and torch.cuda.is_available():
        env["device_name"] = torch.cuda.get_device_name(device)
    return env


def _timings(seconds: Sequence[float], sessions: int) -> dict:
    finite = [s for s in seconds if math.isfinite(s)]
    return {
        "direction_seconds_total": sum(finite),
        "seconds_per_direction": sum(finite) / len(finite) if finite else math.nan,
        "per_direction_seconds": list(seconds),
        "sessions": sessions,
    }


# ---------------------------------------------------------------------------- running
@dataclasses.dataclass
class _Job:
    """One run, whichever kind of source it came from."""

    settings: dict
    config: dict
    run: Callable[[Callable[[DirectionRecord], None], VolumeResult | None], VolumeResult]
    data: Callable[[], str | float | None]
    device: torch.device


def _settings(tensors, *, n_samples, measure, cutoff, sigma, rtol, seed, preconditioner) -> dict:
    # checked before a run log is made for a run that cannot start
    n_samples = checks.check_positive("n_samples", n_samples, integer=True)
    cutoff = checks.check_positive("cutoff", cutoff)
    rtol, seed = checks.check_rtol(rtol), checks.check_seed(seed)
    try:
        measure = Measure(measure)
    except ValueError:
        raise ValueError(f"measure must be 'gaussian' or 'uniform', got {measure!r}") from None
    sigma = checks.as_number(sigma)
    dim, sha, squares = _center_stats(tensors)
    if measure is Measure.UNIFORM:
        sigma = math.nan
    elif sigma is None:  # the estimator's default: the RMS of the centre
        sigma = math.sqrt(squares / dim)
    return {
        "n_samples": int(n_samples),
        "dim": dim,
        "measure": measure.value,
        "cutoff": float(cutoff),
        "sigma": float(sigma),
        "rtol": float(rtol),
        "seed": int(seed),
        "center_sha256": sha,
        "preconditioner": _preconditioner_fingerprint(preconditioner, dim),
    }


def _proposal_identity(est: VolumeEstimator) -> Any:
    """What identifies the proposal for resuming: ready-made or Adam scales themselves (they
    are bit-reproducible from the stored state); for the Fisher kinds and ``"adaptive"``, which
    are recomputed each session (their last bits may differ between devices), the recipe,
    next to the centre's and the data's own fingerprints."""
    cfg, kind = est.config, est.config.preconditioner_type
    if isinstance(kind, torch.Tensor) or kind is PreconditionerType.ADAM:
        return est.preconditioner
    if kind in (None, PreconditionerType.NONE):
        return cfg.preconditioner
    return (
        f"{kind.value}(eps={cfg.preconditioner_eps!r}, exponent={cfg.preconditioner_exponent!r}"
        f", seed={cfg.seed})"
    )


def _estimator_job(est: VolumeEstimator) -> _Job:
    cfg = est.config
    params = [p for _, p in est.selected_parameters()]  # the centre, in vector order
    settings = _settings(
        params,
        n_samples=cfg.n_samples,
        measure=cfg.measure,
        cutoff=cfg.cutoff,
        sigma=cfg.sigma,
        rtol=cfg.rtol,
        seed=cfg.seed,
        preconditioner=_proposal_identity(est),
    )
    return _Job(
        settings,
        cfg.describe(),
        lambda callback, prev: est.run(callback=callback, resume_from=prev),
        lambda: _data_fingerprint(cfg),
        params[0].device,
    )


def _function_job(arguments: Mapping[str, Any]) -> _Job:
    arguments = dict(arguments)
    try:
        fn, center = arguments.pop("fn"), arguments.pop("center")
    except KeyError as err:
        raise TypeError(
            f"a mapping source must hold estimate()'s arguments including fn and center; "
            f"{err.args[0]!r} is missing"
        ) from None
    params = inspect.signature(estimate).parameters
    unknown = sorted(set(arguments) - set(params) | ({"callback", "resume_from"} & set(arguments)))
    if unknown:
        raise TypeError(f"estimate() has no argument(s) {unknown} to pass through")
    center = _check_center(center)  # before it is hashed
    full = {name: arguments.get(name, params[name].default) for name in params}
    settings = _settings(
        [center],
        n_samples=full["n_samples"],
        measure=full["measure"],
        cutoff=full["cutoff"],
        sigma=full["sigma"],
        rtol=full["rtol"],
        seed=full["seed"],
        preconditioner=full["preconditioner"],
    )
    config = {k: v for k, v in full.items() if k not in ("fn", "center", "callback", "resume_from")}
    config["fn"] = getattr(fn, "__qualname__", type(fn).__name__)
    return _Job(
        settings,
        config,
        lambda callback, prev: estimate(
            fn, center, **arguments, callback=callback, resume_from=prev
        ),
        lambda: _probe(fn, center),
        center.device,
    )


def _job(source: Source) -> _Job:
    if isinstance(source, VolumeEstimator):
        return _estimator_job(source)
    if isinstance(source, VolumeConfig):
        return _estimator_job(VolumeEstimator.from_config(source))
    if isinstance(source, Mapping):
        return _function_job(source)
    raise TypeError(
        "source must be a VolumeConfig, a VolumeEstimator or a mapping of estimate() "
        f"arguments with fn and center, got {type(source).__name__}"
    )


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, float | int) and isinstance(b, float | int):
        return a == b or (math.isnan(a) and math.isnan(b)) or math.isclose(a, b, rel_tol=1e-12)
    return a == b


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
    for name in ("measure", "cutoff", "sigma", "rtol", "seed"):
        if not _same(prev.get(name), settings[name]):
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
    if isinstance(old_data, str) and old_data in ("nan", "inf", "-inf"):
        old_data = float(old_data)
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
    for then, now, free in (
        (old.get("config") or {}, job.config, _FREE_CONFIG),
        (old.get("spec") or {}, spec, _FREE_SPEC),
    ):
        for name in sorted(set(then) | set(now)):
            if name in free:
                continue
            if not _same(_jsonable(then.get(name)), _jsonable(now.get(name))):
                raise ResumeError(
                    f"{where}: it was started with {name}={then.get(name)!r} but this "
                    f"run has {name}={now.get(name)!r}; use the same {name} or write to a new "
                    "output",
                    field=name,
                )
    if n_done > settings["n_samples"]:
        raise ResumeError(
            f"{where}: it already has {n_done} directions, more than "
            f"n_samples={settings['n_samples']}; ask for at least that many",
            field="n_samples",
        )


_FREE_CONFIG = frozenset(
    {"n_samples", "progress", "data_batch_size", "cache_mode", "cache_budget_bytes"}
    | {"model_batch_size", "low_memory", "model", "tokenizer", "dataset", "inputs"}
    | {"preconditioner", "sigma", "optimizer", "optimizer_state", "fn", "compile"}
    | {"parameters"}
    | {"basin", "labels", "loss_fn"}  # through the data fingerprint, so old logs resume
)
"""Configuration fields that may change on resume: they do not change any direction's result
beyond float rounding (the model, data, preconditioner and sigma are compared through the
settings and the data fingerprint instead of their descriptions; the parameter selection
through the centre's size and hash, so logs written before it was recorded still resume)."""

_FREE_SPEC = frozenset(
    {"n_samples", "device", "quiet", "progress", "output", "resume", "overwrite", "model", "data"}
    | {"data_batch_size", "cache_mode", "output_dir", "optimizer_state"}
)
"""Command-line entries that may change on resume (the model and data themselves are checked
through the centre's hash and the data fingerprint)."""


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
    >>> cfg = VolumeConfig(model_type="mlp", n_samples=20)          # doctest: +SKIP
    >>> res = run_to_file(cfg, "digits.json")                        # doctest: +SKIP
    >>> res = run_to_file(cfg.replace(n_samples=50), "digits.json", resume=True)  # +SKIP
    """
    if resume and overwrite:
        raise ValueError("resume and overwrite exclude each other: pick one")
    init_from_env()
    spec = dict(spec or {})
    # Under torchrun rank 0 alone reads and writes files; the other ranks learn its outcome
    # (or its error) through from_rank0, each step a collective call on every rank.
    paths = from_rank0(lambda: _check_output(output, resume=resume, overwrite=overwrite))
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
                "settings": _jsonable(job.settings),
                "data": _jsonable(run.data),
                "config": _jsonable(job.config),
                "spec": _jsonable(spec),
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


def _check_output(output, *, resume: bool, overwrite: bool) -> tuple[Path, Path]:
    """The results file and its run log, checked writable and not clobbered by accident."""
    output = check_writable(output)
    log_path = records_path(output)
    if output == log_path:
        raise ValueError(f"output must be the results file, not the run log {log_path}")
    if not resume and not overwrite:
        for existing in (output, log_path):
            if existing.exists():
                raise FileExistsError(
                    f"{existing} exists; pass resume=True to continue that run or "
                    "overwrite=True to replace it"
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


# ---------------------------------------------------------------------------- scans
def _source_n_samples(source: Any) -> int | None:
    if isinstance(source, VolumeEstimator):
        return source.config.n_samples
    if isinstance(source, VolumeConfig):
        return source.n_samples
    if isinstance(source, Mapping):
        return source.get("n_samples", inspect.signature(estimate).parameters["n_samples"].default)
    return getattr(source, "n_samples", None)  # a lazy source may say how many it will run


def scan(
    sources: Sequence[Source | Callable[[], Source]],
    output_dir: str | os.PathLike,
    *,
    values: Sequence[float] | None = None,
    axis: str = "cutoff",
    names: Sequence[str] | None = None,
    resume: bool = False,
    overwrite: bool = False,
    plot: bool = True,
    spec: Mapping[str, Any] | None = None,
) -> list[dict]:
    """The same estimate over checkpoints or cutoffs: one results file each and a summary.

    Parameters
    ----------
    sources : sequence
        One entry per point: a :data:`Source` (see :func:`run_to_file`), or a function of no
        arguments returning one, called only when that point has to run (so checkpoints are
        loaded one at a time; give the function an ``n_samples`` attribute to let ``resume``
        extend finished points that have fewer directions).
    output_dir : path-like
        Receives ``<name>.json`` (and its run log) per point, ``scan.json`` (the summary
        table) and ``scan.png`` (log probability against the scanned value).
    values : sequence of float, optional
        The x value of each point (training step or cutoff). Default: each source's cutoff
        for ``axis="cutoff"``, else ``0, 1, 2, ...``.
    axis : {"cutoff", "step"} or str
        What ``values`` are; names the plot's x axis (``"cutoff"`` is drawn on a log scale).
    names : sequence of str, optional
        File names (without ``.json``). Default: ``"{axis}_{value:g}"``.
    resume : bool
        Keep finished points (a results file with at least the requested directions) and
        continue unfinished ones from their run logs.
    overwrite : bool
        Recompute every point.
    plot : bool
        Write ``scan.png``.
    spec : mapping, optional
        Passed to :func:`run_to_file` for every point (with ``axis`` and the value added).

    Returns
    -------
    list of dict
        One row per point: ``name``, ``axis``, ``value``, ``file``, ``log_volume``, ``low``,
        ``high`` (95% bootstrap interval), ``ess``, ``n_samples``, ``measure``, ``cutoff``.
    """
    sources = list(sources)
    if not sources:
        raise ValueError("sources is empty: give at least one checkpoint or cutoff to scan")
    if values is None:
        if axis == "cutoff":
            values = [_source_cutoff(s) for s in sources]
        else:
            values = list(range(len(sources)))
    values = [float(v) for v in values]
    if len(values) != len(sources):
        raise ValueError(f"values has {len(values)} entries for {len(sources)} sources")
    names = list(names) if names is not None else [f"{axis}_{v:g}" for v in values]
    if len(names) != len(sources) or len(set(names)) != len(names):
        raise ValueError(f"names must be {len(sources)} distinct file names, got {names}")
    out_dir = Path(output_dir)
    init_from_env()
    rank, _ = world()  # under torchrun rank 0 alone reads and writes files
    if rank == 0:
        out_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    for source, value, name in zip(sources, values, names, strict=True):
        path = out_dir / f"{name}.json"
        wanted = _source_n_samples(source)

        def finished(path=path, wanted=wanted) -> VolumeResult | None:
            if resume and path.exists():
                done = VolumeResult.load(path)
                if wanted is None or done.n_samples >= wanted:
                    return done
            return None

        result = from_rank0(finished)
        if result is None:
            if not isinstance(source, VolumeConfig | VolumeEstimator | Mapping):
                source = source()
            result = run_to_file(
                source,
                path,
                resume=resume,
                overwrite=overwrite,
                spec={**(spec or {}), "scan_axis": axis, "scan_value": value},
            )
        rows.append(_summary_row(result, name=name, axis=axis, value=value, file=path))
    if rank != 0:
        return rows
    with open(out_dir / "scan.json", "w") as fh:
        json.dump(_jsonable({"axis": axis, "rows": rows}), fh, indent=1)
    if plot:
        from .plots import plot_scan

        plot_scan(rows, out_dir / "scan.png", axis=axis)
    return rows


def _source_cutoff(source: Any) -> float:
    if isinstance(source, VolumeEstimator):
        return source.config.cutoff
    if isinstance(source, VolumeConfig):
        return source.cutoff
    if isinstance(source, Mapping) and "cutoff" in source:
        return source["cutoff"]
    raise ValueError("pass values=[...]: the cutoff of a lazily built source is not known")


def _summary_row(result: VolumeResult, **extra: Any) -> dict:
    from .result import LowESSWarning

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", LowESSWarning)
        low, high = result.interval(0.95) if result.n_samples >= 2 else (-math.inf, math.inf)
    return {
        **{k: os.fspath(v) if isinstance(v, os.PathLike) else v for k, v in extra.items()},
        "log_volume": result.log_volume,
        "low": low,
        "high": high,
        "ess": result.ess,
        "n_samples": result.n_samples,
        "measure": result.measure,
        "cutoff": result.cutoff,
    }
