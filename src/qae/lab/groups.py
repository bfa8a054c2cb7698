"""Group estimators on tabular policies: sampled steps and their exact expectation.

Shapes: P prompts, M candidates, G sampled responses per prompt, L distinct reward levels,
C compositions (ways to split a group's responses over the L levels).

The advantages always come from the trainer's registered estimators
(:func:`qae.compute_advantages`), so the lab checks the very functions the trainer uses.

Sampled step. Draw ``y_1..y_G ~ pi`` per prompt, score them, compute advantages ``A_i``
and move the logits by (``e_y`` is the one-hot vector of candidate y)

    pg:    dz = eta/G * sum_i A_i (e_{y_i} - pi)
    npg:   dz = eta/G * sum_i A_i e_{y_i} / pi(y_i)
    logit: dz = eta/G * sum_i A_i e_{y_i}.

Expected step. An estimator's advantage of a response depends only on its own reward and
the multiset of rewards of its group. By exchangeability
``E[(1/G) sum_i A_i e_{y_i}]_a = pi(a) * Abar(a)`` with

    Abar(a) = E[A_1 | y_1 = a] = sum_{m'} Mult(m'; G-1, q) * f_l(m' + e_l),

where l is a's reward level, ``q [L]`` the policy's mass on each level, ``m'`` the level
counts of the other G-1 responses and ``f_l(m)`` the advantage of a level-l response in a
group with level counts m. Likewise ``E[(1/G) sum_i A_i] = E_pi[Abar]`` and
``E[A_i 1[y_i = a] / pi(a)] = Abar(a)``, so each sampled step above is an unbiased
estimate of ``eta * update_direction(logits, Abar, update)``. The table ``f`` is computed
once per (levels, G, estimator) by calling the estimator on one representative group per
composition, and cached.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from functools import lru_cache

import torch
from torch import Tensor

from qae.core.advantages import (
    QUANTILE_METHODS,
    advantage_stats,
    compute_advantages,
    estimators,
    group_quantile,
)
from qae.lab.policy import UPDATES, update_direction

__all__ = [
    "LabEstimator",
    "SampledStep",
    "expected_advantages",
    "expected_regimes",
    "expected_update",
    "expected_zero_fraction",
    "parse_estimator",
    "sample_update",
    "zero_fraction_closed_form",
]

_DTYPE = torch.float64
# Cap on the responses in the representative groups of one table (C * L * G).
_MAX_TABLE_RESPONSES = 4_000_000


@dataclass(frozen=True)
class LabEstimator:
    """A registered estimator with its hyperparameters.

    Attributes:
        name: registered estimator name (``qae``, ``grpo``, ``drgrpo``, ``rloo``, ...).
        k: quantile level; used by ``qae`` and by the regime statistics.
        quantile_method: how ``qae`` takes the quantile.
    """

    name: str
    k: float = 0.4
    quantile_method: str = "inverted_cdf"

    def __post_init__(self) -> None:
        estimators.get(self.name)  # unknown names raise and list the known ones
        if not (0.0 < float(self.k) < 1.0):
            raise ValueError(f"k must be a number in (0, 1), got k={self.k!r}")
        if self.quantile_method not in QUANTILE_METHODS:
            raise ValueError(
                f"unknown quantile_method={self.quantile_method!r}; "
                f"expected one of {', '.join(QUANTILE_METHODS)}"
            )

    @property
    def uses_k(self) -> bool:
        """True when K changes the advantages (quantile estimators)."""
        return estimators.get(self.name).needs_sort

    @property
    def label(self) -> str:
        """Short name for tables and legends, e.g. ``qae K=0.4`` or ``grpo``."""
        return f"{self.name} K={self.k:g}" if self.uses_k else self.name

    def advantages(self, rewards: Tensor, group_ids: Tensor) -> Tensor:
        """``[B]`` advantages of ``rewards [B]`` grouped by ``group_ids [B]``."""
        return compute_advantages(
            rewards, group_ids, self.name, k=self.k, quantile_method=self.quantile_method
        )


def parse_estimator(spec: str) -> LabEstimator:
    """Parse ``"name"`` or ``"name:K"`` (e.g. ``"qae:0.4"``, ``"grpo"``) into a LabEstimator."""
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"estimator must be 'name' or 'name:K', got estimator={spec!r}")
    name, _, k = spec.strip().partition(":")
    if not k:
        return LabEstimator(name)
    try:
        return LabEstimator(name, float(k))
    except ValueError as err:
        if "unknown" in str(err):
            raise
        raise ValueError(f"estimator {spec!r}: K must be a number in (0, 1)") from None


# --------------------------------------------------------------------------------------
# Reward levels and composition tables


def _levels(rewards: Tensor) -> tuple[tuple[float, ...], Tensor]:
    """Distinct reward values (sorted) and each candidate's level index ``[P, M]``."""
    values, index = torch.unique(rewards.to(_DTYPE), sorted=True, return_inverse=True)
    return tuple(float(v) for v in values), index


