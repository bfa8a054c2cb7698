"""The RLVR training loop, top to bottom.

One step: prompts -> G sampled responses per prompt -> rewards -> dynamic sampling and
overlong handling -> advantages (registered estimator) -> PPO mini-batch updates with the
registered loss -> metrics -> checkpoint. The modules own the math (the update phase is
:mod:`qae.train.update`, the per-step diagnostics :mod:`qae.train.step_diagnostics`); this file owns
the loop and its state.

Where this loop departs from the paper's DAPO recipe (verl):

- The sampling policy's log-probs are recomputed by a forward pass of the current weights
  (as verl does), or with ``rollout.backend=sampler`` taken from the sampler, which
  recorded them with the same weights (``trainer.old_logprobs``); with one epoch and one
  mini-batch the update's own forward pass provides them (the weights have not moved yet),
  which saves a pass and changes nothing.
- Dynamic sampling stops after ``rollout.max_gen_batches`` rounds and trains on the
  informative groups it has, logging the shortfall, instead of raising.
- Clip-Cov / KL-Cov statistics are taken per micro-batch, not over the whole batch.
- Dropout stays off during updates (the policy is always in eval mode), so the recomputed
  log-probs equal those of the policy that sampled.
"""

from __future__ import annotations

import math
import random
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from qae.core.advantages import (
    advantage_stats,
    broadcast_to_tokens,
    compute_advantages,
)
from qae.core.entropy import entropy_change_predictor, masked_mean
from qae.eval.datasets import PromptRecord
from qae.io.configtools import config_to_dict, save_yaml_config
from qae.io.errors import RunError, TrainingInterrupted, describe_os_error, resume_hint
from qae.io.resume import resume_checkpoint
from qae.io.runlock import RunLock
from qae.io.runlog import Checkpointer, MetricsLogger, remove_stale_temporaries
from qae.io.threads import ThreadPolicy
from qae.kcontrol import KController, make_controller
from qae.train.config import TrainConfig
from qae.train.filters import keep_informative_groups, mask_truncated, overlong_penalty, take_groups
from qae.train.rollout import Batch, concat_batches, generate_batch, sample_batch
from qae.train.step_diagnostics import RunHistory, attribution_metrics, token_diagnostics
from qae.train.update import (
    active_rows,
    batch_logprobs,
    scatter_rows,
    skip_is_exact,
    token_mask,
    update_policy,
)

__all__ = ["PromptStream", "TrainResult", "train", "validate"]


# --------------------------------------------------------------------------------------
# Prompts


class PromptStream:
    """An endless, resumable stream of training records.

    ``records`` is either a list (shuffled anew each epoch with ``seed + epoch``) or a
    zero-argument factory of an endless iterator (the built-in task's generator, which is
    reproducible from its seed). The only state is the number of records consumed.
    """

    def __init__(
        self, records: Sequence[PromptRecord] | Callable[[], Iterator[PromptRecord]], seed: int = 0
    ) -> None:
        if not callable(records) and len(records) == 0:
            raise ValueError("the training set is empty")
        self.records = records
        self.seed = seed
        self.consumed = 0
        self._order: tuple[int, np.ndarray] | None = None
        self._iter: Iterator[PromptRecord] | None = None
        self._iter_pos = 0

    def _from_iterator(self, i: int) -> PromptRecord:
        if self._iter is None or self._iter_pos > i:
            self._iter, self._iter_pos = self.records(), 0  # type: ignore[operator]
        while self._iter_pos < i:  # resume: replay the generator up to position i
            next(self._iter)
            self._iter_pos += 1
        self._iter_pos += 1
        return next(self._iter)

    def _record(self, i: int) -> PromptRecord:
        if callable(self.records):
            return self._from_iterator(i)
        n = len(self.records)
        epoch, pos = divmod(i, n)
        if self._order is None or self._order[0] != epoch:
            perm = np.random.default_rng(self.seed + epoch).permutation(n)
            self._order = (epoch, perm)
        return self.records[int(self._order[1][pos])]

    def take(self, n: int) -> list[PromptRecord]:
        out = [self._record(self.consumed + j) for j in range(n)]
        self.consumed += n
        return out


