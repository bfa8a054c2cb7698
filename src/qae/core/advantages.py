"""Group baselines and advantage estimators for value-free policy gradient (GRPO family).

Every response i of a batch carries a scalar reward r_i and the id of its prompt (its
group). An estimator turns them into advantages

    A_i = (r_i - b_i) / (s_i + eps)

where b_i is a baseline computed from the response's group and s_i an optional scale.
Quantile Advantage Estimation (QAE; "Quantile Advantage Estimation for Entropy-Safe
Reasoning", arXiv 2509.22611) takes b_i as the group's K-quantile instead of its mean.

Shapes: B responses in a batch, P groups (prompts), G responses per group.

All estimators are vectorized: the batch is grouped with sorts and scatter-adds, never
with a Python loop over groups, so the cost is O(B log B) whatever the number of groups.

Numerics that callers rely on:

- a group whose rewards are all equal gets advantage exactly 0 (sums are taken relative
  to one member of the group, so no float residue survives);
- a group of one response gets 0 by default (``singleton="raw"`` gives the raw reward, as
  verl's GRPO does with its baseline 0 and std 1);
- sums and the std run in float64 (float32 on MPS) and the result is cast back to the
  rewards' dtype on the rewards' device.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from qae.core.registry import Registry

__all__ = [
    "KEEP_MODES",
    "QUANTILE_METHODS",
    "SCALES",
    "SINGLETON_MODES",
    "EstimatorSpec",
    "Groups",
    "advantage_stats",
    "broadcast_to_tokens",
    "compute_advantages",
    "estimators",
    "group_quantile",
    "group_regimes",
    "register_estimator",
]

QUANTILE_METHODS = ("inverted_cdf", "linear", "lower", "higher", "nearest", "midpoint")
SCALES = ("group", "batch", "none")
SINGLETON_MODES = ("zero", "raw")
KEEP_MODES = ("all", "pos", "neg", "gate")
NAN_MODES = ("raise", "unscorable")

# n·K within this distance of an integer counts as that integer, so that K=0.7 means 7/10
# and not the binary float 0.69999999999999996 (numpy's inverted_cdf follows the float).
_QUANTILE_TOL = 1e-9

GroupIds = Tensor | np.ndarray | Sequence[Hashable]


def _check_k(k: float | Tensor, n: int | None = None) -> None:
    if isinstance(k, Tensor):
        if k.dim() != 1 or (n is not None and k.numel() != n):
            raise ValueError(f"k as a tensor must be [B] (B={n}), got shape {tuple(k.shape)}")
        bad = (~((k > 0) & (k < 1))).nonzero()
        if bad.numel():
            i = int(bad[0])
            raise ValueError(f"k must be in (0, 1), got k[{i}]={float(k[i])!r}")
        return
    if isinstance(k, bool) or not isinstance(k, (int, float)) or not (0.0 < float(k) < 1.0):
        raise ValueError(f"k must be a number in (0, 1), got k={k!r}")


def _group_k(k: float | Tensor, groups: Groups, valid: Tensor | None) -> float | Tensor:
    """A float K, or a per-response K ``[B]`` turned into one K per group ``[P]``."""
    if not isinstance(k, Tensor):
        return k
    kv = k.to(device=groups.codes.device, dtype=torch.float64)
    if valid is not None:
        kv = kv[valid.to(kv.device)]
    per_group = torch.zeros(groups.num_groups, dtype=kv.dtype, device=kv.device)
    per_group.scatter_(0, groups.codes, kv)
    off = (per_group[groups.codes] != kv).nonzero()
    if off.numel():
        raise ValueError(
            "k must be the same for every response of a group; "
            f"valid response {int(off[0])} has k={float(kv[int(off[0])])!r}"
        )
    return per_group


def _check_choice(field: str, value: object, choices: Sequence[str]) -> None:
    if value not in choices:
        raise ValueError(f"unknown {field}={value!r}; expected one of {', '.join(choices)}")


# --------------------------------------------------------------------------------------
# Grouping


@dataclass
class Groups:
    """The valid responses of one batch, arranged by group.

    Attributes:
        rewards: ``[N]`` rewards in the working dtype (float64, or float32 on MPS).
        codes: ``[N]`` long, dense group index in ``[0, P)`` of each response.
        counts: ``[P]`` long, responses per group (every entry >= 1).
        order: ``[N]`` long permutation that sorts responses by (group, reward), or None
            when the estimator did not ask for sorted groups.
        input_dtype: dtype of the caller's rewards; the ``torch.quantile`` methods
            interpolate in it so that they match ``torch.quantile`` bit for bit.
    """

    rewards: Tensor
    codes: Tensor
    counts: Tensor
    order: Tensor | None
    input_dtype: torch.dtype

    def __post_init__(self) -> None:
        self._cache: dict[str, Tensor] = {}

    @property
    def num_groups(self) -> int:
        return int(self.counts.numel())

    def _memo(self, key: str, fn: Callable[[], Tensor]) -> Tensor:
        if key not in self._cache:
            self._cache[key] = fn()
        return self._cache[key]

    def _sum(self, values: Tensor) -> Tensor:
        """Per-group sum of ``values`` ``[N]`` -> ``[P]``."""
        out = torch.zeros(self.num_groups, dtype=values.dtype, device=values.device)
        return out.index_add_(0, self.codes, values)

    def reference(self) -> Tensor:
        """``[P]`` one member's reward per group (the minimum): sums are taken relative to it."""

        def lowest() -> Tensor:
            if self.order is not None:
                return self.sorted_rewards()[self.starts()]
            out = torch.empty(self.num_groups, dtype=self.rewards.dtype, device=self.rewards.device)
            return out.scatter_reduce_(0, self.codes, self.rewards, "amin", include_self=False)

        return self._memo("reference", lowest)

    def shifted(self) -> Tensor:
        """``[N]`` reward minus its group's reference reward (exact 0 in equal groups)."""
        return self._memo("shifted", lambda: self.rewards - self.reference()[self.codes])

    def shifted_sum(self) -> Tensor:
        """``[P]`` sum over the group of :meth:`shifted`."""
        return self._memo("shifted_sum", lambda: self._sum(self.shifted()))

    def mean(self) -> Tensor:
        """``[P]`` group mean; exactly the common value in an all-equal group."""
        return self._memo(
            "mean",
            lambda: self.reference() + self.shifted_sum() / self.counts.to(self.rewards.dtype),
        )

    def std(self) -> Tensor:
        """``[P]`` unbiased group std (as ``torch.std``); 0 for groups of one."""

        def compute() -> Tensor:
            dev = self.rewards - self.mean()[self.codes]
            ss = self._sum(dev * dev)
            denom = (self.counts - 1).clamp(min=1).to(ss.dtype)
            return torch.sqrt(ss / denom)

        return self._memo("std", compute)

    def degenerate(self) -> Tensor:
        """``[P]`` bool: the group's rewards are all equal (groups of one included)."""

        def compute() -> Tensor:
            nonzero = torch.zeros(self.num_groups, dtype=torch.long, device=self.codes.device)
            nonzero.index_add_(0, self.codes, (self.shifted() != 0).long())
            return nonzero == 0

        return self._memo("degenerate", compute)

    def starts(self) -> Tensor:
        """``[P]`` offset of each group in the sorted order."""
        return self._memo("starts", lambda: torch.cumsum(self.counts, 0) - self.counts)

    def sorted_rewards(self) -> Tensor:
        """``[N]`` rewards sorted by (group, reward)."""
        if self.order is None:
            raise RuntimeError("this Groups was built without sorting (needs_sort=False)")
        return self._memo("sorted", lambda: self.rewards[self.order])

    def minimum(self) -> Tensor:
        """``[P]`` group minimum (needs sorted groups)."""
        return self.sorted_rewards()[self.starts()]

    def maximum(self) -> Tensor:
        """``[P]`` group maximum (needs sorted groups)."""
        return self.sorted_rewards()[self.starts() + self.counts - 1]

    def quantile(self, k: float | Tensor, method: str = "inverted_cdf") -> Tensor:
        """``[P]`` K-quantile of each group (K a float or one per group ``[P]``)."""
        if isinstance(k, Tensor):
            return _sorted_quantile(self, k, method)
        return self._memo(f"q{k!r}{method}", lambda: _sorted_quantile(self, k, method))


