"""``qae compare``: a grid of trainer configurations over seeds, run in parallel processes.

A grid is a list of named configurations, each a set of dotted overrides on a base
configuration: the embedded default (``TrainConfig()``), or a preset or YAML file given as
``--config`` (``qae compare --config reasoning`` runs the grid on the reasoning testbed).
Every (configuration, seed) pair gets its own run directory
``OUT/<name>/seed<seed>`` and its own process (``python -m qae.report.compare run-one``), so a
crash, a kill or an out-of-memory in one run leaves the others alone. At most ``parallel``
processes run at once, each with ``max(1, cpu_count // parallel)`` torch threads.

Re-running the same command is safe: a finished run (its metrics reach the last step and
its newest checkpoint is that step) is skipped, an unfinished one continues from its last
checkpoint with ``train(cfg, resume=True)``. Progress is read from the runs' own
``metrics.jsonl`` files, and a machine-readable summary is written to ``OUT/compare.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from qae.io.runlog import atomic_write_text, read_metrics

__all__ = [
    "GRIDS",
    "CompareResult",
    "RunSpec",
    "RunState",
    "STABILITY_LRS",
    "WORKER",
    "add_compare_parser",
    "base_config",
    "build_config",
    "cpu_count",
    "dedup_grid",
    "expand_grid",
    "load_grid",
    "render_progress",
    "run_compare",
    "run_status",
]

Grid = list[tuple[str, dict[str, Any]]]

# The DAPO-style settings of the embedded default (clip-higher 0.2/0.28, token-mean,
# dynamic sampling) are shared by every entry; only the baseline changes.
_MEAN = ("dapo-mean", {"algo.estimator": "grpo"})


def _qae(k: float) -> tuple[str, dict[str, Any]]:
    return f"qae-k{k:g}", {"algo.estimator": "qae", "kcontrol.kind": "constant", "kcontrol.k": k}


_ADAPTIVE = ("qae-adaptive", {"algo.estimator": "qae", "kcontrol.kind": "entropy_band"})

STABILITY_LRS = (1e-4, 3e-4, 1e-3, 2e-3, 3e-3)
"""Learning rates of the ``stability`` grid: the embedded default's 1e-4 up to 30x it. At
1e-2 every estimator was as broken as at 3e-3 within 30 steps, so that column said nothing;
3e-4 fills the gap above the default, and 2e-3 sits at the edge: in 300-step runs every
estimator held its entropy at 1e-3 and lost it at 3e-3."""


def _at_lr(entries: Sequence[tuple[str, dict[str, Any]]], lrs: Sequence[float]) -> Grid:
    """Every entry at every learning rate, named ``<entry>_lr<lr>`` (lr-major order)."""
    return [(f"{name}_lr{lr:g}", {**o, "optim.lr": lr}) for lr in lrs for name, o in entries]


_K04 = {"kcontrol.kind": "constant", "kcontrol.k": 0.4}

ABLATION: Grid = [
    _MEAN,
    _qae(0.4),
    ("mean-pos-only", {"algo.estimator": "grpo", "algo.keep": "pos"}),
    ("mean-neg-only", {"algo.estimator": "grpo", "algo.keep": "neg"}),
    ("mean-gated-k0.4", {"algo.estimator": "grpo", "algo.keep": "gate", **_K04}),
]
"""The paper's ablation on the mean baseline: all advantages (``dapo-mean``), QAE at K=0.4,
only the positive advantages (POS-only), only the negative ones (NEG-only), and QAE's
regime gate at K=0.4 applied to the mean baseline (hard groups keep their positive
advantages, easy groups their negative ones)."""

CLIP_HIGH: Grid = [
    (
        f"{name}-clip{c:g}",
        {**overrides, "loss.clip_high": c, "trainer.mini_batches": 4},
    )
    for c in (0.2, 0.28, 0.35)
    for name, overrides in (
        ("qae-k0.4", {"algo.estimator": "qae", **_K04}),
        ("dapo-mean", {"algo.estimator": "grpo"}),
    )
]
"""QAE at K=0.4 and the mean baseline with the upper clip ``loss.clip_high`` at 0.2 (no
Clip-Higher), 0.28 (DAPO's) and 0.35. With one on-policy update per step the importance
ratio is exactly 1 and no clip ever acts, so every entry splits each step's batch into
``trainer.mini_batches 4`` optimizer updates: from the second mini-batch on the policy has
moved, the ratio leaves 1 and the clip can bind (see ``train/clipfrac_high``)."""


GRIDS: dict[str, Grid] = {
    "default": [_MEAN, _qae(0.4)] + [_qae(k) for k in (0.2, 0.4, 0.6, 0.8)],
    "mean-vs-qae": [_MEAN, _qae(0.4)],
    "k-sweep": [_qae(k) for k in (0.2, 0.4, 0.6, 0.8)],
    "stability": _at_lr([_MEAN, _qae(0.4), _qae(0.6), _ADAPTIVE], STABILITY_LRS),
    "ablation": ABLATION,
    "clip-high": CLIP_HIGH,
}
"""Named grids: (configuration name, dotted overrides) pairs, before deduplication."""


def cpu_count() -> int:
    """CPUs this process may use (the affinity mask where the OS has one)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - macOS / Windows
        return max(1, os.cpu_count() or 1)


def base_config(base: str = ""):
    """The configuration a grid's overrides apply to: ``TrainConfig()`` for an empty
    ``base``, else the preset or YAML file it names."""
    from qae.train.config import TrainConfig, load_preset

    return load_preset(base) if base else TrainConfig()


def _canonical(overrides: Mapping[str, Any], base: str = "") -> tuple:
    from qae.io.configtools import apply_overrides, config_to_dict

    cfg = apply_overrides(base_config(base), dict(overrides))
    return tuple(sorted(_flat(config_to_dict(cfg)).items(), key=lambda kv: kv[0]))


def _flat(data: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, Mapping):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = tuple(value) if isinstance(value, list) else value
    return out


def dedup_grid(grid: Sequence[tuple[str, Mapping[str, Any]]], base: str = "") -> Grid:
    """Drop entries whose resolved config equals an earlier one (the first name wins).

    Two entries are the same when the full config trees they produce are equal, so
    ``{"kcontrol.k": 0.4}`` and ``{"kcontrol.k": "0.4", "algo.estimator": "qae"}`` are one
    entry. Distinct configurations under one name raise ``ValueError``.
    """
    seen: dict[tuple, str] = {}
    names: set[str] = set()
    out: Grid = []
    for name, overrides in grid:
        key = _canonical(overrides, base)
        if key in seen:
            continue
        if name in names:
            raise ValueError(f"grid name {name!r} is used by two different configurations")
        if not name or "/" in name or name.startswith("."):
            raise ValueError(f"grid name {name!r} must be a non-empty plain directory name")
        seen[key] = name
        names.add(name)
        out.append((name, dict(overrides)))
    return out


def load_grid(name_or_path: str) -> Grid:
    """A grid preset by name, or a YAML file mapping each name to its dotted overrides."""
    if name_or_path in GRIDS:
        return [(n, dict(o)) for n, o in GRIDS[name_or_path]]
    path = Path(name_or_path)
    if not path.is_file():
        raise ValueError(
            f"--grid={name_or_path!r} is neither a grid preset ({', '.join(GRIDS)}) nor a YAML file"
        )
    import yaml

    data = yaml.safe_load(path.read_text()) or {}
    if not isinstance(data, Mapping) or not all(isinstance(v, Mapping) for v in data.values()):
        raise ValueError(
            f"grid file {str(path)!r} must map each configuration name to a mapping of "
            f"dotted overrides"
        )
    return [(str(n), dict(o)) for n, o in data.items()]


@dataclass
class RunSpec:
    """One run of a comparison: a named configuration at one seed."""

    name: str
    seed: int
    run_dir: str
    overrides: dict[str, Any]
    """Every override of the run, seed, steps and run directory included."""
    base: str = ""
    """The preset or YAML file the overrides apply to (empty: the embedded default)."""

    @property
    def steps(self) -> int:
        return int(self.overrides["trainer.steps"])

    @property
    def label(self) -> str:
        return f"{self.name}/seed{self.seed}"


def expand_grid(
    grid: Sequence[tuple[str, Mapping[str, Any]]],
    seeds: Sequence[int],
    *,
    steps: int,
    out: str | os.PathLike,
    extra: Mapping[str, Any] | None = None,
    threads: int = 1,
    base: str = "",
) -> list[RunSpec]:
    """One :class:`RunSpec` per (deduplicated configuration, seed), seed-major order.

    ``trainer.seed`` and ``data.seed`` are both the seed; ``extra`` overrides apply to every
    run after the grid's own (so ``--set`` wins); ``threads`` is the torch thread count
    unless ``extra`` sets ``trainer.threads``. Run directories are ``out/<name>/seed<s>``.
    ``base`` names the preset or YAML file every run starts from (empty: the default).
    """
    if not seeds:
        raise ValueError("seeds must list at least one seed")
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"seeds must be distinct, got {list(seeds)}")
    specs = []
    entries = dedup_grid(grid, base)
    for seed in seeds:
        for name, overrides in entries:
            run_dir = str(Path(out) / name / f"seed{seed}")
            full = {
                "log.progress": False,
                "trainer.threads": threads,
                **overrides,
                "trainer.seed": seed,
                "data.seed": seed,
                "trainer.steps": steps,
                **dict(extra or {}),
                "log.out": run_dir,
            }
            specs.append(RunSpec(name, int(seed), run_dir, full, base))
    return specs


