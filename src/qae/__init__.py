"""qae: Quantile Advantage Estimation for entropy-safe RLVR on language models."""

# The built-in tasks register their verifiers (rewards "arithmetic", "reasoning") on import.
from qae import tasks  # noqa: F401
from qae.core.advantages import (
    QUANTILE_METHODS,
    SCALES,
    EstimatorSpec,
    Groups,
    advantage_stats,
    broadcast_to_tokens,
    compute_advantages,
    estimators,
    group_quantile,
    register_estimator,
)
from qae.core.entropy import (
    entropy_change_predictor,
    masked_mean,
    selective_log_softmax,
    token_entropy,
)
from qae.core.losses import (
    AGG_MODES,
    KL_ESTIMATORS,
    BatchCounts,
    LossConfig,
    aggregate_loss,
    batch_counts,
    compute_policy_loss,
    kl_penalty,
    policy_losses,
    register_policy_loss,
)
from qae.eval.datasets import PromptRecord, load_prompts
from qae.eval.evaluate import evaluate
from qae.eval.metrics import pass_at_k
from qae.kcontrol import (
    KControlConfig,
    KController,
    StepSignals,
    difficulty_k,
    make_controller,
    register_controller,
)
from qae.rewards import get_reward, math_score, register_reward, reward_functions, score_batch

__version__ = "0.1.0"

__all__ = [
    "AGG_MODES",
    "KL_ESTIMATORS",
    "QUANTILE_METHODS",
    "SCALES",
    "BatchCounts",
    "EstimatorSpec",
    "Groups",
    "KControlConfig",
    "KController",
    "LossConfig",
    "PromptRecord",
    "StepSignals",
    "advantage_stats",
    "aggregate_loss",
    "batch_counts",
    "broadcast_to_tokens",
    "compute_advantages",
    "compute_policy_loss",
    "difficulty_k",
    "entropy_change_predictor",
    "estimators",
    "evaluate",
    "get_reward",
    "group_quantile",
    "kl_penalty",
    "load_prompts",
    "make_controller",
    "masked_mean",
    "math_score",
    "pass_at_k",
    "policy_losses",
    "register_controller",
    "register_estimator",
    "register_policy_loss",
    "register_reward",
    "reward_functions",
    "score_batch",
    "selective_log_softmax",
    "token_entropy",
    "__version__",
]
