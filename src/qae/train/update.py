"""The update phase of a training step: log-probs, gradient accumulation, optimizer steps.

Shapes: B responses in the step's batch, b rows of a micro-batch, T response tokens.

Rows whose advantage is exactly zero leave the forward/backward when that is exact
(:func:`skip_is_exact`): their loss is zero under every clip, and they still count in the
loss's denominator, so the gradient is the same with or without them.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from qae.core.advantages import broadcast_to_tokens
from qae.core.losses import batch_counts, compute_policy_loss
from qae.train.config import TrainConfig
from qae.train.rollout import Batch, collate, response_logprobs

__all__ = [
    "accumulate_gradients",
    "active_rows",
    "batch_logprobs",
    "scatter_rows",
    "skip_is_exact",
    "token_mask",
    "update_policy",
]


def _micro_batches(rows: Sequence[int], size: int) -> list[list[int]]:
    return [list(rows[i : i + size]) for i in range(0, len(rows), size)]


@torch.no_grad()
def batch_logprobs(
    model: Any, batch: Batch, rows: Sequence[int], pad_id: int, cfg: TrainConfig, device
) -> tuple[torch.Tensor, torch.Tensor]:
    """``logp [B, T]`` and ``entropy [B, T]`` of the given rows, no gradient."""
    t = max((len(batch.response_ids[i]) for i in rows), default=1)
    logp = torch.zeros(len(rows), max(t, 1))
    ent = torch.zeros(len(rows), max(t, 1))
    for chunk_start in range(0, len(rows), cfg.trainer.micro_batch_size):
        chunk = rows[chunk_start : chunk_start + cfg.trainer.micro_batch_size]
        inputs = collate(
            [batch.prompt_ids[i] for i in chunk],
            [batch.response_ids[i] for i in chunk],
            pad_id,
            device,
        )
        with _autocast(device):
            lp, en = response_logprobs(
                model, inputs, with_entropy=True, temperature=cfg.rollout.temperature or 1.0
            )
        w = lp.shape[1]
        logp[chunk_start : chunk_start + len(chunk), :w] = lp.float().cpu()
        ent[chunk_start : chunk_start + len(chunk), :w] = en.float().cpu()
    return logp, ent


def scatter_rows(
    pair: tuple[torch.Tensor, torch.Tensor], rows: Sequence[int], b: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Place ``[len(rows), T]`` results at their rows of ``[B, T]`` zeros."""
    out = []
    for x in pair:
        full = torch.zeros(b, x.shape[1])
        if rows:
            full[torch.tensor(list(rows))] = x
        out.append(full)
    return out[0], out[1]


def _autocast(device: torch.device):
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return torch.autocast("cpu", enabled=False)


def token_mask(batch: Batch, rows: Sequence[int], width: int) -> torch.Tensor:
    """``[b, width]`` float mask of response tokens of rows that take part in the loss."""
    mask = torch.zeros(len(rows), width)
    for j, i in enumerate(rows):
        if batch.loss_rows[i]:
            mask[j, : len(batch.response_ids[i])] = 1.0
    return mask


def skip_is_exact(cfg: TrainConfig) -> bool:
    """Whether zero-advantage rows can leave the update without changing the gradient.

    True for the ``ppo`` and ``gspo`` losses without KL or entropy terms: a token with
    advantage 0 has loss 0 under every clip, so its row adds nothing but its count to the
    denominator (taken from the full mini-batch). Clip-Cov / KL-Cov pick tokens by
    statistics over all rows, and the KL / entropy terms have gradients on every row, so
    with those every row stays in the update.
    """
    lc = cfg.loss
    return (
        cfg.trainer.skip_zero_adv
        and lc.loss in ("ppo", "gspo")
        and lc.kl_coef == 0
        and lc.entropy_coef == 0
    )


