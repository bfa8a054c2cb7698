"""Atomic file writes: a temp file in the target's folder, flushed to disk, then a rename.

A reader (or a run killed mid-write) sees the old file or the new one, never a torn one.
The new file gets the permissions a plain ``open`` would give it (``0o666`` minus the
umask), not the owner-only mode of a temp file.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

__all__ = ["atomic_write", "atomic_write_json", "atomic_write_text"]


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_FILE_MODE = 0o666 & ~_umask()


def atomic_write(
    path: str | os.PathLike, write: Callable[[IO[Any]], None], *, binary: bool = False
) -> Path:
    """Call ``write(fh)`` on a temp file beside ``path`` (parents created), fsync it, and
    rename it over ``path``; on any error the temp file is removed and ``path`` untouched."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(
            fd, "wb" if binary else "w", **({} if binary else {"encoding": "utf-8"})
        ) as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, _FILE_MODE)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
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
