"""``qae eval``: the command line of :func:`qae.eval.evaluate.evaluate`.

Loads the problems (benchmarks, files, hub datasets or a built-in task's validation split)
and the model, evaluates, and prints the table; ``auto`` settings resolve to a built-in
task's own verifier, template and length limit.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from qae.eval.datasets import PromptRecord
from qae.eval.evaluate import SAMPLES_FILE, SUMMARY_FILE, _check_args, evaluate
from qae.eval.metrics import format_table
from qae.eval.prompts import prompt_templates
from qae.rewards import DEFAULT_TIMEOUT

__all__ = ["add_eval_parser"]


def _parse_ks(text: str) -> list[int]:
    try:
        ks = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--k expects integers like 1,16; got {text!r}") from None
    if not ks:
        raise argparse.ArgumentTypeError(f"--k expects integers like 1,16; got {text!r}")
    return ks


def _auto_settings(args: argparse.Namespace, sources: Sequence[str]) -> tuple[str, str, int]:
    """``(reward, template, max_new_tokens)`` with each ``auto`` resolved: a built-in task's
    verifier, the raw template and its length limit when every source is that task;
    ``math``, ``dapo`` and 1024 otherwise."""
    from qae.tasks.builtin import builtin_task, is_builtin

    builtin = [builtin_task(s, field="--data") for s in sources if is_builtin(s)]
    one_task = len({t.name for t in builtin}) == 1 and len(builtin) == len(sources)
    task = builtin[0] if one_task else None
    if task is None and builtin and "auto" in (args.reward, args.template):
        raise ValueError(
            f"--data {args.data!r} mixes a built-in task with other sources: name --reward "
            "and --template explicitly"
        )
    reward = args.reward if args.reward != "auto" else (task.reward if task else "math")
    template = args.template if args.template != "auto" else ("raw" if task else "dapo")
    max_new = args.max_new_tokens or (task.max_new_tokens if task else 1024)
    return reward, template, max_new


def _load_model(name: str, device: str, dtype: Any) -> tuple[Any, Any]:
    """``(model, tokenizer)`` of ``--model``: a local directory, a hub id or a built-in task's
    base policy; one that cannot be loaded raises ``ValueError`` in one line."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from qae.tasks.builtin import builtin_task, is_builtin

    path = str(builtin_task(name, field="--model").model_path()) if is_builtin(name) else name
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    except (OSError, ValueError, KeyError) as err:
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        shown = name if path == name else f"{name} ({path})"
        raise ValueError(
            f"--model {shown!r} could not be loaded as a causal LM (a local directory with "
            f"config.json and weights, a hub id reachable from here, or builtin[:task]): {first}"
        ) from None
    return model.to(device), tokenizer


def _check_flags(args: argparse.Namespace) -> None:
    """Reject flags that cannot work before anything is loaded, naming the flags."""
    if args.n < 1:
        raise ValueError(f"--n must be >= 1 (samples per problem), got --n {args.n}")
    if args.k is None:
        args.k = sorted({1, min(16, args.n)})
    bad = [k for k in args.k if not 1 <= k <= args.n]
    if bad:
        raise ValueError(
            f"--k {','.join(map(str, args.k))} asks for pass@{bad[0]} from --n {args.n} "
            f"samples per problem: every k must be in [1, n]; raise --n or lower --k"
        )
    if args.limit is not None and args.limit < 0:
        raise ValueError(f"--limit must be >= 0, got --limit {args.limit}")
    if args.threads < 0:
        raise ValueError(f"--threads must be >= 0 (0 = auto), got --threads {args.threads}")
    _check_args(args.n, args.k, args.temperature, args.top_p, args.batch_size)


def _default_out(now: float | None = None) -> str:
    """The output folder of a ``qae eval`` without ``--out``: ``runs/eval-<date>-<time>``."""
    import time

    return time.strftime("runs/eval-%Y%m%d-%H%M%S", time.localtime(now))


