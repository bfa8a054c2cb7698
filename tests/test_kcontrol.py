"""Tests for qae.kcontrol: schedules, PI controllers, difficulty-aware K, config, resume."""

from __future__ import annotations

import dataclasses
import io
import json
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from qae import advantage_stats, compute_advantages
from qae.io.configtools import coerce, field_docs, iter_leaves
from qae.kcontrol import (
    DifficultyK,
    EntropyBandController,
    KControlConfig,
    KController,
    SparsityController,
    StepSignals,
    binary_nonzero_fraction,
    controllers,
    cosine_k,
    difficulty_k,
    group_success_rate,
    linear_k,
    make_controller,
    pi_step,
    piecewise_k,
    two_phase_k,
)

KINDS = ["constant", "linear", "cosine", "two_phase", "piecewise", "entropy_band", "sparsity"]
KINDS += ["difficulty"]
unit = st.floats(0.01, 0.99)


# --------------------------------------------------------------------------------------
# Schedules


@given(unit, unit, st.integers(1, 500))
def test_linear_and_cosine_hit_end_points_exactly(k_start, k_end, steps):
    for fn in (linear_k, cosine_k):
        assert fn(0, k_start=k_start, k_end=k_end, steps=steps) == k_start
        assert fn(steps, k_start=k_start, k_end=k_end, steps=steps) == k_end
        assert fn(steps + 7, k_start=k_start, k_end=k_end, steps=steps) == k_end
        values = [fn(t, k_start=k_start, k_end=k_end, steps=steps) for t in range(steps + 1)]
        lo, hi = min(k_start, k_end), max(k_start, k_end)
        assert all(lo - 1e-12 <= v <= hi + 1e-12 for v in values)
        # Monotone from k_start towards k_end.
        sign = 1 if k_end >= k_start else -1
        assert all(sign * (b - a) >= -1e-12 for a, b in zip(values, values[1:], strict=False))


def test_schedule_values_by_hand():
    # linear 0.6 -> 0.4 over 100 steps: step 25 is a quarter of the way, 0.6 - 0.05.
    assert linear_k(25, k_start=0.6, k_end=0.4, steps=100) == pytest.approx(0.55, abs=1e-12)
    # cosine: halfway is the mean (cos(pi/2) = 0); a quarter: 0.4 + 0.2 (1 + cos(pi/4)) / 2.
    assert cosine_k(50, k_start=0.6, k_end=0.4, steps=100) == pytest.approx(0.5, abs=1e-12)
    quarter = 0.4 + 0.2 * (1 + math.sqrt(0.5)) / 2
    assert cosine_k(25, k_start=0.6, k_end=0.4, steps=100) == pytest.approx(quarter, abs=1e-12)
    assert two_phase_k(99, k_explore=0.6, k_exploit=0.4, switch_step=100) == 0.6
    assert two_phase_k(100, k_explore=0.6, k_exploit=0.4, switch_step=100) == 0.4


def test_piecewise_step_and_linear():
    points = [(10, 0.6), (20, 0.4), (40, 0.5)]
    step = [piecewise_k(t, points=points) for t in (0, 10, 19, 20, 39, 40, 1000)]
    assert step == [0.6, 0.6, 0.6, 0.4, 0.4, 0.5, 0.5]
    lin = [piecewise_k(t, points=points, interpolation="linear") for t in (0, 15, 20, 30, 99)]
    # 15 is halfway from (10, 0.6) to (20, 0.4): 0.5; 30 halfway to (40, 0.5): 0.45.
    assert lin == pytest.approx([0.6, 0.5, 0.4, 0.45, 0.5], abs=1e-12)
    with pytest.raises(ValueError, match="interpolation"):
        piecewise_k(3, points=points, interpolation="cubic")


