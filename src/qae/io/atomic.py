"""Atomic file writes: a temp file in the target's folder, flushed to disk, then a rename.

A reader (or a run killed mid-write) sees the old file or the new one, never a torn one:
the temp file is fsynced before the rename and the folder after it, so the new file
survives a power cut too. The new file gets the permissions a plain ``open`` would give it
(``0o666`` minus the umask), not the owner-only mode of a temp file.

Temp names hold the writer's PID (``.<name>.<pid>.<random>.tmp``), so that whoever cleans
a folder can tell a dead writer's leftovers (:func:`temporary_owner`, :func:`pid_alive`)
from a live writer's file.
"""

from __future__ import annotations

import errno
import json
import os
import re
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

__all__ = [
    "DIR_MODE",
    "FILE_MODE",
    "atomic_write",
    "atomic_write_json",
    "atomic_write_text",
    "fsync_path",
    "is_temporary",
    "pid_alive",
    "temp_prefix",
    "temporary_owner",
]


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


FILE_MODE = 0o666 & ~_umask()
"""The mode of a file created by a plain ``open`` (``0o666`` minus the umask)."""
DIR_MODE = 0o777 & ~_umask()
"""The mode of a folder created by a plain ``mkdir`` (``0o777`` minus the umask)."""
TEMP_SUFFIX = ".tmp"
_TEMP_NAME = re.compile(r"^\.(?P<name>.+)\.(?P<pid>\d+)\.[A-Za-z0-9_]+\.tmp$")


def temp_prefix(name: str) -> str:
    """The prefix of this process's temp files for ``name`` (``.<name>.<pid>.``); with
    :data:`TEMP_SUFFIX` as suffix, ``tempfile`` makes names :func:`temporary_owner` reads."""
    return f".{name}.{os.getpid()}."


def is_temporary(name: str) -> bool:
    """Whether a file name is an atomic write's temp file (a hidden ``*.tmp``)."""
    return name.startswith(".") and name.endswith(TEMP_SUFFIX)


def temporary_owner(name: str) -> int | None:
    """The PID in a temp file's name, or None when it holds none (an older writer's)."""
    m = _TEMP_NAME.match(name)
    return int(m.group("pid")) if m else None


def pid_alive(pid: int) -> bool:
    """Whether a process with this PID exists on this machine."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process
    except OSError:
        return False
    return True


def fsync_path(path: str | os.PathLike) -> None:
    """Flush a file, or a folder's entries (after a rename into it), to disk.

    Folders cannot be opened on Windows and some file systems refuse a folder fsync; both
    are skipped, as nothing more can be done there.
    """
    path = Path(path)
    is_dir = path.is_dir()
    if is_dir and os.name == "nt":
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError as err:
        if not (is_dir and err.errno in (errno.EINVAL, errno.ENOTSUP, errno.EBADF)):
            raise
    finally:
        os.close(fd)


def atomic_write(
    path: str | os.PathLike, write: Callable[[IO[Any]], None], *, binary: bool = False
) -> Path:
    """Call ``write(fh)`` on a temp file beside ``path`` (parents created), fsync it, rename
    it over ``path`` and fsync the folder; on any error the temp file is removed and
    ``path`` untouched."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=temp_prefix(path.name), suffix=TEMP_SUFFIX)
    try:
        with os.fdopen(
            fd, "wb" if binary else "w", **({} if binary else {"encoding": "utf-8"})
        ) as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, FILE_MODE)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_path(path.parent)
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` to ``path`` atomically."""
    return atomic_write(path, lambda fh: fh.write(text))


def atomic_write_json(path: str | os.PathLike, obj: Any, **dump: Any) -> Path:
    """Write ``obj`` as JSON (``json.dump`` keyword arguments in ``dump``) plus a final
    newline to ``path`` atomically."""

    def write(fh: IO[str]) -> None:
        json.dump(obj, fh, **dump)
        fh.write("\n")

    return atomic_write(path, write)
