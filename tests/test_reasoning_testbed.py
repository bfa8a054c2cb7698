"""The reasoning testbed end to end: shipped base policy, built-in names in train and eval,
the ``reasoning`` preset, the sampler backend and its recorded log-probs."""

from __future__ import annotations

import json
from collections import defaultdict

import pytest
import torch

from qae.cli import main
from qae.io.configtools import apply_overrides
from qae.io.runlog import read_metrics
from qae.tasks import reasoning
from qae.tasks.builtin import builtin_task, builtin_tasks
from qae.tasks.reasoning_model import (
    REASONING,
    ReasoningPretrainConfig,
    load_reasoning_model,
    reasoning_model_path,
)
from qae.tasks.tiny_model import BUILD_INFO_FILE, _encode_batch, pretrain
from qae.train.config import TrainConfig, load_preset
from qae.train.trainer import load_policy, train

COMPARED = [
    "reward/mean",
    "adv/frac_zero_adv",
    "response/len_mean",
    "rollout/entropy",
    "train/loss",
    "train/clipfrac_low",
    "train/clipfrac_high",
    "train/approx_kl",
]


def preset(out, **overrides) -> TrainConfig:
    """The reasoning preset on a tiny budget."""
    base = {
        "log.out": str(out),
        "log.progress": False,
        "log.tensorboard": False,
        "trainer.steps": 2,
        "rollout.prompts_per_step": 8,
        "rollout.group_size": 4,
        "eval.every": 0,
        "eval.n": 2,
        "eval.ks": [1, 2],
        "data.val_size": 12,
        "trainer.diagnostics_every": 2,
        "trainer.threads": 1,  # a fixed count: resumed and whole runs agree to the last bit
    }
    base.update(overrides)
    return apply_overrides(load_preset("reasoning"), base)


# --------------------------------------------------------------------------------------
# The shipped base policy


def test_shipped_model_is_a_small_qwen_with_a_real_vocabulary():
    model, tok = load_reasoning_model()
    cfg = model.config
    assert cfg.model_type == "qwen3"
    assert type(tok).__name__ != "Qwen2Tokenizer"  # the saved tokenizer, not byte-level BPE
    assert len(tok) == cfg.vocab_size > 16 * 2
    assert cfg.head_dim == cfg.hidden_size // cfg.num_attention_heads == 32  # CPU engines take 32
    assert sum(p.numel() for p in model.parameters()) < 3_000_000
    assert cfg.max_position_embeddings >= reasoning.MAX_NEW_TOKENS + 24
    # words are single tokens; everything else splits into characters
    ids = tok("58-91=66, so 66+5=17. Answer: 17", add_special_tokens=False)["input_ids"]
    pieces = tok.convert_ids_to_tokens(ids)
    assert "so" in pieces and "Answer" in pieces and "6" in pieces
    assert tok.decode(ids) == "58-91=66, so 66+5=17. Answer: 17"


def test_shipped_model_build_info_records_the_spread_target():
    info = json.loads((reasoning_model_path() / BUILD_INFO_FILE).read_text())
    assert info["task"] == "reasoning"
    sampled = info["validation"]["temperature_1"]
    assert sampled["samples_per_prompt"] == 16 and sampled["n"] == 240
    spread = sampled["spread"]
    assert spread["between_0.2_0.8"] >= 0.30
    assert spread["below_0.2"] >= 0.10 and spread["above_0.8"] >= 0.10


def test_shipped_model_writes_step_by_step_solutions():
    model, tok = load_reasoning_model()
    records = reasoning.make_split("validation", 24)
    torch.manual_seed(0)
    from qae.train.rollout import sample_batch

    batch = sample_batch(
        model,
        tok,
        [r["prompt"] for r in records],
        [r["answer"] for r in records],
        group_size=4,
        max_new_tokens=reasoning.MAX_NEW_TOKENS,
    )
    lengths = batch.response_lengths().float()
    assert lengths.mean() >= 15
    assert sum("Answer:" in t for t in batch.texts) >= 0.9 * len(batch)
    scores = [
        reasoning.reasoning_score(t, a) for t, a in zip(batch.texts, batch.answers, strict=True)
    ]
    assert 0.2 < sum(scores) / len(scores) < 0.95  # competent, with headroom


