"""Figures of the four lab checks (matplotlib, Agg backend, PNG written atomically)."""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import matplotlib

from qae.io.atomic import atomic_write

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

__all__ = ["PLOTS", "plot_baseline", "plot_extremal", "plot_k_sweep", "plot_zero_fraction"]

_STYLE = {"font.size": 10, "axes.titlesize": 11, "legend.fontsize": 8, "axes.grid": True}


def _save(fig: Any, path: str | os.PathLike) -> Path:
    """Write ``fig`` to ``path`` as PNG through a temp file and a rename."""
    try:
        return atomic_write(
            path, lambda fh: fig.savefig(fh, format="png", dpi=120, bbox_inches="tight"),
            binary=True,
        )  # fmt: skip
    finally:
        plt.close(fig)


def plot_baseline(result: dict[str, Any], path: str | os.PathLike) -> Path:
    """Check 1: dH per unit step vs constant baseline b, and first-order error vs step size."""
    c, n = result["curves"], result["numbers"]
    with plt.rc_context(_STYLE):
        fig, axes = plt.subplots(1, 3, figsize=(16, 4.8), layout="constrained")
        styles = {"logit": ("C0", "-"), "pg": ("C2", "-"), "npg": ("C3", "-")}
        for ax, name in zip(axes[:2], ("hard", "easy"), strict=True):
            for upd, (color, ls) in styles.items():
                ax.plot(c["baseline"], c[f"{name}_{upd}_exact"], color=color, ls=ls, lw=2,
                        label=f"{upd}: exact")  # fmt: skip
                ax.plot(c["baseline"], c[f"{name}_{upd}_predicted"], color=color, ls="--",
                        lw=1.2, label=f"{upd}: first-order")  # fmt: skip
            p = n[f"{name}_success"]
            ax.axvline(p, color="0.4", ls=":", lw=1.2, label=f"mean baseline b = p = {p:.2f}")
            ax.axhline(0.0, color="0.7", lw=0.8)
            ax.set_xlabel("constant baseline b (reward units)")
            ax.set_ylabel("entropy change / lr (nats per unit lr)")
            ax.set_title(f"{name} prompt (success p = {p:.2f}), lr = {c['lrs'][-1]:g}")
            ax.legend(loc="best")
        ax = axes[2]
        for name, color in (("hard", "C1"), ("easy", "C4")):
            ax.loglog(c["lrs"], c[f"{name}_rel_error"], "o-", color=color, label=f"{name} prompt")
        ref = [c["hard_rel_error"][-1] * lr / c["lrs"][-1] for lr in c["lrs"]]
        ax.loglog(c["lrs"], ref, color="0.5", ls=":", label="slope 1 (error ~ lr)")
        ax.set_xlabel("learning rate lr (logit units per unit advantage)")
        ax.set_ylabel("max |exact - first-order| / max |exact|")
        ax.set_title(f"first-order error ({n['update']} update)")
        ax.legend(loc="best")
        fig.suptitle(f"Check 1: {result['claim']} -- {_word(result)}")
        return _save(fig, path)


def plot_extremal(result: dict[str, Any], path: str | os.PathLike) -> Path:
    """Check 2: where each baseline's dH sits in the range over b in [0, 1], per prompt."""
    c, n = result["curves"], result["numbers"]
    p = c["p"]
    lo, hi = c["dH_b0"], c["dH_b1"]

    def position(values: list[float]) -> list[float]:
        rows = zip(values, lo, hi, strict=True)
        return [(v - a) / (b - a) if b != a else math.nan for v, a, b in rows]

    with plt.rc_context(_STYLE):
        fig, axes = plt.subplots(1, 2, figsize=(13, 4.8), layout="constrained")
        ax = axes[0]
        ax.scatter(p, position(c["dH_quantile"]), s=14, color="C3", zorder=3,
                   label=f"quantile baseline b_K (K = {n['k']:g})")  # fmt: skip
        ax.scatter(p, position(c["dH_mean"]), s=12, color="C0", marker="x", zorder=3,
                   label="mean baseline b = p")  # fmt: skip
        ax.axvline(1 - n["k"], color="k", ls="--", lw=1, label=f"gate p = 1 - K = {1 - n['k']:g}")
        ax.set_xlabel("prompt success probability p")
        ax.set_ylabel("(dH(b) - dH(0)) / (dH(1) - dH(0))")
        ax.set_ylim(-0.05, 1.05)
        ax.set_title(
            f"position in the range of dH over b in [0, 1] (0 = min, 1 = max), lr = {n['lr']:g}"
        )
        ax.legend(loc="center left")
        ax = axes[1]
        pairs = zip(c["dH_expected_qae"], c["dH_expected_grpo"], strict=True)
        diff = [(a - b) / n["lr"] for a, b in pairs]
        ax.scatter(p, diff, s=12, color="C3", label=f"qae K = {n['k']:g} minus grpo")
        ax.axhline(0.0, color="0.5", lw=1)
        ax.axvline(1 - n["k"], color="k", ls="--", lw=1, label="gate p = 1 - K")
        ax.set_xlabel("prompt success probability p")
        ax.set_ylabel("dH(qae) - dH(grpo), per unit lr (nats)")
        ax.set_title(f"registered estimators, expected group step ({n['update']} update)")
        ax.legend(loc="best")
        fig.suptitle(f"Check 2: {result['claim']} -- {_word(result)}")
        return _save(fig, path)


