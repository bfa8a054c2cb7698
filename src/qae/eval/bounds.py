"""Input bounds: every prompt plus the response budget must fit the model's context.

Checked when the inputs are loaded, before anything is generated, so an over-long dataset
row or a response budget the model cannot hold is an error naming the source, the row and
the numbers, instead of minutes of work that end in a multi-gigabyte allocation.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

__all__ = ["CONTEXT_KEYS", "check_prompt_lengths", "check_response_budget", "context_length"]

CONTEXT_KEYS = (
    "max_position_embeddings",
    "n_positions",
    "max_seq_len",
    "seq_length",
    "n_ctx",
    "max_sequence_length",
)
"""Model config fields that hold the context length, in the order they are tried."""

_CHARS_PER_TOKEN = 64
"""Characters tokenized per allowed token before a text counts as far too long: a text of
millions of characters is rejected from its beginning instead of tokenized in full."""


def context_length(model: Any) -> tuple[int, str] | None:
    """``(tokens, config field)`` of a model's context, or None when its config names none."""
    config = getattr(model, "config", None)
    for cfg in (config, getattr(config, "text_config", None)):
        for key in CONTEXT_KEYS:
            value = getattr(cfg, key, None)
            if isinstance(value, int) and not isinstance(value, bool) and value > 0:
                return value, key
    return None


def check_response_budget(max_new_tokens: int, context: tuple[int, str], *, budget: str) -> int:
    """The tokens left for a prompt: the context minus ``max_new_tokens``. A budget that
    leaves none raises, naming both numbers (``budget`` names the setting)."""
    size, key = context
    if max_new_tokens >= size:
        raise ValueError(
            f"{budget} does not fit the model's context of {size} tokens (config.{key}): "
            f"responses of up to {max_new_tokens} tokens leave no room for a prompt; set it "
            f"below {size}"
        )
    return size - max_new_tokens


def _count_tokens(
    tokenizer: Any, text: str, limit: int, add_special_tokens: bool
) -> tuple[int, bool]:
    """``(tokens, exact)``: the count of ``text``, or of its beginning (``exact`` False)
    when that alone already holds well over ``limit`` tokens."""

    def count(s: str) -> int:  # verbose=False: no "longer than the maximum" log line
        return len(tokenizer(s, add_special_tokens=add_special_tokens, verbose=False)["input_ids"])

    head = (limit + 2) * _CHARS_PER_TOKEN
    if len(text) > head:
        n = count(text[:head])
        if n > limit + 1:  # one token of slack for a merge across the cut
            return n, False
    return count(text), True


def check_prompt_lengths(
    prompts: Iterable[tuple[str, str]],
    tokenizer: Any,
    *,
    limit: int,
    context: tuple[int, str],
    budget: str,
    add_special_tokens: bool = False,
) -> None:
    """Raise on the first prompt with more than ``limit`` tokens.

    Args:
        prompts: ``(where, text)`` pairs; ``where`` names the source and the row
            (``data.train='a.jsonl' row 3 (id '7')``).
        tokenizer: the model's tokenizer.
        limit: tokens a prompt may have (from :func:`check_response_budget`).
        context: the model's context (:func:`context_length`), for the message.
        budget: the response budget's setting and value, for the message.
        add_special_tokens: count as the generator encodes the prompt.
    """
    for where, text in prompts:
        n, exact = _count_tokens(tokenizer, text, limit, add_special_tokens)
        if n > limit:
            size, key = context
            raise ValueError(
                f"{where}: the prompt is {n}{'' if exact else ' or more'} tokens but only "
                f"{limit} fit: the model's context is {size} tokens (config.{key}) and "
                f"{budget}; shorten or drop the row, or lower the response budget"
            )