# --------------------------------------------------------------------------------------
# Setup


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as err:
        raise ValueError(f"model.device={name!r} is not a device name") from err
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"model.device={name!r} but CUDA is not available")
    return device


def load_policy(path: str, device: torch.device, dtype: str = "auto"):
    """Model and tokenizer from a local directory or hub id (``builtin``, ``builtin:<task>``:
    a built-in task's shipped base policy)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from qae.tasks.builtin import builtin_task, is_builtin

    if is_builtin(path):
        path = str(builtin_task(path, field="model.path").model_path())
    torch_dtype = torch.bfloat16 if dtype == "bfloat16" else torch.float32
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype)
    except (OSError, ValueError) as err:
        raise ValueError(
            f"model.path={path!r} could not be loaded as a causal LM (a local directory "
            f"with config.json, or a hub id reachable from here): {err}"
        ) from err
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.to(device)
    model.eval()  # no dropout: recomputed log-probs must equal the sampler's
    return model, tokenizer


@dataclass
class TaskData:
    train: PromptStream
    val: list[PromptRecord]
    reward: Callable[[str, Any], float | None]
    max_new_tokens: int
    format_prompt: Callable[[PromptRecord], str]
    reward_streak: Any = None
    """A :class:`qae.rewards.FailureStreak`: steps in a row whose reward failed on every
    response (the run stops at ``data.reward_fail_steps``)."""


def load_task_data(cfg: TrainConfig, tokenizer: Any) -> TaskData:
    """Training stream, validation records, reward function and prompt formatter."""
    from qae.eval.datasets import load_prompts
    from qae.eval.prompts import build_prompt
    from qae.rewards import FailureStreak, get_reward, reward_name
    from qae.tasks.builtin import builtin_records, builtin_task, is_builtin, task_record

    d = cfg.data
    keys = dict(problem_key=d.problem_key or None, answer_key=d.answer_key or None)
    max_new = cfg.rollout.max_new_tokens
    task = builtin_task(d.train, field="data.train") if is_builtin(d.train) else None
    if task is not None:

        def stream() -> Iterator[PromptRecord]:
            for i, row in enumerate(task.iter_train(d.seed)):
                yield task_record(row, i, task.name)

        train = PromptStream(stream, seed=d.seed)
        max_new = max_new or task.max_new_tokens
    else:
        train = PromptStream(load_prompts(d.train, **keys), seed=d.seed)
        max_new = max_new or 1024
    if is_builtin(d.val):
        val = builtin_records(d.val, "validation", field="data.val")
    elif d.val:
        val = load_prompts(d.val, **keys)
    else:
        val = []
    if d.val_size:
        val = val[: d.val_size]
    chosen = d.reward
    if chosen == "auto":
        chosen = task.reward if task is not None else "math"
    reward = get_reward(chosen)
    if getattr(tokenizer, "chat_template", None) is None and d.template != "raw":
        warnings.warn(
            f"the tokenizer has no chat template: data.template={d.template!r} is applied "
            f"to the raw problem text",
            stacklevel=2,
        )

    def fmt(record: PromptRecord) -> str:
        return build_prompt(record, tokenizer, d.template)[0]

    streak = FailureStreak(d.reward_fail_steps, reward_name(reward))
    return TaskData(train, val, reward, max_new, fmt, streak)


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig):
    o = cfg.optim
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=o.lr, betas=(o.beta1, o.beta2), weight_decay=o.weight_decay)
    total = max(1, cfg.trainer.steps * cfg.trainer.ppo_epochs * cfg.trainer.mini_batches)

    def factor(i: int) -> float:
        if o.warmup_steps and i < o.warmup_steps:
            return (i + 1) / o.warmup_steps
        if o.schedule == "cosine":
            frac = min(1.0, (i - o.warmup_steps) / max(1, total - o.warmup_steps))
            return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac))
        return 1.0

    return opt, torch.optim.lr_scheduler.LambdaLR(opt, factor)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# --------------------------------------------------------------------------------------
# Rollout phase


def score_batch(
    batch: Batch,
    reward: Callable[[str, Any], float | None],
    stats: dict[str, Any] | None = None,
) -> Batch:
    """Verifier scores into ``scores`` and ``rewards`` (None -> NaN, failures -> 0).

    ``stats``, when given, adds up what scoring went through: ``scored`` responses,
    ``errors`` (the function raised, returned a non-number or killed its worker),
    ``timeouts``, ``unscorable`` (None) and the first failure's message as ``example``.
    """
    from qae.rewards import score_report

    report = score_report(reward, batch.texts, batch.answers)
    if stats is not None:
        counts = {
            "scored": len(report.scores),
            "errors": report.errors + report.crashed,
            "timeouts": report.timeouts,
            "unscorable": report.unscorable,
        }
        for key, n in counts.items():
            stats[key] = stats.get(key, 0) + n
        if report.example is not None:
            stats.setdefault("example", report.example)
    scores = torch.tensor([math.nan if s is None else float(s) for s in report.scores])
    return batch.with_(scores=scores, rewards=scores.clone())


def sample_with_model(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[str],
    answers: Sequence[Any],
    *,
    backend: str,
    measure_entropy: bool,
    **sampling: Any,
) -> Batch:
    """Sample with the training model itself: qae's cached loop (``backend=sampler``,
    which always records entropy and log-probs) or Hugging Face ``generate`` (``hf``, and
    the ``vllm`` backend's validation)."""
    if backend == "sampler":
        return sample_batch(model, tokenizer, prompts, answers, **sampling)
    return generate_batch(
        model, tokenizer, prompts, answers, measure_entropy=measure_entropy, **sampling
    )


def collect_rollouts(
    model: Any,
    tokenizer: Any,
    data: TaskData,
    cfg: TrainConfig,
    engine: Any = None,
) -> tuple[Batch, dict[str, float]]:
    """Sample, score and (with dynamic sampling) filter until the step's batch is full.

    ``engine`` (``rollout.backend=vllm``: a :class:`qae.train.vllm_rollout.VLLMRollout`) samples
    instead of ``generate``, after taking the model's current weights. Raises
    :class:`qae.rewards.RewardFailure` once the reward function has failed on every
    response of ``data.reward_fail_steps`` steps in a row.
    """
    r = cfg.rollout
    t_sync = 0.0
    if engine is not None:  # the engine samples from this step's weights
        t0 = time.perf_counter()
        engine.sync_weights(model)
        t_sync = time.perf_counter() - t0
    kept: list[Batch] = []
    groups = rounds = generated = 0
    score_sum = scored = 0.0
    ent_sum = ent_tokens = 0.0  # sampling entropy of every generated response
    t_gen = t_score = 0.0
    reward_stats: dict[str, Any] = {}
    while rounds < r.max_gen_batches:
        records = data.train.take(r.prompts_per_round or r.prompts_per_step)
        t0 = time.perf_counter()
        prompts = [data.format_prompt(x) for x in records]
        answers = [x.answer for x in records]
        sampling = dict(
            group_size=r.group_size,
            temperature=r.temperature,
            top_p=r.top_p,
            max_new_tokens=data.max_new_tokens,
        )
        if engine is not None:
            batch = engine.generate(prompts, answers, **sampling)
        else:
            batch = sample_with_model(
                model,
                tokenizer,
                prompts,
                answers,
                backend=r.backend,
                batch_size=r.generation_batch_size,
                measure_entropy=r.measure_entropy,
                **sampling,
            )
        t1 = time.perf_counter()
        batch = score_batch(batch, data.reward, reward_stats)
        t_score += time.perf_counter() - t1
        t_gen += t1 - t0
        rounds += 1
        generated += len(batch)
        finite = batch.scores[~torch.isnan(batch.scores)]
        score_sum += float(finite.sum())
        scored += finite.numel()
        if batch.sample_entropy:
            ent_sum += sum(batch.sample_entropy)
            ent_tokens += float(batch.response_lengths().sum())
        if r.dynamic_sampling:
            batch = keep_informative_groups(batch)
        kept.append(batch)
        groups += batch.num_groups
        if groups >= r.prompts_per_step or not r.dynamic_sampling:
            break
    if data.reward_streak is not None:  # lives across steps, with the reward function
        failed = reward_stats.get("errors", 0) + reward_stats.get("timeouts", 0)
        data.reward_streak.update(
            reward_stats.get("scored", 0), failed, reward_stats.get("example")
        )
    batch = take_groups(concat_batches(kept), r.prompts_per_step)
    info = {
        "rollout/gen_rounds": rounds,
        "rollout/generated": generated,
        "rollout/groups_kept": batch.num_groups,
        "rollout/accuracy_all": score_sum / scored if scored else 0.0,
        "reward/errors": reward_stats.get("errors", 0),
        "reward/timeouts": reward_stats.get("timeouts", 0),
        "reward/unscorable": reward_stats.get("unscorable", 0),
        "time/generate": t_gen,
        "time/score": t_score,
    }
    if engine is not None:
        info["time/weight_sync"] = t_sync
    if ent_tokens:  # token-mean over everything sampled, kept by dynamic sampling or not
        info["rollout/entropy"] = ent_sum / ent_tokens
    return batch, info


def shape_rewards(batch: Batch, cfg: TrainConfig, max_new_tokens: int) -> Batch:
    r = cfg.rollout
    if r.overlong == "penalty":
        buffer = min(r.overlong_buffer, max_new_tokens)
        return overlong_penalty(
            batch, max_len=max_new_tokens, buffer=buffer, factor=r.overlong_factor
        )
    if r.overlong == "mask":
        return mask_truncated(batch)
    return batch


# --------------------------------------------------------------------------------------
# Validation


@torch.no_grad()
def validate(model: Any, tokenizer: Any, data: TaskData, cfg: TrainConfig) -> dict[str, float]:
    """mean@n, pass@k (unbiased) and per-difficulty accuracy on the validation records."""
    from qae.eval.metrics import pass_at_k

    if not data.val or not cfg.eval.enabled:
        return {}
    e = cfg.eval
    state = torch.get_rng_state()  # validation must not move the training RNG
    torch.manual_seed(cfg.trainer.seed + 12345)
    try:
        batch = sample_with_model(
            model,
            tokenizer,
            [data.format_prompt(x) for x in data.val],
            [x.answer for x in data.val],
            backend=cfg.rollout.backend,
            group_size=e.n,
            temperature=e.temperature,
            top_p=e.top_p,
            max_new_tokens=data.max_new_tokens,
            batch_size=cfg.rollout.generation_batch_size,
            measure_entropy=False,
        )
    finally:
        torch.set_rng_state(state)
    batch = score_batch(batch, data.reward)
    correct = torch.nan_to_num(batch.scores, nan=0.0).view(len(data.val), e.n)  # [P, n]
    c = (correct > 0.5).sum(1).tolist()
    out = {"val/mean@n": float(correct.mean())}
    for k in e.ks:
        out[f"val/pass@{k}"] = float(np.mean([pass_at_k(e.n, ci, k) for ci in c]))
    levels = sorted({x.meta.get("difficulty") for x in data.val} - {None})
    for lvl in levels:
        rows = [i for i, x in enumerate(data.val) if x.meta.get("difficulty") == lvl]
        out[f"val/mean@n_d{lvl}"] = float(correct[rows].mean())
    out["val/response_len"] = float(batch.response_lengths().float().mean())
    return out


# --------------------------------------------------------------------------------------
# The loop


@dataclass
class TrainResult:
    """What a finished run returns: its directory and headline numbers."""

    run_dir: Path
    steps: int
    val_before: dict[str, float] = field(default_factory=dict)
    val_after: dict[str, float] = field(default_factory=dict)
    last_metrics: dict[str, float] = field(default_factory=dict)


def _state_dict(
    optimizer: Any, scheduler: Any, data: TaskData, kctrl: KController, history: RunHistory
) -> dict[str, Any]:
    """Everything besides the weights that a resumed run needs to continue exactly."""
    return {
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "torch_rng": torch.get_rng_state(),
        "python_rng": random.getstate(),
        "consumed": data.train.consumed,
        "kcontrol": kctrl.state_dict(),
        "history": history.state_dict(),
    }


def _restore_state(
    state: dict[str, Any],
    optimizer: Any,
    scheduler: Any,
    data: TaskData,
    kctrl: KController,
    history: RunHistory,
) -> None:
    """The inverse of :func:`_state_dict`."""
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["torch_rng"])
    random.setstate(state["python_rng"])
    data.train.consumed = int(state["consumed"])
    kctrl.load_state_dict(state["kcontrol"])
    history.load_state_dict(state["history"])


