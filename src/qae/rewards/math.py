"""Math answer equivalence through ``math-verify``, with a bounded time per response.

:func:`math_score` extracts the final answer with :mod:`qae.rewards.extract` (the marked
answer stated last, else "answer ..." with math, else the last math in the text), then asks
``math-verify`` whether it equals the ground truth, so that ``\\frac{1}{2}``, ``0.5`` and
``1/2`` agree and ``27.0`` equals ``27``.

Scoring is split in two so that a batch does the expensive part once per distinct answer:
:meth:`MathReward.prepare` (extraction, linear string work, in the calling process) gives a
key ``(ground truth text, candidate answers)``, and :meth:`MathReward.score_prepared`
(math-verify, possibly slow) scores a key. :func:`qae.rewards.score_batch` scores each
distinct key once, in worker processes; each worker parses a ground truth once.

Time bounds, in layers:

- extracted answers longer than ``MAX_ANSWER_CHARS`` score 0 before sympy sees them;
- in the main thread the whole parse + verify runs under a ``SIGALRM`` timer (our own,
  covering every comparison at once; ``math-verify``'s own per-comparison alarms are off).
  Python runs the handler between bytecodes, so one long C-level step (a regular expression
  or a big-integer operation inside sympy) can overrun the bound by that step's length;
- from any other thread the call is sent to a worker process of the shared scoring pool,
  which kills and replaces a worker that does not answer in time. :func:`score_batch` uses
  that pool for every distinct answer, which is the path training takes.
"""

from __future__ import annotations

import logging
import re
import threading
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache

from qae.rewards.extract import FALLBACKS, MAX_ANSWER_CHARS, extract_answer, extract_candidates
from qae.rewards.numeric import numeric_elements, numeric_value
from qae.rewards.pool import DEFAULT_TIMEOUT, ScoreTimeout, bounded_call, time_limit
from qae.rewards.reference import ground_truth_text

__all__ = ["MathKey", "MathReward", "answers_equivalent", "math_input", "math_score"]

# (ground truth text, candidate answers, most likely first): equal keys score equally.
MathKey = tuple[str, tuple[str, ...]]


