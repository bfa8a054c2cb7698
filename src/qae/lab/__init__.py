"""Entropy lab: tabular softmax policies that check QAE's entropy theory in seconds.

A batch of P prompts, each a softmax over M candidate responses with known rewards, is
trained with the trainer's registered advantage estimators. The lab computes the exact
and first-order one-step entropy change of expected and sampled updates, trajectories of
entropy, accuracy, pass@k and zero-advantage fraction, and four checks of the QAE paper's
claims (:mod:`qae.lab.checks`); ``qae simulate`` runs them and writes figures.
"""

from qae.lab.checks import (
    CHECKS,
    check_baseline_monotone,
    check_k_sweep,
    check_quantile_extremal,
    check_zero_fraction,
)
from qae.lab.dynamics import MODES, run_trajectory, step_report
from qae.lab.groups import (
    LabEstimator,
    SampledStep,
    expected_advantages,
    expected_regimes,
    expected_update,
    expected_zero_fraction,
    parse_estimator,
    sample_update,
    zero_fraction_closed_form,
)
from qae.lab.policy import (
    DEFAULT_MIX,
    REWARD_KINDS,
    UPDATES,
    LabProblem,
    baseline_entropy_change,
    exact_entropy_change,
    make_problem,
    make_prompt,
    parse_mix,
    pass_at_k,
    policy_entropy,
    predicted_entropy_change,
    success_probability,
    update_direction,
)

__all__ = [
    "CHECKS",
    "DEFAULT_MIX",
    "MODES",
    "REWARD_KINDS",
    "UPDATES",
    "LabEstimator",
    "LabProblem",
    "SampledStep",
    "baseline_entropy_change",
    "check_baseline_monotone",
    "check_k_sweep",
    "check_quantile_extremal",
    "check_zero_fraction",
    "exact_entropy_change",
    "expected_advantages",
    "expected_regimes",
    "expected_update",
    "expected_zero_fraction",
    "make_problem",
    "make_prompt",
    "parse_estimator",
    "parse_mix",
    "pass_at_k",
    "policy_entropy",
    "predicted_entropy_change",
    "run_trajectory",
    "sample_update",
    "step_report",
    "success_probability",
    "update_direction",
    "zero_fraction_closed_form",
]
