"""The toolkit's own model file: tensors and a JSON config, loaded without executing any code.

A model file is a ``torch.save`` of a plain dict {"format", "version", "config" (JSON text), "state_dict"}
and is read back with ``torch.load(weights_only=True)``, which admits only tensors and plain containers; or,
when the path ends in ``.safetensors`` (optional extra ``safetensors``), a safetensors file whose metadata holds
the same header and JSON config. The
config names a model type from a closed registry (no class names are looked up at run time) together with its
constructor arguments; the weights then load with strict key and shape checks.
"""

from __future__ import annotations

import json
import os
import pickle
import tempfile
import zipfile
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from .errors import CheckpointError
from .ideal import IdealDenoiser
from .networks.registry import build_network, network_config
from .precond import Preconditioner, build_precond

FORMAT = "edm-toolkit/model"
VERSION = 1

# Model types that a model file may name: type -> (config of a module, module built from a config).
_CONFIG_OF: dict[type, Callable[[nn.Module], dict[str, Any]]] = {}
_BUILDERS: dict[str, Callable[[dict[str, Any]], nn.Module]] = {}


def register_model_type(name: str, cls: type, to_config: Callable, from_config: Callable) -> None:
    """Makes ``cls`` storable in model files under the type ``name``."""
    _CONFIG_OF[cls] = lambda module: {"type": name, **to_config(module)}
    _BUILDERS[name] = from_config


def _ideal_config(model: IdealDenoiser) -> dict[str, Any]:
    return {"shape": list(model.data.shape), "label_dim": model.label_dim, "width": model.width,
            "labelled": model.labels is not None}


def _ideal_from_config(config: dict[str, Any]) -> IdealDenoiser:
    shape = [int(n) for n in config["shape"]]
    labels = torch.zeros(shape[0], dtype=torch.int64) if config.get("labelled") else None
    return IdealDenoiser(torch.zeros(shape, dtype=torch.float64), labels, int(config.get("label_dim", 0)),
                         float(config.get("width", 0.0)))


register_model_type("ideal", IdealDenoiser, _ideal_config, _ideal_from_config)


def build_backbone(config: dict[str, Any]) -> nn.Module:
    """A registered network from {"type", "kwargs"}, allocated without a random initialisation when possible."""
    module = build_network(config, device="meta")
    if {name for name, _ in module.named_buffers()} - set(module.state_dict()):
        return build_network(config)  # an unsaved buffer must be computed by the constructor
    return module.to_empty(device="cpu")


def _precond_config(model: Preconditioner) -> dict[str, Any]:
    if model.model is None:
        raise CheckpointError("cannot save a preconditioner without a backbone")
    try:
        network = network_config(model.model)
    except ValueError as exc:
        raise CheckpointError(f"cannot save this model: {exc}") from None
    return {"precond": model.config(), "img_resolution": model.img_resolution, "img_channels": model.img_channels,
            "network": network}


def _precond_from_config(config: dict[str, Any]) -> Preconditioner:
    return build_precond(config["precond"], build_backbone(config["network"]),
                         img_resolution=config["img_resolution"], img_channels=config["img_channels"])


register_model_type("precond", Preconditioner, _precond_config, _precond_from_config)


def model_config(model: nn.Module) -> dict[str, Any]:
    for cls in type(model).__mro__:
        if cls in _CONFIG_OF:
            return _CONFIG_OF[cls](model)
    raise CheckpointError(f"cannot save a {type(model).__name__}: it is not a model type of this toolkit")


def _safetensors():
    try:
        import safetensors.torch
    except ModuleNotFoundError:
        raise CheckpointError("the .safetensors format needs the optional package: pip install safetensors "
                              "(or use a .pt path)") from None
    return safetensors.torch


def save_model(model: nn.Module, path: str | Path) -> None:
    """Writes ``model`` as a toolkit model file (atomically); ``.safetensors`` paths use that format."""
    path = Path(path)
    config = json.dumps(model_config(model))
    state_dict = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    try:
        if path.suffix == ".safetensors":
            _safetensors().save_file(state_dict, tmp, metadata={"format": FORMAT, "version": str(VERSION), "config": config})
        else:
            torch.save({"format": FORMAT, "version": VERSION, "config": config, "state_dict": state_dict}, tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def read_model_file(path: str | Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(config, state_dict) of a toolkit model file, validated, without building the model."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"model file {str(path)!r} not found")
    if path.suffix == ".safetensors":
        return _read_safetensors(path)
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, zipfile.BadZipFile, ValueError) as exc:
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(
            f"{path} is not an edm-toolkit model file ({first_line[:160]}); "
            "convert other checkpoints with 'edm convert'"
        ) from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not an edm-toolkit model file (no '{FORMAT}' header)")
    if payload.get("version") != VERSION:
        raise CheckpointError(f"{path} has model-file version {payload.get('version')!r}; this toolkit reads version {VERSION}")
    try:
        config = json.loads(payload["config"])
    except (KeyError, TypeError, json.JSONDecodeError):
        raise CheckpointError(f"{path} has a missing or malformed config") from None
    state_dict = payload.get("state_dict")
    if not isinstance(state_dict, dict) or not all(isinstance(v, torch.Tensor) for v in state_dict.values()):
        raise CheckpointError(f"{path} has a missing or malformed state_dict")
    return config, state_dict


def _read_safetensors(path: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    st = _safetensors()
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
        state_dict = st.load_file(str(path))
    except Exception as exc:  # the library raises its own error types for damaged files
        raise CheckpointError(f"{path} is not a readable safetensors file ({str(exc).splitlines()[0][:160]})") from None
    if metadata.get("format") != FORMAT or metadata.get("version") != str(VERSION):
        raise CheckpointError(f"{path} is not an edm-toolkit model file (no '{FORMAT}' v{VERSION} metadata)")
    try:
        return json.loads(metadata["config"]), state_dict
    except (KeyError, json.JSONDecodeError):
        raise CheckpointError(f"{path} has a missing or malformed config") from None


def build_model(config: dict[str, Any]) -> nn.Module:
    """Builds an (untrained) model from a model-file config."""
    _register_adapters()
    kind = config.get("type") if isinstance(config, dict) else None
    if kind not in _BUILDERS:
        raise CheckpointError(f"unknown model type {kind!r} in model config; known types: {', '.join(_BUILDERS)}")
    try:
        return _BUILDERS[kind](config)
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"bad {kind} model config: {exc}") from None


def _register_adapters() -> None:
    """The adapter modules register their model types on import."""
    from .adapters import openai, score_sde  # noqa: F401


def load_model(path: str | Path, device: torch.device | str = "cpu") -> nn.Module:
    """Loads a toolkit model file: builds the model from its config and loads its weights strictly."""
    config, state_dict = read_model_file(path)
    model = build_model(config)
    try:
        model.load_state_dict(state_dict, strict=True)
    except RuntimeError as exc:
        raise CheckpointError(f"{path}: weights do not match the config ({str(exc).splitlines()[0]})") from None
    return model.eval().requires_grad_(False).to(device)
