"""The controller interface (:class:`KController`), the step signals it reads, and the
bookkeeping every controller shares."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

from torch import Tensor

from qae.core.advantages import GroupIds

INTERPOLATIONS = ("step", "linear")
BRANCHES = ("low", "high")
# Same tolerance as the quantile in qae.core.advantages: G·K within it of an integer is that
# integer.
_QUANTILE_TOL = 1e-9


@dataclass(frozen=True)
class StepSignals:
    """What a training step observed, passed to :meth:`KController.update`.

    Attributes:
        step: index of the step these signals come from (0-based); None = one past the
            controller's last step.
        entropy: mean token entropy of the batch (nats).
        frac_nonzero_adv: fraction of responses whose advantage is non-zero.
    """

    step: int | None = None
    entropy: float | None = None
    frac_nonzero_adv: float | None = None

    @classmethod
    def from_mapping(cls, signals: Mapping[str, Any]) -> StepSignals:
        """Read ``step``, ``entropy``, ``frac_nonzero_adv`` (or ``1 - frac_zero_adv``)."""
        frac = signals.get("frac_nonzero_adv")
        if frac is None and signals.get("frac_zero_adv") is not None:
            frac = 1.0 - float(signals["frac_zero_adv"])
        step = signals.get("step")
        entropy = signals.get("entropy")
        return cls(
            step=None if step is None else int(step),
            entropy=None if entropy is None else float(entropy),
            frac_nonzero_adv=None if frac is None else float(frac),
        )


@runtime_checkable
class KController(Protocol):
    """What the trainer and the lab call; every controller of this module implements it."""

    kind: str

    def k(self) -> float:
        """The K of the current step (for ``difficulty``: the last batch's mean K)."""
        ...

    def batch_k(self, rewards: Tensor, group_ids: GroupIds) -> float | Tensor:
        """The ``k=`` to pass to ``compute_advantages`` for this batch: a float or ``[B]``."""
        ...

    def update(self, signals: StepSignals | Mapping[str, Any]) -> float:
        """Consume one step's signals; return the K of the next step."""
        ...

    def metrics(self) -> dict[str, float]:
        """Scalars to log every step (``k`` and the controller's internals)."""
        ...

    def state_dict(self) -> dict[str, Any]:
        """Resumable state in plain Python types (``torch.load(weights_only=True)`` safe)."""
        ...

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict`'s output."""
        ...


class _Controller:
    """Step bookkeeping and checkpoint plumbing shared by all controllers."""

    kind = ""

    def __init__(self) -> None:
        self._step = 0  # index of the step whose K k() returns

    @property
    def step(self) -> int:
        """Index of the step whose K :meth:`k` returns."""
        return self._step

    def k(self) -> float:
        """The K of the current step."""
        raise NotImplementedError

    def batch_k(self, rewards: Tensor, group_ids: GroupIds) -> float | Tensor:
        """The K for this batch: the scalar :meth:`k` (one K for every group)."""
        return self.k()

    def _advance(self, signals: StepSignals | Mapping[str, Any]) -> StepSignals:
        sig = signals if isinstance(signals, StepSignals) else StepSignals.from_mapping(signals)
        if sig.step is not None and sig.step < 0:
            raise ValueError(f"signals step must be >= 0, got step={sig.step}")
        self._step = self._step + 1 if sig.step is None else sig.step + 1
        return sig

    def update(self, signals: StepSignals | Mapping[str, Any]) -> float:
        """Consume one step's signals; return the K of the next step."""
        self._advance(signals)
        return self.k()

    def metrics(self) -> dict[str, float]:
        """Scalars to log: ``k``."""
        return {"k": self.k()}

    def _state(self) -> dict[str, Any]:
        return {}

    def _load(self, state: Mapping[str, Any]) -> None:
        pass

    def state_dict(self) -> dict[str, Any]:
        """``kind``, ``step`` and the controller's own state, in plain Python types."""
        return {"kind": self.kind, "step": self._step, **self._state()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict`'s output; a state of another kind raises."""
        if state.get("kind") != self.kind:
            raise ValueError(
                f"state_dict kind={state.get('kind')!r} does not match this controller's "
                f"kind={self.kind!r}"
            )
        self._step = int(state["step"])
        self._load(state)


def _number(x: object) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and not math.isnan(x)
