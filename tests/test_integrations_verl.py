"""The verl plugin: estimators registered in verl's registry, options, adaptive K, launcher.

Most tests run against a minimal stand-in for ``verl.trainer.ppo.core_algos`` (the
registry API verl documents), so they run without verl. The tests marked ``real verl``
need verl itself (``pip install 'qae[verl]'``, in its own environment because verl pins
its dependencies); they are skipped with that reason when verl cannot be imported. The
subprocess test of the environment-variable mechanism also runs when ``QAE_VERL_PYTHON``
names an interpreter that has verl.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import os
import subprocess
import sys
import textwrap
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from qae.core.advantages import compute_advantages

SRC = str(Path(__file__).resolve().parents[1] / "src")
HAS_VERL = importlib.util.find_spec("verl") is not None
VERL_PYTHON = os.environ.get("QAE_VERL_PYTHON") or (sys.executable if HAS_VERL else None)
needs_verl = pytest.mark.skipif(
    not HAS_VERL, reason="real verl: verl is not importable here (pip install 'qae[verl]')"
)


def _fake_core_algos() -> types.ModuleType:
    """The part of verl's core_algos the plugin uses: a registry that refuses conflicts."""
    mod = types.ModuleType("verl.trainer.ppo.core_algos")
    mod.ADV_ESTIMATOR_REGISTRY = {}

    def register_adv_est(name):
        def deco(fn):
            current = mod.ADV_ESTIMATOR_REGISTRY.get(name)
            if current is not None and current != fn:
                raise ValueError(f"Adv estimator {name} has already been registered")
            mod.ADV_ESTIMATOR_REGISTRY[name] = fn
            return fn

        return deco

    def get_adv_estimator_fn(name):
        if name not in mod.ADV_ESTIMATOR_REGISTRY:
            raise ValueError(f"Unknown advantage estimator: {name}")
        return mod.ADV_ESTIMATOR_REGISTRY[name]

    mod.register_adv_est = register_adv_est
    mod.get_adv_estimator_fn = get_adv_estimator_fn
    return mod


@pytest.fixture
def fake_verl(monkeypatch):
    """Import qae.integrations.verl afresh with a stand-in verl in sys.modules."""
    core = _fake_core_algos()
    for name in ("verl", "verl.trainer", "verl.trainer.ppo"):
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    sys.modules["verl.trainer.ppo"].core_algos = core
    monkeypatch.setitem(sys.modules, "verl.trainer.ppo.core_algos", core)
    monkeypatch.setitem(sys.modules, "verl.utils", None)  # no Tracking in the stand-in
    monkeypatch.delitem(sys.modules, "qae.integrations.verl", raising=False)
    plugin = importlib.import_module("qae.integrations.verl")
    plugin.reset_controller()
    yield core, plugin
    plugin.reset_controller()


@pytest.fixture
def plugin():
    """The plugin module (its functions work without verl)."""
    mod = importlib.import_module("qae.integrations.verl")
    mod.reset_controller()
    yield mod
    mod.reset_controller()


def _tokens(scores: torch.Tensor, lengths: list[int], width: int):
    """verl-style batch: the score on the last response token, mask over the response."""
    mask = torch.zeros(len(lengths), width)
    rewards = torch.zeros(len(lengths), width)
    for i, n in enumerate(lengths):
        mask[i, :n] = 1.0
        rewards[i, n - 1] = scores[i]
    return rewards, mask


def test_registers_names_through_the_registry(fake_verl):
    core, plugin = fake_verl
    assert core.get_adv_estimator_fn("qae") is plugin.qae_advantage
    assert core.get_adv_estimator_fn("qae_adaptive") is plugin.qae_adaptive_advantage
    assert plugin.register() == ["qae", "qae_adaptive"]  # idempotent, no conflict
    with pytest.raises(ValueError, match="already been registered"):
        core.register_adv_est("qae")(lambda **kw: None)


