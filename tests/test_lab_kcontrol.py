"""Tests for K controllers driving entropy-lab trajectories (qae.lab.dynamics, kcontrol_sweep)."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from qae.kcontrol import DifficultyK, KControlConfig, make_controller
from qae.lab.dynamics import group_k_step, run_trajectory
from qae.lab.groups import LabEstimator
from qae.lab.kcontrol_sweep import (
    SweepArm,
    band_limits,
    default_arms,
    in_band_stats,
    kcontrol_sweep,
    plot_kcontrol_sweep,
    sweep_table,
)
from qae.lab.policy import make_problem, make_prompt

QAE = LabEstimator("qae", 0.4)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def small_problem(p_count: int = 24, seed: int = 0, mix: str = "0.1:0.4,0.4:0.3,0.8:0.3"):
    return make_problem(p_count, 8, seed=seed, mix=mix)


def traj(prob, controller=None, estimator=QAE, **kw):
    args = {"steps": 6, "lr": 0.5, "group_size": 8, "update": "logit", "mode": "expected"}
    args.update(kw)
    return run_trajectory(
        prob.logits, prob.rewards, estimator=estimator, controller=controller, **args
    )


# --------------------------------------------------------------------------------------
# Controllers inside run_trajectory


@pytest.mark.parametrize("mode", ["expected", "sampled"])
def test_constant_and_default_difficulty_controllers_reproduce_fixed_k(mode):
    prob = small_problem()
    fixed = traj(prob, estimator=LabEstimator("qae", 0.6), mode=mode, seed=3)
    const = traj(prob, make_controller(KControlConfig(k=0.6)), mode=mode, seed=3)
    # difficulty with every bucket at 0.4 is constant K = 0.4, through the per-group path.
    fixed04 = traj(prob, mode=mode, seed=3)
    diff = traj(prob, make_controller(KControlConfig(kind="difficulty")), mode=mode, seed=3)
    for key in fixed:
        assert const[key] == pytest.approx(fixed[key], abs=1e-12), key
        assert diff[key] == pytest.approx(fixed04[key], abs=1e-12), key
    assert const["k"] == [0.6] * 6 and diff["k"] == pytest.approx([0.4] * 6, abs=1e-12)
    assert "k" not in fixed


def test_schedule_controller_changes_k_on_its_steps():
    prob = small_problem()
    ctrl = make_controller(KControlConfig(kind="two_phase", k_start=0.7, k_end=0.3, steps=3))
    out = traj(prob, ctrl)
    assert out["k"] == [0.7, 0.7, 0.7, 0.3, 0.3, 0.3]
    # Steps 0..2 equal a fixed K=0.7 run; step 3 on differs from it.
    fixed = traj(prob, estimator=LabEstimator("qae", 0.7))
    assert out["entropy"][:4] == pytest.approx(fixed["entropy"][:4], abs=1e-12)
    assert abs(out["entropy"][5] - fixed["entropy"][5]) > 1e-6


def test_entropy_band_controller_reads_the_lab_entropy_and_raises_k_on_collapse():
    # Mostly hard prompts under the logit model: entropy falls fast at K = 0.4.
    prob = small_problem(mix="0.1:1")
    ctrl = make_controller(KControlConfig(kind="entropy_band"))
    out = traj(prob, ctrl, steps=40)
    m = ctrl.metrics()
    # The reference is the entropy before step 0, the band [0.75, 1.25] x that.
    assert m["k_reference"] == pytest.approx(out["entropy"][0], abs=1e-12)
    assert m["k_band_low"] == pytest.approx(0.75 * out["entropy"][0])
    low = m["k_band_low"]
    # K holds at 0.4 while the entropy is in band, then rises (never falls: it stays below).
    first_out = next(i for i, h in enumerate(out["entropy"]) if h < low)
    assert out["k"][: first_out + 1] == pytest.approx([0.4] * (first_out + 1))
    assert all(b >= a - 1e-12 for a, b in zip(out["k"], out["k"][1:], strict=False))
    assert out["k"][-1] > 0.4 and max(out["k"]) <= 0.8
    # Higher K keeps more entropy than fixed K = 0.4 (the logit model's monotonicity).
    fixed = traj(prob, steps=40)
    assert out["entropy"][-1] > fixed["entropy"][-1]


def test_sparsity_controller_gets_the_nonzero_fraction():
    prob = small_problem()
    ctrl = make_controller(KControlConfig(kind="sparsity"))
    out = traj(prob, ctrl, steps=3)
    # The last update saw the non-zero fraction of step 2 (1 - its zero fraction).
    assert ctrl.metrics()["k_signal"] == pytest.approx(1 - out["zero_adv_frac"][2], abs=1e-12)


def test_controller_needs_an_estimator_with_k():
    prob = small_problem()
    with pytest.raises(ValueError, match="grpo"):
        traj(prob, make_controller(KControlConfig()), estimator=LabEstimator("grpo"))


def test_sampled_controlled_trajectory_is_seeded():
    prob = small_problem(p_count=12)

    def run(seed):
        ctrl = make_controller(KControlConfig(kind="entropy_band"))
        return traj(prob, ctrl, mode="sampled", seed=seed, steps=8)

    a, b, c = run(1), run(1), run(2)
    assert a == b and a["entropy"] != c["entropy"]


# --------------------------------------------------------------------------------------
# Per-group K (difficulty)


def _binom(g, c, p):
    return math.comb(g, c) * p**c * (1 - p) ** (g - c)


def test_difficulty_regimes_match_the_binomial_closed_form():
    # Buckets: p < 0.5 -> K = 0.2 (hard iff p <= 0.8: hard), p >= 0.5 -> K = 0.8 (hard iff
    # p <= 0.2: easy). With G = 8: hard for c in 1..3, easy for c in 4..7.
    g = 8
    z, r = make_prompt(0.45, 10, seed=0)
    p = float((torch.softmax(z, 1) * r).sum())
    ctrl = DifficultyK([0.25, 0.5, 0.75], [0.2, 0.2, 0.8, 0.8])
    out = group_k_step(z, r, ctrl, estimator=QAE, group_size=g, lr=0.1, update="logit")
    hard = sum(_binom(g, c, p) for c in range(1, 4))
    easy = sum(_binom(g, c, p) for c in range(4, g))
    assert float(out["hard"][0]) == pytest.approx(hard, abs=1e-12)
    assert float(out["easy"][0]) == pytest.approx(easy, abs=1e-12)
    assert float(out["degenerate"][0]) == pytest.approx(p**g + (1 - p) ** g, abs=1e-12)
    # Expected K of a group: 0.2 for c < 4, 0.8 for c >= 4.
    k = sum(_binom(g, c, p) * (0.2 if c < 4 else 0.8) for c in range(g + 1))
    assert float(out["k"][0]) == pytest.approx(k, abs=1e-12)
    # The probe left the controller's own bucket counts untouched.
    assert ctrl.metrics()["k_bucket0_groups"] == 0


@pytest.mark.parametrize("update", ["logit", "pg"])
def test_expected_group_k_step_is_the_mean_of_sampled_steps(update):
    # One prompt copied R times: the mean of R independent sampled steps estimates the
    # expected step; it must lie within 5 standard errors of it on every candidate.
    reps, g = 6000, 4
    z, r = make_prompt(0.4, 5, seed=1)
    ctrl = DifficultyK([0.5], [0.3, 0.7])
    exp = group_k_step(z, r, ctrl, estimator=QAE, group_size=g, lr=1.0, update=update)
    gen = torch.Generator().manual_seed(0)
    zs, rs = z.expand(reps, -1).clone(), r.expand(reps, -1).clone()
    smp = group_k_step(
        zs, rs, ctrl, estimator=QAE, group_size=g, lr=1.0, update=update, mode="sampled",
        generator=gen,
    )  # fmt: skip
    mean, se = smp["dz"].mean(0), smp["dz"].std(0) / math.sqrt(reps)
    assert bool(((mean - exp["dz"][0]).abs() <= 5 * se + 1e-12).all())
    assert float(smp["zero_adv_frac"].mean()) == pytest.approx(
        float(exp["zero_adv_frac"][0]), abs=5 * float(smp["zero_adv_frac"].std()) / reps**0.5
    )
    # The sampled call went through the controller: it logged the groups per bucket.
    assert sum(ctrl.metrics()[f"k_bucket{i}_groups"] for i in range(2)) == reps


# --------------------------------------------------------------------------------------
# Sweep


def test_band_limits_follow_the_entropy_band_defaults():
    assert band_limits(2.0) == pytest.approx((1.5, 2.5))
    absolute = KControlConfig(kind="entropy_band", entropy_relative=False, entropy_target=1.2)
    assert band_limits(7.0, absolute) == pytest.approx((0.95, 1.45))


def test_in_band_stats_on_a_hand_example():
    s = in_band_stats([1.0, 0.9, 0.7, 0.8, 1.3], 0.75, 1.25)
    # In band: 1.0, 0.9, 0.8 -> 3 of 5; first exit at index 2, below.
    assert s["frac_in_band"] == pytest.approx(0.6)
    assert s["first_exit"] == 2 and s["exit_side"] == "below" and not s["stays_in_band"]
    assert s["min_entropy"] == 0.7 and s["max_entropy"] == 1.3


@settings(max_examples=60, deadline=None)
@given(st.lists(st.floats(0, 5, allow_nan=False), min_size=1, max_size=30), st.floats(0, 2))
def test_in_band_stats_properties(entropy, low):
    high = low + 1.0
    s = in_band_stats(entropy, low, high)
    assert 0 <= s["frac_in_band"] <= 1
    assert s["stays_in_band"] == (s["frac_in_band"] == 1.0) == (s["first_exit"] is None)
    if s["first_exit"] is not None:
        h = entropy[s["first_exit"]]
        assert (h < low) if s["exit_side"] == "below" else (h > high)


def test_sweep_reports_band_accuracy_and_summary(tmp_path):
    arms = [
        *default_arms(ks=(0.2, 0.8)),
        SweepArm("difficulty", QAE, KControlConfig(kind="difficulty")),
    ]
    res = kcontrol_sweep(
        mixes={"hard": "0.1:1", "easy": "0.8:1"}, arms=arms, steps=12, prompts=16,
        candidates=6, group_size=4,
    )  # fmt: skip
    run = res["runs"]["hard"]["K=0.2"]
    assert run["curves"]["k"] == [0.2] * 12 and len(run["curves"]["entropy"]) == 13
    h0 = run["curves"]["entropy"][0]
    assert res["band"]["hard"]["low"] == pytest.approx(0.75 * h0)
    # Every arm starts from the same problem, hence the same step-0 entropy.
    assert {r["curves"]["entropy"][0] for r in res["runs"]["hard"].values()} == {h0}
    # The ceiling is the mean log of the correct counts: hard prompts (p ~ 0.1 of M = 6)
    # have one correct candidate (ceiling 0), easy ones (p ~ 0.8) about five.
    for mix, spec in (("hard", "0.1:1"), ("easy", "0.8:1")):
        n_correct = make_problem(16, 6, mix=spec, seed=0).correct.sum(1).double()
        assert res["band"][mix]["solved_ceiling"] == pytest.approx(float(n_correct.log().mean()))
    assert res["band"]["hard"]["solved_ceiling"] == 0.0
    assert math.log(3) < res["band"]["easy"]["solved_ceiling"] < math.log(6)
    for label in res["summary"]["fixed_k_leaving_somewhere"]:
        assert label.startswith("K=") and res["summary"][label]["mixes_left"]
    for mix, arms_ in res["runs"].items():
        for label, r in arms_.items():
            left = mix in res["summary"][label]["mixes_left"]
            assert left == (not r["numbers"]["stays_in_band"])
    good = res["summary"]["adaptive_in_band_everywhere"]
    assert set(good) <= {"entropy_band", "sparsity"}
    expected = bool(good) and len(res["summary"]["fixed_k_leaving_somewhere"]) == 2
    assert res["summary"]["goal_met"] == expected
    table = sweep_table(res)
    assert table.count("\n") == 2 + len(arms) - 1 and "| entropy_band |" in table
    path = plot_kcontrol_sweep(res, tmp_path / "sweep.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
