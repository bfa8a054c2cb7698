"""Reading run directories: our ``metrics.jsonl`` and, when installed, TensorBoard events.

A run is one directory holding ``metrics.jsonl`` (or TensorBoard event files under ``tb/``
or the directory itself). A comparison directory (``qae compare --out``) holds
``compare.json`` naming its runs. Runs are grouped into configurations: the name from
``compare.json``, else the parent directory of a ``seed<N>`` directory, else the run
directory's own name.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from qae.io.runlog import read_metrics

__all__ = [
    "QAE_ONLY",
    "RunData",
    "discover_runs",
    "load_run",
    "group_runs",
    "tensorboard_available",
]

_SEED_DIR = re.compile(r"^seed[_-]?(\d+)$")


def tensorboard_available() -> bool:
    """Whether the ``tensorboard`` package (needed to read event files) is importable."""
    try:
        from tensorboard.backend.event_processing import event_accumulator  # noqa: F401
    except ImportError:
        return False
    return True


@dataclass
class RunData:
    """The scalar series of one run: ``series[key] = (steps [N], values [N])``, step-sorted."""

    name: str
    seed: int | None
    path: Path
    series: dict[str, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)
    planned_steps: int | None = None
    """``trainer.steps`` of the run's config, when known."""
    source: str = "jsonl"
    """``jsonl`` or ``tensorboard``."""
    config: dict[str, Any] = field(default_factory=dict)
    """The run's ``config.yaml`` as a nested dict (empty when absent). Runs of an
    estimator other than ``qae`` drop the K series, which their baseline ignores."""

    @property
    def last_step(self) -> int:
        return max((int(s[-1]) for s, _ in self.series.values() if len(s)), default=0)

    @property
    def finished(self) -> bool:
        """False for a run that has not reached its planned last step (still running or
        stopped); True when the plan is unknown."""
        return self.planned_steps is None or self.last_step >= self.planned_steps

    def get(self, key: str) -> tuple[np.ndarray, np.ndarray]:
        """``(steps, values)`` of a metric (empty arrays when the run never logged it)."""
        return self.series.get(key, (np.zeros(0, dtype=np.int64), np.zeros(0)))

    def final(self, key: str) -> float:
        """The value at the last step that logged ``key`` (NaN if none)."""
        steps, values = self.get(key)
        return float(values[-1]) if len(values) else math.nan

    def final_step(self, key: str) -> int | None:
        """The last step that logged ``key``: where :meth:`final` comes from (None if none)."""
        steps, _ = self.get(key)
        return int(steps[-1]) if len(steps) else None

    @property
    def end_step(self) -> int:
        """The step the run was meant to end at: its planned steps, else its last step."""
        return self.planned_steps if self.planned_steps is not None else self.last_step