def _progress_fields(metrics: dict[str, float]) -> dict[str, str]:
    """The progress bar's fields (see the quickstart's table)."""
    return {
        "reward": f"{metrics.get('reward/mean', 0):.2f}",
        "acc": f"{metrics.get('rollout/accuracy_all', 0):.2f}",
        "ent": f"{metrics.get('actor/entropy', 0):.3f}",
        "zero_adv": f"{metrics.get('adv/frac_zero_adv', 0):.2f}",
    }


@dataclass
class _Reached:
    """How far a run got, for the message of a run that stops early."""

    step: int = 0
    checkpoint: int | None = None
    looping: bool = False


def _check_run_config(cfg: TrainConfig) -> None:
    """Settings that only make sense together."""
    if cfg.rollout.group_size < 2 and cfg.algo.estimator in ("qae", "grpo", "drgrpo", "rloo"):
        raise ValueError(
            f"rollout.group_size={cfg.rollout.group_size}: the {cfg.algo.estimator!r} "
            f"estimator compares responses within a group and needs G >= 2"
        )
    if cfg.trainer.old_logprobs == "sampler" and cfg.rollout.backend != "sampler":
        raise ValueError(
            "trainer.old_logprobs='sampler' takes the log-probs the sampler recorded; it "
            f"needs rollout.backend='sampler', got rollout.backend={cfg.rollout.backend!r}"
        )