def test_hand_example_uid_strings_singleton_raw(plugin):
    # Group "a", G=5, K=0.4: baseline = ceil(5*0.4) = 2nd smallest score = 0; mean 0.4,
    # unbiased var (2*0.36 + 3*0.16)/4 = 0.3, so a success gets 1/sqrt(0.3) = 1.8257...
    # Group "b" has one response: verl's grpo gives it its raw score, 0.7.
    scores = torch.tensor([1.0, 0.0, 0.0, 0.7, 0.0, 1.0])
    index = np.array(["a", "a", "a", "b", "a", "a"], dtype=object)
    rewards, mask = _tokens(scores, [3, 1, 4, 2, 4, 2], width=5)
    adv, ret = plugin.qae_advantage(rewards, mask, index, {"quantile_k": 0.4})
    a = 1.0 / (0.3**0.5 + 1e-6)
    expected = torch.tensor([a, 0.0, 0.0, 0.7, 0.0, a])[:, None] * mask
    torch.testing.assert_close(adv, expected)
    assert torch.equal(ret, adv)
    assert bool((adv[mask == 0] == 0).all())


@settings(max_examples=40, deadline=None)
@given(
    data=st.lists(
        st.tuples(st.sampled_from("pqrst"), st.sampled_from([0.0, 1.0, 0.5, -1.0])),
        min_size=1,
        max_size=24,
    ),
    k=st.sampled_from([0.2, 0.4, 0.6, 0.75]),
    norm=st.booleans(),
)
def test_equals_compute_advantages_broadcast(data, k, norm):
    plugin = importlib.import_module("qae.integrations.verl")
    uids = np.array([f"uid-{g}" for g, _ in data], dtype=object)
    scores = torch.tensor([s for _, s in data])
    lengths = [1 + (i % 3) for i in range(len(data))]
    rewards, mask = _tokens(scores, lengths, width=4)
    config = {"quantile_k": k, "norm_adv_by_std_in_grpo": norm}
    adv, _ = plugin.qae_advantage(rewards, mask, uids, config)
    per_response = compute_advantages(
        scores, list(uids), "qae", k=k, scale="group" if norm else "none", singleton="raw"
    )
    torch.testing.assert_close(adv, per_response[:, None] * mask, rtol=0, atol=0)


def test_quantile_k_and_options_are_read(plugin):
    # One group of 5 with 3 successes (p = 0.6). K=0.4: p <= 1 - K, hard, baseline 0, the
    # successes are credited. K=0.8: baseline = 4th smallest = 1, easy, only failures move.
    scores = torch.tensor([0.0, 1.0, 1.0, 1.0, 0.0])
    index = np.array(["g"] * 5, dtype=object)
    rewards, mask = _tokens(scores, [2] * 5, width=2)
    low, _ = plugin.qae_advantage(rewards, mask, index, {"quantile_k": 0.4})
    high, _ = plugin.qae_advantage(rewards, mask, index, {"quantile_k": 0.8})
    assert low[:, 0].tolist() == pytest.approx([0, 1.8257, 1.8257, 1.8257, 0], abs=1e-4)
    assert high[:, 0].tolist() == pytest.approx([-1.8257, 0, 0, 0, -1.8257], abs=1e-4)
    # norm_adv_by_std_in_grpo=False: no scaling, A = r - b exactly.
    raw, _ = plugin.qae_advantage(
        rewards, mask, index, {"quantile_k": 0.8, "norm_adv_by_std_in_grpo": False}
    )
    assert raw[:, 0].tolist() == [-1.0, 0.0, 0.0, 0.0, -1.0]
    # K=0.45: linear (torch.quantile) takes rank 0.45 * 4 = 1.8 of [0, 0, 1, 1, 1], i.e.
    # 0.8; the paper's quantile takes the ceil(5 * 0.45) = 3rd smallest, 1.
    opts = {"quantile_k": 0.45, "norm_adv_by_std_in_grpo": False}
    lin, _ = plugin.qae_advantage(
        rewards, mask, index, {**opts, "qae": {"quantile_method": "linear"}}
    )
    paper, _ = plugin.qae_advantage(rewards, mask, index, opts)
    assert lin[:, 0].tolist() == pytest.approx([-0.8, 0.2, 0.2, 0.2, -0.8])
    assert paper[:, 0].tolist() == [-1.0, 0.0, 0.0, 0.0, -1.0]
    default = plugin.read_options(None)
    assert (default.k, default.quantile_method, default.singleton) == (0.4, "inverted_cdf", "raw")


