"""Tests for the entropy diagnostics."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from qae.core.advantages import group_regimes
from qae.core.diagnostics import (
    covariance_parts,
    entropy_histogram,
    entropy_verdict,
    length_volatility,
    regime_token_masks,
    reward_verdict,
    sign_token_masks,
    token_views,
    tracking,
)
from qae.core.entropy import entropy_change_predictor


@settings(max_examples=50, deadline=None)
@given(st.integers(1, 6), st.integers(1, 5), st.integers(0, 10_000))
def test_parts_sum_to_the_total_and_match_the_predictor(b, t, seed):
    g = torch.Generator().manual_seed(seed)
    logp = -torch.rand(b, t, generator=g, dtype=torch.float64) * 3
    adv = torch.randint(-1, 2, (b, 1), generator=g).double().expand(b, t) * 1.5
    mask = (torch.rand(b, t, generator=g) < 0.8).double()
    signs = covariance_parts(logp, adv, mask, sign_token_masks(adv, mask))
    assert signs["pos"] + signs["neg"] + signs["zero"] == pytest.approx(signs["total"], abs=1e-12)
    regimes = covariance_parts(
        logp,
        adv,
        mask,
        regime_token_masks(["hard", "easy", "other"] * 2, mask[:6])
        if b == 6
        else regime_token_masks(["hard"] * b, mask),
    )
    assert sum(regimes[k] for k in ("hard", "easy", "other")) == pytest.approx(
        regimes["total"], abs=1e-12
    )
    if mask.sum() > 0:
        assert signs["total"] == pytest.approx(
            float(entropy_change_predictor(logp, adv, mask)), abs=1e-9
        )


def test_covariance_by_hand():
    # tokens (logp, A): (-1, 1), (-3, -1); means -2, 0; cov = ((1)(1) + (-1)(-1)) / 2 = 1
    logp = torch.tensor([[-1.0], [-3.0]])
    adv = torch.tensor([[1.0], [-1.0]])
    mask = torch.ones(2, 1)
    parts = covariance_parts(logp, adv, mask, sign_token_masks(adv, mask))
    assert parts == {"total": 1.0, "pos": 0.5, "neg": 0.5, "zero": 0.0}
    with pytest.raises(ValueError, match=r"logp must be \[B, T\]"):
        covariance_parts(logp[0], adv, mask, {})


def test_token_views_against_direct_computation():
    ent = torch.tensor([[0.1, 2.0, 0.5], [1.5, 0.2, 0.0]])
    adv = torch.tensor([[1.0, 1.0, 1.0], [0.0, 0.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    g = torch.tensor([[1.0, 3.0, 1.0], [0.0, 0.0, 0.0]])
    v = token_views(ent, adv, mask, g, top_frac=0.2)
    assert v["entropy_all"] == pytest.approx((0.1 + 2.0 + 0.5 + 1.5 + 0.2) / 5)
    assert v["entropy_nonzero_adv"] == pytest.approx((0.1 + 2.0 + 0.5) / 3)
    # top 20% of 5 valid tokens = 1 token: entropy 2.0, carrying 3 of the norm's 5
    assert v["grad_share_top_entropy"] == pytest.approx(3 / 5)


def test_histogram_and_volatility():
    ent = torch.tensor([[0.0, 0.5, 1.0, 9.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    h = entropy_histogram(ent, mask, bins=2, max_entropy=1.0)
    assert h["counts"] == [1.0, 2.0] and h["edges"] == [0.0, 0.5, 1.0]
    assert length_volatility([1, 2, 3], window=20) == pytest.approx(1.0)
    assert length_volatility([5, 1, 2, 3], window=3) == pytest.approx(1.0)
    assert length_volatility([4]) == 0.0
    with pytest.raises(ValueError, match="window must be >= 2"):
        length_volatility([1, 2], window=1)


def test_tracking_on_a_known_series():
    measured = [0.1, -0.2, 0.3, -0.4, 0.5]
    perfect = tracking([2 * x for x in measured], measured)
    assert perfect["corr"] == pytest.approx(1.0) and perfect["sign_agreement"] == 1.0
    flipped = tracking([-x for x in measured], measured)
    assert flipped["corr"] == pytest.approx(-1.0) and flipped["sign_agreement"] == 0.0
    half = tracking([1, 1, 1, 1], [1, -1, 1, -1])
    assert math.isnan(half["corr"]) and half["sign_agreement"] == 0.5
    with pytest.raises(ValueError, match="predicted has 1 values"):
        tracking([1], [1, 2])


def test_group_regimes_binary():
    r = torch.tensor([1.0, 0, 0, 0, 1, 1, 1, 0, 1, 1, float("nan"), 7.0])
    g = [0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 3]
    assert group_regimes(r, g, k=0.4) == ["hard"] * 4 + ["easy"] * 4 + ["other"] * 4


def test_entropy_verdict():
    stable = [1.0, 0.8, 0.6, 0.45, 0.7, 1.2, 1.9] * 5  # dips below half, never for 10 steps
    assert entropy_verdict(stable)["verdict"] == "stable"
    collapse = [1.0] * 5 + [0.4] * 9 + [0.6] + [0.3] * 10
    v = entropy_verdict(collapse)
    assert v["verdict"] == "collapsed" and v["step"] == 15
    explode = [1.0] * 3 + [2.5] * 10
    assert entropy_verdict(explode) == {
        "verdict": "exploded",
        "step": 3.0,
        "initial": 1.0,
        "min_ratio": 1.0,
        "max_ratio": 2.5,
    }
    assert entropy_verdict([0.2] * 12, initial=1.0)["verdict"] == "collapsed"
    assert entropy_verdict([0.2] * 12, initial=1.0, window=13)["verdict"] == "stable"
    with pytest.raises(ValueError, match="initial entropy must be > 0"):
        entropy_verdict([0.0, 1.0])
    with pytest.raises(ValueError, match="empty"):
        entropy_verdict([])


def test_reward_verdict():
    # Single steps far below half, but no 10-step mean below it: held.
    noisy = [0.4] + [0.1, 0.5, 0.1, 0.5] * 10
    v = reward_verdict(noisy)
    assert v["verdict"] == "held" and v["step"] == -1.0
    assert v["min_ratio"] == pytest.approx(0.725)  # (0.4 + 5 x 0.1 + 4 x 0.5) / 10 / 0.4
    # A drop to 0.1 from index 5 on: the first window with mean < 0.2 starts at index 2
    # (3 x 0.4 and 7 x 0.1 -> 0.19).
    drop = [0.4] * 5 + [0.1] * 20
    v = reward_verdict(drop)
    assert v["verdict"] == "collapsed" and v["step"] == 2.0
    assert v["min_ratio"] == pytest.approx(0.25)
    # A transient dip that recovers still counts: the reward was lost for a window.
    dip = [0.4] * 5 + [0.0] * 10 + [0.4] * 20
    assert reward_verdict(dip)["verdict"] == "collapsed"
    assert reward_verdict([0.1] * 10, initial=0.4)["verdict"] == "collapsed"
    assert reward_verdict([0.1] * 10, initial=0.4, window=11) == {
        "verdict": "held",
        "step": -1.0,
        "initial": 0.4,
        "min_ratio": pytest.approx(0.25),
    }
    assert reward_verdict([0.3] * 10, initial=0.4, collapse_ratio=0.8)["verdict"] == "collapsed"
    with pytest.raises(ValueError, match="initial accuracy must be > 0"):
        reward_verdict([0.0, 0.5])
    with pytest.raises(ValueError, match="window must be >= 1"):
        reward_verdict([0.5], window=0)