def _check_run_dir(run_dir: Path, ckpt: Checkpointer, resume: bool) -> None:
    """A fresh run needs a directory without a run; a resume needs a checkpoint."""
    has_metrics = (run_dir / "metrics.jsonl").exists()
    if not resume and has_metrics:
        raise ValueError(
            f"log.out={str(run_dir)!r} already holds a run; pass --resume to continue it "
            f"or choose another directory"
        )
    if resume and not ckpt.candidates():
        why = " (the run there stopped before its first checkpoint)" if has_metrics else ""
        raise ValueError(
            f"--resume: nothing to resume in log.out={str(run_dir)!r}: no checkpoint "
            f"{str(ckpt.root / 'step_*')!r}{why}; start without --resume in a new directory"
        )


def _check_input_bounds(model: Any, tokenizer: Any, data: TaskData, cfg: TrainConfig) -> None:
    """The response budget and every listed prompt must fit the model's context (a
    built-in task's endless stream is short by construction and not listed)."""
    from qae.eval.bounds import check_prompt_lengths, check_response_budget, context_length

    context = context_length(model)
    if context is None:
        return
    budget = f"rollout.max_new_tokens={data.max_new_tokens}"
    if not cfg.rollout.max_new_tokens:
        budget += " (0: the default)"
    limit = check_response_budget(data.max_new_tokens, context, budget=budget)
    for name, source, records in (
        ("data.train", cfg.data.train, data.train.records),
        ("data.val", cfg.data.val, data.val),
    ):
        if callable(records):
            continue
        prompts = (
            (f"{name}={source!r} row {i} (id {r.id!r})", data.format_prompt(r))
            for i, r in enumerate(records)
        )
        check_prompt_lengths(prompts, tokenizer, limit=limit, context=context, budget=budget)


