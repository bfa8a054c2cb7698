"""Rebuild a shipped tiny model: pre-train from a seed, measure, save.

    python scripts/build_tiny_model.py                          # arithmetic: src/qae/tasks/assets
    python scripts/build_tiny_model.py --task reasoning         # src/qae/tasks/assets/reasoning
    python scripts/build_tiny_model.py --out /tmp/tiny --seed 1

Every field of the task's pre-training config (``qae.tasks.tiny_model.PretrainConfig``,
``qae.tasks.reasoning_model.ReasoningPretrainConfig``) is a flag (``--max-steps``,
``--slip``, ...); the defaults reproduce the shipped weights on a CPU with the same torch
version and thread count.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

from qae.tasks.reasoning_model import (
    REASONING,
    ReasoningPretrainConfig,
    reasoning_model_path,
)
from qae.tasks.tiny_model import ARITHMETIC, PretrainConfig, build_tiny_model, tiny_model_path

TASKS = {
    "arithmetic": (ARITHMETIC, PretrainConfig, tiny_model_path, 4),
    "reasoning": (REASONING, ReasoningPretrainConfig, reasoning_model_path, 16),
}


def _parse_args(argv: list[str]) -> argparse.Namespace:
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--task", choices=sorted(TASKS), default="arithmetic")
    task = pre.parse_known_args(argv)[0].task
    _, config_cls, default_out, val_samples = TASKS[task]
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], parents=[pre])
    parser.add_argument("--out", type=Path, default=default_out(), help="output directory")
    parser.add_argument(
        "--val-samples",
        type=int,
        default=val_samples,
        help="samples per validation prompt for pass@1 and the spread at T=1",
    )
    defaults = config_cls()
    for f in dataclasses.fields(config_cls):
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
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = _parse_args(sys.argv[1:] if argv is None else argv)
    task, config_cls, _, _ = TASKS[args.task]
    settings = {f.name: getattr(args, f.name) for f in dataclasses.fields(config_cls)}
    if settings["level_weights"] is not None:
        settings["level_weights"] = tuple(settings["level_weights"])
    info = build_tiny_model(
        args.out, config_cls(**settings), val_samples=args.val_samples, task=task, log=print
    )
    summary = {
        "task": args.task,
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
