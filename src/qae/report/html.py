"""The report page: one self-contained HTML file (PNGs embedded as base64, inline CSS)."""

from __future__ import annotations

import base64
import html
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

from qae.report.runs import RunData
from qae.report.stats import Column, TableRow

__all__ = ["figure_html", "format_cell", "markdown_table", "write_html"]

_CSS = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1100px; color: #222; }
table { border-collapse: collapse; margin: 1em 0; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 0.3em 0.6em; text-align: right; }
th:first-child, td:first-child { text-align: left; }
th { background: #f2f2f2; }
img { max-width: 100%; border: 1px solid #eee; margin: 0.5em 0; }
.note { color: #8a4b00; }
code { background: #f6f6f6; padding: 0 0.2em; }
"""


def format_cell(mean: float, std: float, n: int | None = None, digits: int = 3) -> str:
    """``mean ± std`` over ``n`` seeds: ``-`` when no run logged the metric, the bare value
    when one seed did (one value has no spread)."""
    if not math.isfinite(mean):
        return "-"
    if n is not None and n < 2:
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} \u00b1 {std:.{digits}f}"


def figure_html(stem: str, path: str | os.PathLike, title: str) -> str:
    """A heading (``title``, the figure's own title) and the PNG at ``path`` inlined as a
    ``data:image/png`` URI; ``stem`` is the anchor."""
    data = base64.b64encode(Path(path).read_bytes()).decode("ascii")
    stem, title = html.escape(stem), html.escape(title)
    return f'<h3 id="{stem}">{title}</h3><img alt="{title}" src="data:image/png;base64,{data}">'


def _first_steps(row: TableRow) -> str:
    reached = [s for s in row.first_steps if s is not None]
    per_seed = ", ".join("never" if s is None else str(s) for s in row.first_steps)
    if not reached:
        return f"never ({per_seed})"
    mean = sum(reached) / len(reached)
    return f"{len(reached)}/{len(row.first_steps)} runs, mean {mean:.0f} ({per_seed})"


def _header(columns: Sequence[Column], target: float, target_metric: str, window: int) -> list[str]:
    return (
        ["configuration", "seeds (finished)"]
        + [c.label for c in columns]
        + [f"first step with {target_metric} \u2265 {target:g} ({window}-step mean)"]
    )


def _value_cell(row: TableRow, column: Column) -> str:
    """One cell; a ``last`` value taken before a run's planned end names its step(s)."""
    mean, std, _ = row.cells[column.key]
    text = format_cell(mean, std, row.finite(column.key))
    steps = row.steps.get(column.key, [])
    early = sorted(
        {s for s, end in zip(steps, row.end_steps, strict=False) if s is not None and s < end}
    )
    if column.how == "last" and early and math.isfinite(mean):
        text += f" (from step {', '.join(map(str, early))})"
    return text


def _cells(row: TableRow, columns: Sequence[Column]) -> list[str]:
    seeds = ",".join("?" if s is None else str(s) for s in row.seeds)
    return (
        [row.name, f"{seeds} ({row.finished}/{len(row.seeds)})"]
        + [_value_cell(row, c) for c in columns]
        + [_first_steps(row)]
    )


def markdown_table(
    columns: Sequence[Column],
    rows: Sequence[TableRow],
    *,
    target: float,
    target_metric: str,
    window: int,
) -> str:
    """The final table as GitHub Markdown (mean ± sample std over seeds; a value alone when
    one seed logged it; ``(from step S)`` after a final value logged before a run's end)."""
    head = _header(columns, target, target_metric, window)
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        lines.append("| " + " | ".join(_cells(row, columns)) + " |")
    return "\n".join(lines) + "\n"


def write_html(
    path: str | os.PathLike,
    *,
    title: str,
    figures: Mapping[str, Path],
    columns: Sequence[Column],
    rows: Sequence[TableRow],
    runs: Sequence[RunData],
    target: float,
    target_metric: str,
    window: int,
    notes: Sequence[str] = (),
    intro: str = "",
    sections: Sequence[str] = (),
    titles: Mapping[str, str] | None = None,
) -> Path:
    """Write the report page; every figure is inlined as a ``data:image/png`` URI under its
    title (``titles[stem]``, else the stem). ``sections`` are extra HTML fragments placed
    after the figures."""
    esc = html.escape
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{esc(title)}</title><style>{_CSS}</style></head><body>",
        f"<h1>{esc(title)}</h1>",
    ]
    if intro:
        parts.append(f"<p>{esc(intro)}</p>")
    for note in notes:
        parts.append(f'<p class="note">{esc(note)}</p>')
    parts.append("<h2>Final table</h2>")
    parts.append(
        "<p>Each cell is the mean \u00b1 sample standard deviation over seeds; a value "
        "without \u00b1 comes from a single seed. &ldquo;Final&rdquo; is a run's last "
        "validation, and &ldquo;(from step S)&rdquo; marks one taken before the run's "
        "planned end; &ldquo;last N&rdquo; averages a run's last N logged steps before "
        "taking the mean over seeds.</p>"
    )
    head = _header(columns, target, target_metric, window)
    parts.append("<table><tr>" + "".join(f"<th>{esc(h)}</th>" for h in head) + "</tr>")
    for row in rows:
        parts.append("<tr>" + "".join(f"<td>{esc(c)}</td>" for c in _cells(row, columns)) + "</tr>")
    parts.append("</table>")
    parts.append("<h2>Figures</h2>")
    for stem, fig in figures.items():
        parts.append(figure_html(stem, fig, (titles or {}).get(stem, stem)))
    parts.extend(s for s in sections if s)
    parts.append("<h2>Runs</h2><table><tr><th>configuration</th><th>seed</th><th>last step</th>"
                 "<th>planned steps</th><th>source</th><th>directory</th></tr>")  # fmt: skip
    for r in runs:
        parts.append(
            "<tr>"
            + "".join(
                f"<td>{esc(str(v))}</td>"
                for v in (
                    r.name,
                    "?" if r.seed is None else r.seed,
                    r.last_step,
                    r.planned_steps if r.planned_steps is not None else "?",
                    r.source,
                    r.path,
                )
            )
            + "</tr>"
        )
    parts.append("</table></body></html>")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(parts) + "\n")
    return path
