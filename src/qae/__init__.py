"""qae: Quantile Advantage Estimation for entropy-safe RLVR on language models."""

from qae.advantages import (
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
from qae.entropy import (
    entropy_change_predictor,
    masked_mean,
    selective_log_softmax,
    token_entropy,
)
from qae.kcontrol import (
    KControlConfig,
    KController,
    StepSignals,
    difficulty_k,
    make_controller,
    register_controller,
)
from qae.losses import (
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
    "StepSignals",
    "LossConfig",
    "__version__",
    "advantage_stats",
    "aggregate_loss",
    "batch_counts",
    "broadcast_to_tokens",
    "compute_advantages",
    "compute_policy_loss",
    "difficulty_k",
    "entropy_change_predictor",
    "estimators",
    "group_quantile",
    "kl_penalty",
    "make_controller",
    "masked_mean",
    "policy_losses",
    "register_controller",
    "register_estimator",
    "register_policy_loss",
    "selective_log_softmax",
    "token_entropy",
]
