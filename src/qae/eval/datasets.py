"""Prompt datasets: local JSONL / Parquet files, Hugging Face hub datasets, known benchmarks.

Every source becomes a list of :class:`PromptRecord` (an id, the problem text, the reference
answer as text, and the chat messages when the source already holds them). Two schemas are
understood:

- simple rows: a problem field (``problem``, ``question``, ...) and an answer field
  (``answer``, ...), or the fields named by ``problem_key`` / ``answer_key``;
- the verl / DAPO schema: ``prompt`` is a list of chat messages and the answer is
  ``reward_model.ground_truth``.

Known benchmark names (``aime24``, ``aime25``, ``amc23``, ``math500``, ``gsm8k``) resolve,
in this order, to a ``<name>.jsonl`` in ``data_dir`` when one exists, to the copy shipped
with qae (``qae/benchmarks_data``, sources and licences in its ``SOURCES.md``; used for the
benchmark's own split), and else to their Hugging Face dataset (this needs the optional
``datasets`` package and a network).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qae.io.errors import RunError
from qae.rewards.reference import ground_truth_text

__all__ = [
    "BENCHMARKS",
    "BENCHMARK_DIR",
    "Benchmark",
    "PromptRecord",
    "load_prompts",
    "records_from_rows",
]

ANSWER_KEYS = ("answer", "ground_truth", "final_answer", "target", "Answer", "reward_model")
PROBLEM_KEYS = ("problem", "question", "prompt", "Problem", "Question", "input", "query")
ID_KEYS = ("id", "idx", "unique_id", "problem_idx", "ID", "index")


@dataclass(frozen=True)
class PromptRecord:
    """One prompt with its reference answer.

    Attributes:
        id: identifier, unique within ``source``.
        problem: the problem text (the last user message for chat-formatted sources).
        answer: the reference answer as text (``27.0`` becomes ``"27"``).
        source: the dataset it came from (a benchmark name or a file stem).
        messages: the chat messages when the source stores the full prompt (verl schema);
            None when a prompt template should be applied to ``problem``.
        meta: the other fields of the row, for reference.
    """

    id: str
    problem: str
    answer: str
    source: str
    messages: tuple[Mapping[str, str], ...] | None = None
    meta: Mapping[str, Any] = field(default_factory=dict, compare=False, repr=False)


BENCHMARK_DIR = Path(__file__).resolve().parents[1] / "benchmarks_data"
"""The evaluation sets shipped with qae (``SOURCES.md`` there records sources and licences)."""


@dataclass(frozen=True)
class Benchmark:
    """Where a known benchmark lives on the Hugging Face hub, and its local file names (the
    first one that exists in ``data_dir``, then in :data:`BENCHMARK_DIR`, is read)."""

    hub_id: str
    split: str
    config: str | None = None
    files: tuple[str, ...] = ()


BENCHMARKS: dict[str, Benchmark] = {
    "aime24": Benchmark("HuggingFaceH4/aime_2024", "train", files=("aime24.jsonl",)),
    "aime25": Benchmark("yentinglin/aime_2025", "train", files=("aime25.jsonl",)),
    "amc23": Benchmark("math-ai/amc23", "test", files=("amc23.jsonl",)),
    "math500": Benchmark("HuggingFaceH4/MATH-500", "test", files=("math500.jsonl",)),
    "gsm8k": Benchmark("openai/gsm8k", "test", "main", ("gsm8k.jsonl", "gsm8k_test.jsonl")),
}


def _lookup(row: Mapping[str, Any], key: str) -> Any:
    """``row[key]`` where ``key`` may be a dotted path (``reward_model.ground_truth``)."""
    value: Any = row
    for part in key.split("."):
        if not isinstance(value, Mapping) or part not in value:
            raise KeyError(key)
        value = value[part]
    return value


def _is_messages(value: Any) -> bool:
    return (
        isinstance(value, (list, tuple))
        and len(value) > 0
        and all(isinstance(m, Mapping) and "role" in m and "content" in m for m in value)
    )


def _pick(row: Mapping[str, Any], key: str | None, candidates: Sequence[str], what: str) -> Any:
    if key is not None:
        try:
            return _lookup(row, key)
        except KeyError:
            raise ValueError(
                f"{what}_key={key!r} is not a field of the row; fields: {', '.join(row)}"
            ) from None
    for name in candidates:
        if name in row and row[name] is not None:
            return row[name]
    raise ValueError(
        f"no {what} field found (tried {', '.join(candidates)}); fields: {', '.join(row)}; "
        f"pass {what}_key=..."
    )


def records_from_rows(
    rows: Iterable[Mapping[str, Any]],
    *,
    source: str,
    problem_key: str | None = None,
    answer_key: str | None = None,
    id_key: str | None = None,
    origin: str | None = None,
) -> list[PromptRecord]:
    """Turn dataset rows into :class:`PromptRecord` s (both schemas; see the module docs).

    A row without a problem or an answer, or with an empty one (an empty answer can never
    be matched), raises ``ValueError`` naming ``origin`` and the row.

    Args:
        rows: mappings, one per problem.
        source: name recorded in every record.
        problem_key: field holding the problem text or the chat messages; default: the
            first of ``problem``, ``question``, ``prompt``, ... present in the row.
        answer_key: field holding the answer, dotted paths allowed; default: ``answer``,
            ``ground_truth``, ..., or ``reward_model.ground_truth``.
        id_key: field holding an id; default ``id``/``idx``/... or the row's position.
        origin: the file or dataset named in errors; default ``source``.
    """
    where = origin or source
    records = []
    seen: set[str] = set()
    for i, row in enumerate(rows):
        if not isinstance(row, Mapping):
            raise ValueError(f"{where}: row {i} is not a mapping: {row!r:.100}")
        try:
            problem = _pick(row, problem_key, PROBLEM_KEYS, "problem")
            answer = _pick(row, answer_key, ANSWER_KEYS, "answer")
        except ValueError as err:
            raise ValueError(f"{where}: row {i}: {err}") from None
        if isinstance(answer, Mapping):  # verl: reward_model = {"ground_truth": ..., "style": ...}
            if "ground_truth" not in answer:
                raise ValueError(f"{where}: row {i} answer field has no 'ground_truth': {answer}")
            answer = answer["ground_truth"]
        messages = None
        if _is_messages(problem):
            messages = tuple({"role": m["role"], "content": m["content"]} for m in problem)
            users = [m["content"] for m in messages if m["role"] == "user"]
            problem = users[-1] if users else messages[-1]["content"]
        if not isinstance(problem, str) or not problem.strip():
            raise ValueError(f"{where}: row {i} has an empty or non-text problem: {problem!r:.100}")
        answer_text = ground_truth_text(answer) if answer is not None else ""
        if not answer_text.strip():
            raise ValueError(
                f"{where}: row {i} has an empty answer ({answer!r:.100}): no response could "
                f"ever match it; fix or drop the row"
            )
        rid = _record_id(row, id_key, i)
        if rid in seen:
            rid = f"{rid}#{i}"
        seen.add(rid)
        meta = {k: v for k, v in row.items() if not isinstance(v, (list, dict))}
        records.append(PromptRecord(rid, problem, answer_text, source, messages, meta))
    return records


def _record_id(row: Mapping[str, Any], id_key: str | None, position: int) -> str:
    if id_key is not None:
        return str(_lookup(row, id_key))
    for name in ID_KEYS:
        if name in row and isinstance(row[name], (str, int)):
            return str(row[name])
    extra = row.get("extra_info")
    if isinstance(extra, Mapping) and "index" in extra:
        return str(extra["index"])
    return str(position)


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    rows = []
    with path.open("rb") as fh:
        for lineno, raw in enumerate(fh, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                raise ValueError(
                    f"{path}:{lineno}: not UTF-8 text (byte {err.start} of the line)"
                ) from None
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}:{lineno}: not valid JSON ({err.msg})") from None
    return rows


def _read_json(path: Path) -> list[dict[str, Any]]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as err:
        raise ValueError(f"{path}: not UTF-8 text (byte {err.start})") from None
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}:{err.lineno}: not valid JSON ({err.msg})") from None
    if isinstance(data, Mapping):  # {"data": [...]} or {split: [...]}
        lists = [v for v in data.values() if isinstance(v, list)]
        if len(lists) != 1:
            raise ValueError(f"{path}: expected a list of rows or one list inside an object")
        data = lists[0]
    if not isinstance(data, list):
        raise ValueError(f"{path}: expected a list of rows, got {type(data).__name__}")
    return data


def _read_parquet(path: Path) -> list[dict[str, Any]]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise ImportError(
            f"reading {path} needs pyarrow: pip install 'qae[data]' (or pip install pyarrow)"
        ) from None
    return pq.read_table(path).to_pylist()


_READERS = {".jsonl": _read_jsonl, ".json": _read_json, ".parquet": _read_parquet}


def _read_hub(hub_id: str, *, config: str | None, split: str) -> list[dict[str, Any]]:
    """Rows of a hub dataset split; a failure to reach or read it is one line (``RunError``)
    that says what works offline. A ``ValueError`` (a bad split name) passes through."""
    try:
        import datasets
    except ImportError:
        raise ImportError(
            f"loading the hub dataset {hub_id!r} needs the 'datasets' package: "
            "pip install 'qae[data]'; or pass a local .jsonl / .parquet file"
        ) from None
    try:
        return list(datasets.load_dataset(hub_id, config, split=split))
    except ValueError:
        raise
    except Exception as err:  # offline, not found, a network error of any HTTP client
        first = (str(err).strip().splitlines() or [""])[0][:300]
        raise RunError(
            f"could not load the hub dataset {hub_id!r} (split {split!r}): "
            f"{type(err).__name__}: {first}; without a network, pass a local .jsonl / "
            f".parquet file or a shipped benchmark ({', '.join(BENCHMARKS)})"
        ) from err


def _benchmark_file(
    bench: Benchmark, split: str | None, data_dir: str | os.PathLike[str] | None
) -> Path | None:
    """The local file of a benchmark: one in ``data_dir``, else the shipped copy (only for
    the benchmark's own split); None sends the caller to the hub."""
    folders = [Path(data_dir)] if data_dir is not None else []
    if split is None or split == bench.split:
        folders.append(BENCHMARK_DIR)
    return next((d / f for d in folders for f in bench.files if (d / f).is_file()), None)


def load_prompts(
    source: str | os.PathLike[str],
    *,
    split: str | None = None,
    problem_key: str | None = None,
    answer_key: str | None = None,
    id_key: str | None = None,
    data_dir: str | os.PathLike[str] | None = None,
    limit: int | None = None,
) -> list[PromptRecord]:
    """Load prompts with reference answers from a file, a benchmark name or a hub dataset.

    Args:
        source: a ``.jsonl`` / ``.json`` / ``.parquet`` path; a known benchmark name
            (``aime24``, ``aime25``, ``amc23``, ``math500``, ``gsm8k``: shipped with qae,
            so no network is needed); or a Hugging Face dataset id (``org/name``, needs
            ``datasets`` and a network).
        split: dataset split for hub sources (default: the benchmark's, else ``train``);
            another split of a benchmark than the shipped one is read from the hub.
        problem_key, answer_key, id_key: field mapping; see :func:`records_from_rows`.
        data_dir: a folder searched for ``<benchmark>.jsonl`` before the shipped copy.
        limit: keep only the first ``limit`` records.

    Returns:
        The records, in file order.
    """
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 0):
        raise ValueError(f"limit must be None or an integer >= 0, got limit={limit!r}")
    text = os.fspath(source)
    path = Path(text).expanduser()
    name = origin = text
    if path.suffix.lower() in _READERS:
        if not path.is_file():
            raise ValueError(f"data file not found: {text!r}")
        rows = _READERS[path.suffix.lower()](path)
        name = path.stem
    elif text in BENCHMARKS:
        bench = BENCHMARKS[text]
        found = _benchmark_file(bench, split, data_dir)
        if found is not None:
            rows = _read_jsonl(found)
            origin = str(found)
        else:
            rows = _read_hub(bench.hub_id, config=bench.config, split=split or bench.split)
    elif path.exists():
        raise ValueError(
            f"unsupported data file {text!r}; expected one of {', '.join(sorted(_READERS))}"
        )
    elif "/" in text and not text.startswith((".", "/")):
        rows = _read_hub(text, config=None, split=split or "train")
        name = text.rsplit("/", 1)[-1]
    else:
        raise ValueError(
            f"unknown data source {text!r}: not a file, not a known benchmark "
            f"({', '.join(BENCHMARKS)}) and not a hub id (org/name)"
        )
    if limit is not None:
        rows = rows[:limit]
    return records_from_rows(
        rows,
        source=name,
        problem_key=problem_key,
        answer_key=answer_key,
        id_key=id_key,
        origin=origin,
    )