def train(
    cfg: TrainConfig,
    *,
    resume: bool = False,
    on_step: Callable[[int, dict[str, float]], None] | None = None,
) -> TrainResult:
    """Run the RL loop of ``cfg``; ``resume`` continues from the run's newest whole
    checkpoint (a damaged newer one is set aside with a warning).

    The run directory is locked for the whole run: a second writer gets
    :class:`qae.io.errors.RunLockedError` naming the owner's PID. Ctrl-C raises
    :class:`qae.io.errors.TrainingInterrupted` (a ``KeyboardInterrupt``) and a failed write
    :class:`qae.io.errors.RunError`, both naming the step reached and the resume command.
    """
    _check_run_config(cfg)
    run_dir = Path(cfg.log.out)
    if resume and not run_dir.is_dir():
        raise ValueError(
            f"--resume: log.out={str(run_dir)!r} does not exist: there is no run to resume"
        )
    with RunLock(run_dir):
        remove_stale_temporaries(run_dir)
        reached = _Reached()
        try:
            return _train_locked(cfg, run_dir, resume, on_step, reached)
        except KeyboardInterrupt:
            if not reached.looping:
                raise
            raise TrainingInterrupted(cfg.log.out, reached.step, reached.checkpoint) from None
        except OSError as err:
            if not reached.looping:
                raise
            hint = resume_hint(cfg.log.out, reached.step, reached.checkpoint)
            raise RunError(f"{describe_os_error(err)}; {hint}") from err


