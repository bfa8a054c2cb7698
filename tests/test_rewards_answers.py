"""Answer styles real models write, scored against hand-labelled verdicts and against plain
math-verify; the shortcuts that skip math-verify's parser give its verdicts; batch scoring
scores each distinct answer once; the pool serves concurrent callers together."""

from __future__ import annotations

import threading
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qae.rewards import (
    ScoringPool,
    extract_candidates,
    ground_truth_text,
    math_score,
    score_batch,
    score_report,
)
from qae.rewards.math import _parse, canonical, math_input, score_key
from qae.rewards.numeric import numeric_elements, numeric_value

# (ground truth, response, right?) by failure class; written for these tests.
FINAL_ANSWER_IN_PROSE = [
    ("9", "We add the two parts. The final answer is $9$.", 1),
    ("9", "Summing up the cases.\nThe final answer is $9$. I hope it is correct.", 1),
    ("9", "Answer $9$", 1),
    ("\\frac{1}{2}", "Half of the draws win, so the final answer is \\(\\frac{1}{2}\\).", 1),
    ("12", "Eleven pairs plus the diagonal, so the answer is 12.", 1),
    ("12", "Eleven pairs plus two diagonals, so the answer is 13.", 0),
    ("3", "Solving the linear equation, the final answer is $x = 3$.", 1),
]
SEVERAL_BOXES = [
    ("1, 2", "The solutions are $\\boxed{1}$ and $\\boxed{2}$.", 1),
    ("\\{-3, 4\\}", "Both roots check out: \\boxed{-3}, \\boxed{4}", 1),
    ("(2, 2), (6, 2)", "$$\\boxed{(2, 2)} \\quad \\text{and} \\quad \\boxed{(6, 2)}$$", 1),
    ("1, 2", "The solutions are $\\boxed{1}$ and $\\boxed{3}$.", 0),
    # An intermediate box separated by prose is not part of the final answer.
    ("5", "First $x = \\boxed{2}$. Substituting back into the sum, $y = \\boxed{5}$.", 1),
]
GOLD_IN_PIECES = [
    ("$1$ and $2$ and $3$", "So the set is \\boxed{1, 2, 3}.", 1),
    ("$1$ and $2$ and $3$", "So the set is \\boxed{1, 2}.", 0),
    ("$21$, $16$ or $11$", "Answer: 11, 16, 21", 1),
    ("$x=1$, $y=2$", "Therefore \\boxed{x=1, y=2}.", 1),
]
BOX_THEN_FINAL_LINE = [
    (
        "15",
        "The first part gives \\boxed{12}. Adding the remaining 3 gives the total.\nAnswer: 15",
        1,
    ),
    (
        "12",
        "The first part gives \\boxed{12}. Adding the remaining 3 gives the total.\nAnswer: 15",
        0,
    ),
    ("4", "A first guess was \\boxed{3}, which fails the check.\nThe final answer is $4$.", 1),
    ("4", "Answer: 3\nRechecking, the count was off by one, so \\boxed{4}.", 1),
]
BARE_ANSWERS = [
    ("1000", "1 000", 1),
    ("1 000", "Thus \\boxed{1000}.", 1),
    ("1000000", "1 000 000", 1),
    ("0.5", "\\frac{1}{2}", 1),
    ("-2,1", "The roots are \\boxed{1,-2}.", 1),
    ("-2,1", "-2.1", 0),
]
CLASSES = {
    "final answer in prose": FINAL_ANSWER_IN_PROSE,
    "several boxes": SEVERAL_BOXES,
    "ground truth in pieces": GOLD_IN_PIECES,
    "box then final line": BOX_THEN_FINAL_LINE,
    "bare answers": BARE_ANSWERS,
}
ALL_CASES = [case for cases in CLASSES.values() for case in cases]


def _plain_math_verify(gold: str, response: str) -> int:
    from math_verify import parse, verify

    return int(verify(parse(gold), parse(response)))


@pytest.mark.parametrize(
    ("gold", "response", "right"),
    [
        pytest.param(*case, id=f"{name}-{i}")
        for name, cases in CLASSES.items()
        for i, case in enumerate(cases)
    ],
)
def test_answer_styles(gold: str, response: str, right: int) -> None:
    assert math_score(response, gold) == float(right)


