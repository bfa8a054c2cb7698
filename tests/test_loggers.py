"""``qae train`` with each experiment tracker on, read back with that tracker's own reader.

Each test trains two steps through the CLI, resumes the run for a third, and checks that
the tracker holds every numeric metric of ``metrics.jsonl`` at every step, with the same
values, in one tracker run: TensorBoard through its event reader, MLflow through
``MlflowClient`` on a local SQLite store, W&B offline through ``wandb leet inspect``
(W&B's reader of a run's transaction log). The packages come with ``qae[loggers]`` (in
``qae[dev]``); a test skips where its package is missing.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
from tiny_flags import TINY_TRAIN

from qae.cli import main


def _train_and_resume(run: Path, *tracker_flags: str) -> list[dict]:
    """Two steps, then a resume to three; the rows of ``metrics.jsonl``."""
    assert (
        main(["train", *TINY_TRAIN, *tracker_flags, "--trainer.steps", "2", "--out", str(run)]) == 0
    )
    assert main(["train", "--resume", "--out", str(run), "--trainer.steps", "3"]) == 0
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3]
    return rows


def _numeric(row: dict) -> dict[str, float]:
    return {
        k: float(v)
        for k, v in row.items()
        if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)
    }


def _check(logged: dict[int, dict[str, float]], rows: list[dict], rename=lambda k: k) -> None:
    """``logged[step][key]`` holds every numeric metric of every row, same value."""
    assert sorted(logged) == [1, 2, 3]
    for row in rows:
        want = {rename(k): v for k, v in _numeric(row).items()}
        got = logged[row["step"]]
        assert set(want) <= set(got), sorted(set(want) - set(got))
        for key, value in want.items():
            assert math.isclose(got[key], value, rel_tol=1e-6, abs_tol=1e-6), (row["step"], key)
    assert "train/loss" in logged[3] and "adv/frac_zero_adv" in logged[3]


def test_tensorboard_events_hold_every_metric(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = tmp_path / "run"
    rows = _train_and_resume(run, "--log.tensorboard", "true")
    events = EventAccumulator(str(run / "tb"), size_guidance={"scalars": 0})
    events.Reload()
    logged: dict[int, dict[str, float]] = {}
    for tag in events.Tags()["scalars"]:
        for event in events.Scalars(tag):
            logged.setdefault(event.step, {})[tag] = event.value
    _check(logged, rows)  # TensorBoard keeps float32: equal to 6 digits


def test_mlflow_run_on_a_sqlite_store_holds_every_metric(tmp_path, monkeypatch):
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store)
    monkeypatch.chdir(tmp_path)  # nothing of MLflow's lands in the working directory
    run = tmp_path / "run"
    rows = _train_and_resume(run, "--log.mlflow", "qae-test")

    client = MlflowClient(tracking_uri=store)
    experiment = client.get_experiment_by_name("qae-test")
    (only,) = client.search_runs([experiment.experiment_id])  # the resume logged to it too
    assert only.info.run_name == "run" and only.info.status == "FINISHED"
    assert json.loads((run / "trackers.json").read_text())["mlflow"] == only.info.run_id
    logged: dict[int, dict[str, float]] = {}
    for key in only.data.metrics:
        for metric in client.get_metric_history(only.info.run_id, key):
            logged.setdefault(metric.step, {})[key] = metric.value
    _check(logged, rows, rename=lambda k: k.replace("@", "_at_"))


def test_wandb_offline_run_files_hold_every_metric(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.delenv("WANDB_DIR", raising=False)
    monkeypatch.chdir(tmp_path)
    run = tmp_path / "run"
    rows = _train_and_resume(run, "--log.wandb", "qae-test")

    run_id = json.loads((run / "trackers.json").read_text())["wandb"]
    files = sorted((run / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(files) == 2  # the first start and the resume, one W&B run id
    logged: dict[int, dict[str, float]] = {}
    for path in files:
        proc = subprocess.run(
            [sys.executable, "-m", "wandb", "leet", "inspect", "--json", str(path)],
            capture_output=True, text=True, timeout=120, check=False,
        )  # fmt: skip
        assert proc.returncode == 0, proc.stderr[-2000:]
        records = [json.loads(line) for line in proc.stdout.splitlines() if line.strip()]
        (started,) = [r["run"] for r in records if r["type"] == "run"]
        assert started["run_id"] == run_id and started["project"] == "qae-test"
        for r in records:
            if r["type"] == "history":
                item = r["history"]["item"]
                logged.setdefault(int(item["_step"]), {}).update(item)
    _check(logged, rows)
