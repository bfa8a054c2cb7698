"""The SkyRL plugin: options, the estimators' math, adaptive K, registration, the launcher.

Most tests run anywhere, registration against a stand-in for SkyRL's registry API. The
tests marked ``real SkyRL`` need SkyRL itself (``pip install 'qae[skyrl]'``, Python 3.12;
CI installs it in ``.venv-skyrl``): SkyRL's ``compute_advantages_and_returns`` finds the
estimators, the names SkyRL also knows give SkyRL's own advantages, the registry carries
the options to a Ray worker through its named actor, and metrics pass through SkyRL's
``Tracking.log``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from qae import compute_advantages
from qae.integrations import skyrl as plugin

try:
    from skyrl.backends.skyrl_train.utils import ppo_utils

    HAS_SKYRL = True
except Exception:  # missing, or SkyRL's modules refuse this Python (they need 3.12)
    ppo_utils = None
    HAS_SKYRL = False
needs_skyrl = pytest.mark.skipif(
    not HAS_SKYRL, reason="real SkyRL: not importable here (pip install 'qae[skyrl]', Python 3.12)"
)


@pytest.fixture(autouse=True)
def _fresh():
    plugin.reset_controller()
    yield
    plugin.reset_controller()


def _tokens(scores: torch.Tensor, lengths: list[int], width: int):
    """A SkyRL-style batch: the score on the last response token, mask over the response."""
    mask = torch.zeros(len(lengths), width)
    rewards = torch.zeros(len(lengths), width)
    for i, n in enumerate(lengths):
        mask[i, :n] = 1.0
        rewards[i, n - 1] = scores[i]
    return rewards, mask


def _batch(seed: int = 0):
    """27 responses: five groups of 5 and two prompts with one response; two non-binary
    scores; ragged lengths."""
    g = torch.Generator().manual_seed(seed)
    scores = torch.randint(0, 2, (27,), generator=g).float()
    scores[[3, 11]] = torch.tensor([0.25, -0.5])
    uids = [f"u{i // 5}" for i in range(25)] + ["solo1", "solo2"]
    rewards, mask = _tokens(scores, [1 + (i * 3) % 6 for i in range(27)], width=6)
    return scores, uids, rewards, mask


# --------------------------------------------------------------------------------------
# Without SkyRL


def test_qae_is_compute_advantages_spread_over_the_response():
    scores, uids, rewards, mask = _batch()
    opts = plugin.SkyRLQAEOptions(k=0.6, quantile_method="linear")
    adv, ret = plugin.qae_advantage(rewards, mask, np.array(uids), options=opts)
    want = compute_advantages(scores, uids, "qae", k=0.6, quantile_method="linear", singleton="raw")
    torch.testing.assert_close(adv, want[:, None] * mask, rtol=0, atol=0)
    assert torch.equal(ret, adv) and bool((adv[mask == 0] == 0).all())
    metrics = plugin.pop_metrics()
    assert metrics["qae/k"] == 0.6 and 0 < metrics["qae/frac_zero_adv"] < 1
    assert plugin.pop_metrics() == {}


# One group, rewards [1, 0, 0, 1] (mean 0.5, unbiased std sqrt(1/3)), and a prompt with one
# response scoring 0.3. SkyRL's grpo: +-0.5 * sqrt(3), the lone score kept; its rloo:
# G/(G-1) (r - mean) = +-2/3, the lone response 0; Dr. GRPO: +-0.5.
@pytest.mark.parametrize(
    "options, norm, magnitude, lone",
    [
        (dict(estimator="grpo"), True, 0.5 * 3**0.5, 0.3),
        (dict(estimator="grpo"), False, 0.5, 0.3),
        (dict(estimator="rloo"), True, 2 / 3, 0.0),
        (dict(estimator="drgrpo"), True, 0.5, 0.3),
        (dict(estimator="rloo", scale="group", singleton="raw"), True, 2 / 3 * 3**0.5, 0.3),
    ],
)
def test_names_mean_what_skyrl_computes_for_them(options, norm, magnitude, lone):
    scores = torch.tensor([1.0, 0.0, 0.0, 1.0, 0.3])
    rewards, mask = _tokens(scores, [2, 1, 3, 2, 1], width=3)
    opts = plugin.SkyRLQAEOptions(**options)
    adv, _ = plugin.qae_advantage(
        rewards, mask, ["g", "g", "g", "g", "solo"], options=opts, grpo_norm_by_std=norm
    )
    sign = torch.tensor([1.0, -1.0, -1.0, 1.0])
    torch.testing.assert_close(adv[:4, 0], sign * magnitude, rtol=1e-5, atol=1e-6)
    assert adv[4, 0].item() == pytest.approx(lone)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(k=1.5), r"qae.k must be in \(0, 1\), got k=1.5"),
        (dict(estimator="gae"), r"gae"),
        (dict(scale="token"), r"unknown qae.scale='token'; expected one of group, batch, none"),
        (dict(singleton="drop"), r"unknown qae.singleton='drop'"),
        (dict(epsilon=-1.0), r"qae.epsilon must be a number >= 0"),
        (dict(kcontrol={"kindd": "sparsity"}), r"unknown key qae.kcontrol.kindd; known: "),
    ],
)
def test_bad_options_name_the_option(kwargs, match):
    with pytest.raises(ValueError, match=match):
        plugin.SkyRLQAEOptions(**kwargs)


def test_bad_batches_are_refused():
    rewards, mask = _tokens(torch.tensor([1.0, 0.0]), [1, 1], width=1)
    with pytest.raises(ValueError, match="index"):
        plugin.qae_advantage(rewards, mask, None)
    with pytest.raises(ValueError, match=r"both be \[bs, T\], got \(2, 1\) and \(2, 2\)"):
        plugin.qae_advantage(rewards, torch.ones(2, 2), ["a", "a"])


def _binary(successes: list[int], g: int = 8):
    scores = torch.tensor([1.0 if j < c else 0.0 for c in successes for j in range(g)])
    rewards, mask = _tokens(scores, [1] * len(scores), width=1)
    return rewards, mask, [f"p{i}" for i, _ in enumerate(successes) for _ in range(g)]


def test_adaptive_k_follows_the_controller_and_survives_a_restart(tmp_path):
    # Sparsity control on the low branch, target 0.2 non-zero. Batch c = [2, 4, 6] of 8 at
    # K=0.4: non-zero 2 + 4 + 2 of 24 = 1/3 > 0.2 + 0.05, so K rises at the next call.
    state = tmp_path / "kc.json"
    opts = plugin.SkyRLQAEOptions(
        kcontrol={"kind": "sparsity", "sparsity_target": 0.2, "state_path": str(state)}
    )
    rewards, mask, index = _binary([2, 4, 6])
    plugin.qae_adaptive_advantage(rewards, mask, index, options=opts)
    first = plugin.pop_metrics()
    assert first["qae/k"] == 0.4 and first["qae/frac_zero_adv"] == pytest.approx(16 / 24)
    plugin.qae_adaptive_advantage(rewards, mask, index, options=opts)
    second = plugin.pop_metrics()
    assert second["qae/k"] > 0.4 and second["qae/kcontrol/k"] == second["qae/k"]
    saved = json.loads(state.read_text())
    assert saved["updates"] == 1 and saved["kcontrol"]["kind"] == "sparsity"
    plugin.qae_adaptive_advantage(rewards, mask, index, options=opts)
    k_continued = plugin.pop_metrics()["qae/k"]
    state.write_text(json.dumps(saved))
    plugin.reset_controller()  # a new process: the controller comes back from the file
    plugin.qae_adaptive_advantage(rewards, mask, index, options=opts)
    assert plugin.pop_metrics()["qae/k"] == k_continued


def test_difficulty_k_is_per_group():
    rewards, mask, index = _binary([1, 7])
    opts = plugin.SkyRLQAEOptions(
        kcontrol={"kind": "difficulty", "difficulty_ks": [0.3, 0.4, 0.5, 0.7]}
    )
    adv, _ = plugin.qae_adaptive_advantage(rewards, mask, index, options=opts)
    k = torch.tensor([0.3] * 8 + [0.7] * 8, dtype=torch.float64)
    want = compute_advantages(rewards.sum(-1), index, "qae", k=k, singleton="raw")
    torch.testing.assert_close(adv[:, 0], want)


def test_launcher_arguments():
    opts, rest = plugin.parse_args(
        [
            "trainer.override_entrypoint=qae.integrations.skyrl",
            "qae.k=0.6",
            "trainer.algorithm.advantage_estimator=qae_adaptive",
            "qae.quantile_method=linear",
            "qae.kcontrol.kind=entropy_band",
            "qae.kcontrol.entropy_relative=false",
            "trainer.epochs=2",
        ]
    )
    assert (opts.k, opts.quantile_method) == (0.6, "linear")
    assert opts.kcontrol == {"kind": "entropy_band", "entropy_relative": False}
    assert rest == ["trainer.algorithm.advantage_estimator=qae_adaptive", "trainer.epochs=2"]
    with pytest.raises(ValueError, match=r"unknown option qae.kk in 'qae.kk=1'; known: "):
        plugin.parse_args(["qae.kk=1"])
    with pytest.raises(ValueError, match=r"expected qae.<option>=<value>, got 'qae.k'"):
        plugin.parse_args(["qae.k"])


@pytest.fixture
def stand_in_registry(monkeypatch):
    """SkyRL's registry API as documented: ``register`` refuses a taken name."""

    class Registry:
        functions: dict = {}

        @classmethod
        def register(cls, name, fn):
            if name in cls.functions:
                raise ValueError(f"advantage estimator '{name}' already registered")
            cls.functions[name] = fn

        @classmethod
        def get(cls, name):
            return cls.functions[name]

        @classmethod
        def list_available(cls):
            return list(cls.functions)

        @classmethod
        def unregister(cls, name):
            del cls.functions[name]

    Registry.functions = {"grpo": lambda **kw: None}
    module = types.ModuleType("skyrl.backends.skyrl_train.utils.ppo_utils")
    module.AdvantageEstimatorRegistry = Registry
    parents = module.__name__.split(".")[:-1]
    for i in range(1, len(parents) + 1):
        name = ".".join(parents[:i])
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    monkeypatch.setitem(sys.modules, module.__name__, module)
    monkeypatch.setitem(sys.modules, "skyrl.train.utils.tracking", None)  # no Tracking
    return Registry


