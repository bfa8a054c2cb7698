"""Built-in verifiable tasks and the tiny base policy pre-trained on them.

Each task registers its exact verifier as a reward when it is imported (``arithmetic``,
``reasoning``); importing this package imports both, and ``import qae`` imports it.
"""

from qae.tasks import reasoning  # noqa: F401  (registers the reward "reasoning")
from qae.tasks.arithmetic import (
    LEVELS,
    Level,
    arithmetic_score,
    iter_train,
    make_problem,
    make_split,
)
from qae.tasks.tiny_model import load_tiny_model, tiny_model_path

__all__ = [
    "LEVELS",
    "Level",
    "arithmetic_score",
    "iter_train",
    "load_tiny_model",
    "make_problem",
    "make_split",
    "tiny_model_path",
]
