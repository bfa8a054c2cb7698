"""qae report: reading runs, statistics over seeds, figures and the self-contained page."""

from __future__ import annotations

import base64
import html
import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qae.report import (
    build_report,
    discover_runs,
    first_step_reaching,
    group_runs,
    load_run,
    mean_std,
    smooth,
    summary_table,
)
from qae.report import runs as runs_mod


def write_run(path: Path, rows: list[dict], *, steps: int | None = None, estimator="qae",
              seed: int = 0, torn: str = "") -> Path:  # fmt: skip
    path.mkdir(parents=True, exist_ok=True)
    text = "".join(json.dumps(r) + "\n" for r in rows) + torn
    (path / "metrics.jsonl").write_text(text)
    if steps is not None:
        (path / "config.yaml").write_text(
            f"algo:\n  estimator: {estimator}\ntrainer:\n  steps: {steps}\n  seed: {seed}\n"
        )
    return path


def rows_of(acc, val0, val_end, ent, k=0.4):
    """Step 0: validation only; steps 1..N: training metrics; last step adds validation."""
    n = len(acc)
    out = [{"step": 0, "val/pass@1": val0[0], "val/pass@2": val0[1]}]
    for i, a in enumerate(acc, start=1):
        row = {
            "step": i,
            "rollout/accuracy_all": a,
            "actor/entropy": ent[i - 1],
            "adv/frac_zero_adv": 0.5,
            "response/len_mean": 3.0,
            "train/clipfrac_low": 0.0,
            "train/clipfrac_high": 0.01 * i,
            "adv/k": k,
        }
        if i == n:
            row.update({"val/pass@1": val_end[0], "val/pass@2": val_end[1]})
        out.append(row)
    return out


@pytest.fixture
def synthetic(tmp_path: Path) -> Path:
    root = tmp_path / "cmp"
    # qae: seed0 accuracy crosses 0.6 at step 3 (raw) / 4 (2-step mean: .2 .3 .5 .7);
    # seed1 crosses at step 2 (raw) / 3 (2-step mean: .1 .4 .6 .7).
    write_run(root / "qae" / "seed0",
              rows_of([0.2, 0.4, 0.6, 0.8], (0.1, 0.2), (0.5, 0.6), [1.0, 0.8, 0.6, 0.4]),
              steps=4, seed=0)  # fmt: skip
    write_run(root / "qae" / "seed1",
              rows_of([0.1, 0.7, 0.5, 0.9], (0.1, 0.2), (0.7, 0.9), [1.0, 0.9, 0.8, 0.6]),
              steps=4, seed=1, torn='{"step": 5, "rollout/accuracy_al')  # fmt: skip
    # mean baseline: never reaches 0.6; seed0 still running (3 of 10 steps logged).
    write_run(root / "mean" / "seed0",
              rows_of([0.1, 0.2, 0.3], (0.1, 0.2), (0.2, 0.4), [1.0, 1.0, 1.0], k=0.4),
              steps=10, seed=0, estimator="grpo")  # fmt: skip
    return root


def test_reading_torn_and_running_runs(synthetic: Path) -> None:
    notes: list[str] = []
    runs = discover_runs([synthetic], notes)
    by = {(r.name, r.seed): r for r in runs}
    assert set(by) == {("qae", 0), ("qae", 1), ("mean", 0)}
    torn = by[("qae", 1)]
    assert torn.last_step == 4  # the torn step-5 line is ignored
    assert torn.finished
    running = by[("mean", 0)]
    assert running.planned_steps == 10 and running.last_step == 3 and not running.finished
    # the mean baseline ignores K: its K series is dropped
    assert "adv/k" not in running.series and "adv/k" in by[("qae", 0)].series
    steps, values = torn.get("val/pass@1")
    assert steps.tolist() == [0, 4] and values.tolist() == [0.1, 0.7]