def test_register_binds_options_and_replaces_its_own(stand_in_registry):
    assert plugin.register(k=0.6) == ["qae", "qae_adaptive"]
    fn = stand_in_registry.get("qae")
    assert fn.keywords["options"].k == 0.6
    assert plugin.register(k=0.3) == ["qae", "qae_adaptive"]  # again: the new options
    assert stand_in_registry.get("qae").keywords["options"].k == 0.3
    stand_in_registry.functions["qae"] = lambda **kw: None  # someone else's "qae"
    with pytest.raises(ValueError, match="'qae' is already registered by"):
        plugin.register()


def test_main_registers_then_hands_the_rest_to_skyrl(stand_in_registry):
    seen = []
    plugin.main(["qae.k=0.75", "trainer.algorithm.advantage_estimator=qae"], run=seen.append)
    assert seen == [["trainer.algorithm.advantage_estimator=qae"]]
    assert stand_in_registry.get("qae").keywords["options"].k == 0.75


# --------------------------------------------------------------------------------------
# Real SkyRL


@needs_skyrl
def test_real_skyrl_finds_qae_through_compute_advantages_and_returns():
    from skyrl.train.config import AlgorithmConfig

    plugin.register(k=0.4)
    assert "qae" in ppo_utils.AdvantageEstimatorRegistry.list_available()
    scores, uids, rewards, mask = _batch(seed=2)
    adv, ret = ppo_utils.compute_advantages_and_returns(
        token_level_rewards=rewards,
        response_mask=mask,
        index=uids,
        adv_estimator="qae",
        config=AlgorithmConfig(advantage_estimator="qae"),
        values=None,
        grpo_norm_by_std=True,
    )
    want = compute_advantages(scores, uids, "qae", k=0.4, singleton="raw")
    torch.testing.assert_close(adv, want[:, None] * mask, rtol=0, atol=0)
    assert torch.equal(ret, adv)


