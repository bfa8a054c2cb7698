"""Tests for qae.lab: the tabular entropy lab, its expectations and its four checks."""

from __future__ import annotations

import argparse
import itertools
import json
import math
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from qae.core.advantages import compute_advantages
from qae.lab import checks, groups, policy
from qae.lab.dynamics import run_trajectory, step_report
from qae.lab.groups import (
    LabEstimator,
    expected_advantages,
    expected_regimes,
    expected_update,
    expected_zero_fraction,
    parse_estimator,
    sample_update,
    zero_fraction_closed_form,
)
from qae.lab.policy import (
    baseline_entropy_change,
    make_problem,
    pass_at_k,
    policy_entropy,
    predicted_entropy_change,
    success_probability,
    update_direction,
)
from qae.lab.simulate import add_simulate_parser

F64 = torch.float64


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # The lab's tensors are tiny: extra intra-op threads only add contention.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def small_problem(seed: int = 0, p_count: int = 48, reward: str = "binary"):
    return make_problem(p_count, 8, seed=seed, reward=reward)


# --------------------------------------------------------------------------------------
# Problems and policy quantities


def test_make_problem_places_the_drawn_success_rate_and_is_seeded():
    a, b, c = small_problem(0), small_problem(0), small_problem(1)
    assert torch.equal(a.logits, b.logits) and torch.equal(a.rewards, b.rewards)
    assert not torch.equal(a.logits, c.logits)
    # The correct candidates' logits were shifted so their mass is the drawn rate exactly.
    assert torch.allclose(success_probability(a.logits, a.rewards), a.difficulty, atol=1e-12)
    n_correct = a.correct.sum(dim=1)
    assert bool((n_correct >= 1).all()) and bool((n_correct <= 7).all())


def test_make_problem_mix_controls_difficulty():
    hard = make_problem(200, 8, mix="0.1:1", seed=0).difficulty
    easy = make_problem(200, 8, mix="0.9:1", seed=0).difficulty
    assert float(hard.mean()) < 0.2 < 0.8 < float(easy.mean())


def test_partial_rewards_take_the_partial_levels():
    prob = small_problem(reward="partial")
    values = set(torch.unique(prob.rewards).tolist())
    assert values <= {0.0, 0.5, 1.0} and 0.5 in values


@pytest.mark.parametrize("bad", ["", "0.1", "1.2:1", "0.5:-1", "a:b", "0.5:1:2"])
def test_parse_mix_rejects_bad_specs(bad):
    if bad == "0.1":  # a bare rate is allowed, with weight 1
        assert policy.parse_mix(bad) == [(0.1, 1.0)]
        return
    with pytest.raises(ValueError, match="mix"):
        policy.parse_mix(bad)


def test_unknown_estimator_lists_the_known_ones():
    with pytest.raises(ValueError, match="grpo"):
        parse_estimator("nope")
    assert parse_estimator("qae:0.6") == LabEstimator("qae", 0.6)
    assert parse_estimator("grpo").label == "grpo"
    with pytest.raises(ValueError, match="K must be"):
        parse_estimator("qae:1.5")


def test_entropy_and_pass_at_k_by_hand():
    # uniform over 4 -> log 4; one-hot-ish -> about 0
    z = torch.tensor([[0.0, 0.0, 0.0, 0.0], [50.0, 0.0, 0.0, 0.0]], dtype=F64)
    assert torch.allclose(
        policy_entropy(z), torch.tensor([math.log(4), 0.0], dtype=F64), atol=1e-12
    )
    p = torch.tensor([0.0, 0.25, 1.0], dtype=F64)
    # 1 - 0.75^3 = 0.578125
    assert torch.allclose(pass_at_k(p, 3), torch.tensor([0.0, 0.578125, 1.0], dtype=F64))
    assert torch.allclose(pass_at_k(p, 1), p, atol=1e-15)


# --------------------------------------------------------------------------------------
# Update directions against autograd


def _surrogate_grad(z: torch.Tensor, adv: torch.Tensor) -> torch.Tensor:
    """Autograd of E_{y ~ pi_old}[A(y) log pi_z(y)] at z = z_old."""
    zz = z.clone().requires_grad_(True)
    pi_old = torch.softmax(z, dim=1)
    (pi_old * adv * torch.log_softmax(zz, dim=1)).sum().backward()
    return zz.grad


