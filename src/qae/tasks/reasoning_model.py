"""The shipped base policy of the reasoning task: a small Qwen3 that writes step-by-step
solutions with a controlled rate of slips.

:func:`build_reasoning_model` reproduces the shipped weights from a seed: random init,
then teacher forcing on solutions written by :func:`qae.tasks.reasoning.solution` with
every result digit wrong with probability ``slip`` and the formatting variants drawn at
random (loss on the response and end tokens only). A model that learnt the traces
exactly would, sampled at temperature 1, get each result digit right with probability
``1 - slip`` (``1 - carry_slip`` where a carry or borrow comes in): success falls
smoothly with the number of result digits and carries a chain needs, and RL has headroom
on every level (the right digit is always the most likely one).

The tokenizer keeps the words of :data:`qae.tasks.reasoning.WORDS` whole and splits
everything else into characters (digits, ``+-=;,.:``, space and the lowercase letters).
Attention heads are 32 wide, a size CPU inference engines accept.
"""

from __future__ import annotations

import random
import string
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from qae.tasks import reasoning
from qae.tasks.reasoning import MAX_NEW_TOKENS
from qae.tasks.tiny_model import PretrainConfig, PretrainTask, build_tiny_model, build_tokenizer

__all__ = [
    "REASONING",
    "ReasoningPretrainConfig",
    "build_reasoning_model",
    "build_reasoning_tokenizer",
    "load_reasoning_model",
    "reasoning_model_path",
]

ALPHABET = string.digits + "+-=;,.: " + string.ascii_lowercase
"""Characters the reasoning tokenizer has a token for (besides its words)."""

MAX_POSITIONS = 160
"""Model context: the longest prompt (24 tokens) plus :data:`MAX_NEW_TOKENS`, rounded up."""


def reasoning_model_path() -> Path:
    """Directory of the shipped reasoning model (config, safetensors weights, tokenizer)."""
    return Path(__file__).resolve().parent / "assets" / "reasoning"


def build_reasoning_tokenizer() -> Any:
    """The reasoning task's tokenizer (see the module docs)."""
    return build_tokenizer(ALPHABET, reasoning.WORDS, model_max_length=MAX_POSITIONS)


@dataclass
class ReasoningPretrainConfig(PretrainConfig):
    """Pre-training settings of the reasoning model; the defaults build the shipped one."""

    hidden_size: int = 128
    num_layers: int = 4
    num_heads: int = 4
    intermediate_size: int = 384
    batch_size: int = 64
    lr: float = 3e-3
    warmup_steps: int = 100
    max_steps: int = 3000
    eval_every: int = 500
    target_pass_at_1: float | None = None
    threads: int = 1
    architecture: str = "qwen3"
    slip: float = 0.05
    """Probability that a result digit of a training solution is written wrong."""
    carry_slip: float = 0.35
    """The same for a digit whose column takes a carry or a borrow."""
    check_prob: float = 0.3
    """Probability of a check step in a training solution (and of a second one after it)."""


def _stream(config: ReasoningPretrainConfig) -> Iterator[dict]:
    """Training records with a slipped, varied solution as ``target``."""
    rng = random.Random(config.seed + 1)  # the solutions' draws, apart from the prompts'
    for record in reasoning.iter_train(config.seed, weights=config.level_weights):
        trace = reasoning.solution(
            record["prompt"],
            rng,
            slip=config.slip,
            carry_slip=config.carry_slip,
            check_prob=config.check_prob,
        )
        yield {**record, "target": trace.text}


REASONING = PretrainTask(
    name="reasoning",
    tokenizer=build_reasoning_tokenizer,
    stream=_stream,
    split=reasoning.make_split,
    score=reasoning.reasoning_score,
    max_new_tokens=MAX_NEW_TOKENS,
    max_positions=MAX_POSITIONS,
    levels=reasoning.LEVELS,
)
"""The reasoning task as pre-training sees it."""


def build_reasoning_model(
    out_dir: str | Path | None = None,
    config: ReasoningPretrainConfig | None = None,
    *,
    val_samples: int = 16,
    log: Any = None,
) -> dict:
    """Pre-train the reasoning model, measure it and save it to ``out_dir`` (default: the
    package assets). The build info holds the validation spread at temperature 1 with
    ``val_samples`` samples per prompt. Returns the build info."""
    out = Path(out_dir) if out_dir is not None else reasoning_model_path()
    return build_tiny_model(
        out, config or ReasoningPretrainConfig(), val_samples=val_samples, task=REASONING, log=log
    )


def load_reasoning_model(
    device: str | torch.device = "cpu", path: str | Path | None = None
) -> tuple:
    """Load the shipped reasoning model and its tokenizer; ``(model, tokenizer)``, the
    model in eval mode on ``device``."""
    from qae.tasks.tiny_model import load_tiny_model

    return load_tiny_model(device, reasoning_model_path() if path is None else path)
