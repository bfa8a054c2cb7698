"""The tables of docs/results.md's reasoning-testbed sections, read from run directories.

Every table is computed from the runs' own ``metrics.jsonl`` (and, for ``evals``, the
``qae eval`` outputs written next to them), so a number in the results page can be
re-derived with one command:

    python scripts/testbed_tables.py main runs/reasoning-mean-vs-qae
    python scripts/testbed_tables.py attribution runs/reasoning-mean-vs-qae --lr 3e-4
    python scripts/testbed_tables.py evals runs/reasoning-mean-vs-qae --eval-name eval_t0.7_n32
    python scripts/testbed_tables.py regime runs/reasoning-stability
    python scripts/testbed_tables.py verdicts runs/reasoning-stability
    python scripts/testbed_tables.py ksweep runs/reasoning-mean-vs-qae --eval-name eval_t0.7_n32
    python scripts/testbed_tables.py kcontrol runs/reasoning-kcontrol runs/reasoning-mean-vs-qae \
        --names qae-cosine qae-entropy-band qae-sparsity qae-k0.4 dapo-mean \
        --eval-name eval_t0.7_n32

A run directory is ``ROOT/<configuration>/seed<s>``; only runs that reached their last
planned step count. Several roots may be given (their configurations are pooled) and
``--seeds`` keeps only those seeds. Spreads are the sample std over seeds.
"""

from __future__ import annotations

import argparse
import json
import statistics as st
import sys
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import yaml


def _rows(run: Path) -> list[dict]:
    with open(run / "metrics.jsonl") as f:
        return [json.loads(line) for line in f if line.strip()]


SEEDS: set[int] | None = None  # --seeds: only these seeds, in every table


def _finished_runs(
    root: Path | Sequence[Path], names: Sequence[str] | None
) -> dict[str, list[Path]]:
    """Configuration name -> its finished seed directories (sorted), over one grid output
    directory or several (a configuration found in two is read from the first)."""
    roots = [root] if isinstance(root, Path) else list(root)
    out: dict[str, list[Path]] = {}
    cfgs: dict[str, Path] = {}
    for r in roots:
        for cfg in sorted(p for p in r.iterdir() if p.is_dir()):
            cfgs.setdefault(cfg.name, cfg)
    order = [n for n in names if n in cfgs] if names else list(cfgs)  # --names' order
    for cfg in (cfgs[n] for n in order):
        for run in sorted(cfg.glob("seed*")):
            if not run.name[4:].isdigit():
                continue
            if SEEDS is not None and int(run.name[4:]) not in SEEDS:
                continue
            if not (run / "metrics.jsonl").is_file() or not (run / "config.yaml").is_file():
                continue
            planned = yaml.safe_load((run / "config.yaml").read_text())["trainer"]["steps"]
            if max(r["step"] for r in _rows(run)) >= planned:
                out.setdefault(cfg.name, []).append(run)
    return out


def _eval_metrics(run: Path, eval_name: str) -> dict[str, float]:
    """The metrics of ``qae eval``'s ``<run>/<eval_name>/summary.json`` (its first
    benchmark) as floats; empty when the run was not evaluated."""
    path = run / eval_name / "summary.json"
    if not path.is_file():
        return {}
    metrics = next(iter(json.loads(path.read_text())["benchmarks"].values()))
    return {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float))}


def _ms(values: Sequence[float], digits: int = 3) -> str:
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{st.fmean(values):.{digits}f} \u00b1 {st.stdev(values):.{digits}f}"


def _mean(rows: Iterable[dict], key: str) -> float:
    vals = [r[key] for r in rows if key in r and r[key] is not None]
    return st.fmean(vals) if vals else float("nan")