def test_table_mean_std_and_first_step(synthetic: Path) -> None:
    groups = group_runs(discover_runs([synthetic]))
    cols, rows = summary_table(groups, target=0.6, window=1, tail=2)
    keys = [c.key for c in cols]
    assert "val/pass@2" in keys and "val/pass@1" in keys
    row = {r.name: r for r in rows}
    q = row["qae"]
    # final pass@1: 0.5 and 0.7 -> mean 0.6, sample std sqrt((0.1^2 + 0.1^2) / 1) = 0.141421
    m, s, per = q.cells["val/pass@1"]
    assert m == pytest.approx(0.6) and s == pytest.approx(math.sqrt(0.02)) and per == [0.5, 0.7]
    # pass@2: 0.6, 0.9 -> mean 0.75, std sqrt(2 * 0.15^2) = 0.212132
    m, s, _ = q.cells["val/pass@2"]
    assert m == pytest.approx(0.75) and s == pytest.approx(math.sqrt(2) * 0.15)
    # entropy, last 2 steps: seed0 (0.6+0.4)/2 = 0.5, seed1 (0.8+0.6)/2 = 0.7 -> 0.6 +- 0.1414
    m, s, _ = q.cells["actor/entropy"]
    assert m == pytest.approx(0.6) and s == pytest.approx(math.sqrt(0.02))
    assert q.first_steps == [3, 2]
    assert q.finished == 2 and q.seeds == [0, 1]
    mean = row["mean"]
    assert mean.first_steps == [None] and mean.finished == 0
    assert mean.cells["val/pass@1"][:2] == (pytest.approx(0.2), 0.0)  # one seed: std 0
    _, rows2 = summary_table(groups, target=0.6, window=2, tail=2)
    assert {r.name: r for r in rows2}["qae"].first_steps == [4, 3]


def test_first_step_reaching_exact() -> None:
    steps = np.array([10, 20, 30, 40])
    values = np.array([0.0, 1.0, 0.0, 1.0])
    assert first_step_reaching(steps, values, 1.0) == 20
    assert first_step_reaching(steps, values, 1.0, window=2) is None  # means .0 .5 .5 .5
    assert first_step_reaching(steps, values, 0.5, window=2) == 20
    assert first_step_reaching(steps, values, 2.0) is None


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.floats(-1e3, 1e3, allow_nan=False), min_size=1, max_size=40),
    st.integers(1, 50),
)
def test_smooth_is_trailing_mean(values: list[float], window: int) -> None:
    x = np.array(values)
    got = smooth(x, window)
    for i in range(len(x)):
        assert got[i] == pytest.approx(x[max(0, i - window + 1) : i + 1].mean(), abs=1e-9)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.floats(-1e3, 1e3, allow_nan=False), min_size=1, max_size=20))
def test_mean_std_matches_numpy(values: list[float]) -> None:
    m, s = mean_std(values + [math.nan])  # NaN is ignored
    assert m == pytest.approx(np.mean(values), abs=1e-9)
    want = np.std(values, ddof=1) if len(values) > 1 else 0.0
    assert s == pytest.approx(want, abs=1e-7)


def test_build_report_self_contained(synthetic: Path, tmp_path: Path) -> None:
    out = tmp_path / "report"
    result = build_report([synthetic], out, target=0.6, window=1, tail=2, title="t")
    assert set(result.figures) == {
        "entropy", "val_pass1", "val_passk", "train_accuracy", "response_length", "zero_adv",
        "clipfrac", "k",
    }  # fmt: skip
    for path in result.figures.values():
        data = path.read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and 5_000 < len(data) < 300_000
    page = result.html.read_text()
    srcs = re.findall(r"""\b(?:src|href)\s*=\s*["']([^"']*)""", page, flags=re.I)
    assert len(srcs) == len(result.figures)
    assert all(s.startswith("data:image/png;base64,") for s in srcs)
    assert not re.search(r"<(script|link|iframe)\b|url\(|@import", page, flags=re.I)
    embedded = base64.b64decode(srcs[0].split(",", 1)[1])
    assert embedded == next(iter(result.figures.values())).read_bytes()
    assert "still running or stopped" in page  # the unfinished run is called out
    summary = json.loads((out / "summary.json").read_text())
    q = next(c for c in summary["configs"] if c["name"] == "qae")
    assert q["first_step_to_target"] == [3, 2]
    assert q["cells"]["val/pass@1"]["mean"] == pytest.approx(0.6)
    table = (out / "table.md").read_text()
    assert "| qae | 0,1 (2/2) | 0.600 ± 0.141 |" in table


def test_tensorboard_only_run_without_package(tmp_path: Path, monkeypatch) -> None:
    run = tmp_path / "tbonly"
    (run / "tb").mkdir(parents=True)
    (run / "tb" / "events.out.tfevents.1.host").write_bytes(b"\x00" * 16)
    monkeypatch.setattr(runs_mod, "tensorboard_available", lambda: False)
    notes: list[str] = []
    assert load_run(run, notes=notes) is None
    assert "tensorboard package is not installed" in notes[0]
    with pytest.raises(ValueError, match="no readable run"):
        build_report([run], tmp_path / "out")


