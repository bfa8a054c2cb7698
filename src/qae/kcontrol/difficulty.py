"""Difficulty-aware K: one K per group, picked by the group's success-rate bucket."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from qae.core.advantages import GroupIds, _group_keys
from qae.kcontrol.base import _Controller


def group_success_rate(
    rewards: Tensor, group_ids: GroupIds, *, success_threshold: float = 0.0
) -> Tensor:
    """Each response's group success rate ``[B]`` (float64).

    A response succeeds when its reward is > ``success_threshold``; NaN rewards
    (unscorable) count in neither numerator nor denominator.
    """
    r = torch.as_tensor(rewards)
    if r.dim() != 1:
        raise ValueError(f"rewards must be [B], got shape {tuple(r.shape)}")
    keys = _group_keys(group_ids, r.numel(), r.device)
    if r.numel() == 0:
        return torch.zeros(0, dtype=torch.float64, device=r.device)
    _, codes = torch.unique(keys, return_inverse=True)  # [B] in [0, P)
    r64 = r.to(torch.float64)
    valid = ~torch.isnan(r64)
    num_groups = int(codes.max()) + 1
    wins = torch.zeros(num_groups, dtype=torch.float64, device=r.device)
    wins.index_add_(0, codes, ((r64 > success_threshold) & valid).to(torch.float64))
    counts = torch.zeros(num_groups, dtype=torch.float64, device=r.device)
    counts.index_add_(0, codes, valid.to(torch.float64))
    return (wins / counts.clamp(min=1))[codes]


def difficulty_k(
    rewards: Tensor,
    group_ids: GroupIds,
    *,
    edges: Sequence[float],
    ks: Sequence[float],
    success_threshold: float = 0.0,
) -> Tensor:
    """Per-response K ``[B]`` from the group's success-rate bucket (constant in a group).

    Bucket i holds success rates in ``[edges[i-1], edges[i])`` (with ``edges[-1] = 0``,
    the last bucket closed at 1); ``ks[i]`` is its K. Pass the result as
    ``compute_advantages(..., k=...)``.
    """
    _check_buckets(edges, ks)
    p = group_success_rate(rewards, group_ids, success_threshold=success_threshold)  # [B]
    return torch.tensor(list(ks), dtype=torch.float64, device=p.device)[_bucket(p, edges)]


def _bucket(p: Tensor, edges: Sequence[float]) -> Tensor:
    """Bucket index ``[B]`` of success rates ``p [B]``: i such that edges[i-1] <= p < edges[i]."""
    return torch.bucketize(p, torch.tensor(list(edges), dtype=p.dtype, device=p.device), right=True)


def _check_buckets(edges: Sequence[float], ks: Sequence[float]) -> None:
    if any(not 0 < e < 1 for e in edges) or any(
        a >= b for a, b in zip(edges, edges[1:], strict=False)
    ):
        raise ValueError(
            f"difficulty_edges must be strictly increasing in (0, 1), got {list(edges)}"
        )
    if len(ks) != len(edges) + 1:
        raise ValueError(
            f"difficulty_ks needs len(difficulty_edges) + 1 = {len(edges) + 1} values, "
            f"got {len(ks)}: {list(ks)}"
        )
    if any(not 0 < k < 1 for k in ks):
        raise ValueError(f"difficulty_ks must all be in (0, 1), got {list(ks)}")


class DifficultyK(_Controller):
    """A fixed K per success-rate bucket; :meth:`batch_k` returns the ``[B]`` K tensor.

    ``k()`` is the last batch's mean K over responses (for logging; the mean of the bucket
    Ks before the first batch). ``metrics()`` reports each bucket's K (``k_bucket{i}``)
    and the number of groups that fell in it in the last batch (``k_bucket{i}_groups``).
    """

    kind = "difficulty"

    def __init__(
        self, edges: Sequence[float], ks: Sequence[float], *, success_threshold: float = 0.0
    ) -> None:
        super().__init__()
        _check_buckets(edges, ks)
        self.edges, self.ks = [float(e) for e in edges], [float(k) for k in ks]
        self.success_threshold = success_threshold
        self._mean_k = sum(self.ks) / len(self.ks)
        self._groups = [0] * len(self.ks)

    def labels(self) -> list[str]:
        """Human-readable success-rate range of each bucket: ``[0, 0.25)``, ..."""
        bounds = [0.0, *self.edges, 1.0]
        return [
            f"[{lo:g}, {hi:g}{']' if i == len(self.ks) - 1 else ')'}"
            for i, (lo, hi) in enumerate(zip(bounds, bounds[1:], strict=False))
        ]

    def k(self) -> float:
        return self._mean_k

    def batch_k(self, rewards: Tensor, group_ids: GroupIds) -> Tensor:
        """Per-response K ``[B]``; also records the groups per bucket for :meth:`metrics`."""
        p = group_success_rate(rewards, group_ids, success_threshold=self.success_threshold)
        bucket = _bucket(p, self.edges)  # [B]
        k = torch.tensor(self.ks, dtype=torch.float64, device=p.device)[bucket]  # [B]
        keys = _group_keys(group_ids, p.numel(), p.device)
        first = _first_of_each_group(keys)  # [P]
        self._groups = torch.bincount(bucket[first], minlength=len(self.ks)).tolist()
        if k.numel():
            self._mean_k = float(k.mean())
        return k

    def metrics(self) -> dict[str, float]:
        out = {"k": self._mean_k}
        for i, (k, n) in enumerate(zip(self.ks, self._groups, strict=True)):
            out[f"k_bucket{i}"] = k
            out[f"k_bucket{i}_groups"] = float(n)
        return out

    def _state(self) -> dict[str, Any]:
        return {"mean_k": self._mean_k, "groups": list(self._groups)}

    def _load(self, state: Mapping[str, Any]) -> None:
        self._mean_k = float(state["mean_k"])
        self._groups = [int(n) for n in state["groups"]]


def _first_of_each_group(keys: Tensor) -> Tensor:
    """Index ``[P]`` of each group's first response, from integer group keys ``[B]``."""
    uniq, codes = torch.unique(keys, return_inverse=True)
    pos = torch.arange(keys.numel(), device=keys.device)
    first = torch.full((uniq.numel(),), keys.numel(), dtype=torch.long, device=keys.device)
    return first.scatter_reduce_(0, codes, pos, "amin")
