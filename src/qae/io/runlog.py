"""Run directory I/O: append-only metrics, optional TensorBoard / W&B / MLflow, checkpoints.

Layout of a run directory::

    run.lock                 the owner's lock (see :mod:`qae.io.runlock`)
    config.yaml              resolved config (atomic write)
    metrics.jsonl            one JSON object per step, flushed per line
    metrics.corrupt.jsonl    lines of metrics.jsonl found corrupt on resume, set aside
    tb/                      TensorBoard events (when installed)
    wandb/                   W&B's run files (log.wandb; unless WANDB_DIR says elsewhere)
    trackers.json            the W&B and MLflow run ids, so a resumed run logs to the same
                             runs (MLflow's store is MLflow's: MLFLOW_TRACKING_URI, by
                             default ./mlflow.db)
    checkpoints/step_000050/ model/ (safetensors + config + tokenizer), state.pt,
                             manifest.json (size and sha256 of every file)
    checkpoints/latest       name of the newest complete checkpoint
    checkpoints/damaged/     checkpoints a resume found damaged, set aside

A checkpoint is written under a temporary name, every file and folder in it is fsynced,
and it is renamed into place; ``latest`` is replaced atomically. A resume verifies the
manifest and loads every weight strictly, falling back to the newest whole checkpoint.
``state.pt`` is read back with ``weights_only=True``: loading never executes code from the
run directory.
"""

from __future__ import annotations

import errno
import hashlib
import json
import math
import os
import shutil
import tempfile
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from qae.io.atomic import (
    DIR_MODE,
    FILE_MODE,
    TEMP_SUFFIX,
    atomic_write_text,
    fsync_path,
    is_temporary,
    pid_alive,
    temp_prefix,
    temporary_owner,
)

__all__ = [
    "Checkpointer",
    "MetricsLogger",
    "MetricsScan",
    "atomic_write_text",
    "read_metrics",
    "remove_stale_temporaries",
    "scan_metrics",
]

MANIFEST = "manifest.json"
CORRUPT_METRICS = "metrics.corrupt.jsonl"
TRACKERS = "trackers.json"


