"""Name -> class registries for the design-space components, and validation of their parameters.

Every component is a frozen dataclass registered under a short name (the paper's vocabulary). A component is
built from plain data, ``{"name": "edm", "rho": 7}`` or just ``"edm"``; unknown names, unknown keys and values
of the wrong type are rejected with a message that lists the valid choices.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from typing import Any, Generic, Mapping, TypeVar

from .errors import ConfigError

T = TypeVar("T")


class Registry(Generic[T]):
    """A closed set of component classes of one kind (e.g. "discretization"), looked up by name."""

    def __init__(self, kind: str):
        self.kind = kind
        self._classes: dict[str, type[T]] = {}

    def register(self, cls: type[T]) -> type[T]:
        """Class decorator: registers ``cls`` under ``cls.name``."""
        name = cls.name  # type: ignore[attr-defined]
        if name in self._classes:
            raise RuntimeError(f"{self.kind} {name!r} registered twice")
        self._classes[name] = cls
        return cls

    def names(self) -> list[str]:
        return list(self._classes)

    def get(self, name: str) -> type[T]:
        try:
            return self._classes[name]
        except (KeyError, TypeError):
            raise ConfigError(
                f"unknown {self.kind} {name!r}; choose one of: {', '.join(self._classes)}"
            ) from None

    def __contains__(self, name: object) -> bool:
        return name in self._classes

    def create(self, spec: "str | Mapping[str, Any] | T", **overrides: Any) -> T:
        """Builds a component from a name, a ``{"name": ..., **params}`` mapping, or returns an instance as is."""
        if isinstance(spec, str):
            cls, params = self.get(spec), {}
        elif isinstance(spec, Mapping):
            params = dict(spec)
            if "name" not in params:
                raise ConfigError(f"{self.kind} table needs a 'name' key; choose one of: {', '.join(self._classes)}")
            cls = self.get(params.pop("name"))
        elif any(isinstance(spec, c) for c in self._classes.values()):
            return dataclasses.replace(spec, **overrides) if overrides else spec  # type: ignore[type-var]
        else:
            raise ConfigError(f"{self.kind} must be a name or a table, got {type(spec).__name__}")
        params.update(overrides)
        return build_dataclass(cls, params, what=f"{self.kind} {cls.name!r}")  # type: ignore[attr-defined]


def build_dataclass(cls: type[T], params: Mapping[str, Any], what: str) -> T:
    """Instantiates dataclass ``cls`` from plain data, checking keys and value types against its fields."""
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}  # type: ignore[arg-type]
    unknown = sorted(set(params) - set(fields))
    if unknown:
        valid = ", ".join(fields) or "(none)"
        raise ConfigError(f"unknown option {unknown[0]!r} for {what}; valid options: {valid}")
    hints = typing.get_type_hints(cls)
    values = {key: coerce(value, hints[key], f"{what} option {key!r}") for key, value in params.items()}
    try:
        return cls(**values)
    except ConfigError:
        raise
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{what}: {exc}") from None


def coerce(value: Any, hint: Any, what: str) -> Any:
    """Checks ``value`` against a type hint (float, int, bool, str, tuple[float, ...], Optional), converting ints to floats."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin is typing.Union or (origin is not None and str(origin) == "<class 'types.UnionType'>"):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        if len(inner) == 1:
            return coerce(value, inner[0], what)
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{what} must be a number, got {value!r}")
        value = float(value)
        if math.isnan(value):
            raise ConfigError(f"{what} must be a number, got nan")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise ConfigError(f"{what} must be an integer, got {value!r}")
        return value
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{what} must be true or false, got {value!r}")
        return value
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"{what} must be a string, got {value!r}")
        return value
    if origin is tuple:
        if isinstance(value, (str, bytes)) or not hasattr(value, "__iter__"):
            raise ConfigError(f"{what} must be a list, got {value!r}")
        return tuple(coerce(v, args[0], what) for v in value)
    return value