def active_rows(
    batch: Batch, rows: Sequence[int], advantages: torch.Tensor, skip: bool
) -> list[int]:
    """Rows that take part in the forward/backward: all loss rows, or (skipping) those
    with a non-zero advantage."""
    nonzero = (advantages != 0).tolist()
    loss_rows = batch.loss_rows.tolist()
    return [
        i
        for i in rows
        if loss_rows[i] and len(batch.response_ids[i]) > 0 and (not skip or nonzero[i])
    ]


def accumulate_gradients(
    model: Any,
    batch: Batch,
    rows: Sequence[int],
    advantages: torch.Tensor,
    old_logp: torch.Tensor | None,
    ref_logp: torch.Tensor | None,
    pad_id: int,
    cfg: TrainConfig,
    device: torch.device,
    generator: torch.Generator,
    *,
    skip: bool,
    fresh: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[dict[str, float], int]:
    """Backward of one mini-batch's loss (no optimizer step); returns metrics, rows run.

    The loss is normalised by the counts of the whole mini-batch (``rows``), so summing
    micro-batches, and leaving zero-advantage rows out (``skip``), give the gradient of
    the full mini-batch loss. ``old_logp`` None means on-policy: the forward pass itself
    provides the sampling policy's log-probs, written into ``fresh`` (logp, entropy).
    """
    width = max((len(batch.response_ids[i]) for i in rows), default=1)
    denom = batch_counts(token_mask(batch, rows, width))
    active = active_rows(batch, rows, advantages, skip)
    loss_cfg = cfg.loss
    if loss_cfg.max_len is None:  # a fixed Dr. GRPO normaliser, whatever the packing
        loss_cfg = dataclasses.replace(loss_cfg, max_len=max(width, 1))
    sums: dict[str, float] = {}
    tokens_seen = 0.0
    for mb in _micro_batches(active, cfg.trainer.micro_batch_size):
        inputs = collate(
            [batch.prompt_ids[i] for i in mb], [batch.response_ids[i] for i in mb], pad_id, device
        )
        w = inputs["targets"].shape[1]
        mask = token_mask(batch, mb, w).to(device)  # [b, T]
        with _autocast(device):
            logp, ent = response_logprobs(
                model,
                inputs,
                with_entropy=True,
                entropy_grad=loss_cfg.entropy_coef > 0,
                temperature=cfg.rollout.temperature or 1.0,
            )
        if logp.dtype in (torch.float16, torch.bfloat16):  # autocast: losses in float32
            logp, ent = logp.float(), ent.float()  # [b, T]
        idx = torch.tensor(mb)
        if old_logp is None:
            old = logp.detach()
            if fresh is not None:
                fresh[0][idx, :w] = old.cpu()
                fresh[1][idx, :w] = ent.detach().cpu()
        else:
            old = old_logp[idx, :w].to(device)
        ref = ref_logp[idx, :w].to(device) if ref_logp is not None else None
        adv_tok = broadcast_to_tokens(advantages[idx].to(device, logp.dtype), mask)  # [b, T]
        loss, metrics = compute_policy_loss(
            logp,
            old,
            adv_tok,
            mask,
            config=loss_cfg,
            ref_logp=ref,
            entropy=ent,
            denominator=denom,
            generator=generator,
        )
        if loss.requires_grad:
            loss.backward()
        n_tok = float(mask.sum())
        tokens_seen += n_tok
        for k, v in metrics.items():
            if k in ("loss", "pg_loss", "num_tokens", "cov_tokens"):
                sums[k] = sums.get(k, 0.0) + v  # partial sums over the global denominator
            else:
                sums[k] = sums.get(k, 0.0) + v * n_tok  # token-weighted means
    out = {
        k: (v if k in ("loss", "pg_loss", "num_tokens", "cov_tokens") else v / tokens_seen)
        for k, v in sums.items()
        if tokens_seen > 0 or k in ("loss", "pg_loss")
    }
    out.setdefault("loss", 0.0)
    out.setdefault("pg_loss", 0.0)
    return out, len(active)


def update_policy(
    model: Any,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    batch: Batch,
    advantages: torch.Tensor,
    old_logp: torch.Tensor | None,
    ref_logp: torch.Tensor | None,
    pad_id: int,
    cfg: TrainConfig,
    device: torch.device,
    step: int,
) -> tuple[dict[str, float], torch.Tensor | None, torch.Tensor | None]:
    """PPO epochs over mini-batches of groups; returns metrics (and on-policy log-probs).

    When ``old_logp`` is None (one epoch, one mini-batch) the update's forward pass gives
    the sampling policy's log-probs and entropies, returned for the metrics; rows the
    update skips get them from a forward pass without gradient when
    ``trainer.full_batch_metrics`` asks for them (and stay 0 otherwise).
    """
    tr = cfg.trainer
    b = len(batch)
    width = max((len(r) for r in batch.response_ids), default=1)
    group_list = torch.unique(batch.group_ids).tolist()
    gen = torch.Generator().manual_seed(tr.seed * 1_000_003 + step)
    skip = skip_is_exact(cfg)
    fresh = None
    if old_logp is None:
        fresh = (torch.zeros(b, width), torch.zeros(b, width))
        if tr.full_batch_metrics:
            updated = set(active_rows(batch, range(b), advantages, skip))
            rest = [i for i in range(b) if i not in updated]
            if rest:  # before the step: these are the sampling policy's numbers
                lp, en = batch_logprobs(model, batch, rest, pad_id, cfg, device)
                idx = torch.tensor(rest)
                fresh[0][idx, : lp.shape[1]] = lp
                fresh[1][idx, : en.shape[1]] = en
    totals: dict[str, float] = {}
    weights: dict[str, float] = {}
    grad_norms: list[float] = []
    rows_run = 0
    rows_total = 0
    for _epoch in range(tr.ppo_epochs):
        order = torch.randperm(len(group_list), generator=gen).tolist()
        if tr.ppo_epochs * tr.mini_batches == 1:
            order = list(range(len(group_list)))
        for split in np.array_split(np.array(order, dtype=np.int64), tr.mini_batches):
            chosen = {group_list[i] for i in split.tolist()}
            rows = [i for i in range(b) if int(batch.group_ids[i]) in chosen]
            if not rows:
                continue
            optimizer.zero_grad(set_to_none=True)
            metrics, n_run = accumulate_gradients(
                model,
                batch,
                rows,
                advantages,
                old_logp,
                ref_logp,
                pad_id,
                cfg,
                device,
                gen,
                skip=skip,
                fresh=fresh,
            )
            rows_run += n_run
            rows_total += len(rows)
            n_tok = metrics.get("num_tokens", 0.0)
            for k, v in metrics.items():
                w = 1.0 if k in ("loss", "pg_loss", "num_tokens", "cov_tokens") else n_tok
                totals[k] = totals.get(k, 0.0) + v * w
                weights[k] = weights.get(k, 0.0) + w
            params = [p for p in model.parameters() if p.grad is not None]
            if cfg.optim.grad_clip > 0:
                norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip)
            else:
                norm = torch.nn.utils.get_total_norm([p.grad for p in params])
            grad_norms.append(float(norm) if params else 0.0)
            optimizer.step()
            scheduler.step()
    out = {f"train/{k}": totals[k] / weights[k] for k in totals if weights[k] > 0}
    out["train/grad_norm"] = float(np.mean(grad_norms)) if grad_norms else 0.0
    out["train/lr"] = scheduler.get_last_lr()[0]
    out["train/optimizer_steps"] = len(grad_norms)
    out["update/skip_active"] = float(skip)
    out["update/rows_skipped"] = float(rows_total - rows_run)
    out["update/rows_skipped_frac"] = (rows_total - rows_run) / rows_total if rows_total else 0.0
    if fresh is None:
        return out, None, None
    return out, fresh[0], fresh[1]
