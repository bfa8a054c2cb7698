"""Tabular softmax policies: P prompts, each a softmax over M candidate responses.

Shapes: P prompts, M candidate responses per prompt, G sampled responses per prompt.
Logits are a ``[P, M]`` tensor ``z``, the policy is ``pi = softmax(z)`` row by row and
each candidate carries a reward in [0, 1] (``[P, M]``; binary correctness or partial
credit). Everything runs in float64.

Update models. One policy-gradient step changes the logits by ``dz [P, M]``. For a
per-candidate advantage ``A [P, M]`` (for a constant baseline b, ``A = r - b``) the lab
knows three ways to turn advantages into a logit step of size ``eta``:

``pg`` (vanilla softmax policy gradient). The surrogate of one step is
``L(z) = (1/G) sum_i A_i log pi_z(y_i)`` with ``y_i ~ pi`` and the advantages held fixed.
Since ``d log pi_z(y) / dz_a = 1[a = y] - pi(a)``, its expectation over the sampling has
gradient

    dz(a) = eta * pi(a) * (A(a) - E_pi[A]).

For ``A = r - b`` this is ``eta * pi(a) * (r(a) - E_pi[r])``, the gradient of the expected
reward ``E_{pi_z}[r]``: a constant baseline drops out of the expected step.

``npg`` (natural policy gradient). The Fisher matrix of a softmax is
``F = diag(pi) - pi pi^T`` and ``F A = pi * (A - E_pi[A])``, so the natural step is
``dz(a) = eta * A(a)`` up to a constant shift of the row (which leaves pi unchanged).
This is the setting of Cui et al. 2025 ("The Entropy Mechanism of Reinforcement Learning
for Reasoning Language Models", arXiv 2505.22617): ``dH ~= -eta Cov_pi(log pi, A)``.
Again a constant baseline drops out.

``logit`` (the QAE paper's first-order model). ``dz(a) = eta * pi(a) * A(a)``: Cui et
al.'s vanilla-PG formula with the baseline-shifted reward used as the advantage, i.e.
without the centering term ``-eta pi(a) E_pi[A]``. It is the expected step of raising
only the sampled responses' own logits (gradient ascent on ``(1/G) sum_i A_i z_{y_i}``).
Under this model, and only under it, a constant baseline moves the entropy:

    dH ~= -eta Cov_pi(log pi, pi * (r - b))
        = -eta Cov_pi(log pi, pi * r) + eta * b * Cov_pi(log pi, pi),

and ``Cov_pi(log pi, pi) >= 0`` (two increasing functions of the same variable; zero only
for a uniform row), so the one-step entropy change is increasing in b. This is the
monotonicity behind the QAE paper's two-sided entropy bound (arXiv 2509.22611): the
quantile baseline b = 0 on hard prompts and b = 1 on easy prompts sits at the two ends of
[0, 1]. Under ``pg`` and ``npg`` the constant baseline has no effect on the expected step;
group baselines that depend on the sample still do (see :mod:`qae.lab.groups`).

Entropy change. ``H(z) = -sum_a pi(a) log pi(a)`` has ``dH/dz_a = -pi(a)(log pi(a) + H)``,
so to first order ``H(z + dz) - H(z) ~= -Cov_{a ~ pi}(log pi(a), dz(a))``
(:func:`predicted_entropy_change`); :func:`exact_entropy_change` evaluates the left side.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = [
    "DEFAULT_MIX",
    "REWARD_KINDS",
    "UPDATES",
    "LabProblem",
    "baseline_entropy_change",
    "exact_entropy_change",
    "make_problem",
    "make_prompt",
    "parse_mix",
    "pass_at_k",
    "policy_entropy",
    "predicted_entropy_change",
    "success_probability",
    "update_direction",
]

UPDATES = ("pg", "npg", "logit")
REWARD_KINDS = ("binary", "partial")
# success rate under the initial policy : weight of prompts at that difficulty
DEFAULT_MIX = "0.1:0.4,0.4:0.3,0.8:0.3"
# Partial credit of the incorrect candidates when reward="partial".
PARTIAL_LEVELS = (0.0, 0.5)
_DTYPE = torch.float64


def _check_choice(field: str, value: object, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"unknown {field}={value!r}; expected one of {', '.join(choices)}")


def _check_logits(logits: Tensor) -> None:
    if not isinstance(logits, Tensor) or logits.dim() != 2 or logits.shape[1] < 2:
        shape = tuple(logits.shape) if isinstance(logits, Tensor) else type(logits).__name__
        raise ValueError(f"logits must be a [P, M] tensor with M >= 2, got {shape}")


def _check_pair(name: str, x: Tensor, logits: Tensor) -> None:
    if not isinstance(x, Tensor) or x.shape != logits.shape:
        shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
        raise ValueError(f"{name} must have the shape of logits {tuple(logits.shape)}, got {shape}")


# --------------------------------------------------------------------------------------
# Problems


@dataclass(frozen=True)
class LabProblem:
    """A batch of tabular prompts.

    Attributes:
        logits: ``[P, M]`` float64 initial logits.
        rewards: ``[P, M]`` float64 reward of each candidate in [0, 1] (1 = correct).
        difficulty: ``[P]`` float64 success rate each prompt was drawn at.
    """

    logits: Tensor
    rewards: Tensor
    difficulty: Tensor

    @property
    def correct(self) -> Tensor:
        """``[P, M]`` bool: the candidate is correct (reward 1)."""
        return self.rewards >= 1.0


def parse_mix(spec: str) -> list[tuple[float, float]]:
    """Parse a difficulty mix ``"p1:w1,p2:w2,..."`` into (success rate, weight) pairs.

    ``p`` is a prompt's success probability under the initial policy, in (0, 1); the
    weights are relative (normalized here). ``"0.1:0.5,0.8:0.5"`` is half hard prompts
    (10% of the probability mass on correct candidates), half easy ones (80%).
    """
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"mix must be a string 'p:w,p:w,...', got mix={spec!r}")
    out: list[tuple[float, float]] = []
    for part in spec.split(","):
        fields = part.strip().split(":")
        try:
            p = float(fields[0])
            w = float(fields[1]) if len(fields) == 2 else (1.0 if len(fields) == 1 else None)
        except ValueError:
            w = None
        if w is None or not (0.0 < p < 1.0) or not (w > 0.0 and math.isfinite(w)):
            raise ValueError(
                f"mix entry {part.strip()!r} must be 'p:w' with p in (0, 1) and weight w > 0 "
                f"(mix={spec!r})"
            )
        out.append((p, w))
    total = sum(w for _, w in out)
    return [(p, w / total) for p, w in out]


def _place_mass(z: Tensor, correct: Tensor, p: Tensor) -> Tensor:
    """Shift the correct candidates' logits ``z [P, M]`` so their mass is exactly ``p [P]``."""
    neg = torch.tensor(-math.inf, dtype=z.dtype)
    lse_c = torch.logsumexp(torch.where(correct, z, neg), dim=1)  # [P]
    lse_w = torch.logsumexp(torch.where(correct, neg, z), dim=1)  # [P]
    shift = torch.log(p) - torch.log1p(-p) - (lse_c - lse_w)  # [P]
    return z + correct.to(z.dtype) * shift[:, None]


