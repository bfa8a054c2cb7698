"""End-to-end tests of the RL loop on the built-in task and tiny model."""

from __future__ import annotations

import json

import pytest
import torch

from qae.cli import main
from qae.io.configtools import apply_overrides
from qae.io.runlog import read_metrics
from qae.train.config import TrainConfig, load_preset
from qae.train.trainer import PromptStream, load_policy, train

DETERMINISTIC = [
    "reward/mean",
    "reward/accuracy",
    "adv/frac_zero_adv",
    "adv/hard_groups",
    "actor/entropy",
    "actor/entropy_change_pred",
    "train/loss",
    "train/grad_norm",
    "rollout/generated",
    "rollout/entropy",
]


def tiny_config(out, **overrides) -> TrainConfig:
    cfg = load_preset("arithmetic")
    base = {
        "log.out": str(out),
        "log.progress": False,
        "log.tensorboard": False,
        "trainer.steps": 4,
        "trainer.threads": 1,
        "rollout.prompts_per_step": 4,
        "rollout.group_size": 4,
        "eval.every": 0,
        "eval.n": 2,
        "eval.ks": [1, 2],
        "data.val_size": 12,
        "log.checkpoint_every": 2,
        "optim.lr": 1e-3,  # large, so that a few steps visibly move the weights
        "trainer.diagnostics_every": 2,
    }
    base.update(overrides)
    return apply_overrides(cfg, base)


def test_train_writes_metrics_and_changes_parameters(tmp_path):
    cfg = tiny_config(tmp_path / "run")
    initial, _ = load_policy("builtin", torch.device("cpu"))
    result = train(cfg)
    rows = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert [r["step"] for r in rows] == [0, 1, 2, 3, 4]
    assert "val/pass@1" in rows[0] and "val/pass@2" in rows[-1]
    for key in DETERMINISTIC + ["adv/k", "time/generate", "perf/tokens_per_s", "train/lr"]:
        assert key in rows[1], key
    assert rows[1]["adv/k"] == 0.4
    assert 0 <= rows[1]["adv/frac_zero_adv"] <= 1
    assert {r["perf/threads"] for r in rows[1:]} == {float(cfg.trainer.threads)}
    final, _ = load_policy(
        str(result.run_dir / "checkpoints" / "step_000004" / "model"), torch.device("cpu")
    )
    changed = [
        name
        for (name, a), (_, b) in zip(
            initial.named_parameters(), final.named_parameters(), strict=True
        )
        if not torch.equal(a, b)
    ]
    assert len(changed) > 0.9 * len(list(initial.parameters()))
    assert (tmp_path / "run" / "config.yaml").exists()
    assert result.val_before and result.val_after
    # diagnostics: attribution every step, token views and histograms every 2 steps
    for key in [
        "entropy/cov_pos",
        "entropy/cov_neg",
        "entropy/cov_hard",
        "entropy/cov_easy",
        "response/len_volatility",
        "update/rows_skipped",
    ]:
        assert key in rows[1], key
    parts = sum(rows[1][f"entropy/cov_{p}"] for p in ("pos", "neg", "zero"))
    assert parts == pytest.approx(rows[1]["entropy/cov_total"], abs=1e-9)
    assert "entropy/measured_change" in rows[2] and "tokens/entropy_all" in rows[2]
    hists = sorted(p.name for p in (tmp_path / "run" / "entropy_hist").iterdir())
    assert hists == ["step_000002.json", "step_000004.json"]
    # The sampling entropy covers every generated response; the update's entropy only
    # the kept ones (same temperature, so both are near each other, never far apart).
    for r in rows[1:]:
        assert 0 < r["rollout/entropy"] < 10 and abs(r["rollout/entropy"] - r["actor/entropy"]) < 1


def test_sampling_entropy_can_be_switched_off(tmp_path):
    cfg = tiny_config(tmp_path / "run", **{"rollout.measure_entropy": False, "trainer.steps": 1})
    train(cfg)
    rows = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert "rollout/entropy" not in rows[1] and "actor/entropy" in rows[1]


def test_same_seed_same_metrics(tmp_path):
    a = train(tiny_config(tmp_path / "a", **{"trainer.steps": 2, "eval.enabled": False}))
    b = train(tiny_config(tmp_path / "b", **{"trainer.steps": 2, "eval.enabled": False}))
    ra, rb = read_metrics(a.run_dir / "metrics.jsonl"), read_metrics(b.run_dir / "metrics.jsonl")
    for x, y in zip(ra, rb, strict=True):
        assert {k: x[k] for k in DETERMINISTIC} == {k: y[k] for k in DETERMINISTIC}