def test_schedule_controller_follows_the_step():
    ctrl = make_controller(KControlConfig(kind="linear", k_start=0.6, k_end=0.4, steps=10))
    assert ctrl.k() == 0.6
    # update(step=t) returns the K of step t + 1; without a step it counts on by one.
    assert ctrl.update({"step": 4}) == pytest.approx(linear_k(5, k_start=0.6, k_end=0.4, steps=10))
    assert ctrl.update({}) == pytest.approx(linear_k(6, k_start=0.6, k_end=0.4, steps=10))
    assert ctrl.update(StepSignals(step=9)) == 0.4
    assert ctrl.metrics() == {"k": 0.4}
    two = make_controller(KControlConfig(kind="two_phase", k_start=0.7, k_end=0.3, steps=3))
    assert [two.k()] + [two.update({"step": t}) for t in range(4)] == [0.7, 0.7, 0.7, 0.3, 0.3]


# --------------------------------------------------------------------------------------
# PI core


@given(st.lists(st.floats(-3, 3), min_size=1, max_size=60), unit, st.floats(0, 2), st.floats(0, 1))
def test_pi_step_clamps_and_bounds_the_integral(errors, k_ref, kp, ki):
    k_min, k_max = 0.2, 0.8
    k_ref = min(max(k_ref, k_min), k_max)
    integral = 0.0
    for e in errors:
        k, integral = pi_step(e, integral, k_ref=k_ref, kp=kp, ki=ki, k_min=k_min, k_max=k_max)
        assert k_min <= k <= k_max
        # Conditional integration keeps I where k_ref + I stays inside the clamp.
        assert min(0.0, k_min - k_ref) - 1e-12 <= integral <= max(0.0, k_max - k_ref) + 1e-12


# --------------------------------------------------------------------------------------
# Entropy band


def _drive(ctrl, values, start=0, key="entropy"):
    return [ctrl.update({"step": start + i, key: v}) for i, v in enumerate(values)]


@pytest.mark.parametrize("relative", [True, False])
def test_entropy_band_does_not_move_inside_the_band(relative):
    # Relative band around the first entropy 2.0: [1.5, 2.5]; absolute: target 2.0 +- 0.5.
    ctrl = EntropyBandController(
        target=1.0 if relative else 2.0, width=0.5 if not relative else 0.25, relative=relative
    )
    gen = torch.Generator().manual_seed(0)
    inside = (1.55 + 0.9 * torch.rand(60, generator=gen)).tolist()
    ks = _drive(ctrl, [2.0, *inside])
    assert ks == [0.4] * 61
    assert ctrl.metrics()["k_integral"] == 0.0
    assert ctrl.band() == pytest.approx((1.5, 2.5))


@pytest.mark.parametrize(("entropy", "direction"), [(1.0, 1), (3.0, -1)])
def test_entropy_band_moves_monotonically_to_the_clamp(entropy, direction):
    ctrl = EntropyBandController(target=2.0, width=0.5, relative=False)
    ks = _drive(ctrl, [entropy] * 80)
    # Below the band K rises (collapse risk), above it falls, monotonically, to the clamp.
    assert all(direction * (b - a) >= 0 for a, b in zip(ks, ks[1:], strict=False))
    assert direction * (ks[0] - 0.4) > 0
    assert ks[-1] == (0.8 if direction > 0 else 0.2)
    # Saturated: the integral stops growing (no windup) and K stays at the clamp.
    frozen = ctrl.metrics()["k_integral"]
    _drive(ctrl, [entropy] * 50, start=80)
    assert ctrl.metrics()["k_integral"] == frozen
    assert ctrl.k() == ks[-1]