def build_config(spec: RunSpec):
    """The run's :class:`~qae.train.config.TrainConfig`: its base plus its overrides."""
    from qae.io.configtools import apply_overrides

    return apply_overrides(base_config(spec.base), spec.overrides)


def run_status(run_dir: str | os.PathLike, steps: int) -> str:
    """``done`` (final step logged and checkpointed), ``partial`` (a checkpoint to resume
    from), ``stale`` (metrics but no checkpoint: killed before its first one, so it starts
    over) or ``new`` (nothing on disk)."""
    from qae.io.runlog import Checkpointer

    run_dir = Path(run_dir)
    rows = read_metrics(run_dir / "metrics.jsonl")
    latest = Checkpointer(run_dir).latest()
    last_step = max((int(r.get("step", 0)) for r in rows), default=-1)
    ckpt_step = int(latest.name.split("_")[-1]) if latest is not None else -1
    if last_step >= steps and ckpt_step >= steps:
        return "done"
    if latest is not None:
        return "partial"
    return "stale" if rows else "new"


def _set_aside_stale(run_dir: str | os.PathLike) -> None:
    """Move the metrics of a run that never reached a checkpoint to
    ``metrics.restarted.jsonl``, so that the run can start over in its directory."""
    metrics = Path(run_dir) / "metrics.jsonl"
    if metrics.exists():
        os.replace(metrics, metrics.with_name("metrics.restarted.jsonl"))


