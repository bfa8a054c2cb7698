"""The ``qae`` command line: one sub-command per job.

Every failure ends in one line on stderr, ``qae <verb>: error: ...``: exit status 2 for a
usage error (a bad flag, config or input), 1 for a runtime failure (a locked or damaged
run, a full or read-only disk), 130 for Ctrl-C (with the step reached and the resume
command for ``qae train``). Warnings print as ``qae <verb>: warning: ...``.
"""

from __future__ import annotations

import argparse
import sys
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from qae.io.errors import RunError, describe_os_error

MAX_REGIMES_GROUP_SIZE = 1024
"""``qae regimes`` prints one line per count of correct responses, each an advantage
computation over the group: beyond this group size the table is neither readable nor fast."""


def _regimes(args: argparse.Namespace) -> int:
    """Print the binary-reward gate for one group size: baseline and advantages per count.

    Every flag is checked and every line computed before the first is printed, so a bad
    value ends in the one error line and nothing else."""
    g, k = args.group_size, args.k
    if not 2 <= g <= MAX_REGIMES_GROUP_SIZE:
        raise ValueError(
            f"--group-size must be in [2, {MAX_REGIMES_GROUP_SIZE}] (one line per count of "
            f"correct responses), got {g}"
        )
    if not 0 < k < 1:
        raise ValueError(f"--k must be a quantile level in (0, 1), got {k}")
    print("\n".join(_regimes_lines(g, k, args.quantile_method)))
    return 0


def _regimes_lines(g: int, k: float, method: str) -> list[str]:
    """The ``qae regimes`` table: a title, a header and one line per count of successes."""
    from qae.core.advantages import compute_advantages, group_quantile

    header = f"{'correct':>7} {'p':>6} {'baseline':>9} {'A(success)':>11} {'A(fail)':>9}  regime"
    lines = [
        f"QAE gate with G={g}, K={k}, quantile={method} "
        f"(binary rewards; hard when p <= 1-K = {1 - k:.3g})",
        header,
        "-" * len(header),
    ]
    for c in range(g + 1):
        rewards = torch.tensor([1.0] * c + [0.0] * (g - c), dtype=torch.float64)
        adv = compute_advantages(rewards, [0] * g, "qae", k=k, quantile_method=method)
        b = float(group_quantile(rewards, [0] * g, k, method=method)[0])
        a_s = f"{float(adv[0]):+.3f}" if c else "-"
        a_f = f"{float(adv[-1]):+.3f}" if c < g else "-"
        if c in (0, g):
            regime = "degenerate (all equal)"
        elif b == 0.0:
            regime = "hard: only successes get credit"
        elif b == 1.0:
            regime = "easy: only failures are pushed down"
        else:
            regime = "interpolated baseline"
        lines.append(f"{c:>7} {c / g:>6.3f} {b:>9.3f} {a_s:>11} {a_f:>9}  {regime}")
    return lines


# Short flags for the fields people change most.
TRAIN_ALIASES = {
    "algo.estimator": ["--estimator"],
    "kcontrol.k": ["--k"],
    "model.path": ["--model"],
    "data.train": ["--data"],
    "trainer.steps": ["--steps"],
    "optim.lr": ["--lr"],
    "trainer.seed": ["--seed"],
    "log.out": ["--out"],
}


def _train(args: argparse.Namespace) -> int:
    """Run the RL loop from a preset or YAML plus per-field flags."""
    import time

    from transformers.utils import logging as hf_logging

    from qae.io.configtools import config_from_args, load_yaml_config
    from qae.train.config import TrainConfig, load_preset
    from qae.train.trainer import train

    hf_logging.disable_progress_bar()  # weight loading/saving bars would drown the step bar

    cfg = load_preset(args.config) if args.config else TrainConfig()
    run_cfg = Path(_cfg_out(args)) / "config.yaml"
    if args.resume and not args.config and run_cfg.is_file():
        cfg = load_yaml_config(TrainConfig, run_cfg)  # resume with the run's own config
    cfg = config_from_args(TrainConfig, args, cfg)
    if args.resume and not cfg.log.out:
        raise ValueError("--resume needs --out (log.out): the run directory to continue")
    if not cfg.log.out:
        cfg.log.out = time.strftime("runs/qae-%Y%m%d-%H%M%S")
    if args.print_config:
        import yaml

        from qae.io.configtools import config_to_dict

        print(yaml.safe_dump(config_to_dict(cfg), sort_keys=False), end="")
        return 0
    result = train(cfg, resume=args.resume)
    before, after = result.val_before, result.val_after
    print(f"run directory: {result.run_dir}")
    if before or after:
        keys = [k for k in (before or after) if k.startswith("val/pass@") or k == "val/mean@n"]
        print(f"{'held-out':<14} {'before':>8} {'after':>8}")
        for k in keys:
            b = before.get(k, float("nan"))
            a = after.get(k, float("nan"))
            print(f"{k[4:]:<14} {b:>8.3f} {a:>8.3f}")
    return 0


