"""Tests for qae.core.losses: hand-computed cases, gradients, aggregation weights, validation."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from qae.core.losses import (
    AGG_MODES,
    KL_ESTIMATORS,
    BatchCounts,
    LossConfig,
    aggregate_loss,
    batch_counts,
    compute_policy_loss,
    kl_penalty,
    policy_losses,
    register_policy_loss,
)

D = torch.float64


def _t(x) -> torch.Tensor:
    return torch.tensor(x, dtype=D)


def _grad(loss: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    (g,) = torch.autograd.grad(loss, x)
    return g


# --------------------------------------------------------------------------------------
# PPO


def _ppo_case():
    # One row of six tokens, token-mean, clip_low 0.2, clip_high 0.28, dual clip c = 3.
    #  tok  A    r     -A r   -A clip(r)   max    dual min(., -A c)   grad d/dlogp
    #  0   +1   1.5   -1.5   -1.28        -1.28  -                   0 (clipped high)
    #  1   +1   0.5   -0.5   -0.8         -0.5   -                   -A r = -0.5
    #  2   -1   0.5    0.5    0.8          0.8   min(0.8, 3) = 0.8   0 (clipped low)
    #  3   -1   1.5    1.5    1.28         1.5   min(1.5, 3) = 1.5   -A r = 1.5
    #  4   -1   4.0    4.0    1.28         4.0   min(4, 3) = 3       0 (dual clip)
    #  5   -2   2.0    4.0    2.56         4.0   min(4, 6) = 4       -A r = 4
    adv = _t([[1.0, 1.0, -1.0, -1.0, -1.0, -2.0]])
    ratio = _t([[1.5, 0.5, 0.5, 1.5, 4.0, 2.0]])
    old = _t([[-1.0, -2.0, -0.5, -1.5, -3.0, -0.7]])
    logp = (old + ratio.log()).requires_grad_()
    mask = torch.ones(1, 6, dtype=D)
    return logp, old, adv, mask


def test_ppo_hand_computed_with_dual_clip():
    logp, old, adv, mask = _ppo_case()
    cfg = LossConfig(clip_low=0.2, clip_high=0.28, clip_ratio_c=3.0)
    loss, m = compute_policy_loss(logp, old, adv, mask, config=cfg)
    expected = (-1.28 - 0.5 + 0.8 + 1.5 + 3.0 + 4.0) / 6
    assert loss.item() == pytest.approx(expected, abs=1e-12)
    # token-mean: d loss / d logp_t = (per-token derivative) / 6
    g = _grad(loss, logp) * 6
    torch.testing.assert_close(g, _t([[0.0, -0.5, 0.0, 1.5, 0.0, 4.0]]))
    assert m["clipfrac_high"] == pytest.approx(1 / 6)
    assert m["clipfrac_low"] == pytest.approx(1 / 6)
    assert m["clipfrac_dual"] == pytest.approx(1 / 6)
    assert m["ratio_mean"] == pytest.approx((1.5 + 0.5 + 0.5 + 1.5 + 4 + 2) / 6)
    assert m["frac_nonzero_adv"] == 1.0
    assert m["num_tokens"] == 6.0 and m["cov_tokens"] == 0.0
    # approx_kl is the k3 estimate of KL(old || new): mean of r - 1 - log r
    r = torch.tensor([1.5, 0.5, 0.5, 1.5, 4.0, 2.0], dtype=D)
    assert m["approx_kl"] == pytest.approx(float((r - 1 - r.log()).mean()))
    assert m["loss"] == pytest.approx(expected) and m["pg_loss"] == pytest.approx(expected)
    assert all(isinstance(v, float) for v in m.values())


def test_ppo_without_dual_clip_lets_negative_tokens_grow():
    logp, old, adv, mask = _ppo_case()
    loss, m = compute_policy_loss(logp, old, adv, mask, config=LossConfig(clip_ratio_c=None))
    # token 4 keeps -A r = 4 and its gradient 4
    expected = (-1.28 - 0.5 + 0.8 + 1.5 + 4.0 + 4.0) / 6
    assert loss.item() == pytest.approx(expected, abs=1e-12)
    g = _grad(loss, logp) * 6
    torch.testing.assert_close(g, _t([[0.0, -0.5, 0.0, 1.5, 4.0, 4.0]]))
    assert m["clipfrac_dual"] == 0.0


def test_clip_higher_is_asymmetric():
    # A > 0 and r = 1.25: inside 1 + 0.28 (Clip-Higher) but outside symmetric 1 + 0.2.
    old = _t([[-1.0]])
    logp = (old + math.log(1.25)).requires_grad_()
    adv, mask = _t([[1.0]]), torch.ones(1, 1)
    loss_hi, m_hi = compute_policy_loss(logp, old, adv, mask, config=LossConfig())
    loss_sym, m_sym = compute_policy_loss(
        logp, old, adv, mask, config=LossConfig(clip_low=0.2, clip_high=0.2)
    )
    assert loss_hi.item() == pytest.approx(-1.25) and m_hi["clipfrac_high"] == 0.0
    assert loss_sym.item() == pytest.approx(-1.2) and m_sym["clipfrac_high"] == 1.0
    assert _grad(loss_hi, logp).item() == pytest.approx(-1.25)
    assert _grad(loss_sym, logp).item() == 0.0


# --------------------------------------------------------------------------------------
# GSPO


def _gspo_case():
    # Response 0: token log-ratios 0.1, 0.3 -> sequence log-ratio 0.2, s0 = e^0.2; A = +1.
    # Response 1: one token, log-ratio -0.001, s1 = e^-0.001; A = -1. Token 2 of row 1 pads.
    old = _t([[-1.0, -2.0], [-0.5, 0.0]])
    logp = (old + _t([[0.1, 0.3], [-0.001, 0.0]])).requires_grad_()
    adv = _t([1.0, -1.0])
    mask = _t([[1.0, 1.0], [1.0, 0.0]])
    return logp, old, adv, mask


def test_gspo_hand_computed_paper_clip_range():
    logp, old, adv, mask = _gspo_case()
    loss, m = compute_policy_loss(logp, old, adv, mask, config=LossConfig(loss="gspo"))
    # s0 = 1.2214 > 1 + 4e-4: clipped, -1.0004; s1 = 0.9990 < 1 - 3e-4: clipped, 0.9997.
    # seq-mean-token-mean over S = 2 responses.
    assert loss.item() == pytest.approx((-(1 + 4e-4) + (1 - 3e-4)) / 2, abs=1e-12)
    assert torch.count_nonzero(_grad(loss, logp)) == 0
    assert m["clipfrac_high"] == pytest.approx(2 / 3)  # both tokens of response 0
    assert m["clipfrac_low"] == pytest.approx(1 / 3)


def test_gspo_gradient_equals_sequence_objective():
    logp, old, adv, mask = _gspo_case()
    cfg = LossConfig(loss="gspo", gspo_clip_low=0.5, gspo_clip_high=0.5)
    loss, m = compute_policy_loss(logp, old, adv, mask, config=cfg)
    s0, s1 = math.exp(0.2), math.exp(-0.001)
    assert loss.item() == pytest.approx((-s0 + s1) / 2, abs=1e-12)
    assert m["clipfrac_high"] == 0.0 and m["clipfrac_low"] == 0.0
    # d/dlogp of -(1/2)(s0 A0 + s1 A1) with s_i = exp(mean_t log r): response 0 tokens
    # get -s0 / 2 / 2, response 1 gets +s1 / 2, padding 0.
    torch.testing.assert_close(_grad(loss, logp), _t([[-s0 / 4, -s0 / 4], [s1 / 2, 0.0]]))


@settings(max_examples=25, deadline=None)
@given(
    lengths=st.lists(st.integers(1, 5), min_size=1, max_size=4),
    seed=st.integers(0, 2**31 - 1),
)
def test_gspo_matches_sequence_level_reference(lengths, seed):
    gen = torch.Generator().manual_seed(seed)
    b, t = len(lengths), max(lengths)
    mask = (torch.arange(t)[None, :] < torch.tensor(lengths)[:, None]).to(D)
    old = -torch.rand(b, t, generator=gen, dtype=D) * 3
    logp = (old + (torch.rand(b, t, generator=gen, dtype=D) - 0.5) * 0.4).requires_grad_()
    adv = torch.randn(b, generator=gen, dtype=D)
    cfg = LossConfig(loss="gspo", gspo_clip_low=0.05, gspo_clip_high=0.08)
    loss, _ = compute_policy_loss(logp, old, adv, mask, config=cfg)
    # Reference: -(1/B) sum_i min(s_i A_i, clip(s_i) A_i), s_i with its full gradient.
    s = torch.exp(((logp - old) * mask).sum(-1) / mask.sum(-1))
    ref = -torch.minimum(s * adv, s.clamp(0.95, 1.08) * adv).mean()
    torch.testing.assert_close(loss, ref)
    torch.testing.assert_close(_grad(loss, logp), _grad(ref, logp))


# --------------------------------------------------------------------------------------
# Clip-Cov and KL-Cov


def test_clip_cov_drops_the_single_eligible_token():
    # r = 1 everywhere (no PPO clip). logp = [0, 0, -2, -2] -> centred [1, 1, -1, -1];
    # A = [3, -1, -1, -1] -> centred A itself (mean 0). Covariances: [3, -1, 1, 1].
    # Only token 0 lies strictly inside (1, 5); N = 4, ratio 0.25 -> pick 1.
    old = _t([[0.0, 0.0, -2.0, -2.0]])
    logp = old.clone().requires_grad_()
    adv, mask = _t([[3.0, -1.0, -1.0, -1.0]]), torch.ones(1, 4, dtype=D)
    cfg = LossConfig(loss="clip_cov", clip_cov_ratio=0.25)
    loss, m = compute_policy_loss(logp, old, adv, mask, config=cfg)
    ppo, _ = compute_policy_loss(logp, old, adv, mask, config=LossConfig(loss="ppo"))
    assert m["cov_tokens"] == 1.0
    # per-token PPO losses -A r = [-3, 1, 1, 1]; token 0 dropped, N = 4 still
    assert ppo.item() == pytest.approx(0.0) and loss.item() == pytest.approx(0.75)
    # ppo gradient -A r / N = [-3, 1, 1, 1] / 4; token 0 dropped
    torch.testing.assert_close(_grad(loss, logp), _t([[0.0, 0.25, 0.25, 0.25]]))


def test_clip_cov_random_choice_is_seeded_and_excludes_clipped_tokens():
    # Covariances [2, -2, -2, 2] (logp centred [1, 1, -1, -1], A = [2, -2, 2, -2]):
    # tokens 0 and 3 are eligible, one is picked at random.
    old = _t([[0.0, 0.0, -2.0, -2.0]])
    logp = old.clone().requires_grad_()
    adv, mask = _t([[2.0, -2.0, 2.0, -2.0]]), torch.ones(1, 4, dtype=D)
    cfg = LossConfig(loss="clip_cov", clip_cov_ratio=0.25)
    picked = set()
    for seed in range(20):
        loss, m = compute_policy_loss(
            logp, old, adv, mask, config=cfg, generator=torch.Generator().manual_seed(seed)
        )
        g = _grad(loss, logp)
        zero = {i for i in range(4) if g[0, i] == 0}
        assert len(zero) == 1 and zero <= {0, 3} and m["cov_tokens"] == 1.0
        again, _ = compute_policy_loss(
            logp, old, adv, mask, config=cfg, generator=torch.Generator().manual_seed(seed)
        )
        assert torch.equal(_grad(again, logp), g)
        picked |= zero
    assert picked == {0, 3}
    # Push token 0 past 1 + clip_high and token 3 below 1 - clip_low: A < 0 there, so it
    # is clipped low; no eligible token is left.
    logp2 = (old + _t([[0.5, 0.0, 0.0, -0.5]])).requires_grad_()
    # covariances of the shifted logp: still > 1 for tokens 0 and 3 (centred [1.5, 1, -1,
    # -1.5] times [2, -2, 2, -2] -> [3, -2, -2, 3])
    _, m2 = compute_policy_loss(logp2, old, adv, mask, config=cfg)
    assert m2["clipfrac_high"] == 0.25 and m2["clipfrac_low"] == 0.25
    assert m2["cov_tokens"] == 0.0


def test_kl_cov_penalises_top_covariance_token_without_ratio_clip():
    # log-ratio 0.1 everywhere; logp = old + 0.1 = [0.1, 0.1, -1.9, -1.9] (centred
    # [1, 1, -1, -1]), A = [3, -1, -1, -1]: covariances [3, -1, 1, 1]; top 1 = token 0.
    old = _t([[0.0, 0.0, -2.0, -2.0]])
    logp = (old + 0.1).requires_grad_()
    adv, mask = _t([[3.0, -1.0, -1.0, -1.0]]), torch.ones(1, 4, dtype=D)
    cfg = LossConfig(loss="kl_cov", kl_cov_ratio=0.25, kl_cov_coef=1.0, clip_high=0.01)
    loss, m = compute_policy_loss(logp, old, adv, mask, config=cfg)
    r = math.exp(0.1)
    # per token: -A r, plus |0.1| on token 0; no clip although r > 1 + clip_high
    expected = (-3 * r + 0.1 + r + r + r) / 4
    assert loss.item() == pytest.approx(expected, abs=1e-12)
    torch.testing.assert_close(_grad(loss, logp), _t([[(-3 * r + 1) / 4, r / 4, r / 4, r / 4]]))
    assert m["cov_tokens"] == 1.0
    assert m["clipfrac_high"] == 0.25  # diagnostic: a PPO clip would have clipped token 0


def test_kl_cov_count_follows_ratio():
    gen = torch.Generator().manual_seed(0)
    old = -torch.rand(8, 50, generator=gen, dtype=D)
    logp = old + 0.05 * torch.randn(8, 50, generator=gen, dtype=D)
    adv = torch.randn(8, generator=gen, dtype=D)
    mask = torch.ones(8, 50, dtype=D)
    for ratio, n in [(2e-4, 1), (0.01, 4), (0.02, 8)]:
        _, m = compute_policy_loss(
            logp, old, adv, mask, config=LossConfig(loss="kl_cov", kl_cov_ratio=ratio)
        )
        assert m["cov_tokens"] == n  # max(floor(400 * ratio), 1)


# --------------------------------------------------------------------------------------
# Zero advantages, gradcheck, metrics


@pytest.mark.parametrize("name", ["ppo", "gspo", "clip_cov", "kl_cov"])
@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), dual=st.booleans())
def test_zero_advantages_give_exactly_zero_gradient(name, seed, dual):
    gen = torch.Generator().manual_seed(seed)
    b, t = 4, 6
    old = -torch.rand(b, t, generator=gen) * 4
    logp = (old + torch.randn(b, t, generator=gen) * 0.5).requires_grad_()
    mask = (torch.rand(b, t, generator=gen) < 0.7).float()
    cfg = LossConfig(loss=name, clip_ratio_c=3.0 if dual else None, clip_cov_lb=-1.0)
    loss, m = compute_policy_loss(logp, old, torch.zeros(b, t), mask, config=cfg)
    g = _grad(loss, logp)
    assert torch.equal(g, torch.zeros_like(g))
    assert loss.item() == 0.0
    assert m["frac_nonzero_adv"] == 0.0
    # clip_cov_lb = -1 makes the zero-covariance tokens eligible for Clip-Cov: it drops
    # some, which must not change the (zero) gradient; KL-Cov penalises none.
    assert m["cov_tokens"] == (1.0 if name == "clip_cov" else 0.0)


@pytest.mark.parametrize("name", ["ppo", "gspo", "clip_cov", "kl_cov"])
@pytest.mark.parametrize("agg", AGG_MODES)
def test_gradcheck_float64(name, agg):
    gen = torch.Generator().manual_seed(1)
    b, t = 3, 4
    old = -torch.rand(b, t, generator=gen, dtype=D) * 2
    logp = (old + torch.randn(b, t, generator=gen, dtype=D) * 0.3).requires_grad_()
    ref = -torch.rand(b, t, generator=gen, dtype=D) * 2
    ent = (torch.rand(b, t, generator=gen, dtype=D) + 0.5).requires_grad_()
    # One advantage per response: GSPO's token form has the gradient of its value only then.
    # With this seed the PPO clip is active on one token (high) and GSPO clips response 1
    # (low) and response 2 (high) but not response 0; Clip-Cov and KL-Cov pick one token.
    adv = _t([0.7, -0.9, 1.3])
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0], [1, 0, 0, 0]], dtype=D)
    cfg = LossConfig(
        loss=name,
        agg=agg,
        clip_ratio_c=3.0,
        gspo_clip_low=0.05,
        gspo_clip_high=0.05,
        clip_cov_ratio=0.2,
        clip_cov_lb=0.0,
        kl_cov_ratio=0.2,
        kl_coef=0.1,
        entropy_coef=0.01,
        max_len=6,
    )

    def f(lp, e):
        out, _ = compute_policy_loss(
            lp,
            old,
            adv,
            mask,
            config=cfg,
            ref_logp=ref,
            entropy=e,
            generator=torch.Generator().manual_seed(0),
        )
        return out

    assert torch.autograd.gradcheck(f, (logp, ent))


def test_kl_and_entropy_terms_are_added():
    gen = torch.Generator().manual_seed(2)
    old = -torch.rand(2, 3, generator=gen, dtype=D)
    logp = old + 0.1 * torch.randn(2, 3, generator=gen, dtype=D)
    ref = -torch.rand(2, 3, generator=gen, dtype=D)
    ent = torch.rand(2, 3, generator=gen, dtype=D)
    adv = torch.randn(2, 3, generator=gen, dtype=D)
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]], dtype=D)
    base, m0 = compute_policy_loss(logp, old, adv, mask, config=LossConfig())
    cfg = LossConfig(kl_coef=0.5, kl_estimator="k2", entropy_coef=0.2)
    total, m = compute_policy_loss(logp, old, adv, mask, config=cfg, ref_logp=ref, entropy=ent)
    kl = (0.5 * (ref - logp) ** 2 * mask).sum() / 5
    h = (ent * mask).sum() / 5
    assert total.item() == pytest.approx(base.item() + 0.5 * kl.item() - 0.2 * h.item())
    assert m["pg_loss"] == pytest.approx(m0["pg_loss"])
    assert m["kl_ref"] == pytest.approx(kl.item()) and m["entropy"] == pytest.approx(h.item())
    assert "kl_ref" not in m0 and "entropy" not in m0


def test_padding_garbage_does_not_leak():
    old = _t([[-1.0, float("nan")], [-0.5, -0.7]])
    logp = _t([[-0.9, -math.inf], [-0.6, -0.4]]).requires_grad_()
    adv = _t([[1.0, float("nan")], [-1.0, -1.0]])
    mask = torch.tensor([[True, False], [True, True]])
    for name in policy_losses:
        loss, m = compute_policy_loss(logp, old, adv, mask, config=LossConfig(loss=name))
        g = _grad(loss, logp)
        assert math.isfinite(loss.item()) and bool(torch.isfinite(g).all())
        assert g[0, 1] == 0.0
        assert all(math.isfinite(v) for v in m.values())


# --------------------------------------------------------------------------------------
# Aggregation


def _weights(mode: str, mask: torch.Tensor, **kw) -> torch.Tensor:
    loss_mat = torch.zeros(mask.shape, dtype=D, requires_grad=True)
    return _grad(aggregate_loss(loss_mat, mask, mode, **kw), loss_mat)


def test_aggregation_weights_on_ragged_mask():
    # lengths 1, 3, 0 (empty response), 2: N = 6 tokens, S = 3 non-empty responses.
    mask = torch.tensor([[1, 0, 0, 0], [1, 1, 1, 0], [0, 0, 0, 0], [1, 1, 0, 0]], dtype=D)
    w = _weights("token-mean", mask)
    torch.testing.assert_close(w, mask / 6)
    w = _weights("seq-mean-token-mean", mask)
    per_row = _t([1 / (3 * 1), 1 / (3 * 3), 0.0, 1 / (3 * 2)])
    torch.testing.assert_close(w, mask * per_row[:, None])
    torch.testing.assert_close(_weights("seq-mean-token-sum", mask), mask / 3)
    torch.testing.assert_close(_weights("seq-mean-token-sum-norm", mask), mask / (3 * 4))
    torch.testing.assert_close(_weights("seq-mean-token-sum-norm", mask, max_len=8), mask / (3 * 8))
    # the short response weighs more per token under seq-mean-token-mean
    w = _weights("seq-mean-token-mean", mask)
    assert w[0, 0] > w[3, 0] > w[1, 0]


def test_aggregation_values_and_empty_mask():
    loss_mat = _t([[1.0, 2.0, 3.0], [4.0, 0.0, 0.0]])
    mask = _t([[1, 1, 1], [1, 0, 0]])
    assert aggregate_loss(loss_mat, mask, "token-mean").item() == pytest.approx(10 / 4)
    assert aggregate_loss(loss_mat, mask, "seq-mean-token-mean").item() == pytest.approx(3.0)
    assert aggregate_loss(loss_mat, mask, "seq-mean-token-sum").item() == pytest.approx(5.0)
    assert aggregate_loss(
        loss_mat, mask, "seq-mean-token-sum-norm", max_len=10
    ).item() == pytest.approx(0.5)
    x = loss_mat.clone().requires_grad_()
    for mode in AGG_MODES:
        out = aggregate_loss(x, torch.zeros_like(mask), mode)
        assert out.item() == 0.0 and torch.equal(_grad(out, x), torch.zeros_like(x))


@pytest.mark.parametrize("mode", AGG_MODES)
@settings(max_examples=20, deadline=None)
@given(
    lengths=st.lists(st.integers(0, 6), min_size=2, max_size=8),
    split=st.integers(1, 7),
    seed=st.integers(0, 2**31 - 1),
)
def test_microbatches_with_global_denominator_match_full_batch(mode, lengths, split, seed):
    split = min(split, len(lengths) - 1)
    gen = torch.Generator().manual_seed(seed)
    b, t = len(lengths), 6
    mask = (torch.arange(t)[None, :] < torch.tensor(lengths)[:, None]).to(D)
    x = torch.randn(b, t, generator=gen, dtype=D, requires_grad=True)
    full = aggregate_loss(x, mask, mode, max_len=7)
    counts = batch_counts(mask)
    parts = aggregate_loss(x[:split], mask[:split], mode, max_len=7, denominator=counts)
    parts = parts + aggregate_loss(x[split:], mask[split:], mode, max_len=7, denominator=counts)
    torch.testing.assert_close(parts, full)
    torch.testing.assert_close(_grad(parts, x), _grad(full, x))


def test_policy_loss_microbatches_match_full_batch():
    gen = torch.Generator().manual_seed(3)
    b, t = 6, 5
    old = -torch.rand(b, t, generator=gen, dtype=D) * 2
    logp = (old + 0.3 * torch.randn(b, t, generator=gen, dtype=D)).requires_grad_()
    adv = torch.randn(b, generator=gen, dtype=D)
    mask = (torch.rand(b, t, generator=gen) < 0.8).to(D)
    mask[:, 0] = 1
    for agg in AGG_MODES:
        cfg = LossConfig(agg=agg, clip_ratio_c=3.0)
        full, _ = compute_policy_loss(logp, old, adv, mask, config=cfg)
        counts = batch_counts(mask)
        total = sum(
            compute_policy_loss(logp[s], old[s], adv[s], mask[s], config=cfg, denominator=counts)[0]
            for s in (slice(0, 2), slice(2, 6))
        )
        torch.testing.assert_close(total, full)
        torch.testing.assert_close(_grad(total, logp), _grad(full, logp))


def test_batch_counts_and_numeric_denominator():
    mask = torch.tensor([[1, 1, 0], [0, 0, 0], [1, 0, 0]])
    assert batch_counts(mask) == BatchCounts(tokens=3.0, sequences=2.0)
    x = torch.ones(3, 3, dtype=D)
    assert aggregate_loss(x, mask, "token-mean", denominator=6).item() == pytest.approx(0.5)
    assert aggregate_loss(x, mask, "seq-mean-token-sum", denominator=4.0).item() == 0.75
    with pytest.raises(ValueError, match="denominator"):
        aggregate_loss(x, mask, "token-mean", denominator="6")
    with pytest.raises(ValueError, match="denominator"):
        aggregate_loss(x, mask, "token-mean", denominator=-1)


# --------------------------------------------------------------------------------------
# KL estimators


def test_kl_penalty_hand_values():
    logp, ref = _t([[-1.0, -0.5]]), _t([[-2.0, -0.5]])
    # d = ref - logp = [-1, 0]
    torch.testing.assert_close(kl_penalty(logp, ref, "k1"), _t([[1.0, 0.0]]))
    torch.testing.assert_close(kl_penalty(logp, ref, "k2"), _t([[0.5, 0.0]]))
    torch.testing.assert_close(kl_penalty(logp, ref, "k3"), _t([[math.exp(-1.0), 0.0]]))


@settings(max_examples=40, deadline=None)
@given(
    p=st.lists(st.floats(-3, 3), min_size=2, max_size=6),
    q_shift=st.lists(st.floats(-3, 3), min_size=6, max_size=6),
)
def test_kl_estimators_expectations(p, q_shift):
    # Under samples from pi, E[k1] = E[k3] = KL(pi || ref) exactly; k2, k3 >= 0.
    logp = torch.log_softmax(_t(p), 0)
    ref = torch.log_softmax(_t(q_shift[: len(p)]), 0)
    probs = logp.exp()
    kl = (probs * (logp - ref)).sum()
    for kind in ("k1", "k3"):
        est = (probs * kl_penalty(logp[None], ref[None], kind)[0]).sum()
        assert est.item() == pytest.approx(kl.item(), abs=1e-9)
    assert bool((kl_penalty(logp, ref, "k2") >= 0).all())
    assert bool((kl_penalty(logp, ref, "k3") >= 0).all())


def test_kl_penalty_gradcheck():
    gen = torch.Generator().manual_seed(4)
    logp = torch.randn(2, 3, generator=gen, dtype=D, requires_grad=True)
    ref = torch.randn(2, 3, generator=gen, dtype=D, requires_grad=True)
    for kind in KL_ESTIMATORS:
        assert torch.autograd.gradcheck(lambda a, b, k=kind: kl_penalty(a, b, k), (logp, ref))


# --------------------------------------------------------------------------------------
# Registry and validation


def test_unknown_loss_lists_known_ones():
    x = torch.zeros(1, 2)
    with pytest.raises(ValueError) as err:
        compute_policy_loss(x, x, x, x, config=LossConfig(loss="nope"))
    msg = str(err.value)
    assert "nope" in msg
    for name in ("ppo", "gspo", "clip_cov", "kl_cov"):
        assert name in msg


def test_register_custom_loss():
    def reinforce(logp, old_logp, advantages, mask, *, config, **_):
        loss = aggregate_loss(-advantages * logp, mask, config.agg)
        return loss, {"loss": float(loss.detach())}

    register_policy_loss("test_reinforce")(reinforce)
    try:
        assert "test_reinforce" in policy_losses
        register_policy_loss("test_reinforce")(reinforce)  # same object: no-op
        with pytest.raises(ValueError, match="already registered"):
            register_policy_loss("test_reinforce")(lambda *a, **k: None)
        logp = _t([[-1.0, -2.0]]).requires_grad_()
        loss, _ = compute_policy_loss(
            logp, logp.detach(), _t([[2.0, 2.0]]), torch.ones(1, 2),
            config=LossConfig(loss="test_reinforce"),
        )  # fmt: skip
        assert loss.item() == pytest.approx(3.0)
    finally:
        policy_losses._items.pop("test_reinforce", None)


@pytest.mark.parametrize(
    "field,value",
    [
        ("clip_low", -0.1),
        ("clip_low", 1.0),
        ("clip_high", float("nan")),
        ("clip_ratio_c", 1.0),
        ("clip_ratio_c", 0.5),
        ("agg", "seq-mean"),
        ("max_len", 0),
        ("gspo_clip_high", -1e-4),
        ("clip_cov_ratio", 0.0),
        ("kl_cov_ratio", 1.5),
        ("clip_cov_lb", 6.0),
        ("kl_cov_coef", -1.0),
        ("kl_coef", -0.1),
        ("kl_estimator", "k4"),
        ("entropy_coef", float("inf")),
        ("loss", ""),
    ],
)
def test_config_validation_names_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        LossConfig(**{field: value})


@pytest.mark.parametrize(
    "arg,kwargs",
    [
        ("logp", {"logp": torch.zeros(3)}),
        ("old_logp", {"old_logp": torch.zeros(2, 4)}),
        ("advantages", {"advantages": torch.zeros(3, 3)}),
        ("advantages", {"advantages": torch.zeros(3)}),
        ("mask", {"mask": torch.ones(2, 2)}),
        ("ref_logp", {"ref_logp": torch.zeros(2)}),
        ("entropy", {"entropy": torch.zeros(1, 3)}),
        ("ref_logp", {"config": LossConfig(kl_coef=0.1)}),
        ("entropy", {"config": LossConfig(entropy_coef=0.1)}),
    ],
)
@pytest.mark.parametrize("name", ["ppo", "gspo", "clip_cov", "kl_cov"])
def test_bad_inputs_raise_naming_the_argument(arg, kwargs, name):
    args = {
        "logp": torch.zeros(2, 3),
        "old_logp": torch.zeros(2, 3),
        "advantages": torch.zeros(2, 3),
        "mask": torch.ones(2, 3),
        "config": LossConfig(),
    }
    args.update(kwargs)
    args["config"].loss = name
    fn = policy_losses.get(name)
    with pytest.raises(ValueError, match=arg):
        fn(
            args.pop("logp"),
            args.pop("old_logp"),
            args.pop("advantages"),
            args.pop("mask"),
            **args,
        )


def test_aggregate_and_kl_bad_inputs():
    x = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="mode"):
        aggregate_loss(x, x, "mean")
    with pytest.raises(ValueError, match="mask"):
        aggregate_loss(x, torch.ones(3, 2), "token-mean")
    with pytest.raises(ValueError, match="loss_mat"):
        aggregate_loss(torch.zeros(3), torch.ones(3), "token-mean")
    with pytest.raises(ValueError, match="kind"):
        kl_penalty(x, x, "low_var")
    with pytest.raises(ValueError, match="ref_logp"):
        kl_penalty(x, torch.zeros(3, 2), "k1")
