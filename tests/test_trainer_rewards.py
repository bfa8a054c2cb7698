"""The trainer's view of reward failures: per-step counts and the stop on a failing reward."""

from __future__ import annotations

import itertools

import pytest

from qae.io.configtools import apply_overrides
from qae.io.runlog import read_metrics
from qae.rewards import FailureStreak, RewardFailure, register_reward, reward_functions
from qae.train.config import DataConfig, TrainConfig, load_preset
from qae.train.trainer import train

ALWAYS_FAILS = "test-reward-always-fails"
FAILS_SOMETIMES = "test-reward-fails-sometimes"


def _always_fails(response: str, truth: object) -> float:
    raise ValueError(f"scorer exploded on {truth!r}")


_calls = itertools.count()


def _fails_sometimes(response: str, truth: object) -> float | None:
    """In turn: returns a non-number (an error), gives up (None), scores 1.0."""
    kind = next(_calls) % 3
    if kind == 0:
        return "not a number"  # type: ignore[return-value]
    return None if kind == 1 else 1.0


@pytest.fixture
def test_rewards():
    register_reward(ALWAYS_FAILS, isolated=False)(_always_fails)
    register_reward(FAILS_SOMETIMES, isolated=False)(_fails_sometimes)
    yield
    for name in (ALWAYS_FAILS, FAILS_SOMETIMES):
        reward_functions._items.pop(name, None)


def tiny_config(out, **overrides) -> TrainConfig:
    base = {
        "log.out": str(out),
        "log.progress": False,
        "log.tensorboard": False,
        "trainer.steps": 2,
        "trainer.threads": 1,
        "rollout.prompts_per_step": 2,
        "rollout.group_size": 4,
        "rollout.max_gen_batches": 1,
        "eval.enabled": False,
        "log.checkpoint_every": 0,
    }
    base.update(overrides)
    return apply_overrides(load_preset("arithmetic"), base)


def test_step_metrics_count_errors_and_unscorable(tmp_path, test_rewards):
    cfg = tiny_config(tmp_path / "run", **{"data.reward": FAILS_SOMETIMES})
    train(cfg)
    rows = [r for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if r["step"] > 0]
    assert [r["step"] for r in rows] == [1, 2]
    for row in rows:
        generated = row["rollout/generated"]
        assert generated == 8  # 2 prompts x 4 samples, one round
        assert row["reward/timeouts"] == 0
        # 8 calls in turn: error, None, score, ...: 2 or 3 of each kind per step
        assert row["reward/errors"] in (2, 3)
        assert row["reward/unscorable"] in (2, 3)


def test_run_stops_when_the_reward_fails_on_every_response(tmp_path, test_rewards):
    cfg = tiny_config(
        tmp_path / "run", **{"data.reward": ALWAYS_FAILS, "data.reward_fail_steps": 2}
    )
    with pytest.raises(RewardFailure) as info:
        train(cfg)
    message = str(info.value)
    assert ALWAYS_FAILS in message
    assert "2 consecutive steps" in message
    assert "ValueError: scorer exploded" in message  # an example of the failure
    # The first failing step was still logged, with every response counted as an error.
    rows = [r for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if r["step"] > 0]
    assert [r["step"] for r in rows] == [1]
    assert rows[0]["reward/errors"] == rows[0]["rollout/generated"] == 8


def test_failing_reward_runs_on_when_the_stop_is_off(tmp_path, test_rewards):
    cfg = tiny_config(
        tmp_path / "run", **{"data.reward": ALWAYS_FAILS, "data.reward_fail_steps": 0}
    )
    result = train(cfg)
    assert result.steps == 2
    rows = [r for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if r["step"] > 0]
    assert [r["reward/errors"] for r in rows] == [8, 8]
    assert all(r["train/skipped"] == 1 for r in rows)  # no informative group: nothing learnt


def test_failure_streak_resets_on_a_step_that_scores() -> None:
    streak = FailureStreak(3, "r")
    streak.update(8, 8, "boom")
    streak.update(8, 8, "boom")
    streak.update(8, 7)  # one response scored: the streak is broken
    assert streak.steps == 0
    streak.update(8, 8)
    streak.update(8, 8)
    with pytest.raises(RewardFailure, match="'r' failed on every response for 3 consecutive"):
        streak.update(8, 8, "boom")
    with pytest.raises(ValueError, match="limit"):
        FailureStreak(-1, "r")


@pytest.mark.parametrize("value", [-1, 1.5, True])
def test_reward_fail_steps_is_validated(value) -> None:
    with pytest.raises(ValueError, match="reward_fail_steps"):
        DataConfig(reward_fail_steps=value)
