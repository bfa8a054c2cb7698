"""Proportional-integral K controllers: entropy band and sparsity.

The update, the anti-windup and the default gains are explained in :mod:`qae.kcontrol`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from qae.kcontrol.base import _QUANTILE_TOL, BRANCHES, StepSignals, _Controller, _number


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
