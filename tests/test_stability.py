"""The learning-rate stability map: verdicts per run, cells per (estimator, lr), the table,
the figures, ``qae report --stability`` and the ``stability`` grid preset."""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import numpy as np
import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from qae.io.runlog import read_metrics
from qae.report import add_report_parser
from qae.report.compare import (
    GRIDS,
    STABILITY_LRS,
    build_config,
    dedup_grid,
    expand_grid,
    run_compare,
)
from qae.report.runs import RunData, load_run
from qae.report.stability import (
    RunStability,
    build_stability,
    collapse_table,
    estimator_label,
    peak_table,
    run_stability,
    significance_table,
    stability_map,
    stability_table,
    stable_lr_limit,
)
from qae.report.stats import fisher_exact

# Entropy shapes (30 training steps, 1..30) whose verdicts are known by construction:
# the first value is 1.0, so thresholds are 0.5 (collapse) and 2.0 (explosion), window 10.
STEPS = list(range(1, 31))
SHAPES = {
    "stable": [1.0] * 30,
    # 0.3 from step 11 on: 20 steps below 0.5 -> collapsed, window starts at step 11.
    "collapsed": [1.0] * 10 + [0.3] * 20,
    # 2.5 from step 6 on -> exploded at step 6.
    "exploded": [1.0] * 5 + [2.5] * 25,
    # 9 steps below 0.5, then back: one step short of the window -> stable.
    "dip": [1.0] * 10 + [0.4] * 9 + [1.0] * 11,
}
VERDICT = {"stable": "stable", "collapsed": "collapsed", "exploded": "exploded", "dip": "stable"}


def _config(estimator: str, lr: float, kind: str = "constant", k: float = 0.4) -> dict:
    return {
        "algo": {"estimator": estimator},
        "kcontrol": {"kind": kind, "k": k},
        "optim": {"lr": lr},
        "trainer": {"steps": 30},
    }


