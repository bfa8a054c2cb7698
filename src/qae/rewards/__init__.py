"""Verifiable rewards: answer extraction, math equivalence with bounded time, registry.

Reward functions are plain callables ``fn(response, ground_truth) -> float | None`` registered
by name (``reward="math"``); users may pass their own callable anywhere a name is accepted.
"""

from qae.rewards.base import (
    RewardFn,
    get_reward,
    is_isolated,
    register_reward,
    reward_functions,
    score_batch,
)
from qae.rewards.extract import (
    answer_line,
    extract_answer,
    ground_truth_text,
    last_boxed,
    last_number,
    normalize_answer,
)
from qae.rewards.math import answers_equivalent, math_score
from qae.rewards.pool import DEFAULT_TIMEOUT, ScoreTimeout, ScoringPool, time_limit
from qae.tasks.arithmetic import arithmetic_score
from qae.tasks.reasoning import reasoning_score

register_reward("math", isolated=True)(math_score)
# The built-in tasks' exact verifiers: microseconds per item, scored in-process.
register_reward("arithmetic", isolated=False)(arithmetic_score)
register_reward("reasoning", isolated=False)(reasoning_score)

__all__ = [
    "DEFAULT_TIMEOUT",
    "RewardFn",
    "ScoreTimeout",
    "ScoringPool",
    "answer_line",
    "answers_equivalent",
    "extract_answer",
    "get_reward",
    "ground_truth_text",
    "is_isolated",
    "last_boxed",
    "last_number",
    "math_score",
    "normalize_answer",
    "register_reward",
    "reward_functions",
    "score_batch",
    "time_limit",
]
