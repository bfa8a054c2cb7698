"""QAE in TRL: ``GRPOTrainer`` with any registered advantage estimator.

TRL computes GRPO's group-mean advantage inline in
``GRPOTrainer._generate_and_score_completions``, with no hook to replace it. This module
keeps that method whole and corrects its output:

1. ``_calculate_rewards`` runs unchanged (every reward function, ``None`` -> NaN, gather
   across processes) and its gathered ``[N, F]`` result is kept on the trainer;
2. after TRL's method returns, the advantages are recomputed from those gathered rewards
   with :func:`qae.compute_advantages`, sliced to this process's rows the way TRL slices
   them, and written over ``output["advantages"]`` and TRL's logged advantage column;
3. our statistics (zero-advantage fraction, regime counts, K) go into TRL's metrics
   under ``qae/...``, so they reach every ``report_to`` backend with TRL's own.

What is kept from TRL: the reward functions and their weights (``reward_weights``, summed
as in ``multi_objective_aggregation="sum_then_normalize"``), unscorable completions
(a reward of ``None`` from every function -> NaN, excluded from the baseline,
advantage 0), ``scale_rewards`` (``group`` / ``batch`` / ``none``, used as
``compute_advantages``' ``scale``), the group layout (consecutive ``num_generations``
rows of the gathered batch form one group) and all of TRL's logging. The std epsilon
defaults to TRL's 1e-4, so ``estimator="grpo"`` reproduces TRL's own advantages.

Departures from TRL: ``multi_objective_aggregation="normalize_then_sum"`` (which
normalises over the whole batch, with no group baseline to replace) is refused; an
all-equal group gets exactly 0 (TRL divides float residue by ``std + 1e-4``).

The methods overridden are private TRL methods, so the supported TRL versions are pinned
(:data:`SUPPORTED_TRL`); constructing the trainer with another version raises.

K control: with ``qae_kcontrol``, a :mod:`qae.kcontrol` controller gives K at every
generation and is updated, before the next training generation, with the mean token
entropy TRL logged over the optimizer steps in between and the zero-advantage fraction
of the previous generation. Every process computes the same advantages from the same
gathered rewards and reads the same globally reduced entropy, so the controllers of all
processes stay equal. Its state is saved as ``qae_kcontrol.json`` in each checkpoint
folder and read back when training resumes from one.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from typing import Any

import torch

from qae.core.advantages import advantage_stats, compute_advantages, estimators
from qae.io.atomic import atomic_write_json
from qae.kcontrol import KControlConfig, KController, make_controller

try:
    import trl
    from trl import GRPOTrainer
except ImportError as err:  # pragma: no cover - exercised only without the extra
    raise ImportError(
        "qae.integrations.trl needs TRL: pip install 'qae[trl]' (trl>=1.16,<1.17)"
    ) from err

__all__ = [
    "KCONTROL_FILE",
    "SUPPORTED_TRL",
    "QAEAdvantageMixin",
    "QAEGRPOTrainer",
    "check_trl_version",
]

SUPPORTED_TRL = ("1.16", "1.17")
"""TRL versions the overrides are tested against: ``>= SUPPORTED_TRL[0], < SUPPORTED_TRL[1]``."""

KCONTROL_FILE = "qae_kcontrol.json"
"""Name of the K controller's state file inside a TRL checkpoint folder."""

TRL_EPS = 1e-4  # TRL divides by (std + 1e-4)


def _release(version: str) -> tuple[int, ...]:
    """``"1.16.0.dev0"`` -> ``(1, 16, 0)``: the leading numeric release segments."""
    parts: list[int] = []
    for piece in version.split("."):
        digits = ""
        for ch in piece:
            if not ch.isdigit():
                break
            digits += ch
        if not digits:
            break
        parts.append(int(digits))
        if digits != piece:
            break
    return tuple(parts)


def check_trl_version(version: str | None = None) -> str:
    """Raise ``RuntimeError`` unless ``version`` (default: the installed TRL) is supported.

    Returns the version checked. The range is :data:`SUPPORTED_TRL`.
    """
    version = trl.__version__ if version is None else version
    lo, hi = (_release(v) for v in SUPPORTED_TRL)
    spec = f">={SUPPORTED_TRL[0]},<{SUPPORTED_TRL[1]}"
    if not lo <= _release(version) < hi:
        raise RuntimeError(
            f"qae.integrations.trl overrides private GRPOTrainer methods and supports "
            f"trl{spec}; installed trl=={version}. Install a supported version: "
            f"pip install 'trl{spec}'"
        )
    return version


