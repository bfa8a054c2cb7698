"""Tests for qae.core.advantages: every estimator against a per-group loop reference."""

from __future__ import annotations

import math
import random
from collections import defaultdict
from fractions import Fraction

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import qae
from qae.core.advantages import (
    QUANTILE_METHODS,
    advantage_stats,
    broadcast_to_tokens,
    compute_advantages,
    estimators,
    group_quantile,
    register_estimator,
)

TORCH_METHODS = [m for m in QUANTILE_METHODS if m != "inverted_cdf"]


# --------------------------------------------------------------------------------------
# A straightforward reference: a Python dict of lists, one group at a time.


def ref_quantile(values: list[float], k: float, method: str, dtype: torch.dtype) -> float:
    if method == "inverted_cdf":
        s = sorted(values)
        j = math.ceil(len(s) * k - 1e-9)  # smallest j with j / n >= K
        return s[min(max(j, 1), len(s)) - 1]
    return float(torch.quantile(torch.tensor(values, dtype=dtype), k, interpolation=method))


def ref_advantages(
    rewards: list[float],
    gids: list,
    estimator: str,
    *,
    k: float = 0.4,
    method: str = "inverted_cdf",
    scale: str | None = None,
    eps: float = 1e-6,
    singleton: str = "zero",
    dtype: torch.dtype = torch.float64,
) -> list[float]:
    default_scale = {"grpo": "group", "qae": "group", "drgrpo": "none", "rloo": "none"}
    scale = scale or default_scale[estimator]
    groups: dict = defaultdict(list)
    for i, (r, g) in enumerate(zip(rewards, gids, strict=True)):
        if not math.isnan(r):
            groups[g].append(i)
    valid = [r for r in rewards if not math.isnan(r)]
    batch_std = float(np.std(valid, ddof=1)) if len(valid) > 1 else 0.0
    out = [0.0] * len(rewards)
    for idx in groups.values():
        vals = [rewards[i] for i in idx]
        n = len(vals)
        if n == 1:
            out[idx[0]] = vals[0] if singleton == "raw" else 0.0
            continue
        if len(set(vals)) == 1:
            continue  # all equal: exactly zero
        mean = sum(vals) / n
        std = math.sqrt(sum((v - mean) ** 2 for v in vals) / (n - 1))
        for i, v in zip(idx, vals, strict=True):
            if estimator in ("grpo", "drgrpo"):
                b = mean
            elif estimator == "rloo":
                b = (sum(vals) - v) / (n - 1)
            else:
                b = ref_quantile(vals, k, method, dtype)
            a = v - b
            if scale == "group":
                a /= std + eps
            elif scale == "batch":
                a /= batch_std + eps
            out[i] = a
    return out


# --------------------------------------------------------------------------------------
# Strategies


@st.composite
def ragged_batches(draw, binary: bool | None = None, min_size: int = 1):
    """(rewards, group ids) for 1..8 groups of 1..10 responses, shuffled."""
    sizes = draw(st.lists(st.integers(min_size, 10), min_size=1, max_size=8))
    is_binary = draw(st.booleans()) if binary is None else binary
    if is_binary:
        reward = st.sampled_from([0.0, 1.0])
    else:
        # Few distinct values make ties (the hard case for quantiles) common.
        reward = st.one_of(
            st.sampled_from([-1.0, 0.0, 0.25, 0.5, 1.0]),
            st.floats(-10, 10, allow_nan=False, allow_infinity=False, width=32),
        )
    rewards, gids = [], []
    for g, size in enumerate(sizes):
        for _ in range(size):
            rewards.append(draw(reward))
            gids.append(g * 7 + 3)  # non-dense ids
    perm = draw(st.permutations(range(len(rewards))))
    return [rewards[i] for i in perm], [gids[i] for i in perm]