def _train_locked(
    cfg: TrainConfig,
    run_dir: Path,
    resume: bool,
    on_step: Callable[[int, dict[str, float]], None] | None,
    reached: _Reached,
) -> TrainResult:
    """The body of :func:`train`, run while holding the run directory's lock; ``reached``
    follows the last step logged and the last checkpoint written."""
    ckpt = Checkpointer(run_dir, cfg.log.keep_last)
    _check_run_dir(run_dir, ckpt, resume)
    threads = ThreadPolicy(cfg.trainer.threads)
    seed_everything(cfg.trainer.seed)
    device = resolve_device(cfg.model.device)

    model, tokenizer = load_policy(cfg.model.path, device, cfg.model.dtype)
    state = resume_checkpoint(ckpt, model) if resume else None
    data = load_task_data(cfg, tokenizer)
    _check_input_bounds(model, tokenizer, data, cfg)  # before anything costly starts
    if cfg.model.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    engine = None
    if cfg.rollout.backend == "vllm":
        from qae.train.vllm_rollout import VLLMRollout

        engine = VLLMRollout.from_config(cfg, tokenizer, device)
    ref_model = None
    if cfg.loss.kl_coef > 0:
        ref_model, _ = load_policy(cfg.model.path, device, cfg.model.dtype)
        ref_model.requires_grad_(False)
    optimizer, scheduler = make_optimizer(model, cfg)
    kctrl = make_controller(cfg.kcontrol)
    history = RunHistory()
    pad_id = tokenizer.pad_token_id

    start = 0
    val_before: dict[str, float] = {}
    if state is not None:
        _restore_state(state, optimizer, scheduler, data, kctrl, history)
        start = int(state["step"])
        val_before = dict(state.get("val_before", {}))
        reached.step = reached.checkpoint = start
    save_yaml_config(cfg, run_dir / "config.yaml")
    logger = MetricsLogger(
        run_dir,
        resume_step=start if state is not None else None,
        tensorboard=cfg.log.tensorboard,
        wandb_project=cfg.log.wandb,
        mlflow_experiment=cfg.log.mlflow,
        config=config_to_dict(cfg),
    )
    progress = None
    if cfg.log.progress:
        from tqdm.auto import tqdm

        progress = tqdm(total=cfg.trainer.steps, initial=start, desc="qae train", unit="step")
    last: dict[str, float] = {}
    reached.looping = True
    try:
        if start == 0:
            val_before = validate(model, tokenizer, data, cfg)
            if val_before:
                logger.log(0, val_before)
        for step in range(start + 1, cfg.trainer.steps + 1):
            n_threads = threads.update()
            last = train_step(
                step,
                model,
                ref_model,
                tokenizer,
                optimizer,
                scheduler,
                data,
                cfg,
                device,
                pad_id,
                kctrl,
                history,
                run_dir,
                engine=engine,
            )
            last["perf/threads"] = float(n_threads)
            e = cfg.eval
            if e.every and step % e.every == 0 and step != cfg.trainer.steps:
                last.update(validate(model, tokenizer, data, cfg))
            if step == cfg.trainer.steps:
                last.update(validate(model, tokenizer, data, cfg))
            logger.log(step, last)
            reached.step = step
            every = cfg.log.checkpoint_every
            if step == cfg.trainer.steps or (every and step % every == 0):
                state = _state_dict(optimizer, scheduler, data, kctrl, history)
                ckpt.save(step, model, tokenizer, {"step": step, "val_before": val_before, **state})
                reached.checkpoint = step
            if on_step is not None:
                on_step(step, last)
            if progress is not None:
                progress.update(1)
                progress.set_postfix(_progress_fields(last))
    finally:
        if progress is not None:
            progress.close()
        logger.close()
    val_after = {k: v for k, v in last.items() if k.startswith("val/")}
    return TrainResult(run_dir, cfg.trainer.steps, val_before, val_after, last)


