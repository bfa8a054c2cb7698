"""Per-step diagnostics measured on the policy during training: covariance attribution by
advantage sign and by regime, measured entropy change and its tracking of the
first-order prediction, token views (share of gradient on high-entropy tokens).

The math lives in :mod:`qae.core.diagnostics`; this module runs the model for it.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from qae.core.advantages import broadcast_to_tokens, group_regimes
from qae.core.diagnostics import (
    covariance_parts,
    entropy_histogram,
    length_volatility,
    regime_token_masks,
    sign_token_masks,
    token_views,
    tracking,
)
from qae.io.runlog import atomic_write_text
from qae.train.config import TrainConfig
from qae.train.rollout import Batch, collate

__all__ = ["RunHistory", "attribution_metrics", "token_diagnostics", "token_level_views"]


@dataclass
class RunHistory:
    """Per-run series the diagnostics need across steps (saved in checkpoints)."""

    prev_entropy: float | None = None
    predicted: list[float] = field(default_factory=list)  # -Cov(logp, A) at step t
    measured: list[float] = field(default_factory=list)  # H(t+1) - H(t)
    lengths: list[float] = field(default_factory=list)
    pending: float | None = None  # prediction of the last step, awaiting its measurement

    def state_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for k, v in state.items():
            setattr(self, k, v)


@torch.no_grad()
def token_level_views(
    model: Any, batch: Batch, advantages: torch.Tensor, pad_id: int, cfg: TrainConfig, device
) -> tuple[dict[str, float], torch.Tensor, torch.Tensor]:
    """Token views from a forward pass without gradient over the whole batch.

    The gradient norm of a token's loss w.r.t. its logits is, on-policy and unclipped,
    ``|A| * ||onehot(y) - pi||_2 = |A| * sqrt(1 - 2 pi_y + sum_v pi_v^2)``.

    Returns the views (:func:`qae.core.diagnostics.token_views`), ``entropy [B, T]``, ``mask``.
    """
    b = len(batch)
    width = max((len(r) for r in batch.response_ids), default=1)
    entropy = torch.zeros(b, width)
    gnorm = torch.zeros(b, width)
    for start in range(0, b, cfg.trainer.micro_batch_size):
        mb = list(range(start, min(b, start + cfg.trainer.micro_batch_size)))
        inputs = collate(
            [batch.prompt_ids[i] for i in mb], [batch.response_ids[i] for i in mb], pad_id, device
        )
        logits = model(
            input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], use_cache=False
        ).logits
        pos = inputs["positions"]
        picked = logits.gather(1, pos[..., None].expand(-1, -1, logits.shape[-1])).float()
        picked = picked / (cfg.rollout.temperature or 1.0)  # [b, T, V]
        w = pos.shape[1]
        m = inputs["response_mask"].cpu()  # [b, T]
        flat = picked.reshape(-1, picked.shape[-1])  # [b*T, V]
        tgt = inputs["targets"].reshape(-1)
        ent = torch.empty(flat.shape[0])
        p_y = torch.empty(flat.shape[0])
        sq = torch.empty(flat.shape[0])
        rows = max(1, (1 << 22) // flat.shape[-1])  # bounds the softmax held at once
        for a in range(0, flat.shape[0], rows):
            log_pi = torch.log_softmax(flat[a : a + rows], dim=-1)  # [rows, V]
            ent[a : a + rows] = -(log_pi.exp() * log_pi).sum(-1).cpu()
            p_y[a : a + rows] = log_pi.gather(-1, tgt[a : a + rows, None]).squeeze(-1).exp().cpu()
            sq[a : a + rows] = torch.logsumexp(2 * log_pi, dim=-1).exp().cpu()  # sum pi^2
        ent, p_y, sq = (x.view(len(mb), w) for x in (ent, p_y, sq))
        idx = torch.tensor(mb)
        entropy[idx, :w] = ent.cpu() * m
        gnorm[idx, :w] = (1 - 2 * p_y + sq).clamp_min(0).sqrt().cpu() * m
    mask = torch.zeros(b, width)
    for i, resp in enumerate(batch.response_ids):
        mask[i, : len(resp)] = 1.0
    adv_tok = broadcast_to_tokens(advantages.float(), mask)
    views = token_views(entropy, adv_tok, mask, gnorm * adv_tok.abs())
    return views, entropy, mask


def attribution_metrics(
    metrics: dict[str, float],
    history: RunHistory,
    batch: Batch,
    adv: torch.Tensor,
    old_logp: torch.Tensor,
    adv_tok: torch.Tensor,
    mask: torch.Tensor,
    k: float | torch.Tensor,
    cfg: TrainConfig,
) -> None:
    """Covariance parts by sign and regime, measured entropy change, tracking, volatility."""
    by_sign = covariance_parts(old_logp, adv_tok, mask, sign_token_masks(adv_tok, mask))
    regimes = group_regimes(
        batch.rewards, batch.group_ids, k=k, quantile_method=cfg.algo.quantile_method
    )
    by_regime = covariance_parts(old_logp, adv_tok, mask, regime_token_masks(regimes, mask))
    metrics["entropy/cov_total"] = by_sign["total"]
    for name in ("pos", "neg", "zero"):
        metrics[f"entropy/cov_{name}"] = by_sign[name]
    for name in ("hard", "easy", "other"):
        metrics[f"entropy/cov_{name}"] = by_regime[name]
    entropy = metrics["actor/entropy"]
    if history.prev_entropy is not None:
        change = entropy - history.prev_entropy
        metrics["entropy/measured_change"] = change
        if history.pending is not None:
            history.predicted.append(history.pending)
            history.measured.append(change)
    history.prev_entropy = entropy
    history.pending = -by_sign["total"]  # first order: dH ~ -lr * Cov(logp, A)
    if len(history.measured) >= 3:
        track = tracking(history.predicted, history.measured)
        metrics["entropy/track_corr"] = track["corr"]
        metrics["entropy/track_sign_agreement"] = track["sign_agreement"]
    history.lengths.append(metrics["response/len_mean"])
    history.lengths = history.lengths[-20:]
    metrics["response/len_volatility"] = length_volatility(history.lengths, 20)


def token_diagnostics(
    model: Any,
    batch: Batch,
    advantages: torch.Tensor,
    pad_id: int,
    cfg: TrainConfig,
    device: torch.device,
    step: int,
    run_dir: Path | None = None,
) -> dict[str, float]:
    """The ``tokens/*`` views of a step (:func:`token_level_views`); with ``run_dir``, the
    step's token-entropy histogram is written to ``entropy_hist/step_<step>.json``."""
    views, ent_tok, ent_mask = token_level_views(model, batch, advantages, pad_id, cfg, device)
    if run_dir is not None:
        hist = entropy_histogram(ent_tok, ent_mask, bins=20)
        atomic_write_text(
            Path(run_dir) / "entropy_hist" / f"step_{step:06d}.json", json.dumps(hist) + "\n"
        )
    return {f"tokens/{name}": v for name, v in views.items()}