class _DropTimeoutDisabledWarning(logging.Filter):
    """math-verify warns once that its alarms are off; here another timer bounds the call."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "Timeout is disabled" not in record.getMessage()


for _name in ("math_verify.parser", "math_verify.grader"):
    logging.getLogger(_name).addFilter(_DropTimeoutDisabledWarning())

# Thousands separated by spaces: LaTeX would read "1 000" as the product 1 * 000.
_SPACED_NUMBER = re.compile(r"[-+]?\d{1,3}(?: \d{3})+(?:\.\d+)?")


def math_input(answer: str) -> str:
    """The text handed to ``math_verify.parse`` for an extracted answer or ground truth.

    Text with its own math delimiters (``"$1$ and $2$"``) is passed as is; a number with
    spaces between its thousands goes to math-verify's plain-expression parser; anything
    else is wrapped in ``$...$`` so that bare LaTeX (``\\frac{1}{2}``) parses. An escaped
    dollar is a currency sign and is dropped: ``"\\$18.90"`` is 18.90.
    """
    text = answer.replace("\\$", "").strip()
    if "$" in text or "\\(" in text or "\\[" in text:
        return text
    if _SPACED_NUMBER.fullmatch(text):
        return text
    return f"${text}$"


# An integer literal: math-verify reads "$27$" as [Integer(27), "27"], and "$\frac{3}{4}$" as
# [Rational(3, 4), "\frac{3}{4}"]; both are built directly here, without its LaTeX parser.
_INTEGER = re.compile(r"-?\d{1,30}")
_FRACTION = re.compile(r"(-?)\\frac\{(-?\d{1,30})\}\{(\d{1,30})\}")


def canonical(text: str) -> str:
    """``text`` up to what cannot change its meaning: runs of spacing become one space and
    ``\\dfrac``/``\\tfrac`` become ``\\frac``. Keys hold canonical texts, so spellings that
    differ only so are scored once."""
    return " ".join(text.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac").split())


@lru_cache(maxsize=8192)
def _parse(text: str) -> tuple:
    """math-verify's reading of an answer or ground truth text (cached: a prompt's ground
    truth and its popular answers recur in every group and every epoch)."""
    import sympy

    if _INTEGER.fullmatch(text):
        return (sympy.Integer(int(text)), text)
    fraction = _FRACTION.fullmatch(text)
    if fraction and int(fraction.group(3)) != 0:
        sign = -1 if fraction.group(1) else 1
        return (sympy.Rational(sign * int(fraction.group(2)), int(fraction.group(3))), text)
    from math_verify import parse

    return tuple(parse(math_input(text), parsing_timeout=None))


@lru_cache(maxsize=1)
def warmup() -> None:
    """Import math-verify (and sympy, its LaTeX grammar) and verify one pair, once per process.

    About a second of CPU time, paid by the first answer a process scores: done here, outside
    the time bound of that answer, it cannot time out a correct answer on a busy machine.
    The scoring functions sent to worker processes carry it as their ``warmup``
    (see :mod:`qae.rewards.pool`).
    """
    from math_verify import parse, verify

    # no math-verify timeouts: they arm SIGALRM, which fails outside the main thread and
    # would cancel an enclosing time_limit
    verify(
        parse("$\\frac{1}{2}$", parsing_timeout=None),
        parse("$0.5$", parsing_timeout=None),
        timeout_seconds=None,
    )


def _parse_gold(gold: str) -> tuple:
    """math-verify's reading of a ground truth text (see :func:`_parse`)."""
    return _parse(canonical(gold))


def _parsed(values: list | tuple) -> bool:
    """Whether math-verify read a value (not only the matched text) from an answer."""
    return any(not isinstance(v, str) for v in values)


def score_key(key: MathKey) -> float:
    """1.0 if the first candidate that math-verify can read equals the ground truth, else 0.0.

    A candidate that only matches as text (math-verify read no value from it) is compared
    as text, after every readable candidate was tried. Equal texts, two integers, simple
    numbers whose values differ (:mod:`qae.rewards.numeric`) and two exact rationals are
    decided without math-verify's parser or sympy's simplification, with the verdict
    math-verify would give. No time bound of its own.
    """
    quick = quick_score(key)
    if quick is not None:
        return quick
    gold_text, candidates = key
    candidates = tuple(c for c in candidates if c and len(c) <= MAX_ANSWER_CHARS)
    gold = list(_parse(gold_text))
    if not gold:
        return 0.0
    textual = None
    for candidate in candidates:
        target = list(_parse(candidate))
        if _parsed(target):
            return 1.0 if _verify(gold, target) else 0.0
        if target and textual is None:
            textual = target
    return 1.0 if textual and _verify(gold, textual) else 0.0


def quick_score(key: MathKey) -> float | None:
    """The score of a key when it needs neither math-verify's parser nor sympy, else None:
    no ground truth or no candidate (0.0), the first candidate's text equal to the ground
    truth's (1.0), two integers, or two simple numbers (or lists of them) whose values
    clearly differ (0.0). String work on texts of at most ``MAX_ANSWER_CHARS``, bounded in
    time, so :func:`qae.rewards.score_batch` runs it before sending a key to a worker."""
    gold_text, candidates = key
    candidates = tuple(c for c in candidates if c and len(c) <= MAX_ANSWER_CHARS)
    if not gold_text or not candidates:
        return 0.0
    if candidates[0] == gold_text:
        return 1.0
    if _INTEGER.fullmatch(gold_text) and _INTEGER.fullmatch(candidates[0]):
        return float(int(gold_text) == int(candidates[0]))
    if _clearly_different(gold_text, candidates[0]):
        return 0.0
    return None


