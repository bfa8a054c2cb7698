"""Entropy diagnostics that explain a run (pure functions over token tensors).

Shapes: B responses, T response tokens. ``mask [B, T]`` marks valid tokens.

First-order entropy change (Cui et al. 2025; the QAE paper): under a softmax policy-gradient
step the change of the policy's entropy is approximately ``-eta * Cov(log pi, A)`` over the
sampled tokens. The covariance is a sum over tokens,

    C = (1/N) sum_t (l_t - mean l)(A_t - mean A),

so it splits exactly into the parts of any partition of the tokens: by advantage sign
(positive, negative, zero) or by the regime of the token's group (hard, easy, other). A
positive part pushes entropy down, a negative part pushes it up.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

__all__ = [
    "COLLAPSE_RATIO",
    "EXPLOSION_RATIO",
    "VERDICT_WINDOW",
    "covariance_parts",
    "REWARD_COLLAPSE_RATIO",
    "entropy_histogram",
    "entropy_verdict",
    "length_volatility",
    "regime_token_masks",
    "reward_verdict",
    "sign_token_masks",
    "token_views",
    "tracking",
]


def _check(name: str, x: Tensor, mask: Tensor) -> None:
    if x.shape != mask.shape or x.dim() != 2:
        raise ValueError(
            f"{name} must be [B, T] like mask {tuple(mask.shape)}, got {tuple(x.shape)}"
        )


def covariance_parts(
    logp: Tensor, advantages: Tensor, mask: Tensor, parts: Mapping[str, Tensor]
) -> dict[str, float]:
    """The token covariance ``Cov(log pi, A)`` and its share from each part.

    Args:
        logp: ``[B, T]`` log-probs of the sampled tokens.
        advantages: ``[B, T]`` token advantages.
        mask: ``[B, T]`` valid tokens.
        parts: name -> ``[B, T]`` bool mask; parts that partition the valid tokens sum
            to the total.

    Returns:
        ``{"total": C, name: C_part, ...}`` (0 when there are no valid tokens).
    """
    _check("logp", logp, mask)
    _check("advantages", advantages, mask)
    valid = mask != 0
    n = int(valid.sum())
    out = {"total": 0.0, **dict.fromkeys(parts, 0.0)}
    if n == 0:
        return out
    lp = logp.double()
    a = advantages.double()
    term = (lp - lp[valid].mean()) * (a - a[valid].mean())  # [B, T]
    term = torch.where(valid, term, torch.zeros_like(term))
    out["total"] = float(term.sum()) / n
    for name, part in parts.items():
        _check(f"parts[{name!r}]", part.to(term.dtype), mask)
        out[name] = float(term[part.bool() & valid].sum()) / n
    return out


def sign_token_masks(advantages: Tensor, mask: Tensor) -> dict[str, Tensor]:
    """``pos`` / ``neg`` / ``zero`` advantage tokens (a partition of the valid tokens)."""
    valid = mask != 0
    return {
        "pos": valid & (advantages > 0),
        "neg": valid & (advantages < 0),
        "zero": valid & (advantages == 0),
    }


def regime_token_masks(regime: Sequence[str], mask: Tensor) -> dict[str, Tensor]:
    """``hard`` / ``easy`` / ``other`` tokens from a per-response regime label ``[B]``."""
    valid = mask != 0
    out = {}
    for name in ("hard", "easy"):
        rows = torch.tensor([r == name for r in regime], dtype=torch.bool)
        out[name] = valid & rows[:, None]
    out["other"] = valid & ~out["hard"] & ~out["easy"]
    return out


def token_views(
    entropy: Tensor,
    advantages: Tensor,
    mask: Tensor,
    logit_grad_norm: Tensor | None = None,
    *,
    top_frac: float = 0.2,
) -> dict[str, float]:
    """Where the update's weight falls among tokens.

    Returns ``entropy_all`` (mean token entropy), ``entropy_nonzero_adv`` (mean over
    tokens with a non-zero advantage) and, given ``logit_grad_norm [B, T]`` (the norm of
    the loss gradient w.r.t. each token's logits), ``grad_share_top_entropy``: the share of
    the summed norm carried by the ``top_frac`` highest-entropy tokens ("forking" tokens).
    """
    _check("entropy", entropy, mask)
    valid = mask != 0
    out: dict[str, float] = {}
    ent = entropy.double()
    out["entropy_all"] = float(ent[valid].mean()) if valid.any() else 0.0
    nz = valid & (advantages != 0)
    out["entropy_nonzero_adv"] = float(ent[nz].mean()) if nz.any() else 0.0
    if logit_grad_norm is not None:
        _check("logit_grad_norm", logit_grad_norm, mask)
        e = ent[valid]
        g = logit_grad_norm.double()[valid]
        total = float(g.sum())
        if e.numel() and total > 0:
            top = max(1, math.ceil(top_frac * e.numel()))
            idx = torch.topk(e, top).indices
            out["grad_share_top_entropy"] = float(g[idx].sum()) / total
        else:
            out["grad_share_top_entropy"] = 0.0
    return out


def entropy_histogram(
    entropy: Tensor, mask: Tensor, *, bins: int = 20, max_entropy: float | None = None
) -> dict[str, list[float]]:
    """Counts of valid token entropies in ``bins`` equal bins on ``[0, max_entropy]``."""
    _check("entropy", entropy, mask)
    e = entropy.double()[mask != 0]
    hi = float(max_entropy if max_entropy is not None else (e.max() if e.numel() else 1.0))
    hi = hi if hi > 0 else 1.0
    counts = torch.histc(e, bins=bins, min=0.0, max=hi) if e.numel() else torch.zeros(bins)
    edges = torch.linspace(0.0, hi, bins + 1)
    return {"edges": edges.tolist(), "counts": counts.tolist()}


def tracking(predicted: Sequence[float], measured: Sequence[float]) -> dict[str, float]:
    """How well a predicted entropy change tracks the measured one over a run.

    Returns the Pearson correlation (NaN when either series is constant), the fraction of
    steps where the signs agree (over steps where both are non-zero) and the count.
    """
    if len(predicted) != len(measured):
        raise ValueError(f"predicted has {len(predicted)} values, measured {len(measured)}")
    p = torch.tensor(list(predicted), dtype=torch.float64)
    m = torch.tensor(list(measured), dtype=torch.float64)
    n = p.numel()
    corr = float("nan")
    if n > 1 and float(p.std()) > 0 and float(m.std()) > 0:
        corr = float(torch.corrcoef(torch.stack([p, m]))[0, 1])
    both = (p != 0) & (m != 0)
    agree = (
        float((torch.sign(p[both]) == torch.sign(m[both])).double().mean())
        if both.any()
        else float("nan")
    )
    return {"corr": corr, "sign_agreement": agree, "n": float(n)}


def length_volatility(mean_lengths: Sequence[float], window: int = 20) -> float:
    """Std of the per-step mean response length over the last ``window`` steps."""
    if window < 2:
        raise ValueError(f"window must be >= 2, got {window}")
    tail = list(mean_lengths)[-window:]
    if len(tail) < 2:
        return 0.0
    return float(torch.tensor(tail, dtype=torch.float64).std())


# The one definition of an unstable run used by every report: entropy below half, or above
# twice, its initial value for a sustained window of steps.
COLLAPSE_RATIO = 0.5
EXPLOSION_RATIO = 2.0
VERDICT_WINDOW = 10


def _series(
    series: Sequence[float], initial: float | None, window: int, what: str
) -> tuple[list[float], float]:
    """The values as floats and the reference value (``initial``, else the first), checked."""
    values = [float(x) for x in series]
    if window < 1:
        raise ValueError(f"window must be >= 1, got {window}")
    if not values:
        raise ValueError(f"{what} is empty")
    ref = values[0] if initial is None else float(initial)
    if not ref > 0:
        raise ValueError(f"initial {what} must be > 0, got {ref}")
    return values, ref


def entropy_verdict(
    entropy: Sequence[float],
    *,
    initial: float | None = None,
    collapse_ratio: float = COLLAPSE_RATIO,
    explosion_ratio: float = EXPLOSION_RATIO,
    window: int = VERDICT_WINDOW,
) -> dict[str, float | str]:
    """Collapse / explosion verdict from a run's per-step entropy.

    A run ``collapsed`` when its entropy stays below ``collapse_ratio * initial`` for
    ``window`` consecutive steps, ``exploded`` when it stays above ``explosion_ratio *
    initial`` as long (whichever happens first), else it is ``stable``. ``initial``
    defaults to the first value.

    Returns ``{"verdict": ..., "step": index where the sustained window began (-1 when
    stable), "initial": ..., "min_ratio": ..., "max_ratio": ...}``.
    """
    values, h0 = _series(entropy, initial, window, "entropy")
    ratios = [v / h0 for v in values]
    low_run = high_run = 0
    for i, r in enumerate(ratios):
        low_run = low_run + 1 if r < collapse_ratio else 0
        high_run = high_run + 1 if r > explosion_ratio else 0
        if low_run >= window:
            verdict, start = "collapsed", i - window + 1
            break
        if high_run >= window:
            verdict, start = "exploded", i - window + 1
            break
    else:
        verdict, start = "stable", -1
    return {
        "verdict": verdict,
        "step": float(start),
        "initial": h0,
        "min_ratio": min(ratios),
        "max_ratio": max(ratios),
    }


# A run's reward collapsed when its training accuracy stays below half its initial value
# for the same sustained window: the policy drifted to wrong answers.
REWARD_COLLAPSE_RATIO = 0.5


def reward_verdict(
    accuracy: Sequence[float],
    *,
    initial: float | None = None,
    collapse_ratio: float = REWARD_COLLAPSE_RATIO,
    window: int = VERDICT_WINDOW,
) -> dict[str, float | str]:
    """Reward-collapse verdict from a run's per-step training accuracy.

    A run's reward ``collapsed`` when the mean accuracy over some ``window`` consecutive
    steps falls below ``collapse_ratio * initial``, else it ``held``. ``initial`` defaults
    to the first value (the start checkpoint's accuracy, before any update). A window mean,
    not a run of single steps, because one step's accuracy is a binomial sample of a few
    hundred responses: single steps cross the threshold by chance, a window mean rarely
    does. This catches the failure the entropy verdict can miss: a policy that drifts to
    confident wrong answers, whose groups are then all wrong and (under dynamic sampling)
    train on nothing.

    Returns ``{"verdict": "held" | "collapsed", "step": index where the first such window
    began (-1 when held), "initial": ..., "min_ratio": lowest window mean / initial (the
    lowest single value / initial when the series is shorter than a window)}``.
    """
    values, a0 = _series(accuracy, initial, window, "accuracy")
    x = torch.tensor(values, dtype=torch.float64)
    if len(values) < window:
        return {"verdict": "held", "step": -1.0, "initial": a0, "min_ratio": float(x.min()) / a0}
    means = x.unfold(0, window, 1).mean(dim=1) / a0  # [N - window + 1]
    below = (means < collapse_ratio).nonzero().flatten()
    start = int(below[0]) if below.numel() else -1
    return {
        "verdict": "collapsed" if start >= 0 else "held",
        "step": float(start),
        "initial": a0,
        "min_ratio": float(means.min()),
    }
