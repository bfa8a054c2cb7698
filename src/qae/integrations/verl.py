"""QAE in verl: advantage estimators registered in verl's ``register_adv_est`` registry.

Importing this module (with verl installed) registers two estimators:

``qae``
    The outcome score of a response is the sum of its ``token_level_rewards`` (as in verl's
    ``grpo``); responses are grouped by ``uid`` and :func:`qae.compute_advantages` gives
    ``(score - K-quantile of the group) / (group std + epsilon)``, spread over the
    response tokens. ``returns`` equal ``advantages`` (as verl's ``grpo``).
``qae_adaptive``
    The same, with K from a :mod:`qae.kcontrol` controller configured by
    ``algorithm.qae_kcontrol.*`` (see below).

Configuration, read from verl's ``algorithm`` config with ``.get`` (add keys with ``++``):

- ``algorithm.quantile_k`` (default 0.4): K, the key the released QAE recipe uses, so a
  run of that recipe switches with ``algorithm.adv_estimator=qae`` alone;
- ``algorithm.qae.estimator`` (default ``qae``; any :data:`qae.estimators` name). A name
  verl also knows means what verl's estimator of that name computes, unless an option
  below says otherwise: ``grpo`` (and ``qae``, the released code's change to it) divide by
  the group std as ``algorithm.norm_adv_by_std_in_grpo`` says (default true); ``rloo``
  (verl's ``rloo``: the leave-one-out baseline) and ``drgrpo`` (verl's ``grpo`` with
  ``norm_adv_by_std_in_grpo=false``, Dr. GRPO) never divide, whatever that flag says;
- ``algorithm.qae.scale`` (``group`` / ``batch`` / ``none``): overrides the scale above,
  e.g. ``rloo`` with ``scale=group`` is QAE's std-scaled leave-one-out;
- ``algorithm.qae.quantile_method`` (default ``inverted_cdf``, the paper's quantile;
  ``linear`` is ``torch.quantile``, what the released code computes; both agree when
  K·(G-1) is whole, e.g. G=16, K=0.4);
- ``algorithm.qae.epsilon`` (default 1e-6, verl's), ``algorithm.qae.singleton`` (default
  ``raw``: a prompt with one response gets its raw score, as verl's ``grpo`` (baseline 0,
  std 1) and ``rloo`` do; ``zero`` gives 0).

Registration has to happen in the process that computes advantages: verl runs
``compute_advantage`` inside its Ray ``TaskRunner`` actor, not in the launching shell.
verl (0.6 and later) imports the comma-separated modules named in the environment
variable ``VERL_USE_EXTERNAL_MODULES`` when ``verl`` itself is imported, in every
process. ``python -m qae.integrations.verl <hydra overrides>`` sets that variable (for the
local Ray cluster it starts, and in Ray's ``runtime_env`` for a cluster it joins) and runs
``verl.trainer.main_ppo``.

Adaptive K (``qae_adaptive``): the controller lives in module state of the TaskRunner
process, where ``compute_advantage`` runs once per training step; it is built on the
first call from ``algorithm.qae_kcontrol`` (the fields of
:class:`~qae.kcontrol.KControlConfig`, e.g. ``kind``, ``k``, ``entropy_target``) plus
``state_path``. At each call it is first updated with the previous step's signals: that
step's zero-advantage fraction and the ``actor/entropy`` verl logged for it. Metrics
(``qae/k``, ``qae/frac_zero_adv``, the regime counts and the controller's internals) are
added to the next ``Tracking.log`` call of that process, i.e. to the step's metrics.
verl's checkpoints do not hold the controller: with ``algorithm.qae_kcontrol.state_path``
set, its state is written there (JSON, atomically) after every step and read back when
the controller is built, so a resumed run continues with K where it was; without it, a
resumed run restarts the controller from its config.
"""

from __future__ import annotations

import json
import math
import os
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any

import numpy as np
import torch
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
    "ENV_VAR",
    "ESTIMATOR_NAMES",
    "MODULE",
    "VerlQAEOptions",
    "launch_overrides",
    "main",
    "pop_metrics",
    "qae_adaptive_advantage",
    "qae_advantage",
    "read_options",
    "register",
    "reset_controller",
]

ENV_VAR = "VERL_USE_EXTERNAL_MODULES"
"""Environment variable through which verl imports plugin modules in every process."""

MODULE = "qae.integrations.verl"
"""The module name to put in :data:`ENV_VAR`."""

ESTIMATOR_NAMES = ("qae", "qae_adaptive")
"""Names this module registers in verl's advantage-estimator registry."""

_OPTION_KEYS = ("estimator", "quantile_method", "scale", "epsilon", "singleton")


