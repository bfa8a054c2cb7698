"""Batch transforms (``Batch -> Batch``): DAPO's dynamic sampling and overlong handling.

Each transform is switched on in the config and called by the trainer between scoring and
advantages; none of them copies the training loop.

References: DAPO (Yu et al. 2025, arXiv 2503.14476): dynamic sampling keeps only groups
whose rewards are not all equal; soft overlong punishment adds
``min(-(L - (L_max - buffer)) / buffer * factor, 0)`` to the reward of a response of length
L; overlong filtering masks truncated responses out of the loss.
"""

from __future__ import annotations

import torch
from torch import Tensor

from qae.train.rollout import Batch

__all__ = [
    "informative_groups",
    "keep_informative_groups",
    "mask_truncated",
    "overlong_penalty",
    "take_groups",
]


def informative_groups(values: Tensor, group_ids: Tensor) -> Tensor:
    """``[B]`` bool: the response's group has rewards that are not all equal, or one member.

    Uses exact comparison (min != max), so continuous rewards with any spread count as
    informative and equal rewards never do; NaN (unscorable) rows are ignored.
    """
    if values.shape != group_ids.shape or values.dim() != 1:
        raise ValueError(
            f"values {tuple(values.shape)} and group_ids {tuple(group_ids.shape)} must be [B]"
        )
    if values.numel() == 0:
        return torch.zeros(0, dtype=torch.bool)
    _, codes, counts = torch.unique(group_ids, return_inverse=True, return_counts=True)
    v = values.double()
    ok = ~torch.isnan(v)
    p = counts.numel()
    hi = torch.full((p,), -torch.inf, dtype=v.dtype).scatter_reduce(
        0, codes[ok], v[ok], "amax", include_self=True
    )
    lo = torch.full((p,), torch.inf, dtype=v.dtype).scatter_reduce(
        0, codes[ok], v[ok], "amin", include_self=True
    )
    keep = (hi > lo) | (counts == 1)
    return keep[codes]


def keep_informative_groups(batch: Batch, metric: str = "scores") -> Batch:
    """Dynamic sampling's filter: drop the groups whose ``metric`` is equal for all members.

    ``metric`` is ``scores`` (accuracy, DAPO's ``acc``) or ``rewards`` (after shaping).
    """
    if metric not in ("scores", "rewards"):
        raise ValueError(f"unknown metric={metric!r}; expected one of scores, rewards")
    return batch.select(informative_groups(getattr(batch, metric), batch.group_ids))


def take_groups(batch: Batch, num_groups: int) -> Batch:
    """The first ``num_groups`` groups of the batch (in order of first appearance)."""
    if num_groups < 0:
        raise ValueError(f"num_groups must be >= 0, got {num_groups}")
    seen: dict[int, None] = {}
    for g in batch.group_ids.tolist():
        seen.setdefault(g, None)
        if len(seen) > num_groups:
            break
    keep = set(list(seen)[:num_groups])
    rows = torch.tensor([g in keep for g in batch.group_ids.tolist()], dtype=torch.bool)
    return batch.select(rows)


def overlong_penalty(batch: Batch, *, max_len: int, buffer: int, factor: float = 1.0) -> Batch:
    """DAPO's soft overlong punishment added to ``rewards``.

    A response of L tokens gets ``min(-(L - (max_len - buffer)) / buffer * factor, 0)``:
    nothing up to ``max_len - buffer``, then linearly down to ``-factor`` at ``max_len``.
    """
    if not 0 < buffer <= max_len:
        raise ValueError(f"overlong buffer must be in (0, max_len={max_len}], got {buffer}")
    lengths = batch.response_lengths().to(batch.rewards.dtype)
    penalty = torch.clamp(-(lengths - (max_len - buffer)) / buffer * factor, max=0.0)
    return batch.with_(rewards=batch.rewards + penalty)


def mask_truncated(batch: Batch) -> Batch:
    """Overlong filtering: truncated responses take no part in the loss."""
    return batch.with_(loss_rows=batch.loss_rows & ~batch.truncated)
