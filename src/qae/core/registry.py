"""Name registries: one per concept (estimators, losses, rewards, ...), owned by its module.

A user picks a component by string (``estimator="qae"``). Registering a different object
under a taken name raises; looking up an unknown name raises and lists the known ones.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

T = TypeVar("T")


class Registry(Generic[T]):
    """A name -> object mapping with helpful errors.

    Args:
        kind: what the registry holds, used in error messages ("estimator", "loss").
        field: the argument name users pass the name through, used in error messages.
    """

    def __init__(self, kind: str, field: str) -> None:
        self.kind = kind
        self.field = field
        self._items: dict[str, T] = {}

    def register(self, name: str, obj: T, *, override: bool = False) -> T:
        """Add ``obj`` under ``name``; re-registering the same object is a no-op."""
        if not isinstance(name, str) or not name:
            raise ValueError(f"{self.kind} name must be a non-empty string, got {name!r}")
        current = self._items.get(name)
        if current is not None and current is not obj and not override:
            raise ValueError(
                f"{self.kind} {name!r} is already registered to {current!r}; "
                f"pass override=True to replace it"
            )
        self._items[name] = obj
        return obj

    def decorator(self, name: str, *, override: bool = False) -> Callable[[T], T]:
        """``@registry.decorator("name")`` form of :meth:`register`."""

        def wrap(obj: T) -> T:
            return self.register(name, obj, override=override)

        return wrap

    def get(self, name: str) -> T:
        """Look up ``name``; an unknown name raises ``ValueError`` listing the known ones."""
        try:
            return self._items[name]
        except (KeyError, TypeError):
            raise ValueError(
                f"unknown {self.kind} {self.field}={name!r}; known: {', '.join(self.names())}"
            ) from None

    def names(self) -> list[str]:
        """Registered names, sorted."""
        return sorted(self._items)

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self._items)
