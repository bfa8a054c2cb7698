"""The built-in tiny base policy: a character tokenizer and a small Qwen2 pre-trained on
the arithmetic task until it is partially competent.

The shipped weights (``assets/``) are what :func:`load_tiny_model` returns and what the
trainer uses by default (:func:`tiny_model_path`). :func:`build_tiny_model` reproduces
them from a seed: random init, then teacher forcing on :func:`~qae.tasks.arithmetic.iter_train`
(loss on the answer and end tokens only) until greedy pass@1 on the ``dev`` split
reaches a target, so that easy levels are mostly solved and hard ones rarely are.

The tokenizer has one token per character of :data:`~qae.tasks.arithmetic.ALPHABET`
plus ``<pad>``, ``</s>`` (end of sequence) and ``<unk>``; it adds no special token when
encoding, so a prompt is encoded the same with or without ``add_special_tokens``.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from qae.eval.sampling import generate_texts, generation_mode, score_responses
from qae.io.atomic import atomic_write_json
from qae.tasks.arithmetic import (
    ALPHABET,
    LEVELS,
    arithmetic_score,
    iter_train,
    make_split,
    max_answer_chars,
)

__all__ = [
    "ARITHMETIC",
    "BUILD_INFO_FILE",
    "PretrainConfig",
    "PretrainResult",
    "PretrainTask",
    "build_model",
    "build_tiny_model",
    "build_tokenizer",
    "generate_answers",
    "load_tiny_model",
    "pass_at_1",
    "pretrain",
    "summarize_scores",
    "time_generation",
    "tiny_model_path",
]

PAD, EOS, UNK = "<pad>", "</s>", "<unk>"
BUILD_INFO_FILE = "build_info.json"
MAX_NEW_TOKENS = max_answer_chars() + 1  # the answer, then the end token
"""Enough new tokens for the longest answer of the task plus the end token."""


def tiny_model_path() -> Path:
    """Directory of the shipped tiny model (config, safetensors weights, tokenizer)."""
    return Path(__file__).resolve().parent / "assets"


def build_tokenizer(
    alphabet: str = ALPHABET, words: Sequence[str] = (), model_max_length: int = 64
) -> Any:
    """A character-level ``PreTrainedTokenizerFast``: ``<pad>`` (id 0), ``</s>`` (id 1),
    ``<unk>`` (id 2), one token per character of ``alphabet``, then one per word of
    ``words`` (a word in the text is one token; other text splits into characters).

    Padding is on the left (batched generation); decoding joins tokens with nothing.
    """
    import re

    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    if len(set(alphabet)) != len(alphabet) or not alphabet:
        raise ValueError(f"alphabet must be non-empty distinct characters, got {alphabet!r}")
    if len(set(words)) != len(words) or any(len(w) < 2 for w in words):
        raise ValueError(f"words must be distinct strings of 2+ characters, got {words!r}")
    vocab = {PAD: 0, EOS: 1, UNK: 2}
    for token in (*alphabet, *words):
        vocab[token] = len(vocab)
    # Longest words first, so that a word is never cut by a shorter one it starts with.
    pattern = "|".join(re.escape(w) for w in sorted(words, key=len, reverse=True))
    pattern = f"{pattern}|[\\s\\S]" if pattern else "[\\s\\S]"
    core = Tokenizer(models.WordLevel(vocab, unk_token=UNK))
    core.pre_tokenizer = pre_tokenizers.Split(Regex(pattern), behavior="isolated")
    core.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(
        tokenizer_object=core,
        pad_token=PAD,
        eos_token=EOS,
        unk_token=UNK,
        padding_side="left",
        model_max_length=model_max_length,
    )


@dataclass(frozen=True)
class PretrainTask:
    """What pre-training and measuring a tiny model need from a built-in task."""

    name: str
    tokenizer: Callable[[], Any]
    """Builds the task's tokenizer."""
    stream: Callable[[Any], Iterator[dict]]
    """Training records for a :class:`PretrainConfig` (seeded by it): ``prompt``,
    ``answer`` and the ``target`` text the model learns to write (default: ``answer``)."""
    split: Callable[[str], list[dict]]
    """The task's fixed ``dev`` and ``validation`` splits by name."""
    score: Callable[[str, Any], float]
    """The task's exact verifier."""
    max_new_tokens: int
    """Response length limit (the end token included)."""
    max_positions: int
    """The model's context: prompt plus response tokens."""
    levels: tuple = ()
    """The task's difficulty levels (dataclasses), recorded in the build info."""