def _group_keys(group_ids: GroupIds, n: int, device: torch.device) -> Tensor:
    """Integer keys ``[B]`` (equal iff the ids are equal) for any supported id container."""
    if isinstance(group_ids, Tensor):
        if group_ids.dim() != 1:
            raise ValueError(f"group_ids must be 1-D, got shape {tuple(group_ids.shape)}")
        if group_ids.numel() != n:
            raise ValueError(
                f"length mismatch: rewards has {n} entries, group_ids has {group_ids.numel()}"
            )
        if group_ids.dtype.is_complex:
            raise ValueError(f"group_ids must be integers or hashables, got {group_ids.dtype}")
        if group_ids.dtype.is_floating_point:
            bad = torch.isnan(group_ids).nonzero()
            if bad.numel():
                i = int(bad[0])
                raise ValueError(f"group_ids[{i}] is NaN; group ids must be comparable")
            keys = torch.unique(group_ids, return_inverse=True)[1]
        else:
            keys = group_ids.long()
        return keys.to(device)

    if isinstance(group_ids, np.ndarray):
        arr = group_ids
        if arr.ndim != 1:
            raise ValueError(f"group_ids must be 1-D, got shape {arr.shape}")
    else:
        try:
            n_ids = len(group_ids)
        except TypeError:
            raise ValueError(
                f"group_ids must be a tensor, numpy array or sequence, got {type(group_ids)}"
            ) from None
        if n_ids != n:
            raise ValueError(f"length mismatch: rewards has {n} entries, group_ids has {n_ids}")
        arr = _as_int_array(group_ids)
        if arr is None:
            return _factorize_hashables(group_ids, device)
    if arr.shape[0] != n:
        raise ValueError(f"length mismatch: rewards has {n} entries, group_ids has {arr.shape[0]}")
    kind = arr.dtype.kind
    if kind in "bi" or (kind == "u" and arr.dtype.itemsize < 8):
        return torch.as_tensor(arr.astype(np.int64), device=device)
    if kind == "f":
        nan = np.flatnonzero(np.isnan(arr))
        if nan.size:
            raise ValueError(f"group_ids[{int(nan[0])}] is NaN; group ids must be comparable")
    if kind in "uUSf":
        inverse = np.unique(arr, return_inverse=True)[1].reshape(-1)
        return torch.as_tensor(inverse.astype(np.int64), device=device)
    # Object arrays (verl's uid strings): hashing beats numpy's object sort by ~4x.
    return _factorize_hashables(arr.tolist(), device)