# One group, rewards [1, 0, 0, 1]: mean 0.5, unbiased std sqrt(1/3). verl's rloo gives
# G/(G-1) * (r - mean) = +-2/3; Dr. GRPO (verl's grpo without the std) +-1/2; verl's grpo
# +-0.5 * sqrt(3) = +-0.866; QAE's std-scaled leave-one-out, asked for, +-2/3 * sqrt(3).
@pytest.mark.parametrize(
    "config, magnitude",
    [
        ({"qae": {"estimator": "rloo"}}, 2 / 3),
        ({"qae": {"estimator": "rloo"}, "norm_adv_by_std_in_grpo": True}, 2 / 3),
        ({"qae": {"estimator": "drgrpo"}}, 0.5),
        ({"qae": {"estimator": "drgrpo"}, "norm_adv_by_std_in_grpo": True}, 0.5),
        ({"qae": {"estimator": "grpo"}}, 0.5 * 3**0.5),
        ({"qae": {"estimator": "grpo"}, "norm_adv_by_std_in_grpo": False}, 0.5),
        ({"qae": {"estimator": "rloo", "scale": "group"}}, 2 / 3 * 3**0.5),
        ({"qae": {"estimator": "drgrpo", "scale": "group"}}, 0.5 * 3**0.5),
    ],
)
def test_estimator_names_mean_what_verl_computes_for_them(plugin, config, magnitude):
    scores = torch.tensor([1.0, 0.0, 0.0, 1.0, 0.3])
    index = np.array(["g", "g", "g", "g", "solo"], dtype=object)
    rewards, mask = _tokens(scores, [2, 1, 3, 2, 1], width=3)
    adv, _ = plugin.qae_advantage(rewards, mask, index, config)
    sign = torch.tensor([1.0, -1.0, -1.0, 1.0])
    torch.testing.assert_close(adv[:4, 0], sign * magnitude, rtol=1e-5, atol=1e-6)
    assert adv[4, 0].item() == pytest.approx(0.3)  # a singleton keeps its score, as in verl


def test_bad_config_names_the_field(plugin):
    rewards, mask = _tokens(torch.tensor([0.0, 1.0]), [1, 1], width=1)
    index = np.array(["a", "a"], dtype=object)
    with pytest.raises(ValueError, match="algorithm.qae.quantile_methd"):
        plugin.qae_advantage(rewards, mask, index, {"qae": {"quantile_methd": "linear"}})
    with pytest.raises(ValueError, match="quantile_k"):
        plugin.qae_advantage(rewards, mask, index, {"quantile_k": 1.5})
    with pytest.raises(ValueError, match="algorithm.qae.scale"):
        plugin.qae_advantage(rewards, mask, index, {"qae": {"scale": "token"}})
    with pytest.raises(ValueError, match="index"):
        plugin.qae_advantage(rewards, mask, None, {})


def _binary_batch(successes: list[int], g: int = 8):
    scores = torch.tensor([1.0 if j < c else 0.0 for c in successes for j in range(g)])
    index = np.array([f"p{i}" for i, _ in enumerate(successes) for _ in range(g)], dtype=object)
    rewards, mask = _tokens(scores, [1] * len(scores), width=1)
    return rewards, mask, index


