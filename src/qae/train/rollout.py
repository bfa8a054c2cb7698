"""Rollout: sample G responses per prompt, and score token log-probs of given responses.

Shapes: P prompts, G responses per prompt, B = P·G responses, T response tokens (the longest
response of the batch or micro-batch), V vocabulary.

Responses are kept as unpadded token lists in a :class:`Batch`; tensors are built per
micro-batch by :func:`collate`, so batches from several generation rounds concatenate
freely and micro-batches can be packed from any subset of rows.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, fields, replace
from typing import Any

import torch
from torch import Tensor

from qae.core.entropy import selective_log_softmax, token_entropy

__all__ = [
    "Batch",
    "batch_from_token_outputs",
    "collate",
    "concat_batches",
    "encode_prompts",
    "generate_batch",
    "response_logprobs",
    "sample_batch",
]


@dataclass
class Batch:
    """Responses of one training step and everything computed on them.

    Attributes:
        prompt_ids: B token lists of the prompts (repeated for each response of a group).
        response_ids: B token lists of the sampled responses, end token included if any.
        group_ids: ``[B]`` long, which prompt (group) each response answers.
        scores: ``[B]`` float, the verifier's score (1 correct / 0 wrong; NaN unscorable).
        rewards: ``[B]`` float, the reward the advantages use (score plus any shaping).
        truncated: ``[B]`` bool, the response hit the length limit without an end token.
        loss_rows: ``[B]`` bool, responses that take part in the loss (overlong masking
            clears it); advantages still use every row.
        texts: B decoded responses. answers: B ground truths. prompts: B prompt texts.
        sample_entropy: B floats, the sum over each response's tokens of the entropy of
            ``softmax(logits / temperature)`` at that token (before any top-p cut, as
            ``actor/entropy`` is), measured during generation; empty when the backend did
            not measure it.
        sample_logprobs: B lists, the log-prob of each response token under
            ``softmax(logits / temperature)`` as recorded while sampling (the ``sampler``
            backend); empty when the backend did not record them.
        sample_token_entropy: B lists, the entropy of that distribution at each response
            token (``sample_entropy`` holds their sums); empty likewise.
    """

    prompt_ids: list[list[int]]
    response_ids: list[list[int]]
    group_ids: Tensor
    scores: Tensor
    rewards: Tensor
    truncated: Tensor
    loss_rows: Tensor
    texts: list[str] = field(default_factory=list)
    answers: list[Any] = field(default_factory=list)
    prompts: list[str] = field(default_factory=list)
    sample_entropy: list[float] = field(default_factory=list)
    sample_logprobs: list[list[float]] = field(default_factory=list)
    sample_token_entropy: list[list[float]] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.response_ids)

    @property
    def num_groups(self) -> int:
        return int(torch.unique(self.group_ids).numel()) if len(self) else 0

    def response_lengths(self) -> Tensor:
        """``[B]`` long, tokens per response."""
        return torch.tensor([len(r) for r in self.response_ids], dtype=torch.long)

    def select(self, rows: Tensor | Sequence[int]) -> Batch:
        """The sub-batch of the given row indices (a bool mask or indices)."""
        idx = torch.as_tensor(rows)
        if idx.dtype == torch.bool:
            idx = idx.nonzero().flatten()
        ids = idx.tolist()
        out: dict[str, Any] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, Tensor):
                out[f.name] = value[idx]
            else:
                out[f.name] = [value[i] for i in ids] if value else []
        return Batch(**out)

    def with_(self, **changes: Any) -> Batch:
        """A copy with some fields replaced."""
        return replace(self, **changes)


def concat_batches(batches: Sequence[Batch]) -> Batch:
    """Rows of several batches in order; group ids are made distinct per batch."""
    if not batches:
        raise ValueError("concat_batches needs at least one batch")
    out: dict[str, Any] = {}
    offset = 0
    shifted = []
    for b in batches:
        shifted.append(b.group_ids + offset)
        offset += int(b.group_ids.max()) + 1 if len(b) else 0
    for f in fields(Batch):
        values = [getattr(b, f.name) for b in batches]
        if f.name == "group_ids":
            out[f.name] = torch.cat(shifted)
        elif isinstance(values[0], Tensor):
            out[f.name] = torch.cat(values)
        elif all(len(v) == len(b) for v, b in zip(values, batches, strict=True)):
            out[f.name] = [x for v in values for x in v]
        else:  # an optional per-row list that some batch lacks
            out[f.name] = []
    return Batch(**out)


class _EntropyRecorder:
    """Logits processor that records, at every generation step, the entropy of each row's
    sampling distribution ``softmax(logits / temperature)`` and passes the logits on
    unchanged. Custom processors run after the processors the model's generation config
    asks for (e.g. a repetition penalty) and before the temperature and top-p warpers, so
    with none of the former the logits it sees are the model's own."""

    def __init__(self, temperature: float) -> None:
        self.temperature = temperature if temperature > 0 else 1.0
        self.steps: list[Tensor] = []  # one [rows] tensor per generated position

    def __call__(self, input_ids: Tensor, scores: Tensor) -> Tensor:
        self.steps.append(token_entropy(scores.detach().float() / self.temperature).cpu())
        return scores

    def row_sums(self, lengths: Sequence[int]) -> list[float]:
        """Per row, the sum of the recorded entropies over its first ``lengths[j]``
        positions (later positions were padding after the row had ended)."""
        if not self.steps:
            return [0.0] * len(lengths)
        ent = torch.stack(self.steps, dim=1)  # [rows, steps]
        pos = torch.arange(ent.shape[1])
        keep = pos[None, :] < torch.as_tensor(list(lengths))[:, None]
        return (ent * keep).sum(dim=1).tolist()