def _draw(
    success: Tensor, num_candidates: int, *, reward: str, logit_std: float, gen: torch.Generator
) -> tuple[Tensor, Tensor]:
    """Logits and rewards ``[P, M]`` whose initial success probability is ``success [P]``."""
    p_count = success.numel()
    m = num_candidates
    z = torch.randn(p_count, m, generator=gen, dtype=_DTYPE) * logit_std  # [P, M]
    # Hard prompts have few correct candidates, easy prompts many (at least one of each).
    n_correct = (success * m).round().clamp(1, m - 1).long()  # [P]
    order = torch.rand(p_count, m, generator=gen, dtype=_DTYPE).argsort(dim=1)  # [P, M]
    correct = torch.zeros(p_count, m, dtype=torch.bool)
    correct.scatter_(1, order, torch.arange(m)[None, :] < n_correct[:, None])
    rewards = correct.to(_DTYPE)
    if reward == "partial":
        pick = torch.randint(len(PARTIAL_LEVELS), (p_count, m), generator=gen)
        partial = torch.tensor(PARTIAL_LEVELS, dtype=_DTYPE)[pick]
        rewards = torch.where(correct, rewards, partial)
    return _place_mass(z, correct, success), rewards


def make_problem(
    num_prompts: int,
    num_candidates: int,
    *,
    mix: str = DEFAULT_MIX,
    reward: str = "binary",
    logit_std: float = 1.0,
    spread: float = 0.3,
    seed: int = 0,
) -> LabProblem:
    """Draw a seeded batch of prompts with a mix of difficulties.

    Each prompt picks a difficulty p0 from ``mix`` (see :func:`parse_mix`), then its
    initial success rate ``sigmoid(logit(p0) + spread * N(0, 1))`` (clipped to
    [0.01, 0.99]); about ``p * M`` of its candidates are correct (at least one correct and
    one incorrect), the logits are Gaussian with std ``logit_std`` and the correct
    candidates' logits are shifted so that their probability mass is exactly that rate.

    Args:
        num_prompts: P >= 1.
        num_candidates: M >= 2.
        mix: difficulty mix, ``"p:w,..."``.
        reward: ``binary`` (correct 1, else 0) or ``partial`` (incorrect candidates get a
            partial credit drawn from ``PARTIAL_LEVELS``).
        logit_std: spread of the initial logits (0 gives a uniform policy within the
            correct and the incorrect candidates).
        spread: std of the per-prompt success rate around its center, in log-odds.
        seed: random seed; equal seeds give equal problems.

    Returns:
        A :class:`LabProblem` with ``[P, M]`` logits and rewards.
    """
    if num_prompts < 1:
        raise ValueError(f"num_prompts must be >= 1, got num_prompts={num_prompts}")
    if num_candidates < 2:
        raise ValueError(f"num_candidates must be >= 2, got num_candidates={num_candidates}")
    _check_choice("reward", reward, REWARD_KINDS)
    if not (logit_std >= 0.0 and math.isfinite(logit_std)):
        raise ValueError(f"logit_std must be a finite number >= 0, got logit_std={logit_std!r}")
    if not (spread >= 0.0 and math.isfinite(spread)):
        raise ValueError(f"spread must be a finite number >= 0, got spread={spread!r}")
    centers = parse_mix(mix)
    gen = torch.Generator().manual_seed(seed)
    weights = torch.tensor([w for _, w in centers], dtype=_DTYPE)
    comp = torch.multinomial(weights, num_prompts, replacement=True, generator=gen)  # [P]
    mean = torch.tensor([p for p, _ in centers], dtype=_DTYPE)[comp]  # [P]
    # Logit-normal around each center: the spread is the same in log-odds for every p0.
    noise = torch.randn(num_prompts, generator=gen, dtype=_DTYPE) * spread  # [P]
    success = torch.sigmoid(torch.logit(mean) + noise).clamp(0.01, 0.99)  # [P]
    logits, rewards = _draw(success, num_candidates, reward=reward, logit_std=logit_std, gen=gen)
    return LabProblem(logits=logits, rewards=rewards, difficulty=success)


