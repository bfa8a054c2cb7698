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
from collections.abc import Callable, MutableMapping, Sequence
from typing import Any

from qae.registry import Registry
from qae.rewards.pool import DEFAULT_TIMEOUT, shared_pool

__all__ = [
    "RewardFn",
    "get_reward",
    "is_isolated",
    "register_reward",
    "reward_functions",
    "score_batch",
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
        raise TypeError(f"a reward function must return a float or None, got {value!r}") from None


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
        timeout: per-item bound in seconds for pooled scoring; an item past it scores 0.0
            (its worker is killed and replaced if it does not stop by itself).
        stats: optional counter updated with ``"error"``, ``"timeout"`` and ``"crashed"``
            counts: items that scored 0.0 because the function failed.

    Returns:
        ``[B]`` scores; None where the function itself returned None (unscorable). A failing
        item scores 0.0 and never raises.
    """
    fn = get_reward(reward)
    if len(responses) != len(ground_truths):
        raise ValueError(
            f"responses and ground_truths must have the same length, got "
            f"len(responses)={len(responses)} and len(ground_truths)={len(ground_truths)}"
        )
    if workers is not None and (isinstance(workers, bool) or not isinstance(workers, int)):
        raise ValueError(f"workers must be None or an integer >= 0, got workers={workers!r}")
    if workers is not None and workers < 0:
        raise ValueError(f"workers must be None or an integer >= 0, got workers={workers!r}")
    use_pool = is_isolated(fn) if workers is None else workers > 0
    scores: list[float | None] = []
    failures: dict[str, int] = {}
    if not use_pool:
        for response, truth in zip(responses, ground_truths, strict=True):
            try:
                scores.append(_as_score(fn(response, truth)))
            except (KeyboardInterrupt, SystemExit):
                raise
            except BaseException:  # incl. library timeouts that subclass BaseException
                failures["error"] = failures.get("error", 0) + 1
                scores.append(0.0)
    else:
        pool = shared_pool(workers)
        outcomes = pool.map(fn, list(zip(responses, ground_truths, strict=True)), timeout=timeout)
        for status, value in outcomes:
            if status == "ok":
                try:
                    scores.append(_as_score(value))
                    continue
                except TypeError:
                    status = "error"
            failures[status] = failures.get(status, 0) + 1
            scores.append(0.0)
    if stats is not None:
        for k, v in failures.items():
            stats[k] = stats.get(k, 0) + v
    return scores
