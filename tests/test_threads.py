"""The CPU thread policy: fixed counts, the auto rule, and its /proc/stat measurement."""

from __future__ import annotations

import os

import pytest

from qae.io.threads import ThreadPolicy, choose_threads, max_threads, read_busy_seconds


@pytest.mark.parametrize(
    ("cpus", "busy", "cap", "want"),
    [
        (2, 0.0, None, 2),  # quiet machine: every core
        (2, 0.05, None, 2),  # a shell and the OS
        (2, 1.33, None, 1),  # two busy 2-thread processes beside our 2 threads
        (2, 1.9, None, 1),  # never fewer than one
        (2, 5.0, None, 1),
        (8, 4.0, 2, 2),  # OMP_NUM_THREADS=2 on a half-busy 8-core machine
        (8, 2.6, None, 5),
        (1, 0.0, None, 1),
    ],
)
def test_choose_threads(cpus, busy, cap, want):
    assert choose_threads(cpus, busy, cap) == want


def test_choose_threads_rejects_no_cpus():
    with pytest.raises(ValueError, match="cpus must be >= 1"):
        choose_threads(0, 0.0)


def test_max_threads_respects_omp_num_threads():
    cpus = set(range(8))
    assert max_threads(cpus, {}) == 8
    assert max_threads(cpus, {"OMP_NUM_THREADS": "3"}) == 3
    assert max_threads(cpus, {"OMP_NUM_THREADS": "16"}) == 8
    assert max_threads(cpus, {"OMP_NUM_THREADS": "junk"}) == 8
    assert max_threads(cpus, {"OMP_NUM_THREADS": ""}) == 8


def _stat(tmp_path, rows):
    lines = ["cpu  1 2 3 4 5 6 7 8 0 0"]
    for cpu, (user, system, idle, iowait) in rows.items():
        lines.append(f"cpu{cpu} {user} 0 {system} {idle} {iowait} 0 0 0 0 0")
    lines.append("intr 12345")
    path = tmp_path / "stat"
    path.write_text("\n".join(lines) + "\n")
    return path


def test_read_busy_seconds_counts_only_usable_cpus(tmp_path):
    from qae.io import threads

    stat = _stat(tmp_path, {0: (100, 50, 1000, 10), 1: (300, 0, 10, 0), 2: (7, 7, 7, 7)})
    hz = threads.TICKS_PER_S
    assert read_busy_seconds({0, 1}, stat) == pytest.approx((150 + 300) / hz)
    assert read_busy_seconds({2}, stat) == pytest.approx(14 / hz)
    assert read_busy_seconds({5}, stat) is None  # no such CPU listed
    assert read_busy_seconds({0}, tmp_path / "missing") is None


def test_read_busy_seconds_on_this_machine_increases():
    if not os.path.exists("/proc/stat"):
        pytest.skip("no /proc/stat on this platform")
    cpus = set(os.sched_getaffinity(0))
    a = read_busy_seconds(cpus)
    x = 0
    for i in range(2_000_000):  # burn a little CPU
        x += i
    b = read_busy_seconds(cpus)
    assert a is not None and b is not None and b >= a


class _Fake:
    """A clock, the machine's busy CPU-seconds and this process's own, moved by hand."""

    def __init__(self):
        self.t = 0.0
        self.busy = 0.0
        self.own = 0.0
        self.applied: list[int] = []

    def advance(self, seconds: float, own_cores: float, other_cores: float) -> None:
        self.t += seconds
        self.own += seconds * own_cores
        self.busy += seconds * (own_cores + other_cores)

    def policy(self, requested: int, cpus=frozenset({0, 1})) -> ThreadPolicy:
        return ThreadPolicy(
            requested,
            check_every_s=2.0,
            clock=lambda: self.t,
            busy=lambda _: self.busy,
            own=lambda: self.own,
            apply=self.applied.append,
            cpus=set(cpus),
        )


def test_auto_follows_the_load(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    f = _Fake()
    p = f.policy(0)
    assert p.auto and p.threads == 2 and f.applied == [2]
    f.advance(3.0, own_cores=2.0, other_cores=0.05)
    assert p.update() == 2 and f.applied == [2]  # unchanged count: not re-applied
    f.advance(1.0, own_cores=0.67, other_cores=1.33)
    assert p.update() == 2  # not due yet: the window is too short
    f.advance(2.0, own_cores=0.67, other_cores=1.33)
    assert p.update() == 1 and f.applied == [2, 1]
    assert p.busy_elsewhere == pytest.approx(1.33)
    f.advance(3.0, own_cores=0.4, other_cores=1.6)
    assert p.update() == 1 and f.applied == [2, 1]  # stays at one while the load lasts
    f.advance(3.0, own_cores=1.0, other_cores=0.0)
    assert p.update() == 2 and f.applied == [2, 1, 2]  # the load is gone


def test_fixed_count_is_never_measured():
    f = _Fake()
    calls = []
    p = ThreadPolicy(3, busy=lambda c: calls.append(c) or 0.0, apply=f.applied.append, cpus={0, 1})
    f.advance(10.0, own_cores=1.0, other_cores=2.0)
    assert p.update() == 3 and p.threads == 3 and f.applied == [3]
    assert calls == [] and not p.auto


def test_auto_without_proc_stat_stays_at_the_cap(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    applied = []
    p = ThreadPolicy(0, busy=lambda c: None, apply=applied.append, cpus={0, 1, 2, 3})
    assert p.threads == 1 and p.update() == 1 and applied == [1]


def test_negative_threads_rejected():
    with pytest.raises(ValueError, match="threads must be >= 0"):
        ThreadPolicy(-1, apply=lambda n: None)