# --------------------------------------------------------------------------------------
# Progress


@dataclass
class RunState:
    """What the scheduler knows about one run while the comparison goes on."""

    spec: RunSpec
    status: str = "queued"
    """queued, running, done, skipped (finished before), failed."""
    resumed: bool = False
    returncode: int | None = None
    start: float | None = None
    end: float | None = None
    step: int = 0
    last: dict[str, Any] = field(default_factory=dict)
    error: str = ""


def _refresh(state: RunState) -> None:
    rows = read_metrics(Path(state.spec.run_dir) / "metrics.jsonl")
    if rows:
        state.step = int(rows[-1].get("step", 0))
        state.last = rows[-1]


def _fmt(value: Any, spec: str = ".3f") -> str:
    return format(value, spec) if isinstance(value, (int, float)) else "-"


def render_progress(states: Sequence[RunState], now: float | None = None) -> str:
    """A fixed-width table of every run: status, step, reward, entropy, elapsed time."""
    now = time.time() if now is None else now
    width = max([len(s.spec.label) for s in states] + [3])
    head = (
        f"{'run':<{width}}  {'status':<8} {'step':>9} {'acc':>6} {'entropy':>8} "
        f"{'zero_adv':>8} {'elapsed':>8}"
    )
    lines = [head, "-" * len(head)]
    for s in states:
        elapsed = (s.end or now) - s.start if s.start is not None else None
        lines.append(
            f"{s.spec.label:<{width}}  {s.status:<8} {f'{s.step}/{s.spec.steps}':>9} "
            f"{_fmt(s.last.get('reward/accuracy'), '.2f'):>6} "
            f"{_fmt(s.last.get('actor/entropy')):>8} "
            f"{_fmt(s.last.get('adv/frac_zero_adv'), '.2f'):>8} "
            f"{_fmt(elapsed, '.0f') + 's' if elapsed is not None else '-':>8}"
        )
    counts: dict[str, int] = {}
    for s in states:
        counts[s.status] = counts.get(s.status, 0) + 1
    lines.append(", ".join(f"{v} {k}" for k, v in sorted(counts.items())))
    return "\n".join(lines)