def test_adaptive_controller_state_and_metrics(plugin, tmp_path):
    # Sparsity control on the low branch, target 0.2 non-zero. Groups with c = 2 of 8
    # successes at K=0.4 are hard: 2 non-zero of 8, fraction 0.25 per group; with c = 6
    # (easy at K=0.4) 2 failures are non-zero. Batch c = [2, 4, 6]: non-zero 2 + 4 + 2 of
    # 24 = 1/3 > 0.2 + 0.05, so the error is positive and K must rise at the next call.
    state = tmp_path / "kc.json"
    config = {
        "quantile_k": 0.4,
        "qae_kcontrol": {"kind": "sparsity", "sparsity_target": 0.2, "state_path": str(state)},
    }
    rewards, mask, index = _binary_batch([2, 4, 6])
    plugin.qae_adaptive_advantage(rewards, mask, index, config)
    first = plugin.pop_metrics()
    assert first["qae/k"] == 0.4
    assert first["qae/frac_zero_adv"] == pytest.approx(16 / 24)
    assert first["qae/hard_groups"] == 2 and first["qae/easy_groups"] == 1
    plugin.qae_adaptive_advantage(rewards, mask, index, config)
    second = plugin.pop_metrics()
    assert second["qae/k"] > 0.4
    assert second["qae/kcontrol/k"] == second["qae/k"]
    saved = json.loads(state.read_text())
    assert saved["updates"] == 1 and saved["kcontrol"]["kind"] == "sparsity"

    # A restarted process continues from the saved state: same K as an uninterrupted run.
    plugin.qae_adaptive_advantage(rewards, mask, index, config)
    k_continued = plugin.pop_metrics()["qae/k"]
    state.write_text(json.dumps(saved))
    plugin.reset_controller()
    plugin.qae_adaptive_advantage(rewards, mask, index, config)
    assert plugin.pop_metrics()["qae/k"] == k_continued


def test_adaptive_unknown_key_and_difficulty(plugin):
    rewards, mask, index = _binary_batch([1, 7])
    with pytest.raises(ValueError, match="algorithm.qae_kcontrol.kindd"):
        plugin.qae_adaptive_advantage(rewards, mask, index, {"qae_kcontrol": {"kindd": "x"}})
    plugin.reset_controller()
    # Difficulty buckets: p = 1/8 -> bucket 0 (K 0.3), p = 7/8 -> bucket 3 (K 0.7); per
    # group K must equal compute_advantages with the per-response K tensor.
    config = {"qae_kcontrol": {"kind": "difficulty", "difficulty_ks": [0.3, 0.4, 0.5, 0.7]}}
    adv, _ = plugin.qae_adaptive_advantage(rewards, mask, index, config)
    k = torch.tensor([0.3] * 8 + [0.7] * 8, dtype=torch.float64)
    scores = rewards.sum(-1)
    expected = compute_advantages(scores, list(index), "qae", k=k, singleton="raw")
    torch.testing.assert_close(adv[:, 0], expected)


def test_launch_overrides_place_the_env_var(plugin, monkeypatch):
    monkeypatch.setenv(plugin.ENV_VAR, "my.plugin")
    out = plugin.launch_overrides(["--cfg", "job", "a=1", "b=2"])
    assert out[:2] == ["--cfg", "job"]
    assert out[2] == (
        "++ray_kwargs.ray_init.runtime_env.env_vars.VERL_USE_EXTERNAL_MODULES="
        "'my.plugin,qae.integrations.verl'"
    )
    assert out[3:] == ["a=1", "b=2"]
    user = ["++ray_kwargs.ray_init.runtime_env.env_vars.VERL_USE_EXTERNAL_MODULES=x"]
    assert plugin.launch_overrides(user) == user
    assert plugin._with_module("qae.integrations.verl,a") == "qae.integrations.verl,a"


_FAKE_VERL_INIT = """
import importlib, os
for _m in filter(None, os.getenv("VERL_USE_EXTERNAL_MODULES", "").split(",")):
    importlib.import_module(_m)
"""
_FAKE_MAIN = """
import json, os, sys
from verl.trainer.ppo import core_algos
with open(os.environ["FAKE_VERL_OUT"], "w") as fh:
    json.dump({"argv": sys.argv[1:], "names": sorted(core_algos.ADV_ESTIMATOR_REGISTRY),
               "env": os.environ["VERL_USE_EXTERNAL_MODULES"]}, fh)
"""