def make_prompt(
    success: float,
    num_candidates: int,
    *,
    reward: str = "binary",
    logit_std: float = 1.0,
    seed: int = 0,
) -> tuple[Tensor, Tensor]:
    """One prompt with initial success probability exactly ``success``.

    Returns:
        ``(logits [1, M], rewards [1, M])``, float64.
    """
    if not (0.0 < success < 1.0):
        raise ValueError(f"success must be in (0, 1), got success={success!r}")
    if num_candidates < 2:
        raise ValueError(f"num_candidates must be >= 2, got num_candidates={num_candidates}")
    _check_choice("reward", reward, REWARD_KINDS)
    gen = torch.Generator().manual_seed(seed)
    p = torch.tensor([success], dtype=_DTYPE)
    return _draw(p, num_candidates, reward=reward, logit_std=logit_std, gen=gen)


# --------------------------------------------------------------------------------------
# Policy quantities


def policy_entropy(logits: Tensor) -> Tensor:
    """Entropy in nats of each row's softmax: ``[P, M] -> [P]``."""
    _check_logits(logits)
    logp = torch.log_softmax(logits.to(_DTYPE), dim=1)  # [P, M]
    return -(logp.exp() * logp).sum(dim=1)


def success_probability(logits: Tensor, rewards: Tensor) -> Tensor:
    """Expected reward ``E_pi[r]`` per prompt, ``[P]``.

    With binary rewards it is the probability mass on correct candidates (the expected
    accuracy, pass@1).
    """
    _check_logits(logits)
    _check_pair("rewards", rewards, logits)
    return (torch.softmax(logits.to(_DTYPE), dim=1) * rewards.to(_DTYPE)).sum(dim=1)


