"""Policy losses, loss aggregation and KL estimators for value-free policy gradient.

QAE changes only the baseline; the loss around it is chosen here by name
(``LossConfig.loss``): ``ppo`` (clipped surrogate with Clip-Higher and optional dual clip),
``gspo`` (sequence-level ratio), ``clip_cov`` and ``kl_cov`` (covariance-based entropy
controls). Every loss has the same signature::

    fn(logp, old_logp, advantages, mask, *, config, ref_logp=None, entropy=None,
       denominator=None, generator=None) -> (loss, metrics)

Shapes: B responses, T response tokens. ``logp``, ``old_logp``, ``ref_logp``,
``entropy`` and ``mask`` are ``[B, T]``; ``advantages`` is ``[B, T]`` or ``[B]`` (spread
over the tokens). ``loss`` is a scalar tensor to call ``backward`` on; ``metrics`` is a
dict of Python floats.

The total loss is ``pg_loss + kl_coef * agg(kl) - entropy_coef * agg(entropy)`` where
``agg`` is :func:`aggregate_loss` with ``LossConfig.agg``.

Micro-batches. A caller that splits a mini-batch into micro-batches and sums their
gradients gets the mini-batch gradient exactly when each call divides by the mini-batch's
counts: compute ``counts = batch_counts(mask_of_the_whole_mini_batch)`` once and pass
``denominator=counts`` to every call. (Clip-Cov and KL-Cov rank tokens within the tokens
of one call, so their token choice still depends on the split.)

Numerics: padding positions (``mask == 0``) are replaced by zeros before any arithmetic,
so garbage there (``-inf`` log-probs) never reaches the loss or its gradient; log-ratios
are clamped to [-20, 20] before ``exp``, as verl does. When every advantage is zero and
``kl_coef = entropy_coef = 0`` the gradient is exactly zero for every registered loss.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor

from qae.core.entropy import masked_mean, token_covariance
from qae.core.registry import Registry

__all__ = [
    "AGG_MODES",
    "KL_ESTIMATORS",
    "BatchCounts",
    "LossConfig",
    "PolicyLossFn",
    "aggregate_loss",
    "batch_counts",
    "clip_cov_loss",
    "compute_policy_loss",
    "gspo_loss",
    "kl_cov_loss",
    "kl_penalty",
    "policy_losses",
    "ppo_loss",
    "register_policy_loss",
]

AGG_MODES = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm")
KL_ESTIMATORS = ("k1", "k2", "k3")

# exp() of a log-ratio is taken after clamping it to this range.
_LOG_RATIO_CLAMP = 20.0
# GSPO's sequence log-ratio is clamped from above before exp(), as verl does.
_GSPO_LOG_RATIO_MAX = 10.0


def _finite_number(x: object) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


# --------------------------------------------------------------------------------------
# Config


@dataclass
class LossConfig:
    """Hyperparameters of the policy loss; every loss reads the fields it needs.

    Defaults follow DAPO for the clipped surrogate (Clip-Higher 0.2 / 0.28, token-mean),
    the GSPO paper for the sequence-level clip range and Cui et al. 2025 / verl for
    Clip-Cov and KL-Cov.
    """

    loss: str = "ppo"
    """Registered policy loss: ``ppo``, ``gspo``, ``clip_cov`` or ``kl_cov``."""

    clip_low: float = 0.2
    """Lower clip range eps_low: the ratio of a negative-advantage token is clipped at
    ``1 - clip_low``."""

    clip_high: float = 0.28
    """Upper clip range eps_high (Clip-Higher, DAPO 0.28): the ratio of a positive-advantage
    token is clipped at ``1 + clip_high``."""

    clip_ratio_c: float | None = None
    """Dual-clip constant c > 1 (Ye et al. 2020): the loss of a negative-advantage token is
    at most ``-A * c``. None turns it off; DAPO's verl recipes use 10."""

    agg: str = "token-mean"
    """Loss aggregation, verl's ``loss_agg_mode``: ``token-mean`` (DAPO),
    ``seq-mean-token-mean`` (GRPO), ``seq-mean-token-sum``, ``seq-mean-token-sum-norm``
    (Dr. GRPO). See :func:`aggregate_loss`. GSPO always uses ``seq-mean-token-mean`` for
    its surrogate."""

    max_len: int | None = None
    """Fixed normaliser of ``seq-mean-token-sum-norm`` (Dr. GRPO: the maximum response
    length). None uses the width T of the mask, which varies with padding: set it."""

    gspo_clip_low: float = 3e-4
    """GSPO lower clip range on the sequence ratio (GSPO paper: 3e-4)."""

    gspo_clip_high: float = 4e-4
    """GSPO upper clip range on the sequence ratio (GSPO paper: 4e-4)."""

    clip_cov_ratio: float = 2e-4
    """Clip-Cov: fraction of valid tokens whose gradient is detached (paper and verl:
    2e-4). At least one token is chosen when any is eligible."""

    clip_cov_lb: float = 1.0
    """Clip-Cov: a token is eligible when its covariance is above this bound (default 1)."""

    clip_cov_ub: float = 5.0
    """Clip-Cov: a token is eligible only when its covariance is below this bound
    (default 5)."""

    kl_cov_ratio: float = 2e-4
    """KL-Cov: fraction of valid tokens, the largest by covariance, that get the KL
    penalty. verl's default 2e-4 (the paper used 2e-3 for Qwen2.5-7B, 2e-4 for 32B)."""

    kl_cov_coef: float = 1.0
    """KL-Cov: coefficient beta of the ``|log pi - log pi_old|`` penalty. 1.0 as in the
    paper, its verl recipes and the fallback of verl's loss function (verl's
    ``PolicyLossConfig`` dataclass default is 0.1)."""

    kl_coef: float = 0.0
    """Coefficient of the KL penalty to the reference policy; 0 turns it off."""

    kl_estimator: str = "k3"
    """Estimator of KL(pi || pi_ref) per token: ``k1``, ``k2`` or ``k3`` (low variance);
    see :func:`kl_penalty`."""

    entropy_coef: float = 0.0
    """Coefficient of the entropy bonus (subtracted from the loss); 0 turns it off."""

    def __post_init__(self) -> None:
        for name in ("clip_low", "clip_high", "gspo_clip_low", "gspo_clip_high"):
            value = getattr(self, name)
            if not _finite_number(value) or value < 0:
                raise ValueError(f"{name} must be a finite number >= 0, got {name}={value!r}")
        if self.clip_low >= 1:
            raise ValueError(f"clip_low must be < 1, got clip_low={self.clip_low!r}")
        if self.gspo_clip_low >= 1:
            raise ValueError(f"gspo_clip_low must be < 1, got gspo_clip_low={self.gspo_clip_low!r}")
        c = self.clip_ratio_c
        if c is not None and (not _finite_number(c) or c <= 1):
            raise ValueError(f"clip_ratio_c must be None or a number > 1, got clip_ratio_c={c!r}")
        if self.agg not in AGG_MODES:
            raise ValueError(f"unknown agg={self.agg!r}; expected one of {', '.join(AGG_MODES)}")
        m = self.max_len
        if m is not None and (isinstance(m, bool) or not isinstance(m, int) or m < 1):
            raise ValueError(f"max_len must be None or a positive int, got max_len={m!r}")
        for name in ("clip_cov_ratio", "kl_cov_ratio"):
            value = getattr(self, name)
            if not _finite_number(value) or not 0 < value <= 1:
                raise ValueError(f"{name} must be a number in (0, 1], got {name}={value!r}")
        for name in ("clip_cov_lb", "clip_cov_ub"):
            if not _finite_number(getattr(self, name)):
                raise ValueError(f"{name} must be a finite number, got {getattr(self, name)!r}")
        if self.clip_cov_lb >= self.clip_cov_ub:
            raise ValueError(
                f"clip_cov_lb must be < clip_cov_ub, got clip_cov_lb={self.clip_cov_lb!r}, "
                f"clip_cov_ub={self.clip_cov_ub!r}"
            )
        for name in ("kl_cov_coef", "kl_coef", "entropy_coef"):
            value = getattr(self, name)
            if not _finite_number(value) or value < 0:
                raise ValueError(f"{name} must be a finite number >= 0, got {name}={value!r}")
        if self.kl_estimator not in KL_ESTIMATORS:
            raise ValueError(
                f"unknown kl_estimator={self.kl_estimator!r}; "
                f"expected one of {', '.join(KL_ESTIMATORS)}"
            )
        if not isinstance(self.loss, str) or not self.loss:
            raise ValueError(f"loss must be a registered loss name, got loss={self.loss!r}")


