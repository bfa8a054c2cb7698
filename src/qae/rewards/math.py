"""Math answer equivalence through ``math-verify``, with a bounded time per response.

:func:`math_score` extracts the final answer with :mod:`qae.rewards.extract` (last box, else
the last ``Answer:`` line), then asks ``math-verify`` whether it equals the ground truth, so
that ``\\frac{1}{2}``, ``0.5`` and ``1/2`` agree and ``27.0`` equals ``27``.

Time bounds, in layers:
- extracted answers longer than ``MAX_ANSWER_CHARS`` score 0 before sympy sees them;
- in the main thread the whole parse + verify runs under a ``SIGALRM`` timer (our own,
  covering every comparison at once; ``math-verify``'s own per-comparison alarms are off).
  Python runs the handler between bytecodes, so one long C-level step (a regular expression
  or a big-integer operation inside sympy) can overrun the bound by that step's length;
- from any other thread the call is sent to a worker process of the shared scoring pool,
  which kills and replaces a worker that does not answer in time. :func:`score_batch` uses
  that pool for every item, which is the path training takes.
"""

from __future__ import annotations

import logging
import threading
from functools import lru_cache

from qae.rewards.extract import MAX_ANSWER_CHARS, extract_answer, ground_truth_text
from qae.rewards.pool import DEFAULT_TIMEOUT, ScoreTimeout, bounded_call, time_limit

__all__ = ["answers_equivalent", "math_score"]


class _DropTimeoutDisabledWarning(logging.Filter):
    """math-verify warns once that its alarms are off; here another timer bounds the call."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "Timeout is disabled" not in record.getMessage()


for _name in ("math_verify.parser", "math_verify.grader"):
    logging.getLogger(_name).addFilter(_DropTimeoutDisabledWarning())


def _wrap_latex(text: str) -> str:
    # math-verify finds LaTeX inside math delimiters; a bare answer is wrapped so that both
    # "\frac{1}{2}" and "1/2" parse. An escaped dollar is a currency sign: "\$18.90" is 18.90.
    text = text.replace("\\$", "")
    return text if "$" in text else f"${text}$"


@lru_cache(maxsize=4096)
def _parse_gold(gold: str) -> tuple:
    from math_verify import parse

    return tuple(parse(_wrap_latex(gold), parsing_timeout=None))


def _parse_answer(answer: str) -> list:
    from math_verify import parse

    return parse(_wrap_latex(answer), parsing_timeout=None)


def answers_equivalent(answer: str | None, ground_truth: object) -> bool:
    """Whether an extracted answer equals the ground truth according to ``math-verify``.

    No time bound of its own: callers wrap it (see :func:`math_score`). An answer longer than
    ``MAX_ANSWER_CHARS`` or one that does not parse is not equivalent.
    """
    from math_verify import verify

    if not answer or len(answer) > MAX_ANSWER_CHARS:
        return False
    gold_text = ground_truth_text(ground_truth)
    if not gold_text:
        return False
    if answer.strip() == gold_text:
        return True
    gold = list(_parse_gold(gold_text))
    target = _parse_answer(answer)
    if not gold or not target:
        return False
    return bool(verify(gold, target, timeout_seconds=None))


def _score_in_process(response: str, ground_truth: object, fallback: str, timeout: float) -> float:
    from math_verify.errors import TimeoutException  # a BaseException, not an Exception

    try:
        with time_limit(timeout):
            answer = extract_answer(response, fallback=fallback)
            return 1.0 if answers_equivalent(answer, ground_truth) else 0.0
    except (Exception, ScoreTimeout, TimeoutException):
        return 0.0


def math_score(
    response: str,
    ground_truth: object,
    *,
    fallback: str = "none",
    timeout: float = DEFAULT_TIMEOUT,
) -> float:
    """1.0 if the response's final answer equals ``ground_truth`` (``math-verify``), else 0.0.

    Args:
        response: the model's response; the answer is its last ``\\boxed{}``, else its last
            ``Answer:`` line, else the ``fallback`` (``"none"`` or ``"last_number"``).
        ground_truth: the reference answer as a string (LaTeX or plain), int or float.
        fallback: see :func:`qae.rewards.extract.extract_answer`.
        timeout: seconds allowed for this response; past it the score is 0.0.

    Never raises for any input string; a response that cannot be scored in time scores 0.0.
    Called from the main thread the bound is a signal timer (see the module docs); from any
    other thread, and through :func:`qae.rewards.score_batch`, it is enforced by killing a
    worker process.
    """
    if threading.current_thread() is threading.main_thread():
        return _score_in_process(response, ground_truth, fallback, timeout)
    result = bounded_call(
        _score_in_process, (response, ground_truth, fallback, timeout), timeout=timeout
    )
    return 0.0 if result is None else float(result)