@dataclass(frozen=True)
class VerlQAEOptions:
    """The estimator options read from verl's ``algorithm`` config."""

    k: float = 0.4
    estimator: str = "qae"
    quantile_method: str = "inverted_cdf"
    scale: str = "group"
    epsilon: float = 1e-6
    singleton: str = "raw"


def _get(config: Any, key: str, default: Any = None) -> Any:
    """``config.get(key, default)`` for DictConfig, verl's dataclass configs and dicts."""
    if config is None:
        return default
    if hasattr(config, "get"):
        value = config.get(key, default)
    else:
        value = getattr(config, key, default)
    return default if value is None else value


def _plain(section: Any) -> dict[str, Any]:
    """A config section (DictConfig, dataclass, mapping or None) as a plain dict."""
    if section is None:
        return {}
    try:
        from omegaconf import DictConfig, OmegaConf

        if isinstance(section, DictConfig):
            return dict(OmegaConf.to_container(section, resolve=True))  # type: ignore[arg-type]
    except ImportError:  # pragma: no cover - omegaconf ships with verl
        pass
    if isinstance(section, Mapping):
        return dict(section)
    if hasattr(section, "__dataclass_fields__"):
        return {f.name: getattr(section, f.name) for f in fields(section)}
    raise ValueError(f"expected a config section (mapping), got {type(section).__name__}")


def _default_scale(estimator_scale: str, config: Any) -> str:
    """The scale verl's estimator of the same name uses: an estimator that divides by the
    group std (``qae``, ``grpo``) follows ``norm_adv_by_std_in_grpo``, as verl's ``grpo``
    does; one that does not (``rloo``, ``drgrpo``) never divides, as verl's ``rloo`` and
    Dr. GRPO do."""
    if estimator_scale != "group":
        return estimator_scale
    return "group" if bool(_get(config, "norm_adv_by_std_in_grpo", True)) else "none"


def read_options(config: Any) -> VerlQAEOptions:
    """Read K and the ``algorithm.qae.*`` options from verl's algorithm config.

    Unknown keys under ``algorithm.qae`` raise, listing the known ones.
    """
    section = _plain(_get(config, "qae"))
    unknown = sorted(set(section) - set(_OPTION_KEYS))
    if unknown:
        raise ValueError(
            f"unknown key algorithm.qae.{unknown[0]}; known: {', '.join(_OPTION_KEYS)}"
        )
    k = _get(config, "quantile_k", 0.4)
    if isinstance(k, bool) or not isinstance(k, (int, float)) or not 0 < k < 1:
        raise ValueError(f"algorithm.quantile_k must be in (0, 1), got quantile_k={k!r}")
    estimator = str(section.get("estimator", "qae"))
    spec = estimators.get(estimator)
    opts = VerlQAEOptions(
        k=float(k),
        estimator=estimator,
        quantile_method=str(section.get("quantile_method", "inverted_cdf")),
        scale=str(section.get("scale") or _default_scale(spec.scale, config)),
        epsilon=float(section.get("epsilon", 1e-6)),
        singleton=str(section.get("singleton", "raw")),
    )
    for name, value, choices in (
        ("quantile_method", opts.quantile_method, QUANTILE_METHODS),
        ("scale", opts.scale, SCALES),
        ("singleton", opts.singleton, SINGLETON_MODES),
    ):
        if value not in choices:
            raise ValueError(
                f"unknown algorithm.qae.{name}={value!r}; expected one of {', '.join(choices)}"
            )
    if not (math.isfinite(opts.epsilon) and opts.epsilon >= 0):
        raise ValueError(f"algorithm.qae.epsilon must be finite and >= 0, got {opts.epsilon!r}")
    return opts


# --------------------------------------------------------------------------------------
# Metrics handed to verl's Tracking.log


_PENDING: dict[str, float] = {}
_LAST_ENTROPY: list[float] = []  # actor/entropy of the last logged step


def pop_metrics() -> dict[str, float]:
    """The ``qae/...`` metrics of the last estimator call not yet logged (and forget them)."""
    out = dict(_PENDING)
    _PENDING.clear()
    return out


def _record(
    adv: Tensor, scores: Tensor, index: Any, k: float | Tensor, opts: VerlQAEOptions
) -> dict[str, float]:
    stats = advantage_stats(adv, scores, index, k=k, quantile_method=opts.quantile_method)
    k_mean = float(k.mean()) if isinstance(k, Tensor) else float(k)
    out = {"qae/k": k_mean}
    out.update({f"qae/{name}": value for name, value in stats.items()})
    _PENDING.clear()
    _PENDING.update(out)
    return out