def test_entropy_band_recovers_quickly_after_long_saturation():
    kp, ki = 1.0, 0.1
    ctrl = EntropyBandController(target=2.0, width=0.5, relative=False, kp=kp, ki=ki)
    _drive(ctrl, [1.0] * 300)  # far below the band for 300 steps
    assert ctrl.k() == 0.8
    # Entropy jumps above the band: error (2.5 - 3.0) / 2.0 = -0.25 per step.
    ks = _drive(ctrl, [3.0] * 40, start=300)
    assert ks[0] < 0.8  # leaves the clamp at the first update
    # Saturation froze I at k_max - k - kp e = 0.8 - 0.4 - 0.25 = 0.15 (a wound-up
    # integrator would hold 300 * ki * 0.25 = 7.5). After the flip K = 0.4 - 0.25 + I with I
    # falling by ki * 0.25 = 0.025 a step: K = 0.275, 0.25, 0.225, 0.2 (4 updates).
    assert ctrl.state_dict()["integral"] == pytest.approx(0.05)
    assert ks[:4] == pytest.approx([0.275, 0.25, 0.225, 0.2], abs=1e-12)
    assert ks[4:] == pytest.approx([0.2] * 36, abs=1e-12)
    # Back inside the band K stops at once.
    held = _drive(ctrl, [2.0] * 10, start=340)
    assert len(set(held)) == 1


def test_entropy_band_reference_and_smoothing():
    ctrl = EntropyBandController(target=1.0, width=0.25, relative=True, ema=0.5)
    ctrl.update({"step": 0, "entropy": 2.0})
    m = ctrl.metrics()
    assert m["k_reference"] == 2.0 and (m["k_band_low"], m["k_band_high"]) == (1.5, 2.5)
    ctrl.update({"step": 1, "entropy": 1.0})
    # EMA 0.5 * 2.0 + 0.5 * 1.0 = 1.5: on the band's edge, error 0.
    assert ctrl.metrics()["k_signal"] == 1.5 and ctrl.k() == 0.4
    ctrl.update({"step": 2, "entropy": 0.5})
    # EMA 1.0; error (1.5 - 1.0) / centre 2.0 = 0.25; K = 0.4 + 1.0 * 0.25 + 0.1 * 0.25.
    assert ctrl.metrics()["k_signal"] == 1.0
    assert ctrl.k() == pytest.approx(0.4 + 0.25 + 0.025)


def test_entropy_band_signal_errors_and_skips():
    ctrl = EntropyBandController()
    with pytest.raises(ValueError, match="'entropy'"):
        ctrl.update({"step": 0, "frac_nonzero_adv": 0.2})
    with pytest.raises(ValueError, match="positive entropy"):
        ctrl.update({"step": 0, "entropy": 0.0})
    ctrl.update({"step": 0, "entropy": 1.0})
    before = ctrl.state_dict()
    assert ctrl.update({"step": 1, "entropy": float("nan")}) == before["k"]
    after = ctrl.state_dict()
    assert after["skipped"] == 1 and after["integral"] == before["integral"]
    with pytest.raises(ValueError, match="step"):
        ctrl.update({"step": -1, "entropy": 1.0})
    # 0-d tensors (a trainer's metrics) are read as numbers: 0.5 is far below the band.
    assert ctrl.update({"step": torch.tensor(2), "entropy": torch.tensor(0.5)}) > before["k"]
    assert ctrl.step == 3


@pytest.mark.parametrize("a", [0.02, 0.2, 1.0])
@pytest.mark.parametrize("k_star", [0.3, 0.7])
def test_entropy_band_closes_the_loop_on_an_integrating_plant(a, k_star):
    # Relative entropy h follows h' = a (K - K*): K above K* raises entropy, K* unknown to
    # the controller. With the default gains, after a transient, h stays in the band
    # [0.75, 1.25] (up to a small overshoot at its edges) and K does not oscillate: at
    # most one reversal of direction in the last 300 steps.
    ctrl = EntropyBandController()
    h, ks, hs = 1.0, [], []
    for t in range(600):
        k = ctrl.k()
        h = h + a * (k - k_star)
        ks.append(k)
        hs.append(h)
        ctrl.update({"step": t, "entropy": 1.0 if t == 0 else h})
    tail_h, tail_k = hs[-300:], ks[-300:]
    assert all(0.75 - 0.03 <= x <= 1.25 + 0.03 for x in tail_h)
    moves = [b - a_ for a_, b in zip(tail_k, tail_k[1:], strict=False) if abs(b - a_) > 1e-12]
    assert sum(1 for x, y in zip(moves, moves[1:], strict=False) if x * y < 0) <= 1


# --------------------------------------------------------------------------------------
# Sparsity