def _run_eval(args: argparse.Namespace) -> int:
    """``qae eval``: check the flags, load the data and the model, evaluate, print the table."""
    import torch

    from qae.eval.datasets import load_prompts
    from qae.tasks.builtin import builtin_records, is_builtin

    _check_flags(args)
    if not args.out:
        args.out = _default_out()
    print(f"qae eval: writing to {args.out} (the same --out resumes this evaluation)", flush=True)
    records: list[PromptRecord] = []
    sources = [s.strip() for s in args.data.split(",") if s.strip()]
    for source in sources:
        if is_builtin(source):
            records.extend(builtin_records(source, "validation", field="--data")[: args.limit])
            continue
        records.extend(
            load_prompts(
                source,
                split=args.split,
                problem_key=args.problem_key,
                answer_key=args.answer_key,
                data_dir=args.data_dir,
                limit=args.limit,
            )
        )
    if not records:
        raise ValueError(f"--data {args.data!r} holds no problems")
    reward, template, max_new_tokens = _auto_settings(args, sources)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = {
        "auto": "auto",
        "float32": torch.float32,
        "bfloat16": torch.bfloat16,
        "float16": torch.float16,
    }[args.dtype]
    model, tokenizer = _load_model(args.model, device, dtype)
    summary = evaluate(
        model,
        tokenizer,
        records,
        n=args.n,
        temperature=args.temperature,
        top_p=args.top_p,
        max_new_tokens=max_new_tokens,
        ks=args.k,
        reward=reward,
        out_dir=args.out,
        batch_size=args.batch_size,
        seed=args.seed,
        template=template,
        workers=args.workers,
        timeout=args.timeout,
        progress=not args.no_progress,
        threads=args.threads,
    )
    print(format_table(summary))
    print(f"samples: {Path(args.out) / SAMPLES_FILE}\nsummary: {Path(args.out) / SUMMARY_FILE}")
    return 0


def add_eval_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``eval`` sub-command to ``subparsers`` (from ``add_subparsers``)."""
    p = subparsers.add_parser(
        "eval",
        help="sample n responses per problem and report pass@k, mean@n, maj@n",
        description="Evaluate a causal LM on math benchmarks: n samples per problem, scored "
        "by a verifiable reward. Writes samples.jsonl and summary.json to --out and resumes "
        "an interrupted run in the same folder.",
    )
    p.add_argument(
        "--model",
        required=True,
        help="local path, Hugging Face model id, or a built-in task's base policy "
        "(builtin, builtin:arithmetic, builtin:reasoning)",
    )
    p.add_argument(
        "--data",
        required=True,
        help="comma-separated benchmark names (aime24, aime25, amc23, math500, gsm8k: shipped "
        "with qae, no network needed), .jsonl/.parquet files, hub dataset ids, or a built-in "
        "task's validation split (builtin:arithmetic, builtin:reasoning)",
    )
    p.add_argument(
        "--data-dir",
        default=None,
        help="folder searched for <benchmark>.jsonl before the copy shipped with qae",
    )
    p.add_argument("--split", default=None, help="dataset split for hub sources")
    p.add_argument("--problem-key", default=None, help="field holding the problem")
    p.add_argument("--answer-key", default=None, help="field holding the answer (dots allowed)")
    p.add_argument("--limit", type=int, default=None, help="first N problems of each source")
    p.add_argument("--n", type=int, default=32, help="samples per problem")
    p.add_argument("--temperature", type=float, default=0.7, help="sampling temperature")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling threshold")
    p.add_argument(
        "--max-new-tokens",
        type=int,
        default=0,
        help="response length limit (0: a built-in task's own, else 1024)",
    )
    p.add_argument(
        "--k",
        type=_parse_ks,
        default=None,
        help="pass@k values, e.g. 1,16 (default: 1 and min(16, n))",
    )
    p.add_argument(
        "--template",
        default="auto",
        choices=["auto", *prompt_templates.names()],
        help="prompt template for problems stored as plain text (auto: raw for a built-in "
        "task, else dapo)",
    )
    p.add_argument(
        "--reward",
        default="auto",
        help="registered reward function name (auto: a built-in task's verifier, else math)",
    )
    p.add_argument(
        "--out",
        default=None,
        help="output folder, resumed if it holds the same evaluation (default: "
        "runs/eval-<date>-<time>, printed at the start)",
    )
    p.add_argument("--batch-size", type=int, default=32, help="sequences per generate call")
    p.add_argument("--seed", type=int, default=0, help="sampling seed")
    p.add_argument("--workers", type=int, default=None, help="scoring processes (0: in-process)")
    p.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT, help="seconds per score")
    p.add_argument("--device", default=None, help="torch device (default: cuda if available)")
    p.add_argument(
        "--threads",
        type=int,
        default=0,
        help="CPU threads for torch; 0 = auto: one per core while the machine is quiet, "
        "fewer while other processes keep the cores busy",
    )
    p.add_argument(
        "--dtype",
        default="auto",
        choices=("auto", "float32", "bfloat16", "float16"),
        help="model weights dtype",
    )
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    p.set_defaults(func=_run_eval)
    return p