def test_launcher_in_a_fresh_process_with_stand_in_verl(tmp_path):
    # A stand-in verl package on disk that, like verl, imports VERL_USE_EXTERNAL_MODULES
    # on `import verl`; its main_ppo records what it was started with.
    pkg = tmp_path / "verl"
    (pkg / "trainer" / "ppo").mkdir(parents=True)
    (pkg / "__init__.py").write_text(_FAKE_VERL_INIT)
    (pkg / "trainer" / "__init__.py").write_text("")
    (pkg / "trainer" / "ppo" / "__init__.py").write_text("")
    core_src = textwrap.dedent(
        """
        ADV_ESTIMATOR_REGISTRY = {}
        def register_adv_est(name):
            def deco(fn):
                if name in ADV_ESTIMATOR_REGISTRY and ADV_ESTIMATOR_REGISTRY[name] != fn:
                    raise ValueError(name)
                ADV_ESTIMATOR_REGISTRY[name] = fn
                return fn
            return deco
        """
    )
    (pkg / "trainer" / "ppo" / "core_algos.py").write_text(core_src)
    (pkg / "trainer" / "main_ppo.py").write_text(_FAKE_MAIN)
    out = tmp_path / "out.json"
    env = {**os.environ, "PYTHONPATH": f"{tmp_path}{os.pathsep}{SRC}", "FAKE_VERL_OUT": str(out)}
    env.pop("VERL_USE_EXTERNAL_MODULES", None)
    cmd = [sys.executable, "-m", "qae.integrations.verl", "algorithm.adv_estimator=qae"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    got = json.loads(out.read_text())
    assert got["names"] == ["qae", "qae_adaptive"]
    assert got["env"] == "qae.integrations.verl"
    assert got["argv"][1] == "algorithm.adv_estimator=qae"
    assert "VERL_USE_EXTERNAL_MODULES='qae.integrations.verl'" in got["argv"][0]


@pytest.mark.skipif(VERL_PYTHON is None, reason="real verl: no interpreter with verl")
def test_env_var_registers_in_fresh_real_verl_process():
    code = (
        "from verl.trainer.ppo import core_algos as c; import qae.integrations.verl as p; "
        "print(c.get_adv_estimator_fn('qae') is p.qae_advantage, "
        "c.get_adv_estimator_fn('qae_adaptive') is p.qae_adaptive_advantage)"
    )
    env = {**os.environ, "VERL_USE_EXTERNAL_MODULES": "qae.integrations.verl"}
    env["PYTHONPATH"] = SRC + os.pathsep + env.get("PYTHONPATH", "")
    env["VERL_USE_EXTERNAL_PLUGINS"] = "none"  # only the env-var mechanism
    proc = subprocess.run(
        [VERL_PYTHON, "-c", code], env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split()[-2:] == ["True", "True"]
    # Without the variable, nothing registers them.
    env.pop("VERL_USE_EXTERNAL_MODULES")
    code = "from verl.trainer.ppo import core_algos as c; print('qae' in c.ADV_ESTIMATOR_REGISTRY)"
    proc = subprocess.run(
        [VERL_PYTHON, "-c", code], env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split()[-1] == "False"


@needs_verl
def test_real_verl_compute_advantage_on_dataproto(plugin):
    from omegaconf import OmegaConf
    from verl import DataProto
    from verl.trainer.ppo import core_algos
    from verl.trainer.ppo.ray_trainer import compute_advantage

    plugin.register()
    assert core_algos.get_adv_estimator_fn("qae") is plugin.qae_advantage
    g = torch.Generator().manual_seed(0)
    scores = torch.randint(0, 2, (24,), generator=g).float()
    scores[5] = 0.25  # a non-binary score
    uids = np.array([f"u{i // 6}" for i in range(23)] + ["solo"], dtype=object)
    lengths = [1 + (i * 5) % 7 for i in range(24)]
    rewards, mask = _tokens(scores, lengths, width=7)
    data = DataProto.from_dict(
        tensors={"token_level_rewards": rewards, "response_mask": mask},
        non_tensors={"uid": uids},
    )
    config = OmegaConf.create({"adv_estimator": "qae", "quantile_k": 0.4, "gamma": 1.0})
    out = compute_advantage(data, adv_estimator="qae", config=config)
    expected = compute_advantages(scores, list(uids), "qae", k=0.4, singleton="raw")
    torch.testing.assert_close(out.batch["advantages"], expected[:, None] * mask, rtol=0, atol=0)

    # With the mean baseline our estimator reproduces verl's own grpo (singleton included).
    grpo, _ = core_algos.compute_grpo_outcome_advantage(rewards, mask, uids)
    ours, _ = plugin.qae_advantage(rewards, mask, uids, {"qae": {"estimator": "grpo"}})
    torch.testing.assert_close(ours, grpo, rtol=1e-5, atol=1e-6)


@needs_verl
@pytest.mark.parametrize("estimator", ["rloo", "drgrpo", "grpo"])
def test_real_verl_same_name_same_advantages(plugin, estimator):
    """Through verl's registry and ``compute_advantage``, with verl's default
    ``norm_adv_by_std_in_grpo=true``: ``rloo`` is verl's ``compute_rloo_outcome_advantage``,
    ``drgrpo`` verl's grpo without the std, ``grpo`` verl's grpo."""
    from omegaconf import OmegaConf
    from verl import DataProto
    from verl.trainer.ppo import core_algos
    from verl.trainer.ppo.ray_trainer import compute_advantage

    plugin.register()
    g = torch.Generator().manual_seed(1)
    scores = torch.randint(0, 2, (27,), generator=g).float()
    scores[[3, 11]] = torch.tensor([0.25, -0.5])  # non-binary scores
    uids = np.array([f"u{i // 5}" for i in range(25)] + ["solo1", "solo2"], dtype=object)
    lengths = [1 + (i * 3) % 6 for i in range(27)]
    rewards, mask = _tokens(scores, lengths, width=6)
    if estimator == "rloo":
        theirs, _ = core_algos.compute_rloo_outcome_advantage(rewards, mask, uids)
    else:
        norm = estimator == "grpo"
        theirs, _ = core_algos.compute_grpo_outcome_advantage(
            rewards, mask, uids, norm_adv_by_std_in_grpo=norm
        )
    data = DataProto.from_dict(
        tensors={"token_level_rewards": rewards, "response_mask": mask},
        non_tensors={"uid": uids},
    )
    config = OmegaConf.create(
        {
            "adv_estimator": "qae",
            "norm_adv_by_std_in_grpo": True,
            "gamma": 1.0,
            "qae": {"estimator": estimator},
        }
    )
    out = compute_advantage(data, adv_estimator="qae", config=config)
    torch.testing.assert_close(out.batch["advantages"], theirs, rtol=1e-5, atol=1e-6)


@needs_verl
def test_real_verl_tracking_receives_metrics(plugin):
    from verl.utils.tracking import Tracking

    plugin.register()
    seen = []

    class Sink:
        def log(self, data, step):
            seen.append((dict(data), step))

    tracker = Tracking.__new__(Tracking)
    tracker.logger = {"sink": Sink()}
    rewards, mask, index = _binary_batch([2, 6])
    config = {"qae_kcontrol": {"kind": "entropy_band", "entropy_relative": False}}
    plugin.qae_adaptive_advantage(rewards, mask, index, config)
    tracker.log({"actor/entropy": 0.5}, step=1)
    assert seen[-1][0]["qae/k"] == 0.4 and "qae/frac_zero_adv" in seen[-1][0]
    # Entropy 0.5 is below the band [0.75, 1.25]: at the next step K rises.
    plugin.qae_adaptive_advantage(rewards, mask, index, config)
    tracker.log({}, step=2)
    assert seen[-1][0]["qae/k"] > 0.4
    assert seen[-1][0]["qae/kcontrol/k_signal"] == 0.5
