"""Built-in tasks by name: ``builtin:arithmetic``, ``builtin:reasoning`` (and ``builtin``,
which keeps meaning the arithmetic task, the embedded default).

``qae train`` and ``qae eval`` take these names for the model (``--model builtin:reasoning``
is the task's shipped base policy) and for the data (``--data builtin:reasoning``: the
task's training stream for ``train``, its fixed validation split for ``eval``). Each task
brings its exact verifier (a registered reward) and its response length limit.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from qae.core.registry import Registry
from qae.tasks import arithmetic, reasoning
from qae.tasks.tiny_model import MAX_NEW_TOKENS as ARITHMETIC_MAX_NEW_TOKENS

if TYPE_CHECKING:
    from qae.eval.datasets import PromptRecord

__all__ = [
    "BUILTIN",
    "BuiltinTask",
    "builtin_records",
    "builtin_task",
    "builtin_tasks",
    "is_builtin",
    "task_record",
]

BUILTIN = "builtin"
"""The bare name: the arithmetic task (the embedded default)."""

_DEFAULT_TASK = "arithmetic"


@dataclass(frozen=True)
class BuiltinTask:
    """A built-in task as the trainer and the evaluator see it."""

    name: str
    iter_train: Callable[[int], Iterator[dict]]
    """Endless seeded stream of training records (``prompt``, ``answer``, ``difficulty``)."""
    split: Callable[[str], list[dict]]
    """The fixed held-out splits by name (``validation``, ``dev``)."""
    reward: str
    """The registered name of the task's exact verifier."""
    max_new_tokens: int
    """The task's response length limit."""
    model_path: Callable[[], Path]
    """Directory of the task's shipped base policy."""


def _arithmetic_path() -> Path:
    from qae.tasks.tiny_model import tiny_model_path

    return tiny_model_path()


def _reasoning_path() -> Path:
    from qae.tasks.reasoning_model import reasoning_model_path

    return reasoning_model_path()


builtin_tasks: Registry[BuiltinTask] = Registry("built-in task", "builtin")
builtin_tasks.register(
    "arithmetic",
    BuiltinTask(
        name="arithmetic",
        iter_train=arithmetic.iter_train,
        split=arithmetic.make_split,
        reward="arithmetic",
        max_new_tokens=ARITHMETIC_MAX_NEW_TOKENS,
        model_path=_arithmetic_path,
    ),
)
builtin_tasks.register(
    "reasoning",
    BuiltinTask(
        name="reasoning",
        iter_train=reasoning.iter_train,
        split=reasoning.make_split,
        reward="reasoning",
        max_new_tokens=reasoning.MAX_NEW_TOKENS,
        model_path=_reasoning_path,
    ),
)


def is_builtin(name: str) -> bool:
    """Whether ``name`` is ``builtin`` or ``builtin:<task>`` (the task may be unknown)."""
    return name == BUILTIN or name.startswith(BUILTIN + ":")


def builtin_task(name: str, *, field: str = "builtin") -> BuiltinTask:
    """The task a ``builtin`` / ``builtin:<task>`` name stands for.

    ``field`` names the setting in the error an unknown task raises (``model.path``).
    """
    if not is_builtin(name):
        raise ValueError(f"{field}={name!r} is not a built-in name (builtin or builtin:<task>)")
    task = _DEFAULT_TASK if name == BUILTIN else name.split(":", 1)[1]
    if task not in builtin_tasks:
        known = ", ".join(f"builtin:{t}" for t in builtin_tasks.names())
        raise ValueError(f"{field}={name!r} names no built-in task; known: builtin, {known}")
    return builtin_tasks.get(task)


def task_record(row: dict, index: int, source: str = "arithmetic") -> PromptRecord:
    """A built-in task row (``prompt``, ``answer``, ``difficulty``, ...) as a prompt record
    whose id is ``<source>-<index>``; the row's other fields go into ``meta``."""
    from qae.eval.datasets import PromptRecord

    meta = {k: v for k, v in row.items() if k not in ("prompt", "answer")}
    return PromptRecord(f"{source}-{index}", row["prompt"], str(row["answer"]), source, None, meta)


def builtin_records(name: str, split: str, *, field: str = "data") -> list[PromptRecord]:
    """The fixed ``split`` of the built-in task ``name`` (``builtin:reasoning``) as prompt
    records whose source is the task's name."""
    task = builtin_task(name, field=field)
    return [task_record(r, i, task.name) for i, r in enumerate(task.split(split))]
