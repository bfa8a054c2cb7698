"""Tests for qae.eval.datasets: local files, field mapping, the verl schema, benchmark names."""

from __future__ import annotations

import json
import sys
import types
from pathlib import Path

import pytest

from qae.eval.datasets import BENCHMARKS, PromptRecord, load_prompts, records_from_rows

BENCH_DIR = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "benchmarks"


def _write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def _need_benchmarks() -> None:
    if not BENCH_DIR.is_dir():
        pytest.skip(f"benchmark files not found at {BENCH_DIR}")


@pytest.mark.parametrize(
    ("name", "count"),
    [("aime24", 30), ("aime25", 30), ("amc23", 40), ("math500", 500), ("gsm8k_test", 1319)],
)
def test_local_benchmark_files(name: str, count: int) -> None:
    _need_benchmarks()
    records = load_prompts(BENCH_DIR / f"{name}.jsonl")
    assert len(records) == count
    assert len({r.id for r in records}) == count
    assert all(r.problem.strip() and r.answer and r.source == name for r in records)
    assert all(r.messages is None for r in records)


def test_benchmark_answers_become_text() -> None:
    _need_benchmarks()
    amc = load_prompts(BENCH_DIR / "amc23.jsonl")
    assert amc[0].answer == "27"  # stored as 27.0
    gsm = load_prompts(BENCH_DIR / "gsm8k_test.jsonl", limit=2)
    assert [r.answer for r in gsm] == ["18", "3"]  # the part after "####"
    assert gsm[0].problem.startswith("Janet")


def test_benchmark_name_resolves_to_local_file() -> None:
    _need_benchmarks()
    by_name = load_prompts("amc23", data_dir=BENCH_DIR)
    by_path = load_prompts(BENCH_DIR / "amc23.jsonl")
    assert by_name == by_path
    assert len(load_prompts("gsm8k", data_dir=BENCH_DIR, limit=5)) == 5  # gsm8k_test.jsonl


def test_field_mapping(tmp_path: Path) -> None:
    path = _write_jsonl(
        tmp_path / "mine.jsonl",
        [{"q": "1+1?", "sol": {"final": 2}, "key": "a"}, {"q": "2+2?", "sol": {"final": 4.0}}],
    )
    recs = load_prompts(path, problem_key="q", answer_key="sol.final")
    assert [(r.id, r.problem, r.answer, r.source) for r in recs] == [
        ("0", "1+1?", "2", "mine"),
        ("1", "2+2?", "4", "mine"),
    ]
    with pytest.raises(ValueError, match="answer_key='sol.nope'"):
        load_prompts(path, problem_key="q", answer_key="sol.nope")
    with pytest.raises(ValueError, match="no problem field found.*fields: q, sol, key"):
        load_prompts(path)


def test_verl_schema(tmp_path: Path) -> None:
    rows = [
        {
            "data_source": "math_dapo",
            "prompt": [
                {"role": "system", "content": "be brief"},
                {"role": "user", "content": "Solve 3+4. Answer: $Answer"},
            ],
            "ability": "MATH",
            "reward_model": {"ground_truth": "7", "style": "rule"},
            "extra_info": {"index": "abc-1", "split": "train"},
        }
    ]
    (rec,) = load_prompts(_write_jsonl(tmp_path / "dapo.jsonl", rows))
    assert rec.id == "abc-1"
    assert rec.answer == "7"
    assert rec.problem == "Solve 3+4. Answer: $Answer"
    assert rec.messages is not None and [m["role"] for m in rec.messages] == ["system", "user"]
    assert rec.meta["data_source"] == "math_dapo"


def test_duplicate_ids_are_made_unique() -> None:
    recs = records_from_rows(
        [{"id": 1, "problem": "a", "answer": 1}, {"id": 1, "problem": "b", "answer": 2}],
        source="s",
    )
    assert [r.id for r in recs] == ["1", "1#1"]


def test_bad_inputs(tmp_path: Path) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"problem": "a", "answer": 1}\n{not json\n', encoding="utf-8")
    with pytest.raises(ValueError, match="bad.jsonl:2"):
        load_prompts(bad)
    with pytest.raises(ValueError, match="not found"):
        load_prompts(tmp_path / "missing.jsonl")
    with pytest.raises(ValueError, match="unknown data source 'aime2099'"):
        load_prompts("aime2099")
    with pytest.raises(ValueError, match="empty or non-text problem"):
        records_from_rows([{"problem": " ", "answer": 1}], source="s")
    with pytest.raises(ValueError, match="limit"):
        load_prompts(bad, limit=-1)


def test_json_and_parquet(tmp_path: Path) -> None:
    rows = [{"question": "q1", "answer": "1"}, {"question": "q2", "answer": "2"}]
    js = tmp_path / "rows.json"
    js.write_text(json.dumps({"data": rows}), encoding="utf-8")
    assert [r.answer for r in load_prompts(js)] == ["1", "2"]
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "rows.parquet")
    assert load_prompts(tmp_path / "rows.parquet") == [
        PromptRecord("0", "q1", "1", "rows"),
        PromptRecord("1", "q2", "2", "rows"),
    ]


