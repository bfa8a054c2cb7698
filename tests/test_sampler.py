"""Tests of the cached sampling loop (qae.train.sampler) and the ``sampler`` rollout backend."""

from __future__ import annotations

import math

import pytest
import torch

from qae.tasks import make_split
from qae.tasks.tiny_model import load_tiny_model
from qae.train.rollout import (
    collate,
    concat_batches,
    generate_batch,
    response_logprobs,
    sample_batch,
)
from qae.train.sampler import _top_p_filter, sample_responses


@pytest.fixture(scope="module")
def tiny():
    torch.set_num_threads(1)
    return load_tiny_model()


def _encode(tok, prompts):
    return [tok(p, add_special_tokens=False)["input_ids"] for p in prompts]


def test_greedy_equals_hugging_face_generate(tiny):
    model, tok = tiny
    records = make_split("validation")[:40]  # mixed prompt lengths: left padding matters
    prompts = [r["prompt"] for r in records]
    ours = sample_responses(
        model,
        _encode(tok, prompts),
        group_size=1,
        max_new_tokens=4,
        eos_id=tok.eos_token_id,
        pad_id=tok.pad_token_id,
        temperature=0,
    )
    theirs = generate_batch(
        model,
        tok,
        prompts,
        [r["answer"] for r in records],
        group_size=1,
        temperature=0,
        max_new_tokens=4,
    )
    assert ours.tokens == theirs.response_ids


@pytest.mark.parametrize(("temperature", "top_p"), [(1.0, 1.0), (0.7, 1.0), (1.0, 0.8)])
def test_recorded_logprobs_and_entropy_equal_a_forward_pass(tiny, temperature, top_p):
    model, tok = tiny
    prompts = _encode(tok, [r["prompt"] for r in make_split("validation")[:12]])
    torch.manual_seed(0)
    out = sample_responses(
        model,
        prompts,
        group_size=3,
        max_new_tokens=4,
        eos_id=tok.eos_token_id,
        pad_id=tok.pad_token_id,
        temperature=temperature,
        top_p=top_p,
    )
    rows = [p for p in prompts for _ in range(3)]
    inputs = collate(rows, out.tokens, tok.pad_token_id)
    with torch.no_grad():
        logp, ent = response_logprobs(model, inputs, with_entropy=True, temperature=temperature)
    for i, toks in enumerate(out.tokens):
        n = len(toks)
        assert n == len(out.logprobs[i]) == len(out.entropy[i]) >= 1
        assert torch.allclose(torch.tensor(out.logprobs[i]), logp[i, :n], atol=1e-4)
        assert torch.allclose(torch.tensor(out.entropy[i]), ent[i, :n], atol=1e-4)
        # a row stops right after its end token
        assert tok.eos_token_id not in toks[:-1]


class _Table(torch.nn.Module):
    """A 'model' whose next-token logits are a fixed table, whatever the context: a
    stand-in with a known sampling distribution (and a real KV cache interface)."""

    def __init__(self, logits: torch.Tensor) -> None:
        super().__init__()
        self.logits = torch.nn.Parameter(logits, requires_grad=False)

    def forward(self, input_ids, attention_mask, position_ids, past_key_values, use_cache):
        from types import SimpleNamespace

        b, t = input_ids.shape
        # one layer of cache, so that batch selection is exercised
        k = input_ids[:, None, :, None].float().expand(b, 1, t, 2)
        past_key_values.update(k, k, 0)
        return SimpleNamespace(logits=self.logits.expand(b, t, -1), past_key_values=past_key_values)


def test_draws_follow_softmax_of_logits_over_temperature_with_top_p():
    logits = torch.tensor([2.0, 1.0, 0.0, -1.0, -3.0])
    model = _Table(logits)
    torch.manual_seed(0)
    for temperature, top_p in ((1.0, 1.0), (0.5, 1.0), (1.0, 0.75)):
        out = sample_responses(
            model,
            [[0]],
            group_size=4000,
            max_new_tokens=1,
            eos_id=None,
            pad_id=0,
            temperature=temperature,
            top_p=top_p,
        )
        counts = torch.bincount(torch.tensor([t[0] for t in out.tokens]), minlength=5)
        probs = torch.softmax(_top_p_filter(logits[None] / temperature, top_p), -1)[0]
        freq = counts.float() / counts.sum()
        assert torch.allclose(freq, probs, atol=0.03), (temperature, top_p, freq, probs)
        if top_p < 1:
            assert counts[3:].sum() == 0  # outside the nucleus: never drawn
        # the recorded log-prob is that of the full tempered distribution (before top-p)
        full = torch.log_softmax(logits / temperature, -1)
        assert out.logprobs[0][0] == pytest.approx(float(full[out.tokens[0][0]]), abs=1e-5)


