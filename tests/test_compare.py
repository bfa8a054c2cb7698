"""qae compare: grid expansion, run status, the process-bounded scheduler and resume."""

from __future__ import annotations

import io
import json
import shutil
import sys
from pathlib import Path

import pytest

from qae.io.runlog import atomic_write_text, read_metrics
from qae.report.compare import (
    GRIDS,
    RunSpec,
    RunState,
    build_config,
    dedup_grid,
    expand_grid,
    load_grid,
    render_progress,
    run_compare,
    run_status,
)

TINY = {
    "rollout.prompts_per_step": 4,
    "rollout.group_size": 4,
    "eval.n": 2,
    "eval.ks": [1, 2],
    "data.val_size": 8,
    "log.progress": False,
    "log.checkpoint_every": 1,
    "log.tensorboard": False,
}


def test_default_grid_dedups_the_repeated_k() -> None:
    names = [n for n, _ in dedup_grid(GRIDS["default"])]
    # mean baseline, QAE K=0.4, then the K sweep without its repeated 0.4
    assert names == ["dapo-mean", "qae-k0.4", "qae-k0.2", "qae-k0.6", "qae-k0.8"]
    assert len(GRIDS["default"]) == 6


def test_dedup_compares_resolved_configs() -> None:
    grid = [
        ("a", {"kcontrol.k": 0.4}),
        ("b", {"kcontrol.k": "0.4", "algo.estimator": "qae"}),  # the default, spelled out
        ("c", {"kcontrol.k": 0.6}),
    ]
    assert [n for n, _ in dedup_grid(grid)] == ["a", "c"]
    with pytest.raises(ValueError, match="grid name 'a'"):
        dedup_grid([("a", {"kcontrol.k": 0.4}), ("a", {"kcontrol.k": 0.6})])
    with pytest.raises(ValueError, match="kcontrol.nope"):
        dedup_grid([("a", {"kcontrol.nope": 1})])


def test_expand_grid_seeds_steps_and_overrides(tmp_path: Path) -> None:
    grid = load_grid("mean-vs-qae")
    specs = expand_grid(grid, [0, 7], steps=12, out=tmp_path, extra={"eval.n": 8}, threads=3)
    assert [s.label for s in specs] == [
        "dapo-mean/seed0", "qae-k0.4/seed0", "dapo-mean/seed7", "qae-k0.4/seed7",
    ]  # fmt: skip
    cfg = build_config(specs[2])
    assert cfg.algo.estimator == "grpo"
    assert (cfg.trainer.seed, cfg.data.seed, cfg.trainer.steps) == (7, 7, 12)
    assert cfg.eval.n == 8 and cfg.trainer.threads == 3 and not cfg.log.progress
    assert cfg.log.out == str(tmp_path / "dapo-mean" / "seed7")
    assert build_config(specs[1]).kcontrol.k == 0.4
    # --set wins over the grid's own values and over the thread default
    extra = {"algo.estimator": "rloo", "trainer.threads": 1}
    specs = expand_grid(grid, [0], steps=5, out=tmp_path, extra=extra, threads=4)
    assert {build_config(s).algo.estimator for s in specs} == {"rloo"}
    assert build_config(specs[0]).trainer.threads == 1
    with pytest.raises(ValueError, match="distinct"):
        expand_grid(grid, [1, 1], steps=5, out=tmp_path)


EXAMPLE_GRIDS = Path(__file__).resolve().parents[1] / "examples" / "grids"


@pytest.mark.parametrize("path", sorted(EXAMPLE_GRIDS.glob("*.yaml")), ids=lambda p: p.name)
def test_example_grids_build_on_the_testbed(path: Path, tmp_path: Path) -> None:
    grid = load_grid(str(path))
    # no entry is a duplicate of another (it would silently not run)
    assert [n for n, _ in dedup_grid(grid, "reasoning")] == [n for n, _ in grid]
    for spec in expand_grid(grid, [0], steps=3, out=tmp_path, base="reasoning"):
        assert build_config(spec).model.path == "builtin:reasoning"


def _same_config(a: tuple[str, str], b: tuple[str, str]) -> bool:
    """Whether entry ``a[1]`` of grid ``a[0]`` and entry ``b[1]`` of ``b[0]`` are one
    configuration on the reasoning preset."""
    (ga, na), (gb, nb) = a, b
    oa = dict(load_grid(ga))[na]
    ob = dict(load_grid(gb))[nb]
    return len(dedup_grid([("x", oa), ("y", ob)], "reasoning")) == 1


