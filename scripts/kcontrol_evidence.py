"""Regenerate the numbers and figures of docs/k-control.md.

    python scripts/kcontrol_evidence.py lab                       # entropy lab, ~minutes
    python scripts/kcontrol_evidence.py trainer --runs /tmp/kc    # 9 qae train runs
    python scripts/kcontrol_evidence.py trainer-report --runs /tmp/kc
    python scripts/kcontrol_evidence.py testbed-report \
        --roots runs/reasoning-kcontrol runs/reasoning-mean-vs-qae   # the testbed figure

``lab`` runs :func:`qae.lab.kcontrol_sweep.kcontrol_sweep` on three difficulty mixes
under the ``logit`` and ``pg`` update models, writes ``lab_<update>.json`` and the
figures into ``--out`` (default docs/figures/kcontrol). ``trainer`` runs ``qae train`` on
the embedded default for three arms (entropy-band K, K = 0.4, mean baseline) x three
seeds, at most ``--jobs`` at a time, one torch thread each. ``trainer-report`` reads the
runs' metrics.jsonl and writes ``trainer.json`` and the trainer figure.
"""

from __future__ import annotations

import argparse
import math
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from qae.io.runlog import read_metrics
from qae.lab.simulate import write_json_atomic

FIGURES = Path(__file__).resolve().parent.parent / "docs" / "figures" / "kcontrol"

# Trainer arms: name -> extra flags on top of the embedded default.
TRAINER_ARMS = {
    "entropy_band": ["--kcontrol.kind", "entropy_band"],
    "qae_k0.4": [],
    "grpo": ["--estimator", "grpo"],
}


# --------------------------------------------------------------------------------------
# Entropy lab


def slim(result: dict) -> dict:
    """The sweep result without its per-step curves (the figures hold those)."""
    runs = {
        mix: {arm: {"numbers": r["numbers"]} for arm, r in arms.items()}
        for mix, arms in result["runs"].items()
    }
    return {**result, "runs": runs}


def run_lab(args: argparse.Namespace) -> int:
    from qae.lab.kcontrol_sweep import (
        DEFAULT_MIXES,
        default_arms,
        kcontrol_sweep,
        plot_kcontrol_sweep,
        sweep_table,
    )

    torch.set_num_threads(1)
    out = Path(args.out)
    arms = default_arms()
    for spec in args.runs:
        update, _, lr = spec.partition(":")
        lr = float(lr) if lr else args.lr
        name = update if lr == args.lr else f"{update}_lr{lr:g}"
        t0 = time.perf_counter()
        result = kcontrol_sweep(
            mixes=DEFAULT_MIXES,
            arms=arms,
            update=update,
            steps=args.steps,
            lr=lr,
            prompts=args.prompts,
            candidates=args.candidates,
            group_size=args.group_size,
            mode=args.mode,
            seed=args.seed,
        )
        result["wall_seconds"] = time.perf_counter() - t0
        write_json_atomic(slim(result), out / f"lab_{name}.json").chmod(0o644)
        plot_kcontrol_sweep(result, out / f"lab_entropy_{name}.png")
        print(f"== update={update} lr={lr:g} ({result['wall_seconds']:.1f} s)")
        print(sweep_table(result))
    return 0


# --------------------------------------------------------------------------------------
# Trainer


def _trainer_cmd(arm: str, seed: int, run_dir: Path, steps: int, config: str) -> list[str]:
    return [
        "qae", "train", "--config", config, *TRAINER_ARMS[arm],
        "--seed", str(seed), "--data.seed", str(seed),
        "--steps", str(steps), "--trainer.threads", "1",
        "--log.out", str(run_dir), "--log.progress", "false", "--log.tensorboard", "false",
    ]  # fmt: skip


