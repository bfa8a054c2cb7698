"""Per-prompt step reports and multi-step trajectories of a tabular policy.

Shapes: P prompts, M candidates, G responses per prompt.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from qae.advantages import group_quantile
from qae.lab.groups import (
    LabEstimator,
    expected_regimes,
    expected_update,
    expected_zero_fraction,
    sample_update,
)
from qae.lab.policy import (
    exact_entropy_change,
    pass_at_k,
    policy_entropy,
    predicted_entropy_change,
    success_probability,
)

__all__ = ["MODES", "run_trajectory", "step_report"]

MODES = ("sampled", "expected")


def step_report(
    logits: Tensor,
    rewards: Tensor,
    *,
    estimator: LabEstimator,
    group_size: int,
    lr: float,
    update: str = "pg",
    mode: str = "expected",
    pass_ks: Sequence[int] = (1, 8),
    generator: torch.Generator | None = None,
) -> dict[str, Tensor]:
    """Take one step and report every per-prompt quantity.

    Args:
        logits: ``[P, M]`` logits before the step.
        rewards: ``[P, M]`` candidate rewards.
        estimator: advantage estimator.
        group_size: G responses per prompt.
        lr: step size.
        update: ``pg``, ``npg`` or ``logit``.
        mode: ``expected`` (exact expectation over the sampling) or ``sampled`` (one draw).
        pass_ks: k values of the closed-form pass@k ``1 - (1-p)^k``.
        generator: torch generator for ``sampled``.

    Returns:
        dict of ``[P]`` float64 tensors: ``entropy_before``, ``entropy_after``,
        ``dH_exact``, ``dH_predicted`` (``-Cov_pi(log pi, dz)``), ``p`` (success
        probability before the step), ``pass@k`` per k, ``zero_adv_frac`` (counted in the
        sampled batch, expected otherwise), ``degenerate``, ``hard``, ``easy`` (0/1 per
        group when sampled, probabilities when expected); plus ``dz`` ``[P, M]``.
    """
    if mode not in MODES:
        raise ValueError(f"unknown mode={mode!r}; expected one of {', '.join(MODES)}")
    kw = {"group_size": group_size, "estimator": estimator}
    if mode == "expected":
        dz = expected_update(logits, rewards, lr=lr, update=update, **kw)
        zero = expected_zero_fraction(logits, rewards, **kw)
        regimes = expected_regimes(logits, rewards, **kw)
    else:
        step = sample_update(logits, rewards, lr=lr, update=update, generator=generator, **kw)
        dz = step.dz
        zero = (step.advantages == 0).to(torch.float64).mean(dim=1)  # [P]
        regimes = _sampled_regimes(step.rewards, estimator)
    p = success_probability(logits, rewards)
    out = {
        "entropy_before": policy_entropy(logits),
        "entropy_after": policy_entropy(logits + dz),
        "dH_exact": exact_entropy_change(logits, dz),
        "dH_predicted": predicted_entropy_change(logits, dz),
        "p": p,
        "zero_adv_frac": zero,
        **regimes,
        "dz": dz,
    }
    for k in pass_ks:
        out[f"pass@{k}"] = pass_at_k(p, k)
    return out


def _sampled_regimes(rewards: Tensor, estimator: LabEstimator) -> dict[str, Tensor]:
    """0/1 ``[P]`` regime labels of sampled groups ``rewards [P, G]`` (as advantage_stats)."""
    sorted_r = rewards.sort(dim=1).values  # [P, G]
    g = rewards.shape[1]
    ids = torch.arange(rewards.shape[0]).repeat_interleave(g)
    q = group_quantile(sorted_r.reshape(-1), ids, estimator.k, method=estimator.quantile_method)
    q = q.reshape(-1, g)[:, 0]  # [P]
    degenerate = sorted_r[:, 0] == sorted_r[:, -1]
    hard = ~degenerate & (q == sorted_r[:, 0])
    easy = ~degenerate & (q == sorted_r[:, -1])
    f64 = torch.float64
    return {"degenerate": degenerate.to(f64), "hard": hard.to(f64), "easy": easy.to(f64)}


def run_trajectory(
    logits: Tensor,
    rewards: Tensor,
    *,
    estimator: LabEstimator,
    steps: int,
    lr: float,
    group_size: int,
    update: str = "pg",
    mode: str = "sampled",
    pass_ks: Sequence[int] = (1, 8),
    seed: int = 0,
) -> dict[str, list[float]]:
    """Train the tabular policy for ``steps`` steps and record batch means per step.

    Args:
        logits: ``[P, M]`` initial logits (not modified).
        rewards: ``[P, M]`` candidate rewards.
        estimator, lr, group_size, update, mode, pass_ks: as :func:`step_report`.
        steps: number of updates.
        seed: seed of the sampling generator (``sampled`` mode).

    Returns:
        dict of lists of floats, one entry per step ``0..steps`` for the policy metrics
        (``entropy``, ``accuracy``, ``pass@k``) and one per update ``0..steps-1`` for the
        step metrics (``zero_adv_frac``, ``degenerate_groups``, ``hard_groups``,
        ``easy_groups``, ``dH_exact``, ``dH_predicted``; group counts summed over prompts).
    """
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be an integer >= 1, got steps={steps!r}")
    gen = torch.Generator().manual_seed(seed)
    z = logits.to(torch.float64).clone()
    keys = ["zero_adv_frac", "degenerate_groups", "hard_groups", "easy_groups"]
    keys += ["dH_exact", "dH_predicted"]
    out: dict[str, list[float]] = {k: [] for k in keys}
    policy_keys = ["entropy", "accuracy", *(f"pass@{k}" for k in pass_ks)]
    out.update({k: [] for k in policy_keys})
    for _ in range(steps):
        rep = step_report(
            z, rewards, estimator=estimator, group_size=group_size, lr=lr, update=update,
            mode=mode, pass_ks=pass_ks, generator=gen,
        )  # fmt: skip
        out["entropy"].append(float(rep["entropy_before"].mean()))
        out["accuracy"].append(float(rep["p"].mean()))
        for k in pass_ks:
            out[f"pass@{k}"].append(float(rep[f"pass@{k}"].mean()))
        out["zero_adv_frac"].append(float(rep["zero_adv_frac"].mean()))
        for name in ("degenerate", "hard", "easy"):
            out[f"{name}_groups"].append(float(rep[name].sum()))
        out["dH_exact"].append(float(rep["dH_exact"].mean()))
        out["dH_predicted"].append(float(rep["dH_predicted"].mean()))
        z = z + rep["dz"]
    p = success_probability(z, rewards)
    out["entropy"].append(float(policy_entropy(z).mean()))
    out["accuracy"].append(float(p.mean()))
    for k in pass_ks:
        out[f"pass@{k}"].append(float(pass_at_k(p, k).mean()))
    return out
