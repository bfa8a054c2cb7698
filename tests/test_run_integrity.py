"""A run directory cannot be corrupted: one owner per run, strict resume with a fallback to
the newest whole checkpoint, durable checkpoints, metrics history kept on resume."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from tiny_flags import TINY_TRAIN

from qae.cli import main
from qae.io.configtools import apply_overrides
from qae.io.runlog import Checkpointer, MetricsLogger, read_metrics
from qae.train.config import load_preset
from qae.train.trainer import train

DETERMINISTIC = [
    "reward/mean",
    "reward/accuracy",
    "adv/frac_zero_adv",
    "actor/entropy",
    "train/loss",
    "train/grad_norm",
    "rollout/generated",
    "rollout/entropy",
]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
TINY_FLAGS = [*TINY_TRAIN, "--log.checkpoint_every", "1"]


def tiny(out: Path, **overrides):
    """The arithmetic preset shrunk to a few seconds, a checkpoint every step."""
    base = {
        "log.out": str(out),
        "log.progress": False,
        "log.tensorboard": False,
        "trainer.steps": 4,
        "trainer.threads": 1,
        "trainer.diagnostics_every": 0,
        "rollout.prompts_per_step": 4,
        "rollout.group_size": 4,
        "eval.enabled": False,
        "log.checkpoint_every": 1,
        "log.keep_last": 3,
        "optim.lr": 1e-3,
    }
    base.update(overrides)
    return apply_overrides(load_preset("arithmetic"), base)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


def _one_line(stderr: str) -> str:
    lines = [x for x in stderr.splitlines() if x.strip()]
    assert len(lines) == 1, stderr
    return lines[0]


# --------------------------------------------------------------------------------------
# One owner per run

# The first run waits at step 2 until the test creates the gate file, so the other
# commands meet it alive, whatever the machine's speed.
GATED_RUN = """
import sys, time
from pathlib import Path
import qae.train.trainer as t

gate, real = Path(sys.argv[1]), t.train_step

def gated(step, *args, **kwargs):
    deadline = time.monotonic() + 300
    while step == 2 and not gate.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    return real(step, *args, **kwargs)

t.train_step = gated
from qae.cli import main
sys.exit(main(sys.argv[2:]))
"""


def test_a_second_train_and_a_resume_on_a_live_run_refuse_and_the_first_finishes(tmp_path):
    run, gate = tmp_path / "run", tmp_path / "go"
    qae = [sys.executable, "-m", "qae.cli"]
    first = subprocess.Popen(
        [sys.executable, "-c", GATED_RUN, str(gate), "train", *TINY_FLAGS, "--steps", "3"]
        + ["--out", str(run)],
        env=ENV,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        _wait_for(
            lambda: (run / "checkpoints" / "latest").exists() or first.poll() is not None,
            240,
            "the first run's first checkpoint",
        )
        assert first.poll() is None, first.communicate()
        t0 = time.monotonic()
        second = subprocess.Popen(
            [*qae, "train", *TINY_FLAGS, "--out", str(run)],
            env=ENV,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        resume = subprocess.Popen(
            [*qae, "train", "--resume", "--out", str(run)],
            env=ENV,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        results = [p.communicate(timeout=180) for p in (second, resume)]
        elapsed = time.monotonic() - t0
        for proc, (_, err) in zip((second, resume), results, strict=True):
            line = _one_line(err)
            assert proc.returncode == 1, err
            assert line.startswith("qae train: error:") and "in use" in line, line
            assert f"pid {first.pid}" in line, line
        assert elapsed < 120 and first.poll() is None  # refused while the first was alive
    finally:
        gate.touch()
        out, err = first.communicate(timeout=300)
    assert first.returncode == 0, err
    assert [r["step"] for r in read_metrics(run / "metrics.jsonl")] == [1, 2, 3]
    latest = Checkpointer(run).latest()
    assert latest.name == "step_000003" and Checkpointer.verify(latest) is None


HOLDER = """
import os, sys, time
from qae.io.runlock import RunLock

RunLock(sys.argv[1]).acquire()
child = os.fork()  # as the reward pool forks its workers
if child == 0:
    time.sleep(600)
    os._exit(0)
