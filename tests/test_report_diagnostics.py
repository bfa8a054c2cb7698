"""Entropy-diagnostics panels of qae report, and the ablation / clip-high compare grids."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qae.report import build_report, diagnostics_summary, group_runs, load_run, run_tracking
from qae.report.compare import GRIDS, build_config, dedup_grid, expand_grid, load_grid
from qae.report.diagnostics import choose_steps, load_histograms, tracking_pairs

N = 40


def diag_rows(x: np.ndarray, *, sign: float = 1.0, gap: int | None = None) -> list[dict]:
    """Steps 1..N. ``cov_total(t) = -2 x(t)`` so the prediction made at step t is
    ``-cov = 2 x(t)``; the measured change at step t is ``sign * x(t-1)``: the prediction
    of the previous step times ``sign / 2``. Step ``gap`` logs nothing (a skipped step):
    the change measured after it pairs with the prediction of the step before it."""
    rows = []
    prev = None
    for t in range(1, N + 1):
        if t == gap:
            continue
        row = {
            "step": t,
            "actor/entropy": 1.0,
            "rollout/accuracy_all": 0.5,
            "response/len_mean": 3.0,
            "entropy/cov_total": -2.0 * x[t - 1],
            # the sign parts sum to the total: pos 0.3, zero 0.0, neg the rest
            "entropy/cov_pos": 0.3,
            "entropy/cov_neg": -2.0 * x[t - 1] - 0.3,
            "entropy/cov_zero": 0.0,
            "entropy/cov_hard": 0.1,
            "entropy/cov_easy": -2.0 * x[t - 1] - 0.1,
            "entropy/cov_other": 0.0,
            "response/len_volatility": 0.05 * t,
        }
        if prev is not None:
            row["entropy/measured_change"] = sign * x[prev - 1]
        if t % 10 == 0:
            row.update({
                "tokens/entropy_all": 0.5,
                "tokens/entropy_nonzero_adv": 0.9,
                "tokens/grad_share_top_entropy": 0.6,
            })  # fmt: skip
        rows.append(row)
        prev = t
    return rows


def write_run(path: Path, rows: list[dict], *, seed: int = 0, hist: bool = True) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (path / "config.yaml").write_text(
        f"algo:\n  estimator: qae\ntrainer:\n  steps: {N}\n  seed: {seed}\n"
    )
    if hist:
        (path / "entropy_hist").mkdir(exist_ok=True)
        for s in range(10, N + 1, 10):
            edges = np.linspace(0.0, 2.0, 5).tolist()
            counts = [s, 10.0, 5.0, 1.0]
            (path / "entropy_hist" / f"step_{s:06d}.json").write_text(
                json.dumps({"edges": edges, "counts": counts})
            )
    return path


def xs(seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=N)


def test_tracking_known_answers(tmp_path: Path) -> None:
    x = xs()
    run = load_run(write_run(tmp_path / "agree", diag_rows(x)))
    steps, pred, meas = tracking_pairs(run)
    # step 1 has no measured change; steps 2..N pair with the prediction of step t-1
    assert steps.tolist() == list(range(2, N + 1))
    assert np.allclose(pred, 2.0 * x[:-1]) and np.allclose(meas, x[:-1])
    t = run_tracking(run)
    assert t["corr"] == pytest.approx(1.0) and t["sign_agreement"] == 1.0 and t["n"] == N - 1

    flipped = load_run(write_run(tmp_path / "flip", diag_rows(x, sign=-1.0)))
    t = run_tracking(flipped)
    assert t["corr"] == pytest.approx(-1.0) and t["sign_agreement"] == 0.0


def test_tracking_pairs_across_a_skipped_step(tmp_path: Path) -> None:
    x = xs(1)
    run = load_run(write_run(tmp_path / "gap", diag_rows(x, gap=7)))
    steps, pred, meas = tracking_pairs(run)
    assert 7 not in steps.tolist() and 8 in steps.tolist()
    i = steps.tolist().index(8)
    # step 8's change was measured against step 6 and pairs with step 6's prediction
    assert pred[i] == pytest.approx(2.0 * x[5]) and meas[i] == pytest.approx(x[5])
    assert run_tracking(run)["corr"] == pytest.approx(1.0)


def test_tracking_absent_or_too_short(tmp_path: Path) -> None:
    rows = [{"step": t, "actor/entropy": 1.0} for t in range(1, 5)]
    assert run_tracking(load_run(write_run(tmp_path / "none", rows, hist=False))) is None
    short = diag_rows(xs())[:3]  # two measured changes: fewer than 3 pairs
    assert run_tracking(load_run(write_run(tmp_path / "short", short, hist=False))) is None


def test_choose_steps_examples() -> None:
    steps = list(range(10, 301, 10))  # 30 steps
    # linspace(0, 29, 4) = 0, 9.67, 19.33, 29 -> indices 0, 10, 19, 29
    assert choose_steps(steps, 4) == [10, 110, 200, 300]
    assert choose_steps([30, 10, 20], 5) == [10, 20, 30]
    assert choose_steps(steps, 1) == [300]
    with pytest.raises(ValueError, match="n must be"):
        choose_steps(steps, 0)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(0, 10_000), min_size=1, max_size=60), st.integers(1, 8))
def test_choose_steps_properties(steps: list[int], n: int) -> None:
    got = choose_steps(steps, n)
    uniq = sorted(set(steps))
    assert got == sorted(set(got)) and set(got) <= set(uniq)
    if n >= 2 or len(uniq) == 1:
        assert got[0] == uniq[0]
    assert got[-1] == uniq[-1]
    # distinct rounded indices of an evenly spaced grid: exactly min(n, #steps) of them
    assert len(got) == min(n, len(uniq))


def test_load_histograms_skips_bad_files(tmp_path: Path) -> None:
    run = write_run(tmp_path / "r", diag_rows(xs()))
    (run / "entropy_hist" / "step_000050.json").write_text("{not json")
    (run / "entropy_hist" / "step_000060.json").write_text('{"edges": [0, 1], "counts": [1, 2]}')
    h = load_histograms(run)
    assert sorted(h) == [10, 20, 30, 40]
    edges, counts = h[20]
    assert edges.tolist() == [0.0, 0.5, 1.0, 1.5, 2.0] and counts.tolist() == [20, 10, 5, 1]
    assert load_histograms(tmp_path / "missing") == {}


def test_summary_tail_means_and_seeds(tmp_path: Path) -> None:
    a = load_run(write_run(tmp_path / "cfg" / "seed0", diag_rows(xs()), seed=0))
    b = load_run(write_run(tmp_path / "cfg" / "seed1", diag_rows(xs(), sign=-1.0), seed=1))
    summary = diagnostics_summary(group_runs([a, b]), tail=10)
    entry = summary["cfg"]
    per_seed = entry["tracking"]["per_seed"]
    assert [p["seed"] for p in per_seed] == [0, 1]
    assert per_seed[0]["corr"] == pytest.approx(1.0) and per_seed[1]["corr"] == pytest.approx(-1)
    assert entry["tracking"]["corr"] == pytest.approx(0.0, abs=1e-9)  # mean of +1 and -1
    assert entry["tracking"]["sign_agreement"] == pytest.approx(0.5)
    assert entry["tracking"]["n"] == 2 * (N - 1)
    tail = entry["tail"]
    assert tail["entropy/cov_pos"]["mean"] == pytest.approx(0.3)
    # volatility 0.05 t over the last 10 steps t = 31..40: mean 0.05 * 35.5
    assert tail["response/len_volatility"]["mean"] == pytest.approx(0.05 * 35.5)
    # the token views were logged at steps 10..40: the tail is those 4 points
    assert tail["tokens/entropy_nonzero_adv"]["per_seed"] == [pytest.approx(0.9)] * 2
    # the sign parts sum to the total in every seed
    parts = sum(tail[f"entropy/cov_{p}"]["mean"] for p in ("pos", "neg", "zero"))
    assert parts == pytest.approx(tail["entropy/cov_total"]["mean"])


def test_build_report_adds_diagnostics(tmp_path: Path) -> None:
    write_run(tmp_path / "runs" / "qae", diag_rows(xs()))
    out = tmp_path / "rep"
    result = build_report([tmp_path / "runs" / "qae"], out)
    stems = ["diag_attribution_sign", "diag_attribution_regime", "diag_tracking",
             "diag_tokens", "diag_entropy_hist", "diag_len_volatility"]  # fmt: skip
    for stem in stems:
        png = out / f"{stem}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert png.stat().st_size < 300_000
        assert result.figures[stem] == png
    summary = json.loads((out / "summary.json").read_text())
    diag = summary["diagnostics"]
    assert list(diag["figures"]) == stems
    entry = diag["configs"]["qae"]
    assert entry["tracking"]["corr"] == pytest.approx(1.0)
    assert entry["entropy_hist"] == {"seed": 0, "steps": [10, 20, 30, 40]}
    page = (out / "report.html").read_text()
    assert "<h2>Entropy diagnostics</h2>" in page
    for stem in stems:
        assert f'<h3 id="{stem}">' in page
    assert '<h3 id="diag_tracking">Predicted vs measured entropy change' in page
    # the diagnostics come after the main figures, which are unchanged
    assert page.index('id="entropy"') < page.index("Entropy diagnostics")
    assert "diag_tracking" not in summary["figures"]


def test_build_report_skips_absent_diagnostics(tmp_path: Path) -> None:
    rows = [{"step": t, "actor/entropy": 1.0 - 0.01 * t, "rollout/accuracy_all": 0.5}
            for t in range(1, 11)]  # fmt: skip
    write_run(tmp_path / "plain", rows, hist=False)
    out = tmp_path / "rep"
    result = build_report([tmp_path / "plain"], out)
    assert not any(s.startswith("diag_") for s in result.figures)
    assert not list(out.glob("diag_*.png"))
    summary = json.loads((out / "summary.json").read_text())
    assert summary["diagnostics"] == {"configs": {}, "figures": {}}
    assert "Entropy diagnostics" not in (out / "report.html").read_text()


def test_nan_tracking_is_null_in_summary(tmp_path: Path) -> None:
    rows = diag_rows(np.ones(N))  # constant prediction: the correlation is undefined
    write_run(tmp_path / "flat", rows, hist=False)
    out = tmp_path / "rep"
    build_report([tmp_path / "flat"], out)
    entry = json.loads((out / "summary.json").read_text())["diagnostics"]["configs"]["flat"]
    assert entry["tracking"]["corr"] is None
    assert entry["tracking"]["sign_agreement"] == 1.0  # both always positive
    assert not math.isnan(entry["tail"]["entropy/cov_total"]["mean"])


def test_ablation_grid_expands(tmp_path: Path) -> None:
    grid = load_grid("ablation")
    names = [n for n, _ in dedup_grid(grid)]
    assert names == ["dapo-mean", "qae-k0.4", "mean-pos-only", "mean-neg-only",
                     "mean-gated-k0.4"]  # fmt: skip
    specs = expand_grid(grid, [0], steps=5, out=tmp_path)
    cfgs = {s.name: build_config(s) for s in specs}
    assert {n: (c.algo.estimator, c.algo.keep) for n, c in cfgs.items()} == {
        "dapo-mean": ("grpo", "all"),
        "qae-k0.4": ("qae", "all"),
        "mean-pos-only": ("grpo", "pos"),
        "mean-neg-only": ("grpo", "neg"),
        "mean-gated-k0.4": ("grpo", "gate"),
    }
    gated = cfgs["mean-gated-k0.4"].kcontrol
    assert (gated.kind, gated.k) == ("constant", 0.4)
    assert all(c.trainer.steps == 5 for c in cfgs.values())


def test_clip_high_grid_expands_off_policy(tmp_path: Path) -> None:
    grid = load_grid("clip-high")
    assert [n for n, _ in dedup_grid(grid)] == [
        "qae-k0.4-clip0.2", "dapo-mean-clip0.2",
        "qae-k0.4-clip0.28", "dapo-mean-clip0.28",
        "qae-k0.4-clip0.35", "dapo-mean-clip0.35",
    ]  # fmt: skip
    specs = expand_grid(grid, [0, 1], steps=5, out=tmp_path)
    assert len(specs) == 12
    cfgs = {s.name: build_config(s) for s in specs}
    assert sorted({c.loss.clip_high for c in cfgs.values()}) == [0.2, 0.28, 0.35]
    # one on-policy update per step would keep the ratio at 1 and the clip idle
    assert all(c.trainer.mini_batches == 4 for c in cfgs.values())
    for name, c in cfgs.items():
        if name.startswith("qae"):
            assert c.algo.estimator == "qae" and c.kcontrol.k == 0.4
        else:
            assert c.algo.estimator == "grpo"
    assert {"ablation", "clip-high"} <= set(GRIDS)
