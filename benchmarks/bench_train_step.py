"""Time per phase and tokens/s of one training step of the arithmetic preset, against TRL.

Claim measured: one RL step of the arithmetic preset (built-in tiny Qwen2, built-in
arithmetic task, 16 prompts x 8 samples, temperature 1.0, one PPO update per step, token-mean,
clip 0.2/0.28) takes no longer than one step of TRL's ``GRPOTrainer`` set up the same way.

Usage::

    python benchmarks/bench_train_step.py                  # 2 rounds of 20 steps after 5 warm-up
    python benchmarks/bench_train_step.py --steps 20 --warmup 5 --threads 2
    python benchmarks/bench_train_step.py --skip-trl       # qae only

qae runs through ``qae.train.trainer.train`` with ``eval.enabled false`` and
``rollout.dynamic_sampling false``, so that each step generates exactly one batch of 128
responses, and the figures are the trainer's own per-step metrics from ``metrics.jsonl``
(``time/generate``, ``time/score``, ``time/logprob``, ``time/train``, ``time/step``,
``perf/tokens_per_s``), averaged over the steps after the warm-up. qae runs in three
settings:

- ``default``: as shipped. Responses whose advantage is exactly 0 leave the backward pass
  (``trainer.skip_zero_adv``) but get a forward pass without gradient so that entropy
  metrics cover the whole batch (``trainer.full_batch_metrics``); every
  ``trainer.diagnostics_every`` steps a further forward pass computes token-level views.
- ``metrics on updated rows``: ``full_batch_metrics false``, diagnostics off; the fastest
  setting.
- ``every row in backward``: ``skip_zero_adv false``, diagnostics off; every response goes
  through forward and backward as in TRL: the like-for-like row.

TRL (when importable) runs in the same process on the same model weights, the same prompt
stream (the records ``qae.train.trainer`` draws from ``arithmetic.iter_train(seed)``, in order),
16 prompts x 8 generations per optimizer step (``per_device_train_batch_size=128``,
``gradient_accumulation_steps=1``, ``steps_per_generation=1``), the same generation length,
sampling (temperature 1, top_p 1, top_k 0), loss (``loss_type="dapo"`` = token-mean,
epsilon 0.2 / 0.28, ``beta=0``: no reference model), AdamW at the same constant learning
rate with the same gradient clip, float32 on the CPU with the same torch threads, and a
reward function around ``arithmetic_score``. Its steps are timed by a ``TrainerCallback``
(``on_step_begin`` to ``on_step_end``); its phases by wrapping the trainer's ``_generate``,
``_calculate_rewards`` and ``_generate_and_score_completions``.

What still differs (see the table's notes): the advantage estimator (qae: QAE K=0.4; TRL:
GRPO's mean baseline with group std scaling; this changes no cost except qae's zero-advantage
skipping); qae forwards in micro-batches of 64 responses, TRL in one of 128; TRL projects only
the response positions through the LM head, qae gathers them from the full logits; both take
the old log-probs from the update's own forward pass (one PPO update on fresh samples), so
neither runs a separate log-prob pass; both compute token entropy as a metric.

Noise: each trainer runs ``--rounds`` times (odd rounds in reverse order) and the table
pools the timed steps. Besides wall-clock seconds it gives the process CPU seconds per step,
which move less than wall time when other jobs share the cores. ``--threads`` defaults to 1:
on a 2-core machine shared with other jobs, two torch threads per process made steps several
times slower and erratic.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from qae.io.configtools import apply_overrides
from qae.train.config import TrainConfig, load_preset

PROMPTS, GROUP = 16, 8  # the arithmetic preset's batch: P prompts x G samples per step
PHASES = ("generate", "score", "logprob", "train", "other", "step")


def qae_config(out: Path, steps: int, threads: int, seed: int, **extra: Any) -> TrainConfig:
    """The arithmetic preset (the setting measured against TRL), made to generate one batch
    per step and to log quietly."""
    cfg = load_preset("arithmetic")
    overrides = {
        "eval.enabled": False,
        "rollout.dynamic_sampling": False,
        "trainer.steps": steps,
        "trainer.threads": threads,
        "trainer.seed": seed,
        "data.seed": seed,
        "log.out": str(out),
        "log.progress": False,
        "log.tensorboard": False,
        "log.checkpoint_every": 0,
    }
    overrides.update(extra)
    return apply_overrides(cfg, overrides)


Rows = list[dict[str, float]]
Gaps = list[tuple[float, float]]


def summarize(rows: Rows, gaps: Gaps) -> dict[str, float]:
    """Means over timed steps: phase seconds, tokens per step, tokens/s, accuracy, and the
    wall-clock and process CPU seconds between the ends of consecutive steps (``gaps``)."""
    out = {p: statistics.fmean(r[p] for r in rows) for p in PHASES}
    out["step_sd"] = statistics.stdev(r["step"] for r in rows) if len(rows) > 1 else 0.0
    for key in ("tokens", "tokens_per_s", "accuracy"):
        out[key] = statistics.fmean(r[key] for r in rows)
    out["wall"] = statistics.fmean(g[0] for g in gaps) if gaps else float("nan")
    out["cpu"] = statistics.fmean(g[1] for g in gaps) if gaps else float("nan")
    out["steps"] = len(rows)
    return out


def _now() -> tuple[float, float]:
    return time.perf_counter(), time.process_time()


def _gaps(ends: dict[int, tuple[float, float]], steps: list[int]) -> Gaps:
    return [
        (ends[s][0] - ends[s - 1][0], ends[s][1] - ends[s - 1][1])
        for s in steps
        if s - 1 in ends and s in ends
    ]


def run_qae(cfg: TrainConfig, warmup: int) -> tuple[Rows, Gaps]:
    """Train with ``cfg``; its own per-step metrics after ``warmup`` steps, and the gaps
    between the ends of consecutive steps."""
    from qae.train.trainer import train

    stamps: dict[int, tuple[float, float]] = {}

    def on_step(step: int, _metrics: dict[str, float]) -> None:
        stamps[step] = _now()

    train(cfg, resume=False, on_step=on_step)
    rows = []
    with open(Path(cfg.log.out) / "metrics.jsonl", encoding="utf-8") as fh:
        for line in fh:
            m = json.loads(line)
            if m.get("step", 0) <= warmup:
                continue
            phases = {p: m[f"time/{p}"] for p in ("generate", "score", "logprob", "train")}
            tokens = m["response/len_mean"] * m["batch/responses"]
            rows.append(
                {
                    **phases,
                    "step": m["time/step"],
                    "other": m["time/step"] - sum(phases.values()),
                    "tokens": tokens,
                    "tokens_per_s": m["perf/tokens_per_s"],
                    "accuracy": m["reward/accuracy"],
                }
            )
    # The last step also writes the final checkpoint: its gap is left out when there are
    # others.
    timed = list(range(warmup + 1, cfg.trainer.steps + 1))
    return rows, _gaps(stamps, timed[:-1] if len(timed) > 1 else timed)


def _timed(store: dict[str, float], key: str, fn: Callable) -> Callable:
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        t0 = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            store[key] = store.get(key, 0.0) + time.perf_counter() - t0

    return wrapper


def run_trl(
    steps: int, warmup: int, threads: int, seed: int, out: Path, lr: float
) -> tuple[Rows, Gaps]:
    """TRL's GRPOTrainer on the same model, prompt stream, batch, sampling and loss."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from transformers.trainer_callback import PrinterCallback, ProgressCallback
    from transformers.utils import logging as hf_logging
    from trl import GRPOConfig, GRPOTrainer

    from qae.tasks import arithmetic_score, tiny_model_path
    from qae.tasks.tiny_model import MAX_NEW_TOKENS
    from qae.train.trainer import load_task_data

    hf_logging.set_verbosity_error()
    torch.set_num_threads(threads)
    path = str(tiny_model_path())
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)

    # The very records (and prompt text) qae's trainer draws, in the order it draws them.
    cfg = qae_config(out / "unused", steps, threads, seed)
    data = load_task_data(cfg, tokenizer)
    records = data.train.take(PROMPTS * steps)
    dataset = Dataset.from_dict(
        {
            "prompt": [data.format_prompt(r) for r in records],
            "answer": [r.answer for r in records],
        }
    )

    def arithmetic_reward(completions: list[str], answer: list[str], **_: Any) -> list[float]:
        return [arithmetic_score(c, a) for c, a in zip(completions, answer, strict=True)]

    args = GRPOConfig(
        output_dir=str(out / "trl"),
        use_cpu=True,
        bf16=False,
        fp16=False,
        seed=seed,
        max_steps=steps,
        per_device_train_batch_size=PROMPTS * GROUP,
        gradient_accumulation_steps=1,
        steps_per_generation=1,
        num_generations=GROUP,
        max_completion_length=MAX_NEW_TOKENS,
        temperature=1.0,
        top_p=1.0,
        top_k=0,
        loss_type="dapo",
        epsilon=0.2,
        epsilon_high=0.28,
        beta=0.0,
        num_iterations=1,
        learning_rate=lr,
        lr_scheduler_type="constant",
        warmup_steps=0,
        max_grad_norm=1.0,
        weight_decay=0.0,
        optim="adamw_torch",
        gradient_checkpointing=False,
        shuffle_dataset=False,
        use_vllm=False,
        report_to="none",
        logging_steps=1,
        save_strategy="no",
        disable_tqdm=True,
        log_completions=False,
        dataloader_num_workers=0,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = GRPOTrainer(
            model=model,
            reward_funcs=arithmetic_reward,
            args=args,
            train_dataset=dataset,
            processing_class=tokenizer,
        )
    trainer.remove_callback(PrinterCallback)
    trainer.remove_callback(ProgressCallback)

    phase: dict[str, float] = {}
    trainer._generate = _timed(phase, "generate", trainer._generate)
    trainer._calculate_rewards = _timed(phase, "score", trainer._calculate_rewards)
    trainer._generate_and_score_completions = _timed(
        phase, "rollout", trainer._generate_and_score_completions
    )

    class StepTimer(TrainerCallback):
        def __init__(self) -> None:
            self.begin = 0.0
            self.rows: dict[int, dict[str, float]] = {}
            self.ends: dict[int, tuple[float, float]] = {}

        def on_step_begin(self, args, state, control, **kwargs):
            phase.clear()
            self.begin = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            now = _now()
            step = now[0] - self.begin
            rollout = phase.get("rollout", 0.0)
            self.rows[state.global_step] = {
                "generate": phase.get("generate", 0.0),
                "score": phase.get("score", 0.0),
                "logprob": 0.0,  # no separate pass: the update's forward gives the old log-probs
                "train": step - rollout,  # loss forward/backward, clip, optimizer step
                "other": rollout - phase.get("generate", 0.0) - phase.get("score", 0.0),
                "step": step,
            }
            self.ends[state.global_step] = now

        def on_log(self, args, state, control, logs=None, **kwargs):
            row = self.rows.get(state.global_step)
            if row is not None and logs and "completions/mean_length" in logs:
                row["tokens"] = logs["completions/mean_length"] * PROMPTS * GROUP
                row["tokens_per_s"] = row["tokens"] / row["step"]
                row["accuracy"] = logs["rewards/arithmetic_reward/mean"]
                row["threads"] = torch.get_num_threads()

    timer = StepTimer()
    trainer.add_callback(timer)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.train()
    rows = [timer.rows[s] for s in sorted(timer.rows) if s > warmup]
    if any("tokens" not in r for r in rows):
        raise RuntimeError("TRL logged no completions/mean_length for some steps")
    if any(r["threads"] != threads for r in rows):
        raise RuntimeError(f"TRL's steps did not run on {threads} torch threads")
    return rows, _gaps(timer.ends, [s for s in sorted(timer.ends) if s > warmup])


def fmt_row(name: str, r: dict[str, float], ref: dict[str, float] | None) -> str:
    ms = {p: f"{1000 * r[p]:.0f}" for p in PHASES}
    row = (
        f"| {name} | {ms['generate']} | {ms['score']} | {ms['logprob']} | {ms['train']} | "
        f"{ms['other']} | {ms['step']} ± {1000 * r['step_sd']:.0f} | {1000 * r['wall']:.0f} | "
        f"{1000 * r['cpu']:.0f} | {r['tokens']:.0f} | {r['tokens_per_s']:.0f} | "
        f"{r['accuracy']:.2f} |"
    )
    return row if ref is None else row + f" {ref['step'] / r['step']:.2f} |"


def _has_field(name: str) -> bool:
    return any(f.name == name for f in dataclasses.fields(TrainConfig().trainer))


def run_all(
    args: argparse.Namespace, out: Path, trl_version: str
) -> tuple[dict[str, dict[str, float]], list[dict[str, float]]]:
    """Every trainer ``args.rounds`` times, in turn; pooled summaries and per-round s/step."""
    # The periodic token-level diagnostics (an extra forward pass every N steps) stay on in
    # the default row only; TRL has nothing like them.
    no_diag = {"trainer.diagnostics_every": 0} if _has_field("diagnostics_every") else {}
    runs: list[tuple[str, dict[str, Any] | None]] = [
        ("qae (default)", {}),
        ("qae (metrics on updated rows)", {"trainer.full_batch_metrics": False, **no_diag}),
        ("qae (every row in backward)", {"trainer.skip_zero_adv": False, **no_diag}),
    ]
    if trl_version:
        runs.append((f"TRL {trl_version} GRPOTrainer", None))
    total = args.steps + args.warmup
    pooled: dict[str, tuple[Rows, Gaps]] = {name: ([], []) for name, _ in runs}
    per_round: list[dict[str, float]] = []
    for rnd in range(args.rounds):
        step_s: dict[str, float] = {}
        # Odd rounds run in reverse order, so that a load that drifts during the run
        # (other jobs on the machine) favours no trainer.
        order = list(enumerate(runs))
        for i, (name, extra) in order[::-1] if rnd % 2 else order:
            t0 = time.perf_counter()
            run_dir = out / f"round{rnd}"
            if extra is not None:
                cfg = qae_config(run_dir / f"qae-{i}", total, args.threads, args.seed, **extra)
                rows, gaps = run_qae(cfg, args.warmup)
            else:
                lr = load_preset("arithmetic").optim.lr
                rows, gaps = run_trl(total, args.warmup, args.threads, args.seed, run_dir, lr)
            pooled[name][0].extend(rows)
            pooled[name][1].extend(gaps)
            step_s[name] = statistics.fmean(r["step"] for r in rows)
            print(f"  round {rnd + 1}, {name}: {time.perf_counter() - t0:.1f} s", file=sys.stderr)
        per_round.append(step_s)
    return {name: summarize(*pooled[name]) for name, _ in runs}, per_round


def print_report(
    results: dict[str, dict[str, float]], per_round: list[dict[str, float]], with_trl: bool
) -> None:
    names = list(results)
    ref = results[names[-1]] if with_trl else None
    header = (
        "| trainer | generate ms | score ms | logprob ms | train ms | other ms | step ms "
        "(± sd) | wall ms | cpu ms | tokens/step | tokens/s | accuracy |"
    )
    print()
    print(header + (" TRL s/step ÷ this |" if with_trl else ""))
    print("|---|" + "---:|" * (header.count("|") - 2 + with_trl))
    for name in names:
        print(fmt_row(name, results[name], ref))
    if ref is not None:
        print()
        for name in names[:-1]:
            r = results[name]
            rounds = ", ".join(f"{s[names[-1]] / s[name]:.2f}" for s in per_round)
            print(
                f"{name}: TRL s/step / qae s/step = {ref['step'] / r['step']:.2f} (per round: "
                f"{rounds}); TRL cpu/step / qae cpu/step = {ref['cpu'] / r['cpu']:.2f}; "
                f"completion tokens/s qae {r['tokens_per_s']:.0f}, TRL {ref['tokens_per_s']:.0f}"
            )
    print(
        "\nstep: the trainer's own step time (qae: time/step; TRL: on_step_begin to "
        "on_step_end). wall / cpu: wall-clock / process CPU time between the ends of "
        "consecutive steps, logging included (cpu is the steadier figure when other jobs "
        "share the machine). train: qae's update (forward/backward, "
        "optimizer, no-grad forward of the rows it skips); TRL's loss forward/backward, clip "
        "and optimizer step. other: advantages and bookkeeping. logprob 0: neither runs a "
        "separate old-log-prob pass. accuracy: mean verifier score of the sampled responses."
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20, help="timed steps (after warm-up)")
    parser.add_argument("--warmup", type=int, default=5, help="steps run first, not timed")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads for both")
    parser.add_argument("--rounds", type=int, default=2, help="run every trainer this often")
    parser.add_argument("--seed", type=int, default=0, help="training and prompt-order seed")
    parser.add_argument("--skip-trl", action="store_true", help="time qae only")
    parser.add_argument("--out", default="", help="keep the run directories here (empty dir)")
    args = parser.parse_args()
    if args.steps < 1 or args.warmup < 0 or args.threads < 1 or args.rounds < 1:
        parser.error("--steps, --threads and --rounds must be >= 1 and --warmup >= 0")

    trl_version = ""
    if not args.skip_trl:
        try:
            import trl

            trl_version = trl.__version__
        except ImportError:
            print("TRL is not importable: timing qae only (pip install trl)")
    import transformers
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # weight loading/saving bars
    print(
        f"python {platform.python_version()}, torch {torch.__version__}, transformers "
        f"{transformers.__version__}" + (f", trl {trl_version}" if trl_version else "")
    )
    print(
        f"{os.cpu_count()} cpus, torch threads {args.threads}; {args.rounds} round(s) of "
        f"{args.steps} timed steps after {args.warmup} warm-up; {PROMPTS} prompts x {GROUP} "
        f"samples per step; one generation batch per step (dynamic sampling off), "
        f"validation off"
    )
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        results, per_round = run_all(args, Path(args.out), trl_version)
    else:
        with tempfile.TemporaryDirectory(prefix="bench_train_step_") as tmp:
            results, per_round = run_all(args, Path(tmp), trl_version)
    print_report(results, per_round, bool(trl_version))


if __name__ == "__main__":
    main()