def _as_int_array(ids: Sequence[Hashable]) -> np.ndarray | None:
    """A 1-D int64 array of a list of Python ints, or None for any other list."""
    if len(ids) == 0:
        return np.zeros(0, dtype=np.int64)
    if not all(type(x) is int for x in ids):
        return None
    try:
        return np.asarray(ids, dtype=np.int64)
    except OverflowError:
        return None


def _factorize_hashables(ids: Sequence[Hashable], device: torch.device) -> Tensor:
    """Codes in order of first appearance, by hashing (NaN ids are rejected)."""
    codes: dict[Hashable, int] = {}
    try:
        keys = np.fromiter((codes.setdefault(x, len(codes)) for x in ids), np.int64, len(ids))
    except TypeError as err:
        bad = next(i for i, x in enumerate(ids) if not isinstance(x, Hashable))
        raise ValueError(
            f"group_ids[{bad}] = {ids[bad]!r} is not hashable ({type(ids[bad]).__name__})"
        ) from err
    for x in codes:  # distinct ids only
        if isinstance(x, float) and x != x:
            i = next(j for j, y in enumerate(ids) if y is x)
            raise ValueError(f"group_ids[{i}] is NaN; group ids must be comparable")
    return torch.as_tensor(keys, device=device)


def _build_groups(rewards: Tensor, keys: Tensor, *, sort: bool, input_dtype: torch.dtype) -> Groups:
    """Group ``rewards [N]`` by integer ``keys [N]``; with ``sort``, also order by reward."""
    if not sort:
        _, codes, counts = torch.unique(keys, return_inverse=True, return_counts=True)
        return Groups(rewards, codes, counts, None, input_dtype)
    n = rewards.numel()
    if input_dtype.itemsize <= 4 and bool((keys >= 0).all()) and int(keys.max()) < 2**31:
        # Rewards that fit in float32 and small keys: one sort of (key << 32 | reward bits).
        composite = (keys << 32) | _float32_order_bits(rewards.to(torch.float32))
        sorted_composite, order = torch.sort(composite)
        sorted_keys = sorted_composite >> 32
    else:
        # General case, two stable sorts: by reward, then by group.
        by_reward = torch.argsort(rewards, stable=True)
        sorted_keys, by_key = torch.sort(keys[by_reward], stable=True)
        order = by_reward[by_key]
    seg = torch.zeros(n, dtype=torch.long, device=keys.device)
    if n > 1:
        seg[1:] = torch.cumsum(sorted_keys[1:] != sorted_keys[:-1], 0)
    codes = torch.empty_like(seg)
    codes[order] = seg
    counts = torch.bincount(seg)
    return Groups(rewards, codes, counts, order, input_dtype)


