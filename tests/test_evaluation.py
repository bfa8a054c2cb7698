"""Tests for qae.eval: pass@k against enumeration, majority vote, templates, qae eval."""

from __future__ import annotations

import argparse
import itertools
import json
import math
from fractions import Fraction
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from qae.eval.command import add_eval_parser
from qae.eval.datasets import PromptRecord, load_prompts
from qae.eval.evaluate import evaluate
from qae.eval.metrics import format_table, majority_vote, pass_at_k, summarize
from qae.eval.prompts import build_prompt
from qae.rewards import register_reward, reward_functions

# --------------------------------------------------------------------------------------
# pass@k


def brute_pass_at_k(n: int, c: int, k: int) -> float:
    """Fraction of the k-subsets of n samples (c correct) that hold a correct one."""
    samples = [True] * c + [False] * (n - c)
    subsets = list(itertools.combinations(range(n), k))
    return sum(any(samples[i] for i in s) for s in subsets) / len(subsets)


@settings(max_examples=150, deadline=None)
@given(st.data())
def test_pass_at_k_equals_enumeration(data: st.DataObject) -> None:
    n = data.draw(st.integers(1, 10))
    c = data.draw(st.integers(0, n))
    k = data.draw(st.integers(1, n))
    assert pass_at_k(n, c, k) == pytest.approx(brute_pass_at_k(n, c, k), abs=1e-12)


def test_pass_at_k_values_and_stability() -> None:
    assert pass_at_k(4, 1, 1) == pytest.approx(0.25)  # c/n
    assert pass_at_k(4, 1, 2) == pytest.approx(0.5)  # 1 - C(3,2)/C(4,2) = 1 - 3/6
    assert pass_at_k(4, 0, 4) == 0.0
    assert pass_at_k(4, 3, 2) == 1.0  # n - c = 1 < k: every pair holds a correct sample
    # n in the thousands: the binomials overflow floats, the product form does not
    n, c, k = 2000, 3, 16
    exact = 1 - Fraction(math.comb(n - c, k), math.comb(n, k))
    assert pass_at_k(n, c, k) == pytest.approx(float(exact), rel=1e-12)
    assert pass_at_k(1000, 1, 1) == pytest.approx(1e-3, rel=1e-12)


@pytest.mark.parametrize(
    ("n", "c", "k"), [(4, 5, 1), (4, -1, 1), (4, 1, 0), (4, 1, 5), (4.0, 1, 1)]
)
def test_pass_at_k_rejects_bad_arguments(n, c, k) -> None:
    with pytest.raises(ValueError):
        pass_at_k(n, c, k)


def test_majority_vote() -> None:
    # "\dfrac{1}{2}" and "\frac{1}{2}" are one answer with two votes; "3" has one
    assert majority_vote(["3", "\\dfrac{1}{2}", "\\frac{1}{2}"], [0.0, 1.0, 1.0]) == 1.0
    assert majority_vote(["3", "3", "\\frac{1}{2}"], [0.0, 0.0, 1.0]) == 0.0
    assert majority_vote(["4", "5", None, None], [1.0, 0.0, 0.0, 0.0]) == 1.0  # tie: first
    assert majority_vote([None, None], [0.0, 0.0]) == 0.0
    with pytest.raises(ValueError):
        majority_vote(["1"], [])


def test_summarize_by_hand() -> None:
    def row(src, pid, s, answer, score):
        return {"source": src, "problem_id": pid, "sample": s, "answer": answer, "score": score}

    rows = [
        row("a", "p1", 0, "1", 1.0),
        row("a", "p1", 1, "2", 0.0),
        row("a", "p1", 2, "2", 0.0),
        row("a", "p2", 0, None, 0.0),
        row("a", "p2", 1, "5", None),
        row("a", "p2", 2, "5", 0.0),
        row("a", "p3", 0, "7", 1.0),  # incomplete: left out
        row("b", "q", 0, "9", 1.0),
        row("b", "q", 1, "9", 1.0),
        row("b", "q", 2, "8", 0.0),
    ]
    out = summarize(rows, n=3, ks=[1, 2])
    # a: p1 has c=1, p2 has c=0. pass@1 = (1/3 + 0)/2; pass@2 = (1 - C(2,2)/C(3,2) + 0)/2
    assert out["a"]["problems"] == 2
    assert out["a"]["pass@1"] == pytest.approx(1 / 6)
    assert out["a"]["pass@2"] == pytest.approx((1 - 1 / 3) / 2)
    assert out["a"]["mean@3"] == pytest.approx(1 / 6)
    assert out["a"]["maj@3"] == 0.0  # majorities "2" and "5" are wrong
    assert out["a"]["no_answer"] == pytest.approx(1 / 6)
    assert out["a"]["unscorable"] == 1
    assert out["b"]["maj@3"] == 1.0 and out["b"]["pass@1"] == pytest.approx(2 / 3)
    table = format_table(out)
    assert "pass@2" in table and "66.67%" in table