ks = st.floats(0.01, 0.99, allow_nan=False)
SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def assert_close(got: torch.Tensor, want: list[float], tol: float = 1e-6) -> None:
    np.testing.assert_allclose(got.double().numpy(), np.array(want), rtol=tol, atol=tol)


# --------------------------------------------------------------------------------------
# Equality with the reference


@SETTINGS
@given(ragged_batches(), ks, st.sampled_from(["grpo", "drgrpo", "rloo", "qae"]))
def test_estimators_match_loop_reference(batch, k, estimator):
    rewards, gids = batch
    got = compute_advantages(torch.tensor(rewards, dtype=torch.float64), gids, estimator, k=k)
    assert_close(got, ref_advantages(rewards, gids, estimator, k=k))


@SETTINGS
@given(ragged_batches(), ks, st.sampled_from(QUANTILE_METHODS), st.sampled_from(["group", "none"]))
def test_qae_quantile_methods_match_reference(batch, k, method, scale):
    rewards, gids = batch
    got = compute_advantages(
        torch.tensor(rewards, dtype=torch.float64),
        gids,
        "qae",
        k=k,
        quantile_method=method,
        scale=scale,
    )
    assert_close(got, ref_advantages(rewards, gids, "qae", k=k, method=method, scale=scale))


@SETTINGS
@given(ragged_batches(), st.sampled_from(["grpo", "qae", "drgrpo"]))
def test_batch_scale_matches_reference(batch, estimator):
    rewards, gids = batch
    got = compute_advantages(
        torch.tensor(rewards, dtype=torch.float64), gids, estimator, scale="batch"
    )
    assert_close(got, ref_advantages(rewards, gids, estimator, scale="batch"))


@SETTINGS
@given(ragged_batches(), st.sampled_from(["grpo", "qae", "rloo"]))
def test_float32_input_matches_reference(batch, estimator):
    rewards, gids = batch
    r32 = torch.tensor(rewards, dtype=torch.float32)
    got = compute_advantages(r32, gids, estimator)
    assert got.dtype == torch.float32
    want = ref_advantages(r32.double().tolist(), gids, estimator, dtype=torch.float32)
    assert_close(got, want, tol=2e-5)


@SETTINGS
@given(
    ragged_batches(), ks, st.sampled_from(TORCH_METHODS), st.sampled_from(["float32", "float64"])
)
def test_torch_methods_match_torch_quantile_exactly(batch, k, method, dtype_name):
    rewards, gids = batch
    dtype = getattr(torch, dtype_name)
    r = torch.tensor(rewards, dtype=dtype)
    got = group_quantile(r, gids, k, method=method)
    for i, g in enumerate(gids):
        members = torch.tensor([rewards[j] for j in range(len(gids)) if gids[j] == g], dtype=dtype)
        want = torch.quantile(members, k, interpolation=method)
        assert got[i].item() == want.item(), (i, method, k)


@SETTINGS
@given(ragged_batches(binary=False), ks)
def test_inverted_cdf_matches_numpy_away_from_ties(batch, k):
    rewards, gids = batch
    got = group_quantile(torch.tensor(rewards, dtype=torch.float64), gids, k)
    for i, g in enumerate(gids):
        members = np.array([rewards[j] for j in range(len(gids)) if gids[j] == g])
        n = len(members)
        if abs(n * k - round(n * k)) < 1e-6:
            continue  # numpy follows the float roundoff of n*K here; we read K as decimal
        assert got[i].item() == np.quantile(members, k, method="inverted_cdf")


def test_reference_release_example_g8_k04():
    # G=8, K=0.4, 5 of 8 correct: torch.quantile's rank is 0.4 * 7 = 2.8 into the sorted
    # [0,0,0,1,1,1,1,1], between x_2 = 0 and x_3 = 1, so linear gives 0.8; the paper's
    # quantile is x_(ceil(8*0.4)) = x_(4) (1-based) = 1.
    r = torch.tensor([1.0] * 5 + [0.0] * 3)
    assert group_quantile(r, [0] * 8, 0.4, method="linear")[0].item() == pytest.approx(0.8)
    assert group_quantile(r, [0] * 8, 0.4)[0].item() == 1.0


