"""Reward functions by name, and batch scoring with a bounded time per item.

A reward function is a plain callable ``fn(response: str, ground_truth) -> float | None``;
None means "unscorable" (as in TRL: excluded from the group baseline). Functions that may
be slow or hang on adversarial input (sympy-based math equivalence) carry the attribute
``isolated = True`` and are scored in worker processes by :func:`score_batch`; cheap exact
verifiers run in-process so that training pays no process overhead for them.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Iterable, MutableMapping, Sequence
from dataclasses import dataclass
from typing import Any

from qae.core.registry import Registry
from qae.rewards.pool import DEFAULT_TIMEOUT, ScoreTimeout, shared_pool, warm_up

__all__ = [
    "FailureStreak",
    "RewardFailure",
    "RewardFn",
    "ScoreReport",
    "get_reward",
    "is_isolated",
    "register_reward",
    "reward_functions",
    "reward_name",
    "score_batch",
    "score_report",
]

RewardFn = Callable[[str, Any], "float | None"]

reward_functions: Registry[RewardFn] = Registry("reward function", "reward")


def register_reward(
    name: str, *, isolated: bool | None = None, override: bool = False
) -> Callable[[RewardFn], RewardFn]:
    """Decorator: register ``fn(response, ground_truth) -> float | None`` under ``name``.

    Args:
        name: the string users pass as ``reward=...``.
        isolated: if given, sets ``fn.isolated``: True sends the function to worker processes
            in :func:`score_batch` (slow or possibly hanging scorers), False keeps it
            in-process (cheap exact verifiers). Functions without the attribute run in-process.
        override: replace a function already registered under ``name``.
    """

    def wrap(fn: RewardFn) -> RewardFn:
        if not callable(fn):
            raise ValueError(f"reward {name!r} must be callable, got {fn!r}")
        if isolated is not None:
            fn.isolated = bool(isolated)  # type: ignore[attr-defined]
        return reward_functions.register(name, fn, override=override)

    return wrap


def get_reward(reward: str | RewardFn) -> RewardFn:
    """A registered reward function by name, or ``reward`` itself when it is callable."""
    if callable(reward):
        return reward
    return reward_functions.get(reward)


def is_isolated(fn: RewardFn) -> bool:
    """Whether :func:`score_batch` should run ``fn`` in worker processes by default."""
    while isinstance(fn, functools.partial):
        if hasattr(fn, "isolated"):
            break
        fn = fn.func
    return bool(getattr(fn, "isolated", False))


def _as_score(value: object) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool):
        return float(value)
    if isinstance(value, (int, float)):
        value = float(value)
        return None if math.isnan(value) else value
    try:
        return _as_score(float(value))  # numpy / torch scalars
    except (TypeError, ValueError):
        raise TypeError(f"returned {value!r}, expected a float or None") from None


@dataclass
class ScoreReport:
    """Scores of a batch and what went wrong while computing them.

    ``scores[i]`` is None where the function returned None (unscorable) and 0.0 where it
    failed: raised or returned a non-number (``errors``), overran its time bound
    (``timeouts``) or killed its worker (``crashed``). ``example`` is the first failure's
    message.
    """

    scores: list[float | None]
    errors: int = 0
    timeouts: int = 0
    crashed: int = 0
    unscorable: int = 0
    example: str | None = None

    @property
    def failed(self) -> int:
        """Items that scored 0.0 because the function failed."""
        return self.errors + self.timeouts + self.crashed

    def failures(self) -> dict[str, int]:
        """``{"error": n, "timeout": n, "crashed": n}`` without the zero counts."""
        counts = {"error": self.errors, "timeout": self.timeouts, "crashed": self.crashed}
        return {k: v for k, v in counts.items() if v}


def _check_args(
    responses: Sequence[str], ground_truths: Sequence[Any], workers: object, timeout: object
) -> None:
    if len(responses) != len(ground_truths):
        raise ValueError(
            f"responses and ground_truths must have the same length, got "
            f"len(responses)={len(responses)} and len(ground_truths)={len(ground_truths)}"
        )
    if workers is not None and (
        isinstance(workers, bool) or not isinstance(workers, int) or workers < 0
    ):
        raise ValueError(f"workers must be None or an integer >= 0, got workers={workers!r}")
    if not (isinstance(timeout, (int, float)) and timeout > 0):
        raise ValueError(f"timeout must be > 0 seconds, got timeout={timeout!r}")


def _prepared(fn: RewardFn) -> tuple[Callable[..., Any], Callable[[Any], Any]] | None:
    """``(fn.prepare, fn.score_prepared)`` when ``fn`` scores distinct answers once."""
    prepare = getattr(fn, "prepare", None)
    judge = getattr(fn, "score_prepared", None)
    return (prepare, judge) if callable(prepare) and callable(judge) else None


def _run_in_process(fn: Callable[..., Any], items: list[tuple]) -> list[tuple[str, Any]]:
    """``(status, value)`` of ``fn(*args)`` for every tuple, as :meth:`ScoringPool.map` gives."""
    out: list[tuple[str, Any]] = []
    if items:
        warm_up(fn)  # one-time imports, outside the items' time bounds
    for args in items:
        try:
            out.append(("ok", fn(*args)))
        except (KeyboardInterrupt, SystemExit):
            raise
        except ScoreTimeout:
            out.append(("timeout", None))
        except BaseException as err:  # incl. library timeouts that subclass BaseException
            out.append(("error", f"{type(err).__name__}: {err}"[:500]))
    return out


def _decide_quickly(fn: RewardFn, keys: Iterable[Any]) -> dict[Any, tuple[str, Any]]:
    """``{key: ("ok", score)}`` for the keys ``fn.score_quick`` decides; a key it cannot
    decide (None) or that makes it raise is left to ``score_prepared``."""
    quick = getattr(fn, "score_quick", None)
    if not callable(quick):
        return {}
    decided = {}
    for key in keys:
        try:
            value = quick(key)
        except Exception:
            continue
        if value is not None:
            decided[key] = ("ok", value)
    return decided


def score_report(
    reward: str | RewardFn,
    responses: Sequence[str],
    ground_truths: Sequence[Any],
    *,
    workers: int | None = None,
    timeout: float = DEFAULT_TIMEOUT,
) -> ScoreReport:
    """:func:`score_batch` with the failure counts and an example failure.

    A function with ``prepare(response, ground_truth) -> key`` and ``score_prepared(key)``
    attributes (the built-in ``math`` reward) is scored once per distinct (hashable) key:
    ``prepare`` runs here (it must be cheap), ``score_prepared`` where ``fn`` itself would
    run. An optional ``score_quick(key)`` (cheap and bounded) runs here first; a key it
    decides (not None) never reaches a worker. An optional ``affinity(key)`` groups keys
    for the worker pool: keys of one group go to one worker when they can (the ``math``
    reward groups by ground truth, so that each worker parses a ground truth once).
    """
    fn = get_reward(reward)
    _check_args(responses, ground_truths, workers, timeout)
    pairs = list(zip(responses, ground_truths, strict=True))
    prepared = _prepared(fn)
    early: list[tuple[str, Any]] = []  # prepare's outcome per item
    groups = None
    if prepared is None:
        call, items, index = fn, pairs, list(range(len(pairs)))
    else:
        prepare, call = prepared
        early = _run_in_process(prepare, pairs)
        keys = [value if status == "ok" else None for status, value in early]
        distinct = {k: i for i, k in enumerate(dict.fromkeys(k for k in keys if k is not None))}
        decided = _decide_quickly(fn, distinct)
        slow = [k for k in distinct if k not in decided]
        items = [(k,) for k in slow]
        index = [distinct[k] if k is not None else -1 for k in keys]
        affinity = getattr(fn, "affinity", None)
        if callable(affinity):
            groups = [affinity(k) for k in slow]
    use_pool = is_isolated(fn) if workers is None else workers > 0
    if not items:
        outcomes = []
    elif use_pool:
        outcomes = shared_pool(workers).map(call, items, timeout=timeout, groups=groups)
    else:
        outcomes = _run_in_process(call, items)
    if prepared is not None:  # back to one outcome per distinct key, in key order
        slow_out = dict(zip(slow, outcomes, strict=True))
        outcomes = [decided[k] if k in decided else slow_out[k] for k in distinct]
    report = ScoreReport([])
    for i, j in enumerate(index):
        status, value = early[i] if j < 0 else outcomes[j]
        _record(report, status, value, timeout)
    return report


def _record(report: ScoreReport, status: str, value: Any, timeout: float) -> None:
    """Add one item's outcome (a :meth:`ScoringPool.map` status and value) to ``report``."""
    if status == "ok":
        try:
            score = _as_score(value)
        except TypeError as err:
            status, value = "error", str(err)
        else:
            report.scores.append(score)
            report.unscorable += score is None
            return
    report.scores.append(0.0)
    if status == "timeout":
        report.timeouts += 1
        value = f"timed out after {timeout:g} s"
    elif status == "crashed":
        report.crashed += 1
        value = "the worker process died"
    else:
        report.errors += 1
    if report.example is None:
        report.example = str(value)