@needs_skyrl
@pytest.mark.parametrize(
    "estimator, norm", [("grpo", True), ("grpo", False), ("rloo", True), ("drgrpo", True)]
)
def test_real_skyrl_same_name_same_advantages(estimator, norm):
    from skyrl.train.config import AlgorithmConfig

    plugin.register(estimator=estimator)
    _, uids, rewards, mask = _batch(seed=3)
    if estimator == "rloo":
        theirs, _ = ppo_utils.compute_rloo_outcome_advantage(rewards.clone(), mask, uids)
    else:
        theirs, _ = ppo_utils.compute_grpo_outcome_advantage(
            rewards.clone(), mask, uids, grpo_norm_by_std=norm and estimator == "grpo"
        )
    ours, _ = ppo_utils.compute_advantages_and_returns(
        token_level_rewards=rewards,
        response_mask=mask,
        index=uids,
        adv_estimator="qae",
        config=AlgorithmConfig(advantage_estimator="qae", grpo_norm_by_std=norm),
        grpo_norm_by_std=norm,
    )
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)


@needs_skyrl
def test_real_skyrl_ships_the_options_to_a_ray_worker():
    """The registry's named actor carries ``qae`` with its options to another process, as
    SkyRL's trainer (a Ray task) gets it."""
    import ray

    ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False)
    try:
        ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
        ppo_utils.AdvantageEstimatorRegistry.reset()
        ppo_utils.repopulate_all_registries()
        plugin.register(k=0.75, quantile_method="linear")
        scores, uids, rewards, mask = _batch(seed=4)

        @ray.remote
        def in_worker(rewards, mask, uids):
            import os

            from skyrl.backends.skyrl_train.utils.ppo_utils import AdvantageEstimatorRegistry

            fn = AdvantageEstimatorRegistry.get("qae")
            adv, _ = fn(token_level_rewards=rewards, response_mask=mask, index=uids)
            return adv, os.getpid()

        adv, pid = ray.get(in_worker.remote(rewards, mask, uids), timeout=600)
    finally:
        ray.shutdown()
        ppo_utils.AdvantageEstimatorRegistry.reset()
        ppo_utils.repopulate_all_registries()
    assert pid != __import__("os").getpid()
    want = compute_advantages(
        scores, uids, "qae", k=0.75, quantile_method="linear", singleton="raw"
    )
    torch.testing.assert_close(adv, want[:, None] * mask, rtol=0, atol=0)


