"""Tests of the built-in arithmetic task, its verifier and the shipped tiny model."""

from __future__ import annotations

import json
import random

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from qae.tasks import arithmetic
from qae.tasks.arithmetic import (
    LEVELS,
    SPLITS,
    Level,
    arithmetic_score,
    format_answer,
    iter_train,
    make_problem,
    make_split,
    max_answer_chars,
    parse_answer,
)
from qae.tasks.tiny_model import (
    BUILD_INFO_FILE,
    MAX_NEW_TOKENS,
    PretrainConfig,
    build_model,
    build_tokenizer,
    generate_answers,
    load_tiny_model,
    pass_at_1,
    pretrain,
    tiny_model_path,
)


def _evaluate(prompt: str) -> int:
    """Left-to-right value of a ``a+b-c=`` prompt, computed independently of the task."""
    body = prompt.rstrip("=")
    total, number, sign = 0, "", 1
    for ch in body + "+":
        if ch.isdigit():
            number += ch
        else:
            total += sign * int(number)
            number, sign = "", (1 if ch == "+" else -1)
    return total


# --------------------------------------------------------------------------------------
# Verifier


def test_score_right_and_wrong():
    # 12+7-3 = 16, written least-significant digit first: "61"
    assert arithmetic_score("61", "61") == 1.0
    assert arithmetic_score("16", "61") == 0.0
    assert arithmetic_score("611", "61") == 0.0
    assert arithmetic_score("6", "61") == 0.0
    assert arithmetic_score("", "61") == 0.0
    assert arithmetic_score("0", "0") == 1.0


def test_score_tolerates_whitespace_and_end_tokens():
    assert arithmetic_score("61 \n", "61") == 1.0
    assert arithmetic_score("  61", "61") == 1.0
    assert arithmetic_score("61</s>", "61") == 1.0
    assert arithmetic_score("61</s>99", "61") == 1.0  # text after the end marker is ignored
    assert arithmetic_score("61<pad><pad>", "61") == 1.0
    assert arithmetic_score("61", " 61\n") == 1.0
    # a space inside the answer is not tolerated
    assert arithmetic_score("6 1", "61") == 0.0


@pytest.mark.parametrize(
    "response",
    ["abc", "61abc", "-61", "6.1", "٦١", "６１", "61😀", "\x00", "=61", "+61", "</s>61"],
)
def test_score_garbage_and_unicode(response):
    # Arabic-Indic and full-width digits are not ASCII digits: wrong, not an error
    assert arithmetic_score(response, "61") == 0.0


@pytest.mark.parametrize("response", [None, 61, 6.1, b"61", ["61"], object()])
def test_score_non_string_response(response):
    assert arithmetic_score(response, "61") == 0.0


@pytest.mark.parametrize("truth", [None, "", "abc", "-3", "٣", object()])
def test_score_bad_ground_truth_scores_zero(truth):
    assert arithmetic_score("3", truth) == 0.0


def test_score_int_ground_truth_is_its_string():
    assert arithmetic_score("61", 61) == 1.0


def test_score_huge_strings():
    assert arithmetic_score("9" * 1_000_000, "61") == 0.0
    assert arithmetic_score("61" + " " * 1_000_000, "61") == 1.0
    assert arithmetic_score("61" * 500_000, "61" * 500_000) == 1.0


def test_score_is_cheap():
    assert arithmetic_score.cheap is True


@given(st.text(max_size=50), st.text(max_size=20))
@settings(max_examples=300, deadline=None)
def test_score_never_raises(response, truth):
    assert arithmetic_score(response, truth) in (0.0, 1.0)


@given(st.integers(min_value=0, max_value=10**30))
def test_answer_round_trip(value):
    answer = format_answer(value)
    assert parse_answer(answer) == value
    assert arithmetic_score(answer + "</s>", answer) == 1.0


def test_format_answer_rejects_negative():
    with pytest.raises(ValueError, match="value"):
        format_answer(-1)


# --------------------------------------------------------------------------------------
# Problems and splits


@given(st.integers(min_value=0, max_value=2**32), st.integers(1, len(LEVELS)))
@settings(max_examples=200, deadline=None)
def test_problem_is_consistent(seed, difficulty):
    rec = make_problem(random.Random(seed), difficulty)
    level = LEVELS[difficulty - 1]
    assert rec["difficulty"] == difficulty
    assert rec["prompt"].endswith("=")
    assert set(rec["prompt"]) <= set(arithmetic.ALPHABET)
    numbers = rec["prompt"][:-1].replace("-", "+").split("+")
    assert len(numbers) == level.operands
    assert all(len(x) <= level.digits and str(int(x)) == x for x in numbers)
    assert rec["value"] == _evaluate(rec["prompt"]) >= 0
    assert rec["answer"] == str(rec["value"])[::-1]
    assert len(rec["answer"]) <= max_answer_chars()


