"""Figures: one PNG per quantity, each a mean curve with a +-1 std band over seeds.

Rendered with matplotlib's Agg backend (no display needed). Colours are fixed per
configuration across every figure, so a configuration reads the same everywhere.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from qae.report.runs import RunData
from qae.report.stats import aggregate, pass_k_key

__all__ = ["FIGURES", "FigureSpec", "figure_titles", "make_figures"]


@dataclass(frozen=True)
class FigureSpec:
    """One figure: file stem, title, y label and the metric(s) it shows (one panel each)."""

    stem: str
    title: str
    ylabel: str
    keys: tuple[str, ...]
    panel_titles: tuple[str, ...] = ()
    smoothed: bool = True
    """Apply the moving average (per-step training metrics); validation curves are not."""
    ylim: tuple[float, float] | None = None
    """Bounds the y axis may not pass (fractions); the axis zooms on the data inside them.
    Without it, the axis starts at ``ymin`` when set."""
    ymin: float | None = None


FIGURES = (
    FigureSpec("entropy", "Policy entropy on training rollouts", "entropy (nats / token)",
               ("actor/entropy",), ymin=0.0),
    FigureSpec("val_pass1", "Held-out pass@1", "pass@1 (fraction of prompts)", ("val/pass@1",),
               smoothed=False, ylim=(0.0, 1.0)),
    FigureSpec("val_passk", "Held-out pass@k", "pass@k (fraction of prompts)", ("val/pass@k",),
               smoothed=False, ylim=(0.0, 1.0)),
    FigureSpec("train_accuracy", "Training accuracy (all sampled responses, before filtering)",
               "accuracy (fraction correct)", ("rollout/accuracy_all",), ylim=(0.0, 1.0)),
    FigureSpec("response_length", "Mean response length on training rollouts",
               "response length (tokens)", ("response/len_mean",), ymin=0.0),
    FigureSpec("zero_adv", "Fraction of responses with zero advantage",
               "zero-advantage fraction", ("adv/frac_zero_adv",), ylim=(0.0, 1.0)),
    FigureSpec("clipfrac", "PPO clip fractions (token share clipped)", "clipped fraction",
               ("train/clipfrac_low", "train/clipfrac_high"),
               ("low side: ratio < 1 - eps_low, A < 0", "high side: ratio > 1 + eps_high, A > 0"),
               ymin=0.0),
    FigureSpec("k", "Quantile level K of the QAE baseline (QAE runs only)", "K (batch mean)",
               ("adv/k",), ylim=(0.0, 1.0)),
)  # fmt: skip
"""The figures ``qae report`` draws (``val/pass@k`` becomes the largest logged k)."""


def _title(spec: FigureSpec, kkey: str | None) -> str:
    """The figure's title, ``pass@k`` named by the largest logged k (``kkey``)."""
    return spec.title.replace("pass@k", kkey.split("/", 1)[1]) if kkey else spec.title


def figure_titles(runs: Sequence[RunData], specs: Sequence[FigureSpec] = FIGURES) -> dict[str, str]:
    """File stem -> the title drawn on that figure (the report page's headings)."""
    kkey = pass_k_key(runs)
    return {spec.stem: _title(spec, kkey) for spec in specs}


def _colors(names: Sequence[str]) -> dict[str, str]:
    import matplotlib

    cmap = matplotlib.colormaps["tab10"]
    return {n: matplotlib.colors.to_hex(cmap(i % 10)) for i, n in enumerate(names)}


def make_figures(
    groups: Mapping[str, Sequence[RunData]],
    out: str | os.PathLike,
    *,
    window: int = 10,
    dpi: int = 110,
    specs: Sequence[FigureSpec] = FIGURES,
) -> dict[str, Path]:
    """Write one PNG per figure whose metrics some run logged; returns stem -> path.

    Each configuration is its mean over seeds (after a trailing ``window``-point moving
    average for per-step training metrics) with a shaded band of +-1 sample std.
    """
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    all_runs = [r for runs in groups.values() for r in runs]
    kkey = pass_k_key(all_runs)
    colors = _colors(list(groups))
    written: dict[str, Path] = {}
    for spec in specs:
        keys = tuple(kkey if k == "val/pass@k" else k for k in spec.keys)
        if any(k is None for k in keys):
            continue
        if not any(len(r.get(k)[0]) for r in all_runs for k in keys):
            continue
        n = len(keys)
        fig, axes = plt.subplots(1, n, figsize=(6.0 * n + 2.0, 4.4), squeeze=False)
        w = window if spec.smoothed else 1
        for i, key in enumerate(keys):
            ax = axes[0, i]
            for name, runs in groups.items():
                agg = aggregate(runs, key, w)
                if len(agg.steps) == 0:
                    continue
                seeds = len(runs)
                marker = "o" if len(agg.steps) <= 12 else None
                ax.plot(agg.steps, agg.mean, color=colors[name], lw=1.8, marker=marker, ms=4,
                        label=f"{name} (n={seeds})")  # fmt: skip
                ax.fill_between(agg.steps, agg.mean - agg.std, agg.mean + agg.std,
                                color=colors[name], alpha=0.18, lw=0)  # fmt: skip
            ax.set_xlabel("training step")
            ax.set_ylabel(spec.ylabel)
            if spec.ylim is not None:
                lo, hi = spec.ylim  # a clamp: zoom on the data, never past the range
                pad = 0.02 * (hi - lo)
                ymin, ymax = ax.get_ylim()
                ax.set_ylim(max(ymin, lo - pad), min(ymax, hi + pad))
            elif spec.ymin is not None:
                ymax = ax.get_ylim()[1]
                ax.set_ylim(spec.ymin, ymax if ymax > spec.ymin else spec.ymin + 1e-3)
            logged = [r.get(key)[1] for runs in groups.values() for r in runs]
            logged = np.concatenate(logged) if logged else np.zeros(0)
            if len(logged) and np.all(logged[~np.isnan(logged)] == 0):
                ax.set_ylim(-0.01, 0.05)  # lift the flat line off the axis and say so
                ax.text(0.5, 0.5, "every run logged exactly 0 at every step",
                        transform=ax.transAxes, ha="center", va="center", fontsize=10,
                        color="0.3")  # fmt: skip
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            if spec.panel_titles:
                ax.set_title(spec.panel_titles[i], fontsize=10)
            ax.grid(alpha=0.3)
            if i == n - 1:  # one legend, outside the axes, so it never hides a curve
                ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
        how = f"{window}-step trailing mean, " if w > 1 else ""
        title = _title(spec, kkey)
        fig.suptitle(f"{title}\nmean over seeds ({how}band = \u00b11 std over seeds)", fontsize=11)
        fig.tight_layout()
        path = out / f"{spec.stem}.png"
        fig.savefig(path, dpi=dpi)
        plt.close(fig)
        written[spec.stem] = path
    return written
