"""Rollout: sampling with Hugging Face ``generate`` and the entropy measured while sampling."""

from __future__ import annotations

import pytest
import torch

from qae.tasks.tiny_model import load_tiny_model
from qae.train.rollout import Batch, collate, concat_batches, generate_batch, response_logprobs


@pytest.fixture(scope="module")
def tiny():
    model, tokenizer = load_tiny_model()[:2]
    return model, tokenizer


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_sample_entropy_equals_the_entropy_of_a_forward_pass(tiny, temperature):
    model, tok = tiny
    torch.manual_seed(0)
    prompts = ["Q: 12+7=\nA:", "Q: 3*4=\nA:"]
    batch = generate_batch(
        model,
        tok,
        prompts,
        ["19", "12"],
        group_size=3,
        temperature=temperature,
        max_new_tokens=5,
    )
    assert len(batch.sample_entropy) == len(batch) == 6
    inputs = collate(batch.prompt_ids, batch.response_ids, tok.pad_token_id)
    with torch.no_grad():
        _, ent = response_logprobs(model, inputs, with_entropy=True, temperature=temperature)
    expected = ent.sum(dim=1)  # [B]; 0 outside each response's own tokens
    got = torch.tensor(batch.sample_entropy)
    torch.testing.assert_close(got, expected.float(), atol=1e-4, rtol=1e-4)
    assert (got > 0).all()


def test_entropy_can_be_switched_off(tiny):
    model, tok = tiny
    batch = generate_batch(
        model,
        tok,
        ["Q: 1+1=\nA:"],
        ["2"],
        group_size=2,
        max_new_tokens=3,
        measure_entropy=False,
    )
    assert batch.sample_entropy == []
    assert len(batch) == 2


def _rows(n: int, entropy: bool) -> Batch:
    return Batch(
        prompt_ids=[[1]] * n,
        response_ids=[[2, 3]] * n,
        group_ids=torch.zeros(n, dtype=torch.long),
        scores=torch.zeros(n),
        rewards=torch.zeros(n),
        truncated=torch.zeros(n, dtype=torch.bool),
        loss_rows=torch.ones(n, dtype=torch.bool),
        sample_entropy=[0.5] * n if entropy else [],
    )


def test_concat_keeps_sample_entropy_only_when_every_batch_has_it():
    both = concat_batches([_rows(2, True), _rows(3, True)])
    assert both.sample_entropy == [0.5] * 5
    assert both.group_ids.tolist() == [0, 0, 1, 1, 1]
    mixed = concat_batches([_rows(2, True), _rows(3, False)])
    assert mixed.sample_entropy == []
    assert len(mixed) == 5
    assert both.select([0, 4]).sample_entropy == [0.5, 0.5]


def test_greedy_with_several_responses_per_prompt_repeats_one_draw(tiny):
    model, tok = tiny
    prompts = ["Q: 12+7=\nA:", "Q: 3*4=\nA:"]
    batch = generate_batch(
        model, tok, prompts, ["19", "12"], group_size=3, temperature=0.0, max_new_tokens=5
    )
    assert len(batch) == 6 and batch.group_ids.tolist() == [0, 0, 0, 1, 1, 1]
    one = generate_batch(
        model, tok, prompts, ["19", "12"], group_size=1, temperature=0.0, max_new_tokens=5
    )
    for g in range(2):
        for i in range(3):
            assert batch.response_ids[3 * g + i] == one.response_ids[g]
            assert batch.sample_entropy[3 * g + i] == pytest.approx(one.sample_entropy[g])
            assert bool(batch.truncated[3 * g + i]) == bool(one.truncated[g])
    assert batch.prompt_ids[3] == one.prompt_ids[1]
