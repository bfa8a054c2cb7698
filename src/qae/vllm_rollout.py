"""Optional vLLM rollout backend for ``qae train`` (``rollout.backend=vllm``).

A vLLM engine runs inside the training process, on the training model's GPU (colocated,
as TRL's ``GRPOTrainer`` does with ``vllm_mode="colocate"``). It samples the step's
responses; before each step :meth:`VLLMRollout.sync_weights` copies the training model's
current parameters into it and clears its prefix cache, so every step samples from the
policy being trained. Validation keeps Hugging Face ``generate``.

The result is a :class:`qae.rollout.Batch` laid out exactly as
:func:`qae.rollout.generate_batch` lays it out; :func:`qae.rollout.batch_from_token_outputs`
(re-exported here), the pure part, turns token ids into that layout and is tested without
vLLM or a GPU.

Departures from the ``hf`` backend: each ``generate`` call gives vLLM a request seed drawn
from torch's CPU generator (seeded by ``trainer.seed`` and checkpointed, so a resumed run
asks for the same samples), but vLLM's sampler is not ``generate``'s, so the two backends
draw different responses from the same weights; the engine computes in
``rollout.vllm_dtype`` (bfloat16 by default) while the update recomputes log-probs with
the training model, as verl does; ``Batch.sample_entropy`` stays empty (vLLM returns no
full-distribution entropy), so ``rollout/entropy`` is not logged.

Status: untested until ``tests/test_vllm_rollout.py`` has passed on a GPU with vLLM.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

import torch

from qae.rollout import Batch, batch_from_token_outputs, encode_prompts

if TYPE_CHECKING:
    from qae.config import TrainConfig

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

INSTALL_HINT = "pip install 'qae[vllm]' (vllm>=0.19.1, on a machine with a CUDA GPU)"


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


class VLLMRollout:
    """Samples G responses per prompt with a vLLM engine colocated with the training model.

    Args:
        model_path: local directory (``config.json`` + safetensors) or hub id of the
            training model's initial weights; the engine starts from them.
        tokenizer: the training model's tokenizer: prompts are encoded and responses
            decoded with it (the engine itself runs without one, token ids in and out).
        gpu_memory_utilization: fraction of the GPU's memory the engine may take.
        dtype: ``auto`` (bfloat16), ``bfloat16``, ``float16`` or ``float32``.
        max_model_len: longest prompt + response in tokens; 0 = the model's own.
        seed: seed of the engine's sampling.
        enforce_eager: no CUDA graphs.
        device: the training model's CUDA device (the engine goes on the same GPU).
    """

    def __init__(
        self,
        model_path: str,
        tokenizer: Any,
        *,
        gpu_memory_utilization: float = 0.3,
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
        if not torch.cuda.is_available():
            raise RuntimeError(f"rollout.backend='vllm' needs a CUDA GPU ({INSTALL_HINT})")
        index = torch.device(device).index if device is not None else None
        _single_process_env(index if index is not None else torch.cuda.current_device())
        self.tokenizer = tokenizer
        self.eos_token_id = tokenizer.eos_token_id
        self._sampling_params = vllm.SamplingParams
        self.llm = vllm.LLM(
            model=str(model_path),
            dtype="bfloat16" if dtype == "auto" else dtype,
            gpu_memory_utilization=gpu_memory_utilization,
            max_model_len=max_model_len or None,
            seed=seed,
            enforce_eager=enforce_eager,
            # The memory profiler's default dummy batch (tens of thousands of tokens) does not
            # fit beside a training model; chunked prefill handles longer prompts.
            max_num_batched_tokens=4096,
            tensor_parallel_size=1,
            distributed_executor_backend="external_launcher",
            # Token ids in and out: the engine needs no tokenizer, and the model's
            # generation_config.json must not add end tokens the hf backend would not stop at.
            skip_tokenizer_init=True,
            generation_config="vllm",
        )

    @classmethod
    def from_config(cls, cfg: TrainConfig, tokenizer: Any, device: torch.device) -> VLLMRollout:
        """The engine ``qae train`` builds for ``cfg`` (``rollout.vllm_*``, ``trainer.seed``)
        next to a training model on ``device``."""
        from qae.tasks.builtin import builtin_task, is_builtin

        if torch.device(device).type != "cuda":
            raise ValueError(
                f"rollout.backend='vllm' needs the training model on a CUDA GPU, "
                f"got model.device={cfg.model.device!r} (resolved to {device})"
            )
        path = cfg.model.path
        if is_builtin(path):
            path = str(builtin_task(path, field="model.path").model_path())
        r = cfg.rollout
        return cls(
            path,
            tokenizer,
            gpu_memory_utilization=r.vllm_gpu_memory_utilization,
            dtype=r.vllm_dtype,
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
        :func:`qae.rollout.generate_batch` (temperature 0 is greedy)."""
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
        if executor is not None:  # the in-process engine: load straight into its model
            executor.driver_worker.model_runner.model.load_weights(weights)
        else:
            self.llm.apply_model(lambda engine_model: engine_model.load_weights(weights))
        self.llm.reset_prefix_cache()