def run_trainer(args: argparse.Namespace) -> int:
    root = Path(args.runs)
    root.mkdir(parents=True, exist_ok=True)
    jobs = [(arm, s) for s in args.seeds for arm in TRAINER_ARMS]

    def one(job: tuple[str, int]) -> tuple[str, int, int, float]:
        arm, seed = job
        run_dir = root / f"{arm}_s{seed}"
        if (run_dir / "metrics.jsonl").exists():
            return arm, seed, 0, 0.0
        cmd = _trainer_cmd(arm, seed, run_dir, args.steps, args.config)
        t0 = time.perf_counter()
        with open(root / f"{arm}_s{seed}.log", "w") as log:
            rc = subprocess.call(cmd, stdout=log, stderr=subprocess.STDOUT)
        wall = time.perf_counter() - t0
        print(f"{arm} seed {seed}: rc={rc} {wall:.0f} s  {' '.join(cmd)}", flush=True)
        return arm, seed, rc, wall

    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        results = list(pool.map(one, jobs))
    walls = {f"{a}_s{s}": w for a, s, _, w in results}
    write_json_atomic(walls, root / "wall_seconds.json")
    return max(rc for _, _, rc, _ in results)


def _mean_std(xs: Sequence[float]) -> tuple[float, float]:
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def trainer_report(args: argparse.Namespace) -> int:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from qae.lab.kcontrol_sweep import band_limits, in_band_stats

    root, out = Path(args.runs), Path(args.out)
    report: dict[str, dict] = {}
    curves: dict[str, list[dict[str, list[float]]]] = {}
    for arm in TRAINER_ARMS:
        per_seed: dict[str, list] = {
            "final_pass@1": [], "initial_pass@1": [], "entropy_step1": [],
            "entropy_mean": [], "entropy_last20": [], "frac_in_band": [], "k_final": [],
            "k_mean": [],
        }  # fmt: skip
        runs = []
        for seed in args.seeds:
            rows = read_metrics(root / f"{arm}_s{seed}" / "metrics.jsonl")
            steps = [r for r in rows if "actor/entropy" in r]
            val = [r for r in rows if "val/pass@1" in r]
            ent = [r["actor/entropy"] for r in steps]
            # adv/k is logged for every estimator; only QAE uses it.
            k = [r["adv/k"] if arm != "grpo" else math.nan for r in steps]
            low, high = band_limits(ent[0])  # the entropy_band default band, every arm
            per_seed["final_pass@1"].append(val[-1]["val/pass@1"])
            per_seed["initial_pass@1"].append(val[0]["val/pass@1"])
            per_seed["entropy_step1"].append(ent[0])
            per_seed["entropy_mean"].append(statistics.fmean(ent))
            per_seed["entropy_last20"].append(statistics.fmean(ent[-20:]))
            per_seed["frac_in_band"].append(in_band_stats(ent, low, high)["frac_in_band"])
            per_seed["k_final"].append(k[-1])
            per_seed["k_mean"].append(statistics.fmean(k))
            runs.append(
                {
                    "step": [r["step"] for r in steps],
                    "entropy": ent,
                    "k": k,
                    "val_step": [r["step"] for r in val],
                    "val_pass1": [r["val/pass@1"] for r in val],
                }
            )
        m, sd = _mean_std(per_seed["final_pass@1"])
        report[arm] = {**per_seed, "final_pass@1_mean": m, "final_pass@1_std": sd}
        curves[arm] = runs
    write_json_atomic({"seeds": args.seeds, "arms": report}, out / "trainer.json").chmod(0o644)
    for arm, r in report.items():
        print(
            f"{arm:<14} pass@1 {r['final_pass@1_mean']:.3f} +- {r['final_pass@1_std']:.3f} "
            f"(seeds {', '.join(f'{x:.3f}' for x in r['final_pass@1'])}); entropy mean "
            f"{', '.join(f'{x:.3f}' for x in r['entropy_mean'])}; step-1 entropy "
            f"{', '.join(f'{x:.3f}' for x in r['entropy_step1'])}; in band "
            f"{', '.join(f'{x:.2f}' for x in r['frac_in_band'])}; final K "
            f"{', '.join(f'{x:.2f}' for x in r['k_final'])}"
        )
    colors = {"entropy_band": "C3", "qae_k0.4": "C0", "grpo": "C7"}
    labels = {"entropy_band": "QAE, entropy-band K", "qae_k0.4": "QAE, K = 0.4", "grpo": "GRPO"}
    styles = ["-", "--", ":"]
    with plt.rc_context({"font.size": 10, "legend.fontsize": 8, "axes.grid": True}):
        fig, axes = plt.subplots(2, 2, figsize=(13, 8.5), layout="constrained")
        ax_h, ax_r, ax_k, ax_v = axes.reshape(-1)
        for arm, runs in curves.items():
            for i, run in enumerate(runs):
                kw = {"color": colors[arm], "ls": styles[i % 3], "lw": 1.1}
                lab = f"{labels[arm]}, seed {args.seeds[i]}"
                h0 = run["entropy"][0]
                ax_h.plot(run["step"], _ema(run["entropy"], 0.9), label=lab, **kw)
                ax_r.plot(run["step"], [h / h0 for h in _ema(run["entropy"], 0.9)], **kw)
                if arm != "grpo":
                    ax_k.plot(run["step"], run["k"], label=lab, **kw)
                ax_v.plot(run["val_step"], run["val_pass1"], marker="o", label=lab, **kw)
        ax_r.axhspan(0.75, 1.25, color="C3", alpha=0.1, label="band [0.75, 1.25] x step-1 entropy")
        ax_h.set_ylabel("mean token entropy (nats), EMA 0.9")
        ax_h.set_title("Rollout entropy")
        ax_r.set_ylabel("entropy / the run's step-1 entropy, EMA 0.9")
        ax_r.set_title("Entropy relative to the first batch (the band's reference)")
        ax_k.set_ylabel("K in use")
        ax_k.set_title("K per step (QAE arms)")
        ax_v.set_ylabel("held-out pass@1 (n = 4 samples, T = 1)")
        ax_v.set_title("Held-out pass@1 (validation every 100 steps)")
        for ax in axes.reshape(-1):
            ax.set_xlabel("training step")
        ax_h.legend(loc="lower left", ncol=3, fontsize=7)
        ax_r.legend(loc="lower left")
        _save_png(fig, out / "trainer_entropy.png", dpi=90)
        plt.close(fig)
    return 0