def test_top_p_keeps_the_smallest_nucleus_and_always_the_best_token():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    kept = torch.isfinite(_top_p_filter(logits, 0.8))[0].tolist()
    assert kept == [True, True, False, False]
    kept = torch.isfinite(_top_p_filter(logits, 0.81))[0].tolist()
    assert kept == [True, True, True, False]
    assert torch.isfinite(_top_p_filter(logits, 0.01))[0].tolist() == [True, False, False, False]
    assert torch.equal(_top_p_filter(logits, 1.0), logits)


def test_rows_stop_at_the_end_token_and_others_run_to_the_limit():
    # token 1 is the end token, likely enough that some rows end at once and some run on
    model = _Table(torch.tensor([0.0, 0.0, 0.0]))
    torch.manual_seed(1)
    out = sample_responses(
        model, [[2], [2, 2]], group_size=50, max_new_tokens=6, eos_id=1, pad_id=0
    )
    lengths = [len(t) for t in out.tokens]
    assert len(out.tokens) == 100
    assert min(lengths) == 1 and max(lengths) == 6
    for toks in out.tokens:
        assert 1 not in toks[:-1]
        assert toks[-1] == 1 or len(toks) == 6
    none = sample_responses(model, [[2]], group_size=3, max_new_tokens=5, eos_id=None, pad_id=0)
    assert [len(t) for t in none.tokens] == [5, 5, 5]
    empty = sample_responses(model, [[2]], group_size=2, max_new_tokens=0, eos_id=1, pad_id=0)
    assert empty.tokens == [[], []]


def test_sampler_errors():
    model = _Table(torch.zeros(3))
    with pytest.raises(ValueError, match="group_size must be >= 1"):
        sample_responses(model, [[1]], group_size=0, max_new_tokens=2, eos_id=1, pad_id=0)
    with pytest.raises(ValueError, match="top_p must be in"):
        sample_responses(model, [[1]], group_size=1, max_new_tokens=2, eos_id=1, pad_id=0, top_p=0)
    with pytest.raises(ValueError, match="at least one token"):
        sample_responses(model, [[]], group_size=1, max_new_tokens=2, eos_id=1, pad_id=0)


def test_sample_batch_lays_out_a_batch_like_generate_batch(tiny):
    model, tok = tiny
    records = make_split("validation")[:10]
    prompts, answers = [r["prompt"] for r in records], [r["answer"] for r in records]
    torch.manual_seed(3)
    batch = sample_batch(
        model, tok, prompts, answers, group_size=4, max_new_tokens=3, batch_size=12
    )
    assert len(batch) == 40 and batch.num_groups == 10
    assert batch.group_ids.tolist() == [g for g in range(10) for _ in range(4)]
    assert batch.answers[4:8] == [answers[1]] * 4 and batch.prompts[4] == prompts[1]
    for i in range(40):
        toks = batch.response_ids[i]
        ended = toks[-1] == tok.eos_token_id
        assert bool(batch.truncated[i]) == (not ended and len(toks) >= 3)
        assert len(batch.sample_logprobs[i]) == len(batch.sample_token_entropy[i]) == len(toks)
        assert batch.sample_entropy[i] == pytest.approx(sum(batch.sample_token_entropy[i]))
    assert batch.texts == tok.batch_decode(batch.response_ids, skip_special_tokens=True)
    torch.manual_seed(3)
    again = sample_batch(
        model, tok, prompts, answers, group_size=4, max_new_tokens=3, batch_size=12
    )
    assert again.response_ids == batch.response_ids
    # select and concat keep the per-token records row-aligned
    both = concat_batches([batch.select([0, 5]), again.select([7])])
    assert both.sample_logprobs == [batch.sample_logprobs[i] for i in (0, 5)] + [
        again.sample_logprobs[7]
    ]
    assert math.isfinite(sum(both.sample_entropy))
