"""K control: schedules and adaptive controllers for QAE's quantile level K.

A K controller is a small object that says which K to use at the current step and learns
from the step's metrics afterwards. One interface (:class:`KController`) serves the
trainer, the entropy lab and the plugins::

    ctrl = make_controller(KControlConfig(kind="entropy_band"))
    for step in range(steps):
        k = ctrl.batch_k(rewards, group_ids)        # float, or a [B] tensor (difficulty)
        adv = compute_advantages(rewards, group_ids, "qae", k=k)
        ...                                         # loss, optimizer step, metrics
        ctrl.update({"step": step, "entropy": H, "frac_nonzero_adv": f})
        log(ctrl.metrics())
    torch.save({"kcontrol": ctrl.state_dict()})     # plain Python types only

``update`` consumes the signals of step t (``entropy``: mean token entropy of the batch;
``frac_nonzero_adv``: fraction of responses with a non-zero advantage, or
``frac_zero_adv``, read as its complement; ``step``) and returns the K of step t+1, which
``k()`` then returns. Extra keys are ignored, so the trainer can pass its metrics dict.

Kinds (registry :data:`controllers`, picked by ``KControlConfig.kind``):
    ``constant``, ``linear``, ``cosine`` (from ``k_start`` at step 0 to ``k_end`` at step
    ``steps``, then held), ``two_phase`` (``k_start`` for ``steps`` steps, then ``k_end``:
    explore, then exploit), ``piecewise`` (points (step, K), step or linear
    interpolation): pure functions of the step.
    ``entropy_band``, ``sparsity``: proportional-integral controllers (below).
    ``difficulty``: a fixed K per success-rate bucket, one K per group.

Which way K moves things (binary rewards, paper's quantile ``inverted_cdf``)
    A group of G responses with c successes (p = c/G) has baseline 0 when p <= 1 - K
    ("hard": only the c successes get a non-zero, positive advantage) and 1 otherwise
    ("easy": only the G - c failures get a non-zero, negative advantage); all-equal groups
    get 0. Raising K moves groups from hard to easy: fewer positive-only updates (which
    sharpen the policy and lower entropy), more negative-only updates (which spread mass
    and raise entropy). Hence the entropy controller raises K when entropy is low.

    Non-zero count of a group as K rises: a group switches from c to G - c non-zero
    responses when K crosses 1 - c/G. For K <= 1/2 the groups that switch have c > G/2,
    so the count drops; for K >= 1/2 they have c < G/2, so it grows. For every batch the
    non-zero fraction is therefore a non-increasing step function of K on (0, 1/2] and a
    non-decreasing one on [1/2, 1), with its minimum, sum of min(c, G - c) over groups, at
    K = 1/2 (see :func:`binary_nonzero_fraction`). It is not monotone on (0, 1): the
    paper's "larger K, fewer non-zero advantages" holds on the low branch only. The
    ``sparsity`` controller therefore works on one branch: ``low`` (K in (0, 1/2], raise K
    to cut the non-zero fraction) or ``high`` (K in [1/2, 1), lower K to cut it); the
    config refuses a [k_min, k_max] that crosses 1/2. A target below the branch's minimum
    (or above its maximum) is unreachable: K then rests at the clamp. Being a step
    function, the fraction usually cannot equal the target: the tolerance deadband lets K
    settle on a level within it; with no level inside it, K alternates between the two
    levels around the target with a time-average error that tends to zero (the integral is
    bounded, so the summed error is too). The policy moves the success rates under the
    controller, so the levels drift between steps; the controller only needs the sign.
    With ``quantile_method="linear"`` the gate interpolates at the regime boundary and
    gives every response of such groups a non-zero advantage; the derivation above is for
    ``inverted_cdf``.

Non-binary rewards
    With ``inverted_cdf`` the baseline is the ``ceil(G K)``-th smallest reward of the
    group: an order statistic, not a regime switch. Responses above it get a positive
    advantage, below it a negative one, equal to it zero; one group may hold both signs
    (``advantage_stats`` counts it as ``mixed``). Partial credit (rewards in [0, 1]): with
    distinct rewards only the responses tied with the order statistic get 0, so the
    sparsity that QAE gives binary rewards mostly disappears and K becomes a rank: the
    fraction of the group pushed down. DAPO rewards (+1/-1): an affine map of 0/1, so the
    std-scaled advantages equal the binary ones (up to ``eps``). With the overlong penalty
    ``min(-(L - (Lmax - buf)) / buf, 0)`` added, a correct but long response scores below
    1: in a group whose baseline is a short correct response (1), it lands below the
    baseline and gets a negative advantage although it is correct; in a hard group whose
    baseline is a plain wrong response (-1), a long wrong response (below -1) gets a
    negative advantage where the binary gate gives 0. ``sparsity`` control still works
    (it observes the fraction) but the low-branch sign argument assumes binary rewards.

Proportional-integral update and anti-windup
    With error e_t (positive: K should rise), reference K0 (``k``) and integral I::

        I_t = I_{t-1} + ki e_t        (limited, see below)
        K_{t+1} = clamp(K0 + kp e_t + I_t, k_min, k_max)

    Anti-windup by conditional integration (clamping): the integral grows only until the
    unclamped output reaches the bound the error pushes towards, and stays put while it
    is beyond it (:func:`pi_step`). Chosen over back-calculation because it needs no
    tracking gain, K lands exactly on the clamp under a constant error, and it bounds the
    integral to [min(0, k_min - K0), max(0, k_max - K0)], so when the error changes sign
    after a long saturation K leaves the clamp at the very next update. Both
    errors are zero inside a deadband (the entropy band, the sparsity tolerance): a
    constant in-band signal never moves K, and the error is the distance to the band, so
    the output is continuous when the signal crosses the band's edge.

Default gains (K per unit of error; errors are dimensionless)
    entropy band: error = distance of the (smoothed) entropy from the band, divided by the
    band's centre (a relative deviation, the same for any vocabulary or model). kp = 1.0:
    an entropy 10% below the band adds 0.1 to K at once. ki = 0.1 (integral time
    kp/ki = 10 steps): entropy integrates K's effect over tens of steps, so the integral
    is kept slow to avoid overshoot. On a toy integrating plant h' = a (K - K*) (relative
    entropy h, unknown K*), these gains bring h back to the band without sustained
    oscillation for a from 0.005 to 1 per step (the proportional loop needs a kp < 2).
    Halving both gains kept a slow plant (a = 0.005, K* = 0.75) more than 0.05 outside
    the band for 263 of 600 steps instead of 101; doubling them made K reverse at nearly
    every step for good at a = 1. The tests run this plant.
    sparsity: error = non-zero fraction minus target, beyond the tolerance (0.05 by
    default). The fraction answers K at once (a static step function of K, no dynamics)
    and one batch measures it with noise (binomial over B responses, correlated within
    groups: a few hundredths at B = 256), so the controller is integral-led: ki = 0.2
    moves K by 0.01 per step for an error of 0.05; kp = 0.2 passes only a fifth of that
    noise to K. On
    synthetic binary batches (P = 32, G = 8, targets 0.2 and 0.25) the time-average
    fraction came within 0.005 of a reachable target, as with kp = ki = 1, which however
    moved K four to five times as much from step to step.

Default range [0.2, 0.8] (entropy band): symmetric around 1/2, it keeps both regimes
reachable for every success rate in (0.2, 0.8) while never letting K reach the degenerate
ends (K -> 0: every group hard, pure positive reinforcement as with the minimum baseline;
K -> 1: every group easy). The paper's working values 0.4 and 0.6 sit inside with margin.
Sparsity: [0.2, 0.5] on the low branch, [0.5, 0.8] on the high one.

Difficulty-aware K (``difficulty``): each group's success rate p (rewards above
``success_threshold``) picks a bucket, and the bucket's K becomes the K of every response
of the group (``compute_advantages`` accepts a ``[B]`` K). With binary rewards a bucket K
only decides the regime of its groups: a group is hard iff p <= 1 - K_b, so a bucket whose
range lies below 1 - K_b is all hard (its successes credited), above it all easy (its
failures penalised); the exact value of K_b matters beyond that only for non-binary
rewards. The defaults (all buckets 0.4) reproduce constant K = 0.4 and log the groups per
bucket.

Shapes: B responses, P groups, G responses per group.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor

from qae.advantages import GroupIds, _group_keys
from qae.registry import Registry

__all__ = [
    "DifficultyK",
    "EntropyBandController",
    "KControlConfig",
    "KController",
    "ScheduledK",
    "SparsityController",
    "StepSignals",
    "binary_nonzero_fraction",
    "constant_k",
    "controllers",
    "cosine_k",
    "difficulty_k",
    "group_success_rate",
    "linear_k",
    "make_controller",
    "pi_step",
    "piecewise_k",
    "register_controller",
    "two_phase_k",
]

INTERPOLATIONS = ("step", "linear")
BRANCHES = ("low", "high")
# Same tolerance as the quantile in qae.advantages: G·K within it of an integer is that integer.
_QUANTILE_TOL = 1e-9


# --------------------------------------------------------------------------------------
# Interface


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


# --------------------------------------------------------------------------------------
# Schedules: pure functions of the step


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


# --------------------------------------------------------------------------------------
# Proportional-integral controllers


def pi_step(
    error: float,
    integral: float,
    *,
    k_ref: float,
    kp: float,
    ki: float,
    k_min: float,
    k_max: float,
) -> tuple[float, float]:
    """One PI update with conditional-integration anti-windup.

    ``K = clamp(k_ref + kp error + I', k_min, k_max)`` with ``I' = integral + ki error``,
    except that the integral never grows past the value that puts the unclamped output on
    the bound it is pushing towards (and, if it is already past it, does not move): the
    output reaches the bound exactly, and the integral stays within
    ``[min(0, k_min - k_ref), max(0, k_max - k_ref)]`` when it starts there.

    Returns:
        (K, new integral).
    """
    new_integral = integral + ki * error
    if error > 0:
        new_integral = min(new_integral, max(integral, k_max - k_ref - kp * error))
    elif error < 0:
        new_integral = max(new_integral, min(integral, k_min - k_ref - kp * error))
    out = k_ref + kp * error + new_integral
    return min(max(out, k_min), k_max), new_integral


class _PIController(_Controller):
    """PI on a smoothed scalar signal; subclasses turn the signal into an error."""

    signal_name = ""

    def __init__(
        self, *, k: float, k_min: float, k_max: float, kp: float, ki: float, ema: float
    ) -> None:
        super().__init__()
        if not (0 < k_min <= k <= k_max < 1):
            raise ValueError(
                f"need 0 < k_min <= k <= k_max < 1, got k_min={k_min}, k={k}, k_max={k_max}"
            )
        if kp < 0 or ki < 0:
            raise ValueError(f"gains must be >= 0, got kp={kp}, ki={ki}")
        if not 0 <= ema < 1:
            raise ValueError(f"ema must be in [0, 1), got ema={ema}")
        self.k_ref, self.k_min, self.k_max = k, k_min, k_max
        self.kp, self.ki, self.ema = kp, ki, ema
        self._k = k
        self._integral = 0.0
        self._error = 0.0
        self._signal: float | None = None
        self._skipped = 0

    def k(self) -> float:
        return self._k

    def _read(self, sig: StepSignals) -> float | None:
        value = getattr(sig, self.signal_name)
        if value is None:
            raise ValueError(
                f"K controller {self.kind!r} needs the signal {self.signal_name!r}; got {sig!r}"
            )
        return value if math.isfinite(value) else None

    def _error_of(self, signal: float) -> float:
        raise NotImplementedError

    def update(self, signals: StepSignals | Mapping[str, Any]) -> float:
        """Consume one step's signals; non-finite signals hold K (counted in ``k_skipped``)."""
        sig = self._advance(signals)
        x = self._read(sig)
        if x is None:
            self._skipped += 1
            return self._k
        self._check_signal(x)
        prev = self._signal
        self._signal = x if prev is None else self.ema * prev + (1.0 - self.ema) * x
        self._error = self._error_of(self._signal)
        self._k, self._integral = pi_step(
            self._error,
            self._integral,
            k_ref=self.k_ref,
            kp=self.kp,
            ki=self.ki,
            k_min=self.k_min,
            k_max=self.k_max,
        )
        return self._k

    def _check_signal(self, x: float) -> None:
        pass

    def metrics(self) -> dict[str, float]:
        out = {"k": self._k, "k_error": self._error, "k_integral": self._integral}
        out["k_skipped"] = float(self._skipped)
        if self._signal is not None:
            out["k_signal"] = self._signal
        return out

    def _state(self) -> dict[str, Any]:
        return {
            "k": self._k,
            "integral": self._integral,
            "error": self._error,
            "signal": self._signal,
            "skipped": self._skipped,
        }

    def _load(self, state: Mapping[str, Any]) -> None:
        self._k = float(state["k"])
        self._integral = float(state["integral"])
        self._error = float(state["error"])
        self._signal = None if state["signal"] is None else float(state["signal"])
        self._skipped = int(state["skipped"])


class EntropyBandController(_PIController):
    """Hold mean token entropy inside a band: raise K below it, lower K above it.

    The band is ``[target - width, target + width]`` in nats, or in units of the entropy
    seen at the first update when ``relative`` (that reference is kept in the state). The
    error is the distance of the smoothed entropy from the band divided by the band's
    centre: zero inside, positive below (raise K), negative above.

    Args:
        target: band centre (nats, or a multiple of the reference entropy).
        width: band half-width, same units, ``0 <= width < target``.
        relative: measure the band relative to the first observed entropy.
        k, k_min, k_max, kp, ki, ema: starting K (and PI reference), clamp, gains, EMA
            weight of the previous smoothed value (0 = no smoothing).
    """

    kind = "entropy_band"
    signal_name = "entropy"

    def __init__(
        self,
        *,
        target: float = 1.0,
        width: float = 0.25,
        relative: bool = True,
        k: float = 0.4,
        k_min: float = 0.2,
        k_max: float = 0.8,
        kp: float = 1.0,
        ki: float = 0.1,
        ema: float = 0.0,
    ) -> None:
        super().__init__(k=k, k_min=k_min, k_max=k_max, kp=kp, ki=ki, ema=ema)
        if not (target > 0 and 0 <= width < target):
            raise ValueError(
                f"need entropy_target > 0 and 0 <= entropy_band < entropy_target, "
                f"got entropy_target={target}, entropy_band={width}"
            )
        self.target, self.width, self.relative = target, width, relative
        self._reference: float | None = None

    def _check_signal(self, x: float) -> None:
        if x < 0:
            raise ValueError(f"entropy must be >= 0, got entropy={x}")
        if self.relative and self._reference is None:
            if x <= 0:
                raise ValueError(
                    "entropy_relative needs a positive entropy at the first update, got "
                    f"entropy={x}"
                )
            self._reference = x

    def band(self) -> tuple[float, float] | None:
        """(low, high) in nats, or None before a relative band has its reference."""
        scale = 1.0
        if self.relative:
            if self._reference is None:
                return None
            scale = self._reference
        return (self.target - self.width) * scale, (self.target + self.width) * scale

    def _error_of(self, signal: float) -> float:
        low, high = self.band()  # type: ignore[misc]  # set by _check_signal
        centre = 0.5 * (low + high)
        if signal < low:
            return (low - signal) / centre
        if signal > high:
            return (high - signal) / centre
        return 0.0

    def metrics(self) -> dict[str, float]:
        out = super().metrics()
        band = self.band()
        if band is not None:
            out["k_band_low"], out["k_band_high"] = band
        if self._reference is not None:
            out["k_reference"] = self._reference
        return out

    def _state(self) -> dict[str, Any]:
        return {**super()._state(), "reference": self._reference}

    def _load(self, state: Mapping[str, Any]) -> None:
        super()._load(state)
        ref = state["reference"]
        self._reference = None if ref is None else float(ref)


class SparsityController(_PIController):
    """Hold the fraction of responses with non-zero advantage near ``target``.

    Works on one branch of the (V-shaped, see the module docstring) non-zero fraction:
    ``low`` (K <= 1/2: raise K when the fraction is above target) or ``high``
    (K >= 1/2: lower K when it is above). The error is ``fraction - target`` beyond the
    ``tolerance`` deadband, signed so that positive raises K.

    Args:
        target: wanted non-zero fraction in (0, 1) (the paper's operating point ~0.2).
        tolerance: deadband half-width around the target.
        branch: ``low`` or ``high``; [k_min, k_max] must lie on that side of 1/2.
        k, k_min, k_max, kp, ki, ema: as :class:`EntropyBandController`.
    """

    kind = "sparsity"
    signal_name = "frac_nonzero_adv"

    def __init__(
        self,
        *,
        target: float = 0.2,
        tolerance: float = 0.05,
        branch: str = "low",
        k: float = 0.4,
        k_min: float = 0.2,
        k_max: float = 0.5,
        kp: float = 0.2,
        ki: float = 0.2,
        ema: float = 0.0,
    ) -> None:
        super().__init__(k=k, k_min=k_min, k_max=k_max, kp=kp, ki=ki, ema=ema)
        _check_sparsity(target, tolerance, branch)
        _check_branch(branch, k_min, k_max)
        self.target, self.tolerance, self.branch = target, tolerance, branch

    def _check_signal(self, x: float) -> None:
        if not 0 <= x <= 1:
            raise ValueError(f"frac_nonzero_adv must be in [0, 1], got {x}")

    def _error_of(self, signal: float) -> float:
        excess = signal - self.target
        if abs(excess) <= self.tolerance:
            return 0.0
        excess -= math.copysign(self.tolerance, excess)
        return excess if self.branch == "low" else -excess

    def metrics(self) -> dict[str, float]:
        return {**super().metrics(), "k_target": self.target}


def _check_sparsity(target: float, tolerance: float, branch: str) -> None:
    if not (_number(target) and 0 < target < 1):
        raise ValueError(f"sparsity_target must be in (0, 1), got sparsity_target={target!r}")
    if not (_number(tolerance) and 0 <= tolerance < 1):
        raise ValueError(f"sparsity_tolerance must be in [0, 1), got {tolerance!r}")
    if branch not in BRANCHES:
        raise ValueError(f"sparsity_branch must be low or high, got sparsity_branch={branch!r}")


def _check_branch(branch: str, lo: float, hi: float) -> None:
    if branch == "low" and hi > 0.5:
        raise ValueError(
            f"k_max={hi} > 0.5 with sparsity_branch='low': above K=1/2 the non-zero "
            f"fraction rises with K, so the controller would push the wrong way"
        )
    if branch == "high" and lo < 0.5:
        raise ValueError(
            f"k_min={lo} < 0.5 with sparsity_branch='high': below K=1/2 the non-zero "
            f"fraction falls with K, so the controller would push the wrong way"
        )


def binary_nonzero_fraction(successes: Tensor, group_size: int, k: float) -> float:
    """Fraction of responses QAE gives a non-zero advantage, binary rewards, full groups.

    A group with c of G successes has ``c`` non-zero responses when hard
    (``c <= G - ceil(G K)``: baseline 0), ``G - c`` when easy, 0 when c is 0 or G. Equals
    ``1 - advantage_stats(...)["frac_zero_adv"]`` for ``quantile_method="inverted_cdf"``.

    Args:
        successes: ``[P]`` integer success counts in [0, G].
        group_size: G.
        k: quantile level in (0, 1).
    """
    c = torch.as_tensor(successes).long()  # [P]
    if c.numel() == 0:
        return 0.0
    rank = min(max(math.ceil(group_size * k - _QUANTILE_TOL), 1), group_size)
    hard = c <= group_size - rank
    nonzero = torch.where(hard, c, group_size - c)  # [P]
    nonzero = torch.where((c == 0) | (c == group_size), torch.zeros_like(c), nonzero)
    return float(nonzero.sum()) / (c.numel() * group_size)


# --------------------------------------------------------------------------------------
# Difficulty-aware K


def group_success_rate(
    rewards: Tensor, group_ids: GroupIds, *, success_threshold: float = 0.0
) -> Tensor:
    """Each response's group success rate ``[B]`` (float64).

    A response succeeds when its reward is > ``success_threshold``; NaN rewards
    (unscorable) count in neither numerator nor denominator.
    """
    r = torch.as_tensor(rewards)
    if r.dim() != 1:
        raise ValueError(f"rewards must be [B], got shape {tuple(r.shape)}")
    keys = _group_keys(group_ids, r.numel(), r.device)
    if r.numel() == 0:
        return torch.zeros(0, dtype=torch.float64, device=r.device)
    _, codes = torch.unique(keys, return_inverse=True)  # [B] in [0, P)
    r64 = r.to(torch.float64)
    valid = ~torch.isnan(r64)
    num_groups = int(codes.max()) + 1
    wins = torch.zeros(num_groups, dtype=torch.float64, device=r.device)
    wins.index_add_(0, codes, ((r64 > success_threshold) & valid).to(torch.float64))
    counts = torch.zeros(num_groups, dtype=torch.float64, device=r.device)
    counts.index_add_(0, codes, valid.to(torch.float64))
    return (wins / counts.clamp(min=1))[codes]


def difficulty_k(
    rewards: Tensor,
    group_ids: GroupIds,
    *,
    edges: Sequence[float],
    ks: Sequence[float],
    success_threshold: float = 0.0,
) -> Tensor:
    """Per-response K ``[B]`` from the group's success-rate bucket (constant in a group).

    Bucket i holds success rates in ``[edges[i-1], edges[i])`` (with ``edges[-1] = 0``,
    the last bucket closed at 1); ``ks[i]`` is its K. Pass the result as
    ``compute_advantages(..., k=...)``.
    """
    _check_buckets(edges, ks)
    p = group_success_rate(rewards, group_ids, success_threshold=success_threshold)  # [B]
    return torch.tensor(list(ks), dtype=torch.float64, device=p.device)[_bucket(p, edges)]


def _bucket(p: Tensor, edges: Sequence[float]) -> Tensor:
    """Bucket index ``[B]`` of success rates ``p [B]``: i such that edges[i-1] <= p < edges[i]."""
    return torch.bucketize(p, torch.tensor(list(edges), dtype=p.dtype, device=p.device), right=True)


def _check_buckets(edges: Sequence[float], ks: Sequence[float]) -> None:
    if any(not 0 < e < 1 for e in edges) or any(
        a >= b for a, b in zip(edges, edges[1:], strict=False)
    ):
        raise ValueError(
            f"difficulty_edges must be strictly increasing in (0, 1), got {list(edges)}"
        )
    if len(ks) != len(edges) + 1:
        raise ValueError(
            f"difficulty_ks needs len(difficulty_edges) + 1 = {len(edges) + 1} values, "
            f"got {len(ks)}: {list(ks)}"
        )
    if any(not 0 < k < 1 for k in ks):
        raise ValueError(f"difficulty_ks must all be in (0, 1), got {list(ks)}")


class DifficultyK(_Controller):
    """A fixed K per success-rate bucket; :meth:`batch_k` returns the ``[B]`` K tensor.

    ``k()`` is the last batch's mean K over responses (for logging; the mean of the bucket
    Ks before the first batch). ``metrics()`` reports each bucket's K (``k_bucket{i}``)
    and the number of groups that fell in it in the last batch (``k_bucket{i}_groups``).
    """

    kind = "difficulty"

    def __init__(
        self, edges: Sequence[float], ks: Sequence[float], *, success_threshold: float = 0.0
    ) -> None:
        super().__init__()
        _check_buckets(edges, ks)
        self.edges, self.ks = [float(e) for e in edges], [float(k) for k in ks]
        self.success_threshold = success_threshold
        self._mean_k = sum(self.ks) / len(self.ks)
        self._groups = [0] * len(self.ks)

    def labels(self) -> list[str]:
        """Human-readable success-rate range of each bucket: ``[0, 0.25)``, ..."""
        bounds = [0.0, *self.edges, 1.0]
        return [
            f"[{lo:g}, {hi:g}{']' if i == len(self.ks) - 1 else ')'}"
            for i, (lo, hi) in enumerate(zip(bounds, bounds[1:], strict=False))
        ]

    def k(self) -> float:
        return self._mean_k

    def batch_k(self, rewards: Tensor, group_ids: GroupIds) -> Tensor:
        """Per-response K ``[B]``; also records the groups per bucket for :meth:`metrics`."""
        p = group_success_rate(rewards, group_ids, success_threshold=self.success_threshold)
        bucket = _bucket(p, self.edges)  # [B]
        k = torch.tensor(self.ks, dtype=torch.float64, device=p.device)[bucket]  # [B]
        keys = _group_keys(group_ids, p.numel(), p.device)
        first = _first_of_each_group(keys)  # [P]
        self._groups = torch.bincount(bucket[first], minlength=len(self.ks)).tolist()
        if k.numel():
            self._mean_k = float(k.mean())
        return k

    def metrics(self) -> dict[str, float]:
        out = {"k": self._mean_k}
        for i, (k, n) in enumerate(zip(self.ks, self._groups, strict=True)):
            out[f"k_bucket{i}"] = k
            out[f"k_bucket{i}_groups"] = float(n)
        return out

    def _state(self) -> dict[str, Any]:
        return {"mean_k": self._mean_k, "groups": list(self._groups)}

    def _load(self, state: Mapping[str, Any]) -> None:
        self._mean_k = float(state["mean_k"])
        self._groups = [int(n) for n in state["groups"]]


def _first_of_each_group(keys: Tensor) -> Tensor:
    """Index ``[P]`` of each group's first response, from integer group keys ``[B]``."""
    uniq, codes = torch.unique(keys, return_inverse=True)
    pos = torch.arange(keys.numel(), device=keys.device)
    first = torch.full((uniq.numel(),), keys.numel(), dtype=torch.long, device=keys.device)
    return first.scatter_reduce_(0, codes, pos, "amin")


# --------------------------------------------------------------------------------------
# Config and registry


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


def _number(x: object) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and not math.isnan(x)


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