# --------------------------------------------------------------------------------------
# Templates


class _ChatTok:
    chat_template = "fake"

    def apply_chat_template(self, messages, tokenize, add_generation_prompt):
        assert tokenize is False and add_generation_prompt is True
        return "".join(f"<{m['role']}>{m['content']}" for m in messages) + "<assistant>"


class _PlainTok:
    chat_template = None


def test_templates() -> None:
    rec = PromptRecord("1", "What is 2+2?", "4", "s")
    dapo, templated = build_prompt(rec, _PlainTok(), "dapo")
    assert not templated and "What is 2+2?" in dapo and "Answer:" in dapo
    boxed, _ = build_prompt(rec, _PlainTok(), "boxed")
    assert "\\boxed{}" in boxed and boxed.startswith("What is 2+2?")
    assert build_prompt(rec, _PlainTok(), "raw") == ("What is 2+2?", False)
    chat, templated = build_prompt(rec, _ChatTok(), "raw")
    assert templated and chat == "<user>What is 2+2?<assistant>"
    verl = PromptRecord(
        "1", "q", "4", "s", ({"role": "system", "content": "S"}, {"role": "user", "content": "q"})
    )
    assert build_prompt(verl, _ChatTok(), "dapo")[0] == "<system>S<user>q<assistant>"
    with pytest.raises(ValueError, match="known: boxed, dapo, raw"):
        build_prompt(rec, _PlainTok(), "cot")


