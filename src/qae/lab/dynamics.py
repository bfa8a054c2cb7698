"""Per-prompt step reports and multi-step trajectories of a tabular policy.

A trajectory can be driven by a :mod:`qae.kcontrol` controller: before each step the
controller gives the step's K (a float, or a per-group K for ``difficulty``), and after it
the controller reads the step's signals (``entropy``: mean policy entropy over prompts
before the step, in nats; ``frac_nonzero_adv``: one minus the step's zero-advantage
fraction), as the trainer does.

Shapes: P prompts, M candidates, G responses per prompt, L reward levels, C compositions.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Sequence

import torch
from torch import Tensor

from qae.core.advantages import compute_advantages, group_quantile
from qae.kcontrol import KController
from qae.lab.groups import (
    LabEstimator,
    _check_inputs,
    _compositions,
    _level_mass,
    _levels,
    _multinomial_pmf,
    _representative_rewards,
    expected_regimes,
    expected_update,
    expected_zero_fraction,
    sample_update,
)
from qae.lab.policy import (
    UPDATES,
    exact_entropy_change,
    pass_at_k,
    policy_entropy,
    predicted_entropy_change,
    success_probability,
    update_direction,
)

__all__ = ["MODES", "group_k_step", "run_trajectory", "step_report"]

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


def _regimes_of(rewards: Tensor, k: float | Tensor, method: str) -> Tensor:
    """``[R, 3]`` 0/1 (degenerate, hard, easy) of sorted groups ``rewards [R, G]``."""
    r, g = rewards.shape
    ids = torch.arange(r).repeat_interleave(g)
    q = group_quantile(rewards.reshape(-1), ids, k, method=method).reshape(r, g)[:, 0]  # [R]
    degenerate = rewards[:, 0] == rewards[:, -1]
    hard = ~degenerate & (q == rewards[:, 0])
    easy = ~degenerate & (q == rewards[:, -1])
    return torch.stack([degenerate, hard, easy], dim=1).to(torch.float64)


def group_k_step(
    logits: Tensor,
    rewards: Tensor,
    controller: KController,
    *,
    estimator: LabEstimator,
    group_size: int,
    lr: float,
    update: str = "pg",
    mode: str = "expected",
    generator: torch.Generator | None = None,
) -> dict[str, Tensor]:
    """One step whose K comes from ``controller.batch_k`` per group (e.g. ``difficulty``).

    ``sampled``: G responses per prompt are drawn, ``controller.batch_k`` gives each
    response its group's K (``[P*G]``) and the estimator uses it, as in the trainer.
    ``expected``: the exact expectation over the sampling. A group's K depends only on its
    reward multiset, so the advantage table of :mod:`qae.lab.groups` is built with the K
    that a copy of the controller (its state untouched) assigns to each representative
    group; ``k`` is then the expected K of a group.

    Returns:
        ``dz [P, M]``; ``[P]`` tensors ``zero_adv_frac``, ``degenerate``, ``hard``,
        ``easy`` (as :func:`step_report`) and ``k`` (the group's K, expected or drawn).
    """
    _check_inputs(logits, rewards, group_size)
    if update not in UPDATES:
        raise ValueError(f"unknown update={update!r}; expected one of {', '.join(UPDATES)}")
    if mode not in MODES:
        raise ValueError(f"unknown mode={mode!r}; expected one of {', '.join(MODES)}")
    f64, g, method = torch.float64, group_size, estimator.quantile_method
    if mode == "sampled":
        pi = torch.softmax(logits.to(f64), dim=1)  # [P, M]
        samples = torch.multinomial(pi, g, replacement=True, generator=generator)  # [P, G]
        r = rewards.to(f64).gather(1, samples)  # [P, G]
        ids = torch.arange(r.shape[0]).repeat_interleave(g)  # [P*G]
        k = controller.batch_k(r.reshape(-1), ids)  # float or [P*G]
        k = torch.as_tensor(k, dtype=f64).expand(r.numel())  # [P*G]
        adv = compute_advantages(r.reshape(-1), ids, estimator.name, k=k, quantile_method=method)
        adv = adv.reshape(r.shape)  # [P, G]
        per_candidate = torch.zeros_like(pi).scatter_add_(1, samples, adv) / g  # [P, M]
        if update == "logit":
            dz = lr * per_candidate
        elif update == "npg":
            dz = lr * per_candidate / pi
        else:
            dz = lr * (per_candidate - adv.mean(dim=1, keepdim=True) * pi)
        order = r.argsort(dim=1)
        k_pg = k.reshape(r.shape).gather(1, order).reshape(-1)  # [P*G], follows the sort
        regimes = _regimes_of(r.gather(1, order), k_pg, method)  # [P, 3]
        zero = (adv == 0).to(f64).mean(dim=1)  # [P]
        k_group = k.reshape(r.shape)[:, 0]  # [P]
    else:
        levels, index = _levels(rewards)
        num_levels = len(levels)
        probe = copy.deepcopy(controller)
        # Advantage table f [C, L]: a level-l response with G-1 mates of counts `others`.
        others = _compositions(g - 1, num_levels)  # [C, L]
        own = torch.eye(num_levels, dtype=torch.long)  # [L, L]
        counts = (others[:, None, :] + own[None, :, :]).reshape(-1, num_levels)  # [C*L, L]
        rep = _representative_rewards(counts, levels)  # [C*L, G], sorted
        ids = torch.arange(rep.shape[0]).repeat_interleave(g)
        k_rep = torch.as_tensor(probe.batch_k(rep.reshape(-1), ids), dtype=f64)
        k_rep = k_rep.expand(rep.numel())  # [C*L*G]
        adv = compute_advantages(
            rep.reshape(-1), ids, estimator.name, k=k_rep, quantile_method=method
        ).reshape(rep.shape)  # [C*L, G]
        level = torch.arange(num_levels).repeat(others.shape[0])  # [C*L]
        first = (torch.cumsum(counts, dim=1) - counts).gather(1, level[:, None])  # [C*L, 1]
        f = adv.gather(1, first).reshape(-1, num_levels)  # [C, L]
        q = _level_mass(logits, index, num_levels)  # [P, L]
        pmf = _multinomial_pmf(q, others)  # [P, C]
        abar = (pmf @ f).gather(1, index)  # [P, M]
        dz = lr * update_direction(logits, abar, update=update)
        zero = (q * (pmf @ (f == 0).to(f64))).sum(dim=1)  # [P]
        # Regimes and K of full groups, weighted by their probability.
        full = _compositions(g, num_levels)  # [C', L]
        rep_full = _representative_rewards(full, levels)  # [C', G]
        ids_full = torch.arange(full.shape[0]).repeat_interleave(g)
        k_full = torch.as_tensor(probe.batch_k(rep_full.reshape(-1), ids_full), dtype=f64)
        k_full = k_full.expand(rep_full.numel())  # [C'*G]
        pmf_full = _multinomial_pmf(q, full)  # [P, C']
        regimes = pmf_full @ _regimes_of(rep_full, k_full, method)  # [P, 3]
        k_group = pmf_full @ k_full.reshape(rep_full.shape)[:, 0]  # [P]
    return {
        "dz": dz,
        "zero_adv_frac": zero,
        "degenerate": regimes[:, 0],
        "hard": regimes[:, 1],
        "easy": regimes[:, 2],
        "k": k_group,
    }


def _controlled_report(
    z: Tensor,
    rewards: Tensor,
    controller: KController,
    *,
    estimator: LabEstimator,
    group_size: int,
    lr: float,
    update: str,
    mode: str,
    pass_ks: Sequence[int],
    generator: torch.Generator,
) -> dict[str, Tensor]:
    """:func:`step_report` with the controller's K for this step (scalar or per group)."""
    k = controller.k()
    if controller.kind != "difficulty":
        est = dataclasses.replace(estimator, k=float(k))
        rep = step_report(
            z, rewards, estimator=est, group_size=group_size, lr=lr, update=update,
            mode=mode, pass_ks=pass_ks, generator=generator,
        )  # fmt: skip
        rep["k"] = torch.tensor(float(k), dtype=torch.float64)  # one K for every group
        return rep
    step = group_k_step(
        z, rewards, controller, estimator=estimator, group_size=group_size, lr=lr,
        update=update, mode=mode, generator=generator,
    )  # fmt: skip
    p = success_probability(z, rewards)
    rep = {
        **step,
        "entropy_before": policy_entropy(z),
        "dH_exact": exact_entropy_change(z, step["dz"]),
        "dH_predicted": predicted_entropy_change(z, step["dz"]),
        "p": p,
    }
    for kk in pass_ks:
        rep[f"pass@{kk}"] = pass_at_k(p, kk)
    return rep


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
    controller: KController | None = None,
) -> dict[str, list[float]]:
    """Train the tabular policy for ``steps`` steps and record batch means per step.

    Args:
        logits: ``[P, M]`` initial logits (not modified).
        rewards: ``[P, M]`` candidate rewards.
        estimator, lr, group_size, update, mode, pass_ks: as :func:`step_report`.
        steps: number of updates.
        seed: seed of the sampling generator (``sampled`` mode).
        controller: a :mod:`qae.kcontrol` controller that sets the K of every step
            (overriding ``estimator.k``; the estimator must use K, e.g. ``qae``) and is
            updated after each step with ``step``, ``entropy`` (batch mean before the
            step) and ``frac_nonzero_adv``. It is used in place, so its state afterwards
            is that of the last step.

    Returns:
        dict of lists of floats, one entry per step ``0..steps`` for the policy metrics
        (``entropy``, ``accuracy``, ``pass@k``) and one per update ``0..steps-1`` for the
        step metrics (``zero_adv_frac``, ``degenerate_groups``, ``hard_groups``,
        ``easy_groups``, ``dH_exact``, ``dH_predicted``; group counts summed over prompts).
        With a controller also ``k`` per update (mean K over groups).
    """
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be an integer >= 1, got steps={steps!r}")
    if controller is not None and not estimator.uses_k:
        raise ValueError(
            f"a K controller needs an estimator that uses K (qae), got estimator={estimator.name!r}"
        )
    gen = torch.Generator().manual_seed(seed)
    z = logits.to(torch.float64).clone()
    keys = ["zero_adv_frac", "degenerate_groups", "hard_groups", "easy_groups"]
    keys += ["dH_exact", "dH_predicted"]
    out: dict[str, list[float]] = {k: [] for k in keys}
    if controller is not None:
        out["k"] = []
    policy_keys = ["entropy", "accuracy", *(f"pass@{k}" for k in pass_ks)]
    out.update({k: [] for k in policy_keys})
    for t in range(steps):
        if controller is None:
            rep = step_report(
                z, rewards, estimator=estimator, group_size=group_size, lr=lr, update=update,
                mode=mode, pass_ks=pass_ks, generator=gen,
            )  # fmt: skip
        else:
            rep = _controlled_report(
                z, rewards, controller, estimator=estimator, group_size=group_size, lr=lr,
                update=update, mode=mode, pass_ks=pass_ks, generator=gen,
            )  # fmt: skip
            out["k"].append(float(rep["k"].mean()))
            controller.update(
                {
                    "step": t,
                    "entropy": float(rep["entropy_before"].mean()),
                    "frac_nonzero_adv": 1.0 - float(rep["zero_adv_frac"].mean()),
                }
            )
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