def _clearly_different(gold_text: str, answer: str) -> bool:
    """Whether two simple numeric answers, or two lists of them with as many elements, have
    values too far apart for math-verify to call them equal (it compares at 6 decimals at
    most): no parse needed to reject them. For lists the sorted values are compared: if
    they differ, no pairing of the elements (ordered or not) makes the lists equal."""
    a, b = numeric_value(answer), numeric_value(gold_text)
    if a is not None and b is not None:
        return _far(a, b)
    xs, ys = numeric_elements(answer), numeric_elements(gold_text)
    if xs is None or ys is None or len(xs) != len(ys):
        return False
    if len(xs) == 2 and not (xs[0] < xs[1] and ys[0] < ys[1]):
        return False  # (a, b) may be an interval, empty when a >= b: all empty ones are equal
    return any(_far(x, y) for x, y in zip(sorted(xs), sorted(ys), strict=True))


def _far(a: complex, b: complex) -> bool:
    return abs(a - b) > 1e-5 * max(1.0, abs(a), abs(b))


def _verify(gold: list, target: list) -> bool:
    """``math_verify.verify(gold, target)``, decided without sympy for exact numbers.

    When every value on both sides is an exact rational (``27``, ``\\frac{1}{2}``),
    math-verify's verdict is: some pair of values is equal, or some pair of matched texts
    is. That is what this computes; anything else goes to math-verify.
    """
    from math_verify import verify

    if _exact_numbers(gold) and _exact_numbers(target):
        values = [(g, t) for g in gold for t in target]
        return any(
            g == t if not isinstance(g, str) else g.strip() and g.strip() == t.strip()
            for g, t in values
            if isinstance(g, str) == isinstance(t, str)
        )
    return bool(verify(gold, target, timeout_seconds=None))


def _exact_numbers(values: list) -> bool:
    import sympy

    numbers = [v for v in values if not isinstance(v, str)]
    return bool(numbers) and all(isinstance(v, sympy.Rational) for v in numbers)


def make_key(
    response: str, ground_truth: object, fallback: str | Callable[[str], str | None]
) -> MathKey:
    """The key of a response: the canonical ground truth and candidate answers."""
    candidates = extract_candidates(response, fallback=fallback)
    return canonical(ground_truth_text(ground_truth)), tuple(canonical(c) for c in candidates)


def answers_equivalent(answer: str | None, ground_truth: object) -> bool:
    """Whether an extracted answer equals the ground truth according to ``math-verify``.

    No time bound of its own: callers wrap it (see :func:`math_score`). An answer longer than
    ``MAX_ANSWER_CHARS`` or one that does not parse is not equivalent.
    """
    if not answer:
        return False
    return score_key((canonical(ground_truth_text(ground_truth)), (canonical(answer),))) == 1.0


def _score_key_bounded(key: MathKey, timeout: float) -> float:
    from math_verify.errors import TimeoutException  # a BaseException, not an Exception

    try:
        warmup()  # outside the time bound
        with time_limit(timeout):
            return score_key(key)
    except (Exception, ScoreTimeout, TimeoutException):
        return 0.0


