"""Tests for the config tree, YAML presets and CLI flags."""

from __future__ import annotations

import argparse
import dataclasses

import pytest

from qae.io.configtools import (
    add_config_arguments,
    apply_overrides,
    config_from_args,
    field_help,
    iter_leaves,
    load_yaml_config,
    save_yaml_config,
)
from qae.train.config import TrainConfig, load_preset, preset_names


def test_every_field_has_help_text():
    missing = [name for name, f, _, owner in iter_leaves(TrainConfig) if not field_help(owner, f)]
    assert missing == []


@pytest.mark.parametrize("name", preset_names())
def test_every_preset_loads(name):
    cfg = load_preset(name)
    assert isinstance(cfg, TrainConfig)


def test_presets_exist():
    assert {"default", "dapo"} <= set(preset_names())
    dapo = load_preset("dapo")
    assert dapo.rollout.group_size == 16 and dapo.kcontrol.k == 0.4
    assert (dapo.loss.clip_low, dapo.loss.clip_high, dapo.loss.clip_ratio_c) == (0.2, 0.28, 10.0)
    assert dapo.eval.n == 32 and dapo.eval.temperature == 0.7 and dapo.eval.ks == [1, 16]
    assert dapo.rollout.overlong == "penalty" and dapo.rollout.overlong_buffer == 4096


def test_default_preset_matches_defaults():
    assert dataclasses.asdict(load_preset("default")) == dataclasses.asdict(TrainConfig())
    # the embedded default is the reasoning testbed
    assert dataclasses.asdict(load_preset("reasoning")) == dataclasses.asdict(TrainConfig())


def test_cli_flags_override_and_coerce():
    parser = argparse.ArgumentParser()
    add_config_arguments(parser, TrainConfig)
    args = parser.parse_args(
        [
            "--kcontrol.k",
            "0.6",
            "--eval.ks",
            "1,2",
            "--rollout.dynamic_sampling",
            "false",
            "--loss.clip_ratio_c",
            "none",
            "--trainer.steps",
            "3",
        ]
    )
    cfg = config_from_args(TrainConfig, args)
    assert cfg.kcontrol.k == 0.6 and cfg.eval.ks == [1, 2]
    assert cfg.rollout.dynamic_sampling is False and cfg.loss.clip_ratio_c is None
    assert cfg.trainer.steps == 3
    # untouched fields keep defaults
    assert cfg.rollout.group_size == TrainConfig().rollout.group_size


@pytest.mark.parametrize(
    "override, match",
    [
        ({"algo.kk": 0.5}, r"unknown config field 'algo.kk'; known: .*kcontrol.k"),
        ({"kcontrol.k": "high"}, r"kcontrol.k: expected float, got 'high'"),
        ({"kcontrol.k": 1.5}, r"kcontrol: k must be in \(0, 1\)"),
        ({"trainer.steps": 2.5}, r"trainer.steps: expected int, got 2.5"),
        ({"rollout.dynamic_sampling": "maybe"}, r"expected bool, got 'maybe'"),
        ({"algo.estimator": "mystery"}, r"unknown advantage estimator estimator='mystery'"),
        ({"rollout.group_size": 0}, r"rollout: group_size must be a number > 0, got group_size=0"),
        ({"loss.clip_low": 1.5}, r"loss: clip_low must be < 1"),
        ({"eval.ks": [1, 64]}, r"eval: ks must be integers in \[1, n=8\]"),
    ],
)
def test_bad_values_name_the_field(override, match):
    with pytest.raises(ValueError, match=match):
        apply_overrides(TrainConfig(), override)


def test_yaml_round_trip(tmp_path):
    cfg = TrainConfig()
    apply_overrides(cfg, {"kcontrol.k": 0.6, "eval.ks": [1, 2], "log.out": "x"})
    save_yaml_config(cfg, tmp_path / "c.yaml")
    back = load_yaml_config(TrainConfig, tmp_path / "c.yaml")
    assert dataclasses.asdict(back) == dataclasses.asdict(cfg)


def test_yaml_errors(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        load_yaml_config(TrainConfig, tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("- 1\n- 2\n")
    with pytest.raises(ValueError, match="must hold a mapping"):
        load_yaml_config(TrainConfig, bad)
    unknown = tmp_path / "unknown.yaml"
    unknown.write_text("algo:\n  kay: 3\n")
    with pytest.raises(ValueError, match="unknown config field 'algo.kay'"):
        load_yaml_config(TrainConfig, unknown)
    with pytest.raises(ValueError, match="neither a preset"):
        load_preset(str(tmp_path / "nope.yaml"))


def test_arithmetic_preset_is_the_old_embedded_default():
    """The arithmetic preset spells out every setting of the arithmetic task's regime."""
    cfg = load_preset("arithmetic")
    assert cfg.model.path == cfg.data.train == cfg.data.val == "builtin:arithmetic"
    assert cfg.trainer.mini_batches == 1 and cfg.rollout.backend == "hf"
    assert cfg.trainer.old_logprobs == "recompute" and cfg.optim.lr == 1e-4
    assert (cfg.eval.every, cfg.eval.n, cfg.eval.ks) == (100, 4, [1, 4])