def _float32_order_bits(x: Tensor) -> Tensor:
    """Map float32 ``[N]`` to int64 in ``[0, 2**32)`` with the same order (no NaN)."""
    bits = x.contiguous().view(torch.int32).long()  # signed 32-bit pattern
    # Negative floats order backwards as integers: flip their magnitude bits.
    bits = torch.where(bits < 0, bits ^ 0x7FFFFFFF, bits)
    return bits + 2**31


# --------------------------------------------------------------------------------------
# Quantiles


def _sorted_quantile(groups: Groups, k: float | Tensor, method: str) -> Tensor:
    """``[P]`` per-group quantile from the sorted rewards."""
    values = groups.sorted_rewards()
    starts, counts = groups.starts(), groups.counts
    if method == "inverted_cdf":
        # b_K = x_(j), j = ceil(n K): the smallest j with j / n >= K (1-based).
        j = torch.ceil(counts.to(torch.float64) * k - _QUANTILE_TOL).long()
        j = torch.minimum(j.clamp(min=1), counts)
        return values[starts + j - 1]
    # torch.quantile: rank = K (n - 1) in the input's float dtype, then round or lerp.
    qdtype = (
        groups.input_dtype
        if groups.input_dtype in (torch.float32, torch.float64)
        else (torch.float32)
    )
    k_t = k.to(qdtype) if isinstance(k, Tensor) else torch.tensor(k, dtype=qdtype)
    rank = k_t.to(values.device) * (counts - 1).to(qdtype)
    if method == "lower":
        rank = rank.floor()
    elif method == "higher":
        rank = rank.ceil()
    elif method == "nearest":
        rank = rank.round()  # half to even, like torch.quantile
    below = rank.long()
    lo = values[starts + below]
    if method in ("lower", "higher", "nearest"):
        return lo
    above = rank.ceil().long()
    hi = values[starts + above]
    weight = torch.full_like(rank, 0.5) if method == "midpoint" else rank - below.to(qdtype)
    return torch.lerp(lo.to(qdtype), hi.to(qdtype), weight).to(values.dtype)


def group_quantile(
    rewards: Tensor,
    group_ids: GroupIds,
    k: float | Tensor = 0.4,
    *,
    method: str = "inverted_cdf",
) -> Tensor:
    """Each response's group K-quantile, ``[B]``.

    Methods:
        ``inverted_cdf`` (default): the paper's right-continuous empirical quantile
        ``b_K = inf{x : F(x) >= K}``, i.e. the ``ceil(n K)``-th smallest reward of the group
        (numpy's ``inverted_cdf``; n·K within 1e-9 of an integer is taken as that integer,
        so K=0.7 is read as 7/10). With binary rewards and success rate p it is exactly 0
        when ``p <= 1 - K`` and 1 otherwise, for every group size.

        ``linear``, ``lower``, ``higher``, ``nearest``, ``midpoint``: as ``torch.quantile``
        with that ``interpolation`` (rank ``K (n - 1)``). ``linear`` is what the released
        reference code computes (``torch.quantile(scores, k)`` per group). It agrees with
        the paper when ``K (G - 1)`` is a whole number (G=16, K=0.4) but interpolates at
        the regime boundary otherwise: with G=8, K=0.4 and 5 of 8 correct the rank is 2.8,
        so the baseline is 0.8 (the paper's quantile gives 1).

    Args:
        rewards: ``[B]`` float rewards (finite, no NaN).
        group_ids: ``[B]`` group id of each response.
        k: quantile level in (0, 1).
        method: one of :data:`QUANTILE_METHODS`.

    Returns:
        ``[B]`` baseline of each response, dtype and device of ``rewards``.
    """
    rewards_t = _as_rewards(rewards)
    _check_k(k, rewards_t.numel())
    _check_choice("method", method, QUANTILE_METHODS)
    prepared = _prepare(rewards_t, group_ids, nan="raise", sort=True)
    if prepared is None:
        return torch.zeros_like(rewards_t)
    groups, valid = prepared
    return groups.quantile(_group_k(k, groups, valid), method)[groups.codes].to(rewards_t.dtype)