def _level_mass(logits: Tensor, index: Tensor, num_levels: int) -> Tensor:
    """Policy mass ``q [P, L]`` on each reward level."""
    pi = torch.softmax(logits.to(_DTYPE), dim=1)  # [P, M]
    q = torch.zeros(pi.shape[0], num_levels, dtype=_DTYPE)
    return q.scatter_add_(1, index, pi)


@lru_cache(maxsize=64)
def _compositions(n: int, num_levels: int) -> Tensor:
    """All ways to split n responses over L levels: ``[C, L]`` long, C = binom(n+L-1, L-1)."""
    rows = []
    for bars in itertools.combinations(range(n + num_levels - 1), num_levels - 1):
        edges = (-1, *bars, n + num_levels - 1)
        rows.append([edges[i + 1] - edges[i] - 1 for i in range(num_levels)])
    return torch.tensor(rows, dtype=torch.long).reshape(-1, num_levels)


def _representative_rewards(counts: Tensor, levels: tuple[float, ...]) -> Tensor:
    """Rewards ``[R, G]`` of groups with level counts ``counts [R, L]`` (sorted by level)."""
    values = torch.tensor(levels, dtype=_DTYPE)
    rows = [torch.repeat_interleave(values, c) for c in counts]
    return torch.stack(rows)


def _check_table_size(num_groups: int, group_size: int) -> None:
    if num_groups * group_size > _MAX_TABLE_RESPONSES:
        raise ValueError(
            f"exact expectation needs {num_groups * group_size} representative responses "
            f"(too many reward levels for group_size={group_size}); use fewer distinct "
            f"reward values or sampled steps"
        )


@lru_cache(maxsize=256)
def _advantage_table(
    levels: tuple[float, ...], group_size: int, est: LabEstimator
) -> tuple[Tensor, Tensor]:
    """``f [C, L]``: advantage of a level-l response whose G-1 group mates have counts c.

    Returns ``(f, compositions of G-1 [C, L])``.
    """
    num_levels = len(levels)
    others = _compositions(group_size - 1, num_levels)  # [C, L]
    c = others.shape[0]
    _check_table_size(c * num_levels, group_size)
    own = torch.eye(num_levels, dtype=torch.long)  # [L, L]
    counts = (others[:, None, :] + own[None, :, :]).reshape(-1, num_levels)  # [C*L, L]
    rewards = _representative_rewards(counts, levels)  # [C*L, G]
    ids = torch.arange(counts.shape[0]).repeat_interleave(group_size)
    adv = est.advantages(rewards.reshape(-1), ids).reshape(-1, group_size)  # [C*L, G]
    # Position of the first level-l response in its sorted group.
    level = torch.arange(num_levels).repeat(c)  # [C*L]
    first = torch.cumsum(counts, dim=1) - counts  # [C*L, L]
    pos = first.gather(1, level[:, None]).squeeze(1)  # [C*L]
    f = adv.gather(1, pos[:, None]).squeeze(1).reshape(c, num_levels)  # [C, L]
    return f, others


@lru_cache(maxsize=256)
def _regime_table(levels: tuple[float, ...], group_size: int, est: LabEstimator) -> Tensor:
    """``[C, 3]`` float: (degenerate, hard, easy) label of each full-group composition."""
    full = _compositions(group_size, len(levels))  # [C, L]
    _check_table_size(full.shape[0], group_size)
    rewards = _representative_rewards(full, levels)  # [C, G], sorted
    ids = torch.arange(full.shape[0]).repeat_interleave(group_size)
    q = group_quantile(rewards.reshape(-1), ids, est.k, method=est.quantile_method)
    q = q.reshape(-1, group_size)[:, 0]  # [C]
    degenerate = (full > 0).sum(dim=1) <= 1
    hard = ~degenerate & (q == rewards[:, 0])
    easy = ~degenerate & (q == rewards[:, -1])
    return torch.stack([degenerate, hard, easy], dim=1).to(_DTYPE)