# --------------------------------------------------------------------------------------
# Invariances


@SETTINGS
@given(ragged_batches(), st.sampled_from(["grpo", "drgrpo", "rloo", "qae"]), st.randoms())
def test_permutation_permutes_advantages(batch, estimator, rnd):
    rewards, gids = batch
    perm = list(range(len(rewards)))
    rnd.shuffle(perm)
    r = torch.tensor(rewards, dtype=torch.float64)
    a = compute_advantages(r, gids, estimator)
    b = compute_advantages(r[perm], [gids[i] for i in perm], estimator)
    # Sums run in another order, so allow float64 roundoff; zeros stay exact.
    torch.testing.assert_close(a[perm], b, rtol=1e-12, atol=1e-12)
    assert torch.equal(a[perm] == 0, b == 0)


@SETTINGS
@given(ragged_batches(), st.sampled_from(["grpo", "qae"]), st.floats(-100, 100))
def test_group_shift_invariance(batch, estimator, shift):
    rewards, gids = batch
    target = gids[0]
    shifted = [r + shift if g == target else r for r, g in zip(rewards, gids, strict=True)]
    a = compute_advantages(torch.tensor(rewards, dtype=torch.float64), gids, estimator)
    b = compute_advantages(torch.tensor(shifted, dtype=torch.float64), gids, estimator)
    torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


# --------------------------------------------------------------------------------------
# The two-regime gate with binary rewards


def _check_gate(g: int, k: float, hard_when) -> None:
    # One batch holds a group for every success count c in 0..G.
    rewards, gids = [], []
    for c in range(g + 1):
        rewards += [1.0] * c + [0.0] * (g - c)
        gids += [c] * g
    adv = compute_advantages(torch.tensor(rewards, dtype=torch.float64), gids, "qae", k=k)
    for c in range(1, g):
        a = adv[c * g : (c + 1) * g]
        succ, fail = a[:c], a[c:]
        if hard_when(c):
            assert torch.all(fail == 0) and torch.all(succ > 0), (g, k, c)
        else:
            assert torch.all(succ == 0) and torch.all(fail < 0), (g, k, c)
    assert torch.all(adv[:g] == 0) and torch.all(adv[-g:] == 0)  # degenerate groups


@pytest.mark.parametrize("g", range(2, 65))
def test_binary_gate_on_decimal_k_grid(g):
    for i in range(1, 20):
        k = Fraction(i, 20)  # K = 0.05 .. 0.95; hard iff p <= 1 - K, in exact arithmetic
        _check_gate(g, float(k), lambda c, g=g, k=k: Fraction(c, g) <= 1 - k)


@settings(max_examples=200, deadline=None)
@given(st.integers(2, 64), ks)
def test_binary_gate_for_any_k(g, k):
    _check_gate(g, k, lambda c: c / g <= 1 - k + 1e-9)


def test_binary_zero_fraction_at_paper_operating_point():
    # G=16, K=0.4: every response but the minority side of its group gets exactly zero.
    rng = np.random.default_rng(0)
    p = rng.uniform(size=512)
    rewards = torch.tensor((rng.uniform(size=(512, 16)) < p[:, None]).astype(float)).flatten()
    gids = torch.arange(512).repeat_interleave(16)
    adv = compute_advantages(rewards, gids, "qae", k=0.4)
    r = rewards.view(512, 16)
    c = r.sum(1)
    hard = c <= 16 * 0.6
    nonzero_want = torch.where(hard, c, 16 - c)
    nonzero_want = torch.where((c == 0) | (c == 16), torch.zeros_like(c), nonzero_want)
    assert int((adv != 0).sum()) == int(nonzero_want.sum())


# --------------------------------------------------------------------------------------
# Semantics


