"""Bounded-time execution of scoring functions: a signal timer and a killable worker pool.

Two layers, because neither alone is enough:

- :func:`time_limit` arms ``SIGALRM`` (``setitimer``) and raises :class:`ScoreTimeout` when it
  fires. It is cheap but works only in the main thread, and it cannot interrupt a long
  C-level operation (a huge integer power inside sympy).
- :class:`ScoringPool` runs calls in worker processes, each item under :func:`time_limit` in
  the worker's main thread, and the parent kills and replaces a worker that has not answered
  ``timeout + grace`` seconds after it got its item. This bound holds whatever the worker is
  doing and whichever thread of the parent calls :meth:`ScoringPool.map`.

A scoring function may carry a ``warmup`` attribute: a callable run once per worker when the
function is loaded (under ``LOAD_TIMEOUT``, not an item's bound), for one-time costs such as
importing a parser and compiling its grammar, so that the first item a fresh worker scores
is not timed out for them on a busy machine (:func:`warm_up`).

``ScoreTimeout`` subclasses ``BaseException`` (as math-verify's ``TimeoutException`` does) so
that the ``except Exception`` blocks inside scoring libraries do not swallow it.
"""

from __future__ import annotations

import atexit
import contextlib
import hashlib
import multiprocessing as mp
import os
import pickle
import signal
import socket
import sys
import threading
import time
import warnings
from collections import Counter, deque
from collections.abc import Callable, Hashable, Iterator, Sequence
from dataclasses import dataclass, field
from multiprocessing.connection import Connection, wait
from typing import Any

__all__ = [
    "DEFAULT_TIMEOUT",
    "ScoreTimeout",
    "ScoringPool",
    "bounded_call",
    "default_workers",
    "shared_pool",
    "time_limit",
    "warm_up",
]

DEFAULT_TIMEOUT = 5.0
# Extra seconds the parent waits past the worker's own timer before it kills the worker.
DEFAULT_GRACE = 1.0
# Seconds a fresh worker may take to start and to import a scoring function's module.
LOAD_TIMEOUT = 120.0
# How often an idle worker checks that its parent is still alive.
_PARENT_CHECK = 2.0


class ScoreTimeout(BaseException):
    """Raised inside a scoring call when its time bound expires."""


def _raise_timeout(signum: int, frame: object) -> None:
    raise ScoreTimeout("scoring time bound expired")


@contextlib.contextmanager
def time_limit(seconds: float | None) -> Iterator[None]:
    """Raise :class:`ScoreTimeout` in the body once ``seconds`` have passed (main thread only).

    Outside the main thread, without ``setitimer`` (Windows) or with ``seconds=None`` this is a
    no-op: use :class:`ScoringPool` for a bound that holds everywhere. Nests: an enclosing
    limit that expires sooner is left in charge, and a later one is restored on exit.
    """
    if (
        seconds is None
        or not hasattr(signal, "setitimer")
        or threading.current_thread() is not threading.main_thread()
    ):
        yield
        return
    if not seconds > 0:
        raise ValueError(f"timeout must be > 0 seconds, got timeout={seconds!r}")
    start = time.monotonic()
    outer_delay, _ = signal.getitimer(signal.ITIMER_REAL)
    if 0 < outer_delay <= seconds:
        yield  # the enclosing timer fires first
        return
    previous = signal.signal(signal.SIGALRM, _raise_timeout)
    signal.setitimer(signal.ITIMER_REAL, float(seconds))
    try:
        yield
    finally:
        try:
            signal.setitimer(signal.ITIMER_REAL, 0)
        finally:
            signal.signal(signal.SIGALRM, previous if previous is not None else signal.SIG_DFL)
            if outer_delay > 0:
                left = outer_delay - (time.monotonic() - start)
                signal.setitimer(signal.ITIMER_REAL, max(left, 1e-3))


def warm_up(fn: Callable[..., Any]) -> None:
    """Run ``fn.warmup()`` if ``fn`` has one (a bound method finds its function's).

    Its errors are ignored: the calls that follow raise them again, where they are counted.
    """
    warm = getattr(fn, "warmup", None)
    if callable(warm):
        with contextlib.suppress(Exception):
            warm()


# --------------------------------------------------------------------------------------
# Worker side


