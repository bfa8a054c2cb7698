"""Tests for qae.rewards: extraction, math equivalence, time bounds, worker pool, registry."""

from __future__ import annotations

import functools
import os
import signal
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qae.eval.datasets import load_prompts
from qae.rewards import (
    ScoreTimeout,
    ScoringPool,
    answer_line,
    extract_answer,
    get_reward,
    ground_truth_text,
    is_isolated,
    last_boxed,
    math_score,
    normalize_answer,
    register_reward,
    reward_functions,
    score_batch,
    score_report,
    time_limit,
)
from qae.rewards.math import _parse_gold

BENCH_DIR = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "benchmarks"
MAIN_PID = os.getpid()
TOWER = "\\boxed{9^{9^{9^{9}}}}"

# --------------------------------------------------------------------------------------
# Extraction


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("so $\\boxed{\\frac{1}{\\sqrt{2}}}$.", "\\frac{1}{\\sqrt{2}}"),  # nested braces
        ("\\boxed{1} then \\boxed{2} finally \\boxed{3}", "3"),  # the last box counts
        ("\\fbox{42}", "42"),
        ("\\boxed{\\{1,2\\}}", "\\{1,2\\}"),  # escaped braces are literal
        ("\\boxed{7} and a cut-off \\boxed{\\frac{1}{", "7"),  # unclosed last box
        ("the answer is \\boxed 5.", "5."),
        ("\\boxed{ π/2 }", "π/2"),  # unicode
        ("no answer here", None),
        ("", None),
        ("\\boxed{}", None),
        ("\\boxed{", None),
    ],
)
def test_extract_boxed(text: str, expected: str | None) -> None:
    assert extract_answer(text) == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("work\nAnswer: 42", "42"),
        ("Answer: 1\nmore work\nanswer:  $\\frac{1}{2}$.", "\\frac{1}{2}"),  # last line counts
        ("Answer: \\boxed{12}", "12"),
        ("Answer:\n", None),  # empty answer line
        ("Réponse finale — Answer: 四十二", "四十二"),
    ],
)
def test_answer_line(text: str, expected: str | None) -> None:
    assert answer_line(text) == expected
    assert extract_answer(text) == expected


def test_last_marked_answer_wins_and_fallbacks() -> None:
    assert extract_answer("\\boxed{3}\nAnswer: 4") == "4"  # the answer stated last wins
    assert extract_answer("Answer: 4\nchecking again, \\boxed{3}") == "3"
    assert extract_answer("we get 12 apples, then 15") == "15"  # default: last_math
    assert extract_answer("we get 12 apples, then 15", fallback="none") is None
    assert extract_answer("we get 12 apples, then 1,500", fallback="last_number") == "1500"
    assert extract_answer("x", fallback=lambda t: "custom") == "custom"
    with pytest.raises(ValueError, match="fallback"):
        extract_answer("x", fallback="first_number")


@pytest.mark.parametrize("value", [None, 3, b"\\boxed{1}", ["\\boxed{1}"]])
def test_extract_non_strings(value: object) -> None:
    assert extract_answer(value) is None  # type: ignore[arg-type]
    assert last_boxed(value) is None  # type: ignore[arg-type]


def test_extraction_is_fast_on_megabyte_inputs() -> None:
    cases = [
        "x" * 1_000_000 + "\\boxed{" * 100_000,  # many unclosed boxes
        "{" * 1_000_000 + "\\boxed{1}",
        "\\boxed{" + "{" * 1_000_000,
        "Answer: " * 200_000,
        "1," * 500_000,
    ]
    for text in cases:
        start = time.perf_counter()
        extract_answer(text, fallback="last_number")
        assert time.perf_counter() - start < 5.0  # linear time; slack for a loaded machine