def test_all_equal_groups_are_exactly_zero():
    # 0.1 cannot be summed exactly; a naive mean leaves float residue that std scaling blows up.
    for estimator in ["grpo", "drgrpo", "rloo", "qae"]:
        for dtype in (torch.float32, torch.float64):
            r = torch.full((4096,), 0.1, dtype=dtype)
            gids = torch.arange(4096) // 1024
            adv = compute_advantages(r, gids, estimator, eps=0.0)
            assert torch.all(adv == 0), estimator


def test_singleton_zero_and_raw():
    r = torch.tensor([0.7, 1.0, 0.0, -2.0])
    gids = ["a", "b", "b", "c"]
    for est in ["grpo", "drgrpo", "rloo", "qae"]:
        zero = compute_advantages(r, gids, est)
        assert zero[0] == 0 and zero[3] == 0
        raw = compute_advantages(r, gids, est, singleton="raw")
        assert raw[0] == pytest.approx(0.7) and raw[3] == -2.0  # verl: baseline 0, std 1
        assert torch.equal(zero[1:3], raw[1:3])


def test_nan_raises_with_index():
    r = torch.tensor([1.0, 0.0, float("nan"), 1.0])
    with pytest.raises(ValueError, match=r"rewards\[2\] is NaN"):
        compute_advantages(r, [0, 0, 1, 1])


def test_nan_unscorable_is_excluded_and_zero():
    r = torch.tensor([1.0, float("nan"), 0.0, 0.0, float("nan"), 1.0])
    gids = [0, 0, 0, 0, 1, 1]
    adv = compute_advantages(r, gids, "grpo", nan="unscorable")
    # group 0 without the NaN is [1, 0, 0]; group 1 becomes a singleton.
    want = compute_advantages(torch.tensor([1.0, 0.0, 0.0]), [0, 0, 0], "grpo")
    assert adv[1] == 0 and adv[4] == 0 and adv[5] == 0
    torch.testing.assert_close(adv[[0, 2, 3]], want)
    all_nan = compute_advantages(torch.full((3,), float("nan")), [0, 0, 0], nan="unscorable")
    assert torch.equal(all_nan, torch.zeros(3))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(rewards=[0.0, float("inf")]), r"rewards\[1\] = inf is infinite"),
        (dict(rewards=[0.0, float("-inf")]), r"rewards\[1\] = -inf is infinite"),
        (dict(group_ids=[0, 0, 0]), r"length mismatch: rewards has 2 entries, group_ids has 3"),
        (dict(group_ids=torch.tensor([0])), r"length mismatch"),
        (dict(group_ids=np.array(["a"])), r"length mismatch"),
        (dict(k=0.0), r"k must be a number in \(0, 1\), got k=0.0"),
        (dict(k=1.0), r"k=1.0"),
        (dict(k=-0.2), r"k=-0.2"),
        (dict(k=float("nan")), r"k=nan"),
        (dict(k=True), r"k=True"),
        (dict(k="0.4"), r"k='0.4'"),
        (dict(estimator="gae"), r"unknown advantage estimator estimator='gae'; known: drgrpo"),
        (dict(quantile_method="cubic"), r"unknown quantile_method='cubic'; expected one of"),
        (dict(scale="global"), r"unknown scale='global'"),
        (dict(singleton="one"), r"unknown singleton='one'"),
        (dict(nan="ignore"), r"unknown nan='ignore'"),
        (dict(eps=-1.0), r"eps must be a finite number >= 0, got -1.0"),
        (dict(rewards=[[0.0, 1.0]]), r"rewards must be a 1-D tensor \[B\], got shape \(1, 2\)"),
        (dict(group_ids=[[0], [1]]), r"group_ids\[0\] = \[0\] is not hashable"),
        (dict(group_ids=torch.tensor([0.0, float("nan")])), r"group_ids\[1\] is NaN"),
        (dict(group_ids=[0.0, float("nan")]), r"group_ids\[1\] is NaN"),
        (dict(group_ids=["a", float("nan")]), r"group_ids\[1\] is NaN"),
    ],
)
def test_bad_inputs_raise_helpfully(kwargs, match):
    args = dict(rewards=[0.0, 1.0], group_ids=[0, 0])
    args.update(kwargs)
    rewards = torch.tensor(args.pop("rewards"))
    with pytest.raises(ValueError, match=match):
        compute_advantages(rewards, args.pop("group_ids"), **args)