# --------------------------------------------------------------------------------------
# Estimators


BaselineFn = Callable[..., Tensor]


@dataclass(frozen=True)
class EstimatorSpec:
    """A registered estimator: a baseline function and its default scale.

    ``baseline(groups, *, k, quantile_method) -> [N]`` returns each response's baseline;
    ``scale`` is the default of :func:`compute_advantages`'s ``scale``; ``needs_sort`` asks
    for groups sorted by reward (quantiles, order statistics).
    """

    baseline: BaselineFn
    scale: str
    needs_sort: bool = False
    doc: str = ""


estimators: Registry[EstimatorSpec] = Registry("advantage estimator", "estimator")


def register_estimator(
    name: str,
    *,
    scale: str = "group",
    needs_sort: bool = False,
    doc: str | None = None,
    override: bool = False,
) -> Callable[[BaselineFn], BaselineFn]:
    """Register a baseline function as an estimator usable by name everywhere.

    The function takes a :class:`Groups` and keyword-only ``k`` and ``quantile_method``
    and returns a ``[N]`` baseline per response. Example::

        @register_estimator("median", needs_sort=True)
        def median_baseline(groups, *, k, quantile_method):
            return groups.quantile(0.5, "lower")[groups.codes]
    """
    _check_choice("scale", scale, SCALES)

    def wrap(fn: BaselineFn) -> BaselineFn:
        spec = EstimatorSpec(fn, scale, needs_sort, doc or (fn.__doc__ or "").strip())
        current = estimators._items.get(name)
        if current is not None and current.baseline is fn and current == spec:
            return fn
        estimators.register(name, spec, override=override)
        return fn

    return wrap


@register_estimator("grpo", scale="group")
def mean_baseline(groups: Groups, *, k: float | Tensor, quantile_method: str) -> Tensor:
    """GRPO: group mean baseline, scaled by the unbiased group std (verl's ``grpo``)."""
    return groups.mean()[groups.codes]


register_estimator("drgrpo", scale="none", doc="Dr. GRPO: group mean baseline, no std scaling.")(
    mean_baseline
)


@register_estimator("rloo", scale="none")
def leave_one_out_baseline(groups: Groups, *, k: float | Tensor, quantile_method: str) -> Tensor:
    """RLOO: the mean of the other responses of the group, no std scaling."""
    n = groups.counts[groups.codes].to(groups.rewards.dtype)
    shifted = groups.shifted()
    others = (groups.shifted_sum()[groups.codes] - shifted) / (n - 1).clamp(min=1)
    return groups.reference()[groups.codes] + others


@register_estimator("qae", scale="group", needs_sort=True)
def quantile_baseline(groups: Groups, *, k: float | Tensor, quantile_method: str) -> Tensor:
    """QAE: the group's K-quantile as baseline, scaled by the group std."""
    return groups.quantile(k, quantile_method)[groups.codes]