@pytest.mark.parametrize(
    ("truth", "expected"),
    [
        (27.0, "27"),
        (7, "7"),
        (0.5, "0.5"),
        ("  \\frac{1}{2} ", "\\frac{1}{2}"),
        ("Janet sells 9 eggs.\n#### 1,000", "1000"),
        ("\\boxed{3}", "3"),
        ("$5$", "5"),
    ],
)
def test_ground_truth_text(truth: object, expected: str) -> None:
    assert ground_truth_text(truth) == expected


@pytest.mark.parametrize(
    ("a", "b"),
    [
        ("\\dfrac{1}{2}", "\\frac{1}{2}"),
        ("27.0", "27"),
        ("1,000", "1000"),
        ("\\left( 3, \\frac{\\pi}{2} \\right)", "(3,\\frac{\\pi}{2})"),
        ("90^\\circ", "90"),
        ("\\text{Evelyn}", "Evelyn"),
        ("$ 5 $.", "5"),
    ],
)
def test_normalize_answer_merges_spellings(a: str, b: str) -> None:
    assert normalize_answer(a) == normalize_answer(b)


def test_normalize_answer_keeps_different_answers_apart() -> None:
    assert normalize_answer("12") != normalize_answer("21")
    assert normalize_answer("1.5") != normalize_answer("15")
    assert normalize_answer(None) is None


@settings(max_examples=200, deadline=None)
@given(st.text(alphabet="0123456789.,-$ abx\\{}", max_size=20))
def test_normalize_answer_is_idempotent(text: str) -> None:
    once = normalize_answer(text)
    assert normalize_answer(once) == once


# --------------------------------------------------------------------------------------
# Math equivalence


@pytest.mark.parametrize(
    ("response", "truth", "expected"),
    [
        ("so \\boxed{\\frac{1}{2}}", "0.5", 1.0),
        ("Answer: 0.5", "\\frac{1}{2}", 1.0),
        ("\\boxed{1/2}", "\\frac12", 1.0),
        ("\\boxed{27}", 27.0, 1.0),  # AMC answers are stored as floats
        ("\\boxed{27.0}", 27, 1.0),
        ("\\boxed{\\$18.90}", "\\$18.90", 1.0),
        ("\\boxed{2\\sqrt{2}}", "\\sqrt{8}", 1.0),
        ("\\boxed{28}", 27.0, 0.0),
        ("\\boxed{1-1/e}", "1-\\frac{1}{e}", 1.0),
        ("the result is 27", 27, 1.0),  # nothing marked: the last math, as math-verify
        ("", "1", 0.0),
        ("\\boxed{1}", "", 0.0),
    ],
)
def test_math_score(response: str, truth: object, expected: float) -> None:
    assert math_score(response, truth) == expected


def test_math_score_fallback() -> None:
    assert math_score("the result is 27", 27, fallback="last_number") == 1.0
    assert math_score("the result is 27", 27, fallback="none") == 0.0
    assert get_reward("math_anchored")("the result is 27", 27) == 0.0
    assert get_reward("math_anchored")("the answer is 27", 27) == 1.0
    with pytest.raises(ValueError, match="fallback"):
        math_score("27", 27, fallback="first_number")


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.text(
        alphabet=st.sampled_from(list("0123456789^{}\\boxed frac+-*/=.$Answer:\n")), max_size=60
    ),
    st.one_of(st.text(max_size=10), st.integers(), st.floats(allow_nan=True)),
)
def test_math_score_never_raises(response: str, truth: object) -> None:
    assert math_score(response, truth, timeout=2.0) in (0.0, 1.0)


# --------------------------------------------------------------------------------------
# Time bounds


def test_time_limit_raises_in_main_thread_and_nests() -> None:
    start = time.perf_counter()
    with pytest.raises(ScoreTimeout):
        with time_limit(0.2):
            time.sleep(5)
    assert time.perf_counter() - start < 3.0
    # An inner, longer limit leaves the outer one in charge; an inner shorter one fires first.
    with pytest.raises(ScoreTimeout):
        with time_limit(0.2):
            with time_limit(10):
                time.sleep(5)
    with time_limit(5):
        with pytest.raises(ScoreTimeout):
            with time_limit(0.1):
                time.sleep(2)
        remaining, _ = signal.getitimer(signal.ITIMER_REAL)
        assert 3.0 < remaining <= 5.0  # the outer timer was restored
    assert signal.getitimer(signal.ITIMER_REAL)[0] == 0.0