def plot_k_sweep(result: dict[str, Any], path: str | os.PathLike) -> Path:
    """Check 3: entropy, accuracy, pass@k and zero-advantage fraction vs step per estimator."""
    runs, n = result["curves"], result["numbers"]
    first = next(iter(runs.values()))
    pass_key = next(k for k in first if k.startswith("pass@") and k != "pass@1")
    panels = [
        ("entropy", "mean policy entropy (nats)"),
        ("accuracy", "expected accuracy (pass@1)"),
        (pass_key, f"{pass_key} (closed form)"),
        ("zero_adv_frac", "zero-advantage fraction"),
    ]
    with plt.rc_context(_STYLE):
        fig, axes = plt.subplots(2, 2, figsize=(12, 8), layout="constrained")
        for ax, (key, label) in zip(axes.flat, panels, strict=True):
            for i, (name, run) in enumerate(runs.items()):
                ls = "-" if name.startswith("qae") else "--"
                ax.plot(range(len(run[key])), run[key], color=f"C{i}", ls=ls, lw=1.6, label=name)
            ax.set_xlabel("training step")
            ax.set_ylabel(label)
            ax.legend(loc="best")
        fig.suptitle(
            f"Check 3: {result['claim']} -- {_word(result)}\n"
            f"({n['update']} update, {n['mode']} steps, lr = {n['lr']:g})"
        )
        return _save(fig, path)


def plot_zero_fraction(result: dict[str, Any], path: str | os.PathLike) -> Path:
    """Check 4: zero-advantage fraction vs K, closed form against counting."""
    rows = result["numbers"]["rows"]
    qae = sorted((r["k"], r) for r in rows.values() if not math.isnan(r["k"]))
    with plt.rc_context(_STYLE):
        fig, ax = plt.subplots(figsize=(7.5, 4.6))
        ks = [k for k, _ in qae]
        ax.plot(ks, [r["closed_form"] for _, r in qae], "-", color="C3", lw=2,
                label="qae: closed form")  # fmt: skip
        ax.errorbar(ks, [r["counted"] for _, r in qae],
                    yerr=[2 * r["standard_error"] for _, r in qae], fmt="o", ms=4, color="k",
                    capsize=2, label="qae: counted on sampled groups (+-2 s.e.)")  # fmt: skip
        flat = [(name, r) for name, r in rows.items() if math.isnan(r["k"])]
        for i, (name, r) in enumerate(flat):
            ax.axhline(r["closed_form"], color=f"C{i}", ls="--",
                       label=f"{name}: closed form {r['closed_form']:.3f}, "
                       f"counted {r['counted']:.3f}")  # fmt: skip
        ax.set_xlabel("quantile level K")
        ax.set_ylabel("fraction of responses with advantage exactly 0")
        ax.set_ylim(0, 1)
        ax.legend(loc="lower center")
        g = result["numbers"]["group_size"]
        ax.set_title(f"Check 4: zero-advantage fraction (G = {g}) -- {_word(result)}")
        return _save(fig, path)


def _word(result: dict[str, Any]) -> str:
    return "holds" if result["verdict"] else "does not hold"


PLOTS = {
    "baseline": plot_baseline,
    "extremal": plot_extremal,
    "ksweep": plot_k_sweep,
    "zerofrac": plot_zero_fraction,
}