def collate(
    prompt_ids: Sequence[Sequence[int]],
    response_ids: Sequence[Sequence[int]],
    pad_id: int,
    device: torch.device | str = "cpu",
) -> dict[str, Tensor]:
    """Right-padded model inputs for prompt+response rows.

    Returns:
        ``input_ids [b, L]``, ``attention_mask [b, L]``, ``positions [b, T]`` (index of the
        logit that predicts each response token), ``targets [b, T]`` (response tokens,
        pad where masked) and ``response_mask [b, T]`` (float, 1 on response tokens).
    """
    b = len(prompt_ids)
    lengths = [len(p) + len(r) for p, r in zip(prompt_ids, response_ids, strict=True)]
    longest = max(lengths, default=1)
    t = max((len(r) for r in response_ids), default=0)
    t = max(t, 1)
    input_ids = torch.full((b, longest), pad_id, dtype=torch.long)
    attention = torch.zeros((b, longest), dtype=torch.long)
    positions = torch.zeros((b, t), dtype=torch.long)
    targets = torch.full((b, t), pad_id, dtype=torch.long)
    mask = torch.zeros((b, t), dtype=torch.float32)
    for i, (p, r) in enumerate(zip(prompt_ids, response_ids, strict=True)):
        if not p:
            raise ValueError(f"prompt_ids[{i}] is empty; every prompt needs at least one token")
        seq = list(p) + list(r)
        input_ids[i, : len(seq)] = torch.tensor(seq, dtype=torch.long)
        attention[i, : len(seq)] = 1
        n = len(r)
        if n:
            # The logit at position j predicts token j + 1.
            positions[i, :n] = torch.arange(len(p) - 1, len(p) - 1 + n)
            targets[i, :n] = torch.tensor(list(r), dtype=torch.long)
            mask[i, :n] = 1.0
    return {
        "input_ids": input_ids.to(device),
        "attention_mask": attention.to(device),
        "positions": positions.to(device),
        "targets": targets.to(device),
        "response_mask": mask.to(device),
    }


