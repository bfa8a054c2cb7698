"""Multi-operand integer arithmetic: the built-in verifiable task.

A prompt is a chain of ``+`` / ``-`` operations on non-negative integers ending in ``=``;
the answer is the value written least-significant digit first, then the model's end
token::

    prompt "12+7-3="   value 16   answer "61"
    prompt "5+8="      value 13   answer "31"

Writing the digits in reverse lets a small causal model compute the answer column by
column, carrying as it goes, the way it would be done by hand; written the usual way the
first digit needs the whole carry chain before anything is emitted, and a model of a
million parameters learns only the easiest items (its middle band stays at zero). The
value of every prompt is non-negative, so an answer holds digits only.

Difficulty is graded by the number of operands and of digits per operand
(:data:`LEVELS`), so that one batch mixes prompts the tiny base model nearly always solves
with prompts it rarely solves.

Splits are deterministic: :func:`iter_train` is an unbounded seeded stream that never
yields a prompt of the fixed ``validation`` or ``dev`` split, and :func:`make_split`
builds those fixed splits balanced over the levels (``dev`` shares no prompt with
``validation``). Records are dicts with ``prompt``,
``answer`` (string), ``difficulty`` (level, 1 = easiest) and ``value`` (the integer).

:func:`arithmetic_score` is the exact verifier (1.0 / 0.0); it never raises. Importing
this module registers it as the reward ``arithmetic``.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from qae.rewards import register_reward
from qae.tasks.splits import SplitSpec, balanced

__all__ = [
    "ALPHABET",
    "END_TOKENS",
    "LEVELS",
    "SPLITS",
    "Level",
    "arithmetic_score",
    "format_answer",
    "iter_train",
    "make_problem",
    "make_split",
    "max_answer_chars",
    "parse_answer",
]

ALPHABET = "0123456789+-="
"""Every character a prompt or an answer may contain."""

END_TOKENS = ("</s>", "<pad>", "<|endoftext|>")
"""End markers the verifier cuts a response at, in case a decoder kept them."""


@dataclass(frozen=True)
class Level:
    """One difficulty level: ``operands`` numbers of ``digits`` digits at most each."""

    operands: int
    digits: int

    def __post_init__(self) -> None:
        if self.operands < 2:
            raise ValueError(f"Level.operands must be >= 2, got {self.operands}")
        if self.digits < 1:
            raise ValueError(f"Level.digits must be >= 1, got {self.digits}")


LEVELS: tuple[Level, ...] = (
    Level(2, 1),
    Level(3, 1),
    Level(4, 1),
    Level(2, 2),
    Level(3, 2),
    Level(4, 2),
)
"""Difficulty levels; a record's ``difficulty`` is the 1-based index into this tuple."""


SPLITS: dict[str, SplitSpec] = {
    "validation": SplitSpec(size=288, seed=20250922),
    "dev": SplitSpec(size=144, seed=20250923),
}
"""The fixed held-out splits: default size and seed of each (sizes are multiples of 6)."""


def format_answer(value: int) -> str:
    """The answer string of a non-negative ``value``: its digits, least significant first."""
    if value < 0:
        raise ValueError(f"value must be >= 0, got {value}")
    return str(value)[::-1]


def parse_answer(answer: str) -> int | None:
    """Inverse of :func:`format_answer`; ``None`` when ``answer`` is not a digit string."""
    if not answer or not answer.isascii() or not answer.isdigit():
        return None
    return int(answer[::-1])


def max_answer_chars(levels: tuple[Level, ...] = LEVELS) -> int:
    """Longest answer any level can have, in characters (the end token not counted)."""
    # the largest value is the sum of all operands at their maximum
    return max(len(str(lv.operands * (10**lv.digits - 1))) for lv in levels)


def make_problem(rng: random.Random, difficulty: int, levels: tuple[Level, ...] = LEVELS) -> dict:
    """Draw one record of level ``difficulty`` (1-based) from ``rng``.

    Operands are uniform on ``[0, 10**digits)`` and each operator is ``+`` or ``-`` with
    probability 1/2; draws whose value is negative are rejected and redrawn.
    """
    if not 1 <= difficulty <= len(levels):
        raise ValueError(f"difficulty must be in 1..{len(levels)}, got {difficulty}")
    level = levels[difficulty - 1]
    high = 10**level.digits - 1
    while True:
        numbers = [rng.randint(0, high) for _ in range(level.operands)]
        signs = [rng.random() < 0.5 for _ in range(level.operands - 1)]  # True means minus
        value = numbers[0]
        prompt = str(numbers[0])
        for minus, x in zip(signs, numbers[1:], strict=True):
            value += -x if minus else x
            prompt += ("-" if minus else "+") + str(x)
        if value >= 0:
            return {
                "prompt": prompt + "=",
                "answer": format_answer(value),
                "difficulty": difficulty,
                "value": value,
            }


def _balanced(
    rng: random.Random, n: int, levels: tuple[Level, ...], exclude: frozenset[str] = frozenset()
) -> list[dict]:
    """``n`` distinct records cycling through the levels, none with a prompt in ``exclude``."""
    return balanced(lambda r, d: make_problem(r, d, levels), rng, n, len(levels), exclude)


