"""Statistics over seeds: smoothing, mean and band per step, final table, steps-to-target.

Every spread is the sample standard deviation over seeds (``ddof=1``; 0 for one seed).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from qae.report.runs import RunData

__all__ = [
    "Aggregate",
    "Column",
    "DEFAULT_COLUMNS",
    "TableRow",
    "aggregate",
    "first_step_reaching",
    "fisher_exact",
    "mean_std",
    "pass_k_key",
    "smooth",
    "summary_table",
    "tail_mean",
]


def smooth(values: np.ndarray, window: int) -> np.ndarray:
    """Trailing moving average over the last ``window`` points (NaNs skipped).

    ``values [N] -> [N]``; point i averages ``values[max(0, i-window+1) : i+1]``, so the
    smoothed curve never looks ahead. ``window <= 1`` returns the values unchanged.
    """
    values = np.asarray(values, dtype=np.float64)
    if window <= 1 or len(values) == 0:
        return values.copy()
    ok = ~np.isnan(values)
    csum = np.concatenate([[0.0], np.cumsum(np.where(ok, values, 0.0))])
    ccnt = np.concatenate([[0], np.cumsum(ok)])
    hi = np.arange(1, len(values) + 1)
    lo = np.maximum(0, hi - window)
    cnt = ccnt[hi] - ccnt[lo]
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(cnt > 0, (csum[hi] - csum[lo]) / np.maximum(cnt, 1), np.nan)


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample std (ddof=1; 0 for one value) of the finite values; NaNs if none."""
    x = np.asarray([v for v in values if v is not None and math.isfinite(v)], dtype=np.float64)
    if len(x) == 0:
        return math.nan, math.nan
    return float(x.mean()), float(x.std(ddof=1)) if len(x) > 1 else 0.0


@dataclass
class Aggregate:
    """Mean and std over runs of one metric at each step logged by at least one run."""

    steps: np.ndarray  # [S] int
    mean: np.ndarray  # [S]
    std: np.ndarray  # [S]
    count: np.ndarray  # [S] runs that logged the step


def aggregate(runs: Sequence[RunData], key: str, window: int = 1) -> Aggregate:
    """Per-step mean and sample std of ``key`` over ``runs``, each smoothed first.

    Steps are the union of the runs' logged steps; at a step only the runs that logged it
    count (so a run still going shortens no curve, it just narrows the tail's count).
    """
    per_run: list[dict[int, float]] = []
    for run in runs:
        steps, values = run.get(key)
        sm = smooth(values, window)
        per_run.append({int(s): float(v) for s, v in zip(steps, sm, strict=True)})
    all_steps = sorted({s for d in per_run for s in d})
    mean, std, count = [], [], []
    for s in all_steps:
        m, sd = mean_std([d[s] for d in per_run if s in d])
        mean.append(m)
        std.append(sd)
        count.append(sum(1 for d in per_run if s in d and math.isfinite(d[s])))
    return Aggregate(
        np.array(all_steps, dtype=np.int64), np.array(mean), np.array(std), np.array(count)
    )


def first_step_reaching(
    steps: np.ndarray, values: np.ndarray, target: float, window: int = 1
) -> int | None:
    """The first step whose (trailing-``window``-smoothed) value is ``>= target``, or None.

    A relative tolerance of 1e-9 absorbs the rounding of the moving average, so a mean
    that is exactly the target on paper counts as reaching it.
    """
    sm = smooth(np.asarray(values, dtype=np.float64), window)
    hit = np.nonzero(sm >= target - 1e-9 * max(1.0, abs(target)))[0]
    return int(steps[hit[0]]) if len(hit) else None


def fisher_exact(a: int, n_a: int, b: int, n_b: int) -> float:
    """Two-sided p-value of Fisher's exact test that ``a`` of ``n_a`` and ``b`` of ``n_b``
    come from the same success rate (e.g. seeds stable under two estimators).

    Conditional on the total ``a + b`` successes, the count in the first group is
    hypergeometric; the p-value sums the probabilities of every table at most as likely as
    the observed one (the usual two-sided definition, with a 1e-7 relative tolerance for
    ties). ``fisher_exact(4, 4, 0, 4) = 0.0286``; equal counts give 1.
    """
    if not (0 <= a <= n_a and 0 <= b <= n_b):
        raise ValueError(f"need 0 <= a <= n_a and 0 <= b <= n_b, got {a}/{n_a} and {b}/{n_b}")
    total, n = a + b, n_a + n_b
    denom = math.comb(n, total)

    def prob(x: int) -> float:
        return math.comb(n_a, x) * math.comb(n_b, total - x) / denom

    observed = prob(a)
    lo, hi = max(0, total - n_b), min(n_a, total)
    p = sum(q for x in range(lo, hi + 1) if (q := prob(x)) <= observed * (1 + 1e-7))
    return min(1.0, p)