def test_example_grids_reuse_only_equal_cells() -> None:
    # results.md reuses runs across grids where the configurations are equal: check they are
    stability = str(EXAMPLE_GRIDS / "reasoning-stability.yaml")
    clip16 = str(EXAMPLE_GRIDS / "reasoning-cliphigh16.yaml")
    assert _same_config((clip16, "dapo-mean-clip0.28"), (stability, "dapo-mean_lr0.0006"))
    assert _same_config((clip16, "qae-k0.4-clip0.28"), (stability, "qae-k0.4_lr0.0006"))
    assert not _same_config((clip16, "dapo-mean-clip0.2"), (stability, "dapo-mean_lr0.0006"))
    ksweep16 = str(EXAMPLE_GRIDS / "reasoning-ksweep16.yaml")
    assert _same_config((ksweep16, "dapo-mean"), (stability, "dapo-mean_lr0.0003"))
    assert _same_config((ksweep16, "qae-k0.4"), (stability, "qae-k0.4_lr0.0003"))
    assert _same_config(("clip-high", "dapo-mean-clip0.28"), ("default", "dapo-mean"))
    assert _same_config(("clip-high", "qae-k0.4-clip0.28"), ("default", "qae-k0.4"))


def test_grid_on_a_base_preset(tmp_path: Path) -> None:
    # the clip-high grid's mini_batches=4 equals the reasoning preset's own: no conflict,
    # and every run starts from the preset, not from the embedded default
    specs = expand_grid(load_grid("clip-high"), [0], steps=3, out=tmp_path, base="reasoning")
    cfgs = [build_config(s) for s in specs]
    assert {c.model.path for c in cfgs} == {"builtin:reasoning"}
    assert [c.loss.clip_high for c in cfgs] == [0.2, 0.2, 0.28, 0.28, 0.35, 0.35]
    assert {(c.rollout.backend, c.trainer.old_logprobs) for c in cfgs} == {("sampler", "auto")}
    spec = json.loads(json.dumps(specs[0].__dict__))  # what the worker process reads back
    assert build_config(RunSpec(**spec)).model.path == "builtin:reasoning"
    # an entry equal to the base preset is deduplicated against it, not against the default
    grid = [("a", {"optim.lr": 1e-4, "trainer.mini_batches": 1}), ("b", {})]
    assert [n for n, _ in dedup_grid(grid, "arithmetic")] == ["a"]
    assert [n for n, _ in dedup_grid(grid)] == ["a", "b"]
    with pytest.raises(ValueError, match="neither a preset"):
        expand_grid(grid, [0], steps=3, out=tmp_path, base="nope")


def test_grid_file_and_unknown_grid(tmp_path: Path) -> None:
    path = tmp_path / "grid.yaml"
    path.write_text("low:\n  kcontrol.k: 0.2\nmean:\n  algo.estimator: grpo\n")
    assert load_grid(str(path)) == [
        ("low", {"kcontrol.k": 0.2}),
        ("mean", {"algo.estimator": "grpo"}),
    ]
    with pytest.raises(ValueError, match="neither a grid preset"):
        load_grid("no-such-grid")


def _fake_run(run_dir: Path, last_step: int, ckpt_step: int | None) -> None:
    run_dir.mkdir(parents=True)
    rows = "".join(json.dumps({"step": s}) + "\n" for s in range(last_step + 1))
    (run_dir / "metrics.jsonl").write_text(rows)
    if ckpt_step is not None:
        ck = run_dir / "checkpoints" / f"step_{ckpt_step:06d}"
        ck.mkdir(parents=True)
        (ck / "state.pt").write_bytes(b"x")
        (run_dir / "checkpoints" / "latest").write_text(ck.name + "\n")


def test_run_status(tmp_path: Path) -> None:
    assert run_status(tmp_path / "none", 5) == "new"
    _fake_run(tmp_path / "done", 5, 5)
    assert run_status(tmp_path / "done", 5) == "done"
    assert run_status(tmp_path / "done", 6) == "partial"  # asked for more steps
    _fake_run(tmp_path / "logged", 5, 4)  # killed after logging step 5, before its checkpoint
    assert run_status(tmp_path / "logged", 5) == "partial"
    _fake_run(tmp_path / "early", 1, None)  # killed before its first checkpoint
    assert run_status(tmp_path / "early", 5) == "stale"