def _series_from_rows(rows: Iterable[dict[str, Any]]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    cols: dict[str, dict[int, float]] = {}
    for row in rows:
        step = row.get("step")
        if not isinstance(step, (int, float)) or isinstance(step, bool):
            continue
        for key, value in row.items():
            if key == "step" or isinstance(value, bool):
                continue
            if isinstance(value, (int, float)):
                cols.setdefault(key, {})[int(step)] = float(value)
            elif value is None:  # NaN is written as null
                cols.setdefault(key, {})[int(step)] = math.nan
    out = {}
    for key, by_step in cols.items():
        steps = np.array(sorted(by_step), dtype=np.int64)
        out[key] = (steps, np.array([by_step[int(s)] for s in steps], dtype=np.float64))
    return out


def _read_tensorboard(path: Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    from tensorboard.backend.event_processing import event_accumulator

    acc = event_accumulator.EventAccumulator(str(path), size_guidance={"scalars": 0})
    acc.Reload()
    rows: dict[int, dict[str, float]] = {}
    for tag in acc.Tags().get("scalars", []):
        for event in acc.Scalars(tag):
            rows.setdefault(int(event.step), {"step": int(event.step)})[tag] = float(event.value)
    return _series_from_rows(rows[s] for s in sorted(rows))


def _tb_dir(run_dir: Path) -> Path | None:
    for cand in (run_dir / "tb", run_dir):
        if cand.is_dir() and any(cand.glob("events.out.tfevents.*")):
            return cand
    return None


def _read_config(run_dir: Path) -> dict[str, Any]:
    cfg = run_dir / "config.yaml"
    if not cfg.is_file():
        return {}
    import yaml

    try:
        data = yaml.safe_load(cfg.read_text()) or {}
    except yaml.YAMLError:
        return {}
    return data if isinstance(data, dict) else {}


def _config_int(config: dict[str, Any], section: str, key: str) -> int | None:
    try:
        return int(config[section][key])
    except (KeyError, TypeError, ValueError):
        return None


# Metrics that only mean something for the QAE estimator (the others log the controller's
# K although their baseline ignores it).
QAE_ONLY = ("adv/k", "kcontrol/k")


def load_run(
    run_dir: str | os.PathLike,
    name: str | None = None,
    seed: int | None = None,
    notes: list[str] | None = None,
) -> RunData | None:
    """Read one run directory (None, with a note, when it holds nothing readable).

    ``metrics.jsonl`` is preferred; a torn last line (a run killed mid-write) is ignored.
    Without it, TensorBoard event files are read when ``tensorboard`` is installed and
    skipped with a note otherwise.
    """
    run_dir = Path(run_dir)
    notes = notes if notes is not None else []
    match = _SEED_DIR.match(run_dir.name)
    if name is None:
        name = run_dir.parent.name if match else run_dir.name
    config = _read_config(run_dir)
    if seed is None:
        seed = int(match.group(1)) if match else _config_int(config, "trainer", "seed")
    metrics = run_dir / "metrics.jsonl"
    if metrics.is_file():
        series, source = _series_from_rows(read_metrics(metrics)), "jsonl"
    elif (tb := _tb_dir(run_dir)) is not None:
        if not tensorboard_available():
            notes.append(
                f"{run_dir}: only TensorBoard event files, and the tensorboard package is "
                f"not installed; skipped"
            )
            return None
        series, source = _read_tensorboard(tb), "tensorboard"
    else:
        notes.append(f"{run_dir}: no metrics.jsonl or TensorBoard events; skipped")
        return None
    if not series:
        notes.append(f"{run_dir}: no complete metrics line yet; skipped")
        return None
    estimator = (config.get("algo") or {}).get("estimator") if config else None
    if estimator is not None and estimator != "qae":
        for key in QAE_ONLY:
            series.pop(key, None)
    planned = _config_int(config, "trainer", "steps")
    return RunData(name, seed, run_dir, series, planned, source, config)


def _is_run_dir(path: Path) -> bool:
    return (path / "metrics.jsonl").is_file() or _tb_dir(path) is not None


def discover_runs(
    paths: Sequence[str | os.PathLike], notes: list[str] | None = None
) -> list[RunData]:
    """Every run under ``paths``: run directories, comparison directories (``compare.json``)
    or any directory whose sub-directories (up to three levels down) are runs."""
    notes = notes if notes is not None else []
    runs: list[RunData] = []
    seen: set[Path] = set()

    def add(run_dir: Path, name: str | None = None, seed: int | None = None) -> None:
        key = run_dir.resolve()
        if key in seen:
            return
        seen.add(key)
        run = load_run(run_dir, name, seed, notes)
        if run is not None:
            runs.append(run)

    for raw in paths:
        path = Path(raw)
        if not path.is_dir():
            raise ValueError(f"run directory {str(path)!r} does not exist")
        summary = path / "compare.json"
        if summary.is_file():
            data = json.loads(summary.read_text())
            for r in data.get("runs", []):
                run_dir = path / r["run_dir"]
                if run_dir.is_dir():
                    add(run_dir, r.get("name"), r.get("seed"))
                else:
                    notes.append(f"{run_dir}: listed in compare.json but not on disk; skipped")
            continue
        if _is_run_dir(path):
            add(path)
            continue
        found = sorted(
            {p.parent for pat in ("*/", "*/*/", "*/*/*/") for p in path.glob(pat + "metrics.jsonl")}
            | {
                p.parent.parent if p.parent.name == "tb" else p.parent
                for pat in ("*/", "*/*/", "*/*/*/", "*/*/*/*/")
                for p in path.glob(pat + "events.out.tfevents.*")
            }
        )
        if not found:
            raise ValueError(f"{str(path)!r} holds no run (no metrics.jsonl or TensorBoard events)")
        for run_dir in found:
            add(run_dir)
    return runs


def group_runs(runs: Sequence[RunData]) -> dict[str, list[RunData]]:
    """Runs by configuration name, in first-seen order, each list sorted by seed."""
    groups: dict[str, list[RunData]] = {}
    for run in runs:
        groups.setdefault(run.name, []).append(run)
    for name in groups:
        groups[name].sort(key=lambda r: (r.seed is None, r.seed if r.seed is not None else 0))
    return groups
