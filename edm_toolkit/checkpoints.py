"""The toolkit's own model file: tensors and a JSON config, loaded without executing any code.

A model file is a ``torch.save`` of a plain dict {"format", "version", "config" (JSON text), "state_dict"}
and is read back with ``torch.load(weights_only=True)``, which admits only tensors and plain containers; or,
when the path ends in ``.safetensors``, a safetensors file whose metadata holds the same header and JSON config
(read and written by :mod:`edm_toolkit.io.tensorfile`, no extra package needed). The config names a model type
from the closed registry of :mod:`edm_toolkit.io.formats` (no class names are looked up at run time) together
with its constructor arguments; the model is rebuilt within the bounds the tensors set and its weights are
loaded with strict key and shape checks. Files are recognised by content, whatever their name.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .errors import CheckpointError
from .io.formats import (
    MODEL_TYPES,
    FileSource,
    LoadOptions,
    check_geometry,
    construct,
    dtype_summary,
    layout_mismatch,
    load_wrapper,
    model_config,
    register_format,
    register_model_type,
    shapes,
)
from .ideal import IdealDenoiser
from .networks.registry import network_config
from .io.outputs import write_atomically
from .precond import Preconditioner, build_precond
from .io.tensorfile import write_safetensors

__all__ = ["FORMAT", "TOOLKIT", "VERSION", "read_model_file", "save_model"]

FORMAT = "edm-toolkit/model"
VERSION = 1


# ----------------------------------------------------------------------------------------------------------
# Model types of the toolkit itself (the adapters register theirs)


def _ideal_config(model: IdealDenoiser) -> dict[str, Any]:
    return {"shape": list(model.data.shape), "label_dim": model.label_dim, "width": model.width,
            "labelled": model.labels is not None}


def _ideal_from_config(config: dict[str, Any], tensors: Mapping[str, torch.Tensor], what: str) -> IdealDenoiser:
    data, labels = tensors.get("data"), tensors.get("labels")
    if data is None or list(data.shape) != list(config["shape"]) or (labels is None) == bool(config.get("labelled")):
        raise CheckpointError(f"the weights do not match {what} (its data must be a tensor of shape {config['shape']}"
                              f"{' with labels' if config.get('labelled') else ''})")
    model = construct(lambda: IdealDenoiser(data, labels, int(config.get("label_dim", 0)),
                                            float(config.get("width", 0.0))), what)
    check_geometry(what, model.img_resolution, model.img_channels, model.label_dim)
    return model


register_model_type("ideal", IdealDenoiser, _ideal_config, _ideal_from_config)


def _precond_config(model: Preconditioner) -> dict[str, Any]:
    if model.model is None:
        raise CheckpointError("cannot save a preconditioner without a backbone")
    try:
        network = network_config(model.model)
    except ValueError as exc:
        raise CheckpointError(f"cannot save this model: {exc}") from None
    return {"precond": model.config(), "img_resolution": model.img_resolution, "img_channels": model.img_channels,
            "network": network}


def _precond_from_config(config: dict[str, Any], tensors: Mapping[str, torch.Tensor], what: str) -> Preconditioner:
    geometry = {"img_resolution": config["img_resolution"], "img_channels": config["img_channels"]}
    check_geometry(what, geometry["img_resolution"], geometry["img_channels"], config["precond"].get("label_dim", 0))
    return load_wrapper(config["network"], tensors, "model", what,
                        lambda network: build_precond(config["precond"], network, **geometry))


register_model_type("precond", Preconditioner, _precond_config, _precond_from_config)


# ----------------------------------------------------------------------------------------------------------
# Writing and reading


def save_model(model: nn.Module, path: str | Path) -> None:
    """Writes ``model`` as a toolkit model file, atomically (``.safetensors`` paths use that format), with the
    mode a plain ``open`` gives; refuses to replace anything but a regular file."""
    path = Path(path)
    config = json.dumps(model_config(model))
    state_dict = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    if path.suffix == ".safetensors":
        metadata = {"format": FORMAT, "version": str(VERSION), "config": config}
        write_atomically(path, lambda stream: write_safetensors(stream, state_dict, metadata))
    else:
        payload = {"format": FORMAT, "version": VERSION, "config": config, "state_dict": state_dict}
        write_atomically(path, lambda stream: torch.save(payload, stream))


def read_model_file(path: str | Path | FileSource) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(config, state_dict) of a toolkit model file (torch zip or safetensors), validated, without building
    the model."""
    source = path if isinstance(path, FileSource) else FileSource(path)
    if source.container == "safetensors":
        metadata, state_dict = source.safetensors()
        if metadata.get("format") != FORMAT or metadata.get("version") != str(VERSION):
            raise CheckpointError(f"{source} is not an edm-toolkit model file (no '{FORMAT}' v{VERSION} metadata)")
        return _config(metadata.get("config"), source), state_dict
    if source.container != "torch-zip":
        raise CheckpointError(f"{source} is not an edm-toolkit model file; convert other checkpoints with "
                              "'edm convert'")
    payload = source.torch_object()
    if not isinstance(payload, Mapping) or payload.get("format") != FORMAT:
        raise CheckpointError(f"{source} is not an edm-toolkit model file (no '{FORMAT}' header); convert other "
                              "checkpoints with 'edm convert'")
    if payload.get("version") != VERSION:
        raise CheckpointError(f"{source} has model-file version {payload.get('version')!r}; this toolkit reads "
                              f"version {VERSION}")
    state_dict = payload.get("state_dict")
    if not isinstance(state_dict, Mapping) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                                      for k, v in state_dict.items()):
        raise CheckpointError(f"{source} has a missing or malformed state_dict")
    return _config(payload.get("config"), source), dict(state_dict)