@given(seed=st.integers(0, 10_000), m=st.integers(2, 9), b=st.floats(0, 1))
@settings(max_examples=40, deadline=None)
def test_pg_direction_is_the_gradient_of_the_expected_objective(seed, m, b):
    gen = torch.Generator().manual_seed(seed)
    z = torch.randn(3, m, generator=gen, dtype=F64) * 2
    r = (torch.rand(3, m, generator=gen, dtype=F64) > 0.5).to(F64)
    adv = r - b
    d = update_direction(z, adv, update="pg")
    assert torch.allclose(d, _surrogate_grad(z, adv), atol=1e-12)
    # With a constant baseline it is also the gradient of the expected reward E_{pi_z}[r]:
    # the baseline drops out.
    zz = z.clone().requires_grad_(True)
    (torch.softmax(zz, dim=1) * r).sum().backward()
    assert torch.allclose(d, zz.grad, atol=1e-12)


@given(seed=st.integers(0, 10_000), m=st.integers(2, 9))
@settings(max_examples=30, deadline=None)
def test_npg_direction_solves_the_fisher_system_and_logit_is_uncentered(seed, m):
    gen = torch.Generator().manual_seed(seed)
    z = torch.randn(2, m, generator=gen, dtype=F64)
    adv = torch.randn(2, m, generator=gen, dtype=F64)
    pi = torch.softmax(z, dim=1)
    fisher = torch.diag_embed(pi) - pi[:, :, None] * pi[:, None, :]  # [P, M, M]
    npg = update_direction(z, adv, update="npg")
    # F dz_npg = dz_pg: the natural step preconditions the vanilla one.
    fz = (fisher @ npg[:, :, None]).squeeze(2)
    assert torch.allclose(fz, update_direction(z, adv, update="pg"), atol=1e-12)
    # logit = pg + pi * E_pi[A]
    logit = update_direction(z, adv, update="logit")
    shift = pi * (pi * adv).sum(dim=1, keepdim=True)
    assert torch.allclose(logit, update_direction(z, adv, update="pg") + shift, atol=1e-12)


@given(seed=st.integers(0, 10_000), m=st.integers(2, 9))
@settings(max_examples=30, deadline=None)
def test_predicted_entropy_change_is_the_directional_derivative(seed, m):
    gen = torch.Generator().manual_seed(seed)
    z = torch.randn(4, m, generator=gen, dtype=F64) * 1.5
    dz = torch.randn(4, m, generator=gen, dtype=F64)
    zz = z.clone().requires_grad_(True)
    policy_entropy(zz).sum().backward()
    assert torch.allclose(predicted_entropy_change(z, dz), (zz.grad * dz).sum(dim=1), atol=1e-12)


@given(
    seed=st.integers(0, 10_000),
    m=st.integers(3, 10),
    b1=st.floats(0, 1),
    b2=st.floats(0, 1),
)
@settings(max_examples=50, deadline=None)
def test_logit_model_entropy_change_is_increasing_in_the_baseline(seed, m, b1, b2):
    # dH ~= -eta Cov(log pi, pi r) + eta b Cov(log pi, pi), and Cov(log pi, pi) >= 0.
    lo, hi = min(b1, b2), max(b1, b2)
    gen = torch.Generator().manual_seed(seed)
    z = torch.randn(2, m, generator=gen, dtype=F64)
    r = (torch.rand(2, m, generator=gen, dtype=F64) > 0.5).to(F64)
    _, pred_lo = baseline_entropy_change(z, r, lo, lr=0.1, update="logit")
    _, pred_hi = baseline_entropy_change(z, r, hi, lr=0.1, update="logit")
    assert bool((pred_hi >= pred_lo - 1e-15).all())
    # ... while under pg and npg a constant baseline does not move the expected step.
    for upd in ("pg", "npg"):
        ex_lo, _ = baseline_entropy_change(z, r, lo, lr=0.1, update=upd)
        ex_hi, _ = baseline_entropy_change(z, r, hi, lr=0.1, update=upd)
        assert torch.allclose(ex_lo, ex_hi, atol=1e-13)


# --------------------------------------------------------------------------------------
# Expectations over the sampling of a group