def _multinomial_pmf(q: Tensor, counts: Tensor) -> Tensor:
    """``[P, C]`` probability of each composition ``counts [C, L]`` under ``q [P, L]``."""
    n = int(counts[0].sum())
    m = counts.to(_DTYPE)  # [C, L]
    log_coef = math.lgamma(n + 1) - torch.lgamma(m + 1).sum(dim=1)  # [C]
    # xlogy gives 0 * log 0 = 0; a positive count on an empty level gives -inf (pmf 0).
    log_p = torch.xlogy(m[None, :, :], q[:, None, :]).sum(dim=2)  # [P, C]
    return torch.exp(log_coef[None, :] + log_p)


def _check_inputs(logits: Tensor, rewards: Tensor, group_size: int) -> None:
    if not isinstance(logits, Tensor) or logits.dim() != 2 or logits.shape[1] < 2:
        raise ValueError("logits must be a [P, M] tensor with M >= 2")
    if not isinstance(rewards, Tensor) or rewards.shape != logits.shape:
        raise ValueError(f"rewards must have the shape of logits {tuple(logits.shape)}")
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 2:
        raise ValueError(f"group_size must be an integer >= 2, got group_size={group_size!r}")


# --------------------------------------------------------------------------------------
# Expectations over the sampling of a group


def expected_advantages(
    logits: Tensor, rewards: Tensor, *, group_size: int, estimator: LabEstimator
) -> Tensor:
    """``Abar [P, M]``: each candidate's expected advantage given that it is sampled.

    ``Abar(a) = E[A_1 | y_1 = a]`` with the other G-1 responses drawn from the policy; see
    the module docstring. The expected step is ``lr * update_direction(logits, Abar)``.
    """
    _check_inputs(logits, rewards, group_size)
    levels, index = _levels(rewards)
    f, others = _advantage_table(levels, group_size, estimator)  # [C, L], [C, L]
    q = _level_mass(logits, index, len(levels))  # [P, L]
    per_level = _multinomial_pmf(q, others) @ f  # [P, L]
    return per_level.gather(1, index)


def expected_zero_fraction(
    logits: Tensor, rewards: Tensor, *, group_size: int, estimator: LabEstimator
) -> Tensor:
    """``[P]`` expected fraction of a prompt's G responses whose advantage is exactly 0.

    ``E[#zero / G] = sum_l q_l * P(f_l(m' + e_l) == 0)`` by exchangeability.
    """
    _check_inputs(logits, rewards, group_size)
    levels, index = _levels(rewards)
    f, others = _advantage_table(levels, group_size, estimator)
    q = _level_mass(logits, index, len(levels))  # [P, L]
    zero_given_level = _multinomial_pmf(q, others) @ (f == 0).to(_DTYPE)  # [P, L]
    return (q * zero_given_level).sum(dim=1)


def expected_regimes(
    logits: Tensor, rewards: Tensor, *, group_size: int, estimator: LabEstimator
) -> dict[str, Tensor]:
    """Probability ``[P]`` that a prompt's group is degenerate, hard or easy.

    Degenerate: all G rewards equal. Hard: the group's K-quantile equals its minimum
    (binary rewards: success rate <= 1 - K). Easy: it equals the maximum. Summing over
    prompts gives the expected regime counts of a batch.
    """
    _check_inputs(logits, rewards, group_size)
    levels, index = _levels(rewards)
    table = _regime_table(levels, group_size, estimator)  # [C, 3]
    q = _level_mass(logits, index, len(levels))
    probs = _multinomial_pmf(q, _compositions(group_size, len(levels))) @ table  # [P, 3]
    return {"degenerate": probs[:, 0], "hard": probs[:, 1], "easy": probs[:, 2]}