print(child, flush=True)
time.sleep(600)
"""


def test_a_killed_owner_never_blocks_the_next_one_even_with_a_forked_child(tmp_path):
    from qae.io.errors import RunLockedError
    from qae.io.runlock import RunLock

    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(tmp_path)], env=ENV, stdout=subprocess.PIPE, text=True
    )
    child = int(holder.stdout.readline())
    try:
        with pytest.raises(RunLockedError, match=f"pid {holder.pid}"):
            RunLock(tmp_path).acquire()
        holder.kill()  # SIGKILL: no cleanup runs in the holder; its child lives on
        holder.wait()
        with RunLock(tmp_path):
            assert json.loads((tmp_path / "run.lock").read_text())["pid"] == os.getpid()
    finally:
        holder.kill()
        os.kill(child, 9)


def test_a_lock_is_exclusive_within_one_process_too(tmp_path):
    from qae.io.errors import RunLockedError

    def second_run(step, metrics):
        if step == 1:
            with pytest.raises(RunLockedError, match=f"pid {os.getpid()}"):
                train(tiny(tmp_path / "r", **{"trainer.steps": 1}), resume=True)

    train(tiny(tmp_path / "r", **{"trainer.steps": 2}), on_step=second_run)
    assert [r["step"] for r in read_metrics(tmp_path / "r" / "metrics.jsonl")] == [1, 2]


# --------------------------------------------------------------------------------------
# Strict resume with a fallback


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    out = tmp_path_factory.mktemp("full")
    train(tiny(out / "run"))
    return read_metrics(out / "run" / "metrics.jsonl")


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _flip_a_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size: only the recorded sha256 can tell
    path.write_bytes(bytes(data))


DAMAGE = {
    "weights missing": lambda ck: (ck / "model" / "model.safetensors").unlink(),
    "weights truncated": lambda ck: _truncate(ck / "model" / "model.safetensors"),
    "weights bit flip": lambda ck: _flip_a_byte(ck / "model" / "model.safetensors"),
    "state truncated": lambda ck: _truncate(ck / "state.pt"),
}


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_a_damaged_latest_checkpoint_falls_back_and_matches_the_uninterrupted_run(
    tmp_path, uninterrupted, damage
):
    run = tmp_path / "run"

    def kill(step, metrics):
        if step == 3:  # after the checkpoint of step 3
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(tiny(run), on_step=kill)
    DAMAGE[damage](run / "checkpoints" / "step_000003")
    with pytest.warns(UserWarning, match="step_000003 is damaged.*resuming from step_000002"):
        train(tiny(run), resume=True)
    resumed = read_metrics(run / "metrics.jsonl")
    assert [r["step"] for r in resumed] == [1, 2, 3, 4]
    for x, y in zip(uninterrupted, resumed, strict=True):
        assert {k: x[k] for k in DETERMINISTIC} == {k: y[k] for k in DETERMINISTIC}, x["step"]
    assert (run / "checkpoints" / "damaged" / "step_000003").is_dir()
    assert Checkpointer.verify(run / "checkpoints" / "step_000003") is None  # written again


def test_a_resume_with_no_whole_checkpoint_refuses_in_one_line(tmp_path, capsys):
    run = tmp_path / "run"
    train(tiny(run, **{"trainer.steps": 2, "log.checkpoint_every": 2}))
    (run / "checkpoints" / "step_000002" / "model" / "model.safetensors").unlink()
    before = (run / "metrics.jsonl").read_text()
    capsys.readouterr()
    assert main(["train", "--resume", "--out", str(run)]) == 1
    line = _one_line(capsys.readouterr().err)
    assert line.startswith("qae train: error: cannot resume") and "no whole checkpoint" in line
    assert "model/model.safetensors is missing" in line
    assert (run / "metrics.jsonl").read_text() == before  # nothing started from base weights


def test_an_unloadable_state_file_is_one_line_not_a_traceback(tmp_path, capsys):
    run = tmp_path / "run"
    train(tiny(run, **{"trainer.steps": 1}))
    ck = run / "checkpoints" / "step_000001"
    (ck / "manifest.json").unlink(
        missing_ok=True
    )  # as an older qae wrote it: nothing to verify against
    (ck / "state.pt").write_bytes(b"not a torch file")
    capsys.readouterr()
    assert main(["train", "--resume", "--out", str(run), "--steps", "2"]) == 1
    line = _one_line(capsys.readouterr().err)
    assert "step_000001: state.pt cannot be loaded" in line


def test_weights_load_strictly_and_leave_the_model_alone_on_a_mismatch(tmp_path):
    from safetensors.torch import save_file

    from qae.io.errors import CheckpointError
    from qae.io.resume import load_weights
    from qae.train.trainer import load_policy

    model, _ = load_policy("builtin:arithmetic", torch.device("cpu"))
    weights = {k: v.clone() + 1 for k, v in model.state_dict().items()}
    dropped = next(k for k in sorted(weights) if ".mlp." in k)
    del weights[dropped], weights["lm_head.weight"]  # the head is tied: stored once is fine
    (tmp_path / "model").mkdir()
    save_file(weights, str(tmp_path / "model" / "model.safetensors"))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(CheckpointError, match=f"1 weight\\(s\\) missing \\({dropped}\\)"):
        load_weights(model, tmp_path / "model")
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


# --------------------------------------------------------------------------------------
# Durable checkpoints with normal permissions


class _Model(torch.nn.Module):
    """A model whose ``save_pretrained`` writes safetensors as transformers does."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Linear(2, 2)

    def save_pretrained(self, path, safe_serialization=True):
        from safetensors.torch import save_file

        path.mkdir(parents=True, exist_ok=True)
        save_file(self.state_dict(), str(path / "model.safetensors"))


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="needs /proc to name fds")
def test_every_file_and_folder_is_fsynced_before_the_rename_that_publishes(tmp_path, monkeypatch):
    events: list[tuple[str, str, str]] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}"), ""))
        return real_fsync(fd)

    def replace(src, dst):
        events.append(("replace", str(src), str(dst)))
        return real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    tmp_path = tmp_path.resolve()  # /proc names fds by their real paths
    root = tmp_path / "checkpoints"
    final = Checkpointer(tmp_path).save(1, _Model(), None, {"step": 1})
    publish = next(i for i, e in enumerate(events) if e[0] == "replace" and e[2] == str(final))
    tmp = Path(events[publish][1])
    synced_before = {e[1] for e in events[:publish] if e[0] == "fsync"}
    for path in [final, *final.rglob("*")]:
        assert str(tmp / path.relative_to(final)) in synced_before, path
    assert ("fsync", str(root), "") in events[publish:]  # the rename itself is durable
    latest = next(i for i, e in enumerate(events) if e[0] == "replace" and e[2].endswith("latest"))
    assert ("fsync", str(root), "") in events[latest:]