# --------------------------------------------------------------------------------------
# Aggregation


@dataclass(frozen=True)
class BatchCounts:
    """Denominators of a whole mini-batch, for exact gradient accumulation.

    Attributes:
        tokens: valid tokens (``token-mean`` divides by it).
        sequences: responses with at least one valid token (the ``seq-mean-*`` modes
            divide by it).
    """

    tokens: float
    sequences: float


def batch_counts(mask: Tensor) -> BatchCounts:
    """Count the valid tokens and non-empty responses of ``mask [B, T]``."""
    if not isinstance(mask, Tensor) or mask.dim() != 2:
        shape = tuple(mask.shape) if isinstance(mask, Tensor) else type(mask).__name__
        raise ValueError(f"mask must be a [B, T] tensor, got {shape}")
    valid = mask != 0
    return BatchCounts(tokens=float(valid.sum()), sequences=float(valid.any(dim=-1).sum()))


def aggregate_loss(
    loss_mat: Tensor,
    mask: Tensor,
    mode: str = "token-mean",
    *,
    max_len: int | None = None,
    denominator: BatchCounts | float | Tensor | None = None,
) -> Tensor:
    """Reduce a per-token loss ``[B, T]`` to a scalar (verl's ``loss_agg_mode``).

    With ``m`` the mask, ``n_i = sum_t m_it`` the length of response i, ``N = sum_i n_i``
    the valid tokens and ``S`` the number of responses with ``n_i > 0``:

    - ``token-mean`` (DAPO): ``sum_it m l / N``: every token weighs ``1 / N``, so long
      responses weigh more in total.
    - ``seq-mean-token-mean`` (GRPO): ``(1/S) sum_i (1/n_i) sum_t m l``: every response
      weighs ``1 / S``; a token of response i weighs ``1 / (S n_i)``.
    - ``seq-mean-token-sum``: ``(1/S) sum_it m l``: a token weighs ``1 / S``.
    - ``seq-mean-token-sum-norm`` (Dr. GRPO): ``(1/S) sum_it m l / L`` with the constant
      ``L = max_len`` (default T): a token weighs ``1 / (S L)``, free of length bias.

    Padding positions are ignored (set to 0, not multiplied, so NaN there is harmless);
    empty responses are not counted in ``S``.

    Args:
        loss_mat: ``[B, T]`` per-token loss.
        mask: ``[B, T]`` response mask (nonzero = valid).
        mode: one of :data:`AGG_MODES`.
        max_len: ``L`` of ``seq-mean-token-sum-norm``; ignored by the other modes.
        denominator: replaces ``N`` (``token-mean``) or ``S`` (the ``seq-mean-*`` modes):
            a :class:`BatchCounts` from the whole mini-batch (the mode picks its field) or
            a number. None counts it from ``mask``.

    Returns:
        Scalar tensor; 0 (with a zero gradient) when the denominator is 0.
    """
    if mode not in AGG_MODES:
        raise ValueError(f"unknown mode={mode!r}; expected one of {', '.join(AGG_MODES)}")
    if not isinstance(loss_mat, Tensor) or loss_mat.dim() != 2:
        shape = tuple(loss_mat.shape) if isinstance(loss_mat, Tensor) else type(loss_mat)
        raise ValueError(f"loss_mat must be a [B, T] tensor, got {shape}")
    if not isinstance(mask, Tensor) or mask.shape != loss_mat.shape:
        shape = tuple(mask.shape) if isinstance(mask, Tensor) else type(mask).__name__
        raise ValueError(
            f"mask must have the shape of loss_mat {tuple(loss_mat.shape)}, got {shape}"
        )
    if max_len is not None and (
        isinstance(max_len, bool) or not isinstance(max_len, int) or max_len < 1
    ):
        raise ValueError(f"max_len must be None or a positive int, got max_len={max_len!r}")
    valid = mask != 0
    masked = torch.where(valid, loss_mat, torch.zeros_like(loss_mat))  # [B, T]
    lengths = valid.sum(dim=-1)  # [B]
    if mode == "token-mean":
        total = masked.sum()
        count = _pick(denominator, "tokens", lambda: lengths.sum())
    else:
        if mode == "seq-mean-token-mean":
            per_seq = masked.sum(dim=-1) / lengths.clamp(min=1).to(masked.dtype)  # [B]
        else:
            per_seq = masked.sum(dim=-1)  # [B]
        total = per_seq.sum()
        if mode == "seq-mean-token-sum-norm":
            total = total / float(max_len if max_len is not None else loss_mat.shape[-1])
        count = _pick(denominator, "sequences", lambda: (lengths > 0).sum())
    count_t = torch.as_tensor(count, dtype=masked.dtype, device=masked.device)
    if not bool(torch.isfinite(count_t)) or float(count_t) < 0:
        raise ValueError(f"denominator must be a finite number >= 0, got {float(count_t)!r}")
    return torch.where(count_t > 0, total / count_t.clamp(min=1e-30), total * 0)