def test_hub_needs_datasets(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setitem(sys.modules, "datasets", None)  # import fails
    with pytest.raises(ImportError, match=r"pip install 'qae\[data\]'"):
        load_prompts("gsm8k", split="train", data_dir=tmp_path)  # not shipped, not local
    with pytest.raises(ImportError, match="datasets"):
        load_prompts("someone/some-dataset")


def _fake_hub(monkeypatch: pytest.MonkeyPatch) -> list[tuple]:
    calls: list[tuple] = []

    def load_dataset(hub_id, config, split):
        calls.append((hub_id, config, split))
        return [{"question": "What is 6*7?", "answer": "6*7=<<6*7=42>>42\n#### 42"}]

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    return calls


def test_benchmark_names_map_to_hub(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = _fake_hub(monkeypatch)
    (rec,) = load_prompts("gsm8k", split="train")  # the shipped copy is the test split
    assert calls[-1] == ("openai/gsm8k", "main", "train")
    assert rec.answer == "42" and rec.source == "gsm8k"
    load_prompts("org/data", split="validation")
    assert calls[-1] == ("org/data", None, "validation")
    assert set(BENCHMARKS) == {"aime24", "aime25", "amc23", "math500", "gsm8k"}


@pytest.mark.parametrize(
    ("name", "count"),
    [("aime24", 30), ("aime25", 30), ("amc23", 40), ("math500", 500), ("gsm8k", 1319)],
)
def test_benchmarks_ship_with_the_package(monkeypatch: pytest.MonkeyPatch, name, count) -> None:
    """Every benchmark name loads offline from the package: the hub is never asked."""
    monkeypatch.setitem(sys.modules, "datasets", None)  # any hub access would raise
    records = load_prompts(name)
    assert len(records) == count and len({r.id for r in records}) == count
    assert all(r.source == name and r.problem.strip() and r.answer.strip() for r in records)
    assert load_prompts(name, split=BENCHMARKS[name].split) == records
    if name in ("aime24", "aime25"):  # AIME answers are integers 0-999
        assert all(r.answer.isdigit() and 0 <= int(r.answer) <= 999 for r in records)
    if name == "gsm8k":  # the number after "####", commas dropped
        assert all(r.answer.lstrip("-").replace(".", "", 1).isdigit() for r in records)


def test_shipped_files_are_recorded_with_their_sources() -> None:
    import hashlib

    from qae.eval.datasets import BENCHMARK_DIR

    sources = (BENCHMARK_DIR / "SOURCES.md").read_text(encoding="utf-8")
    shipped = sorted(p.name for p in BENCHMARK_DIR.glob("*.jsonl"))
    wanted = sorted(
        next(f for f in b.files if (BENCHMARK_DIR / f).is_file()) for b in BENCHMARKS.values()
    )
    assert shipped == wanted
    for name, bench in BENCHMARKS.items():
        (file,) = [f for f in bench.files if (BENCHMARK_DIR / f).is_file()]
        digest = hashlib.sha256((BENCHMARK_DIR / file).read_bytes()).hexdigest()
        assert f"{digest}  {file}" in sources, f"{file}: SHA-256 in SOURCES.md is stale"
        assert f"`{bench.hub_id}`" in sources and "licence" in sources.lower(), name
    pyproject = (Path(__file__).resolve().parents[1] / "pyproject.toml").read_text()
    assert '"benchmarks_data/*"' in pyproject  # installed with the package


def test_data_dir_and_other_splits_take_precedence(monkeypatch, tmp_path: Path) -> None:
    mine = _write_jsonl(tmp_path / "amc23.jsonl", [{"problem": "1+1?", "answer": 2}])
    assert [r.answer for r in load_prompts("amc23", data_dir=tmp_path)] == ["2"]
    assert load_prompts("amc23", data_dir=tmp_path / "empty")[0].answer == "27"  # shipped
    calls = _fake_hub(monkeypatch)
    load_prompts("amc23", split="train", data_dir=tmp_path / "empty")
    assert calls == [("math-ai/amc23", None, "train")]
    assert load_prompts(mine)[0].answer == "2"


def test_an_unreachable_hub_dataset_is_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    from qae.io.errors import RunError

    class ConnectError(Exception):  # like httpx's: not an OSError
        pass

    def load_dataset(hub_id, config, split):
        raise ConnectError("[Errno 111] Connection refused\nretrying ...")

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    with pytest.raises(RunError) as info:
        load_prompts("someone/some-dataset")
    message = str(info.value)
    assert "\n" not in message and "'someone/some-dataset'" in message
    assert "ConnectError: [Errno 111] Connection refused" in message
    assert "aime24, aime25, amc23, math500, gsm8k" in message