def _earlier_prompts(name: str) -> frozenset[str]:
    """Prompts of the fixed splits listed before ``name`` in :data:`SPLITS`."""
    names = list(SPLITS)
    return frozenset(
        r["prompt"] for other in names[: names.index(name)] for r in _fixed_split(other)
    )


@lru_cache(maxsize=8)
def _fixed_split(name: str) -> tuple[dict, ...]:
    spec = SPLITS[name]
    return tuple(_balanced(random.Random(spec.seed), spec.size, LEVELS, _earlier_prompts(name)))


@lru_cache(maxsize=1)
def _held_out_prompts() -> frozenset[str]:
    return frozenset(r["prompt"] for name in SPLITS for r in _fixed_split(name))


def make_split(name: str, n: int | None = None, seed: int | None = None) -> list[dict]:
    """A deterministic list of records.

    ``"validation"`` and ``"dev"`` are the fixed held-out splits: with ``n`` and ``seed``
    left out they are exactly the shipped ones (:data:`SPLITS`), balanced over the
    levels, without repeated prompts; a smaller ``n`` returns a balanced prefix.
    ``"train"`` returns the first ``n`` records of :func:`iter_train` (``seed`` defaults
    to 0), which never hold a prompt of the held-out splits.
    """
    if name == "train":
        if n is None or n < 0:
            raise ValueError(f"make_split('train') needs n >= 0, got n={n!r}")
        stream = iter_train(0 if seed is None else seed)
        return [next(stream) for _ in range(n)]
    if name not in SPLITS:
        raise ValueError(f"unknown split name={name!r}; known: train, {', '.join(SPLITS)}")
    spec = SPLITS[name]
    if n is not None and n < 0:
        raise ValueError(f"n must be >= 0, got n={n}")
    if seed is None or seed == spec.seed:
        if n is None or n <= spec.size:
            records = _fixed_split(name)[: spec.size if n is None else n]
            return [dict(r) for r in records]
    # another seed or a larger size: a fresh balanced split, same construction
    rng = random.Random(spec.seed if seed is None else seed)
    return _balanced(rng, spec.size if n is None else n, LEVELS, _earlier_prompts(name))


def iter_train(
    seed: int = 0, *, levels: tuple[Level, ...] = LEVELS, weights: tuple[float, ...] | None = None
) -> Iterator[dict]:
    """Unbounded stream of training records, reproducible from ``seed``.

    Each record's level is drawn with probabilities proportional to ``weights`` (uniform
    by default). Prompts of the fixed ``validation`` and ``dev`` splits are skipped, so
    held-out figures measure problems never trained on.
    """
    if weights is not None and (
        len(weights) != len(levels) or any(w < 0 for w in weights) or sum(weights) <= 0
    ):
        raise ValueError(
            f"weights must be {len(levels)} non-negative numbers with a positive sum, "
            f"got {weights!r}"
        )
    rng = random.Random(seed)
    held_out = _held_out_prompts()
    choices = list(range(1, len(levels) + 1))
    while True:
        if weights is None:
            difficulty = rng.randint(1, len(levels))
        else:
            difficulty = rng.choices(choices, weights=weights)[0]
        rec = make_problem(rng, difficulty, levels)
        if rec["prompt"] not in held_out:
            yield rec


def cut_at_end(text: str) -> str:
    """``text`` up to its first end marker (:data:`END_TOKENS`), stripped."""
    for end in END_TOKENS:
        cut = text.find(end)
        if cut >= 0:
            text = text[:cut]
    return text.strip()


def digits_match(answer: str | None, ground_truth: Any) -> float:
    """1.0 when ``answer`` is exactly the digit string ``ground_truth`` (surrounding
    whitespace of the truth ignored), else 0.0; a truth that is not a digit string scores
    0. Never raises."""
    try:
        truth = str(ground_truth).strip()
        if answer is None or not (truth.isascii() and truth.isdigit()):
            return 0.0
        return 1.0 if answer == truth else 0.0
    except Exception:
        return 0.0


@register_reward("arithmetic", isolated=False)  # exact: microseconds an item, in-process
def arithmetic_score(response: Any, ground_truth: Any, **_: Any) -> float:
    """Exact verifier: 1.0 when ``response`` is the answer ``ground_truth``, else 0.0.

    ``ground_truth`` is a record's ``answer`` string (digits least-significant first).
    The response is cut at the first end marker (:data:`END_TOKENS`) and stripped of
    surrounding whitespace; anything else that differs scores 0. Never raises: a
    response or ground truth that is not a string, or not a digit string, scores 0.
    """
    return digits_match(extract_arithmetic_answer(response), ground_truth)


def extract_arithmetic_answer(response: Any) -> str | None:
    """The answer a response gives (for maj@n): the text before any end marker."""
    if not isinstance(response, str):
        return None
    return cut_at_end(response) or None


arithmetic_score.cheap = True  # type: ignore[attr-defined]
# Evaluation reads the answer a response gives through this (maj@n votes on it).
arithmetic_score.extract = extract_arithmetic_answer  # type: ignore[attr-defined]