def _arithmetic_stream(config: PretrainConfig) -> Iterator[dict]:
    return iter_train(config.seed, weights=config.level_weights)


ARITHMETIC = PretrainTask(
    name="arithmetic",
    tokenizer=lambda: build_tokenizer(),
    stream=_arithmetic_stream,
    split=make_split,
    score=arithmetic_score,
    max_new_tokens=MAX_NEW_TOKENS,
    max_positions=64,
    levels=LEVELS,
)
"""The arithmetic task as pre-training sees it (answers only, no reasoning)."""


@dataclass
class PretrainConfig:
    """Settings of the tiny model and of its pre-training; the defaults build the shipped one."""

    seed: int = 0
    """Seeds the initialization (torch) and the training stream (``iter_train(seed)``)."""
    hidden_size: int = 96
    num_layers: int = 4
    num_heads: int = 4
    intermediate_size: int = 256
    batch_size: int = 64
    """Training records per optimizer step."""
    lr: float = 3e-3
    """Peak AdamW learning rate, reached after ``warmup_steps`` and cosine-decayed to
    a tenth of it at ``max_steps``."""
    warmup_steps: int = 100
    weight_decay: float = 0.01
    max_steps: int = 3000
    eval_every: int = 250
    """Greedy pass@1 on the ``dev`` split is measured every this many steps."""
    target_pass_at_1: float | None = 0.5
    """Stop at the first evaluation whose dev greedy pass@1 reaches this (None: never)."""
    level_weights: tuple[float, ...] | None = None
    """Sampling weights of the difficulty levels in training (None: uniform)."""
    threads: int = 2
    """torch CPU threads during pre-training (restored afterwards)."""
    architecture: str = "qwen2"
    """``qwen2`` or ``qwen3`` (``Qwen3ForCausalLM``, heads ``hidden_size / num_heads``
    wide). Note: ``AutoTokenizer`` loads a ``qwen2`` checkpoint's tokenizer as Qwen2's
    byte-level BPE whatever its ``tokenizer.json`` says, which only a tokenizer of
    single characters without spaces survives; ``qwen3`` keeps the saved tokenizer."""


@dataclass
class PretrainResult:
    """What :func:`pretrain` returns: the model, its tokenizer and the training record."""

    model: Any
    tokenizer: Any
    steps: int
    seconds: float
    history: list[dict] = field(default_factory=list)
    """One entry per evaluation: step, mean training loss since the last one, dev pass@1."""