class _Progress:
    """Redraws the table in place on a terminal; elsewhere prints it when a status changes."""

    def __init__(self, stream: Any, every: float) -> None:
        self.stream = stream
        self.every = every
        self.tty = bool(getattr(stream, "isatty", lambda: False)())
        self._lines = 0
        self._last_t = 0.0
        self._last_key: tuple = ()
        self._last_text = ""

    def show(self, states: Sequence[RunState], force: bool = False) -> None:
        """Print the table if a status changed or ``every`` seconds passed; ``force`` prints
        it unless the very same table is the last one printed (the final table once)."""
        if self.stream is None:
            return
        key = tuple(s.status for s in states)
        now = time.time()
        if not force and key == self._last_key and now - self._last_t < self.every:
            return
        text = render_progress(states, now)
        if force and text == self._last_text:
            return
        self._last_text = text
        if self.tty and self._lines:
            self.stream.write(f"\x1b[{self._lines}F\x1b[J")
        elif not self.tty:
            self.stream.write(time.strftime("[%H:%M:%S]\n"))
        self.stream.write(text + "\n")
        self.stream.flush()
        self._lines = text.count("\n") + 1
        self._last_t, self._last_key = now, key


# --------------------------------------------------------------------------------------
# Scheduling


@dataclass
class CompareResult:
    """Outcome of :func:`run_compare`: the summary written to ``compare.json``."""

    out: Path
    summary: dict[str, Any]

    @property
    def failed(self) -> list[str]:
        return [r["label"] for r in self.summary["runs"] if r["status"] == "failed"]


WORKER = (sys.executable, "-m", "qae.report.compare", "run-one")
"""The command that runs one spec (the spec file's path is appended)."""