# --------------------------------------------------------------------------------------
# End to end on a tiny random model


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

    path = tmp_path_factory.mktemp("tiny")
    vocab = {"<pad>": 0, "<eos>": 1, "<unk>": 2}
    for ch in [chr(i) for i in range(32, 127)] + ["\n"]:
        vocab.setdefault(ch, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")  # one token per char
    tok.decoder = decoders.Fuse()
    PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>"
    ).save_pretrained(path)
    config = Qwen2Config(
        vocab_size=len(vocab),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        pad_token_id=0,
        eos_token_id=1,
        bos_token_id=1,
        tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    Qwen2ForCausalLM(config).save_pretrained(path)
    return path


@pytest.fixture()
def tiny(tiny_model_dir: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return (
        AutoModelForCausalLM.from_pretrained(tiny_model_dir),
        AutoTokenizer.from_pretrained(tiny_model_dir),
    )


def _even_length(response: str, truth: object) -> float:
    """A reward with both outcomes on random text: 1 for an even number of characters."""
    return float(len(response) % 2 == 0)


RECORDS = [
    PromptRecord("a", "What is 1+1?", "2", "toy"),
    PromptRecord("b", "What is 2+3?", "5", "toy"),
    PromptRecord("c", "What is 3*3?", "9", "toy"),
]
EVAL_KW = dict(n=2, max_new_tokens=8, ks=[1, 2], batch_size=3, template="raw", progress=False)


class _CountingGenerate:
    def __init__(self, model) -> None:
        self.calls, self.sequences, self._inner = 0, 0, model.generate
        model.generate = self

    def __call__(self, *args, **kwargs):
        self.calls += 1
        self.sequences += kwargs["input_ids"].shape[0]
        return self._inner(*args, **kwargs)


def _rows(out: Path) -> list[dict]:
    return [json.loads(x) for x in (out / "samples.jsonl").read_text().splitlines()]


def test_evaluate_writes_consistent_files(tiny, tmp_path: Path) -> None:
    model, tok = tiny
    out = tmp_path / "ev"
    summary = evaluate(model, tok, RECORDS, reward=_even_length, out_dir=out, **EVAL_KW)
    rows = _rows(out)
    assert sorted((r["problem_id"], r["sample"]) for r in rows) == [
        (p, s) for p in "abc" for s in (0, 1)
    ]
    for r in rows:
        assert r["score"] == _even_length(r["response"], None)
        assert set(r) >= {"source", "problem_id", "sample", "response", "answer", "score"}
    # recompute the metrics from the JSONL with the binomial formula
    by_problem: dict[str, list[float]] = {}
    for r in rows:
        by_problem.setdefault(r["problem_id"], []).append(r["score"])
    c = [int(sum(v)) for v in by_problem.values()]
    assert 0 < sum(c) < 6, c  # both outcomes occur, so the checks below have teeth
    m = summary["benchmarks"]["toy"]
    assert m["problems"] == 3
    assert m["pass@1"] == pytest.approx(sum(x / 2 for x in c) / 3)
    assert m["pass@2"] == pytest.approx(
        sum(1 - math.comb(2 - x, 2) / math.comb(2, 2) for x in c) / 3
    )
    assert m["mean@2"] == pytest.approx(sum(c) / 6)
    assert json.loads((out / "summary.json").read_text()) == json.loads(json.dumps(summary))
    assert json.loads((out / "config.json").read_text())["n"] == 2


def test_evaluate_resumes_without_redoing_problems(tiny, tmp_path: Path) -> None:
    model, tok = tiny
    out = tmp_path / "ev"
    counter = _CountingGenerate(model)
    evaluate(model, tok, RECORDS[:2], reward=_even_length, out_dir=out, **EVAL_KW)
    assert counter.sequences == 4
    first = _rows(out)
    # an interrupted write leaves a torn line: it is cut off on resume
    with (out / "samples.jsonl").open("a") as fh:
        fh.write('{"source": "toy", "problem_id": "c", "sam')
    summary = evaluate(model, tok, RECORDS, reward=_even_length, out_dir=out, **EVAL_KW)
    assert counter.sequences == 4 + 2  # only problem c was generated
    rows = _rows(out)
    assert rows[:4] == first and len(rows) == 6
    assert summary["benchmarks"]["toy"]["problems"] == 3
    calls = counter.calls
    again = evaluate(model, tok, RECORDS, reward=_even_length, out_dir=out, **EVAL_KW)
    assert counter.calls == calls and again["benchmarks"] == summary["benchmarks"]
    with pytest.raises(ValueError, match="n=2, not 3|with n=2"):
        evaluate(model, tok, RECORDS, reward=_even_length, out_dir=out, **{**EVAL_KW, "n": 3})


def test_evaluate_in_memory_and_argument_checks(tiny) -> None:
    model, tok = tiny
    summary = evaluate(model, tok, RECORDS[:1], reward="math", out_dir=None, **EVAL_KW)
    assert summary["benchmarks"]["toy"]["problems"] == 1
    assert tok.padding_side == "right"  # restored
    with pytest.raises(ValueError, match="k must be an integer in"):
        evaluate(model, tok, RECORDS, **{**EVAL_KW, "ks": [4]})
    with pytest.raises(ValueError, match="unknown prompt template"):
        evaluate(model, tok, RECORDS, **{**EVAL_KW, "template": "nope"})


def test_eval_cli(tiny_model_dir: Path, tmp_path: Path, capsys) -> None:
    data = tmp_path / "toy.jsonl"
    data.write_text(
        "".join(
            json.dumps({"question": r.problem, "answer": int(r.answer)}) + "\n" for r in RECORDS
        )
    )
    parser = argparse.ArgumentParser(prog="qae")
    add_eval_parser(parser.add_subparsers(dest="command"))
    register_reward("test-even-length")(_even_length)
    try:
        args = parser.parse_args(
            [
                "eval",
                "--model",
                str(tiny_model_dir),
                "--data",
                str(data),
                "--n",
                "2",
                "--k",
                "1,2",
                "--max-new-tokens",
                "8",
                "--out",
                str(tmp_path / "out"),
                "--template",
                "boxed",
                "--reward",
                "test-even-length",
                "--no-progress",
                "--device",
                "cpu",
            ]
        )
        assert args.k == [1, 2]
        assert args.func(args) == 0
    finally:
        reward_functions._items.pop("test-even-length", None)
    printed = capsys.readouterr().out
    assert "pass@2" in printed and "toy" in printed
    assert len(_rows(tmp_path / "out")) == 6
    assert load_prompts(data)[0].answer == "2"
    with pytest.raises(SystemExit):
        parser.parse_args(["eval", "--model", "m", "--data", "d", "--out", "o", "--k", "a"])


# --------------------------------------------------------------------------------------
# qae eval: flags checked first, a default --out, the model names train takes

_TINY_EVAL = ["--limit", "2", "--n", "2", "--k", "1,2", "--no-progress", "--workers", "0"]


def _no_model_load(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the flags were checked")

    monkeypatch.setattr("qae.eval.command._load_model", refuse)


def test_eval_rejects_k_above_n_before_loading_anything(monkeypatch, tmp_path, capsys) -> None:
    from qae.cli import main

    _no_model_load(monkeypatch)
    argv = ["eval", "--model", "builtin", "--data", "builtin:arithmetic", "--n", "4"]
    assert main([*argv, "--k", "1,8", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (
        "qae eval: error: --k 1,8 asks for pass@8 from --n 4 samples per problem: every k "
        "must be in [1, n]; raise --n or lower --k"
    )
    assert main([*argv, "--limit", "-1"]) == 2  # --k defaults to 1 and min(16, n)
    err = capsys.readouterr().err.strip()
    assert err == "qae eval: error: --limit must be >= 0, got --limit -1"
    assert main([*argv, "--threads", "-2"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "qae eval: error: --threads must be >= 0 (0 = auto), got --threads -2"
    assert not (tmp_path / "o").exists()


def test_eval_without_out_writes_to_a_printed_default(monkeypatch, tmp_path, capsys) -> None:
    from qae.cli import main

    monkeypatch.chdir(tmp_path)
    assert main(["eval", "--model", "builtin", "--data", "builtin:arithmetic", *_TINY_EVAL]) == 0
    first = capsys.readouterr().out.splitlines()[0]
    (out,) = list((tmp_path / "runs").glob("eval-*"))
    assert first == f"qae eval: writing to runs/{out.name} (the same --out resumes this evaluation)"
    assert (out / "summary.json").is_file() and (out / "samples.jsonl").is_file()


@pytest.mark.parametrize("name", ["builtin", "builtin:arithmetic"])
def test_eval_and_train_take_the_same_builtin_model_names(name, tmp_path, capsys) -> None:
    from qae.cli import main
    from qae.train.trainer import load_policy

    out = tmp_path / "e"
    argv = ["eval", "--model", name, "--data", "builtin:arithmetic", *_TINY_EVAL]
    assert main([*argv, "--out", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["benchmarks"]["arithmetic"]["problems"] == 2
    model, _ = load_policy(name, torch.device("cpu"))
    assert model.config.vocab_size == 16  # the arithmetic task's shipped policy
    bad = ["eval", "--model", "builtin:chess", "--data", "builtin:arithmetic", *_TINY_EVAL]
    assert main([*bad, "--out", str(tmp_path / "x")]) == 2
    assert "--model='builtin:chess' names no built-in task" in capsys.readouterr().err
    with pytest.raises(ValueError, match="names no built-in task"):
        load_policy("builtin:chess", torch.device("cpu"))


def test_eval_with_an_unreachable_hub_model_is_one_line(tmp_path) -> None:
    """A hub id with no network (offline mode, empty cache) ends in one line, no traceback."""
    import os
    import subprocess
    import sys

    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", OMP_NUM_THREADS="1")
    env["HF_HOME"] = str(tmp_path / "hf")
    argv = ["eval", "--model", "someorg/missing-model", "--data", "aime24", *_TINY_EVAL]
    proc = subprocess.run(
        [sys.executable, "-m", "qae.cli", *argv, "--out", str(tmp_path / "o")],
        capture_output=True, text=True, env=env, timeout=300, check=False,
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr
    (line,) = [x for x in proc.stderr.splitlines() if x.strip()]
    assert line.startswith("qae eval: error: --model 'someorg/missing-model' could not be loaded")
