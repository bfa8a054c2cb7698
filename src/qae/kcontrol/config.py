"""The K control config section, the controller registry and :func:`make_controller`."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from qae.core.registry import Registry
from qae.kcontrol.base import INTERPOLATIONS, KController, _number
from qae.kcontrol.difficulty import DifficultyK, _check_buckets
from qae.kcontrol.pi import (
    EntropyBandController,
    SparsityController,
    _check_branch,
    _check_sparsity,
)
from qae.kcontrol.schedules import (
    ScheduledK,
    constant_k,
    cosine_k,
    linear_k,
    piecewise_k,
    two_phase_k,
)


@dataclass
class KControlConfig:
    """How QAE's K is chosen each step: a schedule, an adaptive controller or per bucket."""

    kind: str = "constant"
    """K controller: ``constant``, ``linear``, ``cosine``, ``two_phase``, ``piecewise``,
    ``entropy_band``, ``sparsity`` or ``difficulty``."""

    k: float = 0.4
    """K of ``constant``; starting K (and PI reference) of ``entropy_band``/``sparsity``."""

    k_start: float = 0.6
    """``linear``/``cosine``: K at step 0; ``two_phase``: the exploration K."""

    k_end: float = 0.4
    """``linear``/``cosine``: K from step ``steps`` on; ``two_phase``: the exploitation K."""

    steps: int = 100
    """``linear``/``cosine``: steps from ``k_start`` to ``k_end``; ``two_phase``: steps
    spent at ``k_start``."""

    points_steps: list[int] = field(default_factory=list)
    """``piecewise``: steps of the points, strictly increasing, from 0 up."""

    points_k: list[float] = field(default_factory=list)
    """``piecewise``: K at each point (same length as ``points_steps``)."""

    interpolation: str = "step"
    """``piecewise``: ``step`` (hold each K until the next point) or ``linear``."""

    k_min: float | None = None
    """Lower clamp of adaptive K; none = 0.2 (0.5 for ``sparsity`` on the high branch)."""

    k_max: float | None = None
    """Upper clamp of adaptive K; none = 0.8 (0.5 for ``sparsity`` on the low branch)."""

    kp: float | None = None
    """Proportional gain (K per unit of error); none = 1.0 for ``entropy_band``, 0.2 for
    ``sparsity``."""

    ki: float | None = None
    """Integral gain (K per unit of error per step); none = 0.1 for ``entropy_band``,
    0.2 for ``sparsity``."""

    ema: float = 0.0
    """Smoothing of the controlled signal: weight of the previous smoothed value in
    [0, 1); 0 = use each step's value as is."""

    entropy_target: float = 1.0
    """``entropy_band``: band centre, in nats or (relative) a multiple of the first
    observed entropy."""

    entropy_band: float = 0.25
    """``entropy_band``: band half-width, same units as ``entropy_target``."""

    entropy_relative: bool = True
    """``entropy_band``: measure the band relative to the entropy at the first update."""

    sparsity_target: float = 0.2
    """``sparsity``: wanted fraction of responses with a non-zero advantage."""

    sparsity_tolerance: float = 0.05
    """``sparsity``: deadband half-width around the target."""

    sparsity_branch: str = "low"
    """``sparsity``: ``low`` (K <= 0.5: higher K, fewer non-zero advantages) or ``high``
    (K >= 0.5: lower K, fewer non-zero advantages)."""

    difficulty_edges: list[float] = field(default_factory=lambda: [0.25, 0.5, 0.75])
    """``difficulty``: success-rate bucket edges in (0, 1), strictly increasing."""

    difficulty_ks: list[float] = field(default_factory=lambda: [0.4, 0.4, 0.4, 0.4])
    """``difficulty``: K of each bucket (one more than the edges); a group with success
    rate p is hard (only successes credited) iff p <= 1 - K."""

    success_threshold: float = 0.0
    """``difficulty``: a reward above this counts as a success."""

    def __post_init__(self) -> None:
        controllers.get(self.kind)
        for name in ("k", "k_start", "k_end"):
            _unit(name, getattr(self, name))
        if isinstance(self.steps, bool) or not isinstance(self.steps, int) or self.steps < 0:
            raise ValueError(f"steps must be an integer >= 0, got steps={self.steps!r}")
        if self.interpolation not in INTERPOLATIONS:
            raise ValueError(
                f"interpolation must be step or linear, got interpolation={self.interpolation!r}"
            )
        if self.kind == "piecewise":
            _check_points(self.points_steps, self.points_k)
        for name in ("k_min", "k_max"):
            if getattr(self, name) is not None:
                _unit(name, getattr(self, name))
        for name in ("kp", "ki"):
            value = getattr(self, name)
            if value is not None and not (_number(value) and value >= 0):
                raise ValueError(f"{name} must be a number >= 0 or none, got {name}={value!r}")
        if not (_number(self.ema) and 0 <= self.ema < 1):
            raise ValueError(f"ema must be in [0, 1), got ema={self.ema!r}")
        if not (_number(self.entropy_target) and self.entropy_target > 0):
            raise ValueError(f"entropy_target must be > 0, got {self.entropy_target!r}")
        if not (_number(self.entropy_band) and 0 <= self.entropy_band < self.entropy_target):
            raise ValueError(
                f"entropy_band must be in [0, entropy_target={self.entropy_target}), "
                f"got entropy_band={self.entropy_band!r}"
            )
        lo, hi = clamp_range(self)
        if not lo < hi:
            raise ValueError(f"need k_min < k_max, got k_min={lo}, k_max={hi}")
        _check_sparsity(self.sparsity_target, self.sparsity_tolerance, self.sparsity_branch)
        if self.kind == "sparsity":
            _check_branch(self.sparsity_branch, lo, hi)
        if self.kind in ("entropy_band", "sparsity") and not lo <= self.k <= hi:
            raise ValueError(
                f"k={self.k} is outside [k_min, k_max] = [{lo}, {hi}] for kind={self.kind!r}"
            )
        _check_buckets(self.difficulty_edges, self.difficulty_ks)
        if not (_number(self.success_threshold) and math.isfinite(self.success_threshold)):
            raise ValueError(f"success_threshold must be finite, got {self.success_threshold!r}")