def _write_run(
    run_dir: Path, config: dict, shape: str, pass1: tuple[float, float, float, float]
) -> None:
    """Validation at steps 0, 10, 20, 30 with the given pass@1; entropy at steps 1..30."""
    run_dir.mkdir(parents=True)
    (run_dir / "config.yaml").write_text(yaml.safe_dump(config))
    rows = []
    for step in range(31):
        row: dict = {"step": step}
        if step >= 1:
            row["actor/entropy"] = SHAPES[shape][step - 1]
        if step % 10 == 0:
            row["val/pass@1"] = pass1[step // 10]
        rows.append(row)
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def _run(shape: str, config: dict, pass1=(0.4, 0.5, 0.45, 0.42), name="x", seed=0) -> RunData:
    series = {
        "actor/entropy": (np.array(STEPS), np.array(SHAPES[shape])),
        "val/pass@1": (np.array([0, 10, 20, 30]), np.array(pass1, dtype=float)),
    }
    return RunData(name, seed, Path(name), series, 30, "jsonl", config)


@pytest.mark.parametrize("shape", list(SHAPES))
def test_run_verdict_step_and_peak(shape: str) -> None:
    rec = run_stability(_run(shape, _config("grpo", 1e-3)))
    assert rec.verdict == VERDICT[shape]
    # The verdict's index is into the logged entropy (steps 1..30), reported as a step.
    assert rec.verdict_step == {"collapsed": 11, "exploded": 6}.get(shape, -1)
    assert (rec.final_pass1, rec.best_pass1, rec.best_step) == (0.42, 0.5, 10)
    assert (rec.estimator, rec.lr) == ("dapo-mean", 1e-3)


def test_best_step_is_the_first_maximum_and_nan_entropy_is_dropped() -> None:
    run = _run("stable", _config("qae", 1e-4), pass1=(0.3, 0.6, 0.6, 0.2))
    steps, ent = run.series["actor/entropy"]
    ent = ent.copy()
    ent[0] = math.nan  # a NaN first value must not become the reference entropy
    ent[1:] = 1.0
    ent[15:] = 0.4  # 15 steps below 0.5 x 1.0 -> collapsed at step 16
    run.series["actor/entropy"] = (steps, ent)
    rec = run_stability(run)
    assert (rec.best_pass1, rec.best_step, rec.final_pass1) == (0.6, 10, 0.2)
    assert (rec.verdict, rec.verdict_step) == ("collapsed", 16)


def test_estimator_labels() -> None:
    assert estimator_label(_config("grpo", 1e-3)) == "dapo-mean"
    assert estimator_label(_config("qae", 1e-3, k=0.6)) == "qae-k0.6"
    assert estimator_label(_config("qae", 1e-3, kind="entropy_band")) == "qae-adaptive"
    assert estimator_label(_config("qae", 1e-3, kind="sparsity")) == "qae-sparsity"
    assert estimator_label({}, "qae-k0.4_lr0.003") == "qae-k0.4"
    with pytest.raises(ValueError, match="config.yaml or a name"):
        estimator_label({})


def test_map_numbers_are_exact(tmp_path: Path) -> None:
    """Two estimators x two lrs x 4 seeds written to disk, verdicts known per seed."""
    plan = {
        # (estimator config, lr): [(shape, final pass@1) per seed 0..3]
        ("grpo", 1e-4): [("stable", 0.4), ("dip", 0.5), ("stable", 0.6), ("stable", 0.3)],
        ("grpo", 1e-2): [("collapsed", 0.1), ("exploded", 0.0), ("stable", 0.5),
                         ("collapsed", 0.2)],
        ("qae", 1e-4): [("stable", 0.5)] * 4,
        ("qae", 1e-2): [("stable", 0.4), ("stable", 0.2), ("collapsed", 0.0), ("stable", 0.6)],
    }  # fmt: skip
    for (est, lr), seeds in plan.items():
        for seed, (shape, final) in enumerate(seeds):
            name = f"{'dapo-mean' if est == 'grpo' else 'qae-k0.4'}_lr{lr:g}"
            _write_run(tmp_path / name / f"seed{seed}", _config(est, lr), shape,
                       (0.4, 0.55, 0.5, final))  # fmt: skip
    result = build_stability([tmp_path], tmp_path / "out")
    cells = {(c.estimator, c.lr): c for c in result.cells}
    assert [(c.estimator, c.lr) for c in result.cells] == [
        ("dapo-mean", 1e-4), ("dapo-mean", 1e-2), ("qae-k0.4", 1e-4), ("qae-k0.4", 1e-2)
    ]  # fmt: skip
    c = cells[("dapo-mean", 1e-2)]
    assert (c.n, c.n_stable, c.n_collapsed, c.n_exploded) == (4, 1, 2, 1)
    assert c.frac_stable == 0.25
    # finals 0.1, 0.0, 0.5, 0.2: mean 0.2, sample var = (0.01+0.04+0.09+0)/3 = 0.14/3
    assert c.final_mean == pytest.approx(0.2)
    assert c.final_std == pytest.approx(math.sqrt(0.14 / 3))
    # best per seed: max(0.55, final) = 0.55 everywhere except none -> 0.55 at step 10
    assert c.best_mean == pytest.approx(0.55) and c.best_step_mean == 10
    q = cells[("qae-k0.4", 1e-2)]
    assert (q.n_stable, q.n_collapsed, q.frac_stable) == (3, 1, 0.75)
    assert q.final_mean == pytest.approx(0.3)  # (0.4+0.2+0+0.6)/4
    assert cells[("dapo-mean", 1e-4)].frac_stable == 1.0  # the 9-step dip is not a collapse
    assert cells[("qae-k0.4", 1e-4)].final_std == 0.0
    # Stable range: both fully stable at 1e-4 only.
    assert stable_lr_limit(result.cells, "dapo-mean") == 1e-4
    assert stable_lr_limit(result.cells, "qae-k0.4") == 1e-4
    table = result.table.splitlines()
    assert table[0] == (
        "| estimator | lr 0.0001 | lr 0.01 | stable up to (entropy) "
        "| stable up to (entropy and reward) |"
    )
    assert table[2] == (
        "| dapo-mean | 4/4 stable \u00b7 0.450 \u00b1 0.129 | "
        "1/4 stable (2 collapsed, 1 exploded) \u00b7 0.200 \u00b1 0.216 | 0.0001 | 0.0001 |"
    )  # no training accuracy logged: no reward verdict, "both" is the entropy limit
    collapses = collapse_table(result.cells).splitlines()
    # dapo-mean at 1e-2, seeds 0..3: collapsed at 11, exploded at 6, stable, collapsed at 11
    assert collapses[2] == "| dapo-mean | -, -, -, - | 11, 6, -, 11 |"
    assert collapse_table(result.cells) in result.table
    # Fisher's exact test against the mean baseline at each lr: at 1e-2 QAE kept 3/4 stable,
    # the mean 1/4: hypergeometric tables with 4 stable of 8 -> p = 0.486 (two-sided).
    sig = significance_table(result.cells).splitlines()
    assert sig[2] == "| 0.0001 | qae-k0.4 | 4/4 vs 4/4 | 1.000 | 4/4 vs 4/4 | 1.000 |"
    assert sig[3] == "| 0.01 | qae-k0.4 | 3/4 vs 1/4 | 0.486 | 3/4 vs 1/4 | 0.486 |"
    assert significance_table(result.cells) in result.table
    peaks = peak_table(result.cells).splitlines()
    assert peaks[0] == "| estimator | lr 0.0001 | lr 0.01 |"
    # dapo-mean at 1e-4: bests max(0.55, final) = 0.55, 0.55, 0.6 (step 30), 0.55
    assert peaks[2].startswith("| dapo-mean | 0.562 \u00b1 0.025 \u00b7 peak at step 15 |")
    assert (tmp_path / "out" / "stability.md").read_text() == (result.table) and peak_table(
        result.cells
    ) in result.table
    data = json.loads((tmp_path / "out" / "stability.json").read_text())
    assert data["stable_lr_limit"]["entropy"] == {"dapo-mean": 1e-4, "qae-k0.4": 1e-4}
    assert data["stable_lr_limit"]["both"] == {"dapo-mean": 1e-4, "qae-k0.4": 1e-4}
    assert len(data["runs"]) == 16
    for key in ("map", "entropy"):
        path = result.files[key]
        assert path.stat().st_size > 10_000 and path.read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize(
    ("counts", "p"),
    [
        # Hand-computed: 4/4 vs 0/4, 4 successes of 8: only the observed table and its
        # mirror have probability 1/C(8,4) = 1/70 each -> p = 2/70.
        ((4, 4, 0, 4), 2 / 70),
        # 3/4 vs 0/4, 3 of 8: P(x=3) = C(4,3)C(4,0)/C(8,3) = 4/56, mirror x=0 the same.
        ((3, 4, 0, 4), 8 / 56),
        ((2, 4, 2, 4), 1.0),
        ((0, 4, 0, 4), 1.0),
        # 1/9 vs 11/14 (a textbook table; its two-sided p is 0.00276).
        ((1, 9, 11, 14), 0.0027594561852200836),
    ],
)
def test_fisher_exact(counts: tuple[int, int, int, int], p: float) -> None:
    assert fisher_exact(*counts) == pytest.approx(p, rel=1e-9)
    a, n_a, b, n_b = counts
    assert fisher_exact(b, n_b, a, n_a) == pytest.approx(p, rel=1e-9)  # symmetric
    with pytest.raises(ValueError, match="0 <= a <= n_a"):
        fisher_exact(5, 4, 0, 4)


def test_stable_lr_limit_needs_every_smaller_lr_stable() -> None:
    def rec(lr: float, verdict: str) -> RunStability:
        return RunStability("n", 0, "e", lr, verdict, -1, "held", -1, 0.1, 0.1, 0, 30)

    # Stable at 1e-4, a seed lost at 1e-3, stable again at 3e-3: the limit stays 1e-4.
    cells = stability_map([rec(1e-4, "stable"), rec(1e-3, "collapsed"), rec(3e-3, "stable")])
    assert stable_lr_limit(cells, "e") == 1e-4
    assert stable_lr_limit(stability_map([rec(1e-4, "exploded")]), "e") is None
    assert "| none |" in stability_table(stability_map([rec(1e-4, "exploded")]))
    with pytest.raises(ValueError, match="by must be entropy, reward or both, got by='x'"):
        stable_lr_limit(cells, "e", by="x")


def test_limits_by_reward_and_by_both() -> None:
    def rec(lr: float, verdict: str, reward: str, seed: int = 0) -> RunStability:
        return RunStability("n", seed, "e", lr, verdict, -1, reward, -1, 0.1, 0.1, 0, 30)

    records = [
        rec(1e-4, "stable", "held"),
        rec(1e-4, "stable", "held", seed=1),
        rec(1e-3, "stable", "held"),
        rec(1e-3, "stable", "collapsed", seed=1),  # reward lost in one seed of two
        rec(3e-3, "collapsed", "collapsed"),
    ]
    cells = stability_map(records)
    assert [(c.n_reward_held, c.n_reward_judged) for c in cells] == [(2, 2), (1, 2), (0, 1)]
    assert stable_lr_limit(cells, "e", "entropy") == 1e-3
    assert stable_lr_limit(cells, "e", "reward") == 1e-4
    assert stable_lr_limit(cells, "e", "both") == 1e-4
    row = stability_table(cells).splitlines()[2]
    assert row == (
        "| e | 2/2 stable \u00b7 reward 2/2 held \u00b7 0.100 \u00b1 0.000 "
        "| 2/2 stable \u00b7 reward 1/2 held \u00b7 0.100 \u00b1 0.000 "
        "| 0/1 stable (1 collapsed) \u00b7 reward 0/1 held \u00b7 0.100 \u00b1 0.000 "
        "| 0.001 | 0.0001 |"
    )


def test_sampling_entropy_is_preferred_and_reward_is_judged() -> None:
    """``rollout/entropy`` (every step) wins over ``actor/entropy`` (update steps only)."""
    run = _run("stable", _config("grpo", 1e-3))  # actor/entropy: stable
    run.series["rollout/entropy"] = (np.array(STEPS), np.array(SHAPES["collapsed"]))
    acc = [0.4] * 5 + [0.1] * 25  # the 10-step mean is first below 0.2 from step 3 on
    run.series["rollout/accuracy_all"] = (np.array(STEPS), np.array(acc))
    rec = run_stability(run)
    assert (rec.entropy_key, rec.verdict, rec.verdict_step) == ("rollout/entropy", "collapsed", 11)
    assert (rec.reward, rec.reward_step) == ("collapsed", 3)
    del run.series["rollout/entropy"]
    run.series["rollout/accuracy_all"] = (np.array(STEPS), np.array([0.4] * 30))
    rec = run_stability(run)
    assert (rec.entropy_key, rec.verdict, rec.reward) == ("actor/entropy", "stable", "held")
    run.series["rollout/accuracy_all"] = (np.array(STEPS), np.array([0.0] * 30))
    assert run_stability(run).reward == "-"  # no reward to lose


@settings(max_examples=40, deadline=None)
@given(
    st.lists(
        st.tuples(st.sampled_from(["stable", "collapsed", "exploded"]), st.floats(0, 1)),
        min_size=1,
        max_size=8,
    )
)
def test_cell_counts_and_mean_match_the_seeds(seeds: list[tuple[str, float]]) -> None:
    records = [
        RunStability("n", i, "dapo-mean", 1e-3, v, -1, "-", -1, f, f, 0, 30)
        for i, (v, f) in enumerate(seeds)
    ]
    (cell,) = stability_map(records)
    verdicts = [v for v, _ in seeds]
    assert cell.n_stable + cell.n_collapsed + cell.n_exploded == len(seeds)
    assert cell.frac_stable == verdicts.count("stable") / len(seeds)
    assert cell.final_mean == pytest.approx(float(np.mean([f for _, f in seeds])))
    assert cell.seeds == list(range(len(seeds)))


def test_report_stability_flag(tmp_path: Path) -> None:
    _write_run(tmp_path / "runs" / "dapo-mean_lr0.001" / "seed0", _config("grpo", 1e-3),
               "collapsed", (0.4, 0.5, 0.3, 0.2))  # fmt: skip
    parser = argparse.ArgumentParser()
    add_report_parser(parser.add_subparsers())
    out = tmp_path / "rep"
    args = parser.parse_args(["report", str(tmp_path / "runs"), "--out", str(out), "--stability"])
    assert args.func(args) == 0
    assert "0/1 stable (1 collapsed)" in (out / "stability.md").read_text()
    assert (out / "stability_map.png").is_file() and (out / "report.html").is_file()


def test_stability_grid_preset(tmp_path: Path) -> None:
    grid = dedup_grid(GRIDS["stability"])
    assert len(grid) == 4 * len(STABILITY_LRS)  # nothing collapses under deduplication
    specs = expand_grid(grid, [0], steps=2, out=tmp_path)
    seen = set()
    for spec in specs:
        cfg = build_config(spec)
        run = RunData(spec.name, 0, tmp_path, {}, 2, "jsonl",
                      {"algo": {"estimator": cfg.algo.estimator},
                       "kcontrol": {"kind": cfg.kcontrol.kind, "k": cfg.kcontrol.k}})  # fmt: skip
        label = estimator_label(run.config)
        assert spec.name == f"{label}_lr{cfg.optim.lr:g}"  # the name says what the config is
        seen.add((label, cfg.optim.lr))
    labels = {"dapo-mean", "qae-k0.4", "qae-k0.6", "qae-adaptive"}
    assert seen == {(e, lr) for e in labels for lr in STABILITY_LRS}


@pytest.mark.slow
def test_stability_grid_runs_on_a_tiny_budget(tmp_path: Path) -> None:
    """Every cell of the preset trains 2 steps at 1 seed and lands on the map."""
    tiny = {
        "rollout.prompts_per_step": 4,
        "rollout.group_size": 4,
        "eval.n": 2,
        "eval.ks": [1, 2],
        "data.val_size": 8,
        "log.tensorboard": False,
    }
    out = tmp_path / "cmp"
    # the stability grid's learning rates are the arithmetic task's
    specs = expand_grid(GRIDS["stability"], [0], steps=2, out=out, extra=tiny, base="arithmetic")
    result = run_compare(specs, out, parallel=2, poll=0.2)
    assert result.failed == []
    for spec in specs:
        assert [r["step"] for r in read_metrics(Path(spec.run_dir) / "metrics.jsonl")] == [0, 1, 2]
    assert load_run(specs[0].run_dir) is not None
    stab = build_stability([out], tmp_path / "rep")
    assert len(stab.records) == len(specs)
    assert {(c.estimator, c.lr) for c in stab.cells} == {
        (e, lr)
        for e in ("dapo-mean", "qae-k0.4", "qae-k0.6", "qae-adaptive")
        for lr in STABILITY_LRS
    }
    assert all(c.n == 1 for c in stab.cells)