def tail_mean(run: RunData, key: str, tail: int) -> float:
    """Mean of ``key`` over the run's last ``tail`` logged points (NaN if none)."""
    _, values = run.get(key)
    values = values[-tail:] if tail > 0 else values
    values = values[~np.isnan(values)]
    return float(values.mean()) if len(values) else math.nan


def pass_k_key(runs: Sequence[RunData]) -> str | None:
    """The ``val/pass@k`` key with the largest k > 1 that any run logged."""
    ks = sorted(
        {
            int(key.split("@", 1)[1])
            for run in runs
            for key in run.series
            if key.startswith("val/pass@") and key.split("@", 1)[1].isdigit()
        }
    )
    ks = [k for k in ks if k > 1]
    return f"val/pass@{ks[-1]}" if ks else None


@dataclass(frozen=True)
class Column:
    """A table column: a metric and how one run's number is taken from its series."""

    key: str
    label: str
    how: str = "last"
    """``last`` (value at the last step that logged it) or ``tail`` (mean of the last
    ``tail`` points)."""


DEFAULT_COLUMNS = (
    Column("val/pass@1", "held-out pass@1 (final)"),
    Column("val/pass@k", "held-out pass@k (final)"),
    Column("rollout/accuracy_all", "train accuracy (last {tail})", "tail"),
    Column("actor/entropy", "entropy, nats/token (last {tail})", "tail"),
    Column("adv/frac_zero_adv", "zero-adv fraction (last {tail})", "tail"),
    Column("response/len_mean", "response length, tokens (last {tail})", "tail"),
)
"""``val/pass@k`` is replaced by the largest logged k."""


@dataclass
class TableRow:
    """One configuration's line of the final table."""

    name: str
    seeds: list[int | None]
    finished: int
    cells: dict[str, tuple[float, float, list[float]]] = field(default_factory=dict)
    """column key -> (mean, std, per-seed values)."""
    first_steps: list[int | None] = field(default_factory=list)
    """Per seed: first step reaching the target (None: never)."""
    steps: dict[str, list[int | None]] = field(default_factory=dict)
    """column key -> per seed, the step its value comes from (``last`` columns: the last
    step that logged the metric; ``tail`` columns: the last step of the averaged window;
    None: never logged)."""
    end_steps: list[int] = field(default_factory=list)
    """Per seed: the step the run was meant to end at (planned steps, else last step)."""

    def finite(self, key: str) -> int:
        """How many seeds have a finite value in column ``key``."""
        return sum(1 for v in self.cells[key][2] if v is not None and math.isfinite(v))


def summary_table(
    groups: Mapping[str, Sequence[RunData]],
    *,
    target: float,
    target_metric: str = "rollout/accuracy_all",
    window: int = 10,
    tail: int = 20,
    columns: Sequence[Column] = DEFAULT_COLUMNS,
) -> tuple[list[Column], list[TableRow]]:
    """The final table: per configuration, each column's mean and std over seeds, and each
    seed's first step at which ``target_metric`` (smoothed over ``window`` points) reached
    ``target``. Returns the resolved columns and one row per configuration."""
    all_runs = [r for runs in groups.values() for r in runs]
    kkey = pass_k_key(all_runs)
    resolved = []
    for col in columns:
        if col.key == "val/pass@k":
            if kkey is None:
                continue
            col = Column(kkey, col.label.replace("pass@k", kkey.split("/", 1)[1]), col.how)
        resolved.append(Column(col.key, col.label.format(tail=tail), col.how))
    rows = []
    for name, runs in groups.items():
        row = TableRow(name, [r.seed for r in runs], sum(r.finished for r in runs))
        row.end_steps = [r.end_step for r in runs]
        for col in resolved:
            vals = [
                r.final(col.key) if col.how == "last" else tail_mean(r, col.key, tail) for r in runs
            ]
            m, s = mean_std(vals)
            row.cells[col.key] = (m, s, vals)
            row.steps[col.key] = [r.final_step(col.key) for r in runs]
        for r in runs:
            steps, values = r.get(target_metric)
            row.first_steps.append(first_step_reaching(steps, values, target, window))
        rows.append(row)
    return resolved, rows