@pytest.mark.parametrize(
    "response",
    [
        TOWER,
        "Answer: $2003^{2002^{2001}}$",
        "x" * 1_000_000,
        "\\boxed{" + "1" * 999 + "}" + "y" * 1_000_000,
        "\\boxed{" + "(" * 500 + ")" * 500 + "}",
    ],
    ids=["tower", "power-answer-line", "megabyte", "long-number", "parens"],
)
def test_pathological_inputs_score_zero_within_bound(response: str) -> None:
    # Main thread: a signal timer, which may overrun by one C-level step. The bound checks
    # "no hang" with slack for a loaded machine; score_batch's hard bound is tested below.
    start = time.perf_counter()
    assert math_score(response, "27", timeout=1.0) == 0.0
    assert time.perf_counter() - start < 10.0


def test_time_bound_holds_in_threads() -> None:
    # signal timers do not work outside the main thread: the call goes to a worker process
    cases = [(TOWER, "27", 0.0), ("\\boxed{\\frac{1}{2}}", "0.5", 1.0)] * 2
    start = time.perf_counter()
    with ThreadPoolExecutor(max_workers=4) as ex:
        got = list(ex.map(lambda c: math_score(c[0], c[1], timeout=1.0), cases))
    assert got == [c[2] for c in cases]
    assert time.perf_counter() - start < 20.0  # two towers in parallel, slow starts, busy CPU


def test_score_batch_bounds_pathological_items() -> None:
    bad = ["\\boxed{" + "(" * 500 + ")" * 500 + "}", "\\boxed{9^{99999999}}", "x" * 1_000_000]
    responses = ["\\boxed{3}", TOWER, "Answer: 1/2", *bad]
    truths = ["3", "3", "\\frac{1}{2}", "3", "3", "3"]
    start = time.perf_counter()
    scores = score_batch("math", responses, truths, timeout=1.0)
    assert scores == [1.0, 0.0, 1.0, 0.0, 0.0, 0.0]
    # three slow items on two workers: at most two rounds of timeout + grace, plus slack
    assert time.perf_counter() - start < 2 * (1.0 + 1.0) + 10.0


# Module-level functions: worker processes find them by reference.


def _stubborn(response: str, truth: object) -> float:
    """Blocks SIGALRM, so only the parent's kill can end it."""
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGALRM})
    if response == "hang":
        time.sleep(60)
    return 1.0


def _crash(response: str, truth: object) -> float:
    if response == "crash":
        os._exit(3)
    return 1.0


def _raise(response: str, truth: object) -> float:
    if response == "raise":
        raise RuntimeError("boom")
    if response == "base":
        from math_verify.errors import TimeoutException

        raise TimeoutException("a BaseException")
    if response == "none":
        return None  # type: ignore[return-value]
    return 0.5


def _in_main_process(response: str, truth: object) -> float:
    return float(os.getpid() == MAIN_PID)


_WARM: list[int] = []


def _warm_first(response: str, truth: object) -> float:
    """1.0 once its warm-up has run in this process, else 0.0."""
    return float(bool(_WARM))


def _slow_warmup() -> None:
    time.sleep(1.5)  # longer than the items' time bound
    _WARM.append(os.getpid())


def _failing_warmup() -> None:
    raise RuntimeError("warm-up failed")


_warm_first.warmup = _slow_warmup  # type: ignore[attr-defined]
_raise.warmup = _failing_warmup  # type: ignore[attr-defined]


