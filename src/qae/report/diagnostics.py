"""Entropy-diagnostics panels of ``qae report``: why a run's entropy moved.

Reads what the trainer logs (``entropy/cov_*``, ``entropy/measured_change``, ``tokens/*``,
``response/len_volatility``) and the token-entropy histograms in ``<run>/entropy_hist/``.
Every panel is skipped when no run logged its metrics. The panels:

- attribution of the first-order entropy change ``dH ~ -lr * Cov(log pi, A)`` by advantage
  sign (pos / neg / zero) and by group regime (hard / easy / other), over steps;
- predicted (``-Cov`` of step ``t-1``) against measured (``H(t) - H(t-1)``) entropy change,
  with the correlation and sign agreement over the whole run
  (:func:`qae.core.diagnostics.tracking`);
- token views: entropy of the tokens with a non-zero advantage against all tokens, and the
  share of the policy-gradient norm carried by the top 20% highest-entropy tokens;
- token-entropy histograms at a few steps;
- response-length volatility.
"""

from __future__ import annotations

import html
import json
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from qae.core.diagnostics import tracking
from qae.report.figures import FigureSpec, figure_titles, make_figures
from qae.report.runs import RunData
from qae.report.stats import aggregate, tail_mean

__all__ = [
    "DIAGNOSTIC_FIGURES",
    "choose_steps",
    "diagnostics_html",
    "diagnostics_summary",
    "load_histograms",
    "make_diagnostic_figures",
    "run_tracking",
    "tracking_pairs",
]

_COV = "Cov(log \u03c0, A) part (> 0 lowers entropy)"
_DH = "dH \u2248 -lr \u00b7 Cov(log \u03c0, A)"

DIAGNOSTIC_FIGURES = (
    FigureSpec("diag_attribution_sign",
               f"Entropy-change attribution by advantage sign: {_DH}",
               _COV, ("entropy/cov_pos", "entropy/cov_neg", "entropy/cov_zero"),
               ("positive-advantage tokens", "negative-advantage tokens",
                "zero-advantage tokens")),
    FigureSpec("diag_attribution_regime",
               f"Entropy-change attribution by group regime: {_DH}",
               _COV, ("entropy/cov_hard", "entropy/cov_easy", "entropy/cov_other"),
               ("hard groups (success rate \u2264 K)", "easy groups (success rate > K)",
                "other groups")),
    FigureSpec("diag_len_volatility",
               "Response-length volatility (std of the mean length over the last 20 steps)",
               "std of mean response length (tokens)", ("response/len_volatility",), ymin=0.0),
)  # fmt: skip
"""Per-step diagnostics drawn like the main figures (one panel per metric)."""

_DRAWN_TITLES = {
    "diag_tracking": "Predicted vs measured entropy change, one point per step",
    "diag_tokens": "Token-level views: entropy of the tokens with A \u2260 0 and gradient share "
    "of the highest-entropy tokens",
    "diag_entropy_hist": "Token-entropy histograms of training rollouts at chosen steps",
}
"""Headings of the diagnostics figures drawn here rather than from a :class:`FigureSpec`."""

_TOKENS_ALL = "tokens/entropy_all"
_TOKENS_NZ = "tokens/entropy_nonzero_adv"
_GRAD_SHARE = "tokens/grad_share_top_entropy"
_TAIL_KEYS = (
    "entropy/cov_total",
    "entropy/cov_pos",
    "entropy/cov_neg",
    "entropy/cov_zero",
    "entropy/cov_hard",
    "entropy/cov_easy",
    "entropy/cov_other",
    _TOKENS_ALL,
    _TOKENS_NZ,
    _GRAD_SHARE,
    "response/len_volatility",
)