def _pick(
    denominator: BatchCounts | float | Tensor | None, field: str, default: Callable[[], Tensor]
) -> float | Tensor:
    if denominator is None:
        return default()
    if isinstance(denominator, BatchCounts):
        return getattr(denominator, field)
    if isinstance(denominator, Tensor):
        if denominator.numel() != 1:
            raise ValueError(f"denominator must be a scalar, got shape {tuple(denominator.shape)}")
        return denominator.detach()
    if isinstance(denominator, bool) or not isinstance(denominator, (int, float)):
        raise ValueError(
            f"denominator must be BatchCounts, a number or None, got {type(denominator).__name__}"
        )
    return float(denominator)


# --------------------------------------------------------------------------------------
# KL estimators


def kl_penalty(logp: Tensor, ref_logp: Tensor, kind: str = "k3") -> Tensor:
    """Per-token estimate of KL(pi || pi_ref) from tokens sampled by pi (Schulman 2020).

    With ``d = ref_logp - logp`` (the log of ``r = pi_ref / pi``):

    - ``k1 = -d``: unbiased, high variance, can be negative;
    - ``k2 = d**2 / 2``: biased, low variance, >= 0;
    - ``k3 = exp(d) - 1 - d``: unbiased, low variance, >= 0 (verl's ``low_var_kl``);
      ``d`` is clamped to [-20, 20] before ``exp``.

    Args:
        logp: ``[B, T]`` log-probs of the sampled tokens under the current policy.
        ref_logp: ``[B, T]`` their log-probs under the reference policy.
        kind: one of :data:`KL_ESTIMATORS`.

    Returns:
        ``[B, T]`` per-token estimates, differentiable in ``logp`` (and ``ref_logp``).
    """
    if kind not in KL_ESTIMATORS:
        raise ValueError(f"unknown kind={kind!r}; expected one of {', '.join(KL_ESTIMATORS)}")
    if not isinstance(logp, Tensor) or not isinstance(ref_logp, Tensor):
        raise ValueError("logp and ref_logp must be tensors")
    if logp.shape != ref_logp.shape:
        raise ValueError(
            f"ref_logp must have the shape of logp {tuple(logp.shape)}, got {tuple(ref_logp.shape)}"
        )
    d = ref_logp - logp  # [B, T]
    if kind == "k1":
        return -d
    if kind == "k2":
        return 0.5 * d.square()
    d = d.clamp(-_LOG_RATIO_CLAMP, _LOG_RATIO_CLAMP)
    return torch.expm1(d) - d


