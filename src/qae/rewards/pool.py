"""Bounded-time execution of scoring functions: a signal timer and a killable worker pool.

Two layers, because neither alone is enough:

- :func:`time_limit` arms ``SIGALRM`` (``setitimer``) and raises :class:`ScoreTimeout` when it
  fires. It is cheap but works only in the main thread, and it cannot interrupt a long
  C-level operation (a huge integer power inside sympy).
- :class:`ScoringPool` runs calls in worker processes, each item under :func:`time_limit` in
  the worker's main thread, and the parent kills and replaces a worker that has not answered
  ``timeout + grace`` seconds after it got its item. This bound holds whatever the worker is
  doing and whichever thread of the parent calls :meth:`ScoringPool.map`.

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
import sys
import threading
import time
import warnings
from collections import Counter, deque
from collections.abc import Callable, Iterator, Sequence
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


@dataclass
class _Worker:
    process: Any
    conn: Connection
    ready: bool = False
    loaded: set[str] = field(default_factory=set)
    loading: str | None = None
    item: int | None = None
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

    :meth:`map` is thread-safe (calls are serialised). A worker that hangs or dies is replaced;
    its item gets the status ``"timeout"`` or ``"crashed"``. ``stats`` counts those events.
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
        self._lock = threading.Lock()
        self._workers: list[_Worker] = []
        self._pid = os.getpid()
        self._closed = False

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

    def _ensure_workers(self) -> None:
        if self._closed:
            raise RuntimeError("ScoringPool is closed")
        if os.getpid() != self._pid:  # inherited through fork: the workers belong to the parent
            self._workers, self._pid = [], os.getpid()
        while len(self._workers) < self.size:
            self._workers.append(self._spawn())

    def close(self) -> None:
        """Stop every worker (politely, then by force)."""
        with self._lock:
            self._closed = True
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

    # -- mapping ---------------------------------------------------------------------------

    def map(
        self,
        fn: Callable[..., Any],
        arg_tuples: Sequence[tuple],
        *,
        timeout: float = DEFAULT_TIMEOUT,
    ) -> list[tuple[str, Any]]:
        """Run ``fn(*args)`` for every tuple; returns ``(status, value)`` in input order.

        ``status`` is ``"ok"`` (``value`` is the return value), ``"error"`` (the function
        raised; ``value`` is the message), ``"timeout"`` or ``"crashed"`` (``value`` None).
        Each item finishes within about ``timeout + grace`` seconds of reaching a worker.
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
        key = hashlib.sha1(payload).hexdigest()
        with self._lock:
            self._ensure_workers()
            try:
                return self._run(key, payload, fn, list(arg_tuples), float(timeout))
            except BaseException:
                # Answers still in flight would be read by the next call: drop those workers.
                for w in list(self._workers):
                    if w.item is not None or w.loading is not None:
                        self._replace(w)
                raise

    def _run(
        self, key: str, payload: bytes, fn: object, items: list[tuple], timeout: float
    ) -> list[tuple[str, Any]]:
        results: list[tuple[str, Any] | None] = [None] * len(items)
        pending = deque(range(len(items)))
        done = 0
        while done < len(items):
            now = time.monotonic()
            for w in list(self._workers):
                if not w.ready or w.loading is not None or w.item is not None:
                    continue
                try:
                    if key not in w.loaded:
                        w.conn.send(("load", key, payload))
                        w.loading, w.deadline = key, now + LOAD_TIMEOUT
                    elif pending:
                        idx = pending.popleft()
                        w.item, w.deadline = idx, now + timeout + self.grace
                        w.conn.send(("call", key, items[idx], timeout))
                except (OSError, ValueError):  # the worker died while idle: not the item's fault
                    if w.item is not None:
                        pending.appendleft(w.item)
                    self.stats["crashed"] += 1
                    self._replace(w)
            busy = [w for w in self._workers if not w.ready or w.loading or w.item is not None]
            if not busy:
                continue
            wait_for = max(0.0, min(w.deadline for w in busy) - time.monotonic())
            ready_conns = set(wait([w.conn for w in busy], timeout=wait_for))
            for w in busy:
                if w.conn in ready_conns:
                    done += self._receive(w, results, fn)
                elif time.monotonic() >= w.deadline:
                    done += self._expire(w, results)
        return [r if r is not None else ("crashed", None) for r in results]

    def _receive(self, w: _Worker, results: list, fn: object) -> int:
        try:
            msg = w.conn.recv()
        except (EOFError, OSError):
            return self._lost(w, results, "crashed")
        kind = msg[0]
        if kind == "ready":
            w.ready = True
        elif kind == "loaded":
            w.loaded.add(msg[1])
            w.loading = None
        elif kind == "load_error":
            self._replace(w)
            raise ValueError(
                f"reward function {fn!r} cannot be loaded in a worker process ({msg[2]}); "
                "define it in an importable module, or score in-process with workers=0"
            )
        elif kind == "result":
            _, status, value = msg
            if status != "ok":
                self.stats[status] += 1
            results[w.item] = (status, value)
            w.item = None
            return 1
        return 0

    def _expire(self, w: _Worker, results: list) -> int:
        return self._lost(w, results, "timeout")

    def _lost(self, w: _Worker, results: list, status: str) -> int:
        """A worker died or overran: its item (if any) gets ``status``; the worker is replaced."""
        self.stats[status] += 1
        item, loading = w.item, w.loading
        self._replace(w)
        if loading is not None:
            raise RuntimeError(
                f"a scoring worker {'died' if status == 'crashed' else 'hung'} while loading "
                f"the reward function (pid {w.process.pid})"
            )
        if item is None:
            return 0
        results[item] = (status, None)
        return 1


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
