"""How many CPU threads torch uses: fixed, or chosen from how busy the machine is.

Torch's own default is one thread per core, and its thread pool spins while it waits
for work. Alone that is the fastest setting, but beside other busy processes each parallel
operation waits for a thread that is not running, and a run slows down far more than its
share of the CPU would explain (``benchmarks/bench_threads.py``: more than 6x beside two
busy 2-thread processes on 2 cores). One thread degrades gracefully under load but leaves
cores idle on a quiet machine.

:class:`ThreadPolicy` with ``requested=0`` ("auto") therefore measures, every few seconds,
how much CPU time *other* processes took on the CPUs this process may use, and keeps as
many threads as they leave free, at least one::

    free = cpus - busy_elsewhere            (in CPUs, averaged over the window)
    threads = clamp(floor(free + 0.5), 1, cap), changed only when |free - threads| >= 0.75

- ``busy_elsewhere`` (Linux): the non-idle time of the usable CPUs in ``/proc/stat``
  (user, system, irq, softirq, steal), minus this process's own CPU time and its live
  children's (a reward worker pool is part of the run, not a competitor). Time of niced
  processes (``nice`` > 0) is not counted: the scheduler gives way to us over them.
  Steal time is counted: a hypervisor that takes the CPU away is load like any other.
- ``cap``: the most threads ``auto`` uses: torch's own default (at most one per physical
  core), the usable CPUs, a container's CPU quota (cgroup v2 ``cpu.max``) and
  ``OMP_NUM_THREADS``, whichever is lowest.
- The dead band keeps the count from flipping when the free share hovers near a half.

Where ``/proc/stat`` cannot be read the count is ``cap``. A positive ``requested`` is
fixed and never re-measured. The count can change the last bits of results (reductions
split differently), so runs that must agree bit for bit fix it.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Mapping
from pathlib import Path

PROC = Path("/proc")
TICKS_PER_S = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
DEAD_BAND = 0.75
"""How far (in CPUs) the free share must be from the current count before it changes."""


def usable_cpus() -> set[int]:
    """The CPU ids this process may run on (its affinity mask), or ``range(os.cpu_count())``."""
    if hasattr(os, "sched_getaffinity"):
        return set(os.sched_getaffinity(0))
    return set(range(os.cpu_count() or 1))


def cgroup_cpu_quota(cpu_max: Path = Path("/sys/fs/cgroup/cpu.max")) -> float | None:
    """The CPUs a cgroup v2 quota allows (``quota / period``), or None without a quota."""
    try:
        quota, period = cpu_max.read_text().split()[:2]
        return int(quota) / int(period) if quota != "max" else None
    except (OSError, ValueError):
        return None


def max_threads(
    cpus: set[int],
    env: Mapping[str, str] | None = None,
    torch_default: int | None = None,
    quota: float | None = None,
) -> int:
    """The most threads ``auto`` uses: the lowest of the usable CPUs, torch's default
    thread count, the CPU quota (rounded up) and ``OMP_NUM_THREADS`` where those are set."""
    env = os.environ if env is None else env
    caps = [len(cpus) or 1]
    if torch_default:
        caps.append(torch_default)
    if quota:
        caps.append(max(1, math.ceil(quota)))
    try:
        omp = int(env.get("OMP_NUM_THREADS", "") or 0)
    except ValueError:
        omp = 0
    if omp > 0:
        caps.append(omp)
    return min(caps)


def read_busy_ticks(cpus: set[int], stat: Path = PROC / "stat") -> dict[int, int] | None:
    """Per usable CPU, the ticks spent since boot on work other than niced processes
    (user, system, irq, softirq, steal; idle, iowait and nice excluded), from
    ``/proc/stat``'s ``cpuN`` lines; None where the file cannot be read or lists none."""
    try:
        text = stat.read_text()
    except OSError:
        return None
    out: dict[int, int] = {}
    for line in text.splitlines():
        if not line.startswith("cpu") or line.startswith("cpu "):
            continue
        name, *fields = line.split()
        try:
            cpu = int(name[3:])
            t = [int(f) for f in fields[:8]]
        except ValueError:
            continue
        if cpu in cpus and len(t) >= 4:
            t += [0] * (8 - len(t))
            user, _nice, system, _idle, _iowait, irq, softirq, steal = t
            out[cpu] = user + system + irq + softirq + steal  # guest is inside user
    return out or None


def _children_ticks(pid: int) -> int:
    """utime + stime of the live children of ``pid`` (and theirs), from ``/proc``."""
    total = 0
    try:
        tasks = list((PROC / str(pid) / "task").iterdir())
    except OSError:
        return 0
    for task in tasks:
        try:
            kids = (task / "children").read_text().split()
        except OSError:
            continue
        for kid in kids:
            try:
                fields = (PROC / kid / "stat").read_text().rsplit(")", 1)[1].split()
                total += int(fields[11]) + int(fields[12]) + _children_ticks(int(kid))
            except (OSError, ValueError, IndexError):
                continue
    return total