def _unit(name: str, value: object) -> None:
    if not (_number(value) and 0 < value < 1):  # type: ignore[operator]
        raise ValueError(f"{name} must be in (0, 1), got {name}={value!r}")


def _check_points(steps: Sequence[int], ks: Sequence[float]) -> None:
    if not steps or len(steps) != len(ks):
        raise ValueError(
            f"piecewise needs points_steps and points_k of the same non-zero length, got "
            f"points_steps={list(steps)}, points_k={list(ks)}"
        )
    if steps[0] < 0 or any(a >= b for a, b in zip(steps, steps[1:], strict=False)):
        raise ValueError(f"points_steps must be strictly increasing from >= 0, got {list(steps)}")
    for i, k in enumerate(ks):
        _unit(f"points_k[{i}]", k)


def clamp_range(config: KControlConfig) -> tuple[float, float]:
    """The (k_min, k_max) an adaptive controller of this config uses (defaults resolved)."""
    lo, hi = 0.2, 0.8
    if config.kind == "sparsity":
        lo, hi = (0.2, 0.5) if config.sparsity_branch == "low" else (0.5, 0.8)
    return (
        lo if config.k_min is None else config.k_min,
        hi if config.k_max is None else config.k_max,
    )


ControllerBuilder = Callable[[KControlConfig], KController]

controllers: Registry[ControllerBuilder] = Registry("K controller", "kind")


def register_controller(
    name: str, *, override: bool = False
) -> Callable[[ControllerBuilder], ControllerBuilder]:
    """Register ``builder(config) -> KController`` under ``name`` (``KControlConfig.kind``)."""
    return controllers.decorator(name, override=override)


def make_controller(config: KControlConfig) -> KController:
    """The K controller a config describes."""
    return controllers.get(config.kind)(config)


@register_controller("constant")
def _constant(c: KControlConfig) -> KController:
    return ScheduledK(lambda t: constant_k(t, k=c.k), "constant")


@register_controller("linear")
def _linear(c: KControlConfig) -> KController:
    return ScheduledK(
        lambda t: linear_k(t, k_start=c.k_start, k_end=c.k_end, steps=c.steps), "linear"
    )


@register_controller("cosine")
def _cosine(c: KControlConfig) -> KController:
    return ScheduledK(
        lambda t: cosine_k(t, k_start=c.k_start, k_end=c.k_end, steps=c.steps), "cosine"
    )


@register_controller("two_phase")
def _two_phase(c: KControlConfig) -> KController:
    return ScheduledK(
        lambda t: two_phase_k(t, k_explore=c.k_start, k_exploit=c.k_end, switch_step=c.steps),
        "two_phase",
    )


@register_controller("piecewise")
def _piecewise(c: KControlConfig) -> KController:
    points = list(zip(c.points_steps, c.points_k, strict=True))
    return ScheduledK(
        lambda t: piecewise_k(t, points=points, interpolation=c.interpolation), "piecewise"
    )


@register_controller("entropy_band")
def _entropy_band(c: KControlConfig) -> KController:
    lo, hi = clamp_range(c)
    return EntropyBandController(
        target=c.entropy_target,
        width=c.entropy_band,
        relative=c.entropy_relative,
        k=c.k,
        k_min=lo,
        k_max=hi,
        kp=1.0 if c.kp is None else c.kp,
        ki=0.1 if c.ki is None else c.ki,
        ema=c.ema,
    )


@register_controller("sparsity")
def _sparsity(c: KControlConfig) -> KController:
    lo, hi = clamp_range(c)
    return SparsityController(
        target=c.sparsity_target,
        tolerance=c.sparsity_tolerance,
        branch=c.sparsity_branch,
        k=c.k,
        k_min=lo,
        k_max=hi,
        kp=0.2 if c.kp is None else c.kp,
        ki=0.2 if c.ki is None else c.ki,
        ema=c.ema,
    )


@register_controller("difficulty")
def _difficulty(c: KControlConfig) -> KController:
    return DifficultyK(c.difficulty_edges, c.difficulty_ks, success_threshold=c.success_threshold)
