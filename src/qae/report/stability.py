"""Learning-rate stability map: which estimator stays stable at which learning rate.

Every run gets two verdicts: :func:`qae.core.diagnostics.entropy_verdict` (the one definition of
entropy collapse and explosion) on its sampling entropy ``rollout/entropy`` (measured on
every generated response at every step; runs that predate it fall back to
``actor/entropy``, which steps without an update do not log), and
:func:`qae.core.diagnostics.reward_verdict` on its training accuracy ``rollout/accuracy_all``.
Also its final and best held-out pass@1 and the step where pass@1 peaked. Runs are placed
by estimator (mean baseline, QAE at a constant K, or QAE under a K controller, read from
the run's ``config.yaml``) and learning rate (``optim.lr``); a cell of the map holds the
fraction of its seeds that stayed stable, how many kept their reward, and the mean final
pass@1 with its sample std.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from qae.core.diagnostics import (
    COLLAPSE_RATIO,
    EXPLOSION_RATIO,
    REWARD_COLLAPSE_RATIO,
    VERDICT_WINDOW,
    entropy_verdict,
    reward_verdict,
)
from qae.report.runs import RunData, discover_runs
from qae.report.stats import fisher_exact, mean_std

__all__ = [
    "RunStability",
    "StabilityCell",
    "StabilityResult",
    "build_stability",
    "collapse_table",
    "estimator_label",
    "peak_table",
    "plot_entropy_grid",
    "plot_stability_map",
    "run_stability",
    "significance_table",
    "stability_map",
    "stability_table",
    "stable_lr_limit",
]

ENTROPY_KEYS = ("rollout/entropy", "actor/entropy")
"""Entropy series the verdict reads, first one a run logged wins."""
ACCURACY_KEY = "rollout/accuracy_all"
PASS1_KEY = "val/pass@1"


def estimator_label(config: Mapping[str, Any], name: str = "") -> str:
    """``dapo-mean`` (any non-QAE baseline is named by its estimator), ``qae-k<K>`` for a
    constant K, ``qae-<kind>`` for a K controller. Without a config, the run name's part
    before ``_lr`` (the ``stability`` grid's naming)."""
    algo = config.get("algo") or {}
    estimator = algo.get("estimator")
    if estimator is None:
        if not name:
            raise ValueError("a run needs a config.yaml or a name to place it on the map")
        return name.rsplit("_lr", 1)[0]
    if estimator == "grpo":
        return "dapo-mean"
    if estimator != "qae":
        return str(estimator)
    kc = config.get("kcontrol") or {}
    kind = kc.get("kind", "constant")
    if kind == "constant":
        return f"qae-k{float(kc.get('k', 0.4)):g}"
    return "qae-adaptive" if kind == "entropy_band" else f"qae-{kind}"


def _lr_of(run: RunData) -> float:
    try:
        return float(run.config["optim"]["lr"])
    except (KeyError, TypeError, ValueError):
        pass
    if "_lr" in run.name:
        try:
            return float(run.name.rsplit("_lr", 1)[1])
        except ValueError:
            pass
    raise ValueError(f"run {run.path}: no optim.lr in its config.yaml and none in its name")


@dataclass
class RunStability:
    """One run's place on the map and what it did."""

    name: str
    seed: int | None
    estimator: str
    lr: float
    verdict: str
    """``stable``, ``collapsed`` or ``exploded`` (:func:`qae.core.diagnostics.entropy_verdict`)."""
    verdict_step: int
    """Training step where the sustained window began (-1 when stable)."""
    reward: str
    """``held`` or ``collapsed`` (:func:`qae.core.diagnostics.reward_verdict`); ``-`` when the
    run logged no training accuracy or started at 0."""
    reward_step: int
    """Training step where the reward's sustained window began (-1 when it held)."""
    final_pass1: float
    best_pass1: float
    best_step: int
    """Step of the first evaluation reaching ``best_pass1`` (-1 without evaluations)."""
    last_step: int
    entropy_key: str = ENTROPY_KEYS[0]
    entropy_steps: list[int] = field(default_factory=list)
    entropy: list[float] = field(default_factory=list)


def _finite(run: RunData, key: str) -> tuple[np.ndarray, np.ndarray]:
    steps, values = run.get(key)  # [N], [N]
    keep = np.isfinite(values)
    return steps[keep], values[keep]


def entropy_series(run: RunData) -> tuple[str, np.ndarray, np.ndarray]:
    """``(key, steps [N], entropy [N])``: the first of :data:`ENTROPY_KEYS` the run logged
    finite values of (empty arrays and the first key when none)."""
    for key in ENTROPY_KEYS:
        steps, ent = _finite(run, key)
        if len(ent):
            return key, steps, ent
    return ENTROPY_KEYS[0], *_finite(run, ENTROPY_KEYS[0])


def _reward(run: RunData) -> tuple[str, int]:
    steps, acc = _finite(run, ACCURACY_KEY)
    if not len(acc) or not acc[0] > 0:
        return "-", -1
    v = reward_verdict(acc.tolist())
    start = int(v["step"])
    return str(v["verdict"]), int(steps[start]) if start >= 0 else -1


def run_stability(run: RunData) -> RunStability:
    """Verdicts, final / best held-out pass@1 and the peak's step of one run."""
    key, steps, ent = entropy_series(run)
    if len(ent) == 0:
        raise ValueError(f"run {run.path}: no finite {' or '.join(ENTROPY_KEYS)} to judge")
    verdict = entropy_verdict(ent.tolist())
    start = int(verdict["step"])
    reward, reward_step = _reward(run)
    vsteps, vals = run.get(PASS1_KEY)  # [E], [E]
    keep = np.isfinite(vals)
    vsteps, vals = vsteps[keep], vals[keep]
    if len(vals):
        best_i = int(np.argmax(vals))  # first maximum
        final, best, best_step = float(vals[-1]), float(vals[best_i]), int(vsteps[best_i])
    else:
        final = best = math.nan
        best_step = -1
    return RunStability(
        name=run.name,
        seed=run.seed,
        estimator=estimator_label(run.config, run.name),
        lr=_lr_of(run),
        verdict=str(verdict["verdict"]),
        verdict_step=int(steps[start]) if start >= 0 else -1,
        reward=reward,
        reward_step=reward_step,
        final_pass1=final,
        best_pass1=best,
        best_step=best_step,
        last_step=run.last_step,
        entropy_key=key,
        entropy_steps=[int(s) for s in steps],
        entropy=[float(v) for v in ent],
    )


@dataclass
class StabilityCell:
    """One (estimator, lr) cell over its seeds."""

    estimator: str
    lr: float
    seeds: list[int | None]
    n_stable: int
    n_collapsed: int
    n_exploded: int
    n_reward_held: int
    """Seeds whose training accuracy held (:func:`qae.core.diagnostics.reward_verdict`)."""
    n_reward_judged: int
    """Seeds with a reward verdict (runs that logged training accuracy)."""
    n_stable_and_held: int
    """Seeds stable by entropy whose reward held too (or had no reward verdict)."""
    final_mean: float
    final_std: float
    best_mean: float
    best_std: float
    best_step_mean: float
    verdict_steps: list[int] = field(default_factory=list)
    """Per seed (in ``seeds`` order), the step where the entropy left its band for good
    (the verdict's window start); -1 for a stable seed."""

    @property
    def n(self) -> int:
        return len(self.seeds)

    @property
    def frac_stable(self) -> float:
        return self.n_stable / self.n if self.n else math.nan


_ORDER = ("dapo-mean", "qae-k0.2", "qae-k0.4", "qae-k0.6", "qae-k0.8", "qae-adaptive")


def _estimator_order(names: Sequence[str]) -> list[str]:
    known = [n for n in _ORDER if n in names]
    return known + sorted(n for n in set(names) if n not in _ORDER)


def stability_map(records: Sequence[RunStability]) -> list[StabilityCell]:
    """Cells in estimator order (mean baseline first), each estimator's lrs ascending."""
    cells: dict[tuple[str, float], list[RunStability]] = {}
    for r in records:
        cells.setdefault((r.estimator, r.lr), []).append(r)
    out = []
    for est in _estimator_order([e for e, _ in cells]):
        for lr in sorted(lr for e, lr in cells if e == est):
            rs = sorted(cells[(est, lr)], key=lambda r: (r.seed is None, r.seed or 0))
            fm, fs = mean_std([r.final_pass1 for r in rs])
            bm, bs = mean_std([r.best_pass1 for r in rs])
            peaks = [r.best_step for r in rs if r.best_step >= 0]
            out.append(
                StabilityCell(
                    estimator=est,
                    lr=lr,
                    seeds=[r.seed for r in rs],
                    n_stable=sum(r.verdict == "stable" for r in rs),
                    n_collapsed=sum(r.verdict == "collapsed" for r in rs),
                    n_exploded=sum(r.verdict == "exploded" for r in rs),
                    n_reward_held=sum(r.reward == "held" for r in rs),
                    n_reward_judged=sum(r.reward != "-" for r in rs),
                    n_stable_and_held=sum(r.verdict == "stable" and r.reward != "lost" for r in rs),
                    final_mean=fm,
                    final_std=fs,
                    best_mean=bm,
                    best_std=bs,
                    best_step_mean=float(np.mean(peaks)) if peaks else math.nan,
                    verdict_steps=[r.verdict_step for r in rs],
                )
            )
    return out


def stable_lr_limit(
    cells: Sequence[StabilityCell], estimator: str, by: str = "entropy"
) -> float | None:
    """Largest lr up to which every cell of ``estimator`` (from the smallest lr on) had all
    its seeds stable; None when even the smallest lr lost a seed. ``by``: ``entropy`` (the
    entropy verdict), ``reward`` (every judged seed's reward held; a run that logged no
    training accuracy has no reward verdict and does not count) or ``both``."""
    if by not in ("entropy", "reward", "both"):
        raise ValueError(f"by must be entropy, reward or both, got by={by!r}")
    limit = None
    for c in sorted((c for c in cells if c.estimator == estimator), key=lambda c: c.lr):
        ok_entropy = c.n_stable == c.n
        ok_reward = c.n_reward_held == c.n_reward_judged  # unjudged seeds: nothing lost
        ok = {"entropy": ok_entropy, "reward": ok_reward, "both": ok_entropy and ok_reward}
        if not ok[by]:
            break
        limit = c.lr
    return limit


def _pm(mean: float, std: float) -> str:
    return "-" if not math.isfinite(mean) else f"{mean:.3f} \u00b1 {std:.3f}"


def _limit(cells: Sequence[StabilityCell], est: str, by: str) -> str:
    limit = stable_lr_limit(cells, est, by)
    return "none" if limit is None else f"{limit:g}"


def _grid_table(
    cells: Sequence[StabilityCell],
    cell_text: Callable[[StabilityCell], str],
    extra: Sequence[tuple[str, Callable[[str], str]]] = (),
) -> str:
    """Markdown, one row per estimator and one column per lr (``-`` for a missing cell),
    then one column per ``extra`` (header, estimator -> text)."""
    ests = list(dict.fromkeys(c.estimator for c in cells))
    lrs = sorted({c.lr for c in cells})
    by = {(c.estimator, c.lr): c for c in cells}
    heads = [f"lr {lr:g}" for lr in lrs] + [h for h, _ in extra]
    lines = ["| estimator | " + " | ".join(heads) + " |", "|---|" + "---|" * len(heads)]
    for est in ests:
        row = [cell_text(by[(est, lr)]) if (est, lr) in by else "-" for lr in lrs]
        row += [fn(est) for _, fn in extra]
        lines.append(f"| {est} | " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


def _stability_text(c: StabilityCell) -> str:
    bad = []
    if c.n_collapsed:
        bad.append(f"{c.n_collapsed} collapsed")
    if c.n_exploded:
        bad.append(f"{c.n_exploded} exploded")
    how = f" ({', '.join(bad)})" if bad else ""
    held = f"reward {c.n_reward_held}/{c.n_reward_judged} held \u00b7 " if c.n_reward_judged else ""
    return f"{c.n_stable}/{c.n} stable{how} \u00b7 {held}{_pm(c.final_mean, c.final_std)}"


def stability_table(cells: Sequence[StabilityCell]) -> str:
    """Markdown: one row per estimator, one column per lr; a cell reads
    ``stable/seeds (C collapsed, E exploded) · reward held/seeds · final pass@1 mean ±
    std``; the last two columns give the largest lr up to which every seed was stable by
    entropy, and by entropy and reward together."""
    return _grid_table(
        cells,
        _stability_text,
        [
            ("stable up to (entropy)", lambda est: _limit(cells, est, "entropy")),
            ("stable up to (entropy and reward)", lambda est: _limit(cells, est, "both")),
        ],
    )


def significance_table(cells: Sequence[StabilityCell], reference: str = "dapo-mean") -> str:
    """Markdown: at each lr, every other estimator against ``reference`` (the mean
    baseline): seeds stable by entropy, and stable with the reward held, as counts with the
    two-sided p-value of Fisher's exact test (:func:`qae.report.stats.fisher_exact`). Empty
    when ``reference`` has no cell."""
    by = {(c.estimator, c.lr): c for c in cells}
    rows = []
    for c in cells:
        ref = by.get((reference, c.lr))
        if c.estimator == reference or ref is None:
            continue
        ent = fisher_exact(c.n_stable, c.n, ref.n_stable, ref.n)
        both = fisher_exact(c.n_stable_and_held, c.n, ref.n_stable_and_held, ref.n)
        rows.append(
            f"| {c.lr:g} | {c.estimator} | {c.n_stable}/{c.n} vs {ref.n_stable}/{ref.n} "
            f"| {ent:.3f} | {c.n_stable_and_held}/{c.n} vs {ref.n_stable_and_held}/{ref.n} "
            f"| {both:.3f} |"
        )
    if not rows:
        return ""
    head = (
        f"| lr | estimator | stable (entropy) vs {reference} | p | stable and reward held vs "
        f"{reference} | p |\n|---|---|---|---|---|---|\n"
    )
    return head + "\n".join(sorted(rows, key=lambda r: float(r.split("|")[1]))) + "\n"


def _peak_text(c: StabilityCell) -> str:
    peak = f" \u00b7 peak at step {c.best_step_mean:.0f}" if math.isfinite(c.best_step_mean) else ""
    return _pm(c.best_mean, c.best_std) + peak


def peak_table(cells: Sequence[StabilityCell]) -> str:
    """Markdown, same layout as :func:`stability_table`: a cell reads ``best held-out
    pass@1 mean ± std · peak at step S`` (S: mean over seeds of the first step reaching
    each seed's best)."""
    return _grid_table(cells, _peak_text)


def collapse_table(cells: Sequence[StabilityCell]) -> str:
    """Markdown, same layout as :func:`stability_table`: per cell, the step at which each
    seed's entropy verdict fired (``-`` for a stable seed), in seed order. How long a
    baseline holds out at a learning rate where every baseline eventually fails."""
    return _grid_table(
        cells, lambda c: ", ".join("-" if v < 0 else str(v) for v in c.verdict_steps)
    )


def _mpl():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def plot_stability_map(
    cells: Sequence[StabilityCell], path: str | os.PathLike, *, dpi: int = 110
) -> Path:
    """Heat map, estimator x lr: colour = fraction of seeds stable; text = stable/seeds and
    final pass@1 mean ± std."""
    plt = _mpl()
    ests = list(dict.fromkeys(c.estimator for c in cells))
    lrs = sorted({c.lr for c in cells})
    grid = np.full((len(ests), len(lrs)), np.nan)  # [E, L]
    by = {(c.estimator, c.lr): c for c in cells}
    for i, e in enumerate(ests):
        for j, lr in enumerate(lrs):
            if (e, lr) in by:
                grid[i, j] = by[(e, lr)].frac_stable
    fig, ax = plt.subplots(figsize=(2.0 * len(lrs) + 2.6, 0.9 * len(ests) + 1.8))
    im = ax.imshow(grid, cmap="RdYlGn", vmin=0.0, vmax=1.0, aspect="auto")
    for i, e in enumerate(ests):
        for j, lr in enumerate(lrs):
            c = by.get((e, lr))
            if c is None:
                continue
            text = f"{c.n_stable}/{c.n} stable\n"
            if c.n_reward_judged:
                text += f"reward {c.n_reward_held}/{c.n_reward_judged} held\n"
            text += _pm(c.final_mean, c.final_std)
            ax.text(j, i, text, ha="center", va="center", fontsize=9)
    ax.set_xticks(range(len(lrs)), [f"{lr:g}" for lr in lrs])
    ax.set_yticks(range(len(ests)), ests)
    ax.set_xlabel("learning rate (optim.lr)")
    cbar = fig.colorbar(im, ax=ax, fraction=0.04)
    cbar.set_label("fraction of seeds stable")
    ax.set_title(
        "Stability map: seeds stable / seeds, seeds whose reward held, final held-out "
        "pass@1 (mean \u00b1 std)\n"
        f"unstable = entropy < {COLLAPSE_RATIO:g}x or > {EXPLOSION_RATIO:g}x its first value "
        f"for {VERDICT_WINDOW} consecutive steps; reward lost = training accuracy averaged "
        f"over {VERDICT_WINDOW} steps < {REWARD_COLLAPSE_RATIO:g}x its first value",
        fontsize=10,
    )
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return path


_VERDICT_COLOR = {"stable": "tab:green", "collapsed": "tab:blue", "exploded": "tab:red"}


def plot_entropy_grid(
    records: Sequence[RunStability], path: str | os.PathLike, *, dpi: int = 90
) -> Path:
    """One panel per (estimator, lr): each seed's entropy / first entropy, coloured by its
    verdict, with the collapse and explosion thresholds dashed."""
    plt = _mpl()
    cells = stability_map(records)
    ests = list(dict.fromkeys(c.estimator for c in cells))
    lrs = sorted({c.lr for c in cells})
    fig, axes = plt.subplots(
        len(ests), len(lrs), figsize=(2.6 * len(lrs) + 0.8, 1.9 * len(ests) + 1.0),
        sharex=True, sharey=True, squeeze=False,
    )  # fmt: skip
    top = max([EXPLOSION_RATIO * 1.25] + [max(r.entropy) / r.entropy[0] for r in records])
    for i, e in enumerate(ests):
        for j, lr in enumerate(lrs):
            ax = axes[i, j]
            for r in (r for r in records if r.estimator == e and r.lr == lr):
                ratio = np.asarray(r.entropy) / r.entropy[0]
                ax.plot(r.entropy_steps, ratio, color=_VERDICT_COLOR.get(r.verdict, "0.4"),
                        lw=1.0, alpha=0.8)  # fmt: skip
            for y in (COLLAPSE_RATIO, EXPLOSION_RATIO):
                ax.axhline(y, color="0.3", ls="--", lw=0.8)
            ax.set_ylim(0.0, min(top, 4.0))
            ax.grid(alpha=0.3)
            if i == 0:
                ax.set_title(f"lr {lr:g}", fontsize=10)
            if j == 0:
                ax.set_ylabel(f"{e}\nH / H(first)", fontsize=9)
            if i == len(ests) - 1:
                ax.set_xlabel("training step", fontsize=9)
    handles = [plt.Line2D([], [], color=c, lw=2) for c in _VERDICT_COLOR.values()]
    keys = sorted({r.entropy_key for r in records})
    gaps = "; straight segments: steps with no update" if "actor/entropy" in keys else ""
    fig.suptitle(
        f"{' / '.join(keys)} over its first value per cell (one line per seed; dashed: "
        f"{COLLAPSE_RATIO:g}x and {EXPLOSION_RATIO:g}x{gaps})",
        fontsize=10,
        y=0.995,
    )
    fig.legend(handles, list(_VERDICT_COLOR), loc="upper center", ncol=3, fontsize=9,
               bbox_to_anchor=(0.5, 0.965))  # fmt: skip
    fig.tight_layout(rect=(0, 0, 1, 0.93))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return path


def _json_safe(x: Any) -> Any:
    """NaN / inf become None (JSON has no NaN), recursively."""
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, Mapping):
        return {k: _json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_json_safe(v) for v in x]
    return x


@dataclass
class StabilityResult:
    """What :func:`build_stability` computed and wrote."""

    records: list[RunStability]
    cells: list[StabilityCell]
    table: str
    files: dict[str, Path]
    notes: list[str]


def build_stability(paths: Sequence[str | os.PathLike], out: str | os.PathLike) -> StabilityResult:
    """Read the runs under ``paths``; write ``stability.md``, ``stability.json``,
    ``stability_map.png`` and ``stability_entropy.png`` into ``out``."""
    notes: list[str] = []
    runs = discover_runs(paths, notes)
    records = []
    for run in runs:
        if not len(entropy_series(run)[1]):
            notes.append(f"{run.path}: no {' or '.join(ENTROPY_KEYS)} logged yet; left off the map")
            continue
        if not run.finished:
            notes.append(
                f"{run.name} seed {run.seed}: at step {run.last_step} of {run.planned_steps}; "
                f"judged on the steps it has"
            )
        records.append(run_stability(run))
    if not records:
        raise ValueError(
            f"no run with {' or '.join(ENTROPY_KEYS)} under {', '.join(map(str, paths))}"
        )
    cells = stability_map(records)
    table = (
        stability_table(cells)
        + "\nBest held-out pass@1 and where it peaked:\n\n"
        + peak_table(cells)
        + "\nStep at which each seed's entropy verdict fired (- stable), seeds in order:\n\n"
        + collapse_table(cells)
    )
    sig = significance_table(cells)
    if sig:
        table += (
            "\nAgainst the mean baseline, two-sided Fisher's exact test on the seed counts "
            "(p < 0.05: a difference the seeds can show):\n\n" + sig
        )
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "stability.md").write_text(table)
    files = {
        "map": plot_stability_map(cells, out / "stability_map.png"),
        "entropy": plot_entropy_grid(records, out / "stability_entropy.png"),
        "table": out / "stability.md",
        "json": out / "stability.json",
    }
    data = {
        "created": time.strftime("%Y-%m-%d %H:%M:%S"),
        "definition": {
            "collapse_ratio": COLLAPSE_RATIO,
            "explosion_ratio": EXPLOSION_RATIO,
            "window": VERDICT_WINDOW,
            "reward_collapse_ratio": REWARD_COLLAPSE_RATIO,
            "entropy_keys": list(ENTROPY_KEYS),
            "accuracy_key": ACCURACY_KEY,
        },
        "cells": [{**asdict(c), "n": c.n, "frac_stable": c.frac_stable} for c in cells],
        "stable_lr_limit": {
            by: {
                e: stable_lr_limit(cells, e, by) for e in dict.fromkeys(c.estimator for c in cells)
            }
            for by in ("entropy", "reward", "both")
        },
        "runs": [
            {k: v for k, v in asdict(r).items() if k not in ("entropy", "entropy_steps")}
            for r in records
        ],
        "notes": notes,
    }
    (out / "stability.json").write_text(json.dumps(_json_safe(data), indent=1) + "\n")
    return StabilityResult(records, cells, table, files, notes)
