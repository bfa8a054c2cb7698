"""Token entropy, per-token log-probs and the first-order entropy-change predictor.

Shapes: B responses, T response tokens, V vocabulary; ``N = B * T`` rows once flattened.

Memory. With a realistic vocabulary (V = 151,936 for Qwen) one float32 copy of the
logits of 2,048 tokens is 1.2 GB, and a direct ``log_softmax`` followed by ``exp`` and a
product holds three or four such tensors at once. :func:`token_entropy` and
:func:`selective_log_softmax` walk the rows in chunks, so at most a few
``[chunk_size, V]`` float32 buffers exist besides the logits themselves; their backward
passes recompute the softmax chunk by chunk instead of saving it, so the only ``[N, V]``
tensor they create is the gradient of the logits, which autograd needs anyway.

Entropy mechanism (Cui et al. 2025, "The Entropy Mechanism of Reinforcement Learning for
Reasoning Language Models", arXiv 2505.22617). For a softmax policy updated by natural
policy gradient with step size eta, the change of the entropy of the state's action
distribution is, to first order,

    H(k+1) - H(k) ~= -eta * Cov_{a ~ pi}(log pi(a|s), A(s, a)).

Actions that are both likely and rewarded (positive covariance) sharpen the policy, so the
entropy falls; rare actions with high advantage raise it. The QAE paper uses the same
quantity to explain why a quantile baseline controls the entropy.
:func:`entropy_change_predictor` estimates the covariance from a batch of sampled tokens.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

__all__ = [
    "DEFAULT_CHUNK_ELEMENTS",
    "entropy_change_predictor",
    "masked_mean",
    "selective_log_softmax",
    "token_covariance",
    "token_entropy",
]

# Rows per chunk are chosen so that one float32 [chunk, V] buffer holds about this many
# elements (2**24 floats = 64 MiB).
DEFAULT_CHUNK_ELEMENTS = 2**24


def _work_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 stays float64; every other floating dtype is computed in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _rows_per_chunk(chunk_size: int | None, vocab: int) -> int:
    if chunk_size is None:
        return max(1, DEFAULT_CHUNK_ELEMENTS // max(vocab, 1))
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(
            f"chunk_size must be a positive int or None, got chunk_size={chunk_size!r}"
        )
    return chunk_size


def _check_logits(logits: Tensor) -> None:
    if not isinstance(logits, Tensor):
        raise ValueError(f"logits must be a tensor [..., V], got {type(logits).__name__}")
    if logits.dim() < 1 or logits.shape[-1] == 0:
        raise ValueError(f"logits must be [..., V] with V >= 1, got shape {tuple(logits.shape)}")
    if not logits.dtype.is_floating_point:
        raise ValueError(f"logits must be floating point, got dtype {logits.dtype}")


# --------------------------------------------------------------------------------------
# Entropy


def _shifted_exp(chunk: Tensor, work: torch.dtype) -> tuple[Tensor, Tensor, Tensor]:
    """``s = z - max(z)`` (``-inf`` clamped to the dtype's minimum), ``e = exp(s)``, ``sum e``.

    Working with the shifted logits keeps the entropy accurate when the logits are large
    (``logsumexp(z) - E[z]`` loses digits to cancellation; ``log sum e - E[s]`` does not).
    Two ``[c, V]`` buffers: ``s`` and ``e``.
    """
    z = chunk.to(work)  # [c, V]
    shifted = z - z.amax(dim=-1, keepdim=True)  # [c, V]
    shifted.clamp_(min=torch.finfo(work).min)  # a -inf logit gives e = 0 and e * s = 0
    e = torch.exp(shifted)  # [c, V]
    return shifted, e, e.sum(dim=-1, keepdim=True)  # [c, V], [c, V], [c, 1]


def _row_dot(a: Tensor, b: Tensor) -> Tensor:
    """``sum_v a[:, v] b[:, v]`` as ``[c, 1]`` without a ``[c, V]`` temporary."""
    return (a.unsqueeze(1) @ b.unsqueeze(2)).squeeze(2)


class _ChunkedEntropy(torch.autograd.Function):
    """Entropy of softmax(z) per row of ``z [N, V]``, chunked forward and backward.

    With ``s = z - max z`` and ``e = exp(s)``: ``H = log sum e - sum e s / sum e`` and
    ``dH/dz_k = -p_k (s_k - E_p[s])``; the backward recomputes ``e`` chunk by chunk.
    """

    @staticmethod
    def forward(ctx, logits: Tensor, rows: int) -> Tensor:  # logits: [N, V]
        work = _work_dtype(logits.dtype)
        n = logits.shape[0]
        out = torch.empty(n, dtype=work, device=logits.device)  # [N]
        for i in range(0, n, rows):
            shifted, e, total = _shifted_exp(logits[i : i + rows], work)
            h = torch.log(total) - _row_dot(e, shifted) / total  # [c, 1]
            out[i : i + rows] = h.squeeze(1)
            del shifted, e  # free this chunk's buffers before the next chunk allocates
        ctx.rows = rows
        ctx.save_for_backward(logits)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out: Tensor) -> tuple[Tensor | None, None]:  # grad_out: [N]
        (logits,) = ctx.saved_tensors
        if not ctx.needs_input_grad[0]:
            return None, None
        work = _work_dtype(logits.dtype)
        rows = ctx.rows
        grad = torch.empty_like(logits)  # [N, V]
        for i in range(0, logits.shape[0], rows):
            shifted, e, total = _shifted_exp(logits[i : i + rows], work)
            mean_s = _row_dot(e, shifted) / total  # [c, 1]
            g = grad_out[i : i + rows, None].to(work)  # [c, 1]
            # -p (s - E[s]) g = e (E[s] - s) g / sum e, built in the two chunk buffers
            shifted.neg_().add_(mean_s).mul_(g / total)
            grad[i : i + rows] = e.mul_(shifted)
            del shifted, e
        return grad, None


def token_entropy(logits: Tensor, *, chunk_size: int | None = None) -> Tensor:
    """Entropy of the next-token distribution at every position, computed in chunks.

    ``H = -sum_v p_v log p_v`` with ``p = softmax(z)`` for each row ``z`` of ``logits``. The
    rows are processed ``chunk_size`` at a time in float32 (float64 for float64 logits),
    so the full ``[B, T, V]`` softmax never exists at once. Differentiable: the backward
    pass recomputes the softmax chunk by chunk, so the entropy bonus costs no more memory
    than the gradient of the logits itself.

    Args:
        logits: ``[B, T, V]`` (any leading shape ``[..., V]``) unnormalized scores.
        chunk_size: rows per chunk; None picks about ``2**24 / V`` rows (64 MiB buffers).

    Returns:
        ``[B, T]`` (the leading shape of ``logits``) entropies in nats, float32 (float64
        for float64 logits).
    """
    _check_logits(logits)
    rows = _rows_per_chunk(chunk_size, logits.shape[-1])
    lead = logits.shape[:-1]
    flat = logits.reshape(-1, logits.shape[-1])  # [N, V]
    return _ChunkedEntropy.apply(flat, rows).reshape(lead)


# --------------------------------------------------------------------------------------
# Log-probs of chosen tokens


class _ChunkedSelectiveLogSoftmax(torch.autograd.Function):
    """``log softmax(z)[id]`` per row of ``z [N, V]``; backward ``g (onehot(id) - p)``."""

    @staticmethod
    def forward(ctx, logits: Tensor, ids: Tensor, rows: int) -> Tensor:  # [N, V], [N]
        work = _work_dtype(logits.dtype)
        n = logits.shape[0]
        out = torch.empty(n, dtype=work, device=logits.device)  # [N]
        lse = torch.empty(n, dtype=work, device=logits.device)  # [N]
        for i in range(0, n, rows):
            z = logits[i : i + rows].to(work)  # [c, V]
            top = z.amax(dim=-1)  # [c]
            # log sum exp(z - max): the shifted form keeps log p accurate for large logits
            log_total = (z - top[:, None]).exp_().sum(dim=-1).log()  # [c], one [c, V] buffer
            picked = z.gather(1, ids[i : i + rows, None]).squeeze(1)  # [c]
            out[i : i + rows] = (picked - top) - log_total
            lse[i : i + rows] = top + log_total
            del z
        ctx.rows = rows
        ctx.save_for_backward(logits, ids, lse)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out: Tensor) -> tuple[Tensor | None, None, None]:  # [N]
        logits, ids, lse = ctx.saved_tensors
        if not ctx.needs_input_grad[0]:
            return None, None, None
        work = _work_dtype(logits.dtype)
        rows = ctx.rows
        grad = torch.empty_like(logits)  # [N, V]
        for i in range(0, logits.shape[0], rows):
            g = grad_out[i : i + rows, None].to(work)  # [c, 1]
            p = logits[i : i + rows].to(work).sub(lse[i : i + rows, None]).exp_()  # [c, V]
            p.mul_(-g).scatter_add_(1, ids[i : i + rows, None], g)
            grad[i : i + rows] = p
            del p
        return grad, None, None


def selective_log_softmax(logits: Tensor, ids: Tensor, *, chunk_size: int | None = None) -> Tensor:
    """Log-probability of the given token ids, ``log_softmax(logits)[..., ids]``, in chunks.

    Equivalent to ``torch.log_softmax(logits.float(), -1).gather(-1, ids[..., None])`` but
    never holds a full-vocabulary float32 copy of the logits; the backward pass rebuilds
    the softmax chunk by chunk. Use it for the current, old and reference policies'
    per-token log-probs.

    Args:
        logits: ``[B, T, V]`` (any leading shape ``[..., V]``) unnormalized scores, already
            divided by the sampling temperature if one was used.
        ids: ``[B, T]`` (the leading shape of ``logits``) integer token ids in ``[0, V)``.
        chunk_size: rows per chunk; None picks about ``2**24 / V`` rows.

    Returns:
        ``[B, T]`` log-probs, float32 (float64 for float64 logits).
    """
    _check_logits(logits)
    if not isinstance(ids, Tensor):
        raise ValueError(f"ids must be a tensor [B, T], got {type(ids).__name__}")
    if tuple(ids.shape) != tuple(logits.shape[:-1]):
        raise ValueError(
            f"ids must have the leading shape of logits {tuple(logits.shape[:-1])}, "
            f"got shape {tuple(ids.shape)}"
        )
    if ids.dtype.is_floating_point or ids.dtype.is_complex or ids.dtype == torch.bool:
        raise ValueError(f"ids must be an integer tensor, got dtype {ids.dtype}")
    vocab = logits.shape[-1]
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= vocab):
        bad = int(ids.min()) if int(ids.min()) < 0 else int(ids.max())
        raise ValueError(f"ids must lie in [0, V={vocab}), found id {bad}")
    rows = _rows_per_chunk(chunk_size, vocab)
    lead = logits.shape[:-1]
    flat = logits.reshape(-1, vocab)  # [N, V]
    flat_ids = ids.reshape(-1).to(device=logits.device, dtype=torch.long)  # [N]
    return _ChunkedSelectiveLogSoftmax.apply(flat, flat_ids, rows).reshape(lead)


# --------------------------------------------------------------------------------------
# Masked statistics


def _check_pair(name: str, x: Tensor, mask: Tensor) -> None:
    if not isinstance(x, Tensor):
        raise ValueError(f"{name} must be a tensor, got {type(x).__name__}")
    if not isinstance(mask, Tensor):
        raise ValueError(f"mask must be a tensor, got {type(mask).__name__}")
    if x.shape != mask.shape:
        raise ValueError(
            f"mask must have the shape of {name} {tuple(x.shape)}, got {tuple(mask.shape)}"
        )


def masked_mean(x: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """Mean of ``x`` over the entries where ``mask`` is nonzero.

    Args:
        x: ``[B, T]`` (any shape) values.
        mask: same shape as ``x``; 0/1 (bool, int or float) weights.
        dim: reduce only this dimension (e.g. ``-1`` for a per-response mean ``[B]``);
            None reduces everything to a scalar.

    Returns:
        The masked mean; 0 (not NaN) where the mask is empty. Differentiable in ``x``.
    """
    _check_pair("x", x, mask)
    w = mask.to(x.dtype)
    if dim is None:
        total = (x * w).sum()
        count = w.sum()
    else:
        total = (x * w).sum(dim=dim)
        count = w.sum(dim=dim)
    return total / count.clamp(min=1)


def token_covariance(logp: Tensor, advantages: Tensor, mask: Tensor) -> Tensor:
    """Per-token centered product ``(log p - mean log p)(A - mean A)`` over valid tokens.

    The means run over the valid tokens of the whole batch; the result is detached and is
    0 on padding. Its masked mean is the batch covariance of :func:`entropy_change_predictor`;
    Clip-Cov and KL-Cov rank tokens by it.

    Args:
        logp: ``[B, T]`` log-probs of the sampled tokens under the current policy.
        advantages: ``[B, T]`` advantages broadcast to tokens.
        mask: ``[B, T]`` response mask.

    Returns:
        ``[B, T]`` detached centered products, dtype of ``logp``.
    """
    _check_pair("logp", logp, mask)
    _check_pair("advantages", advantages, mask)
    lp = logp.detach()
    adv = advantages.detach().to(lp.dtype)
    valid = mask != 0
    cov = (lp - masked_mean(lp, mask)) * (adv - masked_mean(adv, mask))  # [B, T]
    return torch.where(valid, cov, torch.zeros_like(cov))


def entropy_change_predictor(logp: Tensor, advantages: Tensor, mask: Tensor) -> Tensor:
    """Batch covariance between token log-prob and advantage: the entropy-change predictor.

    ``Cov = mean_valid[(log p - mean log p)(A - mean A)]`` over the valid tokens of the
    batch. Sign convention: this returns the covariance itself, and the predicted entropy
    change of the next policy-gradient step is its negative times the step size,
    ``dH ~= -eta * Cov`` (Cui et al. 2025). A positive value predicts falling entropy
    (confident tokens being reinforced), a negative value rising entropy. It is a
    first-order, softmax-policy estimate: log it every step and compare its sign with the
    measured entropy change.

    Args:
        logp: ``[B, T]`` log-probs of the sampled tokens under the current policy.
        advantages: ``[B, T]`` advantages broadcast to tokens.
        mask: ``[B, T]`` response mask.

    Returns:
        Scalar tensor (detached), dtype of ``logp``; 0 for an empty mask.
    """
    return masked_mean(token_covariance(logp, advantages, mask), mask)
