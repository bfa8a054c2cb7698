"""Tests for run-directory I/O: metrics lines and atomic checkpoints."""

from __future__ import annotations

import json

import pytest
import torch

from qae.io.runlog import Checkpointer, MetricsLogger, atomic_write_text, read_metrics


def test_metrics_append_and_resume_drops_later_and_torn_lines(tmp_path):
    log = MetricsLogger(tmp_path, tensorboard=False)
    for step in range(1, 6):
        log.log(step, {"loss": step * 0.5, "t": torch.tensor(2.0), "nan": float("nan")})
    log.close()
    with (tmp_path / "metrics.jsonl").open("a") as fh:
        fh.write('{"step": 6, "loss": ')  # a kill mid-write
    rows = read_metrics(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5]
    assert rows[0]["t"] == 2.0 and rows[0]["nan"] is None
    log = MetricsLogger(tmp_path, resume_step=3, tensorboard=False)
    log.log(4, {"loss": 9.0})
    log.close()
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["step"] for x in lines] == [1, 2, 3, 4]
    assert json.loads(lines[-1])["loss"] == 9.0


def test_fresh_logger_starts_empty(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"step": 1}\n')
    MetricsLogger(tmp_path, tensorboard=False).close()
    assert read_metrics(tmp_path / "metrics.jsonl") == []


def test_atomic_write_leaves_no_temp(tmp_path):
    atomic_write_text(tmp_path / "a" / "x.txt", "hello")
    assert (tmp_path / "a" / "x.txt").read_text() == "hello"
    assert [p.name for p in (tmp_path / "a").iterdir()] == ["x.txt"]


class _Model(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.w = torch.nn.Linear(2, 2)

    def save_pretrained(self, path, safe_serialization=True):
        from safetensors.torch import save_file

        path.mkdir(parents=True, exist_ok=True)
        save_file(self.state_dict(), str(path / "model.safetensors"))


class _Failing(_Model):
    def save_pretrained(self, path, safe_serialization=True):
        raise KeyboardInterrupt  # a kill in the middle of a save


def test_checkpoints_are_atomic_and_pruned(tmp_path):
    ck = Checkpointer(tmp_path, keep_last=2)
    assert ck.latest() is None
    for step in (1, 2, 3):
        ck.save(step, _Model(), None, {"step": step, "rng": torch.get_rng_state()})
    names = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert names == ["latest", "step_000002", "step_000003"]
    assert Checkpointer.load_state(ck.latest())["step"] == 3
    with pytest.raises(KeyboardInterrupt):
        ck.save(4, _Failing(), None, {"step": 4})
    assert ck.latest().name == "step_000003"  # the torn save left no trace
    assert not any(p.name.startswith(".") for p in (tmp_path / "checkpoints").iterdir())


def test_state_is_loaded_without_executing_code(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    d = tmp_path / "checkpoints" / "step_000001"
    d.mkdir(parents=True)
    torch.save({"x": Evil()}, d / "state.pt")
    with pytest.raises(Exception, match="(?i)weights_only|unsupported"):
        Checkpointer.load_state(d)