class QAEAdvantageMixin:
    """Mixin for a ``GRPOTrainer`` (sub)class: replaces its advantages with a qae estimator.

    Put it first in the bases (``class T(QAEAdvantageMixin, GRPOTrainer)``). Keyword
    arguments, all optional, taken before the rest go to the TRL trainer:

    Args:
        qae_estimator: registered estimator name (``qae``, ``grpo``, ``rloo``, ...).
        qae_k: constant quantile level K in (0, 1); ignored when ``qae_kcontrol`` is set.
        qae_quantile_method: one of :data:`qae.QUANTILE_METHODS`.
        qae_kcontrol: a :class:`~qae.kcontrol.KControlConfig`, a mapping of its fields, or
            a ready controller; None = constant ``qae_k``.
        qae_eps: added to the std before dividing (TRL uses 1e-4).
    """

    def __init__(
        self,
        *args: Any,
        qae_estimator: str = "qae",
        qae_k: float = 0.4,
        qae_quantile_method: str = "inverted_cdf",
        qae_kcontrol: KControlConfig | Mapping[str, Any] | KController | None = None,
        qae_eps: float = TRL_EPS,
        **kwargs: Any,
    ) -> None:
        check_trl_version()
        estimators.get(qae_estimator)
        # Validate K, method and eps before the (slow) TRL set-up, with a one-response batch.
        compute_advantages(
            torch.zeros(1),
            [0],
            qae_estimator,
            k=qae_k,
            quantile_method=qae_quantile_method,
            eps=qae_eps,
        )
        if qae_kcontrol is None:
            controller = make_controller(KControlConfig(kind="constant", k=qae_k))
        elif isinstance(qae_kcontrol, KControlConfig):
            controller = make_controller(qae_kcontrol)
        elif isinstance(qae_kcontrol, Mapping):
            controller = make_controller(KControlConfig(**qae_kcontrol))
        elif isinstance(qae_kcontrol, KController):
            controller = qae_kcontrol
        else:
            raise ValueError(
                "qae_kcontrol must be a KControlConfig, a mapping of its fields, a K "
                f"controller or None, got {type(qae_kcontrol).__name__}"
            )
        self.qae_estimator = qae_estimator
        self.qae_quantile_method = qae_quantile_method
        self.qae_eps = float(qae_eps)
        self.qae_kcontrol: KController = controller
        self._qae_gathered: torch.Tensor | None = None
        self._qae_pending: dict[str, float] | None = None  # signals of the last train batch
        self._qae_entropy: list[float] = []
        self._qae_updates = 0
        self.qae_last: dict[str, Any] = {}
        super().__init__(*args, **kwargs)
        if self.multi_objective_aggregation != "sum_then_normalize":
            raise ValueError(
                f"multi_objective_aggregation={self.multi_objective_aggregation!r} is not "
                "supported with a qae estimator; use 'sum_then_normalize' (TRL's default)"
            )

    # --- TRL overrides -----------------------------------------------------------------

    def _calculate_rewards(self, inputs, prompts, completions, completion_ids_list):  # noqa: ANN001, ANN202
        gathered = super()._calculate_rewards(inputs, prompts, completions, completion_ids_list)
        self._qae_gathered = gathered  # [N, F], every process's rows
        return gathered

    def _generate_and_score_completions(self, inputs):  # noqa: ANN001, ANN202
        mode = "train" if self.model.training else "eval"
        if mode == "train":
            self._qae_update_controller()
        self._qae_gathered = None
        output = super()._generate_and_score_completions(inputs)
        gathered = self._qae_gathered
        if gathered is None:
            raise RuntimeError(
                "GRPOTrainer._generate_and_score_completions did not call _calculate_rewards; "
                f"this TRL version ({trl.__version__}) is not supported by qae.integrations.trl"
            )
        rewards = self._qae_rewards(gathered)  # [N]
        n_gen = self.num_generations if mode == "train" else self.num_generations_eval
        n_all = rewards.numel()
        group_ids = torch.arange(n_all, device=rewards.device) // n_gen  # [N]
        k = self.qae_kcontrol.batch_k(rewards, group_ids)
        adv_all = compute_advantages(
            rewards,
            group_ids,
            self.qae_estimator,
            k=k,
            quantile_method=self.qae_quantile_method,
            scale=self.scale_rewards,
            eps=self.qae_eps,
            singleton="zero",
            nan="unscorable",
        )  # [N]
        local = output["advantages"]
        start = self.accelerator.process_index * local.shape[0]
        mine = adv_all[start : start + local.shape[0]]
        if mine.shape != local.shape:
            raise RuntimeError(
                f"gathered rewards ({n_all}) do not cover process "
                f"{self.accelerator.process_index}'s {local.shape[0]} completions; "
                "unsupported GRPOTrainer layout"
            )
        output["advantages"] = mine.to(device=local.device, dtype=local.dtype)
        self._qae_log(mode, rewards, group_ids, adv_all, k)
        return output

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):  # noqa: ANN001, ANN201
        entropies = self._metrics["train"]["entropy"] if self.model.training else None
        before = len(entropies) if entropies is not None else 0
        loss = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        if entropies is not None and len(entropies) > before:
            self._qae_entropy.append(float(entropies[-1]))
        return loss

    def _save_checkpoint(self, model, trial):  # noqa: ANN001, ANN202
        super()._save_checkpoint(model, trial)
        if not self.accelerator.is_main_process:
            return
        folder = os.path.join(
            self._get_output_dir(trial=trial), f"checkpoint-{self.state.global_step}"
        )
        if os.path.isdir(folder):
            atomic_write_json(os.path.join(folder, KCONTROL_FILE), self.qae_state_dict())

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):  # noqa: ANN001, ANN202
        super()._load_from_checkpoint(resume_from_checkpoint, model)
        path = os.path.join(resume_from_checkpoint, KCONTROL_FILE)
        if os.path.isfile(path):
            with open(path, encoding="utf-8") as fh:
                self.qae_load_state_dict(json.load(fh))

    # --- our state -----------------------------------------------------------------------

    def qae_state_dict(self) -> dict[str, Any]:
        """The K controller's state and the pending signals, in plain Python types."""
        return {
            "kcontrol": self.qae_kcontrol.state_dict(),
            "updates": self._qae_updates,
            "pending": self._qae_pending,
            "entropy": list(self._qae_entropy),
        }

    def qae_load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`qae_state_dict`'s output."""
        self.qae_kcontrol.load_state_dict(state["kcontrol"])
        self._qae_updates = int(state["updates"])
        pending = state.get("pending")
        self._qae_pending = None if pending is None else {k: float(v) for k, v in pending.items()}
        self._qae_entropy = [float(x) for x in state.get("entropy", [])]

    def _qae_rewards(self, gathered: torch.Tensor) -> torch.Tensor:
        """TRL's weighted reward sum ``[N]``; NaN where every reward function gave None."""
        weights = self.reward_weights.to(gathered.device)  # [F]
        rewards = (gathered * weights.unsqueeze(0)).nansum(dim=1)  # [N]
        rewards[torch.isnan(gathered).all(dim=1)] = torch.nan
        return rewards

    def _qae_update_controller(self) -> None:
        """Feed the previous training batch's signals to the K controller."""
        if self._qae_pending is None:
            return
        entropy = sum(self._qae_entropy) / len(self._qae_entropy) if self._qae_entropy else math.nan
        self.qae_kcontrol.update(
            {"step": self._qae_updates, "entropy": entropy, **self._qae_pending}
        )
        self._qae_updates += 1
        self._qae_pending = None
        self._qae_entropy = []

    def _qae_log(
        self,
        mode: str,
        rewards: torch.Tensor,
        group_ids: torch.Tensor,
        adv_all: torch.Tensor,
        k: float | torch.Tensor,
    ) -> None:
        stats = advantage_stats(
            adv_all,
            rewards,
            group_ids,
            k=k,
            quantile_method=self.qae_quantile_method,
            nan="unscorable",
        )
        k_mean = float(k.mean()) if isinstance(k, torch.Tensor) else float(k)
        metrics = self._metrics[mode]
        metrics["qae/k"].append(k_mean)
        for name in ("frac_zero_adv", "frac_pos_adv", "frac_neg_adv", "unscorable"):
            metrics[f"qae/{name}"].append(stats[name])
        for name in ("hard", "easy", "mixed", "degenerate", "all_success", "all_fail"):
            metrics[f"qae/{name}_groups"].append(stats[f"{name}_groups"])
        if mode == "train":
            for name, value in self.qae_kcontrol.metrics().items():
                metrics[f"qae/kcontrol/{name}"].append(float(value))
            self._qae_pending = {"frac_zero_adv": stats["frac_zero_adv"]}
        # TRL logged its own advantages for the completions table: show ours instead.
        logged = self._logs["advantages"]
        m = min(adv_all.numel(), len(logged))
        values = adv_all.tolist()[-m:] if m else []
        for i, v in enumerate(values):
            logged[len(logged) - m + i] = v
        self.qae_last = {
            "mode": mode,
            "rewards": rewards.detach().cpu(),
            "group_ids": group_ids.detach().cpu(),
            "advantages": adv_all.detach().cpu(),
            "k": k.detach().cpu() if isinstance(k, torch.Tensor) else k,
        }


class QAEGRPOTrainer(QAEAdvantageMixin, GRPOTrainer):
    """TRL's ``GRPOTrainer`` whose advantages come from a qae estimator (QAE by default).

    Takes every ``GRPOTrainer`` argument plus the ``qae_*`` keywords of
    :class:`QAEAdvantageMixin`::

        trainer = QAEGRPOTrainer(
            model="Qwen/Qwen3-0.6B", reward_funcs=my_reward, args=GRPOConfig(...),
            train_dataset=ds, qae_k=0.4,
        )
    """
