"""Thread policy: how long the default ``qae train`` takes alone and on a shared CPU.

Claim measured: with the default ``trainer.threads=1`` the embedded default run
(``qae train``, reasoning preset) beside two busy 2-thread torch processes is at most 3x
slower than alone, while torch's own default (one thread per core, ``trainer.threads=0``)
degrades far more because its worker threads spin when the cores are shared; and one
thread alone is no slower than one thread per core alone.

Each cell runs ``qae train --trainer.steps S`` (default 40) in a fresh run directory as a
subprocess and times the whole command (model load, rollouts, updates, evaluation).
"Load" is ``--load`` busy processes (default 2), each multiplying 256x256 matrices in a
loop with ``torch.set_num_threads(2)``, started before and stopped after the timed run.
Cells run one after another, never beside each other; ``--timeout`` caps a cell (its
time is then printed as ``>timeout``).

Usage::

    python benchmarks/bench_threads.py                 # 40 steps, threads 1 and 0
    python benchmarks/bench_threads.py --steps 300     # the whole default run
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time


def _busy(threads: int, stop) -> None:
    import torch

    torch.set_num_threads(threads)
    a = torch.randn(256, 256)
    while not stop.is_set():
        a = torch.tanh(a @ a)


def _train(steps: int, threads: int, timeout: float) -> float | None:
    out = tempfile.mkdtemp(prefix="bench_threads_")
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    cmd = [
        sys.executable, "-m", "qae", "train", "--out", os.path.join(out, "run"),
        "--trainer.steps", str(steps), "--trainer.threads", str(threads),
    ]  # fmt: skip
    start = time.perf_counter()
    try:
        subprocess.run(cmd, env=env, check=True, timeout=timeout, capture_output=True)
        return time.perf_counter() - start
    except subprocess.TimeoutExpired:
        return None
    finally:
        shutil.rmtree(out, ignore_errors=True)


def _cell(steps: int, threads: int, load: int, load_threads: int, timeout: float) -> float | None:
    ctx = mp.get_context("spawn")
    stop = ctx.Event()
    procs = [ctx.Process(target=_busy, args=(load_threads, stop)) for _ in range(load)]
    for p in procs:
        p.start()
    if procs:
        time.sleep(3.0)  # let the load processes import torch and start spinning
    try:
        return _train(steps, threads, timeout)
    finally:
        stop.set()
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--threads", default="1,0", help="trainer.threads values to time")
    parser.add_argument("--load", type=int, default=2, help="busy processes beside the run")
    parser.add_argument("--load-threads", type=int, default=2)
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds per cell")
    args = parser.parse_args()
    threads = [int(t) for t in args.threads.split(",")]

    print(
        f"# {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
        f"python {platform.python_version()}; qae train --trainer.steps {args.steps}; "
        f"load = {args.load} busy torch processes x {args.load_threads} threads",
        flush=True,
    )
    print(f"{'threads':>8} {'alone (s)':>10} {'loaded (s)':>11} {'loaded/alone':>13}", flush=True)
    for t in threads:
        alone = _cell(args.steps, t, 0, args.load_threads, args.timeout)
        loaded = _cell(args.steps, t, args.load, args.load_threads, args.timeout)

        def fmt(x: float | None) -> str:
            return f"{x:.1f}" if x is not None else f">{args.timeout:.0f}"

        ratio = f"{loaded / alone:.2f}x" if alone and loaded else "-"
        label = str(t) if t else "0 (torch)"
        print(f"{label:>8} {fmt(alone):>10} {fmt(loaded):>11} {ratio:>13}", flush=True)


if __name__ == "__main__":
    main()
