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

Modules: :mod:`~qae.kcontrol.base` (interface), :mod:`~qae.kcontrol.schedules`,
:mod:`~qae.kcontrol.pi` (PI controllers), :mod:`~qae.kcontrol.difficulty`,
:mod:`~qae.kcontrol.config` (config section, registry, :func:`make_controller`).
"""

from __future__ import annotations

from qae.kcontrol.base import (
    BRANCHES,
    INTERPOLATIONS,
    KController,
    StepSignals,
)
from qae.kcontrol.config import (
    KControlConfig,
    controllers,
    make_controller,
    register_controller,
)
from qae.kcontrol.difficulty import (
    DifficultyK,
    difficulty_k,
    group_success_rate,
)
from qae.kcontrol.pi import (
    EntropyBandController,
    SparsityController,
    binary_nonzero_fraction,
    pi_step,
)
from qae.kcontrol.schedules import (
    ScheduledK,
    constant_k,
    cosine_k,
    linear_k,
    piecewise_k,
    two_phase_k,
)

__all__ = [
    "BRANCHES",
    "INTERPOLATIONS",
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