def response_logprobs(
    model: torch.nn.Module,
    inputs: dict[str, Tensor],
    *,
    with_entropy: bool = False,
    entropy_grad: bool = False,
    temperature: float = 1.0,
) -> tuple[Tensor, Tensor | None]:
    """Log-probs (and entropies) of the response tokens of one collated micro-batch.

    Gradients flow into ``logp`` when called outside ``torch.no_grad``, and into the
    entropy only with ``entropy_grad`` (an entropy bonus). Logits are divided by the
    sampling ``temperature`` so the log-probs are those of the policy that sampled.

    Returns:
        ``logp [b, T]`` and ``entropy [b, T]`` (or None); 0 outside the response mask.
    """
    out = model(
        input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], use_cache=False
    )
    logits = out.logits  # [b, L, V]
    pos = inputs["positions"]  # [b, T]
    picked = logits.gather(1, pos[..., None].expand(-1, -1, logits.shape[-1]))  # [b, T, V]
    if temperature != 1.0:
        picked = picked / temperature
    mask = inputs["response_mask"]
    logp = selective_log_softmax(picked, inputs["targets"]) * mask  # [b, T]
    entropy = None
    if with_entropy:
        if entropy_grad:
            entropy = token_entropy(picked) * mask  # [b, T]
        else:
            with torch.no_grad():  # a metric only: no graph
                entropy = token_entropy(picked.detach()) * mask  # [b, T]
    return logp, entropy


def encode_prompts(
    tokenizer: Any, prompts: Sequence[str], answers: Sequence[Any], group_size: int
) -> list[list[int]]:
    """Token ids of each prompt as given (no special tokens added), after the checks every
    generation backend makes: ``group_size >= 1``, one answer per prompt, no empty prompt."""
    if group_size < 1:
        raise ValueError(f"group_size must be >= 1, got {group_size}")
    if len(prompts) != len(answers):
        raise ValueError(f"prompts has {len(prompts)} items but answers has {len(answers)}")
    encoded = [list(tokenizer(p, add_special_tokens=False)["input_ids"]) for p in prompts]
    for i, ids in enumerate(encoded):
        if not ids:
            raise ValueError(f"prompt {i} ({prompts[i]!r}) tokenizes to nothing")
    return encoded


