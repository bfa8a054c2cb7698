"""QAE in SkyRL: advantage estimators registered in SkyRL's ``AdvantageEstimatorRegistry``.

:func:`register` adds two estimators, with the options given to it:

``qae``
    A response's outcome score is the sum of its ``token_level_rewards`` (as in SkyRL's
    ``grpo``); responses are grouped by ``index`` (SkyRL's uids) and
    :func:`qae.compute_advantages` gives ``(score - K-quantile of the group) / (group std +
    epsilon)``, spread over the response tokens; ``returns`` equal ``advantages``.
``qae_adaptive``
    The same, with K from a :mod:`qae.kcontrol` controller (``kcontrol=``).

SkyRL's config rejects keys it does not define, so the options are bound when the
estimators are registered, not read from ``trainer.algorithm``. The launcher takes them
as ``qae.*`` arguments in front of SkyRL's own::

    python -m qae.integrations.skyrl qae.k=0.4 trainer.algorithm.advantage_estimator=qae ...

(or ``python -m skyrl.train.entrypoints.main_base trainer.override_entrypoint=
qae.integrations.skyrl qae.k=0.4 ...``, SkyRL's hook for integrations): it registers, then
runs SkyRL's ``main_base`` with the rest (``--print-config`` prints the composed config
instead). A script of your own calls :func:`register` before SkyRL's ``validate_cfg``.
SkyRL copies the registry to its Ray workers through a named actor (the functions are
pickled by reference: qae must be installed there too).

Options (``qae.<name>=`` on the command line): ``k`` (0.4), ``estimator`` (``qae``, or any
:data:`qae.estimators` name), ``quantile_method`` (``inverted_cdf``, the paper's), ``scale``,
``epsilon`` (1e-6), ``singleton``, ``kcontrol.<field>`` (a
:class:`~qae.kcontrol.KControlConfig` field, for ``qae_adaptive``) and
``kcontrol.state_path``. A name SkyRL also knows means what SkyRL's estimator of that name
computes unless ``scale`` or ``singleton`` says otherwise: ``grpo`` (and ``qae``) divide by
the group std as SkyRL's ``trainer.algorithm.grpo_norm_by_std`` says, and give a prompt
with one response its raw score; ``rloo`` never divides and gives such a prompt 0;
``drgrpo`` is ``grpo`` without the std.

Adaptive K: the controller lives in the process that computes advantages (SkyRL's
trainer), built on the first call. Each call first updates it with the previous step's
zero-advantage fraction and the ``policy/policy_entropy`` SkyRL logged for that step; the
``qae/...`` metrics (K, zero-advantage fraction, regime counts, the controller's
internals) go into the next ``Tracking.log`` call of that process. With
``kcontrol.state_path`` the controller's state is written there (JSON, atomically) after
every step and read back when it is built, so a resumed run continues with its K.
"""

from __future__ import annotations

import functools
import json
import math
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any

import numpy as np
import torch
import yaml
from torch import Tensor

from qae.core.advantages import (
    QUANTILE_METHODS,
    SCALES,
    SINGLETON_MODES,
    advantage_stats,
    broadcast_to_tokens,
    compute_advantages,
    estimators,
)
from qae.io.atomic import atomic_write_json
from qae.kcontrol import KControlConfig, KController, make_controller

__all__ = [
    "ENTROPY_KEY",
    "ESTIMATOR_NAMES",
    "SkyRLQAEOptions",
    "main",
    "parse_args",
    "pop_metrics",
    "qae_adaptive_advantage",
    "qae_advantage",
    "register",
    "reset_controller",
]

ESTIMATOR_NAMES = ("qae", "qae_adaptive")
"""Names :func:`register` adds to SkyRL's advantage-estimator registry."""

ENTROPY_KEY = "policy/policy_entropy"
"""The key under which SkyRL's trainer logs the policy's mean token entropy."""

_OVERRIDE = "trainer.override_entrypoint="
_SKYRL_SINGLETON = {"rloo": "zero"}  # SkyRL's rloo gives a lone response 0, its grpo the score


