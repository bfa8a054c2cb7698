"""One owner per run directory: an exclusive lock on ``<run>/run.lock`` for the whole run.

The lock is ``flock`` on an open file, so the operating system releases it when the owner
ends in any way (exit, crash, SIGKILL): a killed run never blocks its own resume, and no
stale lock needs removing by hand. A second writer (a second ``qae train`` on the same
``--out``, or a ``--resume`` while the run is alive) gets :class:`RunLockedError` naming
the owner's PID. The file stays in the run directory; it holds the last owner's PID, host
and start time. On platforms without ``fcntl`` (Windows) the lock is a no-op.

A forked child (a reward worker) closes its copy of the lock's file at once, so the lock
goes with the owner and never outlives it in an orphaned child.
"""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path
from types import TracebackType

from qae.io.atomic import FILE_MODE
from qae.io.errors import RunLockedError

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None  # type: ignore[assignment]

__all__ = ["LOCK_FILE", "RunLock", "lock_holder"]

LOCK_FILE = "run.lock"

_HELD: set[int] = set()
"""File descriptors of the locks this process holds."""


def _close_in_child() -> None:
    """After a fork: drop the child's references to the parent's locks (the parent keeps
    them; an flock is released when its last reference closes)."""
    for fd in list(_HELD):
        try:
            os.close(fd)
        except OSError:
            pass
    _HELD.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_close_in_child)


def lock_holder(run_dir: str | os.PathLike) -> dict:
    """What the lock file says about its last owner (``pid``, ``host``, ``since``); empty
    when it says nothing readable."""
    try:
        info = json.loads((Path(run_dir) / LOCK_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return info if isinstance(info, dict) else {}


def _describe(info: dict) -> str:
    if "pid" not in info:
        return "a process whose PID is not yet recorded"
    where = f" on {info['host']}" if info.get("host") else ""
    since = f", running since {info['since']}" if info.get("since") else ""
    return f"pid {info['pid']}{where}{since}"


class RunLock:
    """Exclusive ownership of a run directory while the ``with`` block runs.

    The directory is created if missing. Entering raises :class:`RunLockedError` at once
    (never waits) when another live process owns it.
    """

    def __init__(self, run_dir: str | os.PathLike) -> None:
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LOCK_FILE
        self._fd: int | None = None

    def acquire(self) -> None:
        """Take the lock and record this process as the owner."""
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if fcntl is None:
            return
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), FILE_MODE)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise RunLockedError(
                f"log.out={str(self.run_dir)!r} is in use by another qae process "
                f"({_describe(lock_holder(self.run_dir))}); wait for it to end or choose "
                f"another --out"
            ) from None
        except BaseException:
            os.close(fd)
            raise
        info = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "since": time.strftime("%Y-%m-%d %H:%M:%S"),
        }
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(info) + "\n").encode(), 0)
        self._fd = fd
        _HELD.add(fd)

    def release(self) -> None:
        """Give the lock up (closing the file releases it); the file stays."""
        if self._fd is not None:
            _HELD.discard(self._fd)
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> RunLock:
        self.acquire()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.release()
