"""The four checks of the entropy lab; each returns its numbers and a verdict.

Every check returns a dict with ``claim`` (one sentence), ``verdict`` (bool: the claim
holds within the stated tolerance), ``numbers`` (the scalars the verdict is read from)
and ``curves`` (lists of floats for the figures). All numbers are plain Python floats so
the dict can be written to JSON as is.

1. :func:`check_baseline_monotone`: with a constant baseline b, the one-step entropy
   change is increasing in b (``logit`` update model), and the first-order prediction
   matches the exact change as the step size goes to 0.
2. :func:`check_quantile_extremal`: among baselines in [0, 1] the quantile baseline of
   the paper's gate (b = 0 when p <= 1 - K, else 1) gives the smallest entropy change on
   hard prompts and the largest on easy prompts; the mean baseline b = p lies between.
3. :func:`check_k_sweep`: training with QAE at increasing K keeps the entropy higher.
4. :func:`check_zero_fraction`: the zero-advantage fraction counted on sampled batches
   matches the closed form, for every K.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from qae.lab import policy
from qae.lab.dynamics import run_trajectory
from qae.lab.groups import (
    LabEstimator,
    expected_update,
    expected_zero_fraction,
    parse_estimator,
    zero_fraction_closed_form,
)
from qae.lab.policy import LabProblem

__all__ = [
    "CHECKS",
    "check_baseline_monotone",
    "check_k_sweep",
    "check_quantile_extremal",
    "check_zero_fraction",
]

CHECKS = ("baseline", "extremal", "ksweep", "zerofrac")


def _floats(x: Tensor) -> list[float]:
    return [float(v) for v in x.reshape(-1)]


def _quantile_gate(p: Tensor, k: float) -> Tensor:
    """``[P]`` K-quantile of a Bernoulli(p) reward: 0 when ``p <= 1 - K``, else 1."""
    return (p > 1.0 - k + 1e-12).to(torch.float64)


# --------------------------------------------------------------------------------------
# 1. Entropy change as a function of a constant baseline


def check_baseline_monotone(
    *,
    num_candidates: int = 16,
    hard: float = 0.1,
    easy: float = 0.8,
    lrs: Sequence[float] = (1.0, 0.3, 0.1, 0.03, 0.01),
    update: str = "logit",
    num_baselines: int = 21,
    logit_std: float = 1.0,
    seed: int = 0,
    rel_tol: float = 0.05,
) -> dict[str, Any]:
    """Check 1: dH(b) increases with a constant baseline b; first order is exact as eta -> 0.

    For one hard prompt (success ``hard``) and one easy prompt (``easy``) the exact change
    ``H(z + dz) - H(z)`` of the expected step with advantages ``r - b`` is evaluated on a
    grid of b in [0, 1] at every step size in ``lrs``, with the first-order prediction
    ``-Cov_pi(log pi, dz)``. The relative error is ``max_b |exact - predicted| /
    max_b |exact|``; it should shrink in proportion to the step size.

    Verdict: the exact change is strictly increasing along the grid for both prompts at
    every step size, the relative error never grows as the step size shrinks, and it is
    below ``rel_tol`` at the smallest step. The ``pg`` and ``npg`` curves are reported for
    contrast: a constant baseline drops out of their expected step, so they are flat.
    """
    b = torch.linspace(0.0, 1.0, num_baselines, dtype=torch.float64)  # [nb]
    lrs = sorted((float(x) for x in lrs), reverse=True)
    numbers: dict[str, Any] = {"update": update, "lrs": lrs}
    curves: dict[str, Any] = {"baseline": _floats(b), "lrs": lrs}
    monotone, rel_ok = True, True
    for name, success in (("hard", hard), ("easy", easy)):
        z, r = policy.make_prompt(success, num_candidates, logit_std=logit_std, seed=seed)
        zb, rb = z.expand(num_baselines, -1), r.expand(num_baselines, -1)  # [nb, M]
        rel_errors, slopes = [], []
        for lr in lrs:
            exact, pred = policy.baseline_entropy_change(zb, rb, b, lr=lr, update=update)
            rel_errors.append(float((exact - pred).abs().max() / exact.abs().max()))
            slopes.append(float(exact.diff().min()))
            monotone &= bool((exact.diff() > 0).all())
        for upd in ("logit", "pg", "npg"):
            ex, pr = policy.baseline_entropy_change(zb, rb, b, lr=lrs[-1], update=upd)
            curves[f"{name}_{upd}_exact"] = _floats(ex / lrs[-1])
            curves[f"{name}_{upd}_predicted"] = _floats(pr / lrs[-1])
            numbers[f"{name}_{upd}_range_per_lr"] = float((ex.max() - ex.min()) / lrs[-1])
        shrinking = all(a >= c for a, c in zip(rel_errors, rel_errors[1:], strict=False))
        rel_ok &= shrinking and rel_errors[-1] < rel_tol
        curves[f"{name}_rel_error"] = rel_errors
        numbers[f"{name}_success"] = float(policy.success_probability(z, r)[0])
        numbers[f"{name}_rel_error_smallest_lr"] = rel_errors[-1]
        numbers[f"{name}_min_increment"] = min(slopes)
        pi = torch.softmax(z, dim=1)
        logp = torch.log_softmax(z, dim=1)
        cov = float((pi * logp * pi).sum() - (pi * logp).sum() * (pi * pi).sum())
        numbers[f"{name}_cov_logpi_pi"] = cov  # first-order slope dH/db per unit step
    numbers["monotone"] = monotone
    numbers["first_order_converges"] = rel_ok
    return {
        "claim": f"dH increases with a constant baseline b ({update} update); "
        "first-order prediction -> exact as lr -> 0",
        "verdict": bool(monotone and rel_ok),
        "numbers": numbers,
        "curves": curves,
    }


# --------------------------------------------------------------------------------------
# 2. The quantile baseline is extremal among baselines in [0, 1]


def check_quantile_extremal(
    problem: LabProblem,
    *,
    k: float = 0.4,
    lr: float = 0.1,
    update: str = "logit",
    num_baselines: int = 21,
    group_size: int = 16,
    tol: float = 1e-12,
) -> dict[str, Any]:
    """Check 2: the gate's quantile baseline gives the extreme entropy change.

    For every prompt of ``problem`` (binary rewards) the exact one-step change is
    evaluated for constant baselines on a grid of [0, 1], for the population K-quantile
    ``b_K`` (0 when ``p <= 1 - K``, else 1) and for the mean baseline ``b = p``.

    Verdict: dH(b) is not flat (its spread over the grid exceeds 1e-6 of its size) and on
    every hard prompt ``dH(b_K) <= min_b dH(b) + tol``, on every easy prompt
    ``dH(b_K) >= max_b dH(b) - tol``. Also reported: where the mean baseline sits,
    ``(dH(p) - dH(0)) / (dH(1) - dH(0))`` per prompt, and how the registered estimators
    compare in expectation: the share of hard prompts where the expected QAE step changes
    the entropy less than the expected GRPO step, and of easy prompts where it changes it
    more (informative; a sampled group may land in the other regime).
    """
    z, r = problem.logits, problem.rewards
    if not bool(((r == 0) | (r == 1)).all()):
        raise ValueError("check_quantile_extremal needs binary rewards (reward='binary')")
    p = policy.success_probability(z, r)  # [P]
    grid = torch.linspace(0.0, 1.0, num_baselines, dtype=torch.float64)
    b_k = _quantile_gate(p, k)
    dh_grid = torch.stack(
        [policy.baseline_entropy_change(z, r, float(b), lr=lr, update=update)[0] for b in grid],
        dim=1,
    )  # [P, nb]
    dh_q = policy.baseline_entropy_change(z, r, b_k, lr=lr, update=update)[0]  # [P]
    dh_mean = policy.baseline_entropy_change(z, r, p, lr=lr, update=update)[0]  # [P]
    hard = b_k == 0
    lo, hi = dh_grid.min(dim=1).values, dh_grid.max(dim=1).values
    # A flat dH(b) (pg, npg) makes every baseline extremal: require a real spread.
    spread = (hi - lo) > 1e-6 * dh_grid.abs().max(dim=1).values + tol  # [P]
    ok_hard = spread & (dh_q <= lo + tol)
    ok_easy = spread & (dh_q >= hi - tol)
    span = dh_grid[:, -1] - dh_grid[:, 0]
    position = torch.where(spread, (dh_mean - dh_grid[:, 0]) / span, math.nan)  # [P]

    qae_est, grpo_est = LabEstimator("qae", k), LabEstimator("grpo", k)
    kw = {"group_size": group_size, "lr": lr, "update": update}
    dh_qae = policy.exact_entropy_change(z, expected_update(z, r, estimator=qae_est, **kw))
    dh_grpo = policy.exact_entropy_change(z, expected_update(z, r, estimator=grpo_est, **kw))

    def share(mask: Tensor, good: Tensor) -> float:
        return float(good[mask].double().mean()) if bool(mask.any()) else float("nan")

    numbers = {
        "k": k,
        "lr": lr,
        "update": update,
        "hard_prompts": int(hard.sum()),
        "easy_prompts": int((~hard).sum()),
        "hard_quantile_is_min": share(hard, ok_hard),
        "easy_quantile_is_max": share(~hard, ok_easy),
        "mean_position_hard": float(position[hard].mean()) if bool(hard.any()) else math.nan,
        "mean_position_easy": float(position[~hard].mean()) if bool((~hard).any()) else math.nan,
        "expected_qae_below_grpo_on_hard": share(hard, dh_qae <= dh_grpo),
        "expected_qae_above_grpo_on_easy": share(~hard, dh_qae >= dh_grpo),
    }
    verdict = bool(ok_hard[hard].all() and ok_easy[~hard].all())
    return {
        "claim": f"quantile baseline (K={k:g}) gives min dH on hard and max dH on easy prompts",
        "verdict": verdict,
        "numbers": numbers,
        "curves": {
            "p": _floats(p),
            "dH_b0": _floats(dh_grid[:, 0]),
            "dH_b1": _floats(dh_grid[:, -1]),
            "dH_quantile": _floats(dh_q),
            "dH_mean": _floats(dh_mean),
            "dH_expected_qae": _floats(dh_qae),
            "dH_expected_grpo": _floats(dh_grpo),
        },
    }


# --------------------------------------------------------------------------------------
# 3. K sweep over training


def check_k_sweep(
    problem: LabProblem,
    *,
    ks: Sequence[float] = (0.2, 0.4, 0.6, 0.8),
    others: Sequence[str] = ("grpo",),
    steps: int = 300,
    lr: float = 0.5,
    group_size: int = 16,
    update: str = "logit",
    mode: str = "expected",
    pass_k: int = 8,
    seed: int = 0,
) -> dict[str, Any]:
    """Check 3: larger K keeps the entropy higher over training.

    Trains ``problem`` with QAE at each K (and with each estimator in ``others``, e.g. the
    mean baseline ``grpo``) and records entropy, accuracy, pass@k and the zero-advantage
    fraction per step.

    Verdict: the mean entropy over the run (the area under the entropy curve divided by
    its length) is strictly increasing in K.
    """
    ks = sorted(float(k) for k in ks)
    runs: dict[str, dict[str, list[float]]] = {}
    ests = [LabEstimator("qae", k) for k in ks] + [parse_estimator(s) for s in others]
    for est in ests:
        runs[est.label] = run_trajectory(
            problem.logits, problem.rewards, estimator=est, steps=steps, lr=lr,
            group_size=group_size, update=update, mode=mode, pass_ks=(1, pass_k), seed=seed,
        )  # fmt: skip
    numbers: dict[str, Any] = {"update": update, "mode": mode, "steps": steps, "lr": lr}
    for label, run in runs.items():
        numbers[label] = {
            "mean_entropy": sum(run["entropy"]) / len(run["entropy"]),
            "final_entropy": run["entropy"][-1],
            "final_accuracy": run["accuracy"][-1],
            f"final_pass@{pass_k}": run[f"pass@{pass_k}"][-1],
            "mean_zero_adv_frac": sum(run["zero_adv_frac"]) / len(run["zero_adv_frac"]),
        }
    auc = [numbers[LabEstimator("qae", k).label]["mean_entropy"] for k in ks]
    numbers["qae_mean_entropy_by_k"] = auc
    verdict = all(b > a for a, b in zip(auc, auc[1:], strict=False)) and len(ks) >= 2
    return {
        "claim": f"larger K keeps entropy higher (K={', '.join(f'{k:g}' for k in ks)})",
        "verdict": bool(verdict),
        "numbers": numbers,
        "curves": runs,
    }


# --------------------------------------------------------------------------------------
# 4. Zero-advantage fraction against the closed form


def check_zero_fraction(
    problem: LabProblem,
    *,
    ks: Sequence[float] = tuple(round(0.05 * i, 2) for i in range(1, 20)),
    others: Sequence[str] = ("grpo",),
    group_size: int = 16,
    repeats: int = 32,
    seed: int = 0,
    z_tol: float = 4.0,
) -> dict[str, Any]:
    """Check 4: the zero-advantage fraction of sampled batches matches the closed form.

    For the success rates of ``problem`` (binary rewards) and each K, ``repeats`` groups
    of G responses per prompt are sampled from the policy, the registered estimator
    computes their advantages and the exact zeros are counted. The closed form is
    :func:`qae.lab.groups.zero_fraction_closed_form`; the enumeration over group
    compositions (:func:`qae.lab.groups.expected_zero_fraction`) is reported as well.

    Verdict: for every estimator ``|counted - closed| <= z_tol * standard error`` (the
    standard error of the mean over the sampled groups) and the enumeration equals the
    closed form within 1e-9.
    """
    z, r = problem.logits, problem.rewards
    if not bool(((r == 0) | (r == 1)).all()):
        raise ValueError("check_zero_fraction needs binary rewards (reward='binary')")
    p = policy.success_probability(z, r)  # [P]
    pi = torch.softmax(z, dim=1)  # [P, M]
    gen = torch.Generator().manual_seed(seed)
    p_count, g = z.shape[0], group_size
    draws = torch.multinomial(pi, g * repeats, replacement=True, generator=gen)  # [P, G*R]
    rewards = r.gather(1, draws).reshape(-1)  # [P*R*G], groups are consecutive runs of G
    ids = torch.arange(p_count * repeats).repeat_interleave(g)
    ests = [LabEstimator("qae", float(k)) for k in sorted(ks)]
    ests += [parse_estimator(s) for s in others]
    rows: dict[str, dict[str, float]] = {}
    ok = True
    for est in ests:
        adv = est.advantages(rewards, ids).reshape(-1, g)  # [P*R, G]
        per_group = (adv == 0).double().mean(dim=1)  # [P*R]
        counted = float(per_group.mean())
        se = float(per_group.std() / math.sqrt(per_group.numel()))
        closed = float(zero_fraction_closed_form(p, group_size=g, estimator=est).mean())
        enumerated = float(expected_zero_fraction(z, r, group_size=g, estimator=est).mean())
        z_score = abs(counted - closed) / max(se, 1e-12)
        ok &= z_score <= z_tol and abs(enumerated - closed) <= 1e-9
        rows[est.label] = {
            "k": est.k if est.uses_k else math.nan,
            "closed_form": closed,
            "counted": counted,
            "standard_error": se,
            "z_score": z_score,
            "enumerated": enumerated,
        }
    worst = max(row["z_score"] for row in rows.values())
    return {
        "claim": "counted zero-advantage fraction matches the closed form for every K",
        "verdict": bool(ok),
        "numbers": {
            "group_size": g,
            "groups_per_estimator": p_count * repeats,
            "max_z_score": worst,
            "rows": rows,
        },
        "curves": {"p": _floats(p)},
    }