def test_render_progress_lists_every_run(tmp_path: Path) -> None:
    specs = expand_grid(load_grid("mean-vs-qae"), [0], steps=10, out=tmp_path)
    states = [RunState(specs[0], status="running", step=3, start=100.0,
                       last={"reward/accuracy": 0.25, "actor/entropy": 0.5}),
              RunState(specs[1])]  # fmt: skip
    text = render_progress(states, now=130.0)
    lines = text.splitlines()
    assert "dapo-mean/seed0  running" in lines[2] and "3/10" in lines[2] and "30s" in lines[2]
    assert "0.25" in lines[2] and "0.500" in lines[2]
    assert "qae-k0.4/seed0   queued" in lines[3]
    assert lines[-1] == "1 queued, 1 running"


def _max_overlap(runs: list[dict]) -> int:
    events = sorted([(r["start"], 1) for r in runs] + [(r["end"], -1) for r in runs],
                    key=lambda e: (e[0], e[1]))  # fmt: skip
    best = cur = 0
    for _, d in events:
        cur += d
        best = max(best, cur)
    return best


# A stand-in worker without torch: logs steps 0..N (resuming after the last logged step),
# checkpoints each one, and fails when the spec says so.
FAKE_WORKER = r"""
import json, sys, time
from pathlib import Path
spec = json.loads(Path(sys.argv[1]).read_text())
run = Path(spec["run_dir"]); steps = spec["overrides"]["trainer.steps"]
if spec["overrides"].get("fail"):
    sys.exit("asked to fail")
m = run / "metrics.jsonl"
done = [json.loads(x) for x in m.read_text().splitlines() if x.endswith("}")] if m.exists() else []
m.write_text("".join(json.dumps(r) + "\n" for r in done))
with m.open("a") as fh:
    for step in range(len(done), steps + 1):
        time.sleep(0.15)
        fh.write(json.dumps({"step": step, "resumed": spec["resume"]}) + "\n"); fh.flush()
        ck = run / "checkpoints" / f"step_{step:06d}"; ck.mkdir(parents=True, exist_ok=True)
        (ck / "state.pt").write_bytes(b"x")
        (run / "checkpoints" / "latest").write_text(ck.name + "\n")
"""


def test_scheduler_bound_skip_resume_and_failure(tmp_path: Path) -> None:
    """The scheduler alone, with a stand-in worker: 5 runs at most 2 at a time; a re-run
    skips the finished, resumes the cut-short and reports the failed one."""
    out = tmp_path / "cmp"
    worker = [sys.executable, "-c", FAKE_WORKER]
    specs = expand_grid(load_grid("mean-vs-qae"), [0, 1], steps=3, out=out)
    bad = RunSpec("bad", 0, str(out / "bad" / "seed0"), {"trainer.steps": 3, "fail": True})
    result = run_compare([*specs, bad], out, parallel=2, poll=0.05, worker=worker)
    runs = result.summary["runs"]
    assert [r["status"] for r in runs] == ["done"] * 4 + ["failed"]
    assert "asked to fail" in runs[-1]["error"] and result.failed == ["bad/seed0"]
    assert _max_overlap(runs) == 2
    victim = Path(specs[1].run_dir)
    rows = read_metrics(victim / "metrics.jsonl")
    (victim / "metrics.jsonl").write_text(
        "".join(json.dumps(r) + "\n" for r in rows[:2]) + '{"step": 2, "res'
    )
    shutil.rmtree(victim / "checkpoints" / "step_000003")
    shutil.rmtree(victim / "checkpoints" / "step_000002")
    atomic_write_text(victim / "checkpoints" / "latest", "step_000001\n")
    result = run_compare(specs, out, parallel=2, poll=0.05, worker=worker)
    assert [r["status"] for r in result.summary["runs"]] == [
        "skipped",
        "done",
        "skipped",
        "skipped",
    ]
    assert result.summary["runs"][1]["resumed"] and result.summary["complete"]
    again = read_metrics(victim / "metrics.jsonl")
    assert [r["step"] for r in again] == [0, 1, 2, 3]
    assert [r["resumed"] for r in again] == [False, False, True, True]
    # killed before its first checkpoint: nothing to resume, so it starts over (its old
    # metrics kept aside), instead of failing on --resume
    early = Path(specs[2].run_dir)
    shutil.rmtree(early / "checkpoints")
    (early / "metrics.jsonl").write_text(json.dumps({"step": 0, "resumed": False}) + "\n")
    result = run_compare(specs, out, parallel=2, poll=0.05, worker=worker)
    assert result.summary["runs"][2]["status"] == "done"
    assert not result.summary["runs"][2]["resumed"]
    assert [r["step"] for r in read_metrics(early / "metrics.jsonl")] == [0, 1, 2, 3]
    assert (early / "metrics.restarted.jsonl").exists()


