"""Thread policy: how long the default ``qae train`` takes alone and on a shared CPU.

Claim measured: the default ``trainer.threads=0`` (auto, ``qae.io.threads``) is as fast
alone as torch's one thread per core (``--threads 2`` on 2 cores) and degrades beside busy
processes like one thread does, while a fixed thread per core degrades far more because
its worker threads spin when the cores are shared.

Each cell runs ``qae train --trainer.steps S`` (default 40) in a fresh run directory as a
subprocess and times the whole command (model load, rollouts, updates, evaluation).
"Load" is ``--load`` busy processes (default 2), each multiplying 256x256 matrices in a
loop with ``torch.set_num_threads(2)``, started before and stopped after the timed run.
Cells run one after another, never beside each other; ``--timeout`` caps a cell (its
time is then printed as ``>timeout``).

Usage::

    python benchmarks/bench_threads.py                       # 40 steps, threads 0, 1, 2
    python benchmarks/bench_threads.py --load-session own    # the load in other sessions
    python benchmarks/bench_threads.py --threads 2:OMP_WAIT_POLICY=PASSIVE
    python benchmarks/bench_threads.py --steps 300           # the whole default run
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


def _busy(threads: int, stop, own_session: bool) -> None:
    if own_session:
        os.setsid()  # its own session, hence its own scheduling group where autogroup is on
    import torch

    torch.set_num_threads(threads)
    a = torch.randn(256, 256)
    while not stop.is_set():
        a = torch.tanh(a @ a)


_THREAD_ENV = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OMP_WAIT_POLICY", "GOMP_SPINCOUNT")


def _train(steps: int, threads: str, timeout: float) -> float | None:
    """Time ``qae train`` with ``threads`` = ``N`` (``--trainer.threads N``) or
    ``N:VAR=VALUE`` (the same with an environment variable set for the run only, e.g.
    ``2:OMP_WAIT_POLICY=PASSIVE``)."""
    out = tempfile.mkdtemp(prefix="bench_threads_")
    env = {k: v for k, v in os.environ.items() if k not in _THREAD_ENV}
    count, _, extra = threads.partition(":")
    if extra:
        name, _, value = extra.partition("=")
        env[name] = value
    cmd = [
        sys.executable, "-m", "qae", "train", "--out", os.path.join(out, "run"),
        "--trainer.steps", str(steps), "--trainer.threads", count,
    ]  # fmt: skip
    start = time.perf_counter()
    try:
        subprocess.run(cmd, env=env, check=True, timeout=timeout, capture_output=True)
        return time.perf_counter() - start
    except subprocess.TimeoutExpired:
        return None
    finally:
        shutil.rmtree(out, ignore_errors=True)


def _cell(
    steps: int,
    threads: str,
    load: int,
    load_threads: int,
    timeout: float,
    own_session: bool = False,
) -> float | None:
    ctx = mp.get_context("spawn")
    stop = ctx.Event()
    procs = [ctx.Process(target=_busy, args=(load_threads, stop, own_session)) for _ in range(load)]
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


def _fmt(seconds: float | None, timeout: float) -> str:
    return f"{seconds:.1f}" if seconds is not None else f">{timeout:.0f}"


def _autogroup() -> str:
    try:
        with open("/proc/sys/kernel/sched_autogroup_enabled") as f:
            return "on" if f.read().strip() == "1" else "off"
    except OSError:
        return "unknown"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument(
        "--threads",
        default="0,1,2",
        help="trainer.threads values to time, comma-separated; N:VAR=VALUE also sets an "
        "environment variable for the run (not for the load)",
    )
    parser.add_argument("--load", type=int, default=2, help="busy processes beside the run")
    parser.add_argument("--load-threads", type=int, default=2)
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds per cell")
    parser.add_argument(
        "--load-session",
        choices=("same", "own"),
        default="same",
        help="same: the busy processes share the run's session (the kernel shares the CPU "
        "by thread); own: each starts its own session, as jobs started from other "
        "terminals do (with autogroup on, the kernel shares the CPU by session first)",
    )
    parser.add_argument(
        "--alone", action=argparse.BooleanOptionalAction, default=True, help="time the run alone"
    )
    args = parser.parse_args()
    threads = args.threads.split(",")

    print(
        f"# {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
        f"python {platform.python_version()}; qae train --trainer.steps {args.steps}; "
        f"load = {args.load} busy torch processes x {args.load_threads} threads "
        f"({args.load_session} session); autogroup {_autogroup()}",
        flush=True,
    )
    print(f"{'threads':>8} {'alone (s)':>10} {'loaded (s)':>11} {'loaded/alone':>13}", flush=True)
    for t in threads:
        alone = _cell(args.steps, t, 0, args.load_threads, args.timeout) if args.alone else None
        own = args.load_session == "own"
        loaded = _cell(args.steps, t, args.load, args.load_threads, args.timeout, own)

        ratio = f"{loaded / alone:.2f}x" if alone and loaded else "-"
        label = t if t != "0" else "0 (auto)"
        shown = _fmt(alone, args.timeout) if args.alone else "-"
        print(f"{label:>8} {shown:>10} {_fmt(loaded, args.timeout):>11} {ratio:>13}", flush=True)


if __name__ == "__main__":
    main()