def step_advantages(
    batch: Batch, kctrl: KController, cfg: TrainConfig
) -> tuple[torch.Tensor, float | torch.Tensor, dict[str, float]]:
    """``(advantages [B], k, metrics)`` of a step's batch: the registered estimator at the
    K the controller gives (a float, or one per response), and the ``adv/*`` metrics."""
    a = cfg.algo
    k = kctrl.batch_k(batch.rewards, batch.group_ids)
    adv = compute_advantages(
        batch.rewards,
        batch.group_ids,
        a.estimator,
        k=k,
        quantile_method=a.quantile_method,
        scale=a.scale or None,
        eps=a.eps,
        singleton=a.singleton,
        nan="unscorable",
        keep=a.keep,
    )
    stats = advantage_stats(
        adv,
        batch.rewards,
        batch.group_ids,
        k=k,
        quantile_method=a.quantile_method,
        nan="unscorable",
    )
    metrics = {f"adv/{name}": v for name, v in stats.items()}
    metrics["adv/k"] = float(k.mean()) if isinstance(k, torch.Tensor) else float(k)
    metrics["adv/abs_mean"] = float(adv.abs().mean())
    return adv, k, metrics


def _sampling_logprobs(
    model: Any,
    ref_model: Any,
    batch: Batch,
    scored: Sequence[int],
    pad_id: int,
    cfg: TrainConfig,
    device: torch.device,
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """``(old_logp, old_entropy, ref_logp)``, each ``[B, T]`` or None: the sampling
    policy's numbers for the ``scored`` rows, computed before the update only when the
    update itself cannot provide them (several mini-batches or epochs), and the reference
    model's for every row when there is one."""
    b = len(batch)
    old_logp = old_ent = ref_logp = None
    if _uses_sampler_logprobs(cfg):
        old_logp, old_ent = _recorded_logprobs(batch)
    elif cfg.trainer.ppo_epochs * cfg.trainer.mini_batches != 1:
        old_logp, old_ent = scatter_rows(
            batch_logprobs(model, batch, scored, pad_id, cfg, device), scored, b
        )
    if ref_model is not None:
        rows = list(range(b))
        ref_logp, _ = scatter_rows(
            batch_logprobs(ref_model, batch, rows, pad_id, cfg, device), rows, b
        )
    return old_logp, old_ent, ref_logp


def _uses_sampler_logprobs(cfg: TrainConfig) -> bool:
    """``trainer.old_logprobs`` resolved: ``auto`` takes the sampler's when it records them."""
    choice = cfg.trainer.old_logprobs
    return choice == "sampler" or (choice == "auto" and cfg.rollout.backend == "sampler")


def _recorded_logprobs(batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    """``(logp [B, T], entropy [B, T])`` as the sampler recorded them (0 past each
    response's end)."""
    if len(batch.sample_logprobs) != len(batch) or len(batch.sample_token_entropy) != len(batch):
        raise ValueError(
            "trainer.old_logprobs='sampler' needs the log-probs recorded while sampling; "
            "use rollout.backend='sampler' (this batch has none)"
        )
    width = max(1, max((len(r) for r in batch.response_ids), default=1))
    logp = torch.zeros(len(batch), width)
    ent = torch.zeros(len(batch), width)
    for i, (lp, en) in enumerate(
        zip(batch.sample_logprobs, batch.sample_token_entropy, strict=True)
    ):
        logp[i, : len(lp)] = torch.tensor(lp)
        ent[i, : len(en)] = torch.tensor(en)
    return logp, ent


def _batch_metrics(batch: Batch) -> dict[str, float]:
    """Reward, accuracy and length metrics of the responses the step trained on."""
    lengths = batch.response_lengths()
    finite = batch.rewards[~torch.isnan(batch.rewards)]
    scores = batch.scores[~torch.isnan(batch.scores)]
    return {
        "reward/mean": float(finite.mean()) if finite.numel() else 0.0,
        "reward/accuracy": float(scores.mean()) if scores.numel() else 0.0,
        "response/len_mean": float(lengths.float().mean()),
        "response/len_max": float(lengths.max()),
        "response/truncated": float(batch.truncated.float().mean()),
    }


def train_step(
    step: int,
    model: Any,
    ref_model: Any,
    tokenizer: Any,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    data: TaskData,
    cfg: TrainConfig,
    device: torch.device,
    pad_id: int,
    kctrl: KController,
    history: RunHistory | None = None,
    run_dir: Path | None = None,
    engine: Any = None,
) -> dict[str, float]:
    """One rollout-score-advantage-update step; returns its metrics.

    The K controller gives this step's K (a float, or one per group) and is updated with
    the step's entropy and sparsity afterwards.
    """
    t_start = time.perf_counter()
    batch, metrics = collect_rollouts(model, tokenizer, data, cfg, engine)
    batch = shape_rewards(batch, cfg, data.max_new_tokens)
    b = len(batch)
    metrics["batch/responses"] = b
    if b == 0:
        metrics["train/skipped"] = 1
        metrics["time/step"] = time.perf_counter() - t_start
        return metrics
    adv, k, adv_metrics = step_advantages(batch, kctrl, cfg)
    metrics.update(adv_metrics)
    every = cfg.trainer.diagnostics_every
    if history is not None and every and step % every == 0:
        metrics.update(token_diagnostics(model, batch, adv, pad_id, cfg, device, step, run_dir))

    t0 = time.perf_counter()
    rows = list(range(b))
    skip = skip_is_exact(cfg)
    # Rows whose numbers anything needs: the updated ones, or all for full-batch metrics.
    scored = rows
    if skip and not cfg.trainer.full_batch_metrics:
        scored = active_rows(batch, rows, adv, skip)
    old_logp, old_ent, ref_logp = _sampling_logprobs(
        model, ref_model, batch, scored, pad_id, cfg, device
    )
    metrics["time/logprob"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    upd, fresh_logp, fresh_ent = update_policy(
        model, optimizer, scheduler, batch, adv, old_logp, ref_logp, pad_id, cfg, device, step
    )
    metrics["time/train"] = time.perf_counter() - t0
    metrics.update(upd)
    if old_logp is None:  # one on-policy update: its own forward pass gave them
        old_logp, old_ent = fresh_logp, fresh_ent

    width = old_logp.shape[1]
    lengths = batch.response_lengths()
    full_mask = torch.zeros(b, width)  # response tokens whose numbers were computed
    for i in scored:
        full_mask[i, : int(lengths[i])] = 1.0
    mask = token_mask(batch, rows, width) * full_mask  # ... that take part in the loss
    updated = active_rows(batch, rows, adv, skip)
    metrics["update/tokens_skipped"] = float(lengths.sum()) - sum(
        len(batch.response_ids[i]) for i in updated
    )
    adv_tok = broadcast_to_tokens(adv.float(), mask)
    metrics["actor/entropy"] = float(masked_mean(old_ent, full_mask))
    metrics["actor/entropy_change_pred"] = (
        float(entropy_change_predictor(old_logp, adv_tok, mask)) if mask.sum() > 0 else 0.0
    )
    metrics.update(_batch_metrics(batch))
    if history is not None:
        attribution_metrics(metrics, history, batch, adv, old_logp, adv_tok, mask, k, cfg)
    step_time = time.perf_counter() - t_start
    metrics["time/step"] = step_time
    metrics["perf/tokens_per_s"] = float(lengths.sum()) / step_time
    kctrl.update(
        {
            "step": step,
            "entropy": metrics["actor/entropy"],
            "frac_zero_adv": metrics["adv/frac_zero_adv"],
        }
    )
    metrics.update({f"kcontrol/{name}": v for name, v in kctrl.metrics().items()})
    return metrics
