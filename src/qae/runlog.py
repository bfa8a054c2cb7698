"""Run directory I/O: append-only metrics, optional TensorBoard / W&B / MLflow, checkpoints.

Layout of a run directory::

    config.yaml              resolved config (atomic write)
    metrics.jsonl            one JSON object per step, flushed per line
    tb/                      TensorBoard events (when installed)
    checkpoints/step_000050/ model (safetensors + config + tokenizer), state.pt
    checkpoints/latest       name of the newest complete checkpoint

A checkpoint directory is written under a temporary name and renamed when complete, and
``latest`` is replaced atomically, so a run killed at any moment resumes from the last
complete checkpoint. ``state.pt`` is read back with ``weights_only=True``: loading never
executes code from the run directory.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from qae.atomic import atomic_write_text

__all__ = ["Checkpointer", "MetricsLogger", "atomic_write_text", "read_metrics"]


def _jsonable(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        value = value.item() if value.numel() == 1 else value.tolist()
    if isinstance(value, float) and not math.isfinite(value):
        return None if math.isnan(value) else (1e308 if value > 0 else -1e308)
    return value


def read_metrics(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Complete lines of a metrics file (a torn last line is ignored)."""
    path = Path(path)
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            break  # a line torn by a kill is the last one
    return rows


class MetricsLogger:
    """Append-only JSONL metrics plus the optional loggers the config asks for.

    On resume, lines of steps after the checkpoint (and a torn last line) are dropped
    first, so the file never holds a duplicated or torn line.
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
        rows = read_metrics(self.path)
        keep = [r for r in rows if resume_step is not None and r.get("step", 0) <= resume_step]
        if resume_step is None and rows:
            keep = []
        if self.path.exists():
            atomic_write_text(self.path, "".join(json.dumps(r) + "\n" for r in keep))
        self._fh = self.path.open("a")
        self._tb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(str(self.run_dir / "tb"))
            except ImportError:
                self._tb = None
        self._wandb = None
        if wandb_project:
            try:
                import wandb
            except ImportError as err:
                raise ValueError("log.wandb is set but the wandb package is not installed") from err
            self._wandb = wandb.init(
                project=wandb_project, config=dict(config or {}), resume="allow"
            )
        self._mlflow = None
        if mlflow_experiment:
            try:
                import mlflow
            except ImportError as err:
                raise ValueError(
                    "log.mlflow is set but the mlflow package is not installed"
                ) from err
            mlflow.set_experiment(mlflow_experiment)
            mlflow.start_run()
            self._mlflow = mlflow

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
        self._fh.close()
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()
        if self._mlflow is not None:
            self._mlflow.end_run()


class Checkpointer:
    """Atomic checkpoints of model, tokenizer and run state; keeps the last N."""

    def __init__(self, run_dir: str | os.PathLike, keep_last: int = 2) -> None:
        self.root = Path(run_dir) / "checkpoints"
        self.keep_last = keep_last

    def save(self, step: int, model: Any, tokenizer: Any, state: Mapping[str, Any]) -> Path:
        """Write ``checkpoints/step_N`` (model via ``save_pretrained``, ``state.pt``)."""
        self.root.mkdir(parents=True, exist_ok=True)
        name = f"step_{step:06d}"
        final = self.root / name
        tmp = Path(tempfile.mkdtemp(dir=self.root, prefix=f".{name}."))
        try:
            model.save_pretrained(tmp / "model", safe_serialization=True)
            if tokenizer is not None:
                tokenizer.save_pretrained(tmp / "model")
            torch.save(dict(state), tmp / "state.pt")
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        atomic_write_text(self.root / "latest", name + "\n")
        self._prune()
        return final

    def _prune(self) -> None:
        done = sorted(p for p in self.root.glob("step_*") if p.is_dir())
        for old in done[: max(0, len(done) - self.keep_last)]:
            shutil.rmtree(old, ignore_errors=True)
        for tmp in self.root.glob(".step_*"):
            shutil.rmtree(tmp, ignore_errors=True)

    def latest(self) -> Path | None:
        """The newest complete checkpoint directory, or None."""
        pointer = self.root / "latest"
        if pointer.exists():
            path = self.root / pointer.read_text().strip()
            if (path / "state.pt").exists():
                return path
        done = sorted(p for p in self.root.glob("step_*") if (p / "state.pt").exists())
        return done[-1] if done else None

    @staticmethod
    def load_state(path: str | os.PathLike) -> dict[str, Any]:
        """``state.pt`` of a checkpoint, loaded with ``weights_only=True``."""
        return torch.load(Path(path) / "state.pt", map_location="cpu", weights_only=True)