def _worker_main(conn: Connection, parent_pid: int) -> None:
    """Serve ``load`` / ``call`` messages until ``stop`` or until the parent goes away."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
    fns: dict[str, Callable[..., Any]] = {}
    conn.send(("ready",))
    while True:
        try:
            # Forked siblings may hold copies of our pipe, so EOF alone does not tell that
            # the parent died: look at the parent pid as well.
            while not conn.poll(_PARENT_CHECK):
                if os.getppid() != parent_pid:
                    return
            msg = conn.recv()
        except (EOFError, OSError):
            return
        kind = msg[0]
        if kind == "stop":
            return
        if kind == "load":
            _, key, payload = msg
            try:
                fns[key] = pickle.loads(payload)
                warm_up(fns[key])
                conn.send(("loaded", key))
            except Exception as err:
                conn.send(("load_error", key, f"{type(err).__name__}: {err}"))
        elif kind == "call":
            _, key, args, timeout = msg
            try:
                with time_limit(timeout):
                    value = fns[key](*args)
                conn.send(("result", "ok", value))
            except ScoreTimeout:
                conn.send(("result", "timeout", None))
            except BaseException as err:  # incl. library timeouts that are BaseExceptions
                conn.send(("result", "error", f"{type(err).__name__}: {err}"[:500]))


# --------------------------------------------------------------------------------------
# Parent side


@dataclass(eq=False)
class _Call:
    """One :meth:`ScoringPool.map` call: its function, its items and their outcomes."""

    key: str
    payload: bytes
    fn: object
    items: list[tuple]
    timeout: float
    results: list[tuple[str, Any] | None]
    pending: dict[Hashable, deque[int]]  # waiting items by affinity group
    left: int
    error: BaseException | None = None
    done: threading.Event = field(default_factory=threading.Event)


@dataclass(eq=False)
class _Worker:
    process: Any
    conn: Connection
    ready: bool = False
    loaded: set[str] = field(default_factory=set)
    loading: str | None = None
    task: tuple[_Call, int] | None = None
    group: tuple[_Call, Hashable] | None = None  # the affinity group it served last
    deadline: float = 0.0


def default_workers() -> int:
    """Worker processes used when none are asked for: the usable cores, at most 8."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:
        cores = os.cpu_count() or 1
    return max(1, min(cores, 8))


def _context(start_method: str | None) -> mp.context.BaseContext:
    methods = mp.get_all_start_methods()
    if start_method is None:
        # fork on Linux: a replacement for a killed worker is ready in milliseconds and the
        # user's main module is not run again (spawn and forkserver re-import it).
        start_method = "fork" if sys.platform.startswith("linux") else "spawn"
    if start_method not in methods:
        raise ValueError(f"unknown start_method={start_method!r}; available: {', '.join(methods)}")
    return mp.get_context(start_method)