def test_agrees_with_labels_more_often_than_plain_math_verify() -> None:
    ours = sum(int(math_score(r, g)) == right for g, r, right in ALL_CASES)
    theirs = sum(_plain_math_verify(g, r) == right for g, r, right in ALL_CASES)
    assert ours == len(ALL_CASES)
    assert theirs < ours  # these styles are what plain math-verify gets wrong


def test_score_batch_gives_the_same_verdicts_as_math_score() -> None:
    golds = [g for g, _, _ in ALL_CASES]
    responses = [r for _, r, _ in ALL_CASES]
    want = [float(right) for _, _, right in ALL_CASES]
    assert score_batch("math", responses, golds, workers=0) == want
    assert score_batch("math", responses, golds, workers=2) == want


def test_precedence_and_candidates() -> None:
    # The marked answer stated last comes first; the others follow as runners-up.
    assert extract_candidates("\\boxed{3}\nAnswer: 4") == ["4", "3"]
    assert extract_candidates("Answer: see the box below\n\\boxed{7}")[0] == "7"
    # An unreadable winner falls back to the runner-up when scoring.
    assert math_score("\\boxed{7}\nFinal Answer: see above", "7") == 1.0
    # Nothing marked: the last math, as math-verify reads unmarked text; or nothing.
    assert extract_candidates("so $x \\geq 5$ holds.") == ["x \\geq 5"]
    assert extract_candidates("so $x \\geq 5$ holds.", fallback="none") == []
    assert extract_candidates("It costs $5 and then $6") == ["6"]  # currency, not math


@pytest.mark.parametrize(
    ("gold", "text"),
    [
        ("$1$ and $2$ and $3$", "1, 2, 3"),
        ("$$\\boxed{2}, \\boxed{3}$$", "2, 3"),
        ("\\boxed{\\frac{1}{2}}", "\\frac{1}{2}"),
        ("$125$ miles", "125"),
        ("\\$18.90", "\\$18.90"),
    ],
)
def test_ground_truth_pieces(gold: str, text: str) -> None:
    assert ground_truth_text(gold) == text


def test_math_input_keeps_delimiters_and_plain_numbers() -> None:
    assert math_input("1 000") == "1 000"  # math-verify's plain-number parser reads 1000
    assert math_input("\\frac{1}{2}") == "$\\frac{1}{2}$"
    assert math_input("$1$ and $2$") == "$1$ and $2$"
    assert math_input("\\$18.90") == "$18.90$"


def test_pathological_unmarked_text_stays_fast() -> None:
    cases = ["$" * 1_000_000, "\\(" * 300_000, "final answer " * 100_000, "answer 1 " * 100_000]
    for text in cases:
        start = time.perf_counter()
        extract_candidates(text)
        assert time.perf_counter() - start < 5.0  # slack for a loaded machine


# --------------------------------------------------------------------------------------
# Shortcuts give math-verify's verdicts


def _simple(depth: int = 2) -> st.SearchStrategy[str]:
    leaf = st.one_of(
        st.integers(0, 999).map(str),
        st.tuples(st.integers(0, 99), st.integers(0, 99)).map(lambda t: f"{t[0]}.{t[1]}"),
        st.just("\\pi"),
        st.integers(2, 50).map(lambda n: f"\\sqrt{{{n}}}"),
    )
    if depth == 0:
        return leaf
    sub = _simple(depth - 1)
    return st.one_of(
        leaf,
        st.tuples(sub, sub).map(lambda t: f"\\frac{{{t[0]}}}{{{t[1]}}}"),
        st.tuples(sub, st.sampled_from([" + ", " - ", " \\cdot ", "/"]), sub).map("".join),
        st.tuples(st.integers(1, 9), sub).map(lambda t: f"{t[0]}\\sqrt{{{t[1]}}}"),
        st.tuples(sub, st.integers(0, 3)).map(lambda t: f"({t[0]})^{{{t[1]}}}"),
    )


def _value(text: str) -> complex | None:
    values = [v for v in _parse_with_math_verify(text) if not isinstance(v, str)]
    return complex(values[0].evalf(30)) if values else None


def _parse_with_math_verify(text: str) -> list:
    from math_verify import parse

    return parse(f"${text}$", parsing_timeout=None)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_simple())