@pytest.mark.parametrize(
    ("branch", "k", "frac", "direction"),
    [
        ("low", 0.35, 0.5, 1),
        ("low", 0.35, 0.05, -1),
        ("high", 0.65, 0.5, -1),
        ("high", 0.65, 0.05, 1),
    ],
)
def test_sparsity_direction_and_clamp(branch, k, frac, direction):
    lo, hi = (0.2, 0.5) if branch == "low" else (0.5, 0.8)
    ctrl = SparsityController(target=0.2, branch=branch, k=k, k_min=lo, k_max=hi)
    ks = _drive(ctrl, [frac] * 200, key="frac_nonzero_adv")
    assert direction * (ks[0] - k) > 0
    assert all(direction * (b - a) >= 0 for a, b in zip(ks, ks[1:], strict=False))
    assert ks[-1] == (hi if direction > 0 else lo)


def test_sparsity_holds_inside_tolerance_and_reads_frac_zero_adv():
    ctrl = SparsityController(target=0.2, tolerance=0.05)
    assert _drive(ctrl, [0.16, 0.24, 0.2, 0.25, 0.15], key="frac_nonzero_adv") == [0.4] * 5
    # frac_zero_adv = 0.9 means 0.1 non-zero: below the band, so K falls on the low branch.
    assert ctrl.update({"step": 5, "frac_zero_adv": 0.9}) < 0.4
    with pytest.raises(ValueError, match="frac_nonzero_adv"):
        ctrl.update({"step": 6, "frac_nonzero_adv": 1.5})


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(0, 8), min_size=1, max_size=12))
def test_nonzero_fraction_is_v_shaped_in_k(successes):
    # The controller's assumption, checked with the real estimator: the non-zero fraction
    # is non-increasing in K on (0, 1/2] and non-decreasing on [1/2, 1).
    G = 8
    c = torch.tensor(successes)
    rewards = torch.cat([torch.tensor([1.0] * n + [0.0] * (G - n)) for n in successes])
    ids = torch.arange(len(successes)).repeat_interleave(G)
    grid = [0.05 * i for i in range(1, 20)]
    fracs = []
    for k in grid:
        adv = compute_advantages(rewards, ids, "qae", k=k)
        stats = advantage_stats(adv, rewards, ids, k=k)
        frac = 1.0 - stats["frac_zero_adv"]
        assert frac == pytest.approx(binary_nonzero_fraction(c, G, k), abs=1e-12)
        fracs.append(frac)
    low, high = fracs[:10], fracs[9:]  # grid[9] = 0.5
    assert all(b <= a + 1e-12 for a, b in zip(low, low[1:], strict=False))
    assert all(b >= a - 1e-12 for a, b in zip(high, high[1:], strict=False))
    # Minimum at K = 1/2: every group contributes min(c, G - c).
    expected_min = sum(min(n, G - n) for n in successes) / (G * len(successes))
    assert fracs[9] == pytest.approx(expected_min, abs=1e-12)


def _fixed_batch():
    # G = 8 with success counts c. The quantile's rank is ceil(8 K): 2 for K in [0.2, 0.25],
    # 3 for (0.25, 0.375], 4 for (0.375, 0.5]; a group is hard iff c <= 8 - rank.
    # Non-zero responses per level (hard: c, easy: 8 - c, c in {0, 8}: 0):
    #   K <= 0.25:          1 + 5 + 6 + 1 + 0 + 0 + 2 + 6 = 21 -> 21/64 = 0.328
    #   0.25 < K <= 0.375:  1 + 5 + 2 + 1 + 0 + 0 + 2 + 2 = 13 -> 13/64 = 0.203
    #   0.375 < K <= 0.5:   1 + 3 + 2 + 1 + 0 + 0 + 2 + 2 = 11 -> 11/64 = 0.172
    counts = [1, 5, 6, 7, 0, 8, 2, 6]
    rewards = torch.cat([torch.tensor([1.0] * n + [0.0] * (8 - n)) for n in counts])
    return rewards, torch.arange(8).repeat_interleave(8)