def tracking_pairs(run: RunData) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(steps [N], predicted [N], measured [N])`` of a run, paired as the trainer does.

    The measured change at step ``t`` (``H(t) - H(t-1)``) is paired with the prediction made
    at the previous step that logged ``entropy/cov_total``: ``-Cov`` of that step. Steps
    whose values are not finite are dropped.
    """
    cov_steps, cov = run.get("entropy/cov_total")
    m_steps, measured = run.get("entropy/measured_change")
    steps, pred, meas = [], [], []
    for s, m in zip(m_steps, measured, strict=True):
        i = int(np.searchsorted(cov_steps, s)) - 1  # last cov step strictly before s
        if i < 0 or not (math.isfinite(m) and math.isfinite(cov[i])):
            continue
        steps.append(int(s))
        pred.append(-float(cov[i]))
        meas.append(float(m))
    return np.array(steps, dtype=np.int64), np.array(pred), np.array(meas)


def run_tracking(run: RunData) -> dict[str, float] | None:
    """Correlation and sign agreement of predicted vs measured change over the whole run
    (None when the run logged fewer than 3 pairs)."""
    _, pred, meas = tracking_pairs(run)
    if len(pred) < 3:
        return None
    return tracking(pred.tolist(), meas.tolist())


def load_histograms(run_dir: str | os.PathLike) -> dict[int, tuple[np.ndarray, np.ndarray]]:
    """``step -> (edges [bins + 1], counts [bins])`` from ``<run_dir>/entropy_hist/``;
    unreadable files are skipped."""
    out: dict[int, tuple[np.ndarray, np.ndarray]] = {}
    folder = Path(run_dir) / "entropy_hist"
    if not folder.is_dir():
        return out
    for path in sorted(folder.glob("step_*.json")):
        try:
            step = int(path.stem.split("_", 1)[1])
            data = json.loads(path.read_text())
            edges = np.asarray(data["edges"], dtype=np.float64)
            counts = np.asarray(data["counts"], dtype=np.float64)
        except (ValueError, KeyError, TypeError, json.JSONDecodeError):
            continue
        if edges.ndim == 1 and counts.ndim == 1 and len(edges) == len(counts) + 1:
            out[step] = (edges, counts)
    return out


def choose_steps(steps: Sequence[int], n: int = 4) -> list[int]:
    """Up to ``n`` steps spread evenly over ``steps`` (the first and the last included)."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    ordered = sorted(set(int(s) for s in steps))
    if len(ordered) <= n:
        return ordered
    if n == 1:
        return [ordered[-1]]
    idx = np.linspace(0, len(ordered) - 1, n).round().astype(int)
    return sorted({ordered[i] for i in idx})


def _colors(names: Sequence[str]) -> dict[str, str]:
    import matplotlib

    cmap = matplotlib.colormaps["tab10"]
    return {n: matplotlib.colors.to_hex(cmap(i % 10)) for i, n in enumerate(names)}


def _has(runs: Sequence[RunData], key: str) -> bool:
    return any(len(r.get(key)[0]) for r in runs)


