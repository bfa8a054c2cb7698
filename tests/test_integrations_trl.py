"""The TRL plugin: real GRPOTrainer steps on CPU with the built-in tiny model.

No mocks of TRL: ``QAEGRPOTrainer`` runs TRL's own generation, reward, gathering and
loss code. The tests capture the rewards the reward functions returned and the
advantages the loss received, and check them against :func:`qae.compute_advantages`.
"""

from __future__ import annotations

import json

import pytest
import torch

trl = pytest.importorskip("trl", reason="TRL is not installed (pip install 'qae[trl]')")

from datasets import Dataset  # noqa: E402
from trl import GRPOConfig, GRPOTrainer  # noqa: E402

from qae.core.advantages import compute_advantages  # noqa: E402
from qae.integrations.trl import (  # noqa: E402
    KCONTROL_FILE,
    QAEGRPOTrainer,
    check_trl_version,
)
from qae.tasks import arithmetic_score, load_tiny_model, make_split  # noqa: E402

G = 4


def _dataset(n: int = 8) -> Dataset:
    rows = make_split("train", n=n, seed=3)
    return Dataset.from_list([{"prompt": r["prompt"], "answer": r["answer"]} for r in rows])


class _Recorder:
    """Reward functions that record what they returned, call by call."""

    def __init__(self) -> None:
        self.calls: list[list[list[float | None]]] = []

    def funcs(self, unscorable_first: bool = False):
        def correct(completions, answer, **_):
            out = [arithmetic_score(c, a) for c, a in zip(completions, answer, strict=True)]
            if unscorable_first:
                out[0] = None
            self.calls.append([out])
            return out

        def digits(completions, **_):
            # Partial credit so that groups are rarely all equal: fraction of digit chars.
            out = [sum(ch.isdigit() for ch in c) / max(len(c), 1) for c in completions]
            if unscorable_first:
                out[0] = None
            self.calls[-1].append(out)
            return out

        return [correct, digits]


def _args(tmp_path, **kw) -> GRPOConfig:
    base = dict(
        output_dir=str(tmp_path),
        per_device_train_batch_size=G,
        num_generations=G,
        max_completion_length=4,
        max_steps=2,
        learning_rate=5e-3,
        logging_steps=1,
        report_to="none",
        use_cpu=True,
        save_strategy="no",
        seed=0,
        reward_weights=[1.0, 0.5],
        temperature=1.5,
        beta=0.0,
        dataloader_num_workers=0,
    )
    base.update(kw)
    return GRPOConfig(**base)


def _capture(trainer: GRPOTrainer) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Wrap the trainer to record TRL's own advantages and those the loss receives."""
    trl_adv: list[torch.Tensor] = []
    loss_adv: list[torch.Tensor] = []
    gen = GRPOTrainer._generate_and_score_completions
    loss = trainer._compute_loss

    def gen_and_record(self, inputs):
        out = gen(self, inputs)
        trl_adv.append(out["advantages"].detach().clone())
        return out

    def loss_and_record(model, inputs):
        loss_adv.append(inputs["advantages"].detach().clone())
        return loss(model, inputs)

    trainer._compute_loss = loss_and_record
    return trl_adv, loss_adv, gen_and_record


def _weighted(call: list[list[float | None]], weights=(1.0, 0.5)) -> torch.Tensor:
    """TRL's reward sum, NaN when every function returned None."""
    rows = []
    for values in zip(*call, strict=True):
        if all(v is None for v in values):
            rows.append(float("nan"))
        else:
            rows.append(sum(w * v for w, v in zip(weights, values, strict=True) if v is not None))
    return torch.tensor(rows, dtype=torch.float32)


def _train(tmp_path, monkeypatch, *, unscorable_first=False, args=None, **qae_kw):
    torch.manual_seed(0)
    model, tokenizer = load_tiny_model()
    rec = _Recorder()
    trainer = QAEGRPOTrainer(
        model=model,
        reward_funcs=rec.funcs(unscorable_first),
        args=args or _args(tmp_path),
        train_dataset=_dataset(),
        processing_class=tokenizer,
        **qae_kw,
    )
    trl_adv, loss_adv, gen_and_record = _capture(trainer)
    monkeypatch.setattr(GRPOTrainer, "_generate_and_score_completions", gen_and_record)
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    trainer.train()
    return trainer, rec, trl_adv, loss_adv, before


def test_version_pin():
    assert check_trl_version() == trl.__version__
    assert check_trl_version("1.16.3") == "1.16.3"
    with pytest.raises(RuntimeError, match=r"trl>=1.16,<1.17; installed trl==1.17.0"):
        check_trl_version("1.17.0")
    with pytest.raises(RuntimeError, match="1.15.2"):
        check_trl_version("1.15.2")