def _jsonable(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        value = value.item() if value.numel() == 1 else value.tolist()
    if isinstance(value, float) and not math.isfinite(value):
        return None if math.isnan(value) else (1e308 if value > 0 else -1e308)
    return value


# --------------------------------------------------------------------------------------
# Metrics


@dataclass
class MetricsScan:
    """What a metrics file holds: its good rows, its corrupt lines and a torn tail."""

    rows: list[dict[str, Any]] = field(default_factory=list)
    corrupt: list[tuple[int, bytes]] = field(default_factory=list)
    """``(line number, raw line)`` of complete lines that are not a step's JSON object."""
    torn: bool = False
    """The file ends in a line without its newline (a write cut short by a kill)."""


def _parse_row(line: bytes) -> dict[str, Any] | None:
    try:
        row = json.loads(line.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        return None
    if not isinstance(row, dict) or isinstance(row.get("step"), bool):
        return None
    return row if isinstance(row.get("step"), int) else None


def scan_metrics(path: str | os.PathLike) -> MetricsScan:
    """Sort a metrics file's lines into good rows, corrupt lines and a torn last line."""
    path = Path(path)
    scan = MetricsScan()
    if not path.exists():
        return scan
    lines = path.read_bytes().split(b"\n")
    tail = lines.pop()  # b"" when the file ends with a newline
    scan.torn = bool(tail.strip())
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        row = _parse_row(line)
        if row is None:
            scan.corrupt.append((number, line))
        else:
            scan.rows.append(row)
    return scan


def read_metrics(path: str | os.PathLike) -> list[dict[str, Any]]:
    """The good rows of a metrics file: a torn last line and corrupt lines are skipped."""
    return scan_metrics(path).rows


def _set_aside_corrupt(path: Path, corrupt: list[tuple[int, bytes]]) -> None:
    """Append corrupt metrics lines to ``metrics.corrupt.jsonl`` (durably) and warn."""
    aside = path.with_name(CORRUPT_METRICS)
    with aside.open("ab") as fh:
        fh.write(b"".join(line + b"\n" for _, line in corrupt))
        fh.flush()
        os.fsync(fh.fileno())
    numbers = ", ".join(str(n) for n, _ in corrupt[:10]) + (", ..." if len(corrupt) > 10 else "")
    warnings.warn(
        f"{path}: {len(corrupt)} corrupt line(s) (line {numbers}) moved to {aside}; the "
        f"other steps are kept",
        stacklevel=3,
    )


class MetricsLogger:
    """Append-only JSONL metrics plus the optional loggers the config asks for.

    On resume, lines of steps after the checkpoint and a torn last line are dropped first,
    so the file never holds a duplicated or torn line; a corrupt line elsewhere is moved to
    ``metrics.corrupt.jsonl`` with a warning, and the steps after it are kept.
    """

    def __init__(
        self,
        run_dir: str | os.PathLike,
        *,
        resume_step: int | None = None,
        tensorboard: bool = True,
        wandb_project: str = "",
        mlflow_experiment: str = "",
        config: Mapping[str, Any] | None = None,
    ) -> None:
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / "metrics.jsonl"
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self._trim(resume_step)
        self._fh = self.path.open("a")
        self._tb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(str(self.run_dir / "tb"))
            except ImportError:
                self._tb = None
        # A resumed run goes on logging to the tracker runs it started.
        ids = self._tracker_ids() if resume_step is not None else {}
        self._wandb = None
        if wandb_project:
            try:
                import wandb
            except ImportError as err:
                raise ValueError(
                    "log.wandb is set but the wandb package is not installed "
                    "(pip install 'qae[wandb]')"
                ) from err
            self._wandb = wandb.init(
                project=wandb_project,
                config=dict(config or {}),
                id=ids.get("wandb"),
                resume="allow",
                dir=os.environ.get("WANDB_DIR") or str(self.run_dir),
            )
            ids["wandb"] = self._wandb.id
        self._mlflow = None
        if mlflow_experiment:
            try:
                import mlflow
            except ImportError as err:
                raise ValueError(
                    "log.mlflow is set but the mlflow package is not installed "
                    "(pip install 'qae[mlflow]')"
                ) from err
            mlflow.set_experiment(mlflow_experiment)
            run_id = ids.get("mlflow")
            active = mlflow.start_run(run_id=run_id, run_name=None if run_id else self.run_dir.name)
            ids["mlflow"] = active.info.run_id
            self._mlflow = mlflow
        if ids:
            atomic_write_text(self.run_dir / TRACKERS, json.dumps(ids, indent=1) + "\n")

    def _tracker_ids(self) -> dict[str, str]:
        """The W&B and MLflow run ids a resumed run recorded (none if it recorded none)."""
        try:
            saved = json.loads((self.run_dir / TRACKERS).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return {}
        if not isinstance(saved, dict):
            return {}
        return {k: v for k, v in saved.items() if k in ("wandb", "mlflow") and isinstance(v, str)}

    def _trim(self, resume_step: int | None) -> None:
        """Keep the rows up to ``resume_step`` (none on a fresh start)."""
        if not self.path.exists():
            return
        keep: list[dict[str, Any]] = []
        if resume_step is not None:
            scan = scan_metrics(self.path)
            if scan.corrupt:
                _set_aside_corrupt(self.path, scan.corrupt)
            keep = [r for r in scan.rows if r["step"] <= resume_step]
        atomic_write_text(self.path, "".join(json.dumps(r) + "\n" for r in keep))

    def log(self, step: int, metrics: Mapping[str, Any]) -> None:
        """Write one line ``{"step": step, **metrics}`` and flush it."""
        row = {"step": step, **{k: _jsonable(v) for k, v in metrics.items()}}
        self._fh.write(json.dumps(row) + "\n")
        self._fh.flush()
        numeric = {k: v for k, v in row.items() if isinstance(v, (int, float)) and k != "step"}
        if self._tb is not None:
            for k, v in numeric.items():
                self._tb.add_scalar(k, v, step)
            self._tb.flush()
        if self._wandb is not None:
            self._wandb.log(numeric, step=step)
        if self._mlflow is not None:
            self._mlflow.log_metrics({k.replace("@", "_at_"): v for k, v in numeric.items()}, step)

    def close(self) -> None:
        """Close the file and the optional loggers."""
        self._fh.close()
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()
        if self._mlflow is not None:
            self._mlflow.end_run()


# --------------------------------------------------------------------------------------
# Temporaries


def _is_stale(entry: Path) -> bool:
    """A temp file or folder whose writer is gone (or an older qae's, which named none)."""
    legacy_checkpoint = entry.name.startswith(".step_") and entry.is_dir()
    if not (is_temporary(entry.name) or legacy_checkpoint):
        return False
    owner = temporary_owner(entry.name)
    return owner is None or owner == os.getpid() or not pid_alive(owner)


def remove_stale_temporaries(run_dir: str | os.PathLike) -> list[Path]:
    """Remove the temp files and half-written checkpoints that dead writers left in a run
    directory (its top level, ``checkpoints/`` and ``entropy_hist/``); those of a live
    writer stay. Call it while holding the run's lock. Returns what was removed."""
    run_dir = Path(run_dir)
    removed = []
    for folder in (run_dir, run_dir / "checkpoints", run_dir / "entropy_hist"):
        if not folder.is_dir():
            continue
        for entry in sorted(folder.iterdir()):
            if not _is_stale(entry):
                continue
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)
            removed.append(entry)
    return removed


# --------------------------------------------------------------------------------------
# Checkpoints


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _free_bytes(folder: Path) -> int | None:
    try:
        st = os.statvfs(folder)
    except (OSError, AttributeError):
        return None
    return st.f_bavail * st.f_frsize


_DISK_MESSAGES = {
    errno.ENOSPC: ("no space left", "os error 28", "storagefull"),
    errno.EROFS: ("read-only file system", "os error 30", "readonlyfilesystem"),
}


def _disk_problem(folder: Path, err: BaseException) -> OSError | None:
    """The ``OSError`` behind a failed write that a library reported as something else
    (safetensors' Rust errors, C++ streams): a full or read-only file system, told by the
    message or by the folder itself; None if neither."""
    text = str(err).lower().replace(" ", "")
    for code, needles in _DISK_MESSAGES.items():
        if any(n.replace(" ", "") in text for n in needles):
            return OSError(code, os.strerror(code), str(folder))
    free = _free_bytes(folder)
    if free is not None and free < (1 << 20):
        return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(folder))
    if not os.access(folder, os.W_OK):
        return OSError(errno.EROFS, os.strerror(errno.EROFS), str(folder))
    return None


def _normalize_and_sync(folder: Path) -> dict[str, dict[str, Any]]:
    """Give every file and folder under ``folder`` the modes of a plain ``open`` and
    ``mkdir``, fsync them, and return each file's size and sha256 by relative path."""
    files: dict[str, dict[str, Any]] = {}
    for path in sorted(folder.rglob("*")):
        if path.is_dir():
            os.chmod(path, DIR_MODE)
            continue
        os.chmod(path, FILE_MODE)
        fsync_path(path)
        rel = path.relative_to(folder).as_posix()
        files[rel] = {"size": path.stat().st_size, "sha256": _sha256(path)}
    for path in sorted((p for p in folder.rglob("*") if p.is_dir()), reverse=True):
        fsync_path(path)
    os.chmod(folder, DIR_MODE)
    return files


def _write_checkpoint(
    folder: Path, step: int, model: Any, tokenizer: Any, state: Mapping[str, Any]
) -> None:
    """Model, tokenizer, ``state.pt`` and the manifest into ``folder``, all fsynced."""
    model.save_pretrained(folder / "model", safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(folder / "model")
    with (folder / "state.pt").open("wb") as fh:  # a Python file: a full disk is an OSError
        torch.save(dict(state), fh)
    files = _normalize_and_sync(folder)
    manifest = json.dumps({"format": 1, "step": step, "files": files}, indent=1, sort_keys=True)
    with (folder / MANIFEST).open("w", encoding="utf-8") as fh:
        fh.write(manifest + "\n")
        fh.flush()
        os.fsync(fh.fileno())
    os.chmod(folder / MANIFEST, FILE_MODE)
    fsync_path(folder)


def _step_of(path: Path) -> int | None:
    head, _, number = path.name.partition("_")
    return int(number) if head == "step" and number.isdigit() else None


def _check_manifest(path: Path, hashes: bool) -> str | None:
    try:
        manifest = json.loads((path / MANIFEST).read_text(encoding="utf-8"))
        files = dict(manifest["files"])
    except (OSError, ValueError, KeyError, TypeError):
        return f"{MANIFEST} is unreadable"
    if "state.pt" not in files:
        return f"{MANIFEST} lists no state.pt"
    for rel, meta in sorted(files.items()):
        if Path(rel).is_absolute() or ".." in Path(rel).parts:
            return f"{MANIFEST} names a file outside the checkpoint: {rel!r}"
        target = path / rel
        if not target.is_file():
            return f"{rel} is missing"
        size = target.stat().st_size
        if size != meta.get("size"):
            return f"{rel} is {size} bytes, {meta.get('size')} were written"
        if hashes and _sha256(target) != meta.get("sha256"):
            return f"{rel} does not match the sha256 recorded when it was written"
    return None


class Checkpointer:
    """Atomic, durable checkpoints of model, tokenizer and run state; keeps the last N."""

    def __init__(self, run_dir: str | os.PathLike, keep_last: int = 2) -> None:
        self.root = Path(run_dir) / "checkpoints"
        self.keep_last = keep_last

    def save(self, step: int, model: Any, tokenizer: Any, state: Mapping[str, Any]) -> Path:
        """Write ``checkpoints/step_N`` (model via ``save_pretrained``, ``state.pt``, the
        manifest), fsync it, publish it by a rename and point ``latest`` at it.

        A write the disk refused is an ``OSError`` (``ENOSPC`` for a full disk) whatever
        library made it; nothing of the failed checkpoint is left behind.
        """
        self.root.mkdir(parents=True, exist_ok=True)
        name = f"step_{step:06d}"
        final = self.root / name
        tmp = Path(tempfile.mkdtemp(dir=self.root, prefix=temp_prefix(name), suffix=TEMP_SUFFIX))
        try:
            _write_checkpoint(tmp, step, model, tokenizer, state)
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
            fsync_path(self.root)
        except Exception as err:
            # Probe before removing the partial checkpoint frees its space again.
            problem = None if isinstance(err, OSError) else _disk_problem(self.root, err)
            shutil.rmtree(tmp, ignore_errors=True)
            if problem is not None:
                raise problem from err
            raise
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        atomic_write_text(self.root / "latest", name + "\n")
        self._prune()
        return final

    def _prune(self) -> None:
        """Remove the oldest checkpoints beyond ``keep_last`` (never a temp folder)."""
        done = sorted(self.candidates(), key=_step_of)
        for old in done[: max(0, len(done) - self.keep_last)]:
            shutil.rmtree(old, ignore_errors=True)

    def candidates(self) -> list[Path]:
        """Every ``step_N`` checkpoint folder, newest first, whole or not."""
        if not self.root.is_dir():
            return []
        found = [p for p in self.root.iterdir() if p.is_dir() and _step_of(p) is not None]
        return sorted(found, key=_step_of, reverse=True)

    @staticmethod
    def verify(path: str | os.PathLike, *, hashes: bool = True) -> str | None:
        """Why the checkpoint at ``path`` is not whole (a file missing, of the wrong size
        or, with ``hashes``, of the wrong sha256), or None when it is. A checkpoint of an
        older qae has no manifest: it needs ``state.pt`` (its weights are checked when
        they are loaded, strictly)."""
        path = Path(path)
        if (path / MANIFEST).is_file():
            return _check_manifest(path, hashes)
        return None if (path / "state.pt").is_file() else "state.pt is missing"

    def latest(self) -> Path | None:
        """The newest checkpoint whose files are all there with their recorded sizes."""
        return next((p for p in self.candidates() if self.verify(p, hashes=False) is None), None)

    def set_aside(self, path: str | os.PathLike) -> Path:
        """Move a damaged checkpoint to ``checkpoints/damaged/`` (replacing an older one of
        the same name) and return its new place."""
        path = Path(path)
        target = self.root / "damaged" / path.name
        target.parent.mkdir(exist_ok=True)
        if target.exists():
            shutil.rmtree(target)
        os.replace(path, target)
        fsync_path(self.root)
        return target

    @staticmethod
    def load_state(path: str | os.PathLike) -> dict[str, Any]:
        """``state.pt`` of a checkpoint, loaded with ``weights_only=True``."""
        return torch.load(Path(path) / "state.pt", map_location="cpu", weights_only=True)
