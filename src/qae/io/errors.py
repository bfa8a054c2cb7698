"""Errors a run reports to its user in one line (``qae <verb>: error: ...``).

``ValueError`` stays the error of a bad input (a usage error, exit 2); the classes here are
runtime failures (exit 1) and the interruption of a run (exit 130), each with a message
that says what happened and what to do next.
"""

from __future__ import annotations

import errno
import os
import shlex

__all__ = [
    "CheckpointError",
    "RunError",
    "RunLockedError",
    "TrainingInterrupted",
    "describe_os_error",
    "resume_hint",
]


class RunError(RuntimeError):
    """A run cannot go on; the message is one line for the user (exit status 1)."""


class RunLockedError(RunError):
    """Another live process owns the run directory."""


class CheckpointError(RunError):
    """A checkpoint is damaged (a file missing, truncated or unreadable)."""


def resume_hint(run_dir: str | os.PathLike, step: int, checkpoint: int | None) -> str:
    """Where a stopped run got to and the command that continues it."""
    if checkpoint is None:
        return (
            f"step {step} reached before the first checkpoint: nothing to resume; start "
            f"again with another --out (or remove {str(run_dir)!r})"
        )
    return (
        f"step {step} reached, last checkpoint at step {checkpoint}; resume with: "
        f"qae train --resume --out {shlex.quote(str(run_dir))}"
    )


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C (or SIGINT) during a run: the message holds the step reached and the resume
    command. A ``KeyboardInterrupt``, so code that stops on one still does."""

    def __init__(self, run_dir: str | os.PathLike, step: int, checkpoint: int | None) -> None:
        super().__init__(f"interrupted: {resume_hint(run_dir, step, checkpoint)}")
        self.run_dir = run_dir
        self.step = step
        self.checkpoint = checkpoint


_OS_HINTS = {
    errno.ENOSPC: "the disk is full: free some space",
    errno.EDQUOT: "the disk quota is used up: free some space",
    errno.EROFS: "the file system is read-only: choose a writable directory",
    errno.EACCES: "no permission: choose a directory you can write to",
    errno.EPERM: "not permitted: choose a directory you can write to",
}


def describe_os_error(err: OSError) -> str:
    """One line for an ``OSError``: what failed, on which file, and what to do about it."""
    what = err.strerror or str(err) or type(err).__name__
    where = f" ({err.filename})" if err.filename else ""
    hint = _OS_HINTS.get(err.errno)
    return f"{what}{where}" + (f"; {hint}" if hint else "")