def test_resume_after_a_kill_matches_an_uninterrupted_run(tmp_path):
    over = {"eval.enabled": False, "trainer.steps": 4}
    full = train(tiny_config(tmp_path / "full", **over))

    def kill(step, metrics):
        if step == 3:  # after step 3 was logged, before its checkpoint would exist
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(tiny_config(tmp_path / "killed", **over), on_step=kill)
    lines = (tmp_path / "killed" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["step"] for x in lines] == [1, 2, 3]
    train(tiny_config(tmp_path / "killed", **over), resume=True)
    a = read_metrics(full.run_dir / "metrics.jsonl")
    b = read_metrics(tmp_path / "killed" / "metrics.jsonl")
    assert [r["step"] for r in b] == [1, 2, 3, 4]  # no duplicated step 3
    for x, y in zip(a, b, strict=True):
        assert {k: x[k] for k in DETERMINISTIC} == {k: y[k] for k in DETERMINISTIC}, x["step"]


def test_grpo_and_multi_minibatch_updates(tmp_path):
    cfg = tiny_config(
        tmp_path / "g",
        **{
            "algo.estimator": "grpo",
            "trainer.steps": 2,
            "trainer.mini_batches": 2,
            "trainer.ppo_epochs": 2,
            "trainer.micro_batch_size": 3,
            "rollout.overlong": "mask",
            "loss.loss": "clip_cov",
            "loss.kl_coef": 0.01,
            "kcontrol.kind": "entropy_band",
            "eval.enabled": False,
        },
    )
    train(cfg)
    rows = read_metrics(tmp_path / "g" / "metrics.jsonl")
    assert rows[-1]["train/optimizer_steps"] == 4
    assert "train/kl_ref" in rows[-1] and "kcontrol/k" in rows[-1]


def test_bad_inputs_name_the_field(tmp_path):
    with pytest.raises(ValueError, match="model.path='/nonexistent/model'"):
        train(tiny_config(tmp_path / "m", **{"model.path": "/nonexistent/model"}))
    with pytest.raises(ValueError, match="rollout.group_size=1"):
        train(tiny_config(tmp_path / "g1", **{"rollout.group_size": 1}))
    train(tiny_config(tmp_path / "r", **{"trainer.steps": 1, "eval.enabled": False}))
    with pytest.raises(ValueError, match="already holds a run; pass --resume"):
        train(tiny_config(tmp_path / "r", **{"trainer.steps": 1}))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"problem": "1+1=", "answer": "2"}\n{"problem": "2+2="}\n')
    with pytest.raises(ValueError, match="answer"):
        train(tiny_config(tmp_path / "d", **{"data.train": str(bad), "data.val": ""}))
    with pytest.raises(ValueError, match="training set is empty"):
        PromptStream([])


def test_train_on_a_local_jsonl_file(tmp_path):
    data = tmp_path / "train.jsonl"
    rows = [
        {"problem": f"{a}+{b}=", "answer": str(a + b)[::-1]} for a in range(4) for b in range(4)
    ]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = tiny_config(
        tmp_path / "f",
        **{
            "data.train": str(data),
            "data.val": str(data),
            "data.reward": "arithmetic",
            "rollout.max_new_tokens": 4,
            "trainer.steps": 2,
        },
    )
    result = train(cfg)
    assert "val/pass@1" in result.val_after


def test_cli_train_prints_before_and_after(tmp_path, capsys):
    out = tmp_path / "cli"
    code = main(
        [
            "train",
            "--log.out",
            str(out),
            "--trainer.steps",
            "1",
            "--rollout.prompts_per_step",
            "4",
            "--rollout.group_size",
            "4",
            "--data.val_size",
            "8",
            "--eval.n",
            "2",
            "--eval.ks",
            "1,2",
            "--log.progress",
            "false",
            "--trainer.threads",
            "1",
        ]
    )
    assert code == 0
    printed = capsys.readouterr().out
    assert "pass@1" in printed and "before" in printed and str(out) in printed
    code = main(["train", "--log.out", str(out), "--trainer.steps", "1"])
    assert code == 2 and "already holds a run" in capsys.readouterr().err


@pytest.mark.slow
def test_default_run_improves_held_out_pass_at_1(tmp_path):
    cfg = apply_overrides(TrainConfig(), {"log.out": str(tmp_path / "d"), "log.progress": False})
    result = train(cfg)
    assert result.val_after["val/pass@1"] > result.val_before["val/pass@1"]