def _tracking_figure(plt, groups, colors, path: Path, dpi: int) -> bool:
    pairs = {
        name: [tracking_pairs(r) for r in runs]
        for name, runs in groups.items()
        if any(len(tracking_pairs(r)[0]) for r in runs)
    }
    if not pairs:
        return False
    fig, ax = plt.subplots(figsize=(8.6, 5.2))
    for name, per_run in pairs.items():
        pred = np.concatenate([p for _, p, _ in per_run])
        meas = np.concatenate([m for _, _, m in per_run])
        stats = [t for r in groups[name] if (t := run_tracking(r)) is not None]
        corr = _mean([_finite(t["corr"]) for t in stats])
        agree = _mean([_finite(t["sign_agreement"]) for t in stats])
        label = f"{name}: corr {_fmt(corr, 2)}, sign agreement {_fmt(agree, 2)}"
        ax.scatter(pred, meas, s=10, alpha=0.45, color=colors[name], lw=0, label=label)
    ax.axhline(0.0, color="0.5", lw=0.8)
    ax.axvline(0.0, color="0.5", lw=0.8)
    ax.set_xlabel("predicted change at step t-1: -Cov(log \u03c0, A)  (units of lr)")
    ax.set_ylabel("measured change H(t) - H(t-1)  (nats / token)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(0.0, -0.14), frameon=False)
    fig.suptitle("Predicted vs measured entropy change, one point per step\n"
                 "corr, sign agreement: over the whole run, mean over seeds",
                 fontsize=11)  # fmt: skip
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return True


def _tokens_figure(plt, groups, colors, path: Path, dpi: int) -> bool:
    runs_all = [r for runs in groups.values() for r in runs]
    has_ent = _has(runs_all, _TOKENS_ALL) or _has(runs_all, _TOKENS_NZ)
    has_grad = _has(runs_all, _GRAD_SHARE)
    if not (has_ent or has_grad):
        return False
    panels = [p for p, ok in (("ent", has_ent), ("grad", has_grad)) if ok]
    fig, axes = plt.subplots(1, len(panels), figsize=(6.2 * len(panels) + 2.0, 4.6),
                             squeeze=False)  # fmt: skip
    for ax, panel in zip(axes[0], panels, strict=True):
        for name, runs in groups.items():
            if panel == "ent":
                for key, style, what in ((_TOKENS_NZ, "-", "non-zero-advantage tokens"),
                                         (_TOKENS_ALL, "--", "all tokens")):  # fmt: skip
                    agg = aggregate(runs, key, 1)
                    if len(agg.steps):
                        ax.plot(agg.steps, agg.mean, style, color=colors[name], lw=1.6,
                                label=f"{name}: {what}")  # fmt: skip
            else:
                agg = aggregate(runs, _GRAD_SHARE, 1)
                if len(agg.steps):
                    ax.plot(agg.steps, agg.mean, color=colors[name], lw=1.6, label=name)
                    ax.fill_between(agg.steps, agg.mean - agg.std, agg.mean + agg.std,
                                    color=colors[name], alpha=0.18, lw=0)  # fmt: skip
        if panel == "ent":
            ax.set_title("mean token entropy: solid = tokens with A \u2260 0, dashed = all",
                         fontsize=10)  # fmt: skip
            ax.set_ylabel("entropy (nats / token)")
            ax.set_ylim(0.0, max(ax.get_ylim()[1], 1e-3))
        else:
            ax.axhline(0.2, color="0.4", ls=":", lw=1.2, label="0.2 = uniform share")
            ax.set_title("share of the gradient norm on the top-20% entropy tokens", fontsize=10)
            ax.set_ylabel("share of summed per-token gradient norm")
            ax.set_ylim(0.0, 1.02)
        ax.set_xlabel("training step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.suptitle("Token-level views (logged every trainer.diagnostics_every steps, "
                 "mean over seeds)", fontsize=11)  # fmt: skip
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return True


def _hist_figure(plt, groups, path: Path, dpi: int, n_steps: int, chosen: dict) -> bool:
    import matplotlib

    hists = {}
    for name, runs in groups.items():
        for r in runs:  # the first seed that wrote histograms
            h = load_histograms(r.path)
            if h:
                hists[name] = (r, h)
                break
    if not hists:
        return False
    names = list(hists)[:6]
    cols = min(3, len(names))
    rows = math.ceil(len(names) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5.4 * cols + 1.2, 4.2 * rows), squeeze=False)
    cmap = matplotlib.colormaps["viridis"]
    for i, name in enumerate(names):
        ax = axes[i // cols, i % cols]
        run, h = hists[name]
        steps = choose_steps(list(h), n_steps)
        chosen[name] = {"seed": run.seed, "steps": steps}
        for j, s in enumerate(steps):
            edges, counts = h[s]
            total = counts.sum()
            frac = counts / total if total > 0 else counts
            color = cmap(0.85 * j / max(1, len(steps) - 1))
            ax.stairs(frac, edges, color=color, lw=1.8, label=f"step {s} ({int(total)} tokens)")
        ax.set_yscale("log")
        ax.set_xlabel("token entropy (nats)")
        ax.set_ylabel("fraction of tokens in bin (log)")
        seed = "" if run.seed is None else f", seed {run.seed}"
        ax.set_title(f"{name}{seed}", fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    for j in range(len(names), rows * cols):
        axes[j // cols, j % cols].axis("off")
    fig.suptitle("Token-entropy histograms of training rollouts at chosen steps", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return True


def make_diagnostic_figures(
    groups: Mapping[str, Sequence[RunData]],
    out: str | os.PathLike,
    *,
    window: int = 10,
    dpi: int = 110,
    hist_steps: int = 4,
) -> tuple[dict[str, Path], dict[str, dict[str, Any]]]:
    """Write the diagnostics PNGs whose data some run has.

    Returns ``(stem -> path, chosen)`` where ``chosen[config] = {"seed", "steps"}`` names
    the run and steps drawn in the histogram panel.
    """
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    written = make_figures(groups, out, window=window, dpi=dpi, specs=DIAGNOSTIC_FIGURES)
    colors = _colors(list(groups))
    chosen: dict[str, dict[str, Any]] = {}
    for stem, draw in (
        ("diag_tracking", lambda p: _tracking_figure(plt, groups, colors, p, dpi)),
        ("diag_tokens", lambda p: _tokens_figure(plt, groups, colors, p, dpi)),
        ("diag_entropy_hist", lambda p: _hist_figure(plt, groups, p, dpi, hist_steps, chosen)),
    ):
        path = out / f"{stem}.png"
        if draw(path):
            written[stem] = path
    order = ("diag_attribution_sign", "diag_attribution_regime", "diag_tracking",
             "diag_tokens", "diag_entropy_hist", "diag_len_volatility")  # fmt: skip
    return {s: written[s] for s in order if s in written}, chosen


def _finite(x: float) -> float | None:
    return float(x) if math.isfinite(x) else None


def _mean(values: Sequence[float | None]) -> float | None:
    vals = [v for v in values if v is not None]
    return float(np.mean(vals)) if vals else None


def diagnostics_summary(
    groups: Mapping[str, Sequence[RunData]], *, tail: int = 20
) -> dict[str, dict[str, Any]]:
    """Per configuration: tracking over the whole run and the last-``tail`` mean of each
    diagnostic metric, per seed and averaged over seeds (absent metrics left out).

    ``{config: {"tracking": {"corr", "sign_agreement", "n", "per_seed": [...]},
    "tail": {metric: {"mean", "per_seed"}}}}``; NaN becomes ``None``.
    """
    out: dict[str, dict[str, Any]] = {}
    for name, runs in groups.items():
        entry: dict[str, Any] = {}
        per_seed = []
        for r in runs:
            t = run_tracking(r)
            per_seed.append(
                None
                if t is None
                else {
                    "seed": r.seed,
                    "corr": _finite(t["corr"]),
                    "sign_agreement": _finite(t["sign_agreement"]),
                    "n": int(t["n"]),
                }
            )
        if any(p is not None for p in per_seed):
            entry["tracking"] = {
                "corr": _mean([p["corr"] for p in per_seed if p]),
                "sign_agreement": _mean([p["sign_agreement"] for p in per_seed if p]),
                "n": sum(p["n"] for p in per_seed if p),
                "per_seed": per_seed,
            }
        tails = {}
        for key in _TAIL_KEYS:
            if not _has(runs, key):
                continue
            vals = [_finite(tail_mean(r, key, tail)) for r in runs]
            tails[key] = {"mean": _mean(vals), "per_seed": vals}
        if tails:
            entry["tail"] = tails
        if entry:
            out[name] = entry
    return out


def _fmt(x: float | None, digits: int = 3) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def diagnostics_html(
    figures: Mapping[str, Path], summary: Mapping[str, Mapping[str, Any]], tail: int
) -> str:
    """The report page's "Entropy diagnostics" section (figures inlined); empty when there
    is nothing to show."""
    from qae.report.html import figure_html

    if not figures and not summary:
        return ""
    esc = html.escape
    parts = [
        "<h2>Entropy diagnostics</h2>",
        "<p>First-order entropy change: a policy-gradient step changes entropy by about "
        "\u2212lr \u00b7 Cov(log \u03c0, A) over the sampled tokens, so a positive covariance "
        "part lowers entropy and a negative one raises it. The parts by sign and by regime "
        "each sum to the total.</p>",
    ]
    if summary:
        head = ["configuration", "corr(predicted, measured)", "sign agreement", "pairs",
                f"Cov pos (last {tail})", f"Cov neg (last {tail})",
                f"Cov hard (last {tail})", f"Cov easy (last {tail})"]  # fmt: skip
        parts.append("<table><tr>" + "".join(f"<th>{esc(h)}</th>" for h in head) + "</tr>")
        for name, entry in summary.items():
            tr = entry.get("tracking", {})
            tl = entry.get("tail", {})
            cells = [
                name,
                _fmt(tr.get("corr")),
                _fmt(tr.get("sign_agreement")),
                str(tr.get("n", "-")),
                *(
                    _fmt(tl.get(f"entropy/cov_{p}", {}).get("mean"), 4)
                    for p in ("pos", "neg", "hard", "easy")
                ),
            ]
            parts.append("<tr>" + "".join(f"<td>{esc(c)}</td>" for c in cells) + "</tr>")
        parts.append("</table>")
    titles = {**figure_titles([], DIAGNOSTIC_FIGURES), **_DRAWN_TITLES}
    for stem, fig in figures.items():
        parts.append(figure_html(stem, fig, titles.get(stem, stem)))
    return "\n".join(parts)