# --------------------------------------------------------------------------------------
# Registry


class PolicyLossFn(Protocol):
    """The one signature every registered policy loss has."""

    def __call__(
        self,
        logp: Tensor,
        old_logp: Tensor,
        advantages: Tensor,
        mask: Tensor,
        *,
        config: LossConfig,
        ref_logp: Tensor | None = None,
        entropy: Tensor | None = None,
        denominator: BatchCounts | float | Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> tuple[Tensor, dict[str, float]]: ...


policy_losses: Registry[PolicyLossFn] = Registry("policy loss", "loss")


def register_policy_loss(
    name: str, *, override: bool = False
) -> Callable[[PolicyLossFn], PolicyLossFn]:
    """Register a loss function under ``name`` so ``LossConfig(loss=name)`` selects it.

    The function must have the :class:`PolicyLossFn` signature and return ``(loss,
    metrics)``; a different function under a taken name raises unless ``override``.
    """
    return policy_losses.decorator(name, override=override)


def compute_policy_loss(
    logp: Tensor,
    old_logp: Tensor,
    advantages: Tensor,
    mask: Tensor,
    *,
    config: LossConfig,
    ref_logp: Tensor | None = None,
    entropy: Tensor | None = None,
    denominator: BatchCounts | float | Tensor | None = None,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, dict[str, float]]:
    """Call the loss registered as ``config.loss``; same arguments and result as it."""
    fn = policy_losses.get(config.loss)
    return fn(
        logp,
        old_logp,
        advantages,
        mask,
        config=config,
        ref_logp=ref_logp,
        entropy=entropy,
        denominator=denominator,
        generator=generator,
    )


# --------------------------------------------------------------------------------------
# Shared pieces


@dataclass
class _Inputs:
    logp: Tensor  # [B, T], zero on padding
    old_logp: Tensor  # [B, T], zero on padding
    adv: Tensor  # [B, T], zero on padding
    mask: Tensor  # [B, T] bool
    ref_logp: Tensor | None
    entropy: Tensor | None


def _prepare(
    logp: Tensor,
    old_logp: Tensor,
    advantages: Tensor,
    mask: Tensor,
    ref_logp: Tensor | None,
    entropy: Tensor | None,
    config: LossConfig,
) -> _Inputs:
    if not isinstance(config, LossConfig):
        raise ValueError(f"config must be a LossConfig, got {type(config).__name__}")
    if not isinstance(logp, Tensor) or logp.dim() != 2:
        shape = tuple(logp.shape) if isinstance(logp, Tensor) else type(logp).__name__
        raise ValueError(f"logp must be a [B, T] tensor, got {shape}")
    if not logp.dtype.is_floating_point:
        raise ValueError(f"logp must be floating point, got dtype {logp.dtype}")
    shape = tuple(logp.shape)
    named = {"old_logp": old_logp, "mask": mask, "ref_logp": ref_logp, "entropy": entropy}
    for name, t in named.items():
        if t is None and name in ("ref_logp", "entropy"):
            continue
        if not isinstance(t, Tensor):
            raise ValueError(f"{name} must be a tensor of shape {shape}, got {type(t).__name__}")
        if tuple(t.shape) != shape:
            raise ValueError(f"{name} must have the shape of logp {shape}, got {tuple(t.shape)}")
    if not isinstance(advantages, Tensor):
        raise ValueError(f"advantages must be a tensor [B, T] or [B], got {type(advantages)}")
    if advantages.dim() == 1 and advantages.shape[0] == shape[0]:
        advantages = advantages[:, None].expand(shape)  # [B, T]
    elif tuple(advantages.shape) != shape:
        raise ValueError(
            f"advantages must be [B, T] = {shape} or [B] = ({shape[0]},), "
            f"got {tuple(advantages.shape)}"
        )
    if config.kl_coef > 0 and ref_logp is None:
        raise ValueError(f"kl_coef={config.kl_coef} > 0 needs ref_logp, got None")
    if config.entropy_coef > 0 and entropy is None:
        raise ValueError(f"entropy_coef={config.entropy_coef} > 0 needs entropy, got None")
    valid = mask != 0  # [B, T]
    zero = torch.zeros((), dtype=logp.dtype, device=logp.device)

    def clean(t: Tensor) -> Tensor:
        return torch.where(valid, t.to(logp.dtype), zero)

    return _Inputs(
        logp=clean(logp),
        old_logp=clean(old_logp).detach(),
        adv=clean(advantages).detach(),
        mask=valid,
        ref_logp=None if ref_logp is None else clean(ref_logp),
        entropy=None if entropy is None else clean(entropy),
    )


def _clipped_surrogate(
    ratio: Tensor, adv: Tensor, clip_low: float, clip_high: float, clip_c: float | None
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Per-token PPO loss ``max(-A r, -A clip(r))``, dual-clipped at ``-A c`` for A < 0.

    Returns the loss ``[B, T]`` and bool masks of the tokens clipped low (A < 0,
    r < 1 - eps_low), high (A > 0, r > 1 + eps_high) and by the dual clip (A < 0, r > c).
    """
    unclipped = -adv * ratio  # [B, T]
    clipped = -adv * ratio.clamp(1.0 - clip_low, 1.0 + clip_high)  # [B, T]
    loss = torch.maximum(unclipped, clipped)  # [B, T]
    low = (adv < 0) & (ratio < 1.0 - clip_low)
    high = (adv > 0) & (ratio > 1.0 + clip_high)
    if clip_c is None:
        dual = torch.zeros_like(low)
    else:
        dual = (adv < 0) & (ratio > clip_c)
        loss = torch.where(adv < 0, torch.minimum(loss, -adv * clip_c), loss)
    return loss, low, high, dual


def _finish(
    pg_loss: Tensor,
    x: _Inputs,
    config: LossConfig,
    denominator: BatchCounts | float | Tensor | None,
    *,
    ratio: Tensor,
    low: Tensor,
    high: Tensor,
    dual: Tensor,
    cov_tokens: int,
) -> tuple[Tensor, dict[str, float]]:
    """Add the KL and entropy terms to the policy-gradient loss and gather the metrics."""
    loss = pg_loss
    stats: dict[str, Tensor] = {}
    if x.ref_logp is not None:
        kl = kl_penalty(x.logp, x.ref_logp, config.kl_estimator)  # [B, T]
        if config.kl_coef > 0:
            loss = loss + config.kl_coef * aggregate_loss(
                kl, x.mask, config.agg, max_len=config.max_len, denominator=denominator
            )
        stats["kl_ref"] = masked_mean(kl.detach(), x.mask)
    if x.entropy is not None:
        if config.entropy_coef > 0:
            loss = loss - config.entropy_coef * aggregate_loss(
                x.entropy, x.mask, config.agg, max_len=config.max_len, denominator=denominator
            )
        stats["entropy"] = masked_mean(x.entropy.detach(), x.mask)
    log_ratio = (x.logp.detach() - x.old_logp).clamp(-_LOG_RATIO_CLAMP, _LOG_RATIO_CLAMP)
    stats.update(
        loss=loss.detach(),
        pg_loss=pg_loss.detach(),
        clipfrac_low=masked_mean(low.to(ratio.dtype), x.mask),
        clipfrac_high=masked_mean(high.to(ratio.dtype), x.mask),
        clipfrac_dual=masked_mean(dual.to(ratio.dtype), x.mask),
        # k3 estimate of KL(pi_old || pi) from tokens sampled by pi_old
        approx_kl=masked_mean(torch.expm1(log_ratio) - log_ratio, x.mask),
        ratio_mean=masked_mean(ratio.detach(), x.mask),
        frac_nonzero_adv=masked_mean((x.adv != 0).to(ratio.dtype), x.mask),
        logp_adv_cov=masked_mean(token_covariance(x.logp, x.adv, x.mask), x.mask),
    )
    keys = list(stats)
    values = torch.stack([stats[k].to(torch.float64).reshape(()) for k in keys]).tolist()
    metrics = dict(zip(keys, values, strict=True))
    metrics["cov_tokens"] = float(cov_tokens)
    metrics["num_tokens"] = float(x.mask.sum())
    return loss, metrics


def _ratio(x: _Inputs) -> Tensor:
    """Token importance ratio ``pi / pi_old`` ``[B, T]`` (1 on padding)."""
    return torch.exp((x.logp - x.old_logp).clamp(-_LOG_RATIO_CLAMP, _LOG_RATIO_CLAMP))


def _num_selected(fraction: float, n_valid: int) -> int:
    """``max(floor(fraction * n_valid), 1)`` as verl, 0 when there are no valid tokens."""
    if n_valid == 0:
        return 0
    return max(int(fraction * n_valid), 1)


# --------------------------------------------------------------------------------------
# Losses


@register_policy_loss("ppo")
def ppo_loss(
    logp: Tensor,
    old_logp: Tensor,
    advantages: Tensor,
    mask: Tensor,
    *,
    config: LossConfig,
    ref_logp: Tensor | None = None,
    entropy: Tensor | None = None,
    denominator: BatchCounts | float | Tensor | None = None,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, dict[str, float]]:
    """PPO clipped surrogate with Clip-Higher and optional dual clip (Schulman et al. 2017;
    DAPO, Yu et al. 2025; dual clip, Ye et al. 2020).

    Per token, with ``r = exp(logp - old_logp)``::

        l = max(-A r, -A clip(r, 1 - clip_low, 1 + clip_high))
        l = min(l, -A c)            if A < 0 and clip_ratio_c = c is set

    aggregated with ``config.agg``. A positive-advantage token stops pushing once
    ``r > 1 + clip_high``; a negative one once ``r < 1 - clip_low``; the dual clip bounds
    the loss of a negative-advantage token whose ratio has grown past ``c``.

    Args:
        logp: ``[B, T]`` log-probs of the sampled tokens under the current policy (the
            only input that carries gradient).
        old_logp: ``[B, T]`` log-probs under the policy that sampled them.
        advantages: ``[B, T]`` (or ``[B]``) advantages.
        mask: ``[B, T]`` response mask.
        config: the :class:`LossConfig`.
        ref_logp: ``[B, T]`` reference-policy log-probs; needed when ``kl_coef > 0``.
        entropy: ``[B, T]`` token entropies (e.g. :func:`qae.core.entropy.token_entropy`);
            needed when ``entropy_coef > 0``.
        denominator: see :func:`aggregate_loss`.
        generator: unused (the signature is shared by all losses).

    Returns:
        ``(loss, metrics)``: scalar loss; float metrics ``loss``, ``pg_loss``,
        ``clipfrac_low``, ``clipfrac_high``, ``clipfrac_dual`` (fractions of valid
        tokens), ``approx_kl`` (k3 estimate of KL(pi_old || pi)), ``ratio_mean``,
        ``frac_nonzero_adv``, ``logp_adv_cov`` (the entropy-change predictor),
        ``cov_tokens`` (0 here), ``num_tokens``, and ``kl_ref`` / ``entropy`` when given.
    """
    x = _prepare(logp, old_logp, advantages, mask, ref_logp, entropy, config)
    ratio = _ratio(x)  # [B, T]
    loss_mat, low, high, dual = _clipped_surrogate(
        ratio, x.adv, config.clip_low, config.clip_high, config.clip_ratio_c
    )
    pg = aggregate_loss(
        loss_mat, x.mask, config.agg, max_len=config.max_len, denominator=denominator
    )
    return _finish(
        pg, x, config, denominator, ratio=ratio, low=low, high=high, dual=dual, cov_tokens=0
    )


@register_policy_loss("gspo")
def gspo_loss(
    logp: Tensor,
    old_logp: Tensor,
    advantages: Tensor,
    mask: Tensor,
    *,
    config: LossConfig,
    ref_logp: Tensor | None = None,
    entropy: Tensor | None = None,
    denominator: BatchCounts | float | Tensor | None = None,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, dict[str, float]]:
    """GSPO: clipped surrogate on the sequence-level ratio (Zheng et al. 2025, arXiv 2507.18071).

    The ratio of response i is the geometric mean of its token ratios,
    ``s_i = exp((1/n_i) sum_t (logp - old_logp))``. Its token form (GSPO-token)
    ``s_it = sg[s_i] * exp(logp_t - sg[logp_t])`` equals ``s_i`` in value and carries the
    gradient ``s_i * grad logp_t``; the loss per token is
    ``max(-A s_it, -A clip(s_it, 1 - gspo_clip_low, 1 + gspo_clip_high))``, aggregated with
    ``seq-mean-token-mean`` whatever ``config.agg`` says (the GSPO objective is a mean over
    responses; verl does the same). With one advantage per response the gradient is
    exactly that of ``-(1/S) sum_i min(s_i A_i, clip(s_i) A_i)``. The log sequence ratio is
    clamped at 10 from above before ``exp``. The dual clip does not apply.

    Arguments, result and metrics as :func:`ppo_loss`; the clip fractions count the tokens
    of responses whose sequence ratio is clipped.
    """
    x = _prepare(logp, old_logp, advantages, mask, ref_logp, entropy, config)
    lengths = x.mask.sum(dim=-1).clamp(min=1).to(x.logp.dtype)  # [B]
    seq_log_ratio = (x.logp - x.old_logp).sum(dim=-1) / lengths  # [B]
    seq_log_ratio = seq_log_ratio.detach().clamp(max=_GSPO_LOG_RATIO_MAX)
    log_ratio = x.logp - x.logp.detach() + seq_log_ratio[:, None]  # [B, T]
    ratio = torch.exp(log_ratio)  # [B, T], the sequence ratio on every token
    loss_mat, low, high, dual = _clipped_surrogate(
        ratio, x.adv, config.gspo_clip_low, config.gspo_clip_high, None
    )
    pg = aggregate_loss(loss_mat, x.mask, "seq-mean-token-mean", denominator=denominator)
    return _finish(
        pg, x, config, denominator, ratio=ratio, low=low, high=high, dual=dual, cov_tokens=0
    )


@register_policy_loss("clip_cov")
def clip_cov_loss(
    logp: Tensor,
    old_logp: Tensor,
    advantages: Tensor,
    mask: Tensor,
    *,
    config: LossConfig,
    ref_logp: Tensor | None = None,
    entropy: Tensor | None = None,
    denominator: BatchCounts | float | Tensor | None = None,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, dict[str, float]]:
    """Clip-Cov (Cui et al. 2025, arXiv 2505.22617): drop a few high-covariance tokens.

    The PPO loss of :func:`ppo_loss` (clip_low / clip_high / dual clip), except that
    ``max(floor(clip_cov_ratio * N), 1)`` tokens, drawn uniformly at random (with
    ``generator``) among the valid tokens whose covariance
    ``(logp - mean logp)(A - mean A)`` (means over the valid tokens of this call) lies
    strictly between ``clip_cov_lb`` and ``clip_cov_ub`` and whose gradient the PPO clip
    has not already removed, are dropped from the loss (their term is multiplied by 0, as
    in verl, so the loss value and its gradient stay consistent; the denominator still
    counts them). These are the tokens that drive entropy collapse
    most, so cutting their gradient slows it. ``cov_tokens`` reports how many were cut.

    Arguments, result and metrics as :func:`ppo_loss`; ``generator`` seeds the draw.
    """
    x = _prepare(logp, old_logp, advantages, mask, ref_logp, entropy, config)
    ratio = _ratio(x)  # [B, T]
    loss_mat, low, high, dual = _clipped_surrogate(
        ratio, x.adv, config.clip_low, config.clip_high, config.clip_ratio_c
    )
    cov = token_covariance(x.logp, x.adv, x.mask)  # [B, T]
    eligible = (
        x.mask & ~(low | high | dual) & (cov > config.clip_cov_lb) & (cov < config.clip_cov_ub)
    )
    candidates = eligible.reshape(-1).nonzero().squeeze(1)  # [M]
    n_pick = min(_num_selected(config.clip_cov_ratio, int(x.mask.sum())), candidates.numel())
    cut = torch.zeros_like(eligible)
    if n_pick > 0:
        gen_device = generator.device if generator is not None else torch.device("cpu")
        order = torch.randperm(candidates.numel(), generator=generator, device=gen_device)
        chosen = candidates[order[:n_pick].to(candidates.device)]
        cut.view(-1)[chosen] = True
    loss_mat = torch.where(cut, torch.zeros_like(loss_mat), loss_mat)
    pg = aggregate_loss(
        loss_mat, x.mask, config.agg, max_len=config.max_len, denominator=denominator
    )
    return _finish(
        pg, x, config, denominator, ratio=ratio, low=low, high=high, dual=dual, cov_tokens=n_pick
    )


@register_policy_loss("kl_cov")
def kl_cov_loss(
    logp: Tensor,
    old_logp: Tensor,
    advantages: Tensor,
    mask: Tensor,
    *,
    config: LossConfig,
    ref_logp: Tensor | None = None,
    entropy: Tensor | None = None,
    denominator: BatchCounts | float | Tensor | None = None,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, dict[str, float]]:
    """KL-Cov (Cui et al. 2025, arXiv 2505.22617): penalise the top-covariance tokens.

    Per token ``l = -A r`` (unclipped, as in the paper and verl: KL-Cov replaces the ratio
    clip), plus ``kl_cov_coef * |logp - old_logp|`` on the ``max(floor(kl_cov_ratio * N),
    1)`` valid tokens with the largest covariance ``(logp - mean logp)(A - mean A)``
    (means over the valid tokens of this call). Departure from verl: only tokens with a
    positive covariance are penalised, so a batch of all-zero advantages (covariance 0
    everywhere) gets no penalty and exactly zero gradient, as with the other losses.
    ``cov_tokens`` reports how many tokens were penalised; the clip fractions are those a
    PPO clip with ``clip_low`` / ``clip_high`` would have clipped (diagnostic only).

    Arguments, result and metrics as :func:`ppo_loss`.
    """
    x = _prepare(logp, old_logp, advantages, mask, ref_logp, entropy, config)
    log_ratio = x.logp - x.old_logp  # [B, T]
    ratio = torch.exp(log_ratio.clamp(-_LOG_RATIO_CLAMP, _LOG_RATIO_CLAMP))  # [B, T]
    loss_mat = -x.adv * ratio  # [B, T]
    cov = token_covariance(x.logp, x.adv, x.mask)  # [B, T]
    eligible = x.mask & (cov > 0)
    n_pick = min(_num_selected(config.kl_cov_ratio, int(x.mask.sum())), int(eligible.sum()))
    penalised = torch.zeros_like(eligible)
    if n_pick > 0:
        scores = torch.where(eligible, cov, torch.full_like(cov, -math.inf)).reshape(-1)
        penalised.view(-1)[torch.topk(scores, n_pick).indices] = True
    loss_mat = torch.where(penalised, loss_mat + config.kl_cov_coef * log_ratio.abs(), loss_mat)
    pg = aggregate_loss(
        loss_mat, x.mask, config.agg, max_len=config.max_len, denominator=denominator
    )
    low = (x.adv < 0) & (ratio < 1.0 - config.clip_low)
    high = (x.adv > 0) & (ratio > 1.0 + config.clip_high)
    return _finish(
        pg,
        x,
        config,
        denominator,
        ratio=ratio,
        low=low,
        high=high,
        dual=torch.zeros_like(low),
        cov_tokens=n_pick,
    )