@pytest.mark.slow
def test_compare_parallel_skip_and_resume(tmp_path: Path) -> None:
    """2 configs x 2 seeds on the tiny task, 2 at a time; then a re-run skips them all but
    one that was cut short after its step-1 checkpoint, which resumes; a broken run fails
    alone."""
    out = tmp_path / "cmp"
    specs = expand_grid(
        load_grid("mean-vs-qae"), [0, 1], steps=2, out=out, extra=TINY, base="arithmetic"
    )
    result = run_compare(specs, out, parallel=2, poll=0.2)
    summary = json.loads((out / "compare.json").read_text())
    assert summary == json.loads(json.dumps(result.summary))
    assert [r["status"] for r in summary["runs"]] == ["done"] * 4, summary["runs"]
    assert _max_overlap(summary["runs"]) == 2  # ran in parallel, never more than 2 at once
    for spec in specs:
        assert [r["step"] for r in read_metrics(Path(spec.run_dir) / "metrics.jsonl")] == [0, 1, 2]
        assert run_status(spec.run_dir, 2) == "done"

    # Cut qae-k0.4/seed1 back to "killed while logging step 2": checkpoint 1 is the newest,
    # metrics end with step 1 and a torn line.
    victim = Path(specs[3].run_dir)
    assert specs[3].label == "qae-k0.4/seed1"
    shutil.rmtree(victim / "checkpoints" / "step_000002")
    atomic_write_text(victim / "checkpoints" / "latest", "step_000001\n")
    rows = read_metrics(victim / "metrics.jsonl")
    kept = "".join(json.dumps(r) + "\n" for r in rows[:2])
    (victim / "metrics.jsonl").write_text(kept + '{"step": 2, "rollout/gen')
    assert run_status(victim, 2) == "partial"
    broken = RunSpec("broken", 0, str(out / "broken" / "seed0"),
                     {**specs[0].overrides, "model.path": str(tmp_path / "missing-model"),
                      "log.out": str(out / "broken" / "seed0")}, "arithmetic")  # fmt: skip

    result = run_compare([*specs, broken], out, parallel=2, poll=0.2)
    status = {r["label"]: r for r in result.summary["runs"]}
    assert [status[s.label]["status"] for s in specs[:3]] == ["skipped"] * 3
    assert status["qae-k0.4/seed1"]["status"] == "done" and status["qae-k0.4/seed1"]["resumed"]
    assert status["broken/seed0"]["status"] == "failed"
    assert "missing-model" in status["broken/seed0"]["error"]
    assert result.failed == ["broken/seed0"]
    again = read_metrics(victim / "metrics.jsonl")
    assert [r["step"] for r in again] == [0, 1, 2]
    assert again[:2] == rows[:2]  # steps 0-1 were kept, not re-run: it resumed
    assert run_status(victim, 2) == "done"


def test_the_final_progress_table_is_printed_once(tmp_path: Path) -> None:
    """Off a terminal the table is printed when a status changes; the last change already
    shows the final table, so the closing call must not print it a second time."""
    out = tmp_path / "cmp"
    worker = [sys.executable, "-c", FAKE_WORKER]
    specs = expand_grid(load_grid("mean-vs-qae"), [0], steps=1, out=out)
    stream = io.StringIO()
    run_compare(specs, out, parallel=2, poll=0.05, worker=worker, stream=stream)
    lines = stream.getvalue().splitlines()
    assert lines.count(f"{len(specs)} done") == 1, stream.getvalue()
    assert lines[-1] == f"{len(specs)} done"