def _cfg_out(args: argparse.Namespace) -> str:
    return getattr(args, "cfg:log.out", "") or ""


def build_parser() -> argparse.ArgumentParser:
    """The ``qae`` argument parser with every sub-command."""
    from qae import __version__
    from qae.core.advantages import QUANTILE_METHODS

    parser = argparse.ArgumentParser(
        prog="qae", description="Quantile Advantage Estimation for entropy-safe RLVR."
    )
    parser.add_argument("--version", action="version", version=f"qae {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser(
        "regimes",
        help="show the QAE two-regime gate for a group size and K",
        description="For binary rewards, print the QAE baseline and the advantages of a "
        "success and a failure for every number of correct responses in a group.",
    )
    p.add_argument("--group-size", "-G", type=int, default=16, help="responses per prompt")
    p.add_argument("--k", type=float, default=0.4, help="quantile level K in (0, 1)")
    p.add_argument(
        "--quantile-method",
        choices=QUANTILE_METHODS,
        default="inverted_cdf",
        help="inverted_cdf is the paper's quantile; linear is torch.quantile's default",
    )
    p.set_defaults(func=_regimes)

    from qae.eval.command import add_eval_parser
    from qae.lab.simulate import add_simulate_parser
    from qae.report import add_report_parser
    from qae.report.compare import add_compare_parser

    add_eval_parser(sub)
    add_simulate_parser(sub)
    add_compare_parser(sub)
    add_report_parser(sub)

    from qae.io.configtools import add_config_arguments
    from qae.train.config import TrainConfig, preset_names

    p = sub.add_parser(
        "train",
        help="run the RLVR loop (default: QAE on the built-in reasoning testbed)",
        description="Train a policy with RLVR. With no arguments: QAE (K=0.4) in DAPO's "
        "regime scaled to a CPU (4 off-policy mini-batch updates per rollout batch, "
        "Clip-Higher, token-mean, dynamic sampling, overlong penalty) on the built-in "
        "reasoning task and its shipped policy, 300 steps in 5-9 minutes on 2 CPU "
        "cores; --config arithmetic is the earlier arithmetic task. Every config field "
        f"is a flag; --config loads a preset ({', '.join(preset_names())}) or a YAML file "
        "first.",
    )
    p.add_argument("--config", default="", help="preset name or YAML file applied first")
    p.add_argument(
        "--resume", action="store_true", help="continue the run in --log.out from its checkpoint"
    )
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    add_config_arguments(p, TrainConfig, TRAIN_ALIASES)
    p.set_defaults(func=_train)
    return parser


def _one_line(text: str) -> str:
    return " ".join(line.strip() for line in str(text).splitlines() if line.strip())


def _warning_printer(command: str) -> Callable[..., None]:
    """A ``warnings.showwarning`` that prints ``qae <command>: warning: ...``."""

    def show(message, category, filename, lineno, file=None, line=None) -> None:
        print(f"qae {command}: warning: {_one_line(str(message))}", file=file or sys.stderr)

    return show


def _run(args: argparse.Namespace) -> int:
    """Run a sub-command; every failure becomes one line on stderr and an exit status."""
    command = args.command
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt as err:
        message = _one_line(str(err)) or "interrupted"
        print(f"qae {command}: {message}", file=sys.stderr)
        return 130
    except (ValueError, ImportError) as err:
        print(f"qae {command}: error: {_one_line(str(err))}", file=sys.stderr)
        return 2
    except RunError as err:
        print(f"qae {command}: error: {_one_line(str(err))}", file=sys.stderr)
        return 1
    except OSError as err:
        print(f"qae {command}: error: {_one_line(describe_os_error(err))}", file=sys.stderr)
        return 1


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``qae`` command."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    with warnings.catch_warnings():
        warnings.showwarning = _warning_printer(args.command)
        return _run(args)


if __name__ == "__main__":
    sys.exit(main())