def _install_tracking_hook() -> None:
    """Merge pending ``qae/...`` metrics into verl's next ``Tracking.log`` call.

    Also keeps the ``actor/entropy`` it sees, the entropy signal of ``qae_adaptive``.
    """
    try:
        from verl.utils.tracking import Tracking
    except ImportError:
        return
    if getattr(Tracking.log, "_qae_hook", False):
        return
    original = Tracking.log

    def log(self: Any, data: Any, step: Any, *args: Any, **kwargs: Any) -> Any:
        if isinstance(data, dict):
            entropy = data.get("actor/entropy")
            if entropy is not None:
                _LAST_ENTROPY[:] = [float(entropy)]
            if _PENDING:
                data = {**data, **pop_metrics()}
        return original(self, data, step, *args, **kwargs)

    log._qae_hook = True  # type: ignore[attr-defined]
    Tracking.log = log


# --------------------------------------------------------------------------------------
# Estimators


def _scores(token_level_rewards: Tensor, response_mask: Tensor) -> Tensor:
    if token_level_rewards.dim() != 2 or token_level_rewards.shape != response_mask.shape:
        raise ValueError(
            "token_level_rewards and response_mask must both be [bs, T], got "
            f"{tuple(token_level_rewards.shape)} and {tuple(response_mask.shape)}"
        )
    return token_level_rewards.sum(dim=-1)  # [bs]


def _advantages(
    token_level_rewards: Tensor,
    response_mask: Tensor,
    index: Any,
    opts: VerlQAEOptions,
    k: float | Tensor,
) -> tuple[Tensor, Tensor]:
    scores = _scores(token_level_rewards, response_mask)  # [bs]
    with torch.no_grad():
        adv = compute_advantages(
            scores,
            index,
            opts.estimator,
            k=k,
            quantile_method=opts.quantile_method,
            scale=opts.scale,
            eps=opts.epsilon,
            singleton=opts.singleton,
        )  # [bs]
        _record(adv, scores, index, k, opts)
        tokens = broadcast_to_tokens(adv, response_mask)  # [bs, T]
    return tokens, tokens


def _require_index(index: Any) -> Any:
    if index is None:
        raise ValueError("index (the uid of each response's prompt) is required; got None")
    return index


def qae_advantage(
    token_level_rewards: Tensor,
    response_mask: Tensor,
    index: np.ndarray | Sequence[Any] | None = None,
    config: Any = None,
    **kwargs: Any,
) -> tuple[Tensor, Tensor]:
    """verl estimator ``qae``: group K-quantile baseline on outcome scores.

    Args:
        token_level_rewards: ``[bs, T]`` per-token rewards; a response's score is their sum.
        response_mask: ``[bs, T]`` 1 on response tokens.
        index: ``[bs]`` prompt uid of each response (verl passes a numpy object array).
        config: verl's ``algorithm`` config (K from ``quantile_k``, options from ``qae``).
        **kwargs: other keys verl passes (ignored).

    Returns:
        ``(advantages, returns)``, both ``[bs, T]``, zero outside ``response_mask``.
    """
    opts = read_options(config)
    return _advantages(token_level_rewards, response_mask, _require_index(index), opts, opts.k)


# Adaptive K: one controller per process (the TaskRunner), built on first use.
_CONTROLLER: dict[str, Any] = {}


def reset_controller() -> None:
    """Forget the ``qae_adaptive`` controller and pending signals (a new run, tests)."""
    _CONTROLLER.clear()
    _LAST_ENTROPY.clear()
    _PENDING.clear()


def _build_controller(config: Any) -> dict[str, Any]:
    section = _plain(_get(config, "qae_kcontrol"))
    state_path = section.pop("state_path", None)
    known = {f.name for f in fields(KControlConfig)}
    unknown = sorted(set(section) - known)
    if unknown:
        raise ValueError(
            f"unknown key algorithm.qae_kcontrol.{unknown[0]}; known: "
            f"{', '.join(sorted(known | {'state_path'}))}"
        )
    if "k" not in section and _get(config, "quantile_k") is not None:
        section["k"] = float(_get(config, "quantile_k"))
    controller: KController = make_controller(KControlConfig(**section))
    entry: dict[str, Any] = {"controller": controller, "state_path": state_path}
    entry["updates"], entry["pending"] = 0, None
    if state_path and os.path.isfile(state_path):
        with open(state_path, encoding="utf-8") as fh:
            saved = json.load(fh)
        controller.load_state_dict(saved["kcontrol"])
        entry["updates"], entry["pending"] = int(saved["updates"]), saved.get("pending")
    return entry


def _save(entry: dict[str, Any]) -> None:
    path = entry["state_path"]
    if not path:
        return
    state = {
        "kcontrol": entry["controller"].state_dict(),
        "updates": entry["updates"],
        "pending": entry["pending"],
    }
    atomic_write_json(path, state)