@dataclass(frozen=True)
class SkyRLQAEOptions:
    """What the ``qae`` and ``qae_adaptive`` estimators compute (see the module doc)."""

    k: float = 0.4
    estimator: str = "qae"
    quantile_method: str = "inverted_cdf"
    scale: str | None = None
    """None: the scale of SkyRL's estimator of the same name."""
    epsilon: float = 1e-6
    singleton: str | None = None
    """None: what SkyRL's estimator of the same name gives a prompt with one response."""
    kcontrol: dict[str, Any] = field(default_factory=dict)
    """:class:`~qae.kcontrol.KControlConfig` fields (and ``state_path``) for
    ``qae_adaptive``."""

    def __post_init__(self) -> None:
        k = self.k
        if isinstance(k, bool) or not isinstance(k, (int, float)) or not 0 < k < 1:
            raise ValueError(f"qae.k must be in (0, 1), got k={k!r}")
        estimators.get(self.estimator)
        for name, value, choices in (
            ("quantile_method", self.quantile_method, QUANTILE_METHODS),
            ("scale", self.scale, (None, *SCALES)),
            ("singleton", self.singleton, (None, *SINGLETON_MODES)),
        ):
            if value not in choices:
                known = ", ".join(c for c in choices if c is not None)
                raise ValueError(f"unknown qae.{name}={value!r}; expected one of {known}")
        eps = self.epsilon
        if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not eps >= 0:
            raise ValueError(f"qae.epsilon must be a number >= 0, got epsilon={eps!r}")
        if not math.isfinite(eps):
            raise ValueError(f"qae.epsilon must be finite, got epsilon={eps!r}")
        known = {f.name for f in fields(KControlConfig)} | {"state_path"}
        unknown = sorted(set(self.kcontrol) - known)
        if unknown:
            raise ValueError(
                f"unknown key qae.kcontrol.{unknown[0]}; known: {', '.join(sorted(known))}"
            )

    def resolved(self, grpo_norm_by_std: bool) -> tuple[str, str]:
        """``(scale, singleton)`` for a call where SkyRL passed ``grpo_norm_by_std``."""
        scale = self.scale
        if scale is None:
            own = estimators.get(self.estimator).scale
            scale = own if own != "group" else ("group" if grpo_norm_by_std else "none")
        singleton = self.singleton or _SKYRL_SINGLETON.get(self.estimator, "raw")
        return scale, singleton


# --------------------------------------------------------------------------------------
# Metrics handed to SkyRL's Tracking.log


_PENDING: dict[str, float] = {}
_LAST_ENTROPY: list[float] = []


def pop_metrics() -> dict[str, float]:
    """The ``qae/...`` metrics of the last estimator call not yet logged (and forget them)."""
    out = dict(_PENDING)
    _PENDING.clear()
    return out


def _install_tracking_hook() -> None:
    """Merge pending ``qae/...`` metrics into SkyRL's next ``Tracking.log`` call and keep
    the policy entropy it logs (the entropy signal of ``qae_adaptive``)."""
    try:
        from skyrl.train.utils.tracking import Tracking
    except Exception:  # SkyRL missing, or it fails to import on this Python
        return
    if getattr(Tracking.log, "_qae_hook", False):
        return
    original = Tracking.log

    def log(self: Any, data: Any, step: Any, *args: Any, **kwargs: Any) -> Any:
        if isinstance(data, dict):
            entropy = data.get(ENTROPY_KEY)
            if entropy is not None:
                _LAST_ENTROPY[:] = [float(entropy)]
            if _PENDING:
                data = {**data, **pop_metrics()}
        return original(self, data, step, *args, **kwargs)

    log._qae_hook = True  # type: ignore[attr-defined]
    Tracking.log = log


# --------------------------------------------------------------------------------------
# Estimators


def _require_index(index: Any) -> list[Any]:
    if index is None:
        raise ValueError("index (the uid of each response's prompt) is required; got None")
    return list(index)


def _advantages(
    token_level_rewards: Tensor,
    response_mask: Tensor,
    index: Any,
    opts: SkyRLQAEOptions,
    k: float | Tensor,
    grpo_norm_by_std: bool,
) -> tuple[Tensor, Tensor]:
    if token_level_rewards.dim() != 2 or token_level_rewards.shape != response_mask.shape:
        raise ValueError(
            "token_level_rewards and response_mask must both be [bs, T], got "
            f"{tuple(token_level_rewards.shape)} and {tuple(response_mask.shape)}"
        )
    groups = _require_index(index)
    scale, singleton = opts.resolved(grpo_norm_by_std)
    scores = token_level_rewards.sum(dim=-1)  # [bs]
    with torch.no_grad():
        adv = compute_advantages(
            scores,
            groups,
            opts.estimator,
            k=k,
            quantile_method=opts.quantile_method,
            scale=scale,
            eps=opts.epsilon,
            singleton=singleton,
        )  # [bs]
        stats = advantage_stats(adv, scores, groups, k=k, quantile_method=opts.quantile_method)
        tokens = broadcast_to_tokens(adv, response_mask)  # [bs, T]
    _PENDING.clear()
    _PENDING["qae/k"] = float(k.mean()) if isinstance(k, Tensor) else float(k)
    _PENDING.update({f"qae/{name}": value for name, value in stats.items()})
    return tokens, tokens