def test_two_steps_use_qae_advantages(tmp_path, monkeypatch):
    trainer, rec, trl_adv, loss_adv, before = _train(
        tmp_path, monkeypatch, unscorable_first=True, qae_k=0.4
    )
    assert len(rec.calls) == 2 and len(loss_adv) == 2
    for call, used in zip(rec.calls, loss_adv, strict=True):
        rewards = _weighted(call)  # [G], one prompt per step
        assert torch.isnan(rewards[0])  # every function returned None for row 0
        expected = compute_advantages(
            rewards, [0] * G, "qae", k=0.4, scale="group", eps=1e-4, nan="unscorable"
        )
        assert expected[0] == 0
        # The loss sees the generation batch shuffled: compare as multisets.
        torch.testing.assert_close(used.sort().values, expected.sort().values)
    changed = [n for n, p in trainer.model.named_parameters() if not torch.equal(p, before[n])]
    assert changed, "no parameter changed after two optimizer steps"
    logged = [h for h in trainer.state.log_history if "qae/k" in h]
    assert len(logged) == 2
    assert logged[0]["qae/k"] == pytest.approx(0.4)
    assert logged[0]["qae/unscorable"] == 1.0
    assert 0.0 <= logged[0]["qae/frac_zero_adv"] <= 1.0
    assert list(trainer._logs["advantages"])[-G:] == pytest.approx(
        trainer.qae_last["advantages"].tolist()
    )


def test_grpo_estimator_reproduces_trl(tmp_path, monkeypatch):
    # With the mean baseline and TRL's eps, the recomputed advantages equal TRL's own: the
    # rewards, weights, grouping and slicing line up with TRL's.
    _, rec, trl_adv, loss_adv, _ = _train(
        tmp_path, monkeypatch, args=_args(tmp_path, max_steps=1), qae_estimator="grpo"
    )
    assert len(trl_adv) == 1
    # trl_adv is recorded after TRL's method returns and before our replacement.
    ours = compute_advantages(_weighted(rec.calls[0]), [0] * G, "grpo", eps=1e-4)
    torch.testing.assert_close(loss_adv[0].sort().values, ours.sort().values)
    torch.testing.assert_close(trl_adv[0], ours, rtol=1e-5, atol=1e-5)


def test_kcontrol_updates_and_checkpoints(tmp_path, monkeypatch):
    # Sparsity control with an unreachable target of 0 non-zero: the error is >= 0 at every
    # step, so after the first update K is above its start unless nothing was non-zero.
    args = _args(tmp_path, max_steps=2, save_strategy="steps", save_steps=1)
    kc = {"kind": "sparsity", "k": 0.3, "sparsity_target": 0.05, "sparsity_tolerance": 0.0}
    trainer, rec, _, loss_adv, _ = _train(tmp_path, monkeypatch, args=args, qae_kcontrol=kc)
    ctrl = trainer.qae_kcontrol
    assert ctrl.step == 1  # updated once, before the second generation
    nonzero = float((loss_adv[0] != 0).float().mean())
    assert (ctrl.k() > 0.3) == (nonzero > 0.05)
    state = json.loads((tmp_path / "checkpoint-2" / KCONTROL_FILE).read_text())
    assert state["kcontrol"]["kind"] == "sparsity" and state["updates"] == 1
    # A fresh trainer restores it.
    model, tokenizer = load_tiny_model()
    fresh = QAEGRPOTrainer(
        model=model,
        reward_funcs=_Recorder().funcs(),
        args=args,
        train_dataset=_dataset(),
        processing_class=tokenizer,
        qae_kcontrol=kc,
    )
    fresh._load_from_checkpoint(str(tmp_path / "checkpoint-2"))
    assert fresh.qae_kcontrol.k() == ctrl.k()
    assert fresh.qae_state_dict() == trainer.qae_state_dict()


def test_bad_arguments_fail_before_training(tmp_path):
    model, tokenizer = load_tiny_model()
    common = dict(model=model, reward_funcs=_Recorder().funcs(), processing_class=tokenizer)
    with pytest.raises(ValueError, match="unknown advantage estimator"):
        QAEGRPOTrainer(
            args=_args(tmp_path), train_dataset=_dataset(), qae_estimator="qea", **common
        )
    with pytest.raises(ValueError, match="k must be"):
        QAEGRPOTrainer(args=_args(tmp_path), train_dataset=_dataset(), qae_k=1.2, **common)
    with pytest.raises(ValueError, match="multi_objective_aggregation"):
        QAEGRPOTrainer(
            args=_args(tmp_path, multi_objective_aggregation="normalize_then_sum"),
            train_dataset=_dataset(),
            **common,
        )