def batch_from_token_outputs(
    prompts: Sequence[str],
    answers: Sequence[Any],
    prompt_ids: Sequence[Sequence[int]],
    responses: Sequence[Sequence[Sequence[int]]],
    *,
    group_size: int,
    eos_token_id: int | None,
    max_new_tokens: int,
    decode: Callable[[list[list[int]]], list[str]],
    length_stopped: Sequence[Sequence[bool]] | None = None,
    logprobs: Sequence[Sequence[Sequence[float]]] | None = None,
    entropy: Sequence[Sequence[Sequence[float]]] | None = None,
) -> Batch:
    """A :class:`~qae.train.rollout.Batch` from sampled token ids, laid out as
    :func:`~qae.train.rollout.generate_batch` lays it out.

    Args:
        prompts: P prompt texts. answers: P ground truths.
        prompt_ids: P token lists of the prompts.
        responses: P lists of G token lists (``responses[i][j]``: sample j of prompt i);
            tokens after the first end-of-sequence token are dropped, the token is kept.
        group_size: G, checked against every ``responses[i]``.
        eos_token_id: the end-of-sequence token (None: responses never end early).
        max_new_tokens: the length limit the samples were drawn with.
        decode: token lists -> texts (e.g. ``tokenizer.batch_decode`` without special
            tokens).
        length_stopped: optional P lists of G flags, True where the engine stopped a sample
            at a length limit (such a sample is truncated even when it is shorter than
            ``max_new_tokens``, e.g. cut by the context length).
        logprobs, entropy: optional P lists of G lists with one number per sampled token
            (the sampling distribution's log-prob of the token and its entropy), laid out
            as ``responses``; they fill ``Batch.sample_logprobs``,
            ``Batch.sample_token_entropy`` and ``Batch.sample_entropy`` (per-response sums).

    Returns:
        B = P·G rows in prompt order, each prompt's G samples together: ``group_ids [B]``
        ``[0]*G + [1]*G + ...``, ``truncated [B]`` (no end token and a length limit hit),
        ``scores [B]`` and ``rewards [B]`` zero, ``loss_rows [B]`` all True.
    """
    n = len(prompts)
    if group_size < 1:
        raise ValueError(f"group_size must be >= 1, got {group_size}")
    for name, seq in (("answers", answers), ("prompt_ids", prompt_ids), ("responses", responses)):
        if len(seq) != n:
            raise ValueError(f"prompts has {n} items but {name} has {len(seq)}")
    if length_stopped is not None and len(length_stopped) != n:
        raise ValueError(f"prompts has {n} items but length_stopped has {len(length_stopped)}")
    prompt_rows: list[list[int]] = []
    response_rows: list[list[int]] = []
    truncated: list[bool] = []
    row_logprobs: list[list[float]] = []
    row_entropy: list[list[float]] = []
    for i, samples in enumerate(responses):
        if len(samples) != group_size:
            raise ValueError(
                f"prompt {i} has {len(samples)} responses, expected group_size={group_size}"
            )
        for j, sample in enumerate(samples):
            toks = [int(t) for t in sample]
            if eos_token_id is not None and eos_token_id in toks:
                toks = toks[: toks.index(eos_token_id) + 1]
                cut = False
            else:
                stopped = bool(length_stopped[i][j]) if length_stopped is not None else False
                cut = stopped or len(toks) >= max_new_tokens
            prompt_rows.append([int(t) for t in prompt_ids[i]])
            response_rows.append(toks)
            truncated.append(cut)
            if logprobs is not None:
                row_logprobs.append([float(x) for x in logprobs[i][j][: len(toks)]])
            if entropy is not None:
                row_entropy.append([float(x) for x in entropy[i][j][: len(toks)]])
    b = len(response_rows)
    return Batch(
        prompt_ids=prompt_rows,
        response_ids=response_rows,
        group_ids=torch.arange(n).repeat_interleave(group_size),
        scores=torch.zeros(b),
        rewards=torch.zeros(b),
        truncated=torch.tensor(truncated, dtype=torch.bool),
        loss_rows=torch.ones(b, dtype=torch.bool),
        texts=list(decode(response_rows)) if b else [],
        answers=[a for a in answers for _ in range(group_size)],
        prompts=[p for p in prompts for _ in range(group_size)],
        sample_entropy=[sum(row) for row in row_entropy],
        sample_logprobs=row_logprobs,
        sample_token_entropy=row_entropy,
    )