def test_numeric_value_reads_what_math_verify_reads(text: str) -> None:
    ours = numeric_value(text)
    if ours is None:
        return
    theirs = _value(text)
    assert theirs is not None, text
    assert abs(ours - theirs) <= 1e-9 * max(1.0, abs(ours)), text


@pytest.mark.parametrize(
    "text", ["x+1", "90^\\circ + 1", "1,000", "28\\%", "1\\frac{4}{5}", "\\pi(2)", "2^10", "e"]
)
def test_numeric_value_refuses_what_it_could_misread(text: str) -> None:
    assert numeric_value(text) is None


def test_numeric_elements() -> None:
    assert numeric_elements("\\left( 3, \\frac{\\pi}{2} \\right)") == [
        3.0,
        pytest.approx(1.5708, 1e-4),
    ]
    assert numeric_elements("(0,9) \\cup (9,36)") is None
    assert numeric_elements("5") is None


_ANSWERS = st.one_of(
    st.integers(-30, 30).map(str),
    st.tuples(st.integers(-9, 9), st.integers(1, 9)).map(lambda t: f"\\frac{{{t[0]}}}{{{t[1]}}}"),
    st.tuples(st.integers(1, 5), st.integers(2, 12)).map(lambda t: f"{t[0]}\\sqrt{{{t[1]}}}"),
    st.tuples(st.integers(-5, 5), st.integers(-5, 5)).map(lambda t: f"({t[0]}, {t[1]})"),
    st.tuples(st.integers(0, 9), st.integers(0, 9)).map(lambda t: f"{t[0]}.{t[1]}"),
    st.just("\\frac{\\pi}{2}"),
)


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_ANSWERS, _ANSWERS)
def test_score_key_gives_math_verify_verdicts(gold: str, answer: str) -> None:
    from math_verify import parse, verify

    theirs = verify(parse(f"${gold}$"), parse(f"${answer}$"))
    assert score_key((canonical(gold), (canonical(answer),))) == float(theirs)


@settings(max_examples=60, deadline=None)
@given(
    st.one_of(
        st.integers(-(10**12), 10**12).map(str),
        st.tuples(st.integers(-99, 99), st.integers(1, 99)).map(
            lambda t: f"\\frac{{{t[0]}}}{{{t[1]}}}"
        ),
    )
)
def test_fast_parse_equals_math_verify_parse(text: str) -> None:
    assert _parse(text) == tuple(_parse_with_math_verify(text))


# --------------------------------------------------------------------------------------
# Batches: each distinct answer once, failures counted, concurrent callers served together