def compute_advantages(
    rewards: Tensor,
    group_ids: GroupIds,
    estimator: str = "qae",
    *,
    k: float | Tensor = 0.4,
    quantile_method: str = "inverted_cdf",
    scale: str | None = None,
    eps: float = 1e-6,
    singleton: str = "zero",
    nan: str = "raise",
    keep: str = "all",
) -> Tensor:
    """Per-response advantages ``A = (r - b) / (s + eps)`` from a registered estimator.

    Estimators (``estimator=``):
        ``qae``: b = the group's K-quantile (see :func:`group_quantile`), s = group std.
        With binary rewards and success rate p: a hard group (``p <= 1 - K``) has b = 0, so
        only successes get (positive) credit; an easy group (``p > 1 - K``) has b = 1, so
        only failures get (negative) advantage.
        ``grpo``: b = group mean, s = unbiased group std. ``drgrpo``: b = group mean, no
        scaling. ``rloo``: b = mean of the other responses of the group, no scaling.

    Args:
        rewards: ``[B]`` float rewards.
        group_ids: ``[B]`` group (prompt) of each response: an integer tensor, a numpy
            array (verl passes uid strings) or a list of hashables. Groups may be ragged.
        estimator: registered estimator name.
        k: quantile level in (0, 1) for ``qae``: one float, or a ``[B]`` tensor giving each
            group its own K (equal within a group; difficulty-aware K control uses it).
        quantile_method: how ``qae`` takes the quantile, one of :data:`QUANTILE_METHODS`.
        scale: ``group`` (group std), ``batch`` (std of the whole batch, as TRL's
            ``scale_rewards="batch"`` and REINFORCE++) or ``none``; default: the
            estimator's own.
        eps: added to the std before dividing.
        singleton: a group of one response gets ``zero`` advantage, or its ``raw`` reward
            (verl's GRPO: baseline 0, std 1).
        nan: ``raise`` a ``ValueError`` naming the first NaN reward, or treat NaN as
            ``unscorable``: excluded from its group's baseline and std, advantage 0.
        keep: ablations of the paper: ``all`` (default); ``pos`` keeps only positive
            advantages (POS-only); ``neg`` only negative ones (NEG-only); ``gate`` applies
            QAE's regime gate to any estimator: in a hard group (its K-quantile is its
            minimum) only positive advantages stay, in an easy group (K-quantile = maximum)
            only negative ones (``estimator="grpo", keep="gate"``: the gated mean baseline).

    Returns:
        ``[B]`` advantages, dtype and device of ``rewards`` (float32 for integer rewards).
        All-equal groups get exactly 0.
    """
    rewards_t = _as_rewards(rewards)
    spec = estimators.get(estimator)
    _check_k(k, rewards_t.numel())
    _check_choice("quantile_method", quantile_method, QUANTILE_METHODS)
    scale = spec.scale if scale is None else scale
    _check_choice("scale", scale, SCALES)
    _check_choice("singleton", singleton, SINGLETON_MODES)
    _check_choice("nan", nan, NAN_MODES)
    _check_choice("keep", keep, KEEP_MODES)
    if not (isinstance(eps, (int, float)) and math.isfinite(eps) and eps >= 0):
        raise ValueError(f"eps must be a finite number >= 0, got {eps!r}")

    prepared = _prepare(rewards_t, group_ids, nan=nan, sort=spec.needs_sort or keep == "gate")
    if prepared is None:
        return torch.zeros_like(rewards_t)
    groups, valid = prepared
    r = groups.rewards
    baseline = spec.baseline(groups, k=_group_k(k, groups, valid), quantile_method=quantile_method)
    if baseline.shape != r.shape:
        raise ValueError(
            f"estimator {estimator!r} returned a baseline of shape {tuple(baseline.shape)}, "
            f"expected {tuple(r.shape)}"
        )
    adv = r - baseline.to(r.dtype)
    if scale == "group":
        adv = adv / (groups.std()[groups.codes] + eps)
    elif scale == "batch":
        batch_std = r.std() if r.numel() > 1 else r.new_zeros(())
        adv = adv / (batch_std + eps)

    counts = groups.counts[groups.codes]
    adv = torch.where(groups.degenerate()[groups.codes], torch.zeros_like(adv), adv)
    adv = _apply_keep(adv, groups, keep, _group_k(k, groups, valid), quantile_method)
    if singleton == "raw":
        adv = torch.where(counts == 1, r, adv)

    if valid is None:
        return adv.to(rewards_t.dtype)
    out = torch.zeros(rewards_t.shape, dtype=adv.dtype, device=adv.device)
    out[valid] = adv
    return out.to(rewards_t.dtype)