def test_pretraining_is_seeded_and_learns_from_slipped_traces():
    small = ReasoningPretrainConfig(
        hidden_size=32,
        num_heads=1,
        num_layers=1,
        intermediate_size=64,
        batch_size=8,
        max_steps=3,
        eval_every=3,
        threads=1,
        slip=0.5,
    )
    a = pretrain(small, task=REASONING)
    b = pretrain(small, task=REASONING)
    for (name, x), (_, y) in zip(
        a.model.state_dict().items(), b.model.state_dict().items(), strict=True
    ):
        assert torch.equal(x, y), name
    # the training targets are whole solutions (with slips), not bare answers
    records = [next(REASONING.stream(small)) for _ in range(1)]
    record = records[0]
    assert record["target"].endswith("Answer: " + record["target"].rsplit(" ", 1)[1])
    ids, mask, labels = _encode_batch(a.tokenizer, records)
    n_prompt = len(a.tokenizer(record["prompt"], add_special_tokens=False)["input_ids"])
    assert (labels[0, :n_prompt] == -100).all() and (labels[0, n_prompt:] != -100).sum() > 5


# --------------------------------------------------------------------------------------
# Built-in names


def test_builtin_names_resolve_to_tasks_and_models():
    assert builtin_task("builtin").name == "arithmetic"
    assert builtin_task("builtin:reasoning").model_path() == reasoning_model_path()
    assert set(builtin_tasks.names()) >= {"arithmetic", "reasoning"}
    with pytest.raises(ValueError, match=r"model.path='builtin:chess' names no built-in task"):
        builtin_task("builtin:chess", field="model.path")
    model, tok = load_policy("builtin:reasoning", torch.device("cpu"))
    assert len(tok) > 16
    with pytest.raises(ValueError, match="model.path='builtin:nope'"):
        load_policy("builtin:nope", torch.device("cpu"))


def test_reasoning_preset_is_the_papers_regime_scaled_down():
    cfg = load_preset("reasoning")
    assert cfg.model.path == cfg.data.train == cfg.data.val == "builtin:reasoning"
    assert cfg.trainer.mini_batches >= 4
    assert cfg.rollout.prompts_per_step >= cfg.trainer.mini_batches
    assert (cfg.loss.clip_low, cfg.loss.clip_high) == (0.2, 0.28)
    assert cfg.loss.agg == "token-mean" and cfg.rollout.dynamic_sampling
    assert cfg.rollout.overlong == "penalty"
    assert cfg.rollout.max_new_tokens == 0  # the task's own limit
    assert cfg.rollout.overlong_buffer < reasoning.MAX_NEW_TOKENS
    assert cfg.algo.estimator == "qae" and cfg.kcontrol.k == 0.4


def test_preset_on_a_tiny_budget(tmp_path):
    result = train(preset(tmp_path / "r"))
    rows = read_metrics(tmp_path / "r" / "metrics.jsonl")
    steps = [r for r in rows if r["step"] > 0 and "train/optimizer_steps" in r]
    assert steps, rows
    for r in steps:
        assert r["train/optimizer_steps"] == 4
        assert r["response/len_mean"] >= 15
        assert "train/clipfrac_high" in r and "train/approx_kl" in r
    assert "val/pass@2" in result.val_after and "val/mean@n_d12" in result.val_after


def test_sampler_logprobs_give_the_same_run_as_recomputed_ones(tmp_path):
    over = {"eval.enabled": False, "trainer.steps": 3}
    a = train(preset(tmp_path / "a", **over))
    b = train(preset(tmp_path / "b", **{**over, "trainer.old_logprobs": "recompute"}))
    ra, rb = read_metrics(a.run_dir / "metrics.jsonl"), read_metrics(b.run_dir / "metrics.jsonl")
    assert len(ra) == len(rb) == 3
    for x, y in zip(ra, rb, strict=True):
        assert x["rollout/generated"] == y["rollout/generated"]
        for key in COMPARED:
            if key in x:
                assert x[key] == pytest.approx(y[key], rel=1e-3, abs=1e-4), (x["step"], key)
    assert "time/logprob" in ra[0]


def test_resume_with_the_sampler_matches_an_uninterrupted_run(tmp_path):
    over = {"eval.enabled": False, "trainer.steps": 3, "log.checkpoint_every": 1}
    full = train(preset(tmp_path / "full", **over))

    def stop(step, metrics):
        if step == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(preset(tmp_path / "cut", **over), on_step=stop)
    train(preset(tmp_path / "cut", **over), resume=True)
    a = read_metrics(full.run_dir / "metrics.jsonl")
    b = read_metrics(tmp_path / "cut" / "metrics.jsonl")
    assert [r["step"] for r in b] == [1, 2, 3]
    for x, y in zip(a, b, strict=True):
        assert {k: x.get(k) for k in COMPARED} == {k: y.get(k) for k in COMPARED}


def test_sampler_logprobs_need_the_sampler_backend(tmp_path):
    over = {"rollout.backend": "hf", "trainer.old_logprobs": "sampler"}
    with pytest.raises(ValueError, match="needs rollout.backend='sampler', got .*'hf'"):
        train(preset(tmp_path / "x", **over))
    with pytest.raises(ValueError, match="old_logprobs must be auto, recompute or sampler"):
        apply_overrides(TrainConfig(), {"trainer.old_logprobs": "cache"})


