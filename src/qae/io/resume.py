"""Resuming a run: the newest whole checkpoint, read strictly.

A checkpoint is whole when every file its manifest lists is there with its size and
sha256 (:meth:`qae.io.runlog.Checkpointer.verify`), ``state.pt`` loads (``weights_only``) with
every part of the run state, and the safetensors files hold exactly the model's weights.
Nothing is changed in the model until all of that is known, so a damaged checkpoint can be
passed over for an older whole one, and a run never goes on from the base weights.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import torch

from qae.io.errors import CheckpointError
from qae.io.runlog import Checkpointer

__all__ = ["STATE_KEYS", "load_weights", "read_checkpoint", "resume_checkpoint", "weights_mismatch"]


def load_weights(model: torch.nn.Module, folder: Path) -> None:
    """Load a checkpoint's safetensors shards into ``model``, strictly: every weight of the
    model with its shape (a tied weight may be stored once) and nothing else. Raises
    :class:`qae.io.errors.CheckpointError`, leaving the model as it was, otherwise."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"{folder.name}/ holds no *.safetensors weights")
    state_dict: dict[str, torch.Tensor] = {}
    for w in files:
        try:
            state_dict.update(load_file(str(w)))
        except (SafetensorError, OSError, ValueError, RuntimeError) as err:
            raise CheckpointError(f"{folder.name}/{w.name} cannot be read: {err}") from err
    problem = weights_mismatch(model.state_dict(), state_dict)
    if problem is not None:
        raise CheckpointError(f"{folder.name}/: {problem}")
    model.load_state_dict(state_dict, strict=False)  # strictness checked above, ties allowed


def weights_mismatch(
    expected: dict[str, torch.Tensor], stored: dict[str, torch.Tensor]
) -> str | None:
    """What keeps ``stored`` from being exactly the model's weights ``expected``, or None.
    A weight absent from ``stored`` is fine when it shares its memory with a stored one."""
    shared = {expected[k].data_ptr() for k in stored if k in expected} - {0}
    missing = [k for k in expected if k not in stored and expected[k].data_ptr() not in shared]
    unknown = [k for k in stored if k not in expected]
    shapes = [k for k in stored if k in expected and stored[k].shape != expected[k].shape]
    parts = []
    for label, keys in (("missing", missing), ("unknown", unknown), ("of another shape", shapes)):
        if keys:
            more = ", ..." if len(keys) > 3 else ""
            parts.append(f"{len(keys)} weight(s) {label} ({', '.join(keys[:3])}{more})")
    return "; ".join(parts) or None


STATE_KEYS = (
    "step",
    "optimizer",
    "scheduler",
    "torch_rng",
    "python_rng",
    "consumed",
    "kcontrol",
    "history",
)


def read_checkpoint(path: Path, model: torch.nn.Module) -> dict[str, Any]:
    """The run state of the checkpoint at ``path``, its weights loaded into ``model``.
    Raises :class:`qae.io.errors.CheckpointError` (the model untouched) when the manifest
    does not match, ``state.pt`` cannot be loaded or a weight is missing."""
    problem = Checkpointer.verify(path)
    if problem is not None:
        raise CheckpointError(problem)
    try:
        state = Checkpointer.load_state(path)
    except Exception as err:  # torch raises RuntimeError, EOFError, UnpicklingError, ...
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise CheckpointError(f"state.pt cannot be loaded: {first}") from err
    lacking = [k for k in STATE_KEYS if not isinstance(state, dict) or k not in state]
    if lacking:
        raise CheckpointError(f"state.pt lacks {', '.join(lacking)}")
    load_weights(model, path / "model")
    return state


def resume_checkpoint(ckpt: Checkpointer, model: torch.nn.Module) -> dict[str, Any]:
    """The run state of the newest whole checkpoint, its weights loaded into ``model``.

    Damaged newer checkpoints are moved to ``checkpoints/damaged/`` with a warning; when
    none is whole, :class:`qae.io.errors.CheckpointError` says what is wrong with each: a run
    never goes on from the base weights.
    """
    damaged: list[tuple[Path, str]] = []
    for path in ckpt.candidates():
        try:
            state = read_checkpoint(path, model)
        except CheckpointError as err:
            damaged.append((path, str(err)))
            continue
        for bad, why in damaged:
            moved = ckpt.set_aside(bad)
            warnings.warn(
                f"checkpoint {bad.name} is damaged ({why}); moved to {moved}; resuming from "
                f"{path.name}",
                stacklevel=3,
            )
        return state
    found = "; ".join(f"{p.name}: {why}" for p, why in damaged)
    raise CheckpointError(
        f"cannot resume {str(ckpt.root.parent)!r}: no whole checkpoint ({found}); the run "
        f"will not go on from the base weights"
    )