def zero_fraction_closed_form(p: Tensor, *, group_size: int, estimator: LabEstimator) -> Tensor:
    """Expected zero-advantage fraction ``[P]`` for binary rewards with success rate ``p [P]``.

    With c ~ Binomial(G, p) successes: groups with c in {0, G} are all zero. Mean-type
    baselines (``grpo``, ``drgrpo``, ``rloo``) give no other zeros, so the fraction is
    ``p^G + (1-p)^G``. The ``qae`` baseline (``inverted_cdf``) is the ``ceil(G K)``-th
    smallest reward, 0 iff ``c <= G - ceil(G K)`` (hard: the G - c failures get 0) and 1
    otherwise (easy: the c successes get 0), so

        E = sum_c Bin(c; G, p) * [1 if c in {0, G}; (G-c)/G if hard; c/G if easy].
    """
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 2:
        raise ValueError(f"group_size must be an integer >= 2, got group_size={group_size!r}")
    g = group_size
    p = torch.as_tensor(p, dtype=_DTYPE)
    if estimator.name in ("grpo", "drgrpo", "rloo"):
        return p**g + (1.0 - p) ** g
    if estimator.name != "qae" or estimator.quantile_method != "inverted_cdf":
        raise ValueError(
            f"closed form known for grpo, drgrpo, rloo and qae with inverted_cdf, got "
            f"estimator={estimator.name!r}, quantile_method={estimator.quantile_method!r}"
        )
    j = min(max(math.ceil(g * estimator.k - 1e-9), 1), g)  # 1-based rank of the baseline
    c = torch.arange(g + 1, dtype=_DTYPE)
    zeros = torch.where(c <= g - j, (g - c) / g, c / g)
    zeros[0] = zeros[-1] = 1.0
    log_binom = math.lgamma(g + 1) - torch.lgamma(c + 1) - torch.lgamma(g - c + 1)  # [G+1]
    pmf = torch.exp(log_binom + torch.xlogy(c, p[..., None]) + torch.xlogy(g - c, 1 - p[..., None]))
    return (pmf * zeros).sum(dim=-1)


def expected_update(
    logits: Tensor,
    rewards: Tensor,
    *,
    group_size: int,
    estimator: LabEstimator,
    lr: float,
    update: str = "pg",
) -> Tensor:
    """``[P, M]`` expected logit step over the sampling of G responses per prompt.

    ``lr * update_direction(logits, expected_advantages(...), update=update)``.
    """
    abar = expected_advantages(logits, rewards, group_size=group_size, estimator=estimator)
    return lr * update_direction(logits, abar, update=update)


# --------------------------------------------------------------------------------------
# Sampled steps


@dataclass(frozen=True)
class SampledStep:
    """One sampled step.

    Attributes:
        dz: ``[P, M]`` logit update.
        samples: ``[P, G]`` long, sampled candidate ids.
        rewards: ``[P, G]`` rewards of the samples.
        advantages: ``[P, G]`` their advantages.
        stats: :func:`qae.advantage_stats` of the batch (zero fraction, regime counts).
    """

    dz: Tensor
    samples: Tensor
    rewards: Tensor
    advantages: Tensor
    stats: dict[str, float]


def sample_update(
    logits: Tensor,
    rewards: Tensor,
    *,
    group_size: int,
    estimator: LabEstimator,
    lr: float,
    update: str = "pg",
    generator: torch.Generator | None = None,
) -> SampledStep:
    """Sample G responses per prompt, score them, and build the logit step.

    See the module docstring for the three update models; each is an unbiased estimate
    of :func:`expected_update`.

    Args:
        logits: ``[P, M]`` current logits.
        rewards: ``[P, M]`` candidate rewards.
        group_size: G >= 2 responses per prompt.
        estimator: the advantage estimator.
        lr: step size.
        update: one of ``pg``, ``npg``, ``logit``.
        generator: torch generator for the sampling (seeded runs).
    """
    _check_inputs(logits, rewards, group_size)
    if update not in UPDATES:
        raise ValueError(f"unknown update={update!r}; expected one of {', '.join(UPDATES)}")
    p_count = logits.shape[0]
    pi = torch.softmax(logits.to(_DTYPE), dim=1)  # [P, M]
    samples = torch.multinomial(pi, group_size, replacement=True, generator=generator)  # [P, G]
    r = rewards.to(_DTYPE).gather(1, samples)  # [P, G]
    ids = torch.arange(p_count).repeat_interleave(group_size)  # [P*G]
    adv = estimator.advantages(r.reshape(-1), ids).reshape(p_count, group_size)  # [P, G]
    method = estimator.quantile_method
    stats = advantage_stats(
        adv.reshape(-1), r.reshape(-1), ids, k=estimator.k, quantile_method=method
    )
    per_candidate = torch.zeros_like(pi).scatter_add_(1, samples, adv) / group_size  # [P, M]
    if update == "logit":
        direction = per_candidate
    elif update == "npg":
        direction = per_candidate / pi
    else:
        direction = per_candidate - adv.mean(dim=1, keepdim=True) * pi
    return SampledStep(lr * direction, samples, r, adv, stats)