def pass_at_k(p: Tensor, k: int) -> Tensor:
    """pass@k of a prompt whose single-sample success probability is ``p``: ``1 - (1-p)^k``.

    Exact for a policy that samples k independent responses (binary rewards).
    """
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be an integer >= 1, got k={k!r}")
    return -torch.expm1(k * torch.log1p(-p.clamp(max=1.0)))


def update_direction(logits: Tensor, advantages: Tensor, *, update: str = "pg") -> Tensor:
    """The expected logit step per unit learning rate for per-candidate advantages.

    ``pg``: ``pi * (A - E_pi[A])``; ``npg``: ``A``; ``logit``: ``pi * A`` (see the module
    docstring for the derivations).

    Args:
        logits: ``[P, M]`` current logits.
        advantages: ``[P, M]`` advantage of each candidate.
        update: one of :data:`UPDATES`.

    Returns:
        ``[P, M]`` float64 direction; multiply by the learning rate.
    """
    _check_logits(logits)
    _check_pair("advantages", advantages, logits)
    _check_choice("update", update, UPDATES)
    adv = advantages.to(_DTYPE)
    if update == "npg":
        return adv.clone()
    pi = torch.softmax(logits.to(_DTYPE), dim=1)  # [P, M]
    if update == "logit":
        return pi * adv
    return pi * (adv - (pi * adv).sum(dim=1, keepdim=True))


def exact_entropy_change(logits: Tensor, dz: Tensor) -> Tensor:
    """``H(softmax(z + dz)) - H(softmax(z))`` per prompt, ``[P]``."""
    _check_pair("dz", dz, logits)
    z = logits.to(_DTYPE)
    return policy_entropy(z + dz.to(_DTYPE)) - policy_entropy(z)


def predicted_entropy_change(logits: Tensor, dz: Tensor) -> Tensor:
    """First-order entropy change ``-Cov_{a ~ pi}(log pi(a), dz(a))`` per prompt, ``[P]``.

    The covariance form of Cui et al. 2025 and the QAE paper; it is the directional
    derivative of the entropy along ``dz``, exact as the step goes to zero.
    """
    _check_logits(logits)
    _check_pair("dz", dz, logits)
    logp = torch.log_softmax(logits.to(_DTYPE), dim=1)  # [P, M]
    pi = logp.exp()
    d = dz.to(_DTYPE)
    centered = logp - (pi * logp).sum(dim=1, keepdim=True)  # [P, M]
    return -(pi * centered * (d - (pi * d).sum(dim=1, keepdim=True))).sum(dim=1)


def baseline_entropy_change(
    logits: Tensor,
    rewards: Tensor,
    baseline: Tensor | float,
    *,
    lr: float,
    update: str = "logit",
) -> tuple[Tensor, Tensor]:
    """Exact and first-order entropy change of the expected step with a constant baseline.

    The advantage of candidate a is ``r(a) - b``; the step is
    ``lr * update_direction(logits, r - b, update=update)``.

    Args:
        logits: ``[P, M]`` logits.
        rewards: ``[P, M]`` rewards (a 0/1 correctness mask for binary rewards).
        baseline: a number or ``[P]`` per-prompt baseline.
        lr: step size eta (any sign; a negative step runs the update backwards).
        update: one of :data:`UPDATES`; ``logit`` is the model in which the change is
            increasing in the baseline.

    Returns:
        ``(exact [P], predicted [P])`` entropy changes in nats.
    """
    _check_logits(logits)
    _check_pair("rewards", rewards, logits)
    b = torch.as_tensor(baseline, dtype=_DTYPE)
    if b.dim() == 1:
        if b.numel() != logits.shape[0]:
            raise ValueError(
                f"baseline must be a number or [P] with P={logits.shape[0]}, "
                f"got shape {tuple(b.shape)}"
            )
        b = b[:, None]
    elif b.dim() != 0:
        raise ValueError(f"baseline must be a number or [P], got shape {tuple(b.shape)}")
    dz = lr * update_direction(logits, rewards.to(_DTYPE) - b, update=update)  # [P, M]
    return exact_entropy_change(logits, dz), predicted_entropy_change(logits, dz)