def test_hf_backend_runs_the_preset_too(tmp_path):
    cfg = preset(
        tmp_path / "hf",
        **{"rollout.backend": "hf", "trainer.steps": 1},  # auto: recomputed log-probs
    )
    train(cfg)
    rows = read_metrics(tmp_path / "hf" / "metrics.jsonl")
    assert rows[-1]["response/len_mean"] >= 15


# --------------------------------------------------------------------------------------
# qae eval on the built-in task


def test_eval_cli_takes_builtin_names(tmp_path, capsys):
    out = tmp_path / "eval"
    code = main(
        [
            "eval",
            "--model",
            "builtin:reasoning",
            "--data",
            "builtin:reasoning",
            "--n",
            "2",
            "--k",
            "1,2",
            "--limit",
            "12",
            "--out",
            str(out),
            "--no-progress",
        ]
    )
    assert code == 0
    config = json.loads((out / "config.json").read_text())
    assert config["reward"] == "reasoning" and config["template"] == "raw"
    assert config["max_new_tokens"] == reasoning.MAX_NEW_TOKENS
    rows = [json.loads(x) for x in (out / "samples.jsonl").read_text().splitlines()]
    assert len(rows) == 24 and {r["source"] for r in rows} == {"reasoning"}
    assert all(r["score"] in (0.0, 1.0) for r in rows)
    assert "reasoning" in capsys.readouterr().out


def test_eval_cli_refuses_auto_settings_for_mixed_sources(tmp_path, capsys):
    code = main(
        [
            "eval",
            "--model",
            "builtin",
            "--data",
            "builtin:reasoning,builtin:arithmetic",
            "--out",
            str(tmp_path / "e"),
        ]
    )
    assert code != 0
    assert "mixes a built-in task with other sources" in capsys.readouterr().err


@pytest.mark.slow
def test_eval_spread_of_the_shipped_model(tmp_path):
    """The issue's target, as a user measures it: 16 samples per held-out prompt at T=1."""
    out = tmp_path / "spread"
    args = ["eval", "--model", "builtin:reasoning", "--data", "builtin:reasoning"]
    args += ["--n", "16", "--temperature", "1", "--out", str(out), "--no-progress"]
    assert main(args) == 0
    per_problem = defaultdict(list)
    for line in (out / "samples.jsonl").read_text().splitlines():
        row = json.loads(line)
        per_problem[row["problem_id"]].append(row["score"])
    rates = [sum(v) / len(v) for v in per_problem.values()]
    assert len(rates) == 240
    assert sum(0.2 <= r <= 0.8 for r in rates) / len(rates) >= 0.30
    assert sum(r < 0.2 for r in rates) / len(rates) >= 0.10
    assert sum(r > 0.8 for r in rates) / len(rates) >= 0.10


@pytest.mark.slow
def test_six_steps_of_the_preset_meet_the_testbed_criteria(tmp_path):
    """``qae train --config reasoning --steps 6``: long responses, clipping acts, >= 4
    optimizer steps per rollout batch."""
    out = tmp_path / "six"
    code = main(["train", "--config", "reasoning", "--steps", "6", "--out", str(out)])
    assert code == 0
    rows = [r for r in read_metrics(out / "metrics.jsonl") if r["step"] > 0]
    assert all(r["response/len_mean"] >= 15 for r in rows)
    assert all(r["train/optimizer_steps"] >= 4 for r in rows)
    assert any(r["train/clipfrac_low"] + r["train/clipfrac_high"] > 0 for r in rows)


def test_build_script_writes_a_loadable_reasoning_model(tmp_path):
    """``scripts/build_tiny_model.py --task reasoning`` end to end on a tiny budget."""
    import subprocess
    import sys
    from pathlib import Path

    out = tmp_path / "model"
    script = Path(__file__).resolve().parents[1] / "scripts" / "build_tiny_model.py"
    args = ["--task", "reasoning", "--out", str(out), "--max-steps", "2", "--eval-every", "2"]
    args += ["--hidden-size", "32", "--num-heads", "1", "--num-layers", "1"]
    args += ["--intermediate-size", "32", "--batch-size", "4", "--val-samples", "1"]
    done = subprocess.run(
        [sys.executable, str(script), *args], capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr[-2000:]
    info = json.loads((out / BUILD_INFO_FILE).read_text())
    assert info["task"] == "reasoning" and info["steps"] == 2
    assert info["settings"]["architecture"] == "qwen3" and info["settings"]["slip"] == 0.05
    model, tok = load_reasoning_model(path=out)
    assert model.config.model_type == "qwen3" and len(tok) == 51
