"""One registry-by-name for students, teachers, dataset formats and augmentation presets (the timm pattern)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any


class Registry(dict):
    """name -> factory, filled by the `@registry.register(name)` decorator; registering a name twice is an error."""

    def __init__(self, kind: str):
        super().__init__()
        self.kind = kind

    def register(self, name: str) -> Callable[[Any], Any]:
        def wrap(factory: Any) -> Any:
            if name in self:
                raise ValueError(f"{self.kind} {name!r} is registered twice")
            self[name] = factory
            return factory

        return wrap