def score_batch(
    reward: str | RewardFn,
    responses: Sequence[str],
    ground_truths: Sequence[Any],
    *,
    workers: int | None = None,
    timeout: float = DEFAULT_TIMEOUT,
    stats: MutableMapping[str, int] | None = None,
) -> list[float | None]:
    """Score ``responses[i]`` against ``ground_truths[i]`` for every ``i``.

    Args:
        reward: a registered name (``"math"``) or a callable ``fn(response, ground_truth)``.
        responses: ``[B]`` response strings.
        ground_truths: ``[B]`` reference answers.
        workers: worker processes; None picks per function (isolated functions use the
            shared pool with one worker per core, others run in-process), 0 forces
            in-process scoring, a positive number forces a pool of that size.
        timeout: per-item bound in seconds for pooled scoring (per distinct answer for
            functions that prepare keys, see :func:`score_report`); an item past it scores
            0.0 (its worker is killed and replaced if it does not stop by itself).
        stats: optional counter updated with ``"error"``, ``"timeout"`` and ``"crashed"``
            counts: items that scored 0.0 because the function failed.

    Returns:
        ``[B]`` scores; None where the function itself returned None (unscorable). A failing
        item scores 0.0 and never raises. :func:`score_report` also tells what failed.
    """
    report = score_report(reward, responses, ground_truths, workers=workers, timeout=timeout)
    if stats is not None:
        for k, v in report.failures().items():
            stats[k] = stats.get(k, 0) + v
    return report.scores