def test_problem_rejects_unknown_difficulty():
    with pytest.raises(ValueError, match="difficulty"):
        make_problem(random.Random(0), len(LEVELS) + 1)
    with pytest.raises(ValueError, match="operands"):
        Level(1, 2)


def test_max_answer_chars():
    # 4 three-digit operands sum to at most 3996: 4 characters
    assert max_answer_chars((Level(4, 3),)) == 4
    # 2 one-digit operands: at most 18
    assert max_answer_chars((Level(2, 1),)) == 2
    assert MAX_NEW_TOKENS == max_answer_chars() + 1


def test_validation_split_fixed_and_balanced():
    val = make_split("validation")
    again = make_split("validation")
    assert val == again
    assert len(val) == SPLITS["validation"].size
    assert len({r["prompt"] for r in val}) == len(val)
    counts = {d: 0 for d in range(1, len(LEVELS) + 1)}
    for r in val:
        counts[r["difficulty"]] += 1
    assert set(counts.values()) == {len(val) // len(LEVELS)}
    # same records when rebuilt from the seed outside the cache
    rebuilt = arithmetic._balanced(random.Random(SPLITS["validation"].seed), len(val), LEVELS)
    # (validation is the first split, so nothing is excluded when it is built)
    assert rebuilt == val
    # a prefix keeps the balance; mutating a returned record does not touch the split
    head = make_split("validation", n=12)
    assert [r["difficulty"] for r in head] == list(range(1, 7)) * 2
    head[0]["answer"] = "x"
    assert make_split("validation")[0]["answer"] != "x"


def test_held_out_splits_disjoint_from_each_other_and_from_train():
    val = {r["prompt"] for r in make_split("validation")}
    dev = {r["prompt"] for r in make_split("dev")}
    assert not val & dev
    train = make_split("train", n=20_000, seed=0)
    train_prompts = {r["prompt"] for r in train}
    assert not train_prompts & (val | dev)
    # the filter is what keeps them apart: the easiest level is small enough to collide
    rng = random.Random(0)
    raw = {make_problem(rng, 1)["prompt"] for _ in range(5000)}
    assert raw & val


def test_train_stream_reproducible_and_mixed():
    a = make_split("train", n=600, seed=3)
    b = make_split("train", n=600, seed=3)
    c = make_split("train", n=600, seed=4)
    assert a == b
    assert a != c
    levels = {r["difficulty"] for r in a}
    assert levels == set(range(1, len(LEVELS) + 1))


def test_train_weights():
    stream = iter_train(0, weights=(1.0,) + (0.0,) * (len(LEVELS) - 1))
    assert {next(stream)["difficulty"] for _ in range(200)} == {1}
    with pytest.raises(ValueError, match="weights"):
        next(iter_train(0, weights=(1.0, 2.0)))


def test_split_errors():
    with pytest.raises(ValueError, match="name='test'"):
        make_split("test")
    with pytest.raises(ValueError, match="n"):
        make_split("train")


def test_split_other_seed_differs():
    other = make_split("validation", n=60, seed=1)
    assert len(other) == 60
    assert other != make_split("validation", n=60)


# --------------------------------------------------------------------------------------
# Tokenizer


def test_tokenizer_round_trip(tmp_path):
    tok = build_tokenizer()
    text = "12+7-3=61"
    ids = tok(text)["input_ids"]
    assert len(ids) == len(text)  # one token per character, no special tokens added
    assert tok.decode(ids) == text
    assert tok(text, add_special_tokens=False)["input_ids"] == ids
    assert tok.decode(ids + [tok.eos_token_id, tok.pad_token_id], skip_special_tokens=True) == text
    assert tok.convert_ids_to_tokens(tok("x")["input_ids"]) == ["<unk>"]
    tok.save_pretrained(tmp_path)
    from transformers import AutoTokenizer

    loaded = AutoTokenizer.from_pretrained(tmp_path)
    assert loaded(text)["input_ids"] == ids
    assert loaded.padding_side == "left"
    assert (loaded.pad_token, loaded.eos_token) == ("<pad>", "</s>")
    batch = loaded(["1+2=", "12+34="], padding=True)["input_ids"]
    assert batch[0][:2] == [loaded.pad_token_id] * 2  # left padding


@given(st.text(alphabet=arithmetic.ALPHABET, max_size=40))
@settings(max_examples=100, deadline=None)
def test_tokenizer_round_trip_property(text):
    tok = _tokenizer()
    assert tok.decode(tok(text)["input_ids"]) == text


_TOK = []


def _tokenizer():
    if not _TOK:
        _TOK.append(build_tokenizer())
    return _TOK[0]


# --------------------------------------------------------------------------------------
# Pre-training and the shipped model


def test_pretrain_smoke_changes_parameters():
    config = PretrainConfig(
        hidden_size=16,
        num_layers=1,
        num_heads=2,
        intermediate_size=32,
        batch_size=16,
        max_steps=6,
        warmup_steps=2,
        eval_every=3,
        lr=1e-2,
        target_pass_at_1=None,
        threads=1,
    )
    before = build_model(build_tokenizer(), config).state_dict()
    result = pretrain(config)
    after = result.model.state_dict()
    assert result.steps == 6
    assert [h["step"] for h in result.history] == [3, 6]
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert len(changed) == len(before)  # every tensor got a gradient step
    # a loss below ln(V) (uniform guessing over the vocabulary) shows learning
    vocab = len(result.tokenizer)
    assert result.history[-1]["loss"] < torch.log(torch.tensor(float(vocab))).item()
    # the same seed gives the same weights
    again = pretrain(config).model.state_dict()
    assert all(torch.equal(after[k], again[k]) for k in after)


def test_pretrain_rejects_bad_config():
    with pytest.raises(ValueError, match="max_steps"):
        pretrain(PretrainConfig(max_steps=0))


@pytest.fixture(scope="module")
def shipped():
    torch.manual_seed(0)
    return load_tiny_model()


def test_shipped_assets_small_and_complete():
    path = tiny_model_path()
    for name in ("config.json", "model.safetensors", "tokenizer.json", BUILD_INFO_FILE):
        assert (path / name).is_file(), name
    assert (path / "model.safetensors").stat().st_size < 10 * 2**20
    info = json.loads((path / BUILD_INFO_FILE).read_text())
    assert info["parameters"] < 5_000_000
    assert len(info["validation"]["greedy"]["by_difficulty"]) == len(LEVELS)


def test_shipped_model_partially_competent(shipped):
    model, tok = shipped
    assert model.config.model_type == "qwen2"
    val = make_split("validation", n=64)
    res = pass_at_1(model, tok, val)
    # the build measured 0.52 greedy on the full split; 64 prompts are noisier
    assert 0.15 <= res["overall"] <= 0.9
    by = res["by_difficulty"]
    assert by[1] > by[len(LEVELS)]  # the easiest level beats the hardest
    # the measured figure in the build info matches a re-measurement on the full split
    info = json.loads((tiny_model_path() / BUILD_INFO_FILE).read_text())
    full = pass_at_1(model, tok, make_split("validation"))
    assert full["overall"] == pytest.approx(info["validation"]["greedy"]["overall"], abs=0.03)


def test_shipped_model_padding_invariant(shipped):
    # batched (left-padded) greedy decoding gives the same answers as one prompt at a time
    model, tok = shipped
    prompts = [r["prompt"] for r in make_split("validation", n=12)]
    batched = generate_answers(model, tok, prompts)
    single = [generate_answers(model, tok, [p])[0] for p in prompts]
    assert batched == single


def test_shipped_model_sampling(shipped):
    model, tok = shipped
    val = make_split("validation", n=24)
    res = pass_at_1(model, tok, val, temperature=1.0, samples=4, seed=0)
    assert 0.0 < res["overall"] < 1.0
    again = pass_at_1(model, tok, val, temperature=1.0, samples=4, seed=0)
    assert again == res  # seeded sampling is reproducible


def test_arithmetic_answer_extraction_for_majority_vote():
    from qae.eval.metrics import majority_vote
    from qae.tasks.arithmetic import extract_arithmetic_answer

    assert extract_arithmetic_answer(" 61</s><pad>") == "61"
    assert extract_arithmetic_answer("</s>") is None
    assert extract_arithmetic_answer(None) is None
    assert arithmetic_score.extract is extract_arithmetic_answer
    responses = ["61</s>", "61", "7</s>"]
    votes = [extract_arithmetic_answer(x) for x in responses]
    assert votes == ["61", "61", "7"]
    scores = [arithmetic_score(x, "61") for x in responses]
    assert majority_vote(votes, scores) == 1.0  # two of three say 61, which is right