def _config(text: Any, source: FileSource) -> dict[str, Any]:
    try:
        config = json.loads(text)
    except (TypeError, json.JSONDecodeError, RecursionError):
        raise CheckpointError(f"{source} has a missing or malformed config") from None
    if not isinstance(config, dict) or config.get("type") not in MODEL_TYPES:
        kind = config.get("type") if isinstance(config, dict) else None
        raise CheckpointError(f"{source}: unknown model type {kind!r} in its config; known types: "
                              f"{', '.join(MODEL_TYPES)}")
    return config


def model_from_file(source: FileSource) -> nn.Module:
    """The model of a toolkit model file, rebuilt within the bounds its tensors set, weights loaded strictly."""
    config, state_dict = read_model_file(source)
    kind = config["type"]
    what = f"the {kind} model of {source}"
    try:
        model = MODEL_TYPES[kind].from_config(config, state_dict, what)
    except (KeyError, TypeError, AttributeError) as exc:  # a config entry missing or of the wrong kind
        raise CheckpointError(f"{source}: bad {kind} model config ({type(exc).__name__}: {exc})") from None
    problem = layout_mismatch(shapes(model.state_dict()), shapes(state_dict))
    if problem:
        raise CheckpointError(f"{source}: the weights do not match the config ({problem})")
    return model.eval().requires_grad_(False)


class ToolkitFormat:
    """The toolkit's own model file (``save_model``, ``edm convert``), in a torch zip or safetensors."""

    name = "edm-toolkit"
    options = frozenset()  # the config is in the file

    def sniff(self, source: FileSource) -> bool:
        if source.container == "safetensors":
            try:
                return source.safetensors()[0].get("format") == FORMAT
            except CheckpointError:
                return False
        payload = source.readable_torch_object()
        return isinstance(payload, Mapping) and payload.get("format") == FORMAT

    def inspect(self, source: FileSource, options: LoadOptions) -> dict[str, Any]:
        config, state_dict = read_model_file(source)
        net = model_from_file(source)
        return {
            "family": self.name,
            "type": config["type"],
            "architecture": (config.get("network") or {}).get("type", config["type"]),
            "parameters": sum(p.numel() for p in net.parameters()),
            "label_dim": net.label_dim,
            "img_resolution": net.img_resolution,
            "img_channels": net.img_channels,
            "sigma_min": float(net.sigma_min),
            "sigma_max": float(net.sigma_max),
            "dtype": dtype_summary(state_dict),
            "config": config,
        }

    def load(self, source: FileSource, options: LoadOptions) -> nn.Module:
        return model_from_file(source)


TOOLKIT = register_format(ToolkitFormat())