def _frac_nonzero(rewards, ids, k):
    return float((compute_advantages(rewards, ids, "qae", k=k) != 0).double().mean())


@pytest.mark.parametrize("k0", [0.2, 0.5])
def test_sparsity_settles_on_the_level_inside_the_tolerance(k0):
    rewards, ids = _fixed_batch()
    assert [_frac_nonzero(rewards, ids, k) for k in (0.22, 0.3, 0.45)] == [
        21 / 64,
        13 / 64,
        11 / 64,
    ]
    ctrl = SparsityController(target=0.2, tolerance=0.02, k=k0)
    ks = []
    for t in range(300):
        ks.append(ctrl.k())
        ctrl.update({"step": t, "frac_nonzero_adv": _frac_nonzero(rewards, ids, ctrl.k())})
    # Only the middle level (13/64, error 0.003) is within the tolerance: K rests there.
    assert 0.25 < ks[-1] <= 0.375
    assert len(set(ks[-50:])) == 1


def test_sparsity_rests_at_the_clamp_when_the_target_is_unreachable():
    rewards, ids = _fixed_batch()
    ctrl = SparsityController(target=0.1, tolerance=0.02)  # below the minimum 11/64
    for t in range(200):
        ctrl.update({"step": t, "frac_nonzero_adv": _frac_nonzero(rewards, ids, ctrl.k())})
    assert ctrl.k() == 0.5
    frozen = ctrl.state_dict()["integral"]
    for t in range(200, 220):
        ctrl.update({"step": t, "frac_nonzero_adv": _frac_nonzero(rewards, ids, ctrl.k())})
    assert ctrl.state_dict()["integral"] == frozen


def test_sparsity_converges_on_sampled_binary_batches():
    # 32 prompts with success probabilities spread over [0, 1], G = 8, fresh samples each
    # step. Expected non-zero fraction: ~0.30 at K = 0.2, ~0.21 at K = 0.5, so 0.25 is
    # reachable; the time-average must meet it (bounded integral => mean error -> 0).
    gen = torch.Generator().manual_seed(0)
    p = torch.rand(32, generator=gen).repeat_interleave(8)
    ids = torch.arange(32).repeat_interleave(8)
    ctrl = SparsityController(target=0.25, tolerance=0.0)
    fracs = []
    for t in range(400):
        rewards = (torch.rand(256, generator=gen) < p).float()
        fracs.append(_frac_nonzero(rewards, ids, ctrl.k()))
        ctrl.update({"step": t, "frac_nonzero_adv": fracs[-1]})
    tail = fracs[100:]
    assert abs(sum(tail) / len(tail) - 0.25) < 0.01
    assert 0.2 < ctrl.k() < 0.5


# --------------------------------------------------------------------------------------
# Difficulty-aware K


def _groups(successes, G=4):
    rewards = torch.cat([torch.tensor([1.0] * n + [0.0] * (G - n)) for n in successes])
    return rewards, torch.arange(len(successes)).repeat_interleave(G)


def test_difficulty_k_buckets_by_success_rate():
    # Success rates 0, 1/4, 2/4, 3/4, 1 with edges [0.25, 0.5, 0.75]: buckets 0, 1, 2, 3, 3.
    rewards, ids = _groups([0, 1, 2, 3, 4])
    ks = [0.3, 0.4, 0.6, 0.7]
    k = difficulty_k(rewards, ids, edges=[0.25, 0.5, 0.75], ks=ks)
    expected = torch.tensor([0.3, 0.4, 0.6, 0.7, 0.7], dtype=torch.float64).repeat_interleave(4)
    assert torch.equal(k, expected)
    ctrl = DifficultyK([0.25, 0.5, 0.75], ks)
    assert torch.equal(ctrl.batch_k(rewards, ids), expected)
    m = ctrl.metrics()
    assert [m[f"k_bucket{i}"] for i in range(4)] == ks
    assert [m[f"k_bucket{i}_groups"] for i in range(4)] == [1.0, 1.0, 1.0, 2.0]
    assert m["k"] == pytest.approx((0.3 + 0.4 + 0.6 + 0.7 + 0.7) / 5)
    assert ctrl.labels() == ["[0, 0.25)", "[0.25, 0.5)", "[0.5, 0.75)", "[0.75, 1]"]