def test_empty_batch_and_dtypes():
    for dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        out = compute_advantages(torch.zeros(0, dtype=dtype), [])
        assert out.shape == (0,) and out.dtype == dtype
        out = compute_advantages(torch.tensor([0.0, 1.0, 1.0], dtype=dtype), [0, 0, 0])
        assert out.dtype == dtype
    ints = compute_advantages(torch.tensor([0, 1, 1]), [0, 0, 0])
    assert ints.dtype == torch.get_default_dtype()


def test_group_id_containers_agree():
    rng = random.Random(0)
    n = 200
    labels = [rng.randrange(30) for _ in range(n)]
    r = torch.tensor([float(rng.random() < 0.4) for _ in range(n)])
    want = compute_advantages(r, torch.tensor(labels))
    containers = [
        np.array(labels),
        np.array(labels, dtype=np.uint32),
        labels,
        [f"uid-{x}" for x in labels],
        np.array([f"uid-{x}" for x in labels], dtype=object),  # verl's uid array
        np.array([f"uid-{x}" for x in labels]),
        [(x, "p") for x in labels],
        [float(x) for x in labels],
        torch.tensor(labels, dtype=torch.float32),
        [str(x) if x % 2 else x for x in labels],  # mixed, unorderable types
    ]
    for ids in containers:
        assert torch.equal(compute_advantages(r, ids), want), type(ids)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_sort_paths_agree(dtype):
    # float32-sized rewards with small keys take the one-sort path; others two sorts.
    rng = np.random.default_rng(1)
    r = torch.tensor(rng.normal(size=3000) * 3, dtype=dtype)
    small = torch.tensor(rng.integers(0, 200, size=3000))
    big = small * (2**40) - 2**45  # negative and huge keys force the general path
    for method in QUANTILE_METHODS:
        a = compute_advantages(r, small, "qae", k=0.3, quantile_method=method)
        b = compute_advantages(r, big, "qae", k=0.3, quantile_method=method)
        assert torch.equal(a, b), method
        want = ref_advantages(
            r.double().tolist(),
            small.tolist(),
            "qae",
            k=0.3,
            method=method,
            dtype=torch.float32 if dtype != torch.float64 else dtype,
        )
        assert_close(b, want, tol=1e-2 if dtype.itemsize == 2 else 1e-5)


def test_rloo_and_drgrpo_formulas_on_hand_example():
    # Group [1, 0, 0, 1]: mean 0.5; leave-one-out baselines 1/3, 2/3, 2/3, 1/3.
    r = torch.tensor([1.0, 0.0, 0.0, 1.0], dtype=torch.float64)
    g = [0, 0, 0, 0]
    torch.testing.assert_close(
        compute_advantages(r, g, "rloo"), torch.tensor([2 / 3, -2 / 3, -2 / 3, 2 / 3]).double()
    )
    torch.testing.assert_close(
        compute_advantages(r, g, "drgrpo"), torch.tensor([0.5, -0.5, -0.5, 0.5]).double()
    )
    # std of [1,0,0,1] is sqrt(1/3); grpo = ±0.5 / sqrt(1/3) = ±sqrt(3)/2.
    s = math.sqrt(3) / 2
    torch.testing.assert_close(
        compute_advantages(r, g, "grpo", eps=0.0), torch.tensor([s, -s, -s, s]).double()
    )


def test_public_api_is_reexported():
    assert qae.compute_advantages is compute_advantages
    assert {"qae", "grpo", "drgrpo", "rloo"} <= set(estimators.names())