def sample_batch(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[str],
    answers: Sequence[Any],
    *,
    group_size: int,
    temperature: float = 1.0,
    top_p: float = 1.0,
    max_new_tokens: int = 16,
    batch_size: int = 256,
) -> Batch:
    """Sample ``group_size`` responses per prompt with qae's cached sampling loop
    (:func:`qae.train.sampler.sample_responses`: one prefill per prompt, finished rows leave the
    batch); the same contract as :func:`generate_batch`, with ``Batch.sample_entropy``
    and ``Batch.sample_logprobs`` filled. ``batch_size`` bounds the rows of one loop."""
    from qae.train.sampler import sample_responses

    encoded = encode_prompts(tokenizer, prompts, answers, group_size)
    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    responses: list[list[list[int]]] = []
    logprobs: list[list[list[float]]] = []
    entropy: list[list[list[float]]] = []
    per_call = max(1, batch_size // group_size)
    for start in range(0, len(encoded), per_call):
        chunk = encoded[start : start + per_call]
        out = sample_responses(
            model,
            chunk,
            group_size=group_size,
            max_new_tokens=max_new_tokens,
            eos_id=eos,
            pad_id=pad,
            temperature=temperature,
            top_p=top_p,
        )
        for i in range(len(chunk)):
            rows = slice(i * group_size, (i + 1) * group_size)
            responses.append(out.tokens[rows])
            logprobs.append(out.logprobs[rows])
            entropy.append(out.entropy[rows])
    return batch_from_token_outputs(
        prompts,
        answers,
        encoded,
        responses,
        group_size=group_size,
        eos_token_id=eos,
        max_new_tokens=max_new_tokens,
        decode=lambda rows: tokenizer.batch_decode(rows, skip_special_tokens=True),
        logprobs=logprobs,
        entropy=entropy,
    )


@torch.no_grad()
def generate_batch(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[str],
    answers: Sequence[Any],
    *,
    group_size: int,
    temperature: float = 1.0,
    top_p: float = 1.0,
    max_new_tokens: int = 16,
    batch_size: int = 256,
    measure_entropy: bool = True,
) -> Batch:
    """Sample ``group_size`` responses for each prompt with Hugging Face ``generate``.

    Scores and rewards are left at 0 (the caller scores them). Prompts are tokenized as
    given (apply templates first). Responses end at the first end-of-sequence token,
    which is kept; a response without one that reached ``max_new_tokens`` is truncated.
    With ``measure_entropy`` each response's summed sampling entropy is recorded in
    ``Batch.sample_entropy`` (one softmax over the vocabulary per generated token).
    """
    encoded = encode_prompts(tokenizer, prompts, answers, group_size)
    device = next(model.parameters()).device
    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    prompt_rows: list[list[int]] = []
    response_rows: list[list[int]] = []
    truncated: list[bool] = []
    entropy_sums: list[float] = []
    per_call = max(1, batch_size // group_size)
    for start in range(0, len(encoded), per_call):
        chunk = encoded[start : start + per_call]
        width = max(len(x) for x in chunk)
        ids = torch.full((len(chunk), width), pad, dtype=torch.long)
        attn = torch.zeros((len(chunk), width), dtype=torch.long)
        for i, x in enumerate(chunk):  # left padding for generation
            ids[i, width - len(x) :] = torch.tensor(x)
            attn[i, width - len(x) :] = 1
        kwargs: dict[str, Any] = dict(max_new_tokens=max_new_tokens, pad_token_id=pad)
        if eos is not None:
            kwargs["eos_token_id"] = eos
        if temperature > 0:
            kwargs.update(do_sample=True, temperature=temperature, top_p=top_p, top_k=0)
        else:
            kwargs.update(do_sample=False)
        recorder = _EntropyRecorder(temperature) if measure_entropy else None
        if recorder is not None:
            kwargs["logits_processor"] = [recorder]
        # Greedy decoding draws the same response G times: generate it once and repeat it
        # (``generate`` refuses several greedy sequences per prompt).
        draws = group_size if temperature > 0 else 1
        out = model.generate(
            input_ids=ids.to(device),
            attention_mask=attn.to(device),
            num_return_sequences=draws,
            **kwargs,
        )
        new = out[:, width:].cpu()  # [len(chunk) * draws, steps]
        rows: list[list[int]] = []
        for j in range(new.shape[0]):
            toks = new[j].tolist()
            if eos is not None and eos in toks:
                toks = toks[: toks.index(eos) + 1]
            rows.append(toks)
        sums = recorder.row_sums([len(r) for r in rows]) if recorder is not None else []
        repeat = group_size // draws
        for j, toks in enumerate(rows):
            ended = eos is not None and bool(toks) and toks[-1] == eos
            cut = not ended and len(toks) >= max_new_tokens
            for _ in range(repeat):
                prompt_rows.append(list(chunk[j // draws]))
                response_rows.append(list(toks))
                truncated.append(cut)
                if sums:
                    entropy_sums.append(sums[j])
    b = len(response_rows)
    texts = tokenizer.batch_decode(response_rows, skip_special_tokens=True)
    return Batch(
        prompt_ids=prompt_rows,
        response_ids=response_rows,
        group_ids=torch.arange(len(prompts)).repeat_interleave(group_size),
        scores=torch.zeros(b),
        rewards=torch.zeros(b),
        truncated=torch.tensor(truncated, dtype=torch.bool),
        loss_rows=torch.ones(b, dtype=torch.bool),
        texts=texts,
        answers=[a for a in answers for _ in range(group_size)],
        prompts=[p for p in prompts for _ in range(group_size)],
        sample_entropy=entropy_sums,
    )
