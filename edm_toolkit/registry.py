"""Name -> class registries for the design-space components, and validation of their parameters.

Every component is a frozen dataclass registered under a short name (the paper's vocabulary). A component is
built from plain data, ``{"name": "edm", "rho": 7}`` or just ``"edm"``; unknown names, unknown keys and values
of the wrong type are rejected with a message that lists the valid choices.

This is the one path from plain data (a preset file, ``--solver-opt``) to a parameter: a float must be finite
(infinity only where the field says ``metadata={"allow_inf": True}``, as EDM's S_max), an integer at most
``MAX_INT`` in magnitude; error messages show values shortened (:func:`show`).
"""

from __future__ import annotations

import dataclasses
import math
import typing
from typing import Any, Generic, Mapping, TypeVar

from .errors import ConfigError

T = TypeVar("T")

# No count, size or index an option needs comes near this; beyond it a float no longer holds every integer.
MAX_INT = 2**53


def show(value: Any, limit: int = 60) -> str:
    """``repr(value)`` for an error message, shortened: a hostile value (a megabyte of text, an integer of
    thousands of digits, which ``repr`` itself refuses to write) must not become a megabyte-long error line."""
    if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 64:
        low = int((value.bit_length() - 1) * math.log10(2))  # 10**low <= 2**(bits - 1) <= |value|
        digits = low + 2 if abs(value) >= 10 ** (low + 1) else low + 1
        return f"an integer of {digits} digits"
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


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
                f"unknown {self.kind} {show(name)}; choose one of: {', '.join(self._classes)}"
            ) from None

    def __contains__(self, name: object) -> bool:
        return name in self._classes

    def create(self, spec: "str | Mapping[str, Any] | T", **overrides: Any) -> T:
        """Builds a component from a name, a ``{"name": ..., **params}`` mapping, or an instance (returned as is,
        or a copy with ``overrides``, validated as any other parameters)."""
        if isinstance(spec, str):
            cls, params = self.get(spec), {}
        elif isinstance(spec, Mapping):
            params = dict(spec)
            if "name" not in params:
                raise ConfigError(f"{self.kind} table needs a 'name' key; choose one of: {', '.join(self._classes)}")
            cls = self.get(params.pop("name"))
        elif any(isinstance(spec, c) for c in self._classes.values()):
            if not overrides:
                return spec  # type: ignore[return-value]
            cls, params = type(spec), {f.name: getattr(spec, f.name) for f in dataclasses.fields(spec) if f.init}
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
    # Types and integer sizes first; infinities pass to the component's own checks, whose messages give its range.
    values = {key: coerce(value, hints[key], f"{what} option {key!r}", allow_inf=True) for key, value in params.items()}
    try:
        component = cls(**values)
    except ConfigError:
        raise
    except (TypeError, ValueError, ArithmeticError) as exc:
        raise ConfigError(f"{what}: {exc}") from None
    for key, value in values.items():  # the net under those checks: infinity only where the field allows it
        if not fields[key].metadata.get("allow_inf", False) and _has_inf(value):
            raise ConfigError(f"{what} option {key!r} must be finite, got {show(value)}")
    return component


def _has_inf(value: Any) -> bool:
    if isinstance(value, float):
        return math.isinf(value)
    return isinstance(value, tuple) and any(_has_inf(v) for v in value)


def coerce(value: Any, hint: Any, what: str, *, allow_inf: bool = False) -> Any:
    """Checks ``value`` against a type hint (float, int, bool, str, tuple[float, ...], Optional), converting ints to
    floats. Floats must be finite (``allow_inf``: +-inf is allowed), integers at most ``MAX_INT`` in magnitude."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin is typing.Union or (origin is not None and str(origin) == "<class 'types.UnionType'>"):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        if len(inner) == 1:
            return coerce(value, inner[0], what, allow_inf=allow_inf)
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{what} must be a number, got {show(value)}")
        if isinstance(value, int) and abs(value) > MAX_INT:
            raise ConfigError(f"{what} is out of range: {show(value)}")
        value = float(value)
        if math.isnan(value) or (math.isinf(value) and not allow_inf):
            raise ConfigError(f"{what} must be a finite number, got {value}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer() and abs(value) <= MAX_INT:
                return int(value)
            raise ConfigError(f"{what} must be an integer, got {show(value)}")
        if abs(value) > MAX_INT:
            raise ConfigError(f"{what} is out of range: {show(value)} (at most 2**53 in magnitude)")
        return value
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{what} must be true or false, got {show(value)}")
        return value
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"{what} must be a string, got {show(value)}")
        return value
    if origin is tuple:
        if isinstance(value, (str, bytes)) or not hasattr(value, "__iter__"):
            raise ConfigError(f"{what} must be a list, got {show(value)}")
        return tuple(coerce(v, args[0], what, allow_inf=allow_inf) for v in value)
    return value