def test_difficulty_bucket_k_picks_the_regime():
    # A group with 5 of 8 correct (p = 0.625) is hard iff p <= 1 - K: with K = 0.3 its
    # successes get credit (all advantages >= 0); with K = 0.6 its failures are pushed down.
    rewards, ids = _groups([5, 1], G=8)
    for bucket_k, sign in ((0.3, 1), (0.6, -1)):
        k = difficulty_k(rewards, ids, edges=[0.5], ks=[0.4, bucket_k])
        adv = compute_advantages(rewards, ids, "qae", k=k)
        mid = adv[:8]
        assert (sign * mid >= 0).all() and (mid != 0).sum() == (5 if sign > 0 else 3)
        # The hard group (1 of 8) in bucket 0 keeps K = 0.4: only its success is credited.
        assert (adv[8:] > 0).sum() == 1 and (adv[8:] < 0).sum() == 0


def test_difficulty_default_config_equals_constant_k():
    ctrl = make_controller(KControlConfig(kind="difficulty"))
    gen = torch.Generator().manual_seed(1)
    rewards = (torch.rand(64, generator=gen) < 0.5).float()
    ids = torch.arange(8).repeat_interleave(8)
    adv = compute_advantages(rewards, ids, "qae", k=ctrl.batch_k(rewards, ids))
    assert torch.equal(adv, compute_advantages(rewards, ids, "qae", k=0.4))


def test_group_success_rate_skips_nan_and_uses_threshold():
    rewards = torch.tensor([1.0, float("nan"), 0.0, -1.0, 0.5, 1.0])
    ids = ["a", "a", "a", "b", "b", "b"]
    # a: 1 of 2 valid > 0; b: 2 of 3 > 0 (0.5 counts), or 1 of 3 with threshold 0.5.
    rate = group_success_rate(rewards, ids)
    assert rate.tolist() == [0.5] * 3 + [pytest.approx(2 / 3)] * 3
    rate = group_success_rate(rewards, ids, success_threshold=0.5)
    assert rate.tolist() == [0.5] * 3 + [pytest.approx(1 / 3)] * 3


# --------------------------------------------------------------------------------------
# Non-binary rewards


def test_partial_credit_makes_the_baseline_an_order_statistic():
    # One group of 5 distinct scores, K = 0.4: baseline = ceil(5 * 0.4) = 2nd smallest = 0.25.
    rewards = torch.tensor([0.0, 0.25, 0.5, 0.75, 1.0])
    ids = torch.zeros(5, dtype=torch.long)
    adv = compute_advantages(rewards, ids, "qae", k=0.4)
    assert adv[0] < 0 and adv[1] == 0 and (adv[2:] > 0).all()
    stats = advantage_stats(adv, rewards, ids, k=0.4)
    assert stats["mixed_groups"] == 1.0 and stats["frac_zero_adv"] == 0.2
    # K = 0.8: the 4th smallest (0.75) is the baseline: one positive, three negative.
    adv = compute_advantages(rewards, ids, "qae", k=0.8)
    assert (adv > 0).sum() == 1 and (adv < 0).sum() == 3


@settings(max_examples=40, deadline=None)
@given(st.lists(st.integers(0, 6), min_size=1, max_size=8), st.sampled_from([0.2, 0.4, 0.6]))
def test_dapo_plus_minus_one_rewards_give_the_binary_advantages(successes, k):
    # r = 2x - 1: the baseline maps the same way and the std doubles, so with eps = 0 the
    # scaled advantage (r - b) / s is unchanged.
    x, ids = _groups(successes, G=6)
    a01 = compute_advantages(x, ids, "qae", k=k, eps=0.0)
    apm = compute_advantages(2 * x - 1, ids, "qae", k=k, eps=0.0)
    assert torch.allclose(a01, apm, atol=1e-6)


