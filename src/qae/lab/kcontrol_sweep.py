"""Fixed K against :mod:`qae.kcontrol` controllers on tabular policies, across difficulty mixes.

For each difficulty mix a problem is drawn (:func:`qae.lab.policy.make_problem`) and
trained once per arm: QAE at a fixed K, a baseline estimator (``grpo``) or QAE driven by a
K controller built from a :class:`qae.kcontrol.KControlConfig` (``entropy_band``,
``sparsity``, schedules, ``difficulty``). Every arm starts from the same logits.

The entropy band is defined once, for every arm, as the ``entropy_band`` controller's
default band relative to the entropy at step 0: ``[(t - w) H0, (t + w) H0]`` with
``t = entropy_target`` and ``w = entropy_band`` of the default config (``[0.75, 1.25] H0``).
An arm *stays in band* on a mix when the batch-mean entropy is inside it at every step
``0..steps``.

Shapes: P prompts, M candidates, G responses per prompt.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from qae.kcontrol import KControlConfig, make_controller
from qae.lab.dynamics import run_trajectory
from qae.lab.groups import LabEstimator
from qae.lab.policy import make_problem, parse_mix

__all__ = [
    "DEFAULT_MIXES",
    "SweepArm",
    "band_limits",
    "default_arms",
    "in_band_stats",
    "kcontrol_sweep",
    "plot_kcontrol_sweep",
    "sweep_table",
]

# name -> difficulty mix "p:w,..." (initial success rate : weight), same three centres.
DEFAULT_MIXES: dict[str, str] = {
    "mostly hard": "0.1:0.7,0.4:0.2,0.8:0.1",
    "balanced": "0.1:0.4,0.4:0.3,0.8:0.3",
    "mostly easy": "0.1:0.1,0.4:0.2,0.8:0.7",
}


@dataclass(frozen=True)
class SweepArm:
    """One training recipe of the sweep.

    Attributes:
        label: name in tables and legends.
        estimator: advantage estimator (``qae`` with its K, or e.g. ``grpo``).
        kcontrol: controller config driving K each step; None = the estimator's fixed K.
    """

    label: str
    estimator: LabEstimator
    kcontrol: KControlConfig | None = None

    @property
    def adaptive(self) -> bool:
        """True when a controller with feedback sets K (``entropy_band``, ``sparsity``)."""
        return self.kcontrol is not None and self.kcontrol.kind in ("entropy_band", "sparsity")


def default_arms(
    ks: Sequence[float] = (0.2, 0.4, 0.6, 0.8), baselines: Sequence[str] = ("grpo",)
) -> list[SweepArm]:
    """Fixed K per ``ks``, the ``baselines`` estimators, and the untuned controllers.

    Controllers, all with :class:`~qae.kcontrol.KControlConfig` defaults: ``entropy_band``
    (band [0.75, 1.25] x the step-0 entropy, K in [0.2, 0.8] from 0.4), ``sparsity``
    (non-zero fraction 0.2 +- 0.05, K in [0.2, 0.5]) and ``two_phase`` (K 0.6 for 100
    steps, then 0.4).
    """
    arms = [SweepArm(f"K={k:g}", LabEstimator("qae", float(k))) for k in ks]
    arms += [SweepArm(name, LabEstimator(name)) for name in baselines]
    qae = LabEstimator("qae", 0.4)
    for kind in ("entropy_band", "sparsity", "two_phase"):
        arms.append(SweepArm(kind, qae, KControlConfig(kind=kind)))
    return arms


def band_limits(h0: float, config: KControlConfig | None = None) -> tuple[float, float]:
    """(low, high) entropy band in nats: the ``entropy_band`` band of ``config`` at ``h0``.

    ``config`` defaults to ``KControlConfig(kind="entropy_band")``; a relative band scales
    ``entropy_target +- entropy_band`` by ``h0``, an absolute one ignores ``h0``.
    """
    c = config or KControlConfig(kind="entropy_band")
    scale = h0 if c.entropy_relative else 1.0
    return (c.entropy_target - c.entropy_band) * scale, (c.entropy_target + c.entropy_band) * scale


def in_band_stats(entropy: Sequence[float], low: float, high: float) -> dict[str, Any]:
    """How an entropy trajectory sits against a band.

    Returns:
        ``frac_in_band`` (share of entries in [low, high]), ``stays_in_band`` (all of
        them), ``first_exit`` (index of the first entry outside, or None), ``exit_side``
        (``below``/``above``/None) and ``min_entropy``, ``max_entropy``.
    """
    inside = [low <= h <= high for h in entropy]
    first = next((i for i, ok in enumerate(inside) if not ok), None)
    side = None if first is None else ("below" if entropy[first] < low else "above")
    return {
        "frac_in_band": sum(inside) / len(inside),
        "stays_in_band": first is None,
        "first_exit": first,
        "exit_side": side,
        "min_entropy": min(entropy),
        "max_entropy": max(entropy),
    }


def kcontrol_sweep(
    *,
    mixes: Mapping[str, str] | None = None,
    arms: Sequence[SweepArm] | None = None,
    update: str = "logit",
    steps: int = 300,
    lr: float = 0.5,
    prompts: int = 256,
    candidates: int = 16,
    group_size: int = 16,
    mode: str = "expected",
    pass_k: int = 8,
    seed: int = 0,
) -> dict[str, Any]:
    """Train every arm on every mix; report band membership and final accuracy.

    Args:
        mixes: name -> difficulty mix (default :data:`DEFAULT_MIXES`).
        arms: recipes (default :func:`default_arms`).
        update, steps, lr, group_size, mode, pass_k, seed: as
            :func:`qae.lab.dynamics.run_trajectory` (``seed`` also draws the problems).
        prompts, candidates: P and M of each problem.

    Returns:
        dict with ``config``; ``runs[mix][arm]``: ``numbers`` (``frac_in_band``,
        ``stays_in_band``, ``first_exit``, ``exit_side``, ``min_entropy``,
        ``max_entropy``, ``final_accuracy``, ``final_entropy``, ``final_pass@k``,
        ``mean_k``, ``final_k``) and ``curves`` (``entropy``, ``accuracy``, ``k``,
        ``zero_adv_frac`` per step); ``band[mix]``: ``low``, ``high``, ``h0`` and
        ``solved_ceiling`` (mean log of the number of correct candidates: the highest
        mean entropy a policy with accuracy 1 can have), in nats; and
        ``summary``: per arm ``in_band_on_every_mix`` and ``mixes_left``, plus
        ``adaptive_in_band_everywhere`` (labels), ``fixed_k_leaving_somewhere``
        (labels) and ``goal_met`` (some adaptive arm in band on every mix while every
        fixed-K arm leaves on at least one).
    """
    mixes = dict(DEFAULT_MIXES if mixes is None else mixes)
    arms = list(default_arms() if arms is None else arms)
    for spec in mixes.values():
        parse_mix(spec)
    labels = [a.label for a in arms]
    if len(set(labels)) != len(labels):
        raise ValueError(f"arm labels must be unique, got {labels}")
    runs: dict[str, dict[str, Any]] = {}
    bands: dict[str, dict[str, float]] = {}
    for mix_name, spec in mixes.items():
        problem = make_problem(prompts, candidates, mix=spec, seed=seed)
        # A policy with accuracy 1 puts all its mass on the correct candidates, so its
        # entropy is at most log(#correct) per prompt: the most a solved batch can keep.
        ceiling = float(problem.correct.sum(dim=1).to(torch.float64).log().mean())
        runs[mix_name] = {}
        for arm in arms:
            ctrl = None if arm.kcontrol is None else make_controller(arm.kcontrol)
            traj = run_trajectory(
                problem.logits, problem.rewards, estimator=arm.estimator, steps=steps, lr=lr,
                group_size=group_size, update=update, mode=mode, pass_ks=(1, pass_k),
                seed=seed, controller=ctrl,
            )  # fmt: skip
            k_curve = traj.get("k") or [arm.estimator.k if arm.estimator.uses_k else math.nan]
            k_curve = k_curve if len(k_curve) == steps else k_curve * steps
            h0 = traj["entropy"][0]
            low, high = band_limits(h0)
            bands[mix_name] = {"h0": h0, "low": low, "high": high, "solved_ceiling": ceiling}
            numbers = in_band_stats(traj["entropy"], low, high)
            numbers.update(
                {
                    "final_accuracy": traj["accuracy"][-1],
                    "final_entropy": traj["entropy"][-1],
                    f"final_pass@{pass_k}": traj[f"pass@{pass_k}"][-1],
                    "mean_k": sum(k_curve) / len(k_curve),
                    "final_k": k_curve[-1],
                }
            )
            runs[mix_name][arm.label] = {
                "numbers": numbers,
                "curves": {
                    "entropy": traj["entropy"],
                    "accuracy": traj["accuracy"],
                    "k": k_curve,
                    "zero_adv_frac": traj["zero_adv_frac"],
                },
            }
    summary: dict[str, Any] = {}
    for arm in arms:
        left = [m for m in mixes if not runs[m][arm.label]["numbers"]["stays_in_band"]]
        summary[arm.label] = {"in_band_on_every_mix": not left, "mixes_left": left}
    fixed = [a.label for a in arms if a.kcontrol is None and a.estimator.uses_k]
    adaptive = [a.label for a in arms if a.adaptive]
    good = [a for a in adaptive if summary[a]["in_band_on_every_mix"]]
    leaving = [a for a in fixed if not summary[a]["in_band_on_every_mix"]]
    summary["adaptive_in_band_everywhere"] = good
    summary["fixed_k_leaving_somewhere"] = leaving
    summary["goal_met"] = bool(good) and len(leaving) == len(fixed)
    return {
        "config": {
            "mixes": mixes,
            "arms": labels,
            "update": update,
            "steps": steps,
            "lr": lr,
            "prompts": prompts,
            "candidates": candidates,
            "group_size": group_size,
            "mode": mode,
            "seed": seed,
        },
        "band": bands,
        "runs": runs,
        "summary": summary,
    }


def sweep_table(result: Mapping[str, Any]) -> str:
    """Markdown table: per arm and mix, % of steps in band (exit step) / final accuracy."""
    mixes = list(result["runs"])
    arms = list(result["runs"][mixes[0]])
    head = "| arm | " + " | ".join(mixes) + " | in band on every mix |"
    lines = [head, "|" + "---|" * (len(mixes) + 2)]
    for arm in arms:
        cells = []
        for mix in mixes:
            n = result["runs"][mix][arm]["numbers"]
            exit_ = (
                "" if n["first_exit"] is None else f", exits {n['exit_side']} @{n['first_exit']}"
            )
            cells.append(f"{100 * n['frac_in_band']:.0f}%{exit_} / {n['final_accuracy']:.3f}")
        every = "yes" if result["summary"][arm]["in_band_on_every_mix"] else "no"
        lines.append(f"| {arm} | " + " | ".join(cells) + f" | {every} |")
    return "\n".join(lines)


_COLORS = {
    "K=0.2": "#08306b",
    "K=0.4": "#2171b5",
    "K=0.6": "#6baed6",
    "K=0.8": "#9ecae1",
    "grpo": "0.45",
    "entropy_band": "C3",
    "sparsity": "C2",
    "two_phase": "C1",
    "difficulty": "C4",
}


def plot_kcontrol_sweep(result: Mapping[str, Any], path: str | os.PathLike) -> Path:
    """Entropy / H0 with the band, K and accuracy per step: one column per mix."""
    from qae.lab.plots import _STYLE, plt

    mixes = list(result["runs"])
    cfg = result["config"]
    with plt.rc_context(_STYLE):
        fig, axes = plt.subplots(
            3, len(mixes), figsize=(5.2 * len(mixes), 11), layout="constrained", sharex=True
        )
        axes = axes.reshape(3, len(mixes))
        for j, mix in enumerate(mixes):
            band = result["band"][mix]
            h0 = band["h0"]
            ax_h, ax_k, ax_a = axes[:, j]
            ax_h.axhspan(band["low"] / h0, band["high"] / h0, color="C3", alpha=0.1,
                         label="band [0.75, 1.25] x H0")  # fmt: skip
            ax_h.axhline(band["solved_ceiling"] / h0, color="k", ls=":", lw=1.2,
                         label="max entropy at accuracy 1")  # fmt: skip
            for arm, run in result["runs"][mix].items():
                color = _COLORS.get(arm)
                adaptive = arm in ("entropy_band", "sparsity", "two_phase", "difficulty")
                style = {"color": color, "lw": 2.0 if adaptive else 1.3}
                style["ls"] = "-" if adaptive else "--"
                ent = run["curves"]["entropy"]
                ax_h.plot(range(len(ent)), [h / h0 for h in ent], label=arm, **style)
                k = run["curves"]["k"]
                if not all(math.isnan(x) for x in k):
                    ax_k.plot(range(len(k)), k, label=arm, **style)
                acc = run["curves"]["accuracy"]
                ax_a.plot(range(len(acc)), acc, label=arm, **style)
            ax_h.set_title(f"{mix}: mix {cfg['mixes'][mix]}\nH0 = {h0:.3f} nats")
            ax_h.set_ylabel("mean policy entropy / H0")
            ax_k.set_ylabel("K in use (mean over groups)")
            ax_k.set_ylim(0.0, 1.0)
            ax_a.set_ylabel("accuracy (mean success probability)")
            ax_a.set_xlabel("training step")
            ax_a.set_ylim(0.0, 1.0)
        axes[2, -1].legend(*axes[0, 0].get_legend_handles_labels(), loc="lower right", ncol=2)
        fig.suptitle(
            f"Entropy lab, {cfg['update']} update, {cfg['mode']} steps: P={cfg['prompts']}, "
            f"M={cfg['candidates']}, G={cfg['group_size']}, lr={cfg['lr']:g}"
        )
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, format="png", dpi=85, bbox_inches="tight")
        plt.close(fig)
        return path
