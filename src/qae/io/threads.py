"""How many CPU threads torch uses: fixed, or chosen from how busy the machine is.

Torch's own default is one thread per core, and its thread pool spins while it waits
for work. Alone that is the fastest setting, but beside other busy processes each parallel
operation waits for a thread that is not running, and a run slows down far more than its
share of the CPU would explain (``benchmarks/bench_threads.py``: more than 6x beside two
busy 2-thread processes on 2 cores). One thread degrades gracefully under load but leaves
cores idle on a quiet machine.

:class:`ThreadPolicy` with ``requested=0`` ("auto") therefore measures, every few seconds,
how much CPU time *other* processes took on the cores this process may use (Linux:
``/proc/stat`` minus this process's own CPU time) and sets ``torch.set_num_threads`` to the
cores the others leave free, at least one::

    threads = clamp(round(cpus - busy_elsewhere), 1, cap)

``cpus`` is the number of CPUs in this process's affinity mask, ``cap`` the same or
``OMP_NUM_THREADS`` where that is set lower. Alone that is every core; beside processes
that keep the cores busy it is one thread.
Where ``/proc/stat`` does not exist it stays at one thread per usable core. A positive
``requested`` is fixed and never re-measured. CPU quotas of a container (cgroup
``cpu.max``) are not read: the policy sees cores, not quotas.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path

PROC_STAT = Path("/proc/stat")
TICKS_PER_S = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def usable_cpus() -> set[int]:
    """The CPU ids this process may run on (its affinity mask), or ``range(os.cpu_count())``."""
    if hasattr(os, "sched_getaffinity"):
        return set(os.sched_getaffinity(0))
    return set(range(os.cpu_count() or 1))


def max_threads(cpus: set[int], env: dict[str, str] | None = None) -> int:
    """The most threads ``auto`` uses: the usable CPUs, or ``OMP_NUM_THREADS`` if lower."""
    env = os.environ if env is None else env
    cap = len(cpus) or 1
    try:
        omp = int(env.get("OMP_NUM_THREADS", "") or 0)
    except ValueError:
        omp = 0
    return min(cap, omp) if omp > 0 else cap


def read_busy_seconds(cpus: set[int], stat: Path = PROC_STAT) -> float | None:
    """CPU-seconds spent not idle on ``cpus`` since boot, from ``/proc/stat``'s ``cpuN``
    lines (user, nice, system, irq, softirq, steal; idle and iowait excluded), or None
    where the file cannot be read."""
    try:
        text = stat.read_text()
    except OSError:
        return None
    busy = 0
    seen = False
    for line in text.splitlines():
        if not line.startswith("cpu") or line.startswith("cpu "):
            continue
        name, *fields = line.split()
        try:
            cpu = int(name[3:])
            ticks = [int(f) for f in fields]
        except ValueError:
            continue
        if cpu not in cpus or len(ticks) < 4:
            continue
        seen = True
        idle = ticks[3] + (ticks[4] if len(ticks) > 4 else 0)
        busy += sum(ticks[:8]) - idle  # guest time is already inside user
    return busy / TICKS_PER_S if seen else None


def own_cpu_seconds() -> float:
    """CPU-seconds this process (every thread) has used."""
    t = os.times()
    return t.user + t.system


def choose_threads(cpus: int, busy_elsewhere: float, cap: int | None = None) -> int:
    """Threads for ``cpus`` usable CPUs when other processes keep ``busy_elsewhere`` of
    them busy (in CPUs, a time average): the free CPUs, rounded, at least 1 and at most
    ``cap`` (default ``cpus``)."""
    if cpus < 1:
        raise ValueError(f"cpus must be >= 1, got {cpus}")
    cap = cpus if cap is None else cap
    return max(1, min(cap, round(cpus - max(0.0, busy_elsewhere))))


class ThreadPolicy:
    """Sets torch's intra-op thread count now and, in ``auto`` mode, again as the load changes.

    ``requested``: a fixed thread count (> 0) or 0 for ``auto``. ``check_every_s``: the
    shortest time between two measurements (shorter windows are noisy). Call
    :meth:`update` often (once per training step); it measures only when enough time has
    passed and calls ``torch.set_num_threads`` only when the count changes. ``threads``
    is the count in force.
    """

    def __init__(
        self,
        requested: int = 0,
        *,
        check_every_s: float = 2.0,
        clock: Callable[[], float] = time.monotonic,
        busy: Callable[[set[int]], float | None] = read_busy_seconds,
        own: Callable[[], float] = own_cpu_seconds,
        apply: Callable[[int], None] | None = None,
        cpus: set[int] | None = None,
    ) -> None:
        if requested < 0:
            raise ValueError(f"threads must be >= 0 (0 = auto), got {requested}")
        self.requested = requested
        self.check_every_s = check_every_s
        self._clock, self._busy, self._own = clock, busy, own
        self._apply = apply or _torch_set_num_threads
        self.cpus = cpus if cpus is not None else usable_cpus()
        self.cap = max_threads(self.cpus)
        self.threads = requested or self.cap
        self.busy_elsewhere: float | None = None
        self._apply(self.threads)
        self._last = self._snapshot()

    @property
    def auto(self) -> bool:
        return self.requested == 0

    def _snapshot(self) -> tuple[float, float | None, float] | None:
        if not self.auto:
            return None
        busy = self._busy(self.cpus)
        return (self._clock(), busy, self._own()) if busy is not None else None

    def update(self) -> int:
        """Re-measure if due and set the thread count; returns the count in force."""
        if self._last is None:
            return self.threads
        now = self._clock()
        t0, busy0, own0 = self._last
        if now - t0 < self.check_every_s:
            return self.threads
        snap = self._snapshot()
        if snap is None:
            self._last = None
            return self.threads
        _, busy1, own1 = snap
        wall = now - t0
        self.busy_elsewhere = max(0.0, ((busy1 or 0.0) - (busy0 or 0.0) - (own1 - own0)) / wall)
        self._last = snap
        threads = choose_threads(max(1, len(self.cpus)), self.busy_elsewhere, self.cap)
        if threads != self.threads:
            self.threads = threads
            self._apply(threads)
        return self.threads


def _torch_set_num_threads(n: int) -> None:
    import torch

    if torch.get_num_threads() != n:
        torch.set_num_threads(n)