# --------------------------------------------------------------------------------------
# Statistics and helpers


@SETTINGS
@given(ragged_batches(min_size=1), ks)
def test_stats_agree_with_counting(batch, k):
    rewards, gids = batch
    r = torch.tensor(rewards, dtype=torch.float64)
    adv = compute_advantages(r, gids, "qae", k=k)
    s = advantage_stats(adv, r, gids, k=k)
    n = len(rewards)
    assert s["frac_zero_adv"] == pytest.approx(int((adv == 0).sum()) / n)
    assert s["frac_pos_adv"] == pytest.approx(int((adv > 0).sum()) / n)
    assert s["frac_neg_adv"] + s["frac_pos_adv"] + s["frac_zero_adv"] == pytest.approx(1.0)
    groups = defaultdict(list)
    for v, g in zip(rewards, gids, strict=True):
        groups[g].append(v)
    assert s["num_groups"] == len(groups)
    assert s["singleton_groups"] == sum(len(v) == 1 for v in groups.values())
    degenerate = [v for v in groups.values() if len(v) > 1 and len(set(v)) == 1]
    assert s["degenerate_groups"] == len(degenerate)
    assert s["all_success_groups"] == sum(v[0] > 0 for v in degenerate)
    assert s["all_fail_groups"] == sum(v[0] <= 0 for v in degenerate)
    live = [v for v in groups.values() if len(set(v)) > 1]
    assert s["hard_groups"] + s["easy_groups"] + s["mixed_groups"] == len(live)
    assert s["success_rate"] == pytest.approx(sum(v > 0 for v in rewards) / n)
    if set(rewards) <= {0.0, 1.0}:
        hard = sum(1 for v in live if sum(v) / len(v) <= 1 - k + 1e-9)
        assert s["hard_groups"] == hard and s["mixed_groups"] == 0


def test_stats_on_empty_and_unscorable():
    s = advantage_stats(torch.zeros(0), torch.zeros(0), [])
    assert s["frac_zero_adv"] == 0.0 and s["num_groups"] == 0
    r = torch.tensor([1.0, float("nan"), 0.0])
    adv = compute_advantages(r, [0, 0, 0], nan="unscorable")
    s = advantage_stats(adv, r, [0, 0, 0], nan="unscorable")
    assert s["unscorable"] == 1 and s["num_groups"] == 1 and s["hard_groups"] == 1


def test_broadcast_to_tokens():
    adv = torch.tensor([1.0, -2.0])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    out = broadcast_to_tokens(adv, mask)
    assert torch.equal(out, torch.tensor([[1.0, 1.0, 0.0], [-2.0, 0.0, 0.0]]))
    with pytest.raises(ValueError, match=r"response_mask must be \[B, T\] with B=2"):
        broadcast_to_tokens(adv, torch.ones(3, 4))
    with pytest.raises(ValueError, match=r"advantages must be \[B\]"):
        broadcast_to_tokens(adv[None], mask)


def test_register_custom_estimator_and_conflicts():
    @register_estimator("test-median", scale="none", needs_sort=True)
    def median(groups, *, k, quantile_method):
        return groups.quantile(0.5, "lower")[groups.codes]

    r = torch.tensor([0.0, 1.0, 5.0, 2.0], dtype=torch.float64)
    adv = compute_advantages(r, [0, 0, 0, 0], "test-median")
    torch.testing.assert_close(adv, r - 1.0)  # lower median of [0,1,2,5] is 1
    register_estimator("test-median", scale="none", needs_sort=True)(median)  # same: no-op
    with pytest.raises(ValueError, match="already registered"):
        register_estimator("test-median", scale="group")(median)
    with pytest.raises(ValueError, match="unknown scale='bogus'"):
        register_estimator("x", scale="bogus")


