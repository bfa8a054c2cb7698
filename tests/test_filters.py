"""Tests for the batch transforms: dynamic sampling and overlong handling."""

from __future__ import annotations

import pytest
import torch

from qae.train.filters import (
    informative_groups,
    keep_informative_groups,
    mask_truncated,
    overlong_penalty,
    take_groups,
)
from qae.train.rollout import Batch, collate, concat_batches


def make_batch(scores, groups, lengths=None, truncated=None):
    b = len(scores)
    lengths = lengths or [3] * b
    return Batch(
        prompt_ids=[[1, 2]] * b,
        response_ids=[[5] * n for n in lengths],
        group_ids=torch.tensor(groups),
        scores=torch.tensor(scores, dtype=torch.float32),
        rewards=torch.tensor(scores, dtype=torch.float32),
        truncated=torch.tensor(truncated or [False] * b),
        loss_rows=torch.ones(b, dtype=torch.bool),
        texts=[str(i) for i in range(b)],
        answers=["a"] * b,
        prompts=["p"] * b,
    )


def test_informative_groups_exact_and_continuous():
    v = torch.tensor([1.0, 1.0, 0.5, 0.5 + 1e-7, 2.0, float("nan"), 3.0, 3.0])
    g = torch.tensor([0, 0, 1, 1, 2, 3, 3, 3])
    # group 0 equal -> drop; group 1 differs by 1e-7 -> keep; singleton 2 -> keep;
    # group 3 equal apart from the NaN (ignored) -> drop
    assert informative_groups(v, g).tolist() == [
        False,
        False,
        True,
        True,
        True,
        False,
        False,
        False,
    ]


def test_keep_informative_groups_and_take():
    b = make_batch([1, 0, 1, 1, 0, 0, 0, 1], [0, 0, 1, 1, 2, 2, 3, 3])
    kept = keep_informative_groups(b)
    assert kept.group_ids.tolist() == [0, 0, 3, 3]
    assert kept.texts == ["0", "1", "6", "7"]
    assert take_groups(kept, 1).group_ids.tolist() == [0, 0]
    assert len(take_groups(kept, 0)) == 0
    with pytest.raises(ValueError, match="unknown metric='acc'"):
        keep_informative_groups(b, "acc")


def test_concat_makes_group_ids_distinct():
    a = make_batch([1, 0], [0, 0])
    b = make_batch([0, 1], [0, 0])
    c = concat_batches([a, b])
    assert c.group_ids.tolist() == [0, 0, 1, 1] and c.num_groups == 2


def test_overlong_penalty_matches_dapo_formula():
    # max_len 10, buffer 4: no penalty up to 6 tokens, then -(L-6)/4, reaching -1 at 10.
    b = make_batch([1, 1, 1, 1], [0, 0, 0, 0], lengths=[5, 6, 8, 10])
    out = overlong_penalty(b, max_len=10, buffer=4, factor=1.0)
    assert out.rewards.tolist() == pytest.approx([1.0, 1.0, 0.5, 0.0])
    assert out.scores.tolist() == [1, 1, 1, 1]  # accuracy untouched
    with pytest.raises(ValueError, match="overlong buffer must be in"):
        overlong_penalty(b, max_len=10, buffer=0)


def test_mask_truncated():
    b = make_batch([1, 0], [0, 0], truncated=[True, False])
    assert mask_truncated(b).loss_rows.tolist() == [False, True]


def test_collate_positions_point_at_the_predicting_logit():
    inputs = collate([[1, 2, 3], [4]], [[7, 8], [9, 10, 11]], pad_id=0)
    assert inputs["input_ids"].tolist() == [[1, 2, 3, 7, 8], [4, 9, 10, 11, 0]]
    assert inputs["attention_mask"].tolist() == [[1, 1, 1, 1, 1], [1, 1, 1, 1, 0]]
    # token 7 sits at index 3 and is predicted by the logit at index 2
    assert inputs["positions"].tolist() == [[2, 3, 0], [0, 1, 2]]
    assert inputs["targets"].tolist() == [[7, 8, 0], [9, 10, 11]]
    assert inputs["response_mask"].tolist() == [[1, 1, 0], [1, 1, 1]]
    with pytest.raises(ValueError, match=r"prompt_ids\[0\] is empty"):
        collate([[]], [[1]], pad_id=0)
