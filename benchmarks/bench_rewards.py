"""Scoring throughput of the math reward: in-process (serial) against the worker pool.

Responses are MATH-500 answers (from ../shared/data/benchmarks when present, else synthetic
fractions) written as ``\\boxed{...}`` at the end of ~1.5k characters of reasoning text; half
carry the right answer, half another problem's answer. A cheap exact-match verifier is timed
too, on a batch the size of one step of the embedded default (16 prompts x 8 samples).

    python benchmarks/bench_rewards.py            # 500 responses per row
    python benchmarks/bench_rewards.py --quick    # 128 responses per row
"""

from __future__ import annotations

import argparse
import os
import platform
import random
import time
from pathlib import Path

from qae.rewards import score_batch

BENCH = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "benchmarks"
FILLER = (
    "Let us set up the problem carefully. We expand, collect like terms and simplify; "
    "checking the boundary cases shows that nothing is lost. "
) * 12
# Time of one RL step of the embedded default measured on 2 CPU cores (16 prompts x 8).
STEP_SECONDS = 0.38


def exact_match(response: str, truth: object) -> float:
    """Stand-in for a cheap exact verifier: the text after the last '=' equals the truth."""
    return float(response.rsplit("=", 1)[-1].strip() == str(truth))


def answers() -> list[str]:
    path = BENCH / "math500.jsonl"
    if path.is_file():
        from qae.data import load_prompts

        return [r.answer for r in load_prompts(path)]
    rng = random.Random(0)
    return [f"\\frac{{{rng.randint(1, 99)}}}{{{rng.randint(2, 99)}}}" for _ in range(500)]


def batch(size: int) -> tuple[list[str], list[str]]:
    gold = answers()
    rng = random.Random(0)
    responses, truths = [], []
    for i in range(size):
        g = gold[i % len(gold)]
        shown = g if i % 2 == 0 else gold[rng.randrange(len(gold))]
        responses.append(f"{FILLER}\nTherefore the answer is $\\boxed{{{shown}}}$.")
        truths.append(g)
    return responses, truths


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="128 responses per row")
    parser.add_argument("--workers", type=int, default=2, help="pool size")
    args = parser.parse_args()
    size = 128 if args.quick else 500
    responses, truths = batch(size)

    print(f"python {platform.python_version()}, {os.cpu_count()} cpus, {size} responses")
    header = f"{'reward':<12} {'mode':<18} {'seconds':>8} {'responses/s':>12}"
    print(header)
    print("-" * len(header))
    # Each mode scores the batch once untimed first: sympy's caches and the workers' start-up
    # are not what is measured (a training run scores thousands of batches).
    rows = [("math", "serial", 0), ("math", f"pool ({args.workers} workers)", args.workers)]
    for name, mode, workers in rows:
        score_batch(name, responses, truths, workers=workers)
        t = timed(lambda n=name, w=workers: score_batch(n, responses, truths, workers=w))
        print(f"{name:<12} {mode:<18} {t:>8.2f} {size / t:>12.0f}")

    step = [f"{FILLER} 3+4={i % 9}" for i in range(128)]
    step_truth = [7] * 128
    t_serial = min(timed(lambda: score_batch(exact_match, step, step_truth)) for _ in range(5))
    t_pool = min(
        timed(lambda: score_batch(exact_match, step, step_truth, workers=args.workers))
        for _ in range(5)
    )
    for mode, t in (("serial", t_serial), (f"pool ({args.workers} workers)", t_pool)):
        print(f"{'exact':<12} {mode:<18} {t:>8.4f} {128 / t:>12.0f}")
    print(
        f"\nexact verifier, one embedded-default step (128 responses): {1e3 * t_serial:.2f} ms "
        f"serial = {100 * t_serial / STEP_SECONDS:.2f}% of a {STEP_SECONDS} s step"
    )


if __name__ == "__main__":
    main()
