"""Sample responses and score them: the one path from prompts to scored samples.

:func:`generate_texts` is one Hugging Face ``generate`` call (``samples`` responses per
prompt, decoded without special tokens) and :func:`score_responses` scores responses
against their reference answers with a reward function. :func:`qae.eval.evaluate.evaluate`
samples and scores with them, and so do the built-in tasks' pre-training checks
(:func:`qae.tasks.tiny_model.pass_at_1`); :func:`generation_mode` puts a model and its
tokenizer in the state both expect while sampling.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from qae.rewards import DEFAULT_TIMEOUT, score_batch

__all__ = ["generate_texts", "generation_mode", "score_responses"]


@contextlib.contextmanager
def generation_mode(model: Any, tokenizer: Any) -> Iterator[None]:
    """Left padding (with the end token as pad if the tokenizer has none) and eval mode
    while sampling; both restored afterwards."""
    old_side, old_pad = tokenizer.padding_side, tokenizer.pad_token
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    was_training = getattr(model, "training", False)
    model.eval()
    try:
        yield
    finally:
        tokenizer.padding_side, tokenizer.pad_token = old_side, old_pad
        if was_training:
            model.train()


def generate_texts(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[str],
    *,
    temperature: float,
    max_new_tokens: int,
    top_p: float = 1.0,
    samples: int = 1,
    add_special_tokens: bool = True,
) -> list[str]:
    """``samples`` responses to each prompt from one ``model.generate`` call.

    Greedy when ``temperature`` is 0 (then ``samples`` must be 1), else sampling with
    ``top_p`` (1.0 disables it; top-k is always off). The tokenizer must pad on the left
    (:func:`generation_mode`); seed torch beforehand for reproducible samples.

    Returns:
        ``[P * samples]`` response texts, special tokens removed, the ``samples`` responses
        of a prompt next to each other, prompts in order.
    """
    import torch

    device = next(model.parameters()).device
    enc = tokenizer(
        list(prompts),
        return_tensors="pt",
        padding=True,
        add_special_tokens=add_special_tokens,
    ).to(device)
    kwargs: dict[str, Any] = {"max_new_tokens": max_new_tokens, "num_return_sequences": samples}
    if temperature > 0:
        kwargs.update(do_sample=True, temperature=temperature, top_p=top_p, top_k=0)
    else:
        if samples != 1:
            raise ValueError(f"greedy decoding takes samples=1, got samples={samples}")
        kwargs.update(do_sample=False)
    with torch.inference_mode():
        out = model.generate(
            **enc,
            **kwargs,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
    new_tokens = out[:, enc["input_ids"].shape[1] :]  # [P * samples, T]
    return tokenizer.batch_decode(new_tokens, skip_special_tokens=True)


def score_responses(
    reward: str | Callable,
    responses: Sequence[Sequence[str]],
    answers: Sequence[Any],
    *,
    workers: int | None = None,
    timeout: float = DEFAULT_TIMEOUT,
) -> list[list[float | None]]:
    """Score every response of problem ``i`` against ``answers[i]``.

    Args:
        reward: a registered reward name or a callable ``fn(response, ground_truth)``.
        responses: ``[P][n]`` response texts, one list per problem.
        answers: ``[P]`` reference answers.
        workers, timeout: passed to :func:`qae.rewards.score_batch` (``workers=0``
            scores in this process).

    Returns:
        ``[P][n]`` scores, None where the reward function found a response unscorable; a
        failing item scores 0.0 (see :func:`qae.rewards.score_batch`).
    """
    if len(responses) != len(answers):
        raise ValueError(
            f"responses and answers differ in length: {len(responses)} != {len(answers)}"
        )
    flat = [text for texts in responses for text in texts]
    truths = [a for texts, a in zip(responses, answers, strict=True) for _ in texts]
    scores = score_batch(reward, flat, truths, workers=workers, timeout=timeout) if flat else []
    out, start = [], 0
    for texts in responses:
        out.append(scores[start : start + len(texts)])
        start += len(texts)
    return out
