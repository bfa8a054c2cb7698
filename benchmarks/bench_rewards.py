"""Math reward throughput side by side with plain math-verify, on realistic groups.

Groups as an RL step scores them: MATH-500 problems (from ../shared/data/benchmarks when
present, else synthetic fractions) x G responses of ~1.5k characters of reasoning with
inline math, whose final answers cluster on the gold answer and a few distractors (two
arithmetic slips of the gold answer and another problem's answer), written as real models
write them (a box after "the answer is", "The
final answer is $\\boxed{..}$. I hope it is correct.", a display box under **Final Answer**).

Rows, all on the same responses in one run, each in a fresh process:
- plain math-verify: ``verify(parse(gold), parse(response))`` per response, in-process;
- qae in-process: ``score_batch("math", ..., workers=0)``;
- qae pool: ``score_batch("math", ..., workers=N)`` (the training path).
Verdicts must be identical; the script prints every response where they differ. Each row
first scores 100 other problems (imports, worker start-up, parser warm-up: a training run
scores thousands of batches), and no row can find the timed answers in a cache another
row filled. A cheap exact verifier on one step of
the arithmetic preset is timed too (in-process vs pool overhead).

    python benchmarks/bench_rewards.py            # 100 problems x 16 responses
    python benchmarks/bench_rewards.py --quick    # 20 problems x 16 responses
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import random
import subprocess
import sys
import time
from pathlib import Path

from qae.rewards import score_batch

BENCH = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "benchmarks"
SENTENCES = (
    "Let $x = {a}$ and $y = {b}$, so that $x + y = {s}$.",
    "We expand $({a}t + {b})^2 = {a2}t^2 + {ab2}t + {b2}$ and collect like terms.",
    "Checking the boundary case $n = {a}$ gives $n^2 = {a2}$, which is consistent.",
    "Since ${a} \\cdot {b} = {ab}$, the product is positive and nothing is lost.",
    "Dividing both sides by ${b}$ gives $\\frac{{{ab}}}{{{b}}} = {a}$.",
    "Now we consider the remaining cases one at a time and verify each of them.",
    "By the triangle inequality the sum is at most ${s}$, with equality when $x = y$.",
)
ENDINGS = (
    "\nTherefore, the answer is $\\boxed{{{ans}}}$.",
    "\nThe final answer is $\\boxed{{{ans}}}$. I hope it is correct.",
    "\n\n**Final Answer**\n\\[\n\\boxed{{{ans}}}\n\\]",
)
# Exact-verifier row: one step of the arithmetic preset measured on 2 CPU cores (16 x 8).
STEP_SECONDS = 0.38
FILLER = "We expand, collect like terms and simplify; nothing is lost. " * 12


def answers() -> list[str]:
    """The MATH-500 answers, or 500 synthetic fractions when the data is absent."""
    path = BENCH / "math500.jsonl"
    if path.is_file():
        from qae.eval.datasets import load_prompts

        return [r.answer for r in load_prompts(path)]
    rng = random.Random(0)
    return [f"\\frac{{{rng.randint(1, 99)}}}{{{rng.randint(2, 99)}}}" for _ in range(500)]


def reasoning(rng: random.Random, chars: int) -> str:
    """About ``chars`` characters of reasoning text with inline math, different each call."""
    parts: list[str] = []
    while sum(len(p) + 1 for p in parts) < chars:
        a, b = rng.randint(2, 99), rng.randint(2, 99)
        parts.append(
            rng.choice(SENTENCES).format(
                a=a, b=b, s=a + b, ab=a * b, a2=a * a, b2=b * b, ab2=2 * a * b
            )
        )
    return " ".join(parts)


def slip(answer: str, rng: random.Random) -> str:
    """A wrong answer of the same kind: one digit of ``answer`` changed (an arithmetic slip)."""
    digits = [i for i, ch in enumerate(answer) if ch.isdigit()]
    if not digits:
        return answer + "+1"
    i = rng.choice(digits)
    return answer[:i] + rng.choice([d for d in "0123456789" if d != answer[i]]) + answer[i + 1 :]


def groups(
    gold: list[str], problems: range, size: int, seed: int, others: range
) -> tuple[list[str], list[str]]:
    """``size`` responses per problem: half end on the gold answer, the rest on one of three
    distractors (two slips of the gold, one answer of a problem in ``others``), in the styles
    of ``ENDINGS``."""
    rng = random.Random(seed)
    responses, truths = [], []
    for p in problems:
        distractors = [slip(gold[p], rng), slip(gold[p], rng), gold[rng.choice(others)]]
        for _ in range(size):
            ans = gold[p] if rng.random() < 0.5 else rng.choice(distractors)
            ending = rng.choices(ENDINGS, weights=(7, 2, 1))[0].format(ans=ans)
            responses.append(reasoning(rng, 1500 - len(ending)) + ending)
            truths.append(gold[p])
    return responses, truths


def plain_math_verify(responses: list[str], truths: list[str], workers: int = 0) -> list[float]:
    """math-verify as its README shows it: parse both, then verify (gold first). The gold is
    wrapped in ``$...$`` as math-verify expects (a bare ``\\pi`` would parse to nothing)."""
    from math_verify import parse, verify

    return [
        float(verify(parse(f"${g}$"), parse(r))) for r, g in zip(responses, truths, strict=True)
    ]


def timed(fn, *args):
    start = time.perf_counter()
    out = fn(*args)
    return time.perf_counter() - start, out


def exact_match(response: str, truth: object) -> float:
    """Stand-in for a cheap exact verifier: the text after the last '=' equals the truth."""
    return float(response.rsplit("=", 1)[-1].strip() == str(truth))


SCORERS = {
    "plain math-verify (parse + verify)": plain_math_verify,
    "qae math, in-process": lambda r, t, w: score_batch("math", r, t, workers=0),
    "qae math, pool ({w} workers)": lambda r, t, w: score_batch("math", r, t, workers=w),
}


def run_row(name: str, problems: int, group: int, workers: int) -> None:
    """Time one scorer in this (fresh) process and print its seconds and scores as JSON.

    Every row runs in its own process so that none finds the timed answers in a cache
    (math-verify's, sympy's or qae's) filled by another row.
    """
    gold = answers()
    half = len(gold) // 2  # timed problems and their distractors come from the first half
    warm = groups(gold, range(half, len(gold)), group, 1, range(half, len(gold)))
    responses, truths = groups(gold, range(problems), group, 0, range(half))
    fn = SCORERS[name]
    fn(*warm, workers)  # imports, worker start-up, parser warm-up: on other problems
    seconds, scores = timed(fn, responses, truths, workers)
    print(json.dumps({"seconds": seconds, "scores": scores}))


def side_by_side(problems: int, group: int, workers: int) -> None:
    gold = answers()
    responses, truths = groups(gold, range(problems), group, 0, range(len(gold) // 2))
    n = len(responses)
    print(f"{problems} problems x {group} responses = {n} responses")
    results = []
    for name in SCORERS:
        cmd = [sys.executable, __file__, "--row", name, "--problems", str(problems)]
        cmd += ["--group", str(group), "--workers", str(workers)]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        row = json.loads(out.strip().splitlines()[-1])
        results.append((name.format(w=workers), row["seconds"], row["scores"]))
    base_seconds, base = results[0][1], results[0][2]
    header = (
        f"{'scorer':<36} {'seconds':>8} {'responses/s':>12} {'speed-up':>9} {'same verdicts':>14}"
    )
    print(header)
    print("-" * len(header))
    for name, seconds, scores in results:
        same = sum(a == b for a, b in zip(scores, base, strict=True))
        print(
            f"{name:<36} {seconds:>8.2f} {n / seconds:>12.0f} {base_seconds / seconds:>8.1f}x "
            f"{same:>8}/{n}"
        )
    for name, _, scores in results[1:]:
        for i, (a, b) in enumerate(zip(scores, base, strict=True)):
            if a != b:
                print(f"DIFFERENT ({name}): gold={truths[i]!r} qae={a} math-verify={b}")
                print(f"  ...{responses[i][-120:]!r}")
    print(f"share of correct responses: {sum(base) / n:.2f}")


def exact_rows(workers: int) -> None:
    step = [f"{FILLER} 3+4={i % 9}" for i in range(128)]
    truth = [7] * 128
    t_serial = min(timed(score_batch, exact_match, step, truth)[0] for _ in range(5))
    t_pool = min(
        timed(lambda: score_batch(exact_match, step, truth, workers=workers))[0] for _ in range(5)
    )
    print(
        f"\nexact verifier, one embedded-default step (128 responses): {1e3 * t_serial:.2f} ms "
        f"in-process = {100 * t_serial / STEP_SECONDS:.2f}% of a {STEP_SECONDS} s step; "
        f"{1e3 * t_pool:.2f} ms through a pool of {workers}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="20 problems instead of 100")
    parser.add_argument("--group", type=int, default=16, help="responses per problem (G)")
    parser.add_argument("--workers", type=int, default=2, help="pool size")
    parser.add_argument("--problems", type=int, default=0, help="problems (default 100)")
    parser.add_argument("--row", default="", help=argparse.SUPPRESS)  # one row, internal
    args = parser.parse_args()
    logging.getLogger("math_verify").setLevel(logging.ERROR)
    problems = args.problems or (20 if args.quick else 100)
    if args.row:
        run_row(args.row, problems, args.group, args.workers)
        return
    print(f"python {platform.python_version()}, {os.cpu_count()} cpus")
    side_by_side(problems, args.group, args.workers)
    exact_rows(args.workers)


if __name__ == "__main__":
    main()
