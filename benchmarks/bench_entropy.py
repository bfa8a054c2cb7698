"""Chunked vs direct token entropy and token log-probs: time and peak memory.

Claim measured: ``qae.core.entropy.token_entropy`` and ``selective_log_softmax`` never hold a
full ``[N, V]`` float32 softmax, so their extra memory is a few chunk buffers (forward)
or the gradient of the logits plus chunk buffers (backward), at a time comparable to the
direct computation.

Usage::

    python benchmarks/bench_entropy.py                       # N = 2048, V = 151936, CPU
    python benchmarks/bench_entropy.py --dtype bfloat16 --no-backward
    python benchmarks/bench_entropy.py --device cuda

Memory is the peak above what was resident before the call ("extra"). On CPU it is the
process's peak resident set size (VmHWM, reset through /proc/self/clear_refs) with glibc's
mmap threshold pinned at 64 KiB, so every large buffer is mapped on allocation and
unmapped on free and the peak follows the live tensors; on CUDA it is
``torch.cuda.max_memory_allocated``. tracemalloc is of no use here: it does not see
tensor storage. Time is the best of ``--repeats`` runs.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import re
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

from qae.core.entropy import selective_log_softmax, token_entropy

_M_MMAP_THRESHOLD = -3  # glibc mallopt parameter


def _pin_mmap_threshold() -> bool:
    """Make glibc map every allocation >= 64 KiB (and unmap it on free); False if not glibc."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    return bool(libc.mallopt(_M_MMAP_THRESHOLD, 64 * 1024))


class Meter:
    """Peak extra memory of one call, in MiB, on CPU (Linux) or CUDA."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.cpu_ok = device.type == "cpu" and Path("/proc/self/clear_refs").exists()

    def _cpu_peak(self) -> float:
        text = Path("/proc/self/status").read_text()
        return int(re.search(r"VmHWM:\s+(\d+)", text).group(1)) / 1024

    def measure(self, fn: Callable[[], object]) -> tuple[float, float, object]:
        """Run ``fn`` once; return (seconds, peak extra MiB or NaN, its output)."""
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated()
            t0 = time.perf_counter()
            out = fn()
            torch.cuda.synchronize()
            secs = time.perf_counter() - t0
            return secs, (torch.cuda.max_memory_allocated() - before) / 2**20, out
        if self.cpu_ok:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            before = self._cpu_peak()
        t0 = time.perf_counter()
        out = fn()
        secs = time.perf_counter() - t0
        return secs, (self._cpu_peak() - before) if self.cpu_ok else float("nan"), out


def direct_entropy(logits: torch.Tensor) -> torch.Tensor:
    logp = torch.log_softmax(logits.float(), dim=-1)  # [B, T, V] float32
    return -(logp.exp() * logp).sum(-1)


def direct_logp(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    return torch.log_softmax(logits.float(), dim=-1).gather(-1, ids[..., None]).squeeze(-1)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=8, help="B responses")
    p.add_argument("--tokens", type=int, default=256, help="T tokens per response")
    p.add_argument("--vocab", type=int, default=151936, help="V (Qwen2/2.5/3: 151936)")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    p.add_argument("--device", default="cpu")
    p.add_argument("--chunk-sizes", default="auto,32", help="comma-separated; auto = None")
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--no-backward", action="store_true", help="skip the forward+backward rows")
    args = p.parse_args(argv)

    device = torch.device(args.device)
    pinned = _pin_mmap_threshold() if device.type == "cpu" else False
    dtype = getattr(torch, args.dtype)
    gen = torch.Generator(device="cpu").manual_seed(0)
    shape = (args.batch, args.tokens, args.vocab)
    logits = (torch.randn(shape, generator=gen) * 2).to(device=device, dtype=dtype)
    ids = torch.randint(0, args.vocab, shape[:2], generator=gen).to(device)
    n = args.batch * args.tokens
    logits_mib = logits.numel() * logits.element_size() / 2**20
    f32_mib = logits.numel() * 4 / 2**20
    chunks = [None if c == "auto" else int(c) for c in args.chunk_sizes.split(",")]
    meter = Meter(device)

    rows: list[tuple[str, str, float, float]] = []

    def bench(name: str, chunk: str, fn: Callable[[], object]) -> object:
        best_t, best_m, out = float("inf"), float("nan"), None
        for _ in range(args.repeats):
            out = None
            secs, mib, out = meter.measure(fn)
            best_t = min(best_t, secs)
            best_m = mib if best_m != best_m else min(best_m, mib)
        rows.append((name, chunk, best_t, best_m))
        print(f"  done: {name} chunk={chunk}", file=sys.stderr, flush=True)
        return out

    with torch.no_grad():
        ref = bench("entropy, direct", "-", lambda: direct_entropy(logits))
        for c in chunks:
            label = "auto" if c is None else str(c)
            out = bench("entropy, chunked", label, lambda c=c: token_entropy(logits, chunk_size=c))
            torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
        ref = bench("log-prob of ids, direct", "-", lambda: direct_logp(logits, ids))
        for c in chunks:
            label = "auto" if c is None else str(c)
            out = bench(
                "log-prob of ids, chunked",
                label,
                lambda c=c: selective_log_softmax(logits, ids, chunk_size=c),
            )
            torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
        del ref, out

    if not args.no_backward:
        leaf = logits.detach().requires_grad_()

        def fwd_bwd(fn: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[], None]:
            def run() -> None:
                fn(leaf).sum().backward()
                leaf.grad = None

            return run

        bench("entropy fwd+bwd, direct", "-", fwd_bwd(direct_entropy))
        bench("entropy fwd+bwd, chunked", "auto", fwd_bwd(lambda z: token_entropy(z)))
        bench("log-prob fwd+bwd, direct", "-", fwd_bwd(lambda z: direct_logp(z, ids)))
        bench(
            "log-prob fwd+bwd, chunked",
            "auto",
            fwd_bwd(lambda z: selective_log_softmax(z, ids)),
        )

    print()
    print(
        f"N = B*T = {args.batch}*{args.tokens} = {n} tokens, V = {args.vocab}, "
        f"logits {args.dtype} on {device} = {logits_mib:.0f} MiB "
        f"(one float32 [N, V] = {f32_mib:.0f} MiB); torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads; best of {args.repeats}"
    )
    if device.type == "cpu" and not (pinned and meter.cpu_ok):
        print("(peak memory unavailable or approximate: needs Linux with glibc)")
    print()
    print("| computation | chunk rows | time (s) | peak extra (MiB) | x float32 [N, V] |")
    print("|---|---|---|---|---|")
    for name, chunk, secs, mib in rows:
        print(f"| {name} | {chunk} | {secs:.3f} | {mib:.0f} | {mib / f32_mib:.2f} |")


if __name__ == "__main__":
    main()
