"""``qae report``: figures, a final table and one self-contained HTML page from runs.

Reads run directories (``metrics.jsonl``; TensorBoard event files when ``tensorboard`` is
installed), groups them by configuration, and writes into ``--out``: one PNG per quantity
(mean over seeds with a +-1 std band), ``report.html`` (the PNGs inlined), ``table.md``
and ``summary.json`` (the table's numbers, per seed included), plus the entropy-diagnostics
panels of :mod:`qae.report.diagnostics` for runs that logged them. The grids of runs a
report compares are run by ``qae compare`` (:mod:`qae.report.compare`).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qae.report.diagnostics import (
    DIAGNOSTIC_FIGURES,
    diagnostics_html,
    diagnostics_summary,
    make_diagnostic_figures,
    run_tracking,
)
from qae.report.figures import FIGURES, FigureSpec, figure_titles, make_figures
from qae.report.html import markdown_table, write_html
from qae.report.runs import RunData, discover_runs, group_runs, load_run, tensorboard_available
from qae.report.stats import (
    Aggregate,
    Column,
    TableRow,
    aggregate,
    first_step_reaching,
    mean_std,
    smooth,
    summary_table,
)

__all__ = [
    "DIAGNOSTIC_FIGURES",
    "FIGURES",
    "Aggregate",
    "Column",
    "FigureSpec",
    "ReportResult",
    "RunData",
    "TableRow",
    "add_report_parser",
    "aggregate",
    "build_report",
    "diagnostics_html",
    "diagnostics_summary",
    "discover_runs",
    "figure_titles",
    "first_step_reaching",
    "group_runs",
    "load_run",
    "make_diagnostic_figures",
    "make_figures",
    "markdown_table",
    "mean_std",
    "run_tracking",
    "smooth",
    "summary_table",
    "tensorboard_available",
    "unfinished_note",
    "write_html",
]


@dataclass
class ReportResult:
    """What :func:`build_report` wrote and read."""

    out: Path
    html: Path
    figures: dict[str, Path]
    columns: list[Column]
    rows: list[TableRow]
    runs: list[RunData]
    notes: list[str] = field(default_factory=list)


def _finite(x: Any) -> Any:
    return x if not isinstance(x, float) or math.isfinite(x) else None


def unfinished_note(run: RunData, columns: Sequence[Column], tail: int) -> str:
    """What the table holds for a run that stopped before its planned last step: the step
    of each ``final`` value (its last validation, perhaps step 0, before any update) and
    the steps its ``last N`` columns average."""
    head = (
        f"{run.name} seed {run.seed}: at step {run.last_step} of {run.planned_steps} "
        f"(still running or stopped)"
    )
    finals: dict[int, list[str]] = {}
    for col in columns:
        step = run.final_step(col.key) if col.how == "last" else None
        if step is not None:
            finals.setdefault(step, []).append(col.label)
    parts = [
        f"its {' and '.join(labels)} {'is' if len(labels) == 1 else 'are'} from step {step}"
        + (", before any update" if step == 0 else "")
        for step, labels in sorted(finals.items())
    ]
    if any(col.how == "tail" for col in columns):
        parts.append(f"its 'last {tail}' columns average its last {tail} logged steps, up "
                     f"to step {run.last_step}")  # fmt: skip
    return "; ".join([head, *parts])


def build_report(
    paths: Sequence[str | os.PathLike],
    out: str | os.PathLike,
    *,
    target: float = 0.4,
    target_metric: str = "rollout/accuracy_all",
    window: int = 10,
    tail: int = 20,
    title: str = "qae report",
) -> ReportResult:
    """Read the runs under ``paths`` and write figures, ``report.html``, ``table.md`` and
    ``summary.json`` into ``out``."""
    notes: list[str] = []
    runs = discover_runs(paths, notes)
    if not runs:
        raise ValueError(f"no readable run under {', '.join(map(str, paths))}")
    if window < 1 or tail < 1:
        raise ValueError(f"window and tail must be >= 1, got window={window}, tail={tail}")
    groups = group_runs(runs)
    out = Path(out)
    figures = make_figures(groups, out, window=window)
    diag_figures, hist_chosen = make_diagnostic_figures(groups, out, window=window)
    diag_summary = diagnostics_summary(groups, tail=tail)
    for name, chosen in hist_chosen.items():
        diag_summary.setdefault(name, {})["entropy_hist"] = chosen
    columns, rows = summary_table(
        groups, target=target, target_metric=target_metric, window=window, tail=tail
    )
    notes.extend(unfinished_note(r, columns, tail) for r in runs if not r.finished)
    table = markdown_table(columns, rows, target=target, target_metric=target_metric, window=window)
    (out / "table.md").write_text(table)
    summary = {
        "created": time.strftime("%Y-%m-%d %H:%M:%S"),
        "target": target,
        "target_metric": target_metric,
        "window": window,
        "tail": tail,
        "columns": [{"key": c.key, "label": c.label, "how": c.how} for c in columns],
        "configs": [
            {
                "name": row.name,
                "seeds": row.seeds,
                "finished": row.finished,
                "first_step_to_target": row.first_steps,
                "cells": {
                    k: {
                        "mean": _finite(m),
                        "std": _finite(s) if row.finite(k) > 1 else None,
                        "per_seed": [_finite(v) for v in vals],
                        "per_seed_step": row.steps[k],
                    }
                    for k, (m, s, vals) in row.cells.items()
                },
            }
            for row in rows
        ],
        "figures": {k: p.name for k, p in figures.items()},
        "diagnostics": {
            "configs": diag_summary,
            "figures": {k: p.name for k, p in diag_figures.items()},
        },
        "notes": notes,
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    n_seeds = sorted({len(v) for v in groups.values()})
    intro = (
        f"{len(runs)} runs in {len(groups)} configurations "
        f"({'/'.join(map(str, n_seeds))} seeds each), read from {', '.join(map(str, paths))}."
    )
    html_path = write_html(
        out / "report.html",
        title=title,
        figures=figures,
        columns=columns,
        rows=rows,
        runs=runs,
        target=target,
        target_metric=target_metric,
        window=window,
        notes=notes,
        intro=intro,
        sections=[diagnostics_html(diag_figures, diag_summary, tail)],
        titles=figure_titles(runs),
    )
    all_figures = {**figures, **diag_figures}
    return ReportResult(out, html_path, all_figures, columns, rows, runs, notes)


def _report(args: argparse.Namespace) -> int:
    result = build_report(
        args.runs,
        args.out,
        target=args.target,
        target_metric=args.target_metric,
        window=args.window,
        tail=args.tail,
        title=args.title,
    )
    for note in result.notes:
        print(f"note: {note}")
    print(markdown_table(result.columns, result.rows, target=args.target,
                         target_metric=args.target_metric, window=args.window), end="")  # fmt: skip
    print(f"figures: {', '.join(p.name for p in result.figures.values())}")
    print(f"report: {result.html}")
    if args.stability:
        from qae.report.stability import build_stability

        stab = build_stability(args.runs, args.out)
        for note in stab.notes:
            print(f"note: {note}")
        print(stab.table, end="")
        print(f"stability: {', '.join(p.name for p in stab.files.values())}")
    return 0


def add_report_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``report`` sub-command to an argparse ``subparsers`` object."""
    p = subparsers.add_parser(
        "report",
        help="figures, a final table and an HTML page from run directories",
        description="Read runs (metrics.jsonl; TensorBoard events when tensorboard is "
        "installed) from run directories, qae compare directories or folders of runs; group "
        "them by configuration; write one PNG per quantity (mean over seeds, band = +-1 std), "
        "table.md, summary.json and a self-contained report.html into --out.",
    )
    p.add_argument("runs", nargs="+", metavar="RUN_DIR", help="run or comparison directories")
    p.add_argument("--out", default="report", help="output directory (created)")
    p.add_argument(
        "--target", type=float, default=0.4, help="accuracy whose first crossing is reported"
    )
    p.add_argument(
        "--target-metric",
        default="rollout/accuracy_all",
        help="metric compared with --target (e.g. val/pass@1)",
    )
    p.add_argument(
        "--window", type=int, default=10, help="trailing moving-average window of training curves"
    )
    p.add_argument(
        "--tail", type=int, default=20, help="last N logged steps averaged for the table"
    )
    p.add_argument("--title", default="qae report", help="page title")
    p.add_argument(
        "--stability",
        action="store_true",
        help="also write the learning-rate stability map (estimator x optim.lr: seeds stable "
        "by the entropy verdict, final pass@1): stability.md/.json/_map.png/_entropy.png",
    )
    p.set_defaults(func=_report)
    return p
