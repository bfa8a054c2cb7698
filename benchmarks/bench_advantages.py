"""Time the vectorized advantage estimators against a per-group Python loop.

The loop is what the released QAE change does inside verl's GRPO estimator: a dict of lists
keyed by group id, then ``torch.quantile`` (or mean/std) per group. Ours groups the batch
with sorts and scatter-adds.

    python benchmarks/bench_advantages.py            # full table (B up to 1M), ~2 min
    python benchmarks/bench_advantages.py --quick    # B up to 64k

Targets (B=64k, G=16): qae >= 50x faster than the loop, qae <= 2x our grpo.
"""

from __future__ import annotations

import argparse
import platform
import time
from collections import defaultdict
from functools import partial

import numpy as np
import torch

from qae import compute_advantages


def loop_qae(scores: torch.Tensor, index: np.ndarray, k: float, eps: float = 1e-6) -> torch.Tensor:
    """Reference implementation: per-group Python loop with torch.quantile."""
    id2score = defaultdict(list)
    for i in range(scores.shape[0]):
        id2score[index[i]].append(scores[i])
    id2base, id2std = {}, {}
    for idx, vals in id2score.items():
        if len(vals) == 1:
            id2base[idx], id2std[idx] = torch.tensor(0.0), torch.tensor(1.0)
        else:
            t = torch.stack(vals)
            id2base[idx], id2std[idx] = torch.quantile(t, k), torch.std(t)
    out = scores.clone()
    for i in range(scores.shape[0]):
        out[i] = (scores[i] - id2base[index[i]]) / (id2std[index[i]] + eps)
    return out


def best_time(fn, min_total: float = 0.5, min_runs: int = 3, max_runs: int = 50) -> float:
    times = []
    start = time.perf_counter()
    while len(times) < max_runs and (
        len(times) < min_runs or time.perf_counter() - start < min_total
    ):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def make_batch(b: int, g: int, ids: str, seed: int = 0):
    rng = np.random.default_rng(seed)
    p = rng.uniform(size=b // g)
    rewards = (rng.uniform(size=(b // g, g)) < p[:, None]).astype(np.float32).reshape(-1)
    groups = np.repeat(np.arange(b // g), g)
    perm = rng.permutation(b)  # groups need not be contiguous
    rewards, groups = rewards[perm], groups[perm]
    index = np.array([f"uid-{x}" for x in groups], dtype=object) if ids == "uid" else groups
    return torch.from_numpy(rewards), index


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="B in {1k, 64k} only")
    parser.add_argument(
        "--loop-max-b", type=int, default=1 << 20, help="skip the loop above this B"
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads (1 by default: under load, spinning OpenMP threads distort timings)",
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    sizes = [1 << 10, 1 << 16] + ([] if args.quick else [1 << 20])
    print(f"# torch {torch.__version__}, {torch.get_num_threads()} threads, {platform.processor()}")
    header = (
        f"| {'ids':>4} | {'B':>8} | {'G':>3} | {'loop (s)':>9} | {'qae (ms)':>9} | "
        f"{'grpo (ms)':>9} | {'loop/qae':>8} | {'qae/grpo':>8} |"
    )
    print(header)
    print("|" + "|".join("-" * (len(c)) for c in header.split("|")[1:-1]) + "|")
    for ids in ("int", "uid"):
        for b in sizes:
            for g in (8, 16, 64):
                if ids == "uid" and b != 1 << 16:
                    continue
                rewards, index = make_batch(b, g, ids)
                id_arg = torch.from_numpy(index) if ids == "int" else index
                t_qae = best_time(partial(compute_advantages, rewards, id_arg, "qae", k=0.4))
                t_grpo = best_time(partial(compute_advantages, rewards, id_arg, "grpo"))
                if b <= args.loop_max_b:
                    t_loop = best_time(partial(loop_qae, rewards, index, 0.4), 0.0, 1, 1)
                    # Same numbers as the loop (G=16, K=0.4: linear equals the paper's quantile).
                    if g == 16:
                        ours = compute_advantages(rewards, id_arg, "qae", k=0.4)
                        ref = loop_qae(rewards, index, 0.4) if b <= 1 << 16 else None
                        if ref is not None:
                            torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)
                    loop_s, ratio = f"{t_loop:9.3f}", f"{t_loop / t_qae:8.0f}"
                else:
                    loop_s, ratio = f"{'-':>9}", f"{'-':>8}"
                print(
                    f"| {ids:>4} | {b:>8} | {g:>3} | {loop_s} | {t_qae * 1e3:9.2f} | "
                    f"{t_grpo * 1e3:9.2f} | {ratio} | {t_qae / t_grpo:8.2f} |",
                    flush=True,
                )


if __name__ == "__main__":
    main()