def _brute_force_expected_logit_step(z, r, g, est):
    """E[(1/G) sum_i A_i e_{y_i}] by enumerating all M^G ordered samples of one prompt."""
    pi = torch.softmax(z, dim=1)[0]
    m = z.shape[1]
    seqs = torch.tensor(list(itertools.product(range(m), repeat=g)))  # [M^G, G]
    rewards = r[0][seqs]  # [M^G, G]
    ids = torch.arange(seqs.shape[0]).repeat_interleave(g)
    adv = est.advantages(rewards.reshape(-1), ids).reshape(-1, g)
    weight = pi[seqs].prod(dim=1)  # [M^G]
    onehot = torch.nn.functional.one_hot(seqs, m).to(F64)  # [M^G, G, M]
    step = (adv[:, :, None] * onehot).sum(dim=1) / g  # [M^G, M]
    zero = (adv == 0).to(F64).mean(dim=1)
    return (weight[:, None] * step).sum(dim=0), float((weight * zero).sum())


@pytest.mark.parametrize("name,k", [("qae", 0.4), ("qae", 0.7), ("grpo", 0.4), ("rloo", 0.4)])
def test_expected_advantages_match_brute_force_enumeration(name, k):
    # Partial credit: three reward levels, so the composition table is not just binary.
    z = torch.tensor([[0.3, -0.5, 1.0, 0.1]], dtype=F64)
    r = torch.tensor([[1.0, 0.5, 0.0, 0.5]], dtype=F64)
    est = LabEstimator(name, k)
    step, zero = _brute_force_expected_logit_step(z, r, 5, est)
    pi = torch.softmax(z, dim=1)[0]
    abar = expected_advantages(z, r, group_size=5, estimator=est)[0]
    assert torch.allclose(pi * abar, step, atol=1e-12)
    assert expected_zero_fraction(z, r, group_size=5, estimator=est).item() == pytest.approx(
        zero, abs=1e-12
    )


@pytest.mark.parametrize("update", ["pg", "npg", "logit"])
@pytest.mark.parametrize("spec", ["qae:0.4", "grpo", "rloo"])
def test_expected_update_is_the_mean_of_sampled_updates(update, spec):
    est = parse_estimator(spec)
    prob = make_problem(3, 6, mix="0.2:1,0.7:1", seed=3)
    reps = 6000
    z = prob.logits.repeat(reps, 1)  # [3*R, M]: R independent copies of each prompt
    r = prob.rewards.repeat(reps, 1)
    gen = torch.Generator().manual_seed(0)
    step = sample_update(z, r, group_size=8, estimator=est, lr=1.0, update=update, generator=gen)
    draws = step.dz.reshape(reps, 3, 6)
    mean, se = draws.mean(dim=0), draws.std(dim=0) / math.sqrt(reps)
    exact = expected_update(prob.logits, prob.rewards, group_size=8, estimator=est, lr=1.0,
                            update=update)  # fmt: skip
    # 5 standard errors per entry (36 entries): a biased estimator fails this.
    assert bool(((mean - exact).abs() <= 5 * se + 1e-12).all()), (mean - exact) / se


@given(
    p=st.floats(0.0, 1.0),
    g=st.integers(2, 16),
    k=st.sampled_from([0.1, 0.25, 0.4, 0.5, 0.6, 0.75, 0.9]),
)
@settings(max_examples=60, deadline=None)
def test_zero_fraction_closed_form_equals_enumeration(p, g, k):
    # A two-candidate prompt (one correct) with mass p on the correct one.
    logit = math.log(max(p, 1e-300)) - math.log(max(1 - p, 1e-300))
    z = torch.tensor([[logit, 0.0]], dtype=F64)
    r = torch.tensor([[1.0, 0.0]], dtype=F64)
    q = success_probability(z, r)
    for est in (LabEstimator("qae", k), LabEstimator("grpo", k), LabEstimator("rloo", k)):
        closed = zero_fraction_closed_form(q, group_size=g, estimator=est)
        enum = expected_zero_fraction(z, r, group_size=g, estimator=est)
        assert closed.item() == pytest.approx(enum.item(), abs=1e-10)


@pytest.mark.parametrize("g,k", [(4, 0.4), (5, 0.5), (6, 0.7)])
def test_zero_fraction_closed_form_equals_counting_every_outcome(g, k):
    # Count zeros of compute_advantages on all 2^G reward vectors, weighted exactly.
    outcomes = torch.tensor(list(itertools.product([0.0, 1.0], repeat=g)), dtype=F64)
    ids = torch.arange(outcomes.shape[0]).repeat_interleave(g)
    adv = compute_advantages(outcomes.reshape(-1), ids, "qae", k=k).reshape(-1, g)
    zero = (adv == 0).to(F64).mean(dim=1)
    c = outcomes.sum(dim=1)
    for p in (0.1, 0.35, 0.8):
        weight = p**c * (1 - p) ** (g - c)
        counted = float((weight * zero).sum())
        closed = zero_fraction_closed_form(torch.tensor([p], dtype=F64), group_size=g,
                                           estimator=LabEstimator("qae", k))  # fmt: skip
        assert closed.item() == pytest.approx(counted, abs=1e-12)


