"""One process per run log: an exclusive lock file naming its holder's PID."""

from __future__ import annotations

import errno
import os
import warnings
from pathlib import Path

try:  # POSIX; elsewhere the lock file is created exclusively instead
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None


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