def _apply_keep(
    adv: Tensor, groups: Groups, keep: str, k: float | Tensor, quantile_method: str
) -> Tensor:
    """Zero the advantages an ablation drops (see ``keep`` in :func:`compute_advantages`)."""
    zero = torch.zeros_like(adv)
    if keep == "pos":
        return torch.where(adv > 0, adv, zero)
    if keep == "neg":
        return torch.where(adv < 0, adv, zero)
    if keep == "gate":
        q = groups.quantile(k, quantile_method)
        hard = (q == groups.minimum())[groups.codes]
        easy = (q == groups.maximum())[groups.codes] & ~hard
        adv = torch.where(hard & (adv < 0), zero, adv)
        return torch.where(easy & (adv > 0), zero, adv)
    return adv


# --------------------------------------------------------------------------------------
# Statistics and helpers


def advantage_stats(
    advantages: Tensor,
    rewards: Tensor,
    group_ids: GroupIds,
    *,
    k: float | Tensor = 0.4,
    quantile_method: str = "inverted_cdf",
    success_threshold: float = 0.0,
    nan: str = "raise",
) -> dict[str, float]:
    """Sparsity and regime statistics of one batch, for logging every step.

    Response fractions are over all B advantages. Group counts are over the groups' valid
    (non-NaN) responses:

    - ``degenerate_groups``: all rewards equal, at least two responses ("loss is 0"),
      split into ``all_success_groups`` and ``all_fail_groups``;
    - ``singleton_groups``: one response;
    - ``hard_groups``: the K-quantile equals the group minimum (binary rewards:
      ``p <= 1 - K``), so only responses above it get credit;
    - ``easy_groups``: the K-quantile equals the group maximum (binary: ``p > 1 - K``);
    - ``mixed_groups``: neither (possible only with non-binary rewards).

    A response counts as a success when its reward is > ``success_threshold`` (0 suits
    both 0/1 and DAPO's -1/+1 rewards).

    Returns:
        dict of floats: ``frac_zero_adv``, ``frac_pos_adv``, ``frac_neg_adv``,
        ``num_groups``, ``hard_groups``, ``easy_groups``, ``mixed_groups``,
        ``degenerate_groups``, ``all_success_groups``, ``all_fail_groups``,
        ``singleton_groups``, ``success_rate`` (mean over valid responses),
        ``unscorable`` (NaN rewards).
    """
    rewards_t = _as_rewards(rewards)
    adv = torch.as_tensor(advantages)
    if adv.shape != rewards_t.shape:
        raise ValueError(
            f"advantages has shape {tuple(adv.shape)}, rewards has {tuple(rewards_t.shape)}"
        )
    _check_k(k, rewards_t.numel())
    _check_choice("quantile_method", quantile_method, QUANTILE_METHODS)
    n = adv.numel()
    stats: dict[str, float] = {
        "frac_zero_adv": float((adv == 0).sum()) / n if n else 0.0,
        "frac_pos_adv": float((adv > 0).sum()) / n if n else 0.0,
        "frac_neg_adv": float((adv < 0).sum()) / n if n else 0.0,
    }
    keys = ("num_groups", "hard_groups", "easy_groups", "mixed_groups", "degenerate_groups")
    keys += ("all_success_groups", "all_fail_groups", "singleton_groups")
    stats.update(dict.fromkeys(keys, 0.0))
    stats["success_rate"] = 0.0
    stats["unscorable"] = float(torch.isnan(rewards_t).sum()) if n else 0.0
    prepared = _prepare(rewards_t, group_ids, nan=nan, sort=True)
    if prepared is None:
        return stats
    g, valid = prepared
    success = g.rewards > success_threshold
    stats["success_rate"] = float(success.double().mean())
    single = g.counts == 1
    degen = g.degenerate() & ~single
    live = ~g.degenerate()
    q = g.quantile(_group_k(k, g, valid), quantile_method)
    hard = live & (q == g.minimum())
    easy = live & (q == g.maximum())
    group_success = g._sum(success.to(g.rewards.dtype))
    stats.update(
        num_groups=float(g.num_groups),
        hard_groups=float(hard.sum()),
        easy_groups=float(easy.sum()),
        mixed_groups=float((live & ~hard & ~easy).sum()),
        degenerate_groups=float(degen.sum()),
        all_success_groups=float((degen & (group_success == g.counts)).sum()),
        all_fail_groups=float((degen & (group_success == 0)).sum()),
        singleton_groups=float(single.sum()),
    )
    return stats


