"""One registry per extension point (strategies, scenarios, distillation losses, ...).

A decorator registers a name, `create(name, **kw)` builds it, `names()` lists them. A duplicate name
raises; an unknown name raises `ValueError` listing the valid ones and the closest match.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable
from typing import Any


def closest(name: str, options: list[str]) -> str | None:
    """The option most similar to `name`, or None when nothing is close."""
    match = difflib.get_close_matches(name, options, n=1, cutoff=0.5)
    return match[0] if match else None


def did_you_mean(name: str, options: list[str]) -> str:
    """The hint ` (did you mean 'x'?)` for the option closest to `name`; empty when nothing is close."""
    near = closest(name, options)
    return f" (did you mean {near!r}?)" if near else ""


class Registry:
    """Name -> builder table for one kind of extension (e.g. "strategy")."""

    def __init__(self, kind: str):
        self.kind = kind
        self._items: dict[str, Callable[..., Any]] = {}

    def register(self, name: str | None = None) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
        """Decorator registering a class or factory under `name` (default: its `__name__`)."""

        def deco(obj: Callable[..., Any]) -> Callable[..., Any]:
            key = name or obj.__name__
            if key in self._items:
                raise ValueError(f"{self.kind} {key!r} is already registered")
            self._items[key] = obj
            return obj

        return deco

    def get(self, name: str) -> Callable[..., Any]:
        """The registered builder for `name`."""
        if name not in self._items:
            valid = sorted(self._items)
            hint = did_you_mean(str(name), valid)
            raise ValueError(f"unknown {self.kind} {name!r}{hint}; valid: {', '.join(valid)}")
        return self._items[name]

    def create(self, name: str, **kwargs: Any) -> Any:
        """Build the registered `name` with `kwargs`."""
        return self.get(name)(**kwargs)

    def names(self) -> list[str]:
        """Registered names, sorted."""
        return sorted(self._items)

    def __contains__(self, name: str) -> bool:
        return name in self._items