def _table(head: Sequence[str], body: Iterable[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(row) + " |" for row in body]
    return "\n".join(lines)


def main_table(root: Path | Sequence[Path], names: Sequence[str] | None, window: int) -> str:
    """Held-out pass@1/pass@k at the first, second and last validation, sampling entropy
    over the first and last ``window`` steps, zero-advantage fraction, clip fractions and
    approximate KL over the updating steps, response length and groups kept (last window).
    """
    head = [
        "configuration", "seeds", "pass@1 first", "pass@1 second val", "pass@1 last",
        "pass@k last", f"entropy steps 1-{window}", f"entropy last {window}",
        "zero-adv fraction", "clipfrac low", "clipfrac high", "approx KL",
        f"length last {window}", f"groups kept last {window}",
    ]  # fmt: skip
    body = []
    for name, runs in _finished_runs(root, names).items():
        cols: dict[str, list[float]] = {}

        def add(key: str, value: float, cols: dict[str, list[float]] = cols) -> None:
            cols.setdefault(key, []).append(value)

        for run in runs:
            rows = _rows(run)
            val = [r for r in rows if "val/pass@1" in r]
            kkey = max((k for k in val[-1] if k.startswith("val/pass@")), key=lambda k: int(k[9:]))
            last_step = rows[-1]["step"]
            tr = [r for r in rows if r["step"] > 0 and "rollout/entropy" in r]
            up = [r for r in tr if "train/clipfrac_low" in r]
            first, last = tr[:window], [r for r in tr if r["step"] > last_step - window]
            add("p0", val[0]["val/pass@1"])
            add("p1", val[1]["val/pass@1"] if len(val) > 2 else float("nan"))
            add("pl", val[-1]["val/pass@1"])
            add("kl_", val[-1][kkey])
            add("e1", _mean(first, "rollout/entropy"))
            add("e2", _mean(last, "rollout/entropy"))
            add("z", _mean(up, "adv/frac_zero_adv"))
            add("cl", _mean(up, "train/clipfrac_low"))
            add("ch", _mean(up, "train/clipfrac_high"))
            add("kl", _mean(up, "train/approx_kl"))
            add("len", _mean(last, "response/len_mean"))
            add("g", _mean(last, "rollout/groups_kept"))
        body.append(
            [
                name,
                ",".join(r.name[4:] for r in runs),
                _ms(cols["p0"]),
                _ms(cols["p1"]),
                _ms(cols["pl"]),
                f"{_ms(cols['kl_'])} ({kkey[4:]})",
                _ms(cols["e1"]),
                _ms(cols["e2"]),
                _ms(cols["z"]),
                _ms(cols["cl"], 4),
                _ms(cols["ch"], 4),
                _ms(cols["kl"], 4),
                f"{st.fmean(cols['len']):.1f}",
                f"{st.fmean(cols['g']):.1f}",
            ]
        )
    return _table(head, body)


def attribution_table(root: Path | Sequence[Path], names: Sequence[str] | None, lr: float) -> str:
    """Per configuration: the covariance parts Cov(log pi, A) by advantage sign and group
    regime averaged over every updating step (and the fraction of steps each part was > 0,
    i.e. pushed entropy down), the sum over the run of the first-order predicted change
    ``-lr * Cov * optimizer steps``, the measured change of sampling entropy (last 10 steps
    minus first 10), and the per-step tracking (correlation and sign agreement of the
    predicted change at t-1 with H(t) - H(t-1))."""
    head = [
        "configuration", "Cov pos (share > 0)", "Cov neg (share > 0)", "Cov hard", "Cov easy",
        "predicted change, summed", "measured change", "tracking corr", "sign agreement",
    ]  # fmt: skip
    body = []
    for name, runs in _finished_runs(root, names).items():
        cols: dict[str, list[float]] = {}
        for run in runs:
            rows = _rows(run)
            tr = [r for r in rows if "entropy/cov_total" in r]
            ent = [r["rollout/entropy"] for r in rows if "rollout/entropy" in r]
            pred = [-lr * r["entropy/cov_total"] * r.get("train/optimizer_steps", 1) for r in tr]
            vals = {
                "pos": _mean(tr, "entropy/cov_pos"),
                "fpos": sum(r["entropy/cov_pos"] > 0 for r in tr) / len(tr),
                "neg": _mean(tr, "entropy/cov_neg"),
                "fneg": sum(r["entropy/cov_neg"] > 0 for r in tr) / len(tr),
                "hard": _mean(tr, "entropy/cov_hard"),
                "easy": _mean(tr, "entropy/cov_easy"),
                "pred": sum(pred),
                "meas": st.fmean(ent[-10:]) - st.fmean(ent[:10]),
                "corr": _mean(rows, "entropy/track_corr"),
                "sign": _mean(rows, "entropy/track_sign_agreement"),
            }
            # The run's last logged tracking values cover the whole run.
            tracked = [r for r in rows if "entropy/track_corr" in r]
            if tracked:
                vals["corr"] = tracked[-1]["entropy/track_corr"]
                vals["sign"] = tracked[-1]["entropy/track_sign_agreement"]
            for k, v in vals.items():
                cols.setdefault(k, []).append(v)
        body.append(
            [
                name,
                f"{_ms(cols['pos'], 4)} ({st.fmean(cols['fpos']):.0%})",
                f"{_ms(cols['neg'], 4)} ({st.fmean(cols['fneg']):.0%})",
                _ms(cols["hard"], 4),
                _ms(cols["easy"], 4),
                _ms(cols["pred"], 4),
                _ms(cols["meas"], 3),
                _ms(cols["corr"], 2),
                _ms(cols["sign"], 2),
            ]
        )
    return _table(head, body)


def evals_table(root: Path | Sequence[Path], names: Sequence[str] | None, eval_name: str) -> str:
    """Per configuration: the ``qae eval`` results written to ``<run>/<eval_name>/`` (its
    ``summary.json``, first benchmark), mean ± std over seeds of every pass@k, mean@n and
    maj@n it reports."""
    body, head = [], None
    for name, runs in _finished_runs(root, names).items():
        per: dict[str, list[float]] = {}
        for run in runs:
            for k, v in _eval_metrics(run, eval_name).items():
                if k.split("@")[0] in ("pass", "mean", "maj"):
                    per.setdefault(k, []).append(v)
        if not per:
            continue
        keys = sorted(per)
        head = head or ["configuration", "runs", *keys]
        body.append([name, str(len(per[keys[0]])), *(_ms(per[k]) for k in keys)])
    return _table(head or ["configuration"], body)


def regime_table(root: Path | Sequence[Path], names: Sequence[str] | None, window: int) -> str:
    """Per configuration, what the update did: clip fractions and approximate KL averaged
    over the updating steps, training accuracy over the first and last ``window`` steps,
    and the sampling entropy of the last ``window`` steps and its largest ``window``-step
    mean, both relative to the first ``window`` steps (2x is the explosion threshold of
    :func:`qae.core.diagnostics.entropy_verdict`, which compares with the first step)."""
    head = [
        "configuration", "seeds", "clipfrac low", "clipfrac high", "approx KL",
        f"train accuracy first {window}", f"train accuracy last {window}",
        f"entropy last {window} / first {window}", f"max {window}-step entropy / first {window}",
    ]  # fmt: skip
    body = []
    for name, runs in _finished_runs(root, names).items():
        cols: dict[str, list[float]] = {}
        for run in runs:
            rows = [r for r in _rows(run) if r["step"] > 0]
            up = [r for r in rows if "train/clipfrac_low" in r]
            ent = [r["rollout/entropy"] for r in rows if "rollout/entropy" in r]
            acc = [r["rollout/accuracy_all"] for r in rows if "rollout/accuracy_all" in r]
            means = [st.fmean(ent[i : i + window]) for i in range(len(ent) - window + 1)]
            vals = {
                "cl": _mean(up, "train/clipfrac_low"),
                "ch": _mean(up, "train/clipfrac_high"),
                "kl": _mean(up, "train/approx_kl"),
                "a0": st.fmean(acc[:window]),
                "a1": st.fmean(acc[-window:]),
                "e": means[-1] / means[0],
                "emax": max(means) / means[0],
            }
            for k, v in vals.items():
                cols.setdefault(k, []).append(v)
        body.append(
            [
                name,
                ",".join(r.name[4:] for r in runs),
                _ms(cols["cl"], 4),
                _ms(cols["ch"], 4),
                _ms(cols["kl"], 4),
                _ms(cols["a0"], 2),
                _ms(cols["a1"], 2),
                _ms(cols["e"], 2),
                _ms(cols["emax"], 2),
            ]
        )
    return _table(head, body)


def _spearman(xs: Sequence[float], ys: Sequence[float]) -> float:
    """Spearman's rank correlation (average ranks for ties)."""

    def ranks(v: Sequence[float]) -> list[float]:
        order = sorted(range(len(v)), key=lambda i: v[i])
        r = [0.0] * len(v)
        i = 0
        while i < len(order):
            j = i
            while j + 1 < len(order) and v[order[j + 1]] == v[order[i]]:
                j += 1
            for k in range(i, j + 1):
                r[order[k]] = (i + j) / 2
            i = j + 1
        return r

    rx, ry = ranks(xs), ranks(ys)
    mx, my = st.fmean(rx), st.fmean(ry)
    cov = sum((a - mx) * (b - my) for a, b in zip(rx, ry, strict=True))
    vx = sum((a - mx) ** 2 for a in rx)
    vy = sum((b - my) ** 2 for b in ry)
    return cov / (vx * vy) ** 0.5 if vx and vy else float("nan")


def _trend(ks: Sequence[float], ys: Sequence[float], perms: int = 20000) -> str:
    """Spearman's rho of ``ys`` on ``ks`` over runs and its one-sided permutation p-value
    (share of ``perms`` shuffles of ``ys`` with rho at least as large; seed 0)."""
    import random

    rho = _spearman(ks, ys)
    if len(set(ks)) < 2 or rho != rho:
        return "-"
    rng, ys_ = random.Random(0), list(ys)
    hits = 0
    for _ in range(perms):
        rng.shuffle(ys_)
        hits += _spearman(ks, ys_) >= rho - 1e-12
    return f"rho = {rho:+.2f}, p = {(hits + 1) / (perms + 1):.3f}"


MEAN_ROW = -1.0  # the K-sweep table's key for the mean baseline's row


def ksweep_table(
    root: Path | Sequence[Path],
    names: Sequence[str] | None,
    window: int,
    eval_name: str,
    early: int = 60,
) -> str:
    """The K sweep: every run with a constant K (``kcontrol.kind: constant``, QAE) grouped
    by K, and the plain mean baseline (``grpo`` keeping every advantage) as a reference row:
    the sampling entropy averaged over all steps, over the first ``early`` and over the
    last ``window``, the
    zero-advantage fraction and, where ``<run>/<eval_name>/summary.json`` exists, its
    pass@k; then Spearman's rho of each per-run quantity on K over the QAE runs, with a
    one-sided permutation p-value for "rises with K", and Mann-Whitney's U of the QAE runs
    over the mean baseline's with a one-sided permutation p-value for "QAE is higher"."""
    per_k: dict[float, dict[str, list[float]]] = {}
    pairs: dict[str, list[tuple[float, float]]] = {}
    for _name, runs in _finished_runs(root, names).items():
        for run in runs:
            cfg = yaml.safe_load((run / "config.yaml").read_text())
            plain = cfg["algo"]["estimator"] == "grpo" and cfg["algo"].get("keep", "all") == "all"
            if plain:
                k = MEAN_ROW  # the mean baseline: a reference row, not in the trend
            elif cfg["algo"]["estimator"] == "qae" and cfg["kcontrol"]["kind"] == "constant":
                k = float(cfg["kcontrol"]["k"])
            else:
                continue
            rows = [r for r in _rows(run) if r["step"] > 0 and "rollout/entropy" in r]
            last = rows[-1]["step"]
            vals = {
                "entropy, all steps": _mean(rows, "rollout/entropy"),
                f"entropy, steps 1-{early}": _mean(
                    [r for r in rows if r["step"] <= early], "rollout/entropy"
                ),
                f"entropy, last {window}": _mean(
                    [r for r in rows if r["step"] > last - window], "rollout/entropy"
                ),
                "zero-adv fraction": _mean(
                    [r for r in rows if "adv/frac_zero_adv" in r], "adv/frac_zero_adv"
                ),
            }
            metrics = _eval_metrics(run, eval_name)
            vals.update({k_: v for k_, v in metrics.items() if k_.startswith("pass@")})
            for key, v in vals.items():
                per_k.setdefault(k, {}).setdefault(key, []).append(v)
                if k != MEAN_ROW:
                    pairs.setdefault(key, []).append((k, v))
    keys = list(pairs)
    head = ["K", "runs", *keys]
    body = [
        [
            f"{k:g}" if k != MEAN_ROW else "mean baseline",
            str(len(cols[keys[0]])),
            *(_ms(cols.get(c, [])) for c in keys),
        ]
        for k, cols in sorted(per_k.items())
    ]
    body.append(
        ["trend over runs", str(len(pairs[keys[0]]))]
        + [_trend([a for a, _ in pairs[c]], [b for _, b in pairs[c]]) for c in keys]
    )
    if MEAN_ROW in per_k:
        mean_cols = per_k[MEAN_ROW]
        body.append(
            ["QAE (every K) above the mean baseline", str(len(pairs[keys[0]]))]
            + [_above([b for _, b in pairs[c]], mean_cols.get(c, [])) for c in keys]
        )
    return _table(head, body)


def _above(xs: Sequence[float], ys: Sequence[float], perms: int = 20000) -> str:
    """Mann-Whitney's U of ``xs`` over ``ys`` (pairs with x > y, ties half) out of all
    pairs, and its one-sided permutation p-value (seed 0)."""
    import random

    if not xs or not ys:
        return "-"

    def u(a: Sequence[float], b: Sequence[float]) -> float:
        return sum((x > y) + 0.5 * (x == y) for x in a for y in b)

    got, pool, rng = u(xs, ys), [*xs, *ys], random.Random(0)
    hits = 0
    for _ in range(perms):
        rng.shuffle(pool)
        hits += u(pool[: len(xs)], pool[len(xs) :]) >= got - 1e-12
    return f"U = {got:g}/{len(xs) * len(ys)}, p = {(hits + 1) / (perms + 1):.3f}"


def kcontrol_table(
    root: Path | Sequence[Path], names: Sequence[str] | None, window: int, eval_name: str
) -> str:
    """K schedules and controllers beside constant K and the mean baseline: held-out pass@1
    at the last validation, pass@k of ``<run>/<eval_name>/summary.json`` where it exists,
    the sampling entropy over the first and last ``window`` steps, the K in use (smallest,
    largest and last over the run, QAE only), the zero-advantage fraction and the
    approximate KL per updating step."""
    head = [
        "configuration", "seeds", "held-out pass@1, last validation", "eval pass@1",
        "eval pass@k", f"entropy steps 1-{window}", f"entropy last {window}",
        "K min-max (last)", "zero-adv fraction", "approx KL",
    ]  # fmt: skip
    body = []
    for name, runs in _finished_runs(root, names).items():
        cols: dict[str, list[float]] = {}
        kkey = "-"
        for run in runs:
            rows = _rows(run)
            val = [r for r in rows if "val/pass@1" in r]
            tr = [r for r in rows if r["step"] > 0 and "rollout/entropy" in r]
            up = [r for r in tr if "train/approx_kl" in r]
            last_step = tr[-1]["step"]
            cfg = yaml.safe_load((run / "config.yaml").read_text())
            vals = {
                "p": val[-1]["val/pass@1"] if val else float("nan"),
                "e1": _mean(tr[:window], "rollout/entropy"),
                "e2": _mean([r for r in tr if r["step"] > last_step - window], "rollout/entropy"),
                "z": _mean(up, "adv/frac_zero_adv"),
                "kl": _mean(up, "train/approx_kl"),
            }
            if cfg["algo"]["estimator"] == "qae":
                ks = [r["adv/k"] for r in tr if "adv/k" in r]
                vals.update({"kmin": min(ks), "kmax": max(ks), "klast": ks[-1]})
            metrics = _eval_metrics(run, eval_name)
            if metrics:
                kkey = max((k for k in metrics if k.startswith("pass@")), key=lambda k: int(k[5:]))
                vals.update({"ep1": metrics["pass@1"], "epk": metrics[kkey]})
            for k, v in vals.items():
                cols.setdefault(k, []).append(v)
        krange = (
            f"{min(cols['kmin']):.2f}-{max(cols['kmax']):.2f} "
            f"({', '.join(f'{k:.2f}' for k in cols['klast'])})"
            if "kmin" in cols
            else "-"
        )
        body.append(
            [
                name,
                ",".join(r.name[4:] for r in runs),
                _ms(cols["p"]),
                _ms(cols.get("ep1", [])),
                f"{_ms(cols.get('epk', []))} ({kkey})",
                _ms(cols["e1"]),
                _ms(cols["e2"]),
                krange,
                _ms(cols["z"]),
                _ms(cols["kl"], 4),
            ]
        )
    return _table(head, body)


def verdicts_table(root: Path | Sequence[Path], names: Sequence[str] | None) -> str:
    """Per configuration, the stability verdicts of :mod:`qae.report.stability` (the ones
    ``qae report --stability`` maps, here per configuration rather than per estimator and
    lr): entropy stable / collapsed / exploded (with the steps where the sustained window
    began) and reward held / lost, out of the seeds."""
    from qae.report.runs import load_run
    from qae.report.stability import run_stability

    head = ["configuration", "seeds", "entropy verdicts", "reward held"]
    body = []
    for name, runs in _finished_runs(root, names).items():
        recs = [run_stability(load_run(run)) for run in runs]
        parts = []
        for verdict in ("stable", "collapsed", "exploded"):
            hit = [r for r in recs if r.verdict == verdict]
            if hit:
                where = f" (step {', '.join(str(r.verdict_step) for r in hit)})"
                parts.append(f"{len(hit)} {verdict}" + ("" if verdict == "stable" else where))
        held = sum(r.reward == "held" for r in recs)
        body.append(
            [name, ",".join(r.name[4:] for r in runs), ", ".join(parts), f"{held}/{len(recs)}"]
        )
    return _table(head, body)


def _roots(a: argparse.Namespace) -> list[Path]:
    return [Path(r) for r in a.root]


COMMANDS: dict[str, Callable[[argparse.Namespace], str]] = {
    "main": lambda a: main_table(_roots(a), a.names, a.window),
    "attribution": lambda a: attribution_table(_roots(a), a.names, a.lr),
    "evals": lambda a: evals_table(_roots(a), a.names, a.eval_name),
    "regime": lambda a: regime_table(_roots(a), a.names, a.window),
    "ksweep": lambda a: ksweep_table(_roots(a), a.names, a.window, a.eval_name, a.early),
    "kcontrol": lambda a: kcontrol_table(_roots(a), a.names, a.window, a.eval_name),
    "verdicts": lambda a: verdicts_table(_roots(a), a.names),
}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("command", choices=list(COMMANDS))
    parser.add_argument(
        "root", nargs="+", help="grid output directories (ROOT/<configuration>/seed<s>)"
    )
    parser.add_argument("--names", nargs="*", help="only these configurations")
    parser.add_argument("--seeds", type=int, nargs="*", help="only these seeds")
    parser.add_argument("--window", type=int, default=50, help="steps averaged (main, regime)")
    parser.add_argument("--lr", type=float, default=3e-4, help="learning rate (attribution)")
    parser.add_argument("--early", type=int, default=60, help="first steps averaged (ksweep)")
    parser.add_argument(
        "--eval-name", default="eval", help="qae eval output folder (evals, ksweep)"
    )
    args = parser.parse_args(argv)
    global SEEDS
    SEEDS = set(args.seeds) if args.seeds else None
    print(COMMANDS[args.command](args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
