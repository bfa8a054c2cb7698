"""The CPU thread policy: fixed counts, the auto rule, and its /proc/stat measurement."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from qae.io import threads
from qae.io.threads import (
    ThreadPolicy,
    cgroup_cpu_quota,
    choose_threads,
    max_threads,
    own_cpu_seconds,
    read_busy_ticks,
)


@pytest.mark.parametrize(
    ("cpus", "busy", "current", "cap", "want"),
    [
        (2, 0.0, 2, 2, 2),  # quiet machine: every core
        (2, 0.05, 2, 2, 2),  # a shell and the OS
        (2, 1.33, 2, 2, 1),  # two busy 2-thread processes beside our 2 threads
        (2, 1.6, 1, 2, 1),  # ... and beside our 1 thread: stays at one
        (2, 5.0, 2, 2, 1),  # never fewer than one
        (2, 0.0, 1, 2, 2),  # the load is gone
        (2, 0.5, 2, 2, 2),  # 1.5 free: inside the dead band of 2 ...
        (2, 0.5, 1, 2, 1),  # ... and of 1: no flipping near a half
        (8, 4.0, 8, 2, 2),  # capped (OMP_NUM_THREADS=2) on a half-busy 8-core machine
        (8, 2.6, 8, 8, 5),  # 5.4 free
        (8, 2.5, 8, 8, 6),  # 5.5 free: rounded half up
        (1, 0.0, 1, 1, 1),
    ],
)
def test_choose_threads(cpus, busy, current, cap, want):
    assert choose_threads(cpus, busy, current, cap) == want


def test_choose_threads_rejects_no_cpus():
    with pytest.raises(ValueError, match="cpus must be >= 1"):
        choose_threads(0, 0.0, 1, 1)


def test_max_threads_takes_the_lowest_cap():
    cpus = set(range(8))
    assert max_threads(cpus, {}) == 8
    assert max_threads(cpus, {"OMP_NUM_THREADS": "3"}) == 3
    assert max_threads(cpus, {"OMP_NUM_THREADS": "16"}) == 8
    assert max_threads(cpus, {"OMP_NUM_THREADS": "junk"}) == 8
    assert max_threads(cpus, {"OMP_NUM_THREADS": ""}) == 8
    assert max_threads(cpus, {}, torch_default=4) == 4  # physical cores of a hyperthreaded host
    assert max_threads(cpus, {}, quota=2.5) == 3  # a container allowed 2.5 CPUs
    assert max_threads(cpus, {"OMP_NUM_THREADS": "2"}, torch_default=4, quota=6.0) == 2


def test_cgroup_cpu_quota(tmp_path):
    f = tmp_path / "cpu.max"
    f.write_text("200000 100000\n")
    assert cgroup_cpu_quota(f) == 2.0
    f.write_text("max 100000\n")
    assert cgroup_cpu_quota(f) is None
    assert cgroup_cpu_quota(tmp_path / "missing") is None


def _stat(tmp_path, rows):
    lines = ["cpu  1 2 3 4 5 6 7 8 0 0"]
    for cpu, (user, nice, system, idle, iowait, irq, softirq, steal, guest) in rows.items():
        fields = [user, nice, system, idle, iowait, irq, softirq, steal, guest, 0]
        lines.append(f"cpu{cpu} " + " ".join(map(str, fields)))
    lines.append("intr 12345")
    path = tmp_path / "stat"
    path.write_text("\n".join(lines) + "\n")
    return path


def test_read_busy_ticks_counts_only_usable_cpus_and_not_nice(tmp_path):
    stat = _stat(
        tmp_path,
        {
            0: (100, 40, 50, 1000, 10, 3, 2, 5, 60),  # guest 60 is inside user 100
            1: (300, 0, 0, 10, 0, 0, 0, 0, 0),
            2: (7, 7, 7, 7, 7, 7, 7, 7, 7),
        },
    )
    assert read_busy_ticks({0, 1}, stat) == {0: 100 + 50 + 3 + 2 + 5, 1: 300}
    assert read_busy_ticks({2}, stat) == {2: 7 * 5}
    assert read_busy_ticks({5}, stat) is None  # no such CPU listed
    assert read_busy_ticks({0}, tmp_path / "missing") is None


def test_own_cpu_seconds_counts_live_children():
    if not os.path.exists(f"/proc/{os.getpid()}/task/{os.getpid()}/children"):
        pytest.skip("no /proc/<pid>/task/<tid>/children here")
    code = "import time\nt = time.process_time()\nwhile time.process_time() - t < 0.6: pass\n"
    child = subprocess.Popen([sys.executable, "-c", code + "time.sleep(30)"])
    try:
        before = own_cpu_seconds()
        time.sleep(1.5)  # the child burns 0.6 s of CPU, then sleeps, still alive
        assert child.poll() is None
        assert own_cpu_seconds() - before > 0.3
    finally:
        child.kill()
        child.wait()


class _Fake:
    """A clock, the machine's busy CPU ticks and this process's own CPU time, moved by hand."""

    def __init__(self):
        self.t = 0.0
        self.ticks = {0: 0, 1: 0}
        self.own = 0.0
        self.applied: list[int] = []

    def advance(self, seconds: float, own_cores: float, other_cores: float) -> None:
        self.t += seconds
        self.own += seconds * own_cores
        per_cpu = seconds * (own_cores + other_cores) / len(self.ticks) * threads.TICKS_PER_S
        self.ticks = {c: v + round(per_cpu) for c, v in self.ticks.items()}

    def policy(self, requested: int, cap: int = 2, busy=None) -> ThreadPolicy:
        return ThreadPolicy(
            requested,
            check_every_s=2.0,
            clock=lambda: self.t,
            busy=busy or (lambda _: dict(self.ticks)),
            own=lambda: self.own,
            apply=self.applied.append,
            cpus=set(self.ticks),
            cap=cap,
        )


def test_auto_follows_the_load():
    f = _Fake()
    p = f.policy(0)
    assert p.auto and p.threads == 2 and f.applied == [2]
    f.advance(3.0, own_cores=2.0, other_cores=0.05)
    assert p.update() == 2 and f.applied == [2]  # unchanged count: not re-applied
    f.advance(1.0, own_cores=0.67, other_cores=1.33)
    assert p.update() == 2  # not due yet: the window is too short
    f.advance(2.0, own_cores=0.67, other_cores=1.33)
    assert p.update() == 1 and f.applied == [2, 1]
    assert p.busy_elsewhere == pytest.approx(1.33, abs=0.02)
    f.advance(3.0, own_cores=0.4, other_cores=1.6)
    assert p.update() == 1 and f.applied == [2, 1]  # stays at one while the load lasts
    f.advance(3.0, own_cores=1.0, other_cores=0.0)
    assert p.update() == 2 and f.applied == [2, 1, 2]  # the load is gone


def test_auto_ignores_a_cpu_that_goes_offline():
    f = _Fake()
    p = f.policy(0)
    f.advance(3.0, own_cores=2.0, other_cores=0.0)
    del f.ticks[1]  # CPU 1 leaves /proc/stat: its counter must not read as a drop
    f.advance(3.0, own_cores=1.0, other_cores=0.0)
    assert p.update() == 1  # one CPU left
    assert p.busy_elsewhere == pytest.approx(0.0, abs=0.01)


def test_fixed_count_is_never_measured():
    f = _Fake()
    calls = []
    p = f.policy(3, busy=lambda c: calls.append(c) or dict(f.ticks))
    f.advance(10.0, own_cores=1.0, other_cores=2.0)
    assert p.update() == 3 and p.threads == 3 and f.applied == [3]
    assert calls == [] and not p.auto


def test_auto_falls_back_to_the_cap_when_proc_stat_goes_away():
    f = _Fake()
    readable = [True]
    p = f.policy(0, cap=2, busy=lambda c: dict(f.ticks) if readable[0] else None)
    f.advance(3.0, own_cores=0.4, other_cores=1.6)
    assert p.update() == 1
    readable[0] = False
    f.advance(3.0, own_cores=0.4, other_cores=1.6)
    assert p.update() == 2 and f.applied == [2, 1, 2]  # nothing to measure: one per core
    f.advance(3.0, own_cores=0.4, other_cores=1.6)
    assert p.update() == 2


def test_auto_without_proc_stat_uses_the_cap():
    f = _Fake()
    p = f.policy(0, cap=4, busy=lambda c: None)
    assert p.threads == 4
    f.advance(5.0, own_cores=1.0, other_cores=3.0)
    assert p.update() == 4 and f.applied == [4]


def test_bad_arguments_rejected():
    with pytest.raises(ValueError, match="threads must be >= 0"):
        ThreadPolicy(-1, apply=lambda n: None)
    with pytest.raises(ValueError, match="check_every_s must be > 0"):
        ThreadPolicy(0, check_every_s=0, apply=lambda n: None)