def test_tensorboard_events_are_read(tmp_path: Path) -> None:
    pytest.importorskip("tensorboard")
    from torch.utils.tensorboard import SummaryWriter

    run = tmp_path / "tbrun" / "seed3"
    writer = SummaryWriter(str(run / "tb"))
    for step, value in [(1, 0.25), (2, 0.5), (3, 0.75)]:
        writer.add_scalar("rollout/accuracy_all", value, step)
    writer.close()
    r = load_run(run)
    assert r is not None and r.source == "tensorboard" and r.seed == 3 and r.name == "tbrun"
    steps, values = r.get("rollout/accuracy_all")
    assert steps.tolist() == [1, 2, 3] and values.tolist() == [0.25, 0.5, 0.75]


def test_missing_directory_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="does not exist"):
        discover_runs([tmp_path / "nope"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="holds no run"):
        discover_runs([tmp_path / "empty"])


def _interrupted(root: Path) -> None:
    """qae: 2 seeds, finished. mean: 1 seed stopped at step 3 of 10, validated at step 0 only."""
    write_run(root / "qae" / "seed0",
              rows_of([0.2, 0.4, 0.6, 0.8], (0.1, 0.2), (0.5, 0.6), [1.0, 0.8, 0.6, 0.4]),
              steps=4, seed=0)  # fmt: skip
    write_run(root / "qae" / "seed1",
              rows_of([0.1, 0.7, 0.5, 0.9], (0.1, 0.2), (0.7, 0.9), [1.0, 0.9, 0.8, 0.6]),
              steps=4, seed=1)  # fmt: skip
    rows = rows_of([0.1, 0.2, 0.3], (0.15, 0.25), (0.2, 0.4), [1.0, 1.0, 1.0])
    del rows[-1]["val/pass@1"], rows[-1]["val/pass@2"]  # killed before its next validation
    write_run(root / "mean" / "seed0", rows, steps=10, seed=0, estimator="grpo")


def test_an_interrupted_run_says_which_step_its_final_values_are_from(tmp_path: Path) -> None:
    _interrupted(tmp_path / "cmp")
    result = build_report([tmp_path / "cmp"], tmp_path / "r", target=0.6, window=1, tail=2)
    (note,) = result.notes
    assert note.startswith("mean seed 0: at step 3 of 10 (still running or stopped)")
    assert "held-out pass@1 (final) and held-out pass@2 (final) are from step 0" in note
    assert "before any update" in note and "up to step 3" in note
    table = (tmp_path / "r" / "table.md").read_text()
    mean = next(line for line in table.splitlines() if line.startswith("| mean |"))
    assert "| 0.150 (from step 0) | 0.250 (from step 0) |" in mean
    qae = next(line for line in table.splitlines() if line.startswith("| qae |"))
    assert "from step" not in qae  # finished runs validated at their last step
    assert html.escape(note) in result.html.read_text()


def test_a_single_seed_has_no_spread(tmp_path: Path) -> None:
    _interrupted(tmp_path / "cmp")
    result = build_report([tmp_path / "cmp"], tmp_path / "r", target=0.6, window=1, tail=2)
    table = (tmp_path / "r" / "table.md").read_text()
    mean = next(line for line in table.splitlines() if line.startswith("| mean |"))
    assert "\u00b1" not in mean and "| 0.250 | 1.000 |" in mean  # last-2 accuracy, entropy
    qae = next(line for line in table.splitlines() if line.startswith("| qae |"))
    assert "0.600 \u00b1 0.141" in qae  # two seeds keep their spread
    summary = json.loads((tmp_path / "r" / "summary.json").read_text())
    cells = {c["name"]: c["cells"] for c in summary["configs"]}
    assert cells["mean"]["val/pass@1"]["std"] is None
    assert cells["qae"]["val/pass@1"]["std"] == pytest.approx(math.sqrt(0.02))
    assert cells["mean"]["val/pass@1"]["per_seed_step"] == [0]
    assert "0.250 \u00b1 0.000" not in result.html.read_text()


def test_html_headings_are_the_figure_titles(synthetic: Path, tmp_path: Path) -> None:
    result = build_report([synthetic], tmp_path / "r", target=0.6, window=1, tail=2)
    headings = dict(re.findall(r'<h3 id="([^"]+)">([^<]*)</h3>', result.html.read_text()))
    assert set(headings) == set(result.figures)
    assert headings["val_passk"] == "Held-out pass@2"
    assert headings["entropy"] == "Policy entropy on training rollouts"
    assert not set(headings.values()) & set(headings)  # no heading is a file stem