def own_cpu_seconds() -> float:
    """CPU-seconds this process (every thread), its reaped children and its live
    children (``/proc``, where it exists) have used."""
    t = os.times()
    return (
        t.user
        + t.system
        + t.children_user
        + t.children_system
        + (_children_ticks(os.getpid()) / TICKS_PER_S)
    )


def choose_threads(
    cpus: int, busy_elsewhere: float, current: int, cap: int, dead_band: float = DEAD_BAND
) -> int:
    """The thread count for ``cpus`` usable CPUs when other processes keep
    ``busy_elsewhere`` of them busy: the free CPUs rounded half up, within [1, ``cap``],
    or ``current`` while the free share is within ``dead_band`` of it."""
    if cpus < 1:
        raise ValueError(f"cpus must be >= 1, got {cpus}")
    free = cpus - max(0.0, busy_elsewhere)
    if abs(free - current) < dead_band:
        return current
    return max(1, min(cap, math.floor(free + 0.5)))


class ThreadPolicy:
    """Sets torch's intra-op thread count now and, in ``auto`` mode, again as the load changes.

    ``requested``: a fixed thread count (> 0) or 0 for ``auto``. ``check_every_s``: the
    shortest time between two measurements (shorter windows are noisy). Call
    :meth:`update` often (once per training step); it measures only when enough time has
    passed and calls ``torch.set_num_threads`` only when the count changes. ``threads``
    is the count in force, ``busy_elsewhere`` the last measurement (CPUs).
    """

    def __init__(
        self,
        requested: int = 0,
        *,
        check_every_s: float = 2.0,
        clock: Callable[[], float] = time.monotonic,
        busy: Callable[[set[int]], dict[int, int] | None] = read_busy_ticks,
        own: Callable[[], float] = own_cpu_seconds,
        apply: Callable[[int], None] | None = None,
        cpus: set[int] | None = None,
        cap: int | None = None,
    ) -> None:
        if requested < 0:
            raise ValueError(f"threads must be >= 0 (0 = auto), got {requested}")
        if check_every_s <= 0:
            raise ValueError(f"check_every_s must be > 0, got {check_every_s}")
        self.requested = requested
        self.check_every_s = check_every_s
        self._clock, self._busy, self._own = clock, busy, own
        self._apply = apply or _torch_set_num_threads
        self.cpus = cpus if cpus is not None else usable_cpus()
        if cap is None:
            cap = max_threads(self.cpus, torch_default=TORCH_DEFAULT, quota=cgroup_cpu_quota())
        self.cap = cap
        self.threads = requested or self.cap
        self.busy_elsewhere: float | None = None
        self._apply(self.threads)
        self._last = self._snapshot()

    @property
    def auto(self) -> bool:
        return self.requested == 0

    def _snapshot(self) -> tuple[float, dict[int, int], float] | None:
        if not self.auto:
            return None
        busy = self._busy(self.cpus)
        return (self._clock(), busy, self._own()) if busy is not None else None

    def _set(self, threads: int) -> None:
        if threads != self.threads:
            self.threads = threads
            self._apply(threads)

    def update(self) -> int:
        """Re-measure if due and set the thread count; returns the count in force."""
        if not self.auto:
            return self.threads
        now = self._clock()
        if self._last is not None and now - self._last[0] < self.check_every_s:
            return self.threads
        snap = self._snapshot()
        if snap is None:  # /proc/stat unreadable (now or from the start): one per core
            self._last = None
            self._set(self.cap)
            return self.threads
        if self._last is None:
            self._last = snap
            return self.threads
        (t0, busy0, own0), (t1, busy1, own1) = self._last, snap
        common = busy0.keys() & busy1.keys()  # CPUs taken offline or back drop out
        ticks = sum(max(0, busy1[c] - busy0[c]) for c in common)
        wall = t1 - t0
        self.busy_elsewhere = max(0.0, (ticks / TICKS_PER_S - (own1 - own0)) / wall)
        self._last = snap
        self._set(choose_threads(len(common) or 1, self.busy_elsewhere, self.threads, self.cap))
        return self.threads


def _torch_default_threads() -> int | None:
    try:
        import torch
    except ImportError:  # pragma: no cover - torch is a dependency
        return None
    return torch.get_num_threads()


TORCH_DEFAULT = _torch_default_threads()
"""torch's thread count when this module was first imported (before any policy set it)."""


def _torch_set_num_threads(n: int) -> None:
    import torch

    if torch.get_num_threads() != n:
        torch.set_num_threads(n)