def test_warmup_runs_once_per_worker_outside_the_time_bound() -> None:
    with ScoringPool(1) as pool:
        out = pool.map(_warm_first, [("a", 1), ("b", 1)], timeout=0.5)
        assert out == [("ok", 1.0), ("ok", 1.0)]
        assert pool.stats["timeout"] == 0
        # a failing warm-up is ignored: the calls themselves report what is wrong
        out = pool.map(_raise, [("raise", 1), ("x", 1)], timeout=2.0)
        assert [s for s, _ in out] == ["error", "ok"]
    # in-process scoring warms up too, before the first item
    _WARM.clear()
    assert score_batch(_warm_first, ["a", "b"], [1, 1], workers=0, timeout=0.5) == [1.0, 1.0]
    assert _WARM == [os.getpid()]


def test_in_process_math_scoring_works_from_threads() -> None:
    # the warm-up must not arm SIGALRM (math-verify's own timeouts), which fails off the
    # main thread
    from qae.rewards.math import warmup

    warmup.cache_clear()
    with ThreadPoolExecutor(max_workers=1) as ex:
        report = ex.submit(
            score_report,
            "math",
            ["\\boxed{\\frac{1}{2}}", "x = 0.50", "\\boxed{3}"],
            ["0.5", "1/2", "4"],
            workers=0,
            timeout=5.0,
        ).result()
    assert report.scores == [1.0, 1.0, 0.0]
    assert report.errors == 0 and report.timeouts == 0


def test_math_scoring_functions_carry_the_warmup() -> None:
    from qae.rewards.math import MathReward, _score_key_bounded, warmup

    assert _score_key_bounded.warmup is warmup
    assert MathReward().score_prepared.warmup is warmup
    assert get_reward("math").score_prepared.warmup is warmup


def test_pool_kills_and_replaces_a_hung_worker() -> None:
    with ScoringPool(1) as pool:
        start = time.perf_counter()
        out = pool.map(_stubborn, [("ok", 1), ("hang", 1), ("ok", 1)], timeout=0.5)
        elapsed = time.perf_counter() - start
        assert [s for s, _ in out] == ["ok", "timeout", "ok"]
        assert out[0][1] == 1.0 and out[2][1] == 1.0
        assert elapsed < 0.5 + pool.grace + 10.0
        assert pool.stats["timeout"] == 1
        assert pool.stats["started"] == 2  # the hung worker was replaced
        # the pool keeps working afterwards
        assert pool.map(_stubborn, [("ok", 1)], timeout=0.5) == [("ok", 1.0)]


def test_pool_survives_crashes_and_errors() -> None:
    with ScoringPool(2) as pool:
        out = pool.map(_crash, [("a", 1), ("crash", 1), ("b", 1)], timeout=2.0)
        assert out == [("ok", 1.0), ("crashed", None), ("ok", 1.0)]
        out = pool.map(_raise, [("raise", 1), ("base", 1), ("none", 1), ("x", 1)], timeout=2.0)
        assert [s for s, _ in out] == ["error", "error", "ok", "ok"]
        assert "boom" in out[0][1]
        assert out[2][1] is None and out[3][1] == 0.5


def test_pool_from_threads() -> None:
    with ScoringPool(2) as pool:

        def job(i: int) -> list:
            return pool.map(_raise, [("x", i)] * 5, timeout=2.0)

        with ThreadPoolExecutor(max_workers=3) as ex:
            results = list(ex.map(job, range(3)))
    assert results == [[("ok", 0.5)] * 5] * 3


def test_score_batch_counts_failures_and_keeps_none() -> None:
    stats: dict[str, int] = {}
    scores = score_batch(_raise, ["raise", "base", "none", "x"], [0] * 4, workers=0, stats=stats)
    assert scores == [0.0, 0.0, None, 0.5]
    assert stats == {"error": 2}
    stats = {}
    scores = score_batch(_stubborn, ["ok", "hang"], [0, 0], workers=1, timeout=0.5, stats=stats)
    assert scores == [1.0, 0.0]
    assert stats == {"timeout": 1}


