"""Presets: the columns of EDM's Table 1 as data files, validated into typed dataclasses.

A preset has three sections: ``sampling`` (a Sampler: solver, discretization, schedule, scaling, steps, noise
range, churn), ``preconditioning`` (a preconditioner name and parameters) and ``training`` (a loss). Built-in
presets live in ``presets/*.toml`` and ship inside the package; any TOML file of the same form loads by path.
A built-in name always means the built-in preset; a value is a path only when it ends in ``.toml`` or contains a
path separator, so a file or folder named ``edm`` in the current directory changes nothing. Preset text is read
through :func:`read_toml`, which bounds its size and nesting and turns every parser failure into a ConfigError.
Mix and match with ``replace``: ``load_preset("vp").replace(sampling=load_preset("edm").sampling)`` is the EDM
sampler over a VP-trained network.
"""

from __future__ import annotations

import dataclasses
import math
import os
import stat
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Mapping

from .errors import ConfigError
from .losses import LOSSES, DenoisingLoss
from .precond import PRECONDITIONERS, build_precond
from .registry import MAX_INT, build_dataclass, show
from .sampling import Churn, Sampler

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

MAX_TOML_BYTES = 1 << 20  # a preset is a few hundred bytes; a megabyte is a mistake or an attack
MAX_TOML_DEPTH = 16  # a preset nests tables and lists four deep at most

_SECTIONS = ("name", "description", "sampling", "preconditioning", "training")
_SAMPLER_FIELDS = tuple(f.name for f in dataclasses.fields(Sampler))
_CHURN_FIELDS = tuple(f.name for f in dataclasses.fields(Churn))


@dataclass(frozen=True)
class PrecondConfig:
    """A preconditioner by name with its parameters; ``build(model)`` wraps a backbone."""

    name: str = "edm"
    params: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        for key, value in self.params.items():
            _check_precond_value(self.name, key, value)
        try:
            build_precond({"name": self.name, **self.params})  # validates name and parameters now, not at use
        except (TypeError, ValueError, OverflowError) as exc:
            if isinstance(exc, ConfigError):
                raise
            raise ConfigError(f"bad option for preconditioner {self.name!r}: {exc}") from None

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


class TOMLSyntaxError(ConfigError):
    """Text that is not TOML at all (as opposed to TOML too large, too deep or not UTF-8)."""


def _check_precond_value(name: str, key: str, value) -> None:
    """A preconditioner parameter from plain data: a bool, or a number that is not NaN, an integer of sane size,
    and finite except for a sigma_max (EDM's default network range is [0, inf])."""
    if isinstance(value, bool):
        return
    if not isinstance(value, (int, float)):
        raise ConfigError(f"preconditioner {name!r} option {key!r} must be a number, got {show(value)}")
    if isinstance(value, int) and abs(value) > MAX_INT:
        raise ConfigError(f"preconditioner {name!r} option {key!r} is out of range: {show(value)}")
    if math.isnan(value) or (math.isinf(value) and key != "sigma_max"):
        raise ConfigError(f"preconditioner {name!r} option {key!r} must be a finite number, got {value}")


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


def is_preset_path(value: str | Path) -> bool:
    """Whether a --preset value names a file: a Path, or text ending in .toml or holding a path separator.
    Anything else is a built-in name, whatever the current directory holds."""
    if isinstance(value, Path):
        return True
    text = str(value)
    return text.endswith(".toml") or os.sep in text or "/" in text or bool(os.altsep and os.altsep in text)


def load_preset(name_or_path: str | Path) -> Preset:
    """Loads a built-in preset by name ("edm", "vp", "ve", "iddpm") or a preset file by path (a ``Path``, or text
    ending in ``.toml`` or holding a path separator, e.g. ``./mine.toml``)."""
    if is_preset_path(name_or_path):
        path = Path(name_or_path)
        source = f"preset file {show(str(path), 1000)}"
        return preset_from_dict(read_toml(_read_preset_file(path, source), source), source)
    names = builtin_presets()
    if name_or_path not in names:
        raise ConfigError(f"unknown preset {show(name_or_path)}; built-in presets: {', '.join(names)} (or a preset "
                          "file: a path ending in .toml)")
    source = f"preset {name_or_path!r}"
    text = resources.files("edm_toolkit.preset_data").joinpath(f"{name_or_path}.toml").read_bytes()
    return preset_from_dict(read_toml(text, source), source)


def _read_preset_file(path: Path, source: str) -> bytes:
    """The bytes of a regular file of at most MAX_TOML_BYTES (a FIFO or device would block or never end)."""
    try:
        info = path.stat()
    except FileNotFoundError:
        raise ConfigError(f"{source} not found") from None
    except OSError as exc:
        raise ConfigError(f"cannot read {source}: {exc.strerror or exc}") from None
    if stat.S_ISDIR(info.st_mode):
        raise ConfigError(f"{source} is a directory; give a .toml file")
    if not stat.S_ISREG(info.st_mode):
        raise ConfigError(f"{source} is not a regular file")
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_TOML_BYTES + 1)
    except OSError as exc:
        raise ConfigError(f"cannot read {source}: {exc.strerror or exc}") from None
    if len(data) > MAX_TOML_BYTES:
        raise ConfigError(f"{source} is larger than {MAX_TOML_BYTES // 1024} KiB; a preset is a short TOML file")
    return data


def read_toml(data: bytes | str, source: str = "TOML") -> dict[str, Any]:
    """Parses TOML text from a user, bounded: at most MAX_TOML_BYTES of UTF-8, nested at most MAX_TOML_DEPTH deep.

    Every failure is a ConfigError naming ``source``: invalid TOML, text that is not UTF-8, nesting so deep that
    the parser would run out of stack, integers too long to convert.
    """
    if isinstance(data, str):
        try:
            data = data.encode("utf-8")
        except UnicodeEncodeError:
            raise ConfigError(f"{source} is not UTF-8 text") from None
    if len(data) > MAX_TOML_BYTES:
        raise ConfigError(f"{source} is larger than {MAX_TOML_BYTES // 1024} KiB")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{source} is not UTF-8 text (byte {exc.start})") from None
    try:
        parsed = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise TOMLSyntaxError(f"{source} is not valid TOML: {exc}") from None
    except RecursionError:
        raise ConfigError(f"{source} nests lists or tables deeper than {MAX_TOML_DEPTH} levels") from None
    except ValueError as exc:  # e.g. an integer beyond Python's limit on digits, a date that does not exist
        reason = "an integer of thousands of digits" if "digits" in str(exc) else str(exc)
        raise ConfigError(f"{source} cannot be read: {reason}") from None
    if _depth(parsed) > MAX_TOML_DEPTH:
        raise ConfigError(f"{source} nests lists or tables deeper than {MAX_TOML_DEPTH} levels")
    return parsed


def _depth(value, level: int = 0) -> int:
    if level > MAX_TOML_DEPTH:
        return level
    if isinstance(value, dict):
        return max((_depth(v, level + 1) for v in value.values()), default=level + 1)
    if isinstance(value, list):
        return max((_depth(v, level + 1) for v in value), default=level + 1)
    return level


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