def _launch(spec: RunSpec, resume: bool, worker: Sequence[str] = WORKER) -> subprocess.Popen:
    run_dir = Path(spec.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    spec_path = run_dir / "compare_run.json"
    atomic_write_text(spec_path, json.dumps({**asdict(spec), "resume": resume}, indent=1))
    log = (run_dir / "train.log").open("a")
    env = dict(os.environ)
    threads = str(spec.overrides.get("trainer.threads") or 1)
    env.update(OMP_NUM_THREADS=threads, MKL_NUM_THREADS=threads, TOKENIZERS_PARALLELISM="false")
    try:
        return subprocess.Popen(
            [*worker, str(spec_path)],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env,
        )
    finally:
        log.close()


def _log_tail(run_dir: str, n: int = 8) -> str:
    path = Path(run_dir) / "train.log"
    if not path.exists():
        return ""
    lines = [x for x in path.read_text(errors="replace").splitlines() if x.strip()]
    return "\n".join(lines[-n:])


def run_compare(
    specs: Sequence[RunSpec],
    out: str | os.PathLike,
    *,
    parallel: int,
    stream: Any = None,
    poll: float = 0.5,
    refresh: float = 10.0,
    meta: Mapping[str, Any] | None = None,
    on_update: Callable[[Sequence[RunState]], None] | None = None,
    worker: Sequence[str] = WORKER,
) -> CompareResult:
    """Run ``specs`` with at most ``parallel`` processes at once; write ``out/compare.json``.

    Finished runs are skipped, unfinished ones resumed. A run that exits non-zero is
    marked failed (with the tail of its ``train.log``) and the others go on. Ctrl-C stops
    the running processes, which resume on the next call. ``worker`` is the command run
    per spec with the path of its ``compare_run.json`` appended (default: this module's
    ``run-one``).
    """
    if parallel < 1:
        raise ValueError(f"parallel must be >= 1, got {parallel}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    states = [RunState(s) for s in specs]
    queue: list[RunState] = []
    for st in states:
        status = run_status(st.spec.run_dir, st.spec.steps)
        _refresh(st)
        if status == "done":
            st.status = "skipped"
        else:
            if status == "stale":
                _set_aside_stale(st.spec.run_dir)
            st.resumed = status == "partial"
            queue.append(st)
    running: dict[int, tuple[RunState, subprocess.Popen]] = {}
    progress = _Progress(stream, refresh)
    t0 = time.time()
    last_key: tuple = ()
    try:
        while queue or running:
            while queue and len(running) < parallel:
                st = queue.pop(0)
                proc = _launch(st.spec, st.resumed, worker)
                st.status, st.start = "running", time.time()
                running[proc.pid] = (st, proc)
            time.sleep(poll)
            for pid, (st, proc) in list(running.items()):
                _refresh(st)
                code = proc.poll()
                if code is None:
                    continue
                del running[pid]
                st.end, st.returncode = time.time(), code
                _refresh(st)
                if code == 0 and run_status(st.spec.run_dir, st.spec.steps) == "done":
                    st.status = "done"
                else:
                    st.status = "failed"
                    st.error = _log_tail(st.spec.run_dir) or f"exit code {code}"
            key = tuple(st.status for st in states)
            if key != last_key:  # keep compare.json current for a report taken mid-way
                _write_summary(out, states, parallel, t0, meta)
                last_key = key
            if on_update is not None:
                on_update(states)
            progress.show(states)
    except KeyboardInterrupt:
        for _st, proc in running.values():
            proc.terminate()
        for st, proc in running.values():
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
            st.status, st.end, st.returncode = "stopped", time.time(), proc.returncode
        _write_summary(out, states, parallel, t0, meta)
        raise
    progress.show(states, force=True)
    return CompareResult(out, _write_summary(out, states, parallel, t0, meta))


def _write_summary(
    out: Path, states: Sequence[RunState], parallel: int, t0: float, meta: Mapping | None
) -> dict[str, Any]:
    runs = []
    for st in states:
        final = {k: v for k, v in st.last.items() if k.startswith("val/")}
        runs.append(
            {
                "name": st.spec.name,
                "seed": st.spec.seed,
                "label": st.spec.label,
                "run_dir": os.path.relpath(st.spec.run_dir, out),
                "status": st.status,
                "resumed": st.resumed,
                "returncode": st.returncode,
                "start": st.start,
                "end": st.end,
                "wall_s": (st.end - st.start) if st.start and st.end else None,
                "last_step": st.step,
                "steps": st.spec.steps,
                "final_val": final,
                "overrides": st.spec.overrides,
                "error": st.error,
            }
        )
    summary = {
        **dict(meta or {}),
        "parallel": parallel,
        "cpu_count": cpu_count(),
        "started": t0,
        "updated": time.time(),
        "complete": all(st.status not in ("queued", "running") for st in states),
        "wall_s": time.time() - t0,
        "configs": list(dict.fromkeys(st.spec.name for st in states)),
        "seeds": list(dict.fromkeys(st.spec.seed for st in states)),
        "runs": runs,
    }
    atomic_write_text(out / "compare.json", json.dumps(summary, indent=1) + "\n")
    return summary


def _run_one(spec_path: str) -> int:
    """Worker entry: build the run's config and train (resuming when asked)."""
    from transformers.utils import logging as hf_logging

    from qae.train.trainer import train

    hf_logging.disable_progress_bar()
    data = json.loads(Path(spec_path).read_text())
    resume = bool(data.pop("resume", False))
    spec = RunSpec(**data)
    cfg = build_config(spec)
    print(
        f"[{time.strftime('%Y-%m-%d %H:%M:%S')}] {spec.label}: "
        f"{'resuming' if resume else 'starting'}",
        flush=True,
    )
    result = train(cfg, resume=resume)
    print(f"[{time.strftime('%Y-%m-%d %H:%M:%S')}] finished: {result.val_after}", flush=True)
    return 0


# --------------------------------------------------------------------------------------
# CLI


def _parse_set(items: Sequence[str]) -> dict[str, str]:
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"--set expects key=value, got {item!r}")
        out[key.strip()] = value.strip()
    return out


def _parse_seeds(text: str) -> list[int]:
    """``3`` means seeds 0, 1, 2; ``1,5,9`` lists them."""
    try:
        if "," in text:
            return [int(x) for x in text.split(",") if x.strip()]
        n = int(text)
    except ValueError:
        raise ValueError(
            f"--seeds must be a count or a comma-separated list, got {text!r}"
        ) from None
    if n < 1:
        raise ValueError(f"--seeds must be >= 1, got {n}")
    return list(range(n))


def _compare(args: argparse.Namespace) -> int:
    grid = load_grid(args.grid)
    seeds = _parse_seeds(args.seeds)
    parallel = args.parallel or cpu_count()
    if parallel < 1:
        raise ValueError(f"--parallel must be >= 1, got {parallel}")
    threads = max(1, cpu_count() // parallel)
    extra = _parse_set(args.set)
    specs = expand_grid(
        grid, seeds, steps=args.steps, out=args.out, extra=extra, threads=threads, base=args.config
    )
    for spec in specs:  # fail on a bad override before any process starts
        build_config(spec)
    names = list(dict.fromkeys(s.name for s in specs))
    print(
        f"qae compare: {len(names)} configurations ({', '.join(names)}) x {len(seeds)} seeds, "
        f"{args.steps} steps, {parallel} in parallel with {threads} thread(s) each, on "
        f"{args.config or 'the embedded default'} -> {args.out}",
        flush=True,
    )
    meta = {
        "grid": args.grid,
        "config": args.config,
        "steps": args.steps,
        "set": extra,
        "command": " ".join(["qae", *sys.argv[1:]]) if sys.argv[1:2] == ["compare"] else "",
    }
    result = run_compare(
        specs, args.out, parallel=parallel, stream=sys.stdout, refresh=args.refresh, meta=meta
    )
    wall = result.summary["wall_s"]
    print(f"summary: {result.out / 'compare.json'} (wall time {wall:.0f} s)")
    for r in result.summary["runs"]:
        if r["status"] == "failed":
            print(f"FAILED {r['label']} (exit {r['returncode']}):\n{r['error']}", file=sys.stderr)
    return 1 if result.failed else 0


def add_compare_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``compare`` sub-command to an argparse ``subparsers`` object."""
    p = subparsers.add_parser(
        "compare",
        help="run a grid of trainer configurations over seeds, in parallel, resumable",
        description="Run every configuration of a grid at every seed on the embedded default "
        "(built-in task and tiny model) or on the preset --config names, each run in its own "
        "process, at most --parallel at once. Re-running the same command skips finished runs "
        "and resumes unfinished ones. "
        f"Grid presets: {'; '.join(f'{n}: ' + ', '.join(x for x, _ in dedup_grid(g)) for n, g in GRIDS.items())}.",  # noqa: E501
    )
    p.add_argument(
        "--grid", default="default", help="grid preset name or YAML file {name: {key: value}}"
    )
    p.add_argument(
        "--config",
        default="",
        help="preset name or YAML file every run starts from (default: the embedded default; "
        "reasoning: the reasoning testbed)",
    )
    p.add_argument(
        "--seeds", default="3", help="number of seeds (0..N-1) or a comma-separated list"
    )
    p.add_argument("--steps", type=int, default=300, help="training steps of every run")
    p.add_argument(
        "--parallel",
        type=int,
        default=0,
        help="runs at once (0 = the CPU count); torch threads per run = max(1, CPUs // this)",
    )
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="dotted config override applied to every run (repeatable), e.g. eval.n=8",
    )
    p.add_argument("--out", default="runs/compare", help="comparison directory")
    p.add_argument(
        "--refresh", type=float, default=30.0, help="seconds between progress tables (non-tty)"
    )
    p.set_defaults(func=_compare)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m qae.report.compare run-one SPEC.json``: the worker process of one run."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if len(argv) != 2 or argv[0] != "run-one":
        print("usage: python -m qae.report.compare run-one SPEC.json", file=sys.stderr)
        return 2
    return _run_one(argv[1])


if __name__ == "__main__":
    sys.exit(main())
