"""Metrics of sampled responses: pass@k, mean@n, maj@n, and the summary table.

- pass@k: the unbiased estimator of Chen et al. 2021 ("Evaluating Large Language Models
  Trained on Code", arXiv 2107.03374), ``1 - C(n-c, k) / C(n, k)`` with c correct samples
  out of n, averaged over problems;
- mean@n: the mean score over all samples (pass@1 for 0/1 rewards);
- maj@n: the score of the most frequent normalised answer (majority vote).

Used by ``qae eval`` and by the trainer's held-out evaluation alike.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from qae.rewards import normalize_answer

__all__ = ["format_table", "majority_vote", "pass_at_k", "summarize"]


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from ``c`` correct out of ``n`` samples: ``1 - C(n-c, k) / C(n, k)``.

    Computed as ``1 - prod_{i=n-c+1}^{n} (1 - k / i)``, which never forms the binomials (they
    overflow floats for n in the hundreds). Requires ``0 <= c <= n`` and ``1 <= k <= n``.
    """
    for name, value in (("n", n), ("c", c), ("k", k)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"{name} must be an integer, got {name}={value!r}")
    if not 0 <= c <= n:
        raise ValueError(f"c must be in [0, n={n}], got c={c}")
    if not 1 <= k <= n:
        raise ValueError(f"k must be in [1, n={n}], got k={k}")
    if n - c < k:
        return 1.0  # every k-subset holds a correct sample
    prod = 1.0
    for i in range(n - c + 1, n + 1):
        prod *= 1.0 - k / i
    return 1.0 - prod


def _correct(score: float | None) -> bool:
    return score is not None and score > 0


def majority_vote(answers: Sequence[str | None], scores: Sequence[float | None]) -> float:
    """Score of the majority answer: the most frequent normalised answer (ties: first seen).

    Samples without an answer do not vote; 0.0 when none has an answer. The majority's score
    is that of its first sample (all samples with the same answer score alike for an
    answer-based reward).
    """
    if len(answers) != len(scores):
        raise ValueError(f"answers and scores differ in length: {len(answers)} != {len(scores)}")
    keys = [normalize_answer(a) for a in answers]
    counts = Counter(k for k in keys if k is not None)
    if not counts:
        return 0.0
    best = max(counts.values())
    winner = next(k for k in keys if k is not None and counts[k] == best)
    score = scores[keys.index(winner)]
    return 0.0 if score is None else float(score)


def summarize(samples: Iterable[Mapping[str, Any]], *, n: int, ks: Sequence[int]) -> dict:
    """Per-benchmark metrics from sample rows (``source``, ``problem_id``, ``answer``, ``score``).

    Returns ``{source: {"problems", "samples", "pass@k"..., "mean@n", "maj@n", "no_answer",
    "unscorable"}}``; only problems with all n samples count.
    """
    groups: dict[str, dict[str, dict[int, Mapping[str, Any]]]] = defaultdict(dict)
    for row in samples:
        groups[row["source"]].setdefault(str(row["problem_id"]), {})[int(row["sample"])] = row
    out: dict[str, dict[str, float | int]] = {}
    for source in sorted(groups):
        problems = [g for g in groups[source].values() if len(g) == n]
        if not problems:
            continue
        metrics: dict[str, float | int] = {"problems": len(problems), "samples": n}
        rows = [[g[i] for i in range(n)] for g in problems]
        correct = [sum(_correct(r["score"]) for r in p) for p in rows]
        for k in ks:
            metrics[f"pass@{k}"] = sum(pass_at_k(n, c, k) for c in correct) / len(rows)
        all_scores = [r["score"] for p in rows for r in p]
        metrics[f"mean@{n}"] = sum(s or 0.0 for s in all_scores) / len(all_scores)
        metrics[f"maj@{n}"] = sum(
            majority_vote([r["answer"] for r in p], [r["score"] for r in p]) for p in rows
        ) / len(rows)
        metrics["no_answer"] = sum(r["answer"] is None for p in rows for r in p) / len(all_scores)
        metrics["unscorable"] = sum(s is None for s in all_scores)
        out[source] = metrics
    return out


def format_table(summary: Mapping[str, Any]) -> str:
    """A plain-text table of a :func:`summarize` result (one row per benchmark)."""
    benches = summary.get("benchmarks", summary)
    if not benches:
        return "(no finished problems)"
    metric_keys = [
        k
        for k in next(iter(benches.values()))
        if "@" in k and not k.startswith(("problems", "samples"))
    ]
    header = f"{'benchmark':<12} {'problems':>8} " + " ".join(f"{k:>9}" for k in metric_keys)
    lines = [header, "-" * len(header)]
    for name, m in benches.items():
        cells = " ".join(f"{100 * m[k]:>8.2f}%" for k in metric_keys)
        lines.append(f"{name:<12} {m['problems']:>8} {cells}")
    return "\n".join(lines)
