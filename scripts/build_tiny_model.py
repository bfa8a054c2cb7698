"""Rebuild the shipped tiny model: pre-train from a seed, measure, save.

    python scripts/build_tiny_model.py                 # rewrite src/qae/tasks/assets
    python scripts/build_tiny_model.py --out /tmp/tiny --seed 1

Every field of ``qae.tasks.tiny_model.PretrainConfig`` is a flag (``--max-steps``,
``--target-pass-at-1``, ...); the defaults reproduce the shipped weights on a CPU with
the same torch version and thread count.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

from qae.tasks.tiny_model import PretrainConfig, build_tiny_model, tiny_model_path


def _parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=tiny_model_path(), help="output directory")
    parser.add_argument(
        "--val-samples", type=int, default=4, help="samples per prompt for pass@1 at T=1"
    )
    defaults = PretrainConfig()
    for f in dataclasses.fields(PretrainConfig):
        flag = "--" + f.name.replace("_", "-")
        value = getattr(defaults, f.name)
        if f.name == "target_pass_at_1":
            parser.add_argument(
                flag, type=float, default=value, help="dev greedy pass@1 to stop at"
            )
        elif f.name == "level_weights":
            parser.add_argument(
                flag, type=float, nargs="+", default=value, help="training weight of each level"
            )
        else:
            parser.add_argument(flag, type=type(value), default=value)
    return parser.parse_args()


def main() -> None:
    args = _parse_args()
    settings = {f.name: getattr(args, f.name) for f in dataclasses.fields(PretrainConfig)}
    if settings["level_weights"] is not None:
        settings["level_weights"] = tuple(settings["level_weights"])
    info = build_tiny_model(
        args.out, PretrainConfig(**settings), val_samples=args.val_samples, log=print
    )
    summary = {
        "out": str(args.out),
        "parameters": info["parameters"],
        "steps": info["steps"],
        "train_seconds": info["train_seconds"],
        "validation_greedy": info["validation"]["greedy"],
        "validation_temperature_1": info["validation"]["temperature_1"],
        "generation_timing": info["generation_timing"],
    }
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
