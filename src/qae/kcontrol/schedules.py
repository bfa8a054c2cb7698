"""K schedules: pure functions of the step, and the controller that follows one."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

from qae.kcontrol.base import INTERPOLATIONS, _Controller


def constant_k(step: int, *, k: float) -> float:
    """K = ``k`` at every step."""
    return k


def linear_k(step: int, *, k_start: float, k_end: float, steps: int) -> float:
    """Linear from ``k_start`` (step 0) to ``k_end`` (step ``steps`` and after), exact ends."""
    if step <= 0:
        return k_start
    if step >= steps:
        return k_end
    return k_start + (k_end - k_start) * (step / steps)


def cosine_k(step: int, *, k_start: float, k_end: float, steps: int) -> float:
    """Half-cosine ``k_end + (k_start - k_end) (1 + cos(pi t / steps)) / 2``, exact ends."""
    if step <= 0:
        return k_start
    if step >= steps:
        return k_end
    return k_end + (k_start - k_end) * 0.5 * (1.0 + math.cos(math.pi * step / steps))


def two_phase_k(step: int, *, k_explore: float, k_exploit: float, switch_step: int) -> float:
    """``k_explore`` for steps ``< switch_step``, then ``k_exploit``."""
    return k_explore if step < switch_step else k_exploit


def piecewise_k(
    step: int, *, points: Sequence[tuple[int, float]], interpolation: str = "step"
) -> float:
    """K through points ``(step_i, K_i)`` (steps strictly increasing).

    Before the first point: K_0; after the last: the last K. ``step`` interpolation holds
    K_i on [step_i, step_{i+1}); ``linear`` interpolates between neighbouring points.
    """
    if not points:
        raise ValueError("points must hold at least one (step, K) pair, got []")
    if interpolation not in INTERPOLATIONS:
        raise ValueError(f"interpolation must be step or linear, got {interpolation!r}")
    if step <= points[0][0]:
        return points[0][1]
    for (s0, k0), (s1, k1) in zip(points, points[1:], strict=False):
        if step < s1:
            if interpolation == "step":
                return k0
            return k0 + (k1 - k0) * ((step - s0) / (s1 - s0))
    return points[-1][1]


class ScheduledK(_Controller):
    """A schedule under the controller interface: K = ``schedule(step)``; no feedback.

    Args:
        schedule: pure function of the step returning K in (0, 1).
        kind: the registered name, stored in the state dict.
    """

    def __init__(self, schedule: Callable[[int], float], kind: str = "schedule") -> None:
        super().__init__()
        self.schedule = schedule
        self.kind = kind

    def k(self) -> float:
        return float(self.schedule(self._step))
