"""Tests of the built-in reasoning task: problems, written solutions, verifier, splits."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qae.tasks import reasoning
from qae.tasks.arithmetic import format_answer
from qae.tasks.reasoning import (
    ANSWER_PREFIX,
    LEVELS,
    SEPARATORS,
    SPLITS,
    extract_reasoning_answer,
    iter_train,
    make_problem,
    make_split,
    parse_problem,
    reasoning_score,
    solution,
)


def _value(prompt: str) -> int:
    """Left-to-right value of a little-endian chain, computed apart from the task."""
    body = prompt.rstrip("=")
    total, number, sign = 0, "", 1
    for ch in body + "+":
        if ch.isdigit():
            number += ch
        else:
            total += sign * int(number[::-1])
            number, sign = "", (1 if ch == "+" else -1)
    return total


def _partials(prompt: str) -> list[int]:
    numbers, ops = parse_problem(prompt)
    out, value = [], numbers[0]
    for op, x in zip(ops, numbers[1:], strict=True):
        value = value + x if op == "+" else value - x
        out.append(value)
    return out


# --------------------------------------------------------------------------------------
# Problems


@pytest.mark.parametrize("difficulty", range(1, len(LEVELS) + 1))
def test_problems_of_every_level_are_consistent(difficulty):
    rng = random.Random(difficulty)
    level = LEVELS[difficulty - 1]
    for _ in range(200):
        rec = make_problem(rng, difficulty)
        numbers, ops = parse_problem(rec["prompt"])
        assert len(numbers) == level.operands == rec["operands"]
        assert all(len(str(x)) <= level.digits for x in numbers)
        assert rec["value"] == _value(rec["prompt"]) >= 0
        assert rec["answer"] == format_answer(rec["value"])
        # every partial result stays non-negative: no minus sign is ever written
        assert min(_partials(rec["prompt"])) >= 0
        assert rec["difficulty"] == difficulty


def test_the_docstring_example():
    assert _value("73+84-91+5=") == 37 + 48 - 19 + 5 == 71
    trace = solution("73+84-91+5=", vary=False)
    assert trace.text == "73+84=58; 58-91=66; 66+5=17. Answer: 17"
    assert trace.final == 71 and trace.slips == 0


def test_make_problem_rejects_bad_levels():
    with pytest.raises(ValueError, match="difficulty must be in 1..12"):
        make_problem(random.Random(0), 13)
    with pytest.raises(ValueError, match="operands must be >= 2"):
        reasoning.ReasoningLevel(1, 2)


@pytest.mark.parametrize("bad", ["12+3", "1+", "=", "1+a=", "1*2=", "12=", "+1+2="])
def test_parse_problem_rejects_what_is_not_a_chain(bad):
    with pytest.raises(ValueError, match="prompt="):
        parse_problem(bad)


# --------------------------------------------------------------------------------------
# Written solutions


@given(seed=st.integers(0, 10_000), difficulty=st.integers(1, len(LEVELS)))
@settings(max_examples=200, deadline=None)
def test_a_solution_without_slips_is_right_whatever_its_variants(seed, difficulty):
    rng = random.Random(seed)
    rec = make_problem(rng, difficulty)
    trace = solution(rec["prompt"], rng, slip=0.0, check_prob=0.5)
    assert trace.slips == 0 and trace.final == rec["value"]
    assert reasoning_score(trace.text, rec["answer"]) == 1.0
    assert trace.text.endswith(f"{ANSWER_PREFIX} {rec['answer']}")


@given(seed=st.integers(0, 10_000), difficulty=st.integers(1, len(LEVELS)))
@settings(max_examples=200, deadline=None)
def test_slipped_solutions_carry_on_from_the_written_value(seed, difficulty):
    rng = random.Random(seed)
    rec = make_problem(rng, difficulty)
    trace = solution(rec["prompt"], rng, slip=0.3, vary=True)
    # re-read the written steps: each computes exactly except where a digit slipped, and
    # each step starts from the result the previous step wrote
    body = trace.text.split(". " + ANSWER_PREFIX)[0]
    steps = [s for s in _split_steps(body) if not s.startswith("check")]
    numbers, _ = parse_problem(rec["prompt"])
    assert len(steps) == len(numbers) - 1
    previous = None
    for step in steps:
        left_right, written = step.split("=")
        op = "+" if "+" in left_right else "-"
        a, b = (int(x[::-1]) for x in left_right.split(op))
        if previous is not None:
            assert previous in (a, b)  # terms of a + step may be swapped
        previous = int(written[::-1])
    assert previous == trace.final
    assert (trace.final == rec["value"]) == (reasoning_score(trace.text, rec["answer"]) == 1.0)
    if trace.slips == 0:
        assert trace.final == rec["value"]


def _split_steps(body: str) -> list[str]:
    for sep in sorted({*SEPARATORS, "; ", ", "}, key=len, reverse=True):
        body = body.replace(sep, "|")
    return [s.strip() for s in body.split("|") if s.strip()]


def test_slip_rate_sets_the_fraction_of_right_digits():
    rng = random.Random(0)
    digits = slips = 0
    for _ in range(2000):
        rec = make_problem(rng, len(LEVELS))
        trace = solution(rec["prompt"], rng, slip=0.1, vary=False)
        digits += sum(len(format_answer(v)) for v in _partials(rec["prompt"]))
        slips += trace.slips
    assert 0.085 < slips / digits < 0.115


def test_variants_do_not_decide_correctness():
    rng = random.Random(1)
    rec = {"prompt": "73+84-91+5=", "answer": "17"}
    texts = {solution(rec["prompt"], rng, check_prob=0.5).text for _ in range(300)}
    assert len(texts) > 20  # separators, term order and checks vary ...
    assert all(reasoning_score(t, rec["answer"]) == 1.0 for t in texts)  # ... all right
    assert any("check" in t for t in texts) and any("then" in t for t in texts)
    assert any(t.startswith("84+73") for t in texts)


def test_solution_needs_a_generator_for_variants_and_slips():
    with pytest.raises(ValueError, match="needs rng"):
        solution("1+2=")
    with pytest.raises(ValueError, match="slip must be in"):
        solution("1+2=", random.Random(0), slip=1.0)


def test_typical_length_and_room_to_grow():
    rng = random.Random(2)
    lengths = [len(solution(r["prompt"], rng, slip=0.08).text) for r in make_split("validation")]
    lengths.sort()
    median = lengths[len(lengths) // 2]
    assert 25 <= median <= 60  # characters; words are single tokens, so tokens are fewer
    assert lengths[-1] < reasoning.MAX_NEW_TOKENS  # the limit sits above every solution


# --------------------------------------------------------------------------------------
# Verifier


@pytest.mark.parametrize(
    ("response", "score"),
    [
        ("3+4=7. Answer: 7", 1.0),
        ("3+4=8. Answer: 7", 1.0),  # only the final answer decides
        ("3+4=7. Answer: 8", 0.0),
        ("Answer: 7", 1.0),
        ("Answer:7", 1.0),
        ("Answer: 7 ", 1.0),
        ("Answer: 7</s>junk", 1.0),
        ("Answer: 8. Answer: 7", 1.0),  # the last answer line counts
        ("Answer: 7. Answer: 8", 0.0),
        ("3+4=7", 0.0),  # no answer line
        ("answer: 7", 0.0),
        ("Answer: 07", 0.0),
        ("Answer: 7 so", 0.0),
        ("", 0.0),
    ],
)
def test_verifier_reads_the_last_answer_line_exactly(response, score):
    assert reasoning_score(response, "7") == score


@pytest.mark.parametrize("truth", [None, "", "x", "-7", 7.5])
def test_verifier_never_raises_and_refuses_bad_ground_truths(truth):
    assert reasoning_score("Answer: 7", truth) == 0.0
    assert reasoning_score(None, "7") == 0.0
    assert reasoning_score(12, "7") == 0.0


def test_verifier_accepts_an_integer_ground_truth():
    assert reasoning_score("Answer: 17", 17) == 1.0


def test_extract_gives_the_answer_for_majority_votes():
    assert extract_reasoning_answer("1+2=3. Answer: 3") == "3"
    assert extract_reasoning_answer("1+2=3") is None
    assert extract_reasoning_answer("Answer: ") is None
    assert extract_reasoning_answer(None) is None


# --------------------------------------------------------------------------------------
# Splits


def test_fixed_splits_are_balanced_disjoint_and_reproducible():
    val, dev = make_split("validation"), make_split("dev")
    assert len(val) == SPLITS["validation"].size and len(dev) == SPLITS["dev"].size
    for split in (val, dev):
        counts = [sum(r["difficulty"] == d for r in split) for d in range(1, len(LEVELS) + 1)]
        assert len(set(counts)) == 1
        assert len({r["prompt"] for r in split}) == len(split)
    assert not {r["prompt"] for r in val} & {r["prompt"] for r in dev}
    reasoning._fixed_split.cache_clear()
    reasoning._held_out_prompts.cache_clear()
    assert make_split("validation") == val
    assert make_split("validation", 24) == val[:24]


def test_split_errors():
    with pytest.raises(ValueError, match="unknown split"):
        make_split("test")
    with pytest.raises(ValueError, match="n must be in"):
        make_split("dev", 1000)
    with pytest.raises(ValueError, match="needs n >= 0"):
        make_split("train")


def test_train_stream_is_seeded_and_never_yields_held_out_prompts():
    held_out = {r["prompt"] for name in SPLITS for r in make_split(name)}
    first = [r["prompt"] for r, _ in zip(iter_train(3), range(3000), strict=False)]
    again = [r["prompt"] for r, _ in zip(iter_train(3), range(3000), strict=False)]
    other = [r["prompt"] for r, _ in zip(iter_train(4), range(50), strict=False)]
    assert first == again and first[:50] != other
    assert not held_out & set(first)
    # the easiest level's prompts do come up, so the exclusion is exercised
    assert any(len(p) == 4 for p in first)


def test_train_stream_weights():
    weights = tuple(1.0 if i == 0 else 0.0 for i in range(len(LEVELS)))
    stream = iter_train(0, weights=weights)
    assert all(next(stream)["difficulty"] == 1 for _ in range(50))
    with pytest.raises(ValueError, match="weights must be"):
        next(iter_train(0, weights=(1.0,)))
