"""Leaving zero-advantage rows out of the update gives exactly the same gradient."""

from __future__ import annotations

import pytest
import torch

from qae.core.advantages import compute_advantages
from qae.core.losses import AGG_MODES
from qae.io.configtools import apply_overrides
from qae.tasks import make_split
from qae.train.config import TrainConfig
from qae.train.rollout import generate_batch
from qae.train.trainer import load_policy
from qae.train.update import accumulate_gradients, batch_logprobs, scatter_rows, skip_is_exact


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    model, tok = load_policy("builtin", torch.device("cpu"))
    model = model.double()
    records = make_split("validation")[::24][:8]  # 8 prompts over all levels
    batch = generate_batch(
        model,
        tok,
        [r["prompt"] for r in records],
        [r["answer"] for r in records],
        group_size=4,
        temperature=1.0,
        max_new_tokens=4,
    )
    # Rewards with hard, easy and degenerate groups: QAE zeroes most rows.
    pattern = [1, 0, 0, 0, 1, 1, 1, 0, 0, 0, 0, 0, 1, 1, 0, 0] * 2
    rewards = torch.tensor(pattern, dtype=torch.float64)
    batch = batch.with_(rewards=rewards, scores=rewards.clone())
    adv = compute_advantages(rewards, batch.group_ids, "qae", k=0.4)
    assert 0.3 < float((adv == 0).double().mean()) < 0.95
    return model, tok, batch, adv


def _grads(model, batch, adv, cfg, skip, old_logp):
    model.zero_grad(set_to_none=True)
    gen = torch.Generator().manual_seed(0)
    rows = list(range(len(batch)))
    metrics, n_run = accumulate_gradients(
        model, batch, rows, adv, old_logp, None, 0, cfg, torch.device("cpu"), gen, skip=skip
    )
    return (
        [p.grad.clone() if p.grad is not None else None for p in model.parameters()],
        metrics,
        n_run,
    )


@pytest.mark.parametrize("loss", ["ppo", "gspo"])
@pytest.mark.parametrize("agg", AGG_MODES)
def test_skipping_zero_rows_keeps_every_gradient(setup, loss, agg):
    model, tok, batch, adv = setup
    cfg = apply_overrides(
        TrainConfig(),
        {
            "loss.loss": loss,
            "loss.agg": agg,
            "trainer.micro_batch_size": 5,
            "loss.gspo_clip_low": 0.2,
            "loss.gspo_clip_high": 0.28,
            "loss.clip_ratio_c": 3.0,
        },
    )
    # An off-policy old_logp so that clipping is active on some tokens.
    rows = list(range(len(batch)))
    logp, _ = scatter_rows(
        batch_logprobs(model, batch, rows, 0, cfg, torch.device("cpu")), rows, len(batch)
    )
    old = logp.double() + 0.3 * torch.randn(logp.shape, generator=torch.Generator().manual_seed(1))
    full, m_full, n_full = _grads(model, batch, adv, cfg, False, old)
    sparse, m_sparse, n_sparse = _grads(model, batch, adv, cfg, True, old)
    assert n_full == len(batch) and n_sparse == int((adv != 0).sum())
    nonzero = 0
    for g_full, g_sparse in zip(full, sparse, strict=True):
        if g_full is None:
            assert g_sparse is None or torch.all(g_sparse == 0)
            continue
        torch.testing.assert_close(g_sparse, g_full, rtol=1e-6, atol=1e-9)
        nonzero += int(g_full.abs().sum() > 0)
    assert nonzero > 10
    assert m_sparse["loss"] == pytest.approx(m_full["loss"], rel=1e-9, abs=1e-12)


@pytest.mark.parametrize(
    "over",
    [
        {"loss.kl_coef": 0.1},
        {"loss.entropy_coef": 0.01},
        {"loss.loss": "clip_cov"},
        {"loss.loss": "kl_cov"},
        {"trainer.skip_zero_adv": False},
    ],
)
def test_skip_turns_itself_off_where_it_would_not_be_exact(over):
    assert skip_is_exact(TrainConfig())
    assert not skip_is_exact(apply_overrides(TrainConfig(), over))