def build_model(
    tokenizer: Any,
    config: PretrainConfig | None = None,
    *,
    max_positions: int = 64,
    max_new_tokens: int = MAX_NEW_TOKENS,
) -> Any:
    """A randomly initialized ``Qwen2ForCausalLM`` sized by ``config`` for ``tokenizer``,
    with a context of ``max_positions`` tokens and ``max_new_tokens`` as its generation
    default.

    Initialization is seeded with ``config.seed``; input and output embeddings are tied.
    """
    from transformers import Qwen2Config, Qwen2ForCausalLM, Qwen3Config, Qwen3ForCausalLM

    config = config or PretrainConfig()
    shape = dict(
        vocab_size=len(tokenizer),
        hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_layers,
        num_attention_heads=config.num_heads,
        num_key_value_heads=config.num_heads,
        max_position_embeddings=max_positions,
        tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
    )
    if config.architecture == "qwen3":
        model_cls, model_config = (
            Qwen3ForCausalLM,
            Qwen3Config(**shape, head_dim=config.hidden_size // config.num_heads),
        )
    elif config.architecture == "qwen2":
        model_cls, model_config = Qwen2ForCausalLM, Qwen2Config(**shape)
    else:
        raise ValueError(
            f"architecture must be qwen2 or qwen3, got architecture={config.architecture!r}"
        )
    torch.manual_seed(config.seed)
    model = model_cls(model_config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.bos_token_id = None
    model.generation_config.max_new_tokens = max_new_tokens
    return model


def _encode_batch(tokenizer: Any, records: Sequence[dict]) -> tuple[torch.Tensor, ...]:
    """Right-padded ``prompt + target + </s>`` ids with labels on the target and ``</s>``
    (a record's ``target`` is the response to learn; its ``answer`` when it has none).

    Returns ``input_ids [N, L]``, ``attention_mask [N, L]``, ``labels [N, L]`` (-100 off
    the target).
    """
    prompts = tokenizer([r["prompt"] for r in records], add_special_tokens=False)["input_ids"]
    targets = [r.get("target", r["answer"]) for r in records]
    answers = tokenizer(targets, add_special_tokens=False)["input_ids"]
    width = max(len(p) + len(a) + 1 for p, a in zip(prompts, answers, strict=True))
    ids = torch.full((len(records), width), tokenizer.pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(records), width), dtype=torch.long)
    labels = torch.full((len(records), width), -100, dtype=torch.long)
    for i, (p, a) in enumerate(zip(prompts, answers, strict=True)):
        row = p + a + [tokenizer.eos_token_id]
        ids[i, : len(row)] = torch.tensor(row)
        mask[i, : len(row)] = 1
        labels[i, len(p) : len(row)] = torch.tensor(a + [tokenizer.eos_token_id])
    return ids, mask, labels


def generate_answers(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[str],
    *,
    temperature: float = 0.0,
    samples: int = 1,
    max_new_tokens: int = MAX_NEW_TOKENS,
    batch_size: int = 512,
) -> list[list[str]]:
    """Decode ``samples`` responses per prompt (greedy when ``temperature`` is 0), through
    the sampling path of the evaluation (:func:`qae.eval.sampling.generate_texts`).

    Returns one list of ``samples`` response strings per prompt, special tokens removed.
    Seed torch beforehand for reproducible sampling.
    """
    if temperature <= 0 and samples != 1:
        raise ValueError(f"greedy decoding takes samples=1, got samples={samples}")
    if prompts and tokenizer.padding_side != "left":
        raise ValueError("generate_answers needs tokenizer.padding_side='left'")
    out: list[list[str]] = []
    per_call = max(1, batch_size // samples)
    with generation_mode(model, tokenizer):
        for start in range(0, len(prompts), per_call):
            chunk = list(prompts[start : start + per_call])
            texts = generate_texts(
                model,
                tokenizer,
                chunk,
                temperature=temperature,
                max_new_tokens=max_new_tokens,
                samples=samples,
                add_special_tokens=False,
            )
            for i in range(len(chunk)):
                out.append(texts[i * samples : (i + 1) * samples])
    return out


def pass_at_1(
    model: Any,
    tokenizer: Any,
    records: Sequence[dict],
    *,
    temperature: float = 0.0,
    samples: int = 1,
    seed: int = 0,
    score: Callable[[str, Any], float] = arithmetic_score,
    max_new_tokens: int = MAX_NEW_TOKENS,
) -> dict:
    """Mean score of ``samples`` responses per record, overall and per difficulty.

    Returns ``{"overall": float, "by_difficulty": {level: float}, "n": int}`` where
    ``n`` counts records. Sampling is seeded with ``seed`` (torch's global generator).
    """
    if not records:
        raise ValueError("pass_at_1 needs at least one record")
    torch.manual_seed(seed)
    responses = generate_answers(
        model,
        tokenizer,
        [r["prompt"] for r in records],
        temperature=temperature,
        samples=samples,
        max_new_tokens=max_new_tokens,
    )
    scores = score_responses(score, responses, [r["answer"] for r in records], workers=0)
    per_record = [sum(s) / len(s) for s in scores]
    return summarize_scores(records, per_record)


def summarize_scores(records: Sequence[dict], per_record: Sequence[float]) -> dict:
    """Mean of per-record success rates, overall and per ``difficulty``, plus the spread:
    the fraction of records below 0.2, in [0.2, 0.8] and above 0.8."""
    levels: dict[int, list[float]] = {}
    for r, s in zip(records, per_record, strict=True):
        levels.setdefault(int(r["difficulty"]), []).append(s)
    n = len(per_record)
    return {
        "overall": sum(per_record) / n,
        "by_difficulty": {k: sum(v) / len(v) for k, v in sorted(levels.items())},
        "n": n,
        "spread": {
            "below_0.2": sum(x < 0.2 for x in per_record) / n,
            "between_0.2_0.8": sum(0.2 <= x <= 0.8 for x in per_record) / n,
            "above_0.8": sum(x > 0.8 for x in per_record) / n,
        },
    }


def _lr_factor(step: int, config: PretrainConfig) -> float:
    if step < config.warmup_steps:
        return (step + 1) / config.warmup_steps
    progress = (step - config.warmup_steps) / max(1, config.max_steps - config.warmup_steps)
    return 0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def pretrain(
    config: PretrainConfig | None = None,
    *,
    task: PretrainTask = ARITHMETIC,
    log: Callable[[str], None] | None = None,
) -> PretrainResult:
    """Pre-train a fresh tiny model on ``task`` with teacher forcing.

    Seeded (``config.seed``) and single-process with ``config.threads`` torch threads,
    so the same settings on the same CPU give the same weights. Stops after
    ``config.max_steps`` optimizer steps, or earlier at the first evaluation whose dev
    greedy pass@1 reaches ``config.target_pass_at_1``.
    """
    config = config or PretrainConfig()
    if config.batch_size < 1 or config.max_steps < 1 or config.eval_every < 1:
        raise ValueError(
            "batch_size, max_steps and eval_every must be >= 1, got "
            f"{config.batch_size}, {config.max_steps}, {config.eval_every}"
        )
    old_threads = torch.get_num_threads()
    torch.set_num_threads(config.threads)
    try:
        return _pretrain(config, task, log or (lambda _: None))
    finally:
        torch.set_num_threads(old_threads)


def _pretrain(
    config: PretrainConfig, task: PretrainTask, log: Callable[[str], None]
) -> PretrainResult:
    tokenizer = task.tokenizer()
    model = build_model(
        tokenizer, config, max_positions=task.max_positions, max_new_tokens=task.max_new_tokens
    )
    model.train()
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
    optimizer = torch.optim.AdamW(
        [
            {"params": decay, "weight_decay": config.weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ],
        lr=config.lr,
        betas=(0.9, 0.98),
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: _lr_factor(s, config))
    stream = task.stream(config)
    dev = task.split("dev")
    history: list[dict] = []
    losses: list[float] = []
    start = time.perf_counter()
    step = 0
    while step < config.max_steps:
        batch = [next(stream) for _ in range(config.batch_size)]
        ids, mask, labels = _encode_batch(tokenizer, batch)  # [N, L] each
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        losses.append(loss.item())
        step += 1
        if step % config.eval_every == 0 or step == config.max_steps:
            dev_eval = pass_at_1(
                model, tokenizer, dev, score=task.score, max_new_tokens=task.max_new_tokens
            )
            entry = {
                "step": step,
                "seconds": round(time.perf_counter() - start, 1),
                "loss": sum(losses) / len(losses),
                "dev_pass_at_1": dev_eval["overall"],
                "dev_by_difficulty": dev_eval["by_difficulty"],
            }
            losses = []
            history.append(entry)
            by_level = " ".join(f"{v:.2f}" for v in dev_eval["by_difficulty"].values())
            log(
                f"step {step} {entry['seconds']}s loss {entry['loss']:.4f} "
                f"dev pass@1 {entry['dev_pass_at_1']:.3f} [{by_level}]"
            )
            target = config.target_pass_at_1
            if target is not None and dev_eval["overall"] >= target:
                break
    model.eval()
    return PretrainResult(
        model=model,
        tokenizer=tokenizer,
        steps=step,
        seconds=time.perf_counter() - start,
        history=history,
    )


def time_generation(
    model: Any,
    tokenizer: Any,
    *,
    prompts: int = 16,
    samples: int = 8,
    repeats: int = 5,
    seed: int = 0,
    task: PretrainTask = ARITHMETIC,
) -> dict:
    """Seconds to sample ``samples`` responses at temperature 1 for ``prompts`` validation
    prompts with ``model.generate`` (median of ``repeats`` runs), and their pass@1."""
    records = task.split("validation")[:prompts]
    times = []
    result: dict = {}
    for r in range(repeats):
        t0 = time.perf_counter()
        result = pass_at_1(
            model,
            tokenizer,
            records,
            temperature=1.0,
            samples=samples,
            seed=seed + r,
            score=task.score,
            max_new_tokens=task.max_new_tokens,
        )
        times.append(time.perf_counter() - t0)
    times.sort()
    return {
        "prompts": prompts,
        "samples": samples,
        "max_new_tokens": task.max_new_tokens,
        "threads": torch.get_num_threads(),
        "median_seconds": times[len(times) // 2],
        "pass_at_1_last": result["overall"],
    }


def build_tiny_model(
    out_dir: str | Path | None = None,
    config: PretrainConfig | None = None,
    *,
    val_samples: int = 4,
    task: PretrainTask = ARITHMETIC,
    log: Callable[[str], None] | None = None,
) -> dict:
    """Pre-train a tiny model on ``task``, measure it on the validation split and save it.

    Writes the tokenizer, ``config.json``, ``generation_config.json``,
    ``model.safetensors`` and :data:`BUILD_INFO_FILE` (settings, steps, seconds, dev
    history, validation pass@1 greedy and at temperature 1 with ``val_samples`` samples
    per prompt, overall and per difficulty, generation timing) into ``out_dir``
    (default: the package assets). Returns the build info.
    """
    import tokenizers
    import transformers

    config = config or PretrainConfig()
    out = Path(out_dir) if out_dir is not None else tiny_model_path()
    out.mkdir(parents=True, exist_ok=True)
    result = pretrain(config, task=task, log=log)
    model, tokenizer = result.model, result.tokenizer
    validation = task.split("validation")
    measure = dict(score=task.score, max_new_tokens=task.max_new_tokens)
    old_threads = torch.get_num_threads()
    torch.set_num_threads(config.threads)
    try:
        greedy = pass_at_1(model, tokenizer, validation, **measure)
        sampled = pass_at_1(
            model,
            tokenizer,
            validation,
            temperature=1.0,
            samples=val_samples,
            seed=config.seed,
            **measure,
        )
        timing = time_generation(model, tokenizer, task=task)
    finally:
        torch.set_num_threads(old_threads)
    info = {
        "task": task.name,
        "settings": asdict(config),
        "levels": [asdict(level) for level in task.levels],
        "parameters": sum(p.numel() for p in model.parameters()),
        "steps": result.steps,
        "train_seconds": round(result.seconds, 1),
        "history": result.history,
        "validation": {
            "n": greedy["n"],
            "greedy": greedy,
            "temperature_1": {**sampled, "samples_per_prompt": val_samples},
        },
        "generation_timing": timing,
        "versions": {
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "tokenizers": tokenizers.__version__,
        },
    }
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    for written in out.iterdir():  # shipped files must be readable by every user
        if written.is_file():
            os.chmod(written, 0o644)
    atomic_write_json(out / BUILD_INFO_FILE, info, indent=2, sort_keys=True)
    return info


def load_tiny_model(device: str | torch.device = "cpu", path: str | Path | None = None) -> tuple:
    """Load the shipped tiny model and its tokenizer with ``from_pretrained``.

    Returns ``(model, tokenizer)`` with the model in eval mode on ``device``.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    where = Path(path) if path is not None else tiny_model_path()
    if not (where / "config.json").is_file():
        raise FileNotFoundError(
            f"no tiny model at path={str(where)!r} (config.json missing); "
            "build one with scripts/build_tiny_model.py"
        )
    tokenizer = AutoTokenizer.from_pretrained(where)
    model = AutoModelForCausalLM.from_pretrained(where)
    model.to(device)
    model.eval()
    return model, tokenizer
