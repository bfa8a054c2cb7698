"""Verifiable rewards: answer extraction, math equivalence with bounded time, registry.

Reward functions are plain callables ``fn(response, ground_truth) -> float | None`` registered
by name (``reward="math"``); users may pass their own callable anywhere a name is accepted.
``math`` reads the final answer as :mod:`qae.rewards.extract` describes (unmarked answers
included); ``math_anchored`` scores 0 unless a box, an ``Answer:`` line or an "answer ..."
phrase marks the answer. The built-in tasks register their own exact verifiers
(``arithmetic``, ``reasoning``) when :mod:`qae.tasks` is imported, which ``import qae``
does.
"""

from qae.rewards.base import (
    FailureStreak,
    RewardFailure,
    RewardFn,
    ScoreReport,
    get_reward,
    is_isolated,
    register_reward,
    reward_functions,
    reward_name,
    score_batch,
    score_report,
)
from qae.rewards.extract import (
    answer_line,
    extract_answer,
    extract_candidates,
    last_boxed,
    last_math,
    last_number,
    normalize_answer,
)
from qae.rewards.math import MathReward, answers_equivalent, math_score
from qae.rewards.pool import DEFAULT_TIMEOUT, ScoreTimeout, ScoringPool, time_limit
from qae.rewards.reference import ground_truth_text

register_reward("math", isolated=True)(math_score)
register_reward("math_anchored")(MathReward(fallback="none"))

__all__ = [
    "DEFAULT_TIMEOUT",
    "FailureStreak",
    "MathReward",
    "RewardFailure",
    "RewardFn",
    "ScoreReport",
    "ScoreTimeout",
    "ScoringPool",
    "answer_line",
    "answers_equivalent",
    "extract_answer",
    "extract_candidates",
    "get_reward",
    "ground_truth_text",
    "is_isolated",
    "last_boxed",
    "last_math",
    "last_number",
    "math_score",
    "normalize_answer",
    "register_reward",
    "reward_functions",
    "reward_name",
    "score_batch",
    "score_report",
    "time_limit",
]