def _overlong(length, max_len=20, buffer=4):
    # DAPO: min(-(L - (Lmax - buf)) / buf, 0).
    return min(-(length - (max_len - buffer)) / buffer, 0.0)


def test_overlong_penalty_puts_a_correct_response_below_the_baseline():
    # Easy group, G = 4, K = 0.6 (rank ceil(2.4) = 3): one wrong, two short correct, one
    # correct of 18 tokens (penalty -(18 - 16) / 4 = -0.5). Sorted: -1, 0.5, 1, 1; the
    # baseline is 1, so the long correct answer gets a negative advantage.
    assert _overlong(18) == -0.5
    rewards = torch.tensor([-1.0, 1.0, 1.0, 1.0 + _overlong(18)])
    ids = torch.zeros(4, dtype=torch.long)
    adv = compute_advantages(rewards, ids, "qae", k=0.6)
    assert adv[0] < 0 and adv[1] == 0 and adv[2] == 0 and adv[3] < 0
    # Without the penalty the same group credits no correct answer negatively.
    plain = compute_advantages(torch.tensor([-1.0, 1.0, 1.0, 1.0]), ids, "qae", k=0.6)
    assert plain[3] == 0


def test_overlong_penalty_makes_hard_groups_mixed():
    # Hard group, K = 0.4 (rank 2): wrong, wrong, long wrong (-1 - 0.5), correct.
    # Sorted -1.5, -1, -1, 1: baseline -1, so the long wrong answer is pushed down too.
    rewards = torch.tensor([-1.0, -1.0, -1.0 + _overlong(18), 1.0])
    ids = torch.zeros(4, dtype=torch.long)
    adv = compute_advantages(rewards, ids, "qae", k=0.4)
    assert adv[0] == 0 and adv[1] == 0 and adv[2] < 0 and adv[3] > 0
    assert advantage_stats(adv, rewards, ids, k=0.4)["mixed_groups"] == 1.0
    binary = compute_advantages(torch.tensor([0.0, 0.0, 0.0, 1.0]), ids, "qae", k=0.4)
    assert (binary[:3] == 0).all() and binary[3] > 0


# --------------------------------------------------------------------------------------
# Resume, registry, config


def _signals(t):
    # Entropy drifting down then up, non-zero fraction swinging: every controller moves.
    return {
        "step": t,
        "entropy": 1.0 + 0.6 * math.sin(t / 3.0),
        "frac_nonzero_adv": 0.2 + 0.15 * math.cos(t / 2.0),
    }


def _config(kind):
    extra = {"piecewise": {"points_steps": [0, 5, 15], "points_k": [0.6, 0.5, 0.3]}}
    return KControlConfig(kind=kind, steps=15, ema=0.3, **extra.get(kind, {}))


def _run(ctrl, steps, batches):
    out = []
    for t in steps:
        k = ctrl.batch_k(*batches[t])
        out.append(k.tolist() if isinstance(k, torch.Tensor) else k)
        ctrl.update(_signals(t))
        out.append(ctrl.metrics())
    return out


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("via", ["json", "torch"])
def test_resume_from_state_dict_is_identical(kind, via):
    gen = torch.Generator().manual_seed(2)
    batches = [_groups(torch.randint(0, 5, (6,), generator=gen).tolist()) for _ in range(20)]
    ctrl = make_controller(_config(kind))
    assert isinstance(ctrl, KController)
    _run(ctrl, range(10), batches)
    state = ctrl.state_dict()
    if via == "json":
        state = json.loads(json.dumps(state))
    else:
        buf = io.BytesIO()
        torch.save(state, buf)
        buf.seek(0)
        state = torch.load(buf, weights_only=True)
    first = _run(ctrl, range(10, 20), batches)
    resumed = make_controller(_config(kind))
    resumed.load_state_dict(state)
    assert _run(resumed, range(10, 20), batches) == first
    assert len({json.dumps(x) for x in first[::2]}) > 1 or kind in ("constant", "difficulty")