def test_checkpoints_get_the_permissions_of_a_plain_open_and_mkdir(tmp_path):
    final = Checkpointer(tmp_path).save(1, _Model(), None, {"step": 1})
    mask = _umask()
    for path in [final, *final.rglob("*")]:
        want = (0o777 if path.is_dir() else 0o666) & ~mask
        assert stat.S_IMODE(path.stat().st_mode) == want, path


def test_stale_temporaries_of_dead_writers_go_and_a_live_writers_stay(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    live = os.getppid()  # the process that started the tests: alive
    run = tmp_path / "run"
    ckpts = run / "checkpoints"
    ckpts.mkdir(parents=True)
    stale = [
        ckpts / f".step_000009.{dead.pid}.abc123.tmp",
        ckpts / f".latest.{dead.pid}.k2j3.tmp",
        run / f".metrics.jsonl.{dead.pid}.q1w2.tmp",
        run / f".config.yaml.{dead.pid}.e3r4.tmp",
        ckpts / ".step_000008.olderqae",  # an older qae's half-written checkpoint
    ]
    kept = ckpts / f".step_000007.{live}.zz9.tmp"
    for path in [*stale, kept]:
        if "step_" in path.name:
            (path / "model").mkdir(parents=True)
        else:
            path.write_text("half")
    train(tiny(run, **{"trainer.steps": 2}))
    assert [p for p in stale if p.exists()] == []
    assert kept.is_dir()  # a live writer's file, even across the run's own pruning
    names = sorted(p.name for p in ckpts.iterdir())
    assert names == [kept.name, "latest", "step_000001", "step_000002"]


@pytest.mark.parametrize(
    "message, free",
    [
        ("basic_ios::clear: iostream error", 0),  # C++ streams say nothing: the disk does
        ("Error while serializing: IoError(Os { code: 28, kind: StorageFull })", 1 << 40),
    ],
)
def test_a_disk_full_error_from_a_library_is_reported_as_enospc(
    tmp_path, monkeypatch, message, free
):
    import errno

    class _Stream(_Model):
        def save_pretrained(self, path, safe_serialization=True):
            raise RuntimeError(message)

    monkeypatch.setattr("qae.io.runlog._free_bytes", lambda folder: free, raising=False)
    with pytest.raises(OSError) as info:
        Checkpointer(tmp_path).save(1, _Stream(), None, {"step": 1})
    assert info.value.errno == errno.ENOSPC
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == []


# --------------------------------------------------------------------------------------
# Metrics history


def test_a_corrupt_middle_line_is_set_aside_and_later_steps_are_kept(tmp_path):
    log = MetricsLogger(tmp_path, tensorboard=False)
    for step in range(1, 26):
        log.log(step, {"loss": step * 0.5})
    log.close()
    path = tmp_path / "metrics.jsonl"
    lines = path.read_bytes().split(b"\n")
    lines[4] = b'{"step": 5, "loss": \x00\x00 garbage'  # line 5: a damaged sector
    path.write_bytes(b"\n".join(lines) + b'{"step": 26, "lo')  # and a torn last line
    assert [r["step"] for r in read_metrics(path)] == [s for s in range(1, 26) if s != 5]
    with pytest.warns(UserWarning, match="1 corrupt line.*line 5.*metrics.corrupt.jsonl"):
        log = MetricsLogger(tmp_path, resume_step=20, tensorboard=False)
    log.log(21, {"loss": 0.0})
    log.close()
    steps = [json.loads(x)["step"] for x in path.read_text().splitlines()]
    assert steps == [s for s in range(1, 22) if s != 5]
    aside = (tmp_path / "metrics.corrupt.jsonl").read_bytes()
    assert aside == lines[4] + b"\n"  # the torn last line is dropped, not set aside