def qae_advantage(
    token_level_rewards: Tensor,
    response_mask: Tensor,
    index: np.ndarray | Sequence[Any] | None = None,
    *,
    options: SkyRLQAEOptions | None = None,
    grpo_norm_by_std: bool = True,
    **kwargs: Any,
) -> tuple[Tensor, Tensor]:
    """SkyRL estimator ``qae``: the group K-quantile baseline on outcome scores.

    Args:
        token_level_rewards: ``[bs, T]`` per-token rewards; a response's score is their sum.
        response_mask: ``[bs, T]`` 1 on response tokens.
        index: ``[bs]`` prompt uid of each response.
        options: bound by :func:`register` (defaults: :class:`SkyRLQAEOptions`).
        grpo_norm_by_std: SkyRL's ``trainer.algorithm.grpo_norm_by_std``.
        **kwargs: the other arguments SkyRL passes (``config``, ``values``, ``gamma``...).

    Returns:
        ``(advantages, returns)``, both ``[bs, T]``, zero outside ``response_mask``.
    """
    opts = options or SkyRLQAEOptions()
    return _advantages(
        token_level_rewards, response_mask, index, opts, opts.k, bool(grpo_norm_by_std)
    )


_CONTROLLER: dict[str, Any] = {}


def reset_controller() -> None:
    """Forget the ``qae_adaptive`` controller and pending signals (a new run, tests)."""
    _CONTROLLER.clear()
    _LAST_ENTROPY.clear()
    _PENDING.clear()


def _build_controller(opts: SkyRLQAEOptions) -> dict[str, Any]:
    section = dict(opts.kcontrol)
    state_path = section.pop("state_path", None)
    section.setdefault("k", opts.k)
    entry: dict[str, Any] = {
        "controller": make_controller(KControlConfig(**section)),
        "state_path": state_path,
        "updates": 0,
        "pending": None,
    }
    if state_path and os.path.isfile(state_path):
        with open(state_path, encoding="utf-8") as fh:
            saved = json.load(fh)
        entry["controller"].load_state_dict(saved["kcontrol"])
        entry["updates"], entry["pending"] = int(saved["updates"]), saved.get("pending")
    return entry


def qae_adaptive_advantage(
    token_level_rewards: Tensor,
    response_mask: Tensor,
    index: np.ndarray | Sequence[Any] | None = None,
    *,
    options: SkyRLQAEOptions | None = None,
    grpo_norm_by_std: bool = True,
    **kwargs: Any,
) -> tuple[Tensor, Tensor]:
    """SkyRL estimator ``qae_adaptive``: ``qae`` with K from a K controller.

    Same arguments and return as :func:`qae_advantage`. The controller (module state,
    built from ``options.kcontrol``) is first updated with the previous call's
    zero-advantage fraction and the last policy entropy SkyRL logged, then gives this
    batch's K (a float, or one per group for ``kind=difficulty``).
    """
    opts = options or SkyRLQAEOptions()
    groups = _require_index(index)
    if not _CONTROLLER:
        _CONTROLLER.update(_build_controller(opts))
    entry = _CONTROLLER
    ctrl: KController = entry["controller"]
    if entry["pending"] is not None:
        entropy = _LAST_ENTROPY[0] if _LAST_ENTROPY else math.nan
        ctrl.update({"step": entry["updates"], "entropy": entropy, **entry["pending"]})
        entry["updates"] += 1
        _LAST_ENTROPY.clear()
    scores = token_level_rewards.sum(dim=-1)
    k = ctrl.batch_k(scores, groups)
    out = _advantages(token_level_rewards, response_mask, groups, opts, k, bool(grpo_norm_by_std))
    entry["pending"] = {"frac_zero_adv": _PENDING["qae/frac_zero_adv"]}
    _PENDING.update({f"qae/kcontrol/{n}": float(v) for n, v in ctrl.metrics().items()})
    if entry["state_path"]:
        state = {
            "kcontrol": ctrl.state_dict(),
            "updates": entry["updates"],
            "pending": entry["pending"],
        }
        atomic_write_json(entry["state_path"], state)
    return out


_FUNCTIONS: dict[str, Callable[..., tuple[Tensor, Tensor]]] = {
    "qae": qae_advantage,
    "qae_adaptive": qae_adaptive_advantage,
}


def _is_ours(fn: Any) -> bool:
    return isinstance(fn, functools.partial) and fn.func in _FUNCTIONS.values()