def test_expected_regimes_partition_binary_groups():
    prob = small_problem()
    est = LabEstimator("qae", 0.4)
    reg = expected_regimes(prob.logits, prob.rewards, group_size=8, estimator=est)
    total = reg["degenerate"] + reg["hard"] + reg["easy"]
    # Binary non-degenerate groups are always hard (b = 0) or easy (b = 1).
    assert torch.allclose(total, torch.ones_like(total), atol=1e-12)
    # Degenerate probability p^G + (1 - p)^G.
    p = success_probability(prob.logits, prob.rewards)
    assert torch.allclose(reg["degenerate"], p**8 + (1 - p) ** 8, atol=1e-12)


def test_step_report_per_prompt_quantities():
    prob = small_problem()
    est = LabEstimator("qae", 0.4)
    rep = step_report(prob.logits, prob.rewards, estimator=est, group_size=8, lr=1e-3,
                      update="logit", pass_ks=(1, 4))  # fmt: skip
    assert torch.allclose(rep["entropy_after"] - rep["entropy_before"], rep["dH_exact"])
    # First order agrees with the exact change at a small step.
    # The error is second order: about lr * |dH|, far below 1% of the largest change.
    err = (rep["dH_predicted"] - rep["dH_exact"]).abs().max()
    assert float(err) < 0.01 * float(rep["dH_exact"].abs().max())
    assert torch.allclose(rep["pass@4"], 1 - (1 - rep["p"]) ** 4)
    assert bool(((rep["zero_adv_frac"] >= 0) & (rep["zero_adv_frac"] <= 1)).all())


def test_sampled_trajectory_is_seeded():
    prob = small_problem(p_count=16)
    est = LabEstimator("qae", 0.4)
    kw = {"estimator": est, "steps": 5, "lr": 0.5, "group_size": 8, "mode": "sampled"}
    a = run_trajectory(prob.logits, prob.rewards, seed=1, **kw)
    b = run_trajectory(prob.logits, prob.rewards, seed=1, **kw)
    c = run_trajectory(prob.logits, prob.rewards, seed=2, **kw)
    assert a == b and a["entropy"] != c["entropy"]
    assert len(a["entropy"]) == 6 and len(a["zero_adv_frac"]) == 5


# --------------------------------------------------------------------------------------
# The four checks


def test_check_baseline_holds_and_breaks_when_the_update_sign_flips(monkeypatch):
    res = checks.check_baseline_monotone(num_candidates=12)
    assert res["verdict"] is True
    n = res["numbers"]
    assert n["hard_min_increment"] > 0 and n["easy_min_increment"] > 0
    assert n["hard_rel_error_smallest_lr"] < 0.01
    assert n["hard_pg_range_per_lr"] < 1e-9 and n["easy_npg_range_per_lr"] < 1e-9
    # Flipping the sign convention of the update (descent instead of ascent) reverses the
    # monotonicity: the check must fail.
    real = policy.update_direction
    monkeypatch.setattr(policy, "update_direction", lambda *a, **kw: -real(*a, **kw))
    flipped = checks.check_baseline_monotone(num_candidates=12)
    assert flipped["verdict"] is False and flipped["numbers"]["monotone"] is False


def test_check_baseline_fails_with_a_wrong_first_order_sign(monkeypatch):
    real = policy.predicted_entropy_change
    monkeypatch.setattr(policy, "predicted_entropy_change", lambda *a: -real(*a))
    res = checks.check_baseline_monotone(num_candidates=12)
    # +Cov instead of -Cov: the relative error tends to 2, not 0.
    assert res["verdict"] is False and res["numbers"]["first_order_converges"] is False
    assert res["numbers"]["hard_rel_error_smallest_lr"] > 1.5


def test_check_extremal_holds_and_breaks_when_the_update_sign_flips(monkeypatch):
    prob = small_problem()
    res = checks.check_quantile_extremal(prob, k=0.4, group_size=8)
    n = res["numbers"]
    assert res["verdict"] is True
    assert n["hard_quantile_is_min"] == 1.0 and n["easy_quantile_is_max"] == 1.0
    assert n["hard_prompts"] > 0 and n["easy_prompts"] > 0
    # The mean baseline b = p sits strictly inside; first order puts it at about p.
    assert 0 < n["mean_position_hard"] < n["mean_position_easy"] < 1
    real = policy.update_direction
    monkeypatch.setattr(policy, "update_direction", lambda *a, **kw: -real(*a, **kw))
    assert checks.check_quantile_extremal(prob, k=0.4, group_size=8)["verdict"] is False


