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

__version__ = "0.1.0"

__all__ = [
    "QUANTILE_METHODS",
    "SCALES",
    "EstimatorSpec",
    "Groups",
    "__version__",
    "advantage_stats",
    "broadcast_to_tokens",
    "compute_advantages",
    "estimators",
    "group_quantile",
    "register_estimator",
]