class _Counting:
    """A prepared reward that counts how often its expensive part runs."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, response: str, truth: object) -> float:
        return self.score_prepared(self.prepare(response, truth))

    def prepare(self, response: str, truth: object) -> tuple[str, str]:
        return str(truth), response.strip()

    def score_prepared(self, key: tuple[str, str]) -> float:
        self.calls += 1
        return float(key[0] == key[1])


def test_each_distinct_answer_is_scored_once() -> None:
    fn = _Counting()
    responses = ["4", " 4", "5", "4 ", "6", "5"] * 3
    scores = score_batch(fn, responses, [4] * len(responses), workers=0)
    assert scores == [1.0, 1.0, 0.0, 1.0, 0.0, 0.0] * 3
    assert fn.calls == 3  # "4", "5", "6"


class _QuickCounting(_Counting):
    """Decides equal texts without the expensive part; raises on "boom"; None otherwise."""

    def __init__(self) -> None:
        super().__init__()
        self.quick = 0

    def score_quick(self, key: tuple[str, str]) -> float | None:
        self.quick += 1
        if key[1] == "boom":
            raise RuntimeError("quick path failed")
        return 1.0 if key[0] == key[1] else None


def test_keys_decided_quickly_skip_the_expensive_part() -> None:
    fn = _QuickCounting()
    responses = ["4", "5", " 4", "boom", "6", "5"] * 2
    scores = score_batch(fn, responses, [4] * len(responses), workers=0)
    assert scores == [1.0, 0.0, 1.0, 0.0, 0.0, 0.0] * 2
    assert fn.quick == 4  # each distinct key once: "4", "5", "boom", "6"
    assert fn.calls == 3  # "5", "boom" (its quick path raised) and "6"; "4" never


def test_registered_math_rewards_take_the_quick_path() -> None:
    from qae.rewards import get_reward

    for name in ("math", "math_anchored"):
        fn = get_reward(name)
        assert callable(getattr(fn, "score_quick", None)), name
        assert fn.score_quick(("12", ("12",))) == 1.0
        assert fn.score_quick(("x^2+1", ("1+x^2",))) is None


def test_math_quick_path_gives_math_verify_verdict() -> None:
    from math_verify import parse, verify

    from qae.rewards.math import quick_score, score_key

    keys = [
        ("12", ("12",)),
        ("12", ("012",)),
        ("\\frac{1}{2}", ("0.5",)),
        ("\\frac{1}{2}", ("0.75",)),
        ("3\\sqrt{2}", ("4.2426406871",)),
        ("(1, 2)", ("(1, 3)",)),
        ("x^2+1", ("x^2+1",)),
        ("x^2+1", ("1+x^2",)),
        ("", ("3",)),
        ("3", ()),
    ]
    decided = 0
    for key in keys:
        quick = quick_score(key)
        if quick is not None:
            decided += 1
            if key[0] and key[1]:
                plain = verify(parse(f"${key[0]}$"), parse(f"${key[1][0]}$"))
                assert quick == float(plain), key
    assert decided >= 6
    assert quick_score(("x^2+1", ("1+x^2",))) is None  # needs the parser
    assert score_key(("x^2+1", ("1+x^2",))) == 1.0


def test_score_report_counts_and_shows_an_example() -> None:
    def flaky(response: str, truth: object) -> float | None:
        if response == "raise":
            raise KeyError("no such key")
        if response == "text":
            return "yes"  # type: ignore[return-value]
        return None if response == "none" else 1.0

    report = score_report(flaky, ["raise", "text", "none", "ok"], [0] * 4, workers=0)
    assert report.scores == [0.0, 0.0, None, 1.0]
    assert (report.errors, report.timeouts, report.unscorable, report.failed) == (2, 0, 1, 2)
    assert "KeyError" in report.example
    tower = "\\boxed{9^{9^{9^{9}}}}"  # sympy would compute it for ever
    for workers in (0, 1):
        report = score_report(
            "math", [tower, "\\boxed{3}"], ["3", "3"], workers=workers, timeout=0.5
        )
        assert report.scores == [0.0, 1.0]
        assert (report.timeouts, report.errors) == (1, 0)


def _sleep(seconds: float) -> float:
    time.sleep(seconds)
    return seconds


def test_pool_serves_concurrent_callers_together() -> None:
    with ScoringPool(2) as pool:
        pool.map(_sleep, [(0.01,)] * 2, timeout=5)  # workers started and loaded
        done: dict[str, float] = {}
        start = time.perf_counter()

        def call(name: str, n: int) -> None:
            pool.map(_sleep, [(0.3,)] * n, timeout=5)
            done[name] = time.perf_counter() - start

        long = threading.Thread(target=call, args=("long", 8))
        short = threading.Thread(target=call, args=("short", 1))
        long.start()
        time.sleep(0.1)
        short.start()
        long.join()
        short.join()
    # Queued behind the long call, the short one would end after it (>= 1.2 s).
    assert done["short"] < done["long"]


def test_pool_groups_keep_items_of_a_group_on_one_worker() -> None:
    import os

    with ScoringPool(2) as pool:
        pool.map(_pid_after, [(0.0,)] * 2, timeout=5)  # both workers started and loaded
        # items long enough that scheduling jitter on a loaded machine cannot let one
        # worker run out of its group a whole item ahead of the other
        items = [(0.3,)] * 8
        out = pool.map(_pid_after, items, timeout=10, groups=["a"] * 4 + ["b"] * 4)
    pids = [value for _, value in out]
    assert len(set(pids[:4])) == 1 and len(set(pids[4:])) == 1
    assert pids[0] != pids[4] and os.getpid() not in pids
    with pytest.raises(ValueError, match="groups"):
        ScoringPool(1).map(_pid_after, items, groups=["a"])


def _pid_after(seconds: float) -> int:
    import os

    time.sleep(seconds)
    return os.getpid()