def test_check_extremal_does_not_hold_when_the_baseline_has_no_effect():
    # Under exact pg a constant baseline drops out: dH(b) is flat and nothing is extremal.
    res = checks.check_quantile_extremal(small_problem(), k=0.4, group_size=8, update="pg")
    assert res["verdict"] is False and res["numbers"]["hard_quantile_is_min"] == 0.0


def test_check_k_sweep_holds_under_the_paper_model_but_not_under_exact_pg():
    prob = small_problem(p_count=32)
    kw = {"ks": (0.2, 0.5, 0.8), "others": ("grpo",), "steps": 60, "group_size": 8}
    res = checks.check_k_sweep(prob, update="logit", lr=0.5, **kw)
    assert res["verdict"] is True
    by_k = res["numbers"]["qae_mean_entropy_by_k"]
    assert by_k[-1] - by_k[0] > 0.1  # not a marginal effect
    # Under the exact softmax policy gradient the baselines' effect on the expected step is
    # only through their correlation with the sample, and the ordering does not hold.
    assert checks.check_k_sweep(prob, update="pg", lr=0.5, **kw)["verdict"] is False


def test_check_zero_fraction_holds_and_detects_a_wrong_closed_form(monkeypatch):
    prob = small_problem(p_count=64)
    kw = {"ks": (0.2, 0.4, 0.6, 0.8), "group_size": 8, "repeats": 32}
    res = checks.check_zero_fraction(prob, **kw)
    assert res["verdict"] is True and res["numbers"]["max_z_score"] < 4
    real = zero_fraction_closed_form

    def off_by_one(p, *, group_size, estimator):  # the hard/easy threshold one count off
        if estimator.name != "qae":
            return real(p, group_size=group_size, estimator=estimator)
        shifted = LabEstimator("qae", min(estimator.k + 1.0 / group_size, 0.99))
        return real(p, group_size=group_size, estimator=shifted)

    monkeypatch.setattr(checks, "zero_fraction_closed_form", off_by_one)
    assert checks.check_zero_fraction(prob, **kw)["verdict"] is False


def test_groups_table_is_cached():
    groups._advantage_table.cache_clear()
    prob = small_problem(p_count=4)
    est = LabEstimator("qae", 0.4)
    expected_advantages(prob.logits, prob.rewards, group_size=8, estimator=est)
    expected_advantages(prob.logits, prob.rewards, group_size=8, estimator=est)
    info = groups._advantage_table.cache_info()
    assert info.misses == 1 and info.hits == 1


# --------------------------------------------------------------------------------------
# qae simulate


def test_simulate_command_writes_figures_and_summary(tmp_path, capsys):
    parser = argparse.ArgumentParser(prog="qae")
    add_simulate_parser(parser.add_subparsers(dest="command"))
    out = tmp_path / "lab"
    args = parser.parse_args(
        ["simulate", "--out", str(out), "-P", "24", "-M", "8", "-G", "8", "--steps", "20",
         "--repeats", "8", "--ks", "0.2,0.8", "--strict"]
    )  # fmt: skip
    assert args.func(args) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["checks"]) == set(checks.CHECKS)
    assert summary["all_hold"] is True
    for name in checks.CHECKS:
        png = out / f"check_{name}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(out.glob(".*.tmp"))  # atomic writes leave no temp files
    text = capsys.readouterr().out
    assert "holds" in text and "zerofrac" in text


def test_simulate_rejects_unknown_checks(tmp_path):
    parser = argparse.ArgumentParser(prog="qae")
    add_simulate_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["simulate", "--out", str(tmp_path), "--checks", "baseline,nope"])
    with pytest.raises(ValueError, match="unknown checks"):
        args.func(args)


def test_simulate_writes_under_the_git_ignored_runs_folder_by_default():
    parser = argparse.ArgumentParser(prog="qae")
    add_simulate_parser(parser.add_subparsers(dest="command"))
    out = Path(parser.parse_args(["simulate"]).out)
    assert out.parts[0] == "runs"
    ignored = (Path(__file__).resolve().parents[1] / ".gitignore").read_text().split()
    assert "runs/" in ignored