@needs_skyrl
def test_real_skyrl_tracking_carries_metrics_and_entropy():
    from skyrl.train.utils.tracking import Tracking

    plugin.register(kcontrol={"kind": "entropy_band", "entropy_relative": False})
    seen = []

    class Sink:
        def log(self, data, step):
            seen.append((dict(data), step))

    tracker = Tracking("qae-test", "run", backend="console")
    tracker.logger = Sink()
    rewards, mask, index = _binary([2, 6])
    fn = ppo_utils.AdvantageEstimatorRegistry.get("qae_adaptive")
    fn(token_level_rewards=rewards, response_mask=mask, index=index)
    tracker.log({plugin.ENTROPY_KEY: 0.5}, step=1)
    assert seen[-1][0]["qae/k"] == 0.4 and "qae/frac_zero_adv" in seen[-1][0]
    # Entropy 0.5 is below the band [0.75, 1.25]: at the next step K rises.
    fn(token_level_rewards=rewards, response_mask=mask, index=index)
    tracker.log({}, step=2)
    assert seen[-1][0]["qae/k"] > 0.4
    assert seen[-1][0]["qae/kcontrol/k_signal"] == 0.5


@needs_skyrl
def test_real_skyrl_composes_the_example(tmp_path):
    """``examples/skyrl/run_qae_gsm8k.sh --print-config``: SkyRL's strict config parser
    takes every override, and the qae options reach the registered estimator."""
    script = Path(__file__).resolve().parents[1] / "examples" / "skyrl" / "run_qae_gsm8k.sh"
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    env["QUANTILE_K"] = "0.6"
    env["PYTHONPATH"] = str(Path(plugin.__file__).resolve().parents[2])
    proc = subprocess.run(
        ["bash", str(script), "--print-config", "qae.estimator=qae"],
        capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    cfg = yaml.safe_load(proc.stdout)
    assert cfg["qae"]["k"] == 0.6 and cfg["qae"]["quantile_method"] == "inverted_cdf"
    algorithm = cfg["skyrl"]["trainer"]["algorithm"]
    assert algorithm["advantage_estimator"] == "qae" and algorithm["grpo_norm_by_std"] is True
    assert cfg["skyrl"]["generator"]["n_samples_per_prompt"] == 16
    bad = subprocess.run(
        [sys.executable, "-m", "qae.integrations.skyrl", "--print-config",
         "trainer.algorithm.advantage_estimator=qea"],
        capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path, check=False,
    )  # fmt: skip
    assert bad.returncode != 0
    assert "advantage_estimator='qea' is not registered; known: " in bad.stderr