def group_regimes(
    rewards: Tensor,
    group_ids: GroupIds,
    *,
    k: float | Tensor = 0.4,
    quantile_method: str = "inverted_cdf",
) -> list[str]:
    """Each response's group regime under QAE's gate: ``hard``, ``easy`` or ``other``.

    ``hard``: the group's K-quantile is its minimum (binary rewards: p <= 1 - K);
    ``easy``: it is the maximum (p > 1 - K); ``other``: all-equal groups, singletons,
    mixed groups of non-binary rewards and NaN (unscorable) responses.
    """
    rewards_t = _as_rewards(rewards)
    _check_k(k, rewards_t.numel())
    _check_choice("quantile_method", quantile_method, QUANTILE_METHODS)
    out = ["other"] * rewards_t.numel()
    prepared = _prepare(rewards_t, group_ids, nan="unscorable", sort=True)
    if prepared is None:
        return out
    g, valid = prepared
    live = ~g.degenerate()
    q = g.quantile(_group_k(k, g, valid), quantile_method)
    hard = (live & (q == g.minimum()))[g.codes].tolist()
    easy = (live & (q == g.maximum()))[g.codes].tolist()
    rows = valid.nonzero().flatten().tolist() if valid is not None else range(len(out))
    for j, i in enumerate(rows):
        out[i] = "hard" if hard[j] else ("easy" if easy[j] else "other")
    return out


def broadcast_to_tokens(advantages: Tensor, response_mask: Tensor) -> Tensor:
    """Spread per-response advantages ``[B]`` over response tokens: ``[B, T]``.

    Tokens outside ``response_mask [B, T]`` (padding) get 0.
    """
    if advantages.dim() != 1:
        raise ValueError(f"advantages must be [B], got shape {tuple(advantages.shape)}")
    if response_mask.dim() != 2 or response_mask.shape[0] != advantages.shape[0]:
        raise ValueError(
            f"response_mask must be [B, T] with B={advantages.shape[0]}, "
            f"got shape {tuple(response_mask.shape)}"
        )
    return advantages[:, None] * response_mask.to(advantages.dtype)  # [B, T]


def _work_dtype(device: torch.device) -> torch.dtype:
    return torch.float32 if device.type == "mps" else torch.float64


def _as_rewards(rewards: Any) -> Tensor:
    r = rewards if isinstance(rewards, Tensor) else torch.as_tensor(rewards)
    if r.dim() != 1:
        raise ValueError(f"rewards must be a 1-D tensor [B], got shape {tuple(r.shape)}")
    if r.dtype.is_complex:
        raise ValueError(f"rewards must be real, got dtype {r.dtype}")
    if not r.dtype.is_floating_point:
        r = r.to(torch.get_default_dtype())
    return r


def _prepare(
    rewards: Tensor, group_ids: GroupIds, *, nan: str, sort: bool
) -> tuple[Groups, Tensor | None] | None:
    """Validate and group; returns (groups of valid responses, valid mask or None)."""
    keys = _group_keys(group_ids, rewards.numel(), rewards.device)
    if rewards.numel() == 0:
        return None
    r = rewards.to(_work_dtype(rewards.device))
    is_nan = torch.isnan(r)
    is_inf = torch.isinf(r)
    if bool(is_inf.any()):
        i = int(is_inf.nonzero()[0])
        raise ValueError(f"rewards[{i}] = {float(r[i])} is infinite; rewards must be finite")
    valid: Tensor | None = None
    if bool(is_nan.any()):
        if nan == "raise":
            i = int(is_nan.nonzero()[0])
            raise ValueError(
                f"rewards[{i}] is NaN; pass nan='unscorable' to exclude NaN rewards from "
                f"the baseline and give them advantage 0"
            )
        valid = ~is_nan
        r, keys = r[valid], keys[valid]
        if r.numel() == 0:
            return None
    return _build_groups(r, keys, sort=sort, input_dtype=rewards.dtype), valid
