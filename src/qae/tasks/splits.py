"""Fixed held-out splits of the built-in tasks, balanced over difficulty levels."""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass

__all__ = ["SplitSpec", "balanced"]


@dataclass(frozen=True)
class SplitSpec:
    """A fixed split's default size and the seed it is drawn with."""

    size: int
    seed: int


def balanced(
    draw: Callable[[random.Random, int], dict],
    rng: random.Random,
    n: int,
    n_levels: int,
    exclude: frozenset[str] = frozenset(),
) -> list[dict]:
    """``n`` records with distinct prompts, cycling through levels ``1..n_levels``, none
    with a prompt in ``exclude``.

    ``draw(rng, level)`` makes one record (a dict with a ``prompt``); a level whose
    prompts run out (10,000 draws without a new one) raises ``ValueError``.
    """
    records: list[dict] = []
    seen: set[str] = set(exclude)
    for i in range(n):
        level = i % n_levels + 1
        for _ in range(10_000):
            rec = draw(rng, level)
            if rec["prompt"] not in seen:
                break
        else:
            raise ValueError(f"level {level} has too few distinct prompts for n={n}")
        seen.add(rec["prompt"])
        records.append(rec)
    return records