def test_load_state_dict_rejects_another_kind():
    state = make_controller(KControlConfig(kind="sparsity")).state_dict()
    with pytest.raises(ValueError, match="kind='sparsity'.*kind='entropy_band'"):
        make_controller(KControlConfig(kind="entropy_band")).load_state_dict(state)


def test_registry_names_and_unknown_kind():
    assert controllers.names() == sorted(KINDS)
    with pytest.raises(ValueError, match="kind='pid'.*constant"):
        KControlConfig(kind="pid")


def test_config_fields_are_documented_and_cli_typed():
    docs = field_docs(KControlConfig)
    cfg = KControlConfig()
    for name, f, tp, _ in iter_leaves(KControlConfig):
        assert docs.get(name), f"field {name} has no docstring"
        value = getattr(cfg, f.name)
        if value is not None:
            assert coerce(name, value, tp) == value


def test_config_defaults_resolve_per_kind():
    band = make_controller(KControlConfig(kind="entropy_band"))
    assert (band.k_min, band.k_max, band.kp, band.ki) == (0.2, 0.8, 1.0, 0.1)
    low = make_controller(KControlConfig(kind="sparsity"))
    assert (low.k_min, low.k_max, low.kp, low.ki) == (0.2, 0.5, 0.2, 0.2)
    high = make_controller(KControlConfig(kind="sparsity", sparsity_branch="high", k=0.6))
    assert (high.k_min, high.k_max) == (0.5, 0.8)
    tuned = make_controller(KControlConfig(kind="entropy_band", k_min=0.3, kp=0.0, ki=0.2))
    assert (tuned.k_min, tuned.kp, tuned.ki) == (0.3, 0.0, 0.2)


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"k": 1.0}, "k must be in \\(0, 1\\), got k=1.0"),
        ({"k_start": 0.0}, "k_start"),
        ({"steps": -1}, "steps=-1"),
        ({"interpolation": "cubic"}, "interpolation='cubic'"),
        ({"kind": "piecewise"}, "points_steps"),
        ({"kind": "piecewise", "points_steps": [0, 5], "points_k": [0.5]}, "same non-zero"),
        ({"kind": "piecewise", "points_steps": [5, 5], "points_k": [0.5, 0.4]}, "increasing"),
        ({"kind": "piecewise", "points_steps": [0], "points_k": [1.5]}, "points_k\\[0\\]"),
        ({"k_min": 0.6, "k_max": 0.5}, "k_min < k_max"),
        ({"kp": -1.0}, "kp=-1.0"),
        ({"ema": 1.0}, "ema=1.0"),
        ({"entropy_target": 0.0}, "entropy_target"),
        ({"entropy_band": 1.0}, "entropy_band=1.0"),
        ({"kind": "entropy_band", "k": 0.9}, "k=0.9 is outside"),
        ({"kind": "sparsity", "k_max": 0.6}, "k_max=0.6 > 0.5"),
        ({"kind": "sparsity", "sparsity_branch": "high", "k_min": 0.4}, "k_min=0.4 < 0.5"),
        ({"kind": "sparsity", "sparsity_branch": "high"}, "k=0.4 is outside"),
        ({"sparsity_branch": "middle"}, "sparsity_branch='middle'"),
        ({"sparsity_target": 0.0}, "sparsity_target"),
        ({"difficulty_ks": [0.4]}, "needs len\\(difficulty_edges\\) \\+ 1 = 4"),
        ({"difficulty_edges": [0.5, 0.25], "difficulty_ks": [0.4] * 3}, "strictly increasing"),
        ({"difficulty_ks": [0.4, 0.4, 0.4, 1.0]}, "difficulty_ks must all be in"),
    ],
)
def test_config_validation_names_field_and_value(fields, message):
    with pytest.raises(ValueError, match=message):
        KControlConfig(**fields)


def test_config_is_revalidated_after_edits():
    cfg = KControlConfig(kind="sparsity")
    cfg.k_max = 0.7
    with pytest.raises(ValueError, match="k_max=0.7"):
        dataclasses.replace(cfg)