TESTBED_ARMS = {
    "qae-cosine": ("cosine schedule 0.6 -> 0.4", "C2"),
    "qae-entropy-band": ("entropy-band controller", "C3"),
    "qae-sparsity": ("sparsity controller", "C1"),
    "qae-k0.4": ("constant K = 0.4", "C0"),
    "dapo-mean": ("mean baseline", "C7"),
}


def testbed_report(args: argparse.Namespace) -> int:
    """Figure of the K-control grid on the reasoning testbed beside constant K and the mean
    baseline: sampling entropy, K in use and held-out pass@1 per step, one line per seed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    roots = [Path(r) for r in args.roots]
    Path(args.out).mkdir(parents=True, exist_ok=True)
    styles = ["-", "--", ":"]
    with plt.rc_context({"font.size": 10, "legend.fontsize": 7, "axes.grid": True}):
        fig, (ax_h, ax_k, ax_v) = plt.subplots(1, 3, figsize=(16, 4.8), layout="constrained")
        for arm, (label, color) in TESTBED_ARMS.items():
            root = next((r for r in roots if (r / arm).is_dir()), None)
            if root is None:
                print(f"{arm}: not found under {', '.join(map(str, roots))}; left out")
                continue
            for i, seed in enumerate(args.seeds):
                path = root / arm / f"seed{seed}" / "metrics.jsonl"
                if not path.is_file():
                    continue
                rows = read_metrics(path)
                steps = [r for r in rows if r["step"] > 0 and "rollout/entropy" in r]
                val = [r for r in rows if "val/pass@1" in r]
                kw = {"color": color, "ls": styles[i % 3], "lw": 1.1}
                x = [r["step"] for r in steps]
                ax_h.plot(
                    x,
                    _ema([r["rollout/entropy"] for r in steps], 0.9),
                    label=f"{label}, seed {seed}",
                    **kw,
                )
                if arm != "dapo-mean":
                    kx = [(r["step"], r["adv/k"]) for r in steps if "adv/k" in r]
                    ax_k.plot([a for a, _ in kx], [b for _, b in kx], **kw)
                ax_v.plot(
                    [r["step"] for r in val], [r["val/pass@1"] for r in val], marker="o", ms=3, **kw
                )
        ax_h.set_title("Sampling entropy (nats per token, EMA 0.9)")
        ax_k.set_title("K in use (QAE arms)")
        ax_v.set_title("Held-out pass@1 (240 prompts x 8 samples, T = 1; step 0 below the axis)")
        ax_v.set_ylim(0.85, 1.0)
        for ax in (ax_h, ax_k, ax_v):
            ax.set_xlabel("training step")
        ax_h.legend(loc="upper right", ncol=2)
        _save_png(fig, Path(args.out) / "testbed_kcontrol.png", dpi=90)
        plt.close(fig)
    return 0


def _save_png(fig, path: Path, dpi: int) -> None:
    """Save as a 128-colour palette PNG (noisy curves make full-colour PNGs large)."""
    import io

    from PIL import Image

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight")
    buf.seek(0)
    Image.open(buf).convert("RGB").quantize(colors=128).save(path, optimize=True)
    path.chmod(0o644)


def _ema(xs: Sequence[float], w: float) -> list[float]:
    out, m = [], None
    for x in xs:
        m = x if m is None else w * m + (1 - w) * x
        out.append(m)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    lab = sub.add_parser("lab", help="entropy-lab sweep of fixed and adaptive K")
    lab.add_argument("--out", default=str(FIGURES))
    lab.add_argument(
        "--runs",
        nargs="+",
        default=["logit", "pg", "logit:0.1"],
        help="update models to run, 'update' or 'update:lr' (another step size)",
    )
    lab.add_argument("--steps", type=int, default=300)
    lab.add_argument("--lr", type=float, default=0.5)
    lab.add_argument("--prompts", type=int, default=256)
    lab.add_argument("--candidates", type=int, default=16)
    lab.add_argument("--group-size", type=int, default=16)
    lab.add_argument("--mode", default="expected")
    lab.add_argument("--seed", type=int, default=0)
    lab.set_defaults(func=run_lab)
    tr = sub.add_parser("trainer", help="qae train: entropy-band K vs K=0.4 vs GRPO")
    tr.add_argument("--runs", required=True, help="directory for the run dirs")
    tr.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    tr.add_argument("--steps", type=int, default=300)
    tr.add_argument(
        "--config",
        default="arithmetic",
        help="preset the runs start from: arithmetic (the evidence in docs/k-control.md) or "
        "reasoning (the testbed)",
    )
    tr.add_argument("--jobs", type=int, default=2, help="concurrent runs")
    tr.set_defaults(func=run_trainer)
    rep = sub.add_parser("trainer-report", help="tables and figure of the trainer runs")
    rep.add_argument("--runs", required=True)
    rep.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    rep.add_argument("--out", default=str(FIGURES))
    rep.set_defaults(func=trainer_report)
    tb = sub.add_parser(
        "testbed-report", help="figure of the K-control grid on the reasoning testbed"
    )
    tb.add_argument(
        "--roots",
        nargs="+",
        required=True,
        help="grid output directories holding the arms (the K-control grid's and the main "
        "comparison's, for constant K = 0.4 and the mean baseline)",
    )
    tb.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    tb.add_argument("--out", default=str(FIGURES))
    tb.set_defaults(func=testbed_report)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
