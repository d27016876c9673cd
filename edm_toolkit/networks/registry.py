"""A closed registry of backbone classes that records each instance's constructor arguments.

The toolkit's model files describe a network as {"type": name, "kwargs": {...}} and rebuild it from this
registry, so no class name from a file is ever looked up dynamically.
"""

from __future__ import annotations

import functools
import inspect
from typing import Any

from torch import nn

NETWORKS: dict[str, type[nn.Module]] = {}


def register_network(name: str):
    """Class decorator: registers a backbone under ``name`` and records ``self.init_kwargs`` on construction."""

    def decorate(cls):
        if name in NETWORKS:
            raise RuntimeError(f"network {name!r} registered twice")
        init = cls.__init__
        signature = inspect.signature(init)

        @functools.wraps(init)
        def __init__(self, *args, **kwargs):
            init(self, *args, **kwargs)
            bound = signature.bind(self, *args, **kwargs)
            bound.apply_defaults()
            recorded: dict[str, Any] = {}
            for key, value in list(bound.arguments.items())[1:]:
                kind = signature.parameters[key].kind
                if kind is inspect.Parameter.VAR_KEYWORD:
                    recorded.update(value)
                elif kind is not inspect.Parameter.VAR_POSITIONAL:
                    recorded[key] = value
            if any(signature.parameters[k].kind is inspect.Parameter.VAR_POSITIONAL and v
                   for k, v in bound.arguments.items()):
                recorded = None  # extra positional arguments cannot be stored by name: not saveable
            if hasattr(self, "_init_record"):
                recorded = self._init_record()  # a class that describes itself as plain data
            # Only the outermost registered class records (a registered subclass calls super().__init__).
            if getattr(self, "network_type", None) in (None, name) or type(self) is cls:
                object.__setattr__(self, "init_kwargs", recorded)
                object.__setattr__(self, "network_type", name)

        cls.__init__ = __init__
        NETWORKS[name] = cls
        return cls

    return decorate


def network_config(module: nn.Module) -> dict[str, Any]:
    """{"type", "kwargs"} of a registered backbone instance."""
    name = getattr(module, "network_type", None)
    if name not in NETWORKS or not isinstance(getattr(module, "init_kwargs", None), dict):
        raise ValueError(f"{type(module).__name__} is not a registered network of this toolkit")
    return {"type": name, "kwargs": _plain(module.init_kwargs)}


def build_network(config: dict[str, Any]) -> nn.Module:
    """A registered backbone from {"type", "kwargs"} (random weights; load a state_dict next). Build it under
    ``with torch.device("meta")`` to check it without allocating memory; a network described by a file is
    built through :func:`edm_toolkit.io.formats.load_network`, which bounds what its arguments may ask for."""
    from . import load_all

    load_all()
    name = config.get("type")
    if not isinstance(name, str) or name not in NETWORKS:
        raise ValueError(f"unknown network type {name!r:.80}; known: {', '.join(sorted(NETWORKS))}")
    kwargs = config.get("kwargs", {})
    if not isinstance(kwargs, dict):
        raise ValueError("network kwargs must be a table")
    return NETWORKS[name](**kwargs)


def _plain(value):
    """JSON-ready copy (tuples become lists)."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise ValueError(f"constructor argument of type {type(value).__name__} cannot be stored in a model file")
