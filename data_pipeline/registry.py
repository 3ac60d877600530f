"""Name -> object registries (timm's ``@register_model`` pattern): the datasets of
``data_pipeline.datasets``, and avmoe's backbones, adapters, heads and tasks.

A registry raises a ``KeyError`` that lists the known names, so a typo in a config names
itself and its alternatives.
"""

from __future__ import annotations

from typing import Callable, Generic, Iterator, TypeVar

T = TypeVar("T")


class Registry(Generic[T]):
    def __init__(self, kind: str):
        self.kind = kind
        self._items: dict[str, T] = {}

    def register(self, name: str | None = None) -> Callable[[T], T]:
        """Decorator: ``@REG.register("name")`` or ``@REG.register()`` (uses ``__name__``)."""

        def deco(obj: T) -> T:
            key = name or getattr(obj, "__name__")
            if key in self._items:
                raise KeyError(f"{self.kind} {key!r} is registered twice")
            self._items[key] = obj
            return obj

        return deco

    def add(self, name: str, obj: T) -> T:
        return self.register(name)(obj)

    def remove(self, name: str) -> T:
        """Unregister ``name`` (e.g. a plug-in a test registered); returns what it held."""
        self.get(name)  # the KeyError that lists the known names
        return self._items.pop(name)

    def get(self, name: str) -> T:
        try:
            return self._items[name]
        except KeyError:
            known = ", ".join(sorted(self._items)) or "(none)"
            raise KeyError(f"unknown {self.kind} {name!r}; known: {known}") from None

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(sorted(self._items))

    def names(self) -> list[str]:
        return sorted(self._items)

    def __len__(self) -> int:
        return len(self._items)
