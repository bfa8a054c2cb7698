"""``qae simulate``: run the entropy-lab checks, write figures and summary.json, print verdicts."""

from __future__ import annotations

import argparse
import math
import os
import time
from pathlib import Path
from typing import Any

import torch

from qae.io.atomic import atomic_write_json
from qae.lab import checks
from qae.lab.dynamics import MODES
from qae.lab.groups import parse_estimator
from qae.lab.policy import DEFAULT_MIX, REWARD_KINDS, UPDATES, make_problem, parse_mix

__all__ = ["add_simulate_parser", "run_checks", "run_simulate", "write_json_atomic"]


def _floats(text: str, field: str) -> list[float]:
    try:
        values = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"{field} must be comma-separated numbers, got {text!r}") from None
    if not values:
        raise ValueError(f"{field} must list at least one number, got {text!r}")
    return values


def _names(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


def add_simulate_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``simulate`` sub-command to an argparse ``subparsers`` object."""
    p = subparsers.add_parser(
        "simulate",
        help="entropy lab: check the QAE entropy theory on tabular softmax policies",
        description="Run the entropy-lab checks on tabular softmax policies (P prompts x M "
        "candidate responses): (1) entropy change vs a constant baseline, (2) the quantile "
        "baseline is extremal, (3) K sweep over training, (4) zero-advantage fraction vs "
        "its closed form. Writes PNG figures and summary.json into --out and prints a "
        "verdict table.",
    )
    p.add_argument(
        "--out", default="runs/simulate", help="output directory (created; runs/ is git-ignored)"
    )
    p.add_argument(
        "--checks",
        default=",".join(checks.CHECKS),
        help=f"comma-separated checks to run, from {','.join(checks.CHECKS)}",
    )
    p.add_argument("--prompts", "-P", type=int, default=256, help="prompts P")
    p.add_argument("--candidates", "-M", type=int, default=16, help="candidate responses M")
    p.add_argument("--group-size", "-G", type=int, default=16, help="responses sampled per prompt")
    p.add_argument(
        "--mix",
        default=DEFAULT_MIX,
        help="difficulty mix 'p:w,...': initial success rate p with relative weight w",
    )
    p.add_argument(
        "--reward",
        choices=REWARD_KINDS,
        default="binary",
        help="candidate rewards for the K sweep (checks 2 and 4 always use binary rewards)",
    )
    p.add_argument("--logit-std", type=float, default=1.0, help="spread of the initial logits")
    p.add_argument(
        "--update",
        choices=UPDATES,
        default="logit",
        help="logit step model: logit (the QAE paper's first-order model), pg (exact "
        "softmax policy gradient) or npg (natural policy gradient)",
    )
    p.add_argument(
        "--mode",
        choices=MODES,
        default="expected",
        help="K sweep steps: exact expectation over the sampling, or one sampled group",
    )
    p.add_argument("--lr", type=float, default=0.5, help="learning rate of the K sweep")
    p.add_argument("--probe-lr", type=float, default=0.1, help="step size of the one-step check 2")
    p.add_argument(
        "--lrs",
        default="1,0.3,0.1,0.03,0.01",
        help="step sizes at which check 1 compares first-order and exact entropy change",
    )
    p.add_argument("--steps", type=int, default=300, help="training steps of the K sweep")
    p.add_argument("--ks", default="0.2,0.4,0.6,0.8", help="QAE K values of the K sweep")
    p.add_argument("--k", type=float, default=0.4, help="K of the gate in check 2")
    p.add_argument(
        "--estimators",
        default="grpo",
        help="comma-separated estimators compared with QAE in checks 3 and 4 "
        "('name' or 'name:K', e.g. grpo,rloo)",
    )
    p.add_argument("--pass-k", type=int, default=8, help="k of the closed-form pass@k")
    p.add_argument("--repeats", type=int, default=32, help="sampled groups per prompt (check 4)")
    p.add_argument("--seed", type=int, default=0, help="random seed")
    p.add_argument("--threads", type=int, default=1, help="torch threads (the tensors are small)")
    p.add_argument(
        "--strict", action="store_true", help="exit with status 1 if any check does not hold"
    )
    p.set_defaults(func=run_simulate)
    return p


def run_checks(args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    """Run the checks selected in ``args`` (the ``simulate`` options); returns name -> result."""
    selected = _names(args.checks)
    unknown = [c for c in selected if c not in checks.CHECKS]
    if unknown or not selected:
        raise ValueError(
            f"unknown checks={args.checks!r}; expected a comma-separated subset of "
            f"{','.join(checks.CHECKS)}"
        )
    parse_mix(args.mix)
    others = _names(args.estimators)
    for spec in others:
        parse_estimator(spec)
    problem_kw = {
        "mix": args.mix,
        "logit_std": args.logit_std,
        "seed": args.seed,
    }
    binary = None
    if {"extremal", "zerofrac"} & set(selected) or args.reward == "binary":
        binary = make_problem(args.prompts, args.candidates, reward="binary", **problem_kw)
    results: dict[str, dict[str, Any]] = {}
    for name in selected:
        t0 = time.perf_counter()
        if name == "baseline":
            res = checks.check_baseline_monotone(
                num_candidates=args.candidates, lrs=_floats(args.lrs, "lrs"),
                update=args.update, logit_std=args.logit_std, seed=args.seed,
            )  # fmt: skip
        elif name == "extremal":
            res = checks.check_quantile_extremal(
                binary, k=args.k, lr=args.probe_lr, update=args.update,
                group_size=args.group_size,
            )  # fmt: skip
        elif name == "ksweep":
            problem = binary
            if args.reward != "binary":
                problem = make_problem(
                    args.prompts, args.candidates, reward=args.reward, **problem_kw
                )
            res = checks.check_k_sweep(
                problem, ks=_floats(args.ks, "ks"), others=others, steps=args.steps,
                lr=args.lr, group_size=args.group_size, update=args.update, mode=args.mode,
                pass_k=args.pass_k, seed=args.seed,
            )  # fmt: skip
        else:
            grid = {round(0.05 * i, 2) for i in range(1, 20)} | set(_floats(args.ks, "ks"))
            res = checks.check_zero_fraction(
                binary, ks=sorted(grid), others=others, group_size=args.group_size,
                repeats=args.repeats, seed=args.seed,
            )  # fmt: skip
        res["seconds"] = time.perf_counter() - t0
        results[name] = res
    return results


def _jsonable(x: Any) -> Any:
    """Replace NaN / inf by None so the file is strict JSON."""
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    return x


def write_json_atomic(obj: Any, path: str | os.PathLike) -> Path:
    """Write ``obj`` as strict JSON to ``path`` through a temp file and a rename."""
    return atomic_write_json(path, _jsonable(obj), indent=1, allow_nan=False)


def _summary_line(name: str, res: dict[str, Any]) -> str:
    n = res["numbers"]
    if name == "baseline":
        return (
            f"min dH step along b: hard {n['hard_min_increment']:.2e}, easy "
            f"{n['easy_min_increment']:.2e}; first-order rel. error at lr={n['lrs'][-1]:g}: "
            f"hard {n['hard_rel_error_smallest_lr']:.1e}, "
            f"easy {n['easy_rel_error_smallest_lr']:.1e}"
        )
    if name == "extremal":
        return (
            f"quantile is min on {n['hard_quantile_is_min']:.0%} of {n['hard_prompts']} hard, "
            f"max on {n['easy_quantile_is_max']:.0%} of {n['easy_prompts']} easy prompts; mean "
            f"baseline at {n['mean_position_hard']:.2f} (hard) / "
            f"{n['mean_position_easy']:.2f} (easy) of the range"
        )
    if name == "ksweep":
        by_k = ", ".join(f"{h:.3f}" for h in n["qae_mean_entropy_by_k"])
        extra = [
            f"{label} {v['mean_entropy']:.3f}"
            for label, v in n.items()
            if isinstance(v, dict) and not label.startswith("qae")
        ]
        tail = f"; {', '.join(extra)}" if extra else ""
        return f"mean entropy by K: {by_k}{tail} ({n['update']} update)"
    return (
        f"max |counted - closed| = {n['max_z_score']:.2f} s.e. over "
        f"{len(n['rows'])} estimators, {n['groups_per_estimator']} groups each"
    )


def run_simulate(args: argparse.Namespace) -> int:
    """The ``qae simulate`` command: run, write ``--out``, print the verdict table."""
    from qae.lab.plots import PLOTS

    if args.threads < 1:
        raise ValueError(f"--threads must be >= 1, got {args.threads}")
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    results = run_checks(args)
    out = Path(args.out)
    figures = {}
    for name, res in results.items():
        figures[name] = str(PLOTS[name](res, out / f"check_{name}.png"))
    config = {k: v for k, v in vars(args).items() if k != "func"}
    summary = {
        "config": config,
        "checks": results,
        "figures": figures,
        "all_hold": all(r["verdict"] for r in results.values()),
        "wall_seconds": time.perf_counter() - t0,
    }
    write_json_atomic(summary, out / "summary.json")
    width = max(len(r["claim"]) for r in results.values())
    header = f"{'check':<9} {'verdict':<14} {'claim':<{width}}"
    print(header)
    print("-" * len(header))
    for name, res in results.items():
        word = "holds" if res["verdict"] else "does not hold"
        print(f"{name:<9} {word:<14} {res['claim']}")
        print(f"{'':<9} {'':<14} {_summary_line(name, res)}")
    seconds = summary["wall_seconds"]
    print(f"wrote {out / 'summary.json'} and {len(figures)} figures in {seconds:.1f} s")
    return 1 if args.strict and not summary["all_hold"] else 0