@SETTINGS
@given(ragged_batches(), st.sampled_from(QUANTILE_METHODS), st.randoms())
def test_per_group_k_equals_separate_calls(batch, method, rnd):
    rewards, gids = batch
    r = torch.tensor(rewards, dtype=torch.float64)
    group_k = {g: rnd.choice([0.2, 0.4, 0.6, 0.8]) for g in set(gids)}
    k = torch.tensor([group_k[g] for g in gids], dtype=torch.float64)
    got = compute_advantages(r, gids, "qae", k=k, quantile_method=method)
    for g, kg in group_k.items():
        rows = [i for i, x in enumerate(gids) if x == g]
        alone = compute_advantages(r[rows], [g] * len(rows), "qae", k=kg, quantile_method=method)
        torch.testing.assert_close(got[rows], alone, rtol=1e-12, atol=1e-12)
    stats = advantage_stats(got, r, gids, k=k, quantile_method=method)
    assert stats["frac_zero_adv"] == pytest.approx(float((got == 0).double().mean()))


def test_per_group_k_errors():
    r = torch.tensor([0.0, 1.0, 1.0, 0.0])
    with pytest.raises(ValueError, match="same for every response of a group"):
        compute_advantages(r, [0, 0, 1, 1], k=torch.tensor([0.2, 0.4, 0.4, 0.4]))
    with pytest.raises(ValueError, match=r"k must be in \(0, 1\), got k\[2\]=1.0"):
        compute_advantages(r, [0, 0, 1, 1], k=torch.tensor([0.2, 0.2, 1.0, 1.0]))
    with pytest.raises(ValueError, match=r"k as a tensor must be \[B\] \(B=4\)"):
        compute_advantages(r, [0, 0, 1, 1], k=torch.tensor([0.2, 0.2]))
    # NaN rows are dropped before grouping, their K with them: no conflict here
    r_nan = torch.tensor([0.0, float("nan"), 1.0, 0.0])
    k = torch.tensor([0.2, 0.9, 0.4, 0.4])
    assert compute_advantages(r_nan, [0, 0, 1, 1], k=k, nan="unscorable")[1] == 0


@SETTINGS
@given(ragged_batches(), st.sampled_from(["grpo", "qae", "rloo", "drgrpo"]), ks)
def test_keep_ablations_zero_exactly_the_right_entries(batch, estimator, k):
    rewards, gids = batch
    r = torch.tensor(rewards, dtype=torch.float64)
    full = compute_advantages(r, gids, estimator, k=k)
    pos = compute_advantages(r, gids, estimator, k=k, keep="pos")
    neg = compute_advantages(r, gids, estimator, k=k, keep="neg")
    assert torch.equal(pos, torch.where(full > 0, full, torch.zeros_like(full)))
    assert torch.equal(neg, torch.where(full < 0, full, torch.zeros_like(full)))
    assert torch.equal(pos + neg, full)
    gated = compute_advantages(r, gids, estimator, k=k, keep="gate")
    q = group_quantile(r, gids, k)
    for i, g in enumerate(gids):
        members = [rewards[j] for j in range(len(gids)) if gids[j] == g]
        if q[i] == min(members) and len(set(members)) > 1:  # hard: successes only
            assert gated[i] == max(full[i], 0)
        elif q[i] == max(members):  # easy: failures only
            assert gated[i] == min(full[i], 0)
        else:
            assert gated[i] == full[i]


def test_gate_on_qae_changes_nothing_for_binary_rewards():
    # QAE's own gate already zeroes the dropped side with binary rewards.
    rng = np.random.default_rng(3)
    r = torch.tensor((rng.uniform(size=(64, 8)) < rng.uniform(size=(64, 1))).astype(float))
    r = r.flatten()
    gids = torch.arange(64).repeat_interleave(8)
    assert torch.equal(
        compute_advantages(r, gids, "qae", keep="gate"), compute_advantages(r, gids, "qae")
    )
    with pytest.raises(ValueError, match="unknown keep='both'"):
        compute_advantages(r, gids, keep="both")