@dataclass(frozen=True)
class MathReward:
    """The math reward with its options fixed: a callable ``(response, ground_truth)``.

    Args:
        fallback: where the answer is when nothing marks it: ``"last_math"`` (the last
            math environment or number, as math-verify reads unmarked text), ``"last_number"``
            or ``"none"`` (no answer: scores 0). See :mod:`qae.rewards.extract`.
        timeout: seconds allowed for one response (one distinct answer in a batch).

    Besides ``__call__`` it offers what :func:`qae.rewards.score_batch` uses to score each
    distinct answer once (``prepare``, ``score_quick``, ``score_prepared``, ``affinity``)
    and ``extract`` (the answer as text, for majority voting).
    """

    fallback: str = "last_math"
    timeout: float = DEFAULT_TIMEOUT
    isolated = True  # slow or hanging on adversarial input: score in worker processes

    def __post_init__(self) -> None:
        if self.fallback not in FALLBACKS:
            raise ValueError(f"unknown fallback={self.fallback!r}; expected one of {FALLBACKS}")
        if not self.timeout > 0:
            raise ValueError(f"timeout must be > 0 seconds, got timeout={self.timeout!r}")

    def prepare(self, response: str, ground_truth: object) -> MathKey:
        """The key of a response: cheap string work, no sympy (see the module docs)."""
        return make_key(response, ground_truth, self.fallback)

    def score_prepared(self, key: MathKey) -> float:
        """The score of a key from :meth:`prepare`, within ``timeout``.

        Unlike :meth:`__call__` it raises what went wrong (:class:`ScoreTimeout` past the
        bound), so that :func:`qae.rewards.score_batch` counts it; the item scores 0.0.
        """
        warmup()
        with time_limit(self.timeout):
            return score_key(key)

    score_prepared.warmup = warmup  # type: ignore[attr-defined]

    def score_quick(self, key: MathKey) -> float | None:
        """The score of a key that needs no parser (:func:`quick_score`), else None."""
        return quick_score(key)

    def affinity(self, key: MathKey) -> str:
        """Keys of one ground truth go to one worker, which parses it once."""
        return key[0]

    def extract(self, response: str) -> str | None:
        """The answer this reward reads from ``response``."""
        return extract_answer(response, fallback=self.fallback)

    def __call__(self, response: str, ground_truth: object) -> float:
        return math_score(response, ground_truth, fallback=self.fallback, timeout=self.timeout)


def math_score(
    response: str,
    ground_truth: object,
    *,
    fallback: str | Callable[[str], str | None] = "last_math",
    timeout: float = DEFAULT_TIMEOUT,
) -> float:
    """1.0 if the response's final answer equals ``ground_truth`` (``math-verify``), else 0.0.

    Args:
        response: the model's response; the answer is found as
            :func:`qae.rewards.extract.extract_candidates` says.
        ground_truth: the reference answer as a string (LaTeX or plain, ``$...$`` pieces,
            a ``\\boxed{}``), int or float.
        fallback: ``"last_math"``, ``"last_number"``, ``"none"`` or a callable; see
            :func:`qae.rewards.extract.extract_candidates`.
        timeout: seconds allowed for this response; past it the score is 0.0.

    Never raises for any input string; a response that cannot be scored in time scores 0.0.
    Called from the main thread the bound is a signal timer (see the module docs); from any
    other thread, and through :func:`qae.rewards.score_batch`, it is enforced by killing a
    worker process.
    """
    if not callable(fallback) and fallback not in FALLBACKS:
        raise ValueError(
            f"unknown fallback={fallback!r}; expected one of {FALLBACKS} or a callable"
        )
    try:
        key = make_key(response, ground_truth, fallback)
    except (Exception, ScoreTimeout):  # a user's fallback callable failed
        return 0.0
    if threading.current_thread() is threading.main_thread():
        return _score_key_bounded(key, timeout)
    result = bounded_call(_score_key_bounded, (key, timeout), timeout=timeout)
    return 0.0 if result is None else float(result)


_score_key_bounded.warmup = warmup  # type: ignore[attr-defined]

_DEFAULT = MathReward()
# score_batch finds these on the registered function and scores each distinct answer once.
math_score.prepare = _DEFAULT.prepare  # type: ignore[attr-defined]
math_score.score_prepared = _DEFAULT.score_prepared  # type: ignore[attr-defined]
math_score.score_quick = _DEFAULT.score_quick  # type: ignore[attr-defined]
math_score.affinity = _DEFAULT.affinity  # type: ignore[attr-defined]
math_score.extract = _DEFAULT.extract  # type: ignore[attr-defined]
