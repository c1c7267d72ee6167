"""One registry pattern (name -> constructor) for datasets, models, methods and selectors."""
from __future__ import annotations

from typing import Any, Callable, Dict, Generic, Iterator, TypeVar

from tinyset.errors import ConfigError

T = TypeVar("T")


class Registry(Generic[T]):
    """Maps names to constructors. Names are case-insensitive; ``-`` and ``_`` are equivalent."""

    def __init__(self, kind: str):
        self.kind = kind
        self._entries: Dict[str, T] = {}
        self._help: Dict[str, str] = {}

    @staticmethod
    def _key(name: str) -> str:
        return name.strip().lower().replace("_", "-")

    def register(self, name: str, obj: T | None = None, help: str = "") -> Any:
        """Register ``obj`` under ``name``; usable as a decorator when ``obj`` is omitted."""

        def add(o: T) -> T:
            key = self._key(name)
            if key in self._entries:
                raise ValueError(f"{self.kind} {name!r} is registered twice")
            self._entries[key] = o
            self._help[key] = help or (getattr(o, "__doc__", "") or "").strip().split("\n")[0]
            return o

        return add(obj) if obj is not None else add

    def get(self, name: str) -> T:
        key = self._key(name)
        if key not in self._entries:
            raise ConfigError(
                f"unknown {self.kind} {name!r}; known: {', '.join(self.names())}"
            )
        return self._entries[key]

    def create(self, name: str, *args: Any, **kwargs: Any) -> Any:
        ctor: Callable[..., Any] = self.get(name)  # type: ignore[assignment]
        return ctor(*args, **kwargs)

    def help(self, name: str) -> str:
        return self._help[self._key(name)]

    def names(self) -> list[str]:
        return sorted(self._entries)

    def __contains__(self, name: str) -> bool:
        return self._key(name) in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())
