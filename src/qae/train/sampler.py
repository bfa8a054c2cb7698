"""A cached sampling loop for small models: one prompt prefill per group, finished rows
leave the batch.

Hugging Face ``generate`` with ``num_return_sequences=G`` prefills every prompt G times
and keeps decoding every row until the longest response of the call has ended. For the
tiny policies qae trains on a CPU both matter: responses of one batch range from 10 to
100 tokens, and a decode step costs about the same for 8 rows as for 128. This loop

- prefills each prompt once and repeats its KV cache G times (the G samples of a group
  share the prompt);
- drops a row from the batch (and from the cache) as soon as it has written its end
  token, so late steps run on the few rows still writing;
- samples from ``softmax(logits / temperature)`` after an optional top-p cut, exactly
  the distribution ``generate`` samples from with ``top_k=0``, and records each sampled
  token's log-probability and the entropy of the distribution it was drawn from (before
  the top-p cut, as the trainer's ``actor/entropy`` is).

Shapes: P prompts, G samples per prompt, R = P·G rows, A rows still writing, V vocabulary.
Randomness comes from torch's global generator (seed it for reproducible draws).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from qae.core.entropy import token_entropy

__all__ = ["Samples", "sample_responses"]


@dataclass
class Samples:
    """What :func:`sample_responses` returns, one entry per row (prompt-major: the G
    samples of prompt 0 first).

    Attributes:
        tokens: R lists of response token ids, the end token included when written.
        logprobs: R lists of the log-probability of each token under the sampling
            distribution (``softmax(logits / temperature)``, before any top-p cut).
        entropy: R lists of the entropy of that distribution at each token.
    """

    tokens: list[list[int]]
    logprobs: list[list[float]]
    entropy: list[list[float]]


def _top_p_filter(logits: Tensor, top_p: float) -> Tensor:
    """``logits [A, V]`` with the tokens outside the top-p nucleus set to -inf (the most
    likely token always stays)."""
    if top_p >= 1.0:
        return logits
    sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
    probs = torch.softmax(sorted_logits, dim=-1)
    # a token is cut when the mass before it already reaches top_p
    cut = (probs.cumsum(-1) - probs) >= top_p  # [A, V] in sorted order
    sorted_logits = sorted_logits.masked_fill(cut, float("-inf"))
    return torch.empty_like(logits).scatter_(-1, order, sorted_logits)


def _prefill(
    model: Any, prompts: Sequence[Sequence[int]], pad_id: int, device: torch.device
) -> tuple[Tensor, Any, Tensor, Tensor]:
    """Run the left-padded prompts through the model once.

    Returns ``(last logits [P, V], cache, attention mask [P, L], next positions [P])``.
    """
    from transformers import DynamicCache

    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, width - len(p) :] = torch.as_tensor(list(p), dtype=torch.long)
        mask[i, width - len(p) :] = 1
    ids, mask = ids.to(device), mask.to(device)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)  # [P, L]
    cache = DynamicCache()
    out = model(
        input_ids=ids,
        attention_mask=mask,
        position_ids=positions,
        past_key_values=cache,
        use_cache=True,
    )
    return out.logits[:, -1, :], out.past_key_values, mask, positions[:, -1] + 1


@torch.no_grad()
def sample_responses(
    model: Any,
    prompts: Sequence[Sequence[int]],
    *,
    group_size: int,
    max_new_tokens: int,
    eos_id: int | None,
    pad_id: int,
    temperature: float = 1.0,
    top_p: float = 1.0,
) -> Samples:
    """Sample ``group_size`` responses for each tokenized prompt.

    Args:
        model: a Hugging Face causal LM that takes ``past_key_values`` (a ``DynamicCache``).
        prompts: P lists of prompt token ids (no padding).
        group_size: G samples per prompt.
        max_new_tokens: the response length limit.
        eos_id: the end token (a row stops after writing it); None: every row runs to the
            limit.
        pad_id: token used to left-pad prompts (masked out).
        temperature: sampling temperature; 0 decodes greedily (each row of a group is then
            the same).
        top_p: nucleus threshold (1.0 = off).

    Returns:
        :class:`Samples` with R = P·G rows, prompt-major.
    """
    if group_size < 1 or max_new_tokens < 0:
        raise ValueError(
            f"group_size must be >= 1 and max_new_tokens >= 0, got {group_size}, {max_new_tokens}"
        )
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got top_p={top_p!r}")
    if any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    rows = len(prompts) * group_size
    tokens: list[list[int]] = [[] for _ in range(rows)]
    logprobs: list[list[float]] = [[] for _ in range(rows)]
    entropy: list[list[float]] = [[] for _ in range(rows)]
    if rows == 0 or max_new_tokens == 0:
        return Samples(tokens, logprobs, entropy)
    device = next(model.parameters()).device
    logits, cache, mask, next_pos = _prefill(model, prompts, pad_id, device)
    if group_size > 1:  # the G samples of a prompt share its prefill
        cache.batch_repeat_interleave(group_size)
        logits = logits.repeat_interleave(group_size, dim=0)
        mask = mask.repeat_interleave(group_size, dim=0)
        next_pos = next_pos.repeat_interleave(group_size, dim=0)
    alive = torch.arange(rows, device=device)  # [A] row index of each batch entry
    scale = temperature if temperature > 0 else 1.0
    for step in range(max_new_tokens):
        scaled = logits.float() / scale  # [A, V]
        logp_all = torch.log_softmax(scaled, dim=-1)  # [A, V]
        if temperature > 0:
            probs = torch.softmax(_top_p_filter(scaled, top_p), dim=-1)
            picked = torch.multinomial(probs, 1).squeeze(-1)  # [A]
        else:
            picked = scaled.argmax(-1)
        lp = logp_all.gather(-1, picked[:, None]).squeeze(-1)  # [A]
        ent = token_entropy(scaled)  # [A]
        for row, tok, a, h in zip(
            alive.tolist(), picked.tolist(), lp.tolist(), ent.tolist(), strict=True
        ):
            tokens[row].append(tok)
            logprobs[row].append(a)
            entropy[row].append(h)
        if step == max_new_tokens - 1:
            break
        keep = picked != eos_id if eos_id is not None else torch.ones_like(picked, dtype=bool)
        if not bool(keep.all()):
            if not bool(keep.any()):
                break
            idx = keep.nonzero().flatten()
            cache.batch_select_indices(idx)
            alive, picked, mask, next_pos = alive[idx], picked[idx], mask[idx], next_pos[idx]
        mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)  # [A, L + 1]
        out = model(
            input_ids=picked[:, None],
            attention_mask=mask,
            position_ids=next_pos[:, None],
            past_key_values=cache,
            use_cache=True,
        )
        logits, cache = out.logits[:, -1, :], out.past_key_values
        next_pos = next_pos + 1
    return Samples(tokens, logprobs, entropy)
