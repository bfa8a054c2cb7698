"""The ``qae`` command line: one sub-command per job."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

import torch


def _regimes(args: argparse.Namespace) -> int:
    """Print the binary-reward gate for one group size: baseline and advantages per count."""
    from qae.advantages import compute_advantages, group_quantile

    g = args.group_size
    if g < 2:
        raise SystemExit(f"--group-size must be >= 2, got {g}")
    print(
        f"QAE gate with G={g}, K={args.k}, quantile={args.quantile_method} "
        f"(binary rewards; hard when p <= 1-K = {1 - args.k:.3g})"
    )
    header = f"{'correct':>7} {'p':>6} {'baseline':>9} {'A(success)':>11} {'A(fail)':>9}  regime"
    print(header)
    print("-" * len(header))
    for c in range(g + 1):
        rewards = torch.tensor([1.0] * c + [0.0] * (g - c), dtype=torch.float64)
        adv = compute_advantages(
            rewards, [0] * g, "qae", k=args.k, quantile_method=args.quantile_method
        )
        b = float(group_quantile(rewards, [0] * g, args.k, method=args.quantile_method)[0])
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
        print(f"{c:>7} {c / g:>6.3f} {b:>9.3f} {a_s:>11} {a_f:>9}  {regime}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The ``qae`` argument parser with every sub-command."""
    from qae import __version__
    from qae.advantages import QUANTILE_METHODS

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
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``qae`` command."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except ValueError as err:
        print(f"qae {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
