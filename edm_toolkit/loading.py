"""One entry point for every model file the toolkit reads, recognised by content, never by running it.

| family | what the file is | how it is read |
|---|---|---|
| edm-toolkit | the toolkit's own model file | torch.load(weights_only=True) |
| edm-pickle | EDM network-snapshot-*.pkl / edm-*.pkl / training-state-*.pt | restricted unpickler (adapters.edm_pickle) |
| guided-diffusion, improved-diffusion | plain state_dict .pt | torch.load(weights_only=True) + architecture from file name, flags or shapes |
| score_sde | {'model', 'ema', 'step', 'optimizer'} .pth | torch.load(weights_only=True) + config by name or inferred |
"""

from __future__ import annotations

import pickle
import zipfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .errors import CheckpointError

ZIP_MAGIC = b"PK\x03\x04"


def _read_weights_only(path: Path):
    """The object of a torch zip file if it holds only tensors and plain data; None if it needs more."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        return None  # e.g. an EDM training state, whose pickle names EDM's persistence classes
    except (RuntimeError, EOFError, zipfile.BadZipFile, ValueError) as exc:
        raise CheckpointError(f"{path} is not a readable torch file ({str(exc).splitlines()[0][:160]})") from None


def identify(path: str | Path) -> tuple[str, Any]:
    """(family, loaded object or None) for a model file, without executing anything from it."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"model file {str(path)!r} not found")
    with open(path, "rb") as f:
        head = f.read(4)
    if not head:
        raise CheckpointError(f"{path} is empty")
    if head[:1] == b"\x80":
        return "edm-pickle", None  # a bare pickle stream: only EDM's snapshots are accepted, by the restricted reader
    if head != ZIP_MAGIC:
        raise CheckpointError(
            f"{path} is not a model file of a supported format (EDM pickle, or a torch file: toolkit model file, "
            "guided/improved-diffusion state_dict, score_sde checkpoint)"
        )
    obj = _read_weights_only(path)
    if obj is None:
        return "edm-pickle", None
    from .checkpoints import FORMAT

    if isinstance(obj, dict) and obj.get("format") == FORMAT:
        return "edm-toolkit", obj
    from .adapters.openai import is_openai_state_dict
    from .adapters.score_sde import is_score_sde_checkpoint

    if is_score_sde_checkpoint(obj):
        return "score_sde", obj
    if is_openai_state_dict(obj):
        return "openai", obj
    raise CheckpointError(
        f"{path} holds {type(obj).__name__} data that is not a known model format (EDM pickle, toolkit model file, "
        "guided/improved-diffusion state_dict, score_sde checkpoint)"
    )


def load_denoiser(path: str | Path, *, model_flags: str | None = None, config: str | None = None,
                  use_ema: bool = True, device: torch.device | str = "cpu") -> nn.Module:
    """Any supported model file as an EDM-protocol denoiser ``D = net(x, sigma, class_labels)``.

    ``model_flags``: guided/improved-diffusion flags in the original syntax, where the architecture cannot be
    found otherwise. ``config``: a score_sde config name. ``use_ema``: score_sde EMA or raw weights.
    """
    path = Path(path)
    family, obj = identify(path)
    if family == "edm-toolkit":
        from .checkpoints import load_model

        net = load_model(path)
    elif family == "edm-pickle":
        from .adapters.edm_pickle import load_edm_network

        net = load_edm_network(path)
    elif family == "openai":
        from .adapters.openai import load_openai_checkpoint
        from .networks.openai_unet import RELEASED_CHECKPOINTS

        # The file's own name selects a released architecture only when it is one of the released names.
        file_name = path.name if path.name in RELEASED_CHECKPOINTS else None
        net = load_openai_checkpoint(obj, model_flags=model_flags, file_name=file_name)
    else:
        from .adapters.score_sde import load_score_sde_denoiser

        net = load_score_sde_denoiser(obj, config=config, use_ema=use_ema)
    return net.eval().requires_grad_(False).to(device)


def inspect_file(path: str | Path, *, model_flags: str | None = None, config: str | None = None) -> dict[str, Any]:
    """What a model file is (family, architecture, parameters, conditioning, sigma range, dtype), read safely."""
    path = Path(path)
    family, obj = identify(path)
    if family == "edm-pickle":
        from .adapters.edm_pickle import inspect_edm_pickle

        return inspect_edm_pickle(path)
    if family == "openai":
        from .adapters.openai import inspect_openai_checkpoint

        return inspect_openai_checkpoint(path, model_flags=model_flags)
    if family == "score_sde":
        from .adapters.score_sde import inspect_score_sde_checkpoint

        return inspect_score_sde_checkpoint(path, config=config)
    from .checkpoints import read_model_file

    model_config, state_dict = read_model_file(path)
    net = load_denoiser(path)
    dtypes = sorted({str(t.dtype).replace("torch.", "") for t in state_dict.values()})
    return {
        "family": "edm-toolkit",
        "type": model_config.get("type"),
        "architecture": (model_config.get("network") or {}).get("type", model_config.get("type")),
        "parameters": sum(p.numel() for p in net.parameters()),
        "label_dim": int(getattr(net, "label_dim", 0) or 0),
        "img_resolution": getattr(net, "img_resolution", None),
        "img_channels": getattr(net, "img_channels", None),
        "sigma_min": float(getattr(net, "sigma_min", 0.0)),
        "sigma_max": float(getattr(net, "sigma_max", float("inf"))),
        "dtype": ", ".join(dtypes),
        "config": model_config,
    }