def test_score_batch_dispatch_follows_isolated_attribute() -> None:
    # not isolated: in-process by default; workers > 0 forces the pool
    assert score_batch(_in_main_process, ["a", "b"], [0, 0]) == [1.0, 1.0]
    assert score_batch(_in_main_process, ["a"], [0], workers=1) == [0.0]
    isolated = functools.partial(_in_main_process)
    isolated.isolated = True  # type: ignore[attr-defined]
    assert is_isolated(isolated)
    assert score_batch(isolated, ["a"], [0]) == [0.0]
    assert score_batch(isolated, ["a"], [0], workers=0) == [1.0]
    assert is_isolated(functools.partial(math_score, fallback="last_number"))


def test_score_batch_argument_errors() -> None:
    with pytest.raises(ValueError, match="same length"):
        score_batch("math", ["a", "b"], ["1"])
    with pytest.raises(ValueError, match="workers"):
        score_batch("math", ["a"], ["1"], workers=-1)
    with pytest.raises(ValueError, match="module level"):
        score_batch(lambda r, g: 1.0, ["a"], ["1"], workers=1)
    with pytest.raises(ValueError, match="timeout"):
        score_batch("math", ["a"], ["1"], timeout=0)


# --------------------------------------------------------------------------------------
# Registry


def test_registry() -> None:
    assert "math" in reward_functions
    assert get_reward("math") is math_score
    assert is_isolated(math_score)
    assert get_reward(_raise) is _raise
    with pytest.raises(ValueError, match="known: .*math"):
        get_reward("no-such-reward")

    def exact(response: str, truth: object) -> float:
        return float(response.strip() == str(truth))

    register_reward("test-exact", isolated=False)(exact)
    try:
        assert get_reward("test-exact") is exact and not is_isolated(exact)
        assert score_batch("test-exact", ["4", "5"], [4, 4]) == [1.0, 0.0]
        with pytest.raises(ValueError, match="already registered"):
            register_reward("test-exact")(lambda r, g: 0.0)
    finally:
        reward_functions._items.pop("test-exact", None)


# --------------------------------------------------------------------------------------
# Benchmark answers


def _benchmark(name: str):
    if not BENCH_DIR.is_dir():
        pytest.skip(f"benchmark files not found at {BENCH_DIR}")
    return load_prompts(BENCH_DIR / f"{name}.jsonl")


BENCHES = ["aime24", "aime25", "amc23", "math500"]


@pytest.mark.parametrize("name", BENCHES)
def test_math_verify_parses_every_benchmark_answer(name: str) -> None:
    records = _benchmark(name)
    unparsed = [
        r.answer for r in records if not any(not isinstance(x, str) for x in _parse_gold(r.answer))
    ]
    assert unparsed == [], f"math-verify cannot parse these {name} answers: {unparsed}"


@pytest.mark.parametrize("name", BENCHES)
def test_every_benchmark_answer_scores_against_itself(name: str) -> None:
    records = _benchmark(name)
    answers = [r.answer for r in records]
    own = [f"Let us compute.\nThus the answer is $\\boxed{{{a}}}$." for a in answers]
    scores = score_batch("math", own, answers)
    failed = [a for a, s in zip(answers, scores, strict=True) if s != 1.0]
    assert failed == [], f"{name}: answers not equal to themselves: {failed}"

    # Against a different answer of the same benchmark: the next one whose normalised text
    # differs; "x=5" against "5" is skipped since math-verify equates an equation's value.
    others = []
    for i, a in enumerate(answers):
        j = (i + 1) % len(answers)
        while normalize_answer(answers[j]) == normalize_answer(a) or "=" in answers[j]:
            j = (j + 1) % len(answers)
        others.append(f"So $\\boxed{{{answers[j]}}}$.")
    scores = score_batch("math", others, answers)
    wrong = [(a, o) for a, o, s in zip(answers, others, scores, strict=True) if s != 0.0]
    assert wrong == [], f"{name}: different answers judged equal: {wrong}"