class ScoringPool:
    """Worker processes that run a function on many argument tuples with a hard time bound.

    Args:
        workers: number of worker processes (>= 1).
        start_method: multiprocessing start method; default ``fork`` on Linux (restarts
            in milliseconds), ``spawn`` elsewhere (which, like ``forkserver``, re-imports
            the main module: guard scripts with ``if __name__ == "__main__":``).
        grace: seconds past ``timeout`` before a silent worker is killed.

    :meth:`map` is thread-safe and serves concurrent callers together: one dispatcher thread
    hands items to idle workers, taking turns between the calls in progress, so a short call
    is not queued behind a long one. A worker that hangs or dies is replaced; its item gets
    the status ``"timeout"`` or ``"crashed"``. ``stats`` counts those events.
    """

    def __init__(
        self, workers: int, *, start_method: str | None = None, grace: float = DEFAULT_GRACE
    ) -> None:
        if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
            raise ValueError(f"workers must be an integer >= 1, got workers={workers!r}")
        self.size = workers
        self.grace = float(grace)
        self.stats: Counter[str] = Counter()
        self._ctx = _context(start_method)
        self._closed = False
        self._reset()

    def _reset(self) -> None:
        """Fresh dispatcher state (also in a child process that inherited the pool by fork)."""
        self._pid = os.getpid()
        self._lock = threading.Lock()
        self._calls: list[_Call] = []
        self._turn = 0
        self._workers: list[_Worker] = []
        self._thread: threading.Thread | None = None
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_w.setblocking(False)
        self._wake_r.setblocking(False)

    # -- worker lifecycle ----------------------------------------------------------------

    def _spawn(self) -> _Worker:
        parent_conn, child_conn = self._ctx.Pipe(duplex=True)
        proc = self._ctx.Process(target=_worker_main, args=(child_conn, os.getpid()), daemon=True)
        with warnings.catch_warnings():
            # Python >= 3.12 warns about fork in a threaded process; the worker only runs
            # pure-Python scoring code and touches none of the parent's threads' locks.
            warnings.filterwarnings("ignore", message=".*fork.*", category=DeprecationWarning)
            proc.start()
        child_conn.close()
        self.stats["started"] += 1
        return _Worker(proc, parent_conn, deadline=time.monotonic() + LOAD_TIMEOUT)

    def _kill(self, worker: _Worker) -> None:
        with contextlib.suppress(Exception):
            worker.process.kill()
        with contextlib.suppress(Exception):
            worker.process.join(timeout=5)
        with contextlib.suppress(Exception):
            worker.conn.close()

    def _replace(self, worker: _Worker) -> None:
        self._kill(worker)
        self._workers[self._workers.index(worker)] = self._spawn()

    def close(self) -> None:
        """Stop every worker (politely, then by force); calls in progress raise."""
        with self._lock:
            self._closed = True
            self._fail(lambda call: True, RuntimeError("ScoringPool is closed"))
            thread = self._thread
        self._wake()
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout=10)
        for w in self._workers:
            with contextlib.suppress(Exception):
                w.conn.send(("stop",))
        for w in self._workers:
            with contextlib.suppress(Exception):
                w.process.join(timeout=1)
            self._kill(w)
        self._workers = []

    def __enter__(self) -> ScoringPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- callers ---------------------------------------------------------------------------

    def map(
        self,
        fn: Callable[..., Any],
        arg_tuples: Sequence[tuple],
        *,
        timeout: float = DEFAULT_TIMEOUT,
        groups: Sequence[Hashable] | None = None,
    ) -> list[tuple[str, Any]]:
        """Run ``fn(*args)`` for every tuple; returns ``(status, value)`` in input order.

        ``status`` is ``"ok"`` (``value`` is the return value), ``"error"`` (the function
        raised; ``value`` is the message), ``"timeout"`` or ``"crashed"`` (``value`` None).
        Each item finishes within about ``timeout + grace`` seconds of reaching a worker.
        ``groups[i]`` (optional) is item ``i``'s affinity: a worker keeps taking items of the
        group it served last, and workers start on different groups, so that what a group
        shares (a ground truth to parse) is done by one worker.
        """
        if not timeout > 0:
            raise ValueError(f"timeout must be > 0 seconds, got timeout={timeout!r}")
        try:
            payload = pickle.dumps(fn)
        except Exception as err:
            raise ValueError(
                f"reward function {fn!r} cannot be sent to worker processes ({err}); "
                "define it at module level, or score in-process with workers=0"
            ) from None
        items = list(arg_tuples)
        if not items:
            return []
        if groups is not None and len(groups) != len(items):
            raise ValueError(
                f"groups must give one group per item, got {len(groups)} for {len(items)}"
            )
        pending: dict[Hashable, deque[int]] = {}
        for i, g in enumerate(groups if groups is not None else [None] * len(items)):
            pending.setdefault(g, deque()).append(i)
        key = hashlib.sha1(payload).hexdigest()
        n = len(items)
        call = _Call(key, payload, fn, items, float(timeout), [None] * n, pending, n)
        if os.getpid() != self._pid:  # inherited through fork: the workers are the parent's
            self._reset()
        with self._lock:
            if self._closed:
                raise RuntimeError("ScoringPool is closed")
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._serve, name="qae-scoring", daemon=True)
                self._thread.start()
            self._calls.append(call)
        self._wake()
        try:
            while not call.done.wait(0.5):
                pass
        except BaseException:  # interrupted: the dispatcher drops the call's items
            with self._lock:
                self._fail(lambda c: c is call, RuntimeError("cancelled"))
            raise
        if call.error is not None:
            raise call.error
        return [r if r is not None else ("crashed", None) for r in call.results]

    def _wake(self) -> None:
        with contextlib.suppress(OSError):  # a full buffer already means "wake up"
            self._wake_w.send(b"\0")

    # -- dispatcher (one thread; the only one that touches workers) ------------------------

    def _serve(self) -> None:
        try:
            while True:
                with self._lock:
                    if self._closed:
                        return
                    while len(self._workers) < self.size:
                        self._workers.append(self._spawn())
                    self._assign()
                    busy = [w for w in self._workers if not w.ready or w.loading or w.task]
                deadline = min((w.deadline for w in busy), default=None)
                wait_for = None if deadline is None else max(0.0, deadline - time.monotonic())
                ready = set(wait([w.conn for w in busy] + [self._wake_r], timeout=wait_for))
                with self._lock:
                    if self._wake_r in ready:
                        with contextlib.suppress(OSError):
                            self._wake_r.recv(4096)
                    for w in busy:
                        if w.conn in ready:
                            self._receive(w)
                        elif time.monotonic() >= w.deadline:
                            self._lost(w, "timeout")
        except BaseException as err:
            with self._lock:
                msg = f"the scoring pool's dispatcher failed: {type(err).__name__}: {err}"
                self._fail(lambda call: True, RuntimeError(msg))

    def _next_call(self) -> _Call | None:
        """The next call with items waiting, taking turns between calls."""
        n = len(self._calls)
        for k in range(n):
            call = self._calls[(self._turn + k) % n]
            if call.pending:
                self._turn = (self._turn + k + 1) % n
                return call
        return None

    def _assign(self) -> None:
        """Give every idle worker an item (after loading the item's function into it)."""
        now = time.monotonic()
        for w in list(self._workers):
            if not w.ready or w.loading is not None or w.task is not None:
                continue
            call = self._next_call()
            if call is None:
                return
            try:
                if call.key not in w.loaded:
                    w.conn.send(("load", call.key, call.payload))
                    w.loading, w.deadline = call.key, now + LOAD_TIMEOUT
                else:
                    idx = self._take(call, w)
                    w.task, w.deadline = (call, idx), now + call.timeout + self.grace
                    w.conn.send(("call", call.key, call.items[idx], call.timeout))
            except (OSError, ValueError):  # the worker died while idle: not the item's fault
                if w.task is not None and w.group is not None:
                    call.pending.setdefault(w.group[1], deque()).appendleft(w.task[1])
                self.stats["crashed"] += 1
                self._replace(w)

    def _take(self, call: _Call, w: _Worker) -> int:
        """The next item of ``call`` for ``w``: from the group ``w`` served last if it has
        items left, else from the first group no other worker is on."""
        group = w.group[1] if w.group is not None and w.group[0] is call else None
        if group not in call.pending:
            claimed = {x.group[1] for x in self._workers if x.group and x.group[0] is call}
            group = next((g for g in call.pending if g not in claimed), next(iter(call.pending)))
        queue = call.pending[group]
        idx = queue.popleft()
        if not queue:
            del call.pending[group]
        w.group = (call, group)
        return idx

    def _receive(self, w: _Worker) -> None:
        try:
            msg = w.conn.recv()
        except (EOFError, OSError):
            self._lost(w, "crashed")
            return
        kind = msg[0]
        if kind == "ready":
            w.ready = True
        elif kind == "loaded":
            w.loaded.add(msg[1])
            w.loading = None
        elif kind == "load_error":
            key = w.loading
            self._replace(w)
            self._fail(
                lambda call: call.key == key,
                ValueError(
                    f"the reward function cannot be loaded in a worker process ({msg[2]}); "
                    "define it in an importable module, or score in-process with workers=0"
                ),
            )
        elif kind == "result":
            _, status, value = msg
            if status != "ok":
                self.stats[status] += 1
            call, idx = w.task
            w.task = None
            self._settle(call, idx, (status, value))

    def _settle(self, call: _Call, idx: int, outcome: tuple[str, Any]) -> None:
        if call.done.is_set():  # failed or cancelled meanwhile
            return
        call.results[idx] = outcome
        call.left -= 1
        if call.left == 0:
            self._calls.remove(call)
            call.done.set()

    def _fail(self, which: Callable[[_Call], bool], error: BaseException) -> None:
        """End the calls ``which`` selects with ``error`` (their remaining items are dropped)."""
        for call in [c for c in self._calls if which(c)]:
            call.error = error
            self._calls.remove(call)
            call.done.set()

    def _lost(self, w: _Worker, status: str) -> None:
        """A worker died or overran: its item (if any) gets ``status``; the worker is replaced."""
        self.stats[status] += 1
        task, loading, pid = w.task, w.loading, w.process.pid
        self._replace(w)
        if loading is not None:
            state = "died" if status == "crashed" else "hung"
            self._fail(
                lambda call: call.key == loading,
                RuntimeError(
                    f"a scoring worker {state} while loading the reward function (pid {pid})"
                ),
            )
        if task is not None:
            self._settle(task[0], task[1], (status, None))


_shared: dict[int, ScoringPool] = {}
_shared_lock = threading.Lock()


def shared_pool(workers: int | None = None) -> ScoringPool:
    """The process-wide pool with ``workers`` processes (default :func:`default_workers`)."""
    workers = default_workers() if workers is None else workers
    with _shared_lock:
        pool = _shared.get(workers)
        if pool is None or pool._closed:
            pool = _shared[workers] = ScoringPool(workers)
        return pool


@atexit.register
def _close_shared() -> None:
    for pool in list(_shared.values()):
        with contextlib.suppress(Exception):
            pool.close()


def bounded_call(
    fn: Callable[..., Any], args: tuple, *, timeout: float = DEFAULT_TIMEOUT
) -> Any | None:
    """``fn(*args)`` in a worker of the shared pool; None if it timed out, raised or crashed."""
    status, value = shared_pool().map(fn, [args], timeout=timeout)[0]
    return value if status == "ok" else None