def register(options: SkyRLQAEOptions | None = None, **kwargs: Any) -> list[str]:
    """Register :data:`ESTIMATOR_NAMES` in SkyRL's registry with ``options`` (or the
    :class:`SkyRLQAEOptions` fields given as keywords); returns the names.

    Registering again replaces the two with the new options; a name that something else
    registered raises. Raises ``ImportError`` naming the extra when SkyRL is missing.
    """
    opts = options if options is not None else SkyRLQAEOptions(**kwargs)
    if options is not None and kwargs:
        opts = replace(options, **kwargs)
    try:
        from skyrl.backends.skyrl_train.utils.ppo_utils import AdvantageEstimatorRegistry
    except ImportError as err:
        raise ImportError(
            "qae.integrations.skyrl needs SkyRL: pip install 'qae[skyrl]' (Python 3.12)"
        ) from err
    available = AdvantageEstimatorRegistry.list_available()
    for name, fn in _FUNCTIONS.items():
        if name in available:
            current = AdvantageEstimatorRegistry.get(name)
            if not _is_ours(current):
                raise ValueError(
                    f"SkyRL's advantage estimator {name!r} is already registered by "
                    f"{getattr(current, '__module__', '?')}.{getattr(current, '__name__', '?')}"
                )
            AdvantageEstimatorRegistry.unregister(name)
        AdvantageEstimatorRegistry.register(name, functools.partial(fn, options=opts))
    _install_tracking_hook()
    return list(_FUNCTIONS)


# --------------------------------------------------------------------------------------
# Launcher


def parse_args(argv: Sequence[str]) -> tuple[SkyRLQAEOptions, list[str]]:
    """Split ``qae.<option>=<value>`` arguments (values read as YAML scalars) from SkyRL's
    overrides; SkyRL's ``trainer.override_entrypoint=...`` is dropped."""
    simple = {f.name for f in fields(SkyRLQAEOptions)} - {"kcontrol"}
    values: dict[str, Any] = {}
    kcontrol: dict[str, Any] = {}
    rest: list[str] = []
    for arg in argv:
        if arg.startswith(_OVERRIDE):
            continue
        if not arg.startswith("qae."):
            rest.append(arg)
            continue
        key, sep, raw = arg[len("qae.") :].partition("=")
        if not sep:
            raise ValueError(f"expected qae.<option>=<value>, got {arg!r}")
        value = yaml.safe_load(raw) if raw else None
        if key.startswith("kcontrol."):
            kcontrol[key[len("kcontrol.") :]] = value
        elif key in simple:
            values[key] = value
        else:
            known = ", ".join(sorted(simple | {"kcontrol.<field>"}))
            raise ValueError(f"unknown option qae.{key} in {arg!r}; known: {known}")
    return SkyRLQAEOptions(**values, kcontrol=kcontrol), rest


def _run_skyrl(args: list[str]) -> None:
    from skyrl.train.entrypoints import main_base

    sys.argv = ["skyrl.train.entrypoints.main_base", *args]
    main_base.main()


def _print_config(opts: SkyRLQAEOptions, args: list[str]) -> None:
    """Compose SkyRL's config from ``args`` (its strict parser) and print it with the qae
    options as YAML; the estimator it names must be registered."""
    from skyrl.backends.skyrl_train.utils.ppo_utils import AdvantageEstimatorRegistry
    from skyrl.train.config import SkyRLTrainConfig

    cfg = SkyRLTrainConfig.from_cli_overrides(args)
    name = cfg.trainer.algorithm.advantage_estimator
    known = AdvantageEstimatorRegistry.list_available()
    if name not in known:
        raise ValueError(
            f"trainer.algorithm.advantage_estimator={name!r} is not registered; known: "
            f"{', '.join(sorted(known))}"
        )
    print(yaml.safe_dump({"qae": asdict(opts), "skyrl": asdict(cfg)}, sort_keys=False), end="")


def main(
    argv: Sequence[str] | None = None, *, run: Callable[[list[str]], Any] = _run_skyrl
) -> None:
    """Register the estimators with the ``qae.*`` options of ``argv``, then run SkyRL's
    ``main_base`` with the other arguments (``run`` replaces that last part).
    ``--print-config`` prints the composed config instead of training."""
    args = list(sys.argv[1:] if argv is None else argv)
    show = "--print-config" in args
    opts, rest = parse_args([a for a in args if a != "--print-config"])
    register(opts)
    if show:
        _print_config(opts, rest)
    else:
        run(rest)


if __name__ == "__main__":
    main()
else:
    _install_tracking_hook()