def qae_adaptive_advantage(
    token_level_rewards: Tensor,
    response_mask: Tensor,
    index: np.ndarray | Sequence[Any] | None = None,
    config: Any = None,
    **kwargs: Any,
) -> tuple[Tensor, Tensor]:
    """verl estimator ``qae_adaptive``: ``qae`` with K from a K controller.

    Same arguments and return as :func:`qae_advantage`. The controller (module state,
    built from ``algorithm.qae_kcontrol``) is first updated with the previous call's
    zero-advantage fraction and the last ``actor/entropy`` verl logged, then gives this
    batch's K (a float, or one per group for ``kind=difficulty``).
    """
    opts = read_options(config)
    index = _require_index(index)
    if not _CONTROLLER:
        _CONTROLLER.update(_build_controller(config))
    entry = _CONTROLLER
    ctrl: KController = entry["controller"]
    if entry["pending"] is not None:
        entropy = _LAST_ENTROPY[0] if _LAST_ENTROPY else math.nan
        ctrl.update({"step": entry["updates"], "entropy": entropy, **entry["pending"]})
        entry["updates"] += 1
        _LAST_ENTROPY.clear()
    scores = _scores(token_level_rewards, response_mask)
    k = ctrl.batch_k(scores, index)
    adv, returns = _advantages(token_level_rewards, response_mask, index, opts, k)
    entry["pending"] = {"frac_zero_adv": _PENDING["qae/frac_zero_adv"]}
    _PENDING.update({f"qae/kcontrol/{n}": float(v) for n, v in ctrl.metrics().items()})
    _save(entry)
    return adv, returns


_ESTIMATORS = {"qae": qae_advantage, "qae_adaptive": qae_adaptive_advantage}


def register() -> list[str]:
    """Register :data:`ESTIMATOR_NAMES` in verl's registry (idempotent); returns the names.

    Raises ``ImportError`` naming the extra when verl is not installed.
    """
    try:
        from verl.trainer.ppo import core_algos
    except ImportError as err:
        raise ImportError(
            "qae.integrations.verl needs verl: pip install 'qae[verl]' (verl>=0.6)"
        ) from err
    for name, fn in _ESTIMATORS.items():
        core_algos.register_adv_est(name)(fn)
    _install_tracking_hook()
    return list(_ESTIMATORS)


# --------------------------------------------------------------------------------------
# Launcher


def _with_module(value: str | None) -> str:
    """``value`` (a comma-separated module list) with :data:`MODULE` added once."""
    mods = [m.strip() for m in (value or "").split(",") if m.strip()]
    if MODULE not in mods:
        mods.append(MODULE)
    return ",".join(mods)


def launch_overrides(overrides: Sequence[str]) -> list[str]:
    """Hydra overrides for verl's trainer: ``overrides`` plus the Ray ``runtime_env`` entry
    that sets :data:`ENV_VAR` in every Ray worker (unless the user already sets it)."""
    out = list(overrides)
    if any(ENV_VAR in o for o in out):
        return out
    value = _with_module(os.environ.get(ENV_VAR))
    ours = f"++ray_kwargs.ray_init.runtime_env.env_vars.{ENV_VAR}='{value}'"
    # Hydra's argparse wants the overrides in one run: put ours next to the first one.
    i = 0
    while i < len(out) and out[i].startswith("-"):
        i += 2 if out[i] in _HYDRA_VALUE_FLAGS else 1
    out.insert(min(i, len(out)), ours)
    return out


# Hydra command-line flags that take a value (``--cfg job``): not overrides.
_HYDRA_VALUE_FLAGS = frozenset(
    ("--cfg", "-c", "--package", "-p", "--config-path", "-cp", "--config-name", "-cn")
    + ("--config-dir", "-cd", "--experimental-rerun")
)


def main(argv: Sequence[str] | None = None, *, entry: str = "verl.trainer.main_ppo") -> None:
    """Run verl's PPO trainer with the qae estimators registered in every process.

    ``python -m qae.integrations.verl algorithm.adv_estimator=qae ++algorithm.quantile_k=0.4
    ...`` takes the same Hydra overrides (and ``--cfg job`` etc.) as
    ``python -m verl.trainer.main_ppo``.
    """
    import runpy

    args = list(sys.argv[1:] if argv is None else argv)
    os.environ[ENV_VAR] = _with_module(os.environ.get(ENV_VAR))
    import verl  # noqa: F401  (imports MODULE through ENV_VAR, which registers)
    from verl.trainer.ppo import core_algos

    missing = [n for n in ESTIMATOR_NAMES if n not in core_algos.ADV_ESTIMATOR_REGISTRY]
    if missing:
        raise RuntimeError(
            f"verl did not import {MODULE} through {ENV_VAR} (estimators {missing} missing); "
            "this verl version is too old (needs >= 0.6)"
        )
    sys.argv = [entry, *launch_overrides(args)]
    runpy.run_module(entry, run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
else:
    try:
        register()
    except ImportError:
        pass  # verl missing: the estimator functions stay usable, register() explains
