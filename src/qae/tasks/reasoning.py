"""Step-by-step arithmetic: the built-in reasoning task.

A prompt is a chain of ``+`` / ``-`` operations; a response works it out as a scratchpad
of partial results and ends with a final answer line::

    prompt    "73+84-91+5="
    response  "73+84=58; 58-91=66, so 66+5=17. Answer: 17"

Every number is written least-significant digit first (``73`` is 37, ``17`` is 71), as in
the arithmetic task's answers: a small causal model then adds column by column, carrying
as it goes. The chain above is 37 + 48 - 19 + 5 = 71.

Only the final answer decides the reward (:func:`reasoning_score`, exact); the rest of a
response is reasoning, and part of it does not decide correctness at all:

- the separator between steps (``"; "``, ``", "``, ``"; so "``, ``", then "``);
- the order of the terms of a ``+`` step (``58+5`` or ``5+58``);
- optional check steps before the answer (``check 17-5=66``: the last step undone).

So the entropy of a policy can rise or fall on tokens that leave the reward unchanged,
and responses can grow (more checks) without getting more right: overlong shaping has
something to act on.

Difficulty is a continuum: the number of operands (2 to 5) and the digits of each operand
(1 up to the level's maximum, drawn per operand) set the number of result digits a
response must get right. :data:`LEVELS` grades them; one batch mixes chains the base
model nearly always gets right with chains it rarely does.

:func:`solution` writes a response for a problem, optionally with the formatting variants
drawn at random and with *slips*: each result digit is wrong with probability ``slip``
(``carry_slip`` where a carry or borrow comes into its column) and later steps carry on
from the wrong value, as a careless solver would. The shipped
base policy (:mod:`qae.tasks.reasoning_model`) is pre-trained on such traces, so it is
imperfect in a controlled way and RL has headroom.

Splits are deterministic: :func:`make_split` builds the fixed ``validation`` and ``dev``
splits (balanced over the levels, disjoint); :func:`iter_train` is an unbounded seeded
stream that never yields one of their prompts. Records are dicts with ``prompt``,
``answer`` (the final value, least-significant digit first), ``difficulty`` (level,
1 = easiest), ``operands`` and ``value`` (the integer).

:func:`reasoning_score` is the exact verifier; importing this module registers it as the
reward ``reasoning``.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from qae.rewards import register_reward
from qae.tasks.arithmetic import Level, cut_at_end, digits_match, format_answer
from qae.tasks.splits import SplitSpec, balanced

__all__ = [
    "ANSWER_PREFIX",
    "LEVELS",
    "MAX_NEW_TOKENS",
    "SEPARATORS",
    "SPLITS",
    "WORDS",
    "ReasoningLevel",
    "Trace",
    "carries_in",
    "extract_reasoning_answer",
    "iter_train",
    "make_problem",
    "make_split",
    "reasoning_score",
    "solution",
]

MAX_NEW_TOKENS = 128
"""Response length limit in tokens: about twice the longest canonical solution, so that
length can drift (more checks, longer reasoning) before overlong shaping bites."""

ANSWER_PREFIX = "Answer:"
"""The final-answer marker; the verifier reads what follows its last occurrence."""

SEPARATORS = ("; ", ", ", "; so ", ", then ")
"""Ways to go from one step to the next (they do not decide correctness)."""

WORDS = ("Answer", "check", "so", "then")
"""Words the tokenizer keeps whole (one token each)."""


ReasoningLevel = Level
"""A difficulty level: ``operands`` numbers of 1 to ``digits`` digits each (the arithmetic
task's :class:`~qae.tasks.arithmetic.Level`)."""


LEVELS: tuple[ReasoningLevel, ...] = tuple(
    ReasoningLevel(operands, digits) for operands in (2, 3, 4, 5) for digits in (1, 2, 3)
)
"""Difficulty levels, operands x digits; a record's ``difficulty`` is the 1-based index."""


SPLITS: dict[str, SplitSpec] = {
    "validation": SplitSpec(size=240, seed=20260930),
    "dev": SplitSpec(size=120, seed=20260931),
}
"""The fixed held-out splits: size and seed of each (sizes are multiples of 12)."""


def _number(rng: random.Random, digits: int) -> int:
    """Uniform over the numbers of exactly ``digits`` digits (0..9 for one digit)."""
    low = 0 if digits == 1 else 10 ** (digits - 1)
    return rng.randint(low, 10**digits - 1)


def make_problem(
    rng: random.Random, difficulty: int, levels: tuple[ReasoningLevel, ...] = LEVELS
) -> dict:
    """Draw one record of level ``difficulty`` (1-based) from ``rng``.

    Each operand has 1 to ``digits`` digits (uniform), then a uniform value of that many
    digits; each operator is ``+`` or ``-`` with probability 1/2, except that a ``-``
    which would take the running value below 0 becomes ``+``.
    """
    if not 1 <= difficulty <= len(levels):
        raise ValueError(f"difficulty must be in 1..{len(levels)}, got {difficulty}")
    level = levels[difficulty - 1]
    numbers = [_number(rng, rng.randint(1, level.digits)) for _ in range(level.operands)]
    ops = []
    value = numbers[0]
    for x in numbers[1:]:
        op = "-" if rng.random() < 0.5 and value - x >= 0 else "+"
        value = value - x if op == "-" else value + x
        ops.append(op)
    prompt = format_answer(numbers[0])
    for op, x in zip(ops, numbers[1:], strict=True):
        prompt += op + format_answer(x)
    return {
        "prompt": prompt + "=",
        "answer": format_answer(value),
        "difficulty": difficulty,
        "operands": level.operands,
        "value": value,
    }


def parse_problem(prompt: str) -> tuple[list[int], list[str]]:
    """``(numbers, operators)`` of a prompt such as ``"73+84-91="`` (numbers as values)."""
    body = prompt.strip()
    if not body.endswith("="):
        raise ValueError(f"prompt={prompt!r} does not end with '='")
    numbers: list[int] = []
    ops: list[str] = []
    current = ""
    for ch in body[:-1] + "+":
        if ch.isascii() and ch.isdigit():
            current += ch
        elif ch in "+-" and current:
            numbers.append(int(current[::-1]))
            ops.append(ch)
            current = ""
        else:
            raise ValueError(f"prompt={prompt!r} is not a chain of numbers and + / -")
    if len(numbers) < 2:
        raise ValueError(f"prompt={prompt!r} has fewer than two operands")
    return numbers, ops[:-1]


@dataclass(frozen=True)
class Trace:
    """A written solution: the response text and the value it ends with."""

    text: str
    final: int
    slips: int
    """Result digits written wrong (0: the answer is right)."""


def carries_in(left: int, op: str, right: int) -> list[bool]:
    """Per digit of ``left op right`` (least significant first): whether a carry (``+``) or
    a borrow (``-``) comes into that column from the one before."""
    value = left + right if op == "+" else left - right
    if value < 0:
        raise ValueError(f"{left}{op}{right} is negative")
    out: list[bool] = []
    carry = 0
    for i in range(len(str(value))):
        a, b = (left // 10**i) % 10, (right // 10**i) % 10
        out.append(carry == 1)
        column = a + b + carry if op == "+" else a - b - carry
        carry = int(column >= 10) if op == "+" else int(column < 0)
    return out


def _slip(
    rng: random.Random, left: int, op: str, right: int, slip: float, carry_slip: float
) -> tuple[int, int]:
    """``left op right`` written with each digit wrong with probability ``slip``, or
    ``carry_slip`` where a carry or borrow comes into its column (the leading digit never
    becomes 0); returns ``(written value, digits changed)``."""
    value = left + right if op == "+" else left - right
    if slip <= 0 and carry_slip <= 0:
        return value, 0
    digits = list(format_answer(value))  # least significant first
    changed = 0
    for i, (d, carried) in enumerate(zip(digits, carries_in(left, op, right), strict=True)):
        if rng.random() < (carry_slip if carried else slip):
            leading = i == len(digits) - 1 and len(digits) > 1
            choices = [c for c in "0123456789" if c != d and not (leading and c == "0")]
            digits[i] = rng.choice(choices)
            changed += 1
    return int("".join(digits)[::-1]), changed


def _step(rng: random.Random, left: int, op: str, right: int, result: int, vary: bool) -> str:
    a, b = format_answer(left), format_answer(right)
    if vary and op == "+" and rng.random() < 0.5:
        a, b = b, a
    return f"{a}{op}{b}={format_answer(result)}"


def solution(
    prompt: str,
    rng: random.Random | None = None,
    *,
    slip: float = 0.0,
    carry_slip: float | None = None,
    vary: bool = True,
    check_prob: float = 0.3,
) -> Trace:
    """Write a step-by-step response for ``prompt``.

    Args:
        prompt: a task prompt (``"73+84-91+5="``).
        rng: draws the variants and slips (needed when ``vary`` or ``slip > 0``).
        slip: probability that each result digit is written wrong; later steps carry on
            from the written (wrong) value. A slip that would make a later partial result
            negative is drawn again.
        carry_slip: the same for a digit whose column takes a carry or a borrow from the
            one before (the classic slip); None: ``slip``.
        vary: draw the separators, the order of ``+`` terms and the check steps at random;
            False writes the canonical form (``"; "`` between steps, no checks).
        check_prob: probability of a check step after the last step; a second check (of
            the step before) follows with the same probability.

    Returns:
        The :class:`Trace`; its ``text`` ends with ``"Answer: <final>"`` and no end token.
    """
    carry_slip = slip if carry_slip is None else carry_slip
    if (vary or slip > 0 or carry_slip > 0) and rng is None:
        raise ValueError("solution needs rng when vary=True or a slip rate is > 0")
    for name, rate in (("slip", slip), ("carry_slip", carry_slip)):
        if not 0 <= rate < 1:
            raise ValueError(f"{name} must be in [0, 1), got {name}={rate!r}")
    numbers, ops = parse_problem(prompt)
    for _ in range(1000):
        trace = _write(rng, numbers, ops, (slip, carry_slip), vary, check_prob)
        if trace is not None:
            return trace
    raise RuntimeError(f"no non-negative slipped trace for prompt={prompt!r}")  # pragma: no cover


def _write(
    rng: random.Random | None,
    numbers: list[int],
    ops: list[str],
    slips: tuple[float, float],
    vary: bool,
    check_prob: float,
) -> Trace | None:
    steps: list[tuple[int, str, int, int]] = []  # (left, op, right, written result)
    value = numbers[0]
    wrong = 0
    for op, x in zip(ops, numbers[1:], strict=True):
        if op == "-" and value < x:
            return None  # an earlier slip made this step negative: draw again
        if rng is None:
            written, changed = (value + x if op == "+" else value - x), 0
        else:
            written, changed = _slip(rng, value, op, x, *slips)
        wrong += changed
        steps.append((value, op, x, written))
        value = written
    parts = [_step(rng, a, op, b, z, vary) for a, op, b, z in steps]
    if vary:
        assert rng is not None
        text = parts[0]
        for part in parts[1:]:
            text += rng.choice(SEPARATORS) + part
        for _, op, right, result in reversed(steps[-2:]):
            if rng.random() >= check_prob:
                break
            undo = "-" if op == "+" else "+"
            if undo == "-" and result < right:
                return None  # a slipped sum below its own term: draw again
            back, _ = _slip(rng, result, undo, right, *slips)
            check = _step(rng, result, undo, right, back, vary)
            text += rng.choice(("; ", ", ")) + f"check {check}"
    else:
        text = "; ".join(parts)
    text += f". {ANSWER_PREFIX} {format_answer(value)}"
    return Trace(text=text, final=value, slips=wrong)


# --------------------------------------------------------------------------------------
# Splits


@lru_cache(maxsize=8)
def _fixed_split(name: str) -> tuple[dict, ...]:
    names = list(SPLITS)
    earlier = frozenset(
        r["prompt"] for other in names[: names.index(name)] for r in _fixed_split(other)
    )
    spec = SPLITS[name]
    return tuple(balanced(make_problem, random.Random(spec.seed), spec.size, len(LEVELS), earlier))


@lru_cache(maxsize=1)
def _held_out_prompts() -> frozenset[str]:
    return frozenset(r["prompt"] for name in SPLITS for r in _fixed_split(name))


def make_split(name: str, n: int | None = None) -> list[dict]:
    """A deterministic list of records.

    ``"validation"`` and ``"dev"`` are the fixed held-out splits (:data:`SPLITS`), balanced
    over the levels; a smaller ``n`` returns a balanced prefix. ``"train"`` returns the
    first ``n`` records of ``iter_train(0)``.
    """
    if name == "train":
        if n is None or n < 0:
            raise ValueError(f"make_split('train') needs n >= 0, got n={n!r}")
        stream = iter_train(0)
        return [next(stream) for _ in range(n)]
    if name not in SPLITS:
        raise ValueError(f"unknown split name={name!r}; known: train, {', '.join(SPLITS)}")
    size = SPLITS[name].size
    if n is not None and not 0 <= n <= size:
        raise ValueError(f"n must be in [0, {size}] for split {name!r}, got n={n}")
    return [dict(r) for r in _fixed_split(name)[: size if n is None else n]]


def iter_train(
    seed: int = 0,
    *,
    levels: tuple[ReasoningLevel, ...] = LEVELS,
    weights: tuple[float, ...] | None = None,
) -> Iterator[dict]:
    """Unbounded stream of training records, reproducible from ``seed``.

    Levels are drawn with probabilities proportional to ``weights`` (uniform by default);
    prompts of the held-out splits are skipped.
    """
    if weights is not None and (
        len(weights) != len(levels) or any(w < 0 for w in weights) or sum(weights) <= 0
    ):
        raise ValueError(
            f"weights must be {len(levels)} non-negative numbers with a positive sum, "
            f"got {weights!r}"
        )
    rng = random.Random(seed)
    held_out = _held_out_prompts() if levels == LEVELS else frozenset()
    choices = list(range(1, len(levels) + 1))
    while True:
        if weights is None:
            difficulty = rng.randint(1, len(levels))
        else:
            difficulty = rng.choices(choices, weights=weights)[0]
        rec = make_problem(rng, difficulty, levels)
        if rec["prompt"] not in held_out:
            yield rec


# --------------------------------------------------------------------------------------
# Verifier


def _final_answer(response: str) -> str | None:
    text = cut_at_end(response)
    at = text.rfind(ANSWER_PREFIX)
    if at < 0:
        return None
    return text[at + len(ANSWER_PREFIX) :].strip()


@register_reward("reasoning", isolated=False)  # exact: microseconds an item, in-process
def reasoning_score(response: Any, ground_truth: Any, **_: Any) -> float:
    """Exact verifier: 1.0 when the text after the response's last ``Answer:`` is the
    answer ``ground_truth`` (digits least-significant first), else 0.0.

    The response is cut at the first end marker; the scratchpad before the answer line
    is not checked (a right answer after a wrong step still scores 1). Never raises.
    """
    return digits_match(extract_reasoning_answer(response), ground_truth)


def extract_reasoning_answer(response: Any) -> str | None:
    """The final answer a response gives (for maj@n), or None without an answer line."""
    if not isinstance(response, str):
        return None
    return _final_answer(response) or None


reasoning_score.cheap = True  # type: ignore[attr-defined]
reasoning_score.extract = extract_reasoning_answer  # type: ignore[attr-defined]