def reward_name(fn: RewardFn) -> str:
    """The name ``fn`` is registered under, else its ``__name__`` (or ``repr``)."""
    for name in reward_functions:
        if reward_functions.get(name) is fn:
            return name
    return getattr(fn, "__name__", repr(fn))


class RewardFailure(RuntimeError):
    """A reward function failed on every response for too many steps in a row."""


class FailureStreak:
    """Counts consecutive steps on which a reward function failed on every response.

    A failing item scores 0 and training goes on (one bad sample must not stop a run), but a
    function that fails on everything makes every group uninformative: the run would skip
    every step and "succeed". :meth:`update` raises :class:`RewardFailure` once ``limit``
    such steps follow each other.

    Args:
        limit: consecutive all-failing steps allowed; 0 never raises.
        name: the reward function's name, for the error.
    """

    def __init__(self, limit: int, name: str) -> None:
        if isinstance(limit, bool) or not isinstance(limit, int) or limit < 0:
            raise ValueError(f"limit must be an integer >= 0, got limit={limit!r}")
        self.limit = limit
        self.name = name
        self.steps = 0

    def update(self, scored: int, failed: int, example: str | None = None) -> None:
        """Record a step that scored ``scored`` responses, ``failed`` of them failing."""
        self.steps = self.steps + 1 if scored and failed >= scored else 0
        if self.limit and self.steps >= self.limit:
            raise RewardFailure(
                f"reward function {self.name!r} failed on every response for {self.steps} "
                f"consecutive steps (data.reward_fail_steps={self.limit}); last failure: "
                f"{example or 'unknown'}"
            )
