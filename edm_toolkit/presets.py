"""Presets: the columns of EDM's Table 1 as data files, validated into typed dataclasses.

A preset has three sections: ``sampling`` (a Sampler: solver, discretization, schedule, scaling, steps, noise
range, churn), ``preconditioning`` (a preconditioner name and parameters) and ``training`` (a loss). Built-in
presets live in ``presets/*.toml`` and ship inside the package; any TOML file of the same form loads by path.
Mix and match with ``replace``: ``load_preset("vp").replace(sampling=load_preset("edm").sampling)`` is the EDM
sampler over a VP-trained network.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Mapping

from .errors import ConfigError
from .losses import LOSSES, DenoisingLoss
from .precond import PRECONDITIONERS, build_precond
from .registry import build_dataclass
from .sampling import Churn, Sampler

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

_SECTIONS = ("name", "description", "sampling", "preconditioning", "training")
_SAMPLER_FIELDS = tuple(f.name for f in dataclasses.fields(Sampler))
_CHURN_FIELDS = tuple(f.name for f in dataclasses.fields(Churn))


@dataclass(frozen=True)
class PrecondConfig:
    """A preconditioner by name with its parameters; ``build(model)`` wraps a backbone."""

    name: str = "edm"
    params: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        build_precond({"name": self.name, **self.params})  # validates name and parameters now, not at use

    def build(self, model=None, **geometry):
        return build_precond({"name": self.name, **self.params}, model, **geometry)


@dataclass(frozen=True)
class Preset:
    name: str
    description: str
    sampling: Sampler
    preconditioning: PrecondConfig
    training: DenoisingLoss

    def replace(self, **changes) -> "Preset":
        """A copy with whole sections or single sampling options replaced.

        ``replace(sampling=other.sampling)``, ``replace(solver="euler", num_steps=35, S_churn=40)``.
        """
        top = {k: v for k, v in changes.items() if k in _SECTIONS}
        sampling = {k: v for k, v in changes.items() if k in _SAMPLER_FIELDS}
        churn = {k: v for k, v in changes.items() if k in _CHURN_FIELDS}
        unknown = sorted(set(changes) - set(top) - set(sampling) - set(churn))
        if unknown:
            valid = ", ".join(_SECTIONS + _SAMPLER_FIELDS + _CHURN_FIELDS)
            raise ConfigError(f"unknown preset option {unknown[0]!r}; valid options: {valid}")
        preset = dataclasses.replace(self, **top)
        if churn:
            sampling["churn"] = dataclasses.replace(preset.sampling.churn, **churn)
        if sampling:
            preset = dataclasses.replace(preset, sampling=preset.sampling.replace(**sampling))
        return preset

    def to_dict(self) -> dict[str, Any]:
        """Plain data in the preset-file layout (round-trips through ``preset_from_dict``)."""
        s = self.sampling
        sampling = {"num_steps": s.num_steps}
        for key in ("sigma_min", "sigma_max"):
            if getattr(s, key) is not None:
                sampling[key] = getattr(s, key)
        for key in ("solver", "discretization", "schedule", "scaling"):
            sampling[key] = _component_dict(getattr(s, key))
        sampling["churn"] = dataclasses.asdict(s.churn)
        return {
            "name": self.name,
            "description": self.description,
            "sampling": sampling,
            "preconditioning": {"name": self.preconditioning.name, **self.preconditioning.params},
            "training": _component_dict(self.training),
        }

    def to_toml(self) -> str:
        return dump_toml(self.to_dict())


def _component_dict(component) -> dict[str, Any]:
    values = {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(component).items()}
    return {"name": component.name, **values}


def preset_from_dict(data: Mapping[str, Any], source: str = "preset") -> Preset:
    """Validates plain data (a parsed preset file) into a Preset; errors name ``source`` and the bad key."""
    try:
        return _preset_from_dict(data)
    except ConfigError as exc:
        raise ConfigError(f"{source}: {exc}") from None


def _preset_from_dict(data: Mapping[str, Any]) -> Preset:
    _check_keys(data, _SECTIONS, "preset")
    for key in ("sampling", "preconditioning", "training"):
        if not isinstance(data.get(key, {}), Mapping):
            raise ConfigError(f"[{key}] must be a table")
    sampling = dict(data.get("sampling", {}))
    _check_keys(sampling, _SAMPLER_FIELDS, "[sampling]")
    if "churn" in sampling:
        if not isinstance(sampling["churn"], Mapping):
            raise ConfigError("[sampling.churn] must be a table")
        sampling["churn"] = build_dataclass(Churn, sampling["churn"], "[sampling.churn]")
    for key in ("num_steps", "sigma_min", "sigma_max"):
        hint = int if key == "num_steps" else float
        if key in sampling:
            sampling[key] = _scalar(sampling[key], hint, f"[sampling] {key}")
    precond = dict(data.get("preconditioning", {"name": "edm"}))
    name = precond.pop("name", None)
    if name not in PRECONDITIONERS:
        PRECONDITIONERS.get(name)  # raises with the valid choices
    return Preset(
        name=str(data.get("name", "custom")),
        description=str(data.get("description", "")),
        sampling=Sampler(**sampling),
        preconditioning=PrecondConfig(name, precond),
        training=LOSSES.create(data.get("training", "edm")),
    )


def _check_keys(data: Mapping[str, Any], valid: tuple[str, ...], where: str) -> None:
    unknown = sorted(set(data) - set(valid))
    if unknown:
        raise ConfigError(f"unknown key {unknown[0]!r} in {where}; valid keys: {', '.join(valid)}")


def _scalar(value, hint, what):
    from .registry import coerce

    return coerce(value, hint, what)


def builtin_presets() -> list[str]:
    """Names of the presets shipped with the package."""
    return sorted(p.name[: -len(".toml")] for p in resources.files("edm_toolkit.preset_data").iterdir()
                  if p.name.endswith(".toml"))


def load_preset(name_or_path: str | Path) -> Preset:
    """Loads a built-in preset by name ("edm", "vp", "ve", "iddpm") or any preset file by path."""
    path = Path(name_or_path)
    if path.suffix == ".toml" or path.exists():
        if not path.is_file():
            raise ConfigError(f"preset file {str(path)!r} not found")
        text, source = path.read_text(), str(path)
    else:
        names = builtin_presets()
        if str(name_or_path) not in names:
            raise ConfigError(f"unknown preset {str(name_or_path)!r}; built-in presets: {', '.join(names)} (or a path to a .toml file)")
        text = resources.files("edm_toolkit.preset_data").joinpath(f"{name_or_path}.toml").read_text()
        source = f"preset {name_or_path!r}"
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{source} is not valid TOML: {exc}") from None
    return preset_from_dict(data, source)


def dump_toml(data: Mapping[str, Any]) -> str:
    """Writes nested plain data (str, int, float incl. inf, bool, lists, tables) as TOML."""
    lines: list[str] = []
    _dump_table(data, [], lines)
    return "\n".join(lines).strip() + "\n"


def _dump_table(table, path, lines):
    scalars = {k: v for k, v in table.items() if not isinstance(v, Mapping)}
    subtables = {k: v for k, v in table.items() if isinstance(v, Mapping)}
    if path and scalars:
        lines.append(f"\n[{'.'.join(path)}]")
    for key, value in scalars.items():
        lines.append(f"{key} = {_toml_value(value)}")
    for key, value in subtables.items():
        _dump_table(value, path + [key], lines)


def _toml_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return repr(value)
    if isinstance(value, int):
        return str(value)
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"cannot write {type(value).__name__} to TOML")
