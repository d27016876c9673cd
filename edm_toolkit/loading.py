"""One entry point for every model file the toolkit reads, recognised by content, never by running it.

| family (format) | what the file is | how it is read |
|---|---|---|
| edm-toolkit | the toolkit's own model file (.pt or .safetensors) | torch.load(weights_only=True) / safetensors reader |
| edm-pickle | EDM network-snapshot-*.pkl / edm-*.pkl / training-state-*.pt | restricted unpickler (adapters.edm_pickle) |
| openai (guided-, improved-diffusion) | plain state_dict .pt | torch.load(weights_only=True) + architecture from file name, flags or shapes |
| score_sde | {'model', 'ema', 'step', 'optimizer'} .pth | torch.load(weights_only=True) + config by name or inferred |
| detector-nvidia-pickle, detector-torchscript, detector-state-dict | the FID Inception detector's files (kind "detector") | restricted reader (metrics.detector_files) |

This is the one module that knows every format: it imports them (each registers itself with
:mod:`edm_toolkit.io.formats`) and dispatches on what :func:`identify` finds. :func:`inspect_file` describes a file of
any kind; :func:`load_denoiser` refuses one that holds no denoiser (an FID detector: load that with
:func:`edm_toolkit.metrics.load_detector`). Every read is bounded by the file's content (docs/security.md).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import checkpoints
from .adapters import edm_pickle, openai, score_sde  # noqa: F401  (each registers its file format)
from .errors import CheckpointError
from .io.formats import DENOISER, FORMATS, FileSource, LoadOptions, check_kind, check_options
from .io.formats import identify as _identify
from .metrics import detector_files  # noqa: F401  (registers the FID detector's file formats)
from .io.outputs import check_output_path

__all__ = ["FORMATS", "convert_file", "identify", "inspect_file", "load_denoiser", "load_model"]


def identify(path: str | Path) -> str:
    """The name of the registered format of a model file (``edm-toolkit``, ``edm-pickle``, ``openai``,
    ``score_sde``, ``detector-torchscript``, ...), found from its content without executing anything from it."""
    return _identify(FileSource(path)).name


def _opened(path, model_flags, config, use_ema):
    source = FileSource(path)
    file_format = _identify(source)
    options = LoadOptions(model_flags=model_flags, config=config, use_ema=use_ema)
    check_options(file_format, options, source)
    return source, file_format, options


def load_denoiser(path: str | Path, *, model_flags: str | Mapping[str, Any] | None = None,
                  config: str | Mapping[str, Any] | None = None, use_ema: bool = True,
                  device: torch.device | str = "cpu") -> nn.Module:
    """Any supported model file as an EDM-protocol denoiser ``D = net(x, sigma, class_labels)``, in eval mode.

    ``model_flags``: guided/improved-diffusion flags in the original syntax, where the architecture cannot be
    found otherwise. ``config``: a score_sde config name or dict. ``use_ema``: False loads score_sde's raw
    training weights. An option that the file's format does not use is refused.
    """
    source, file_format, options = _opened(path, model_flags, config, use_ema)
    check_kind(file_format, DENOISER, source, detector_files.USE)
    net = file_format.load(source, options)
    return net.eval().requires_grad_(False).to(device)


def inspect_file(path: str | Path, *, model_flags: str | Mapping[str, Any] | None = None,
                 config: str | Mapping[str, Any] | None = None, use_ema: bool = True) -> dict[str, Any]:
    """What a model file is (family, architecture, parameters, conditioning, sigma range, dtype; for an FID
    detector file its kind, form, outputs and dtype), after the checks that loading it makes, so that a file
    that cannot be loaded cannot be inspected either."""
    source, file_format, options = _opened(path, model_flags, config, use_ema)
    return file_format.inspect(source, options)


def load_model(path: str | Path, device: torch.device | str = "cpu") -> nn.Module:
    """Loads a toolkit model file (written by :func:`~edm_toolkit.checkpoints.save_model` or ``edm convert``):
    the model rebuilt from its config, weights loaded strictly."""
    source = FileSource(path)
    if _identify(source) is not checkpoints.TOOLKIT:
        raise CheckpointError(f"{source} is not an edm-toolkit model file; read other checkpoints with "
                              "edm_toolkit.loading.load_denoiser, or convert them with 'edm convert'")
    return checkpoints.TOOLKIT.load(source, LoadOptions()).to(device)


def convert_file(path: str | Path, out: str | Path, *, model_flags: str | Mapping[str, Any] | None = None,
                 config: str | Mapping[str, Any] | None = None, use_ema: bool = True) -> nn.Module:
    """Writes any supported model file as a toolkit model file ``out`` (``.safetensors`` for that format) and
    returns the model. ``out`` must not be the input file itself, nor anything but a regular file."""
    out = Path(out)
    check_output_path(out)
    if out.exists() and Path(path).exists() and os.path.samefile(path, out):
        raise CheckpointError(f"{out} is the input file itself; write the converted model to another path")
    net = load_denoiser(path, model_flags=model_flags, config=config, use_ema=use_ema)
    checkpoints.save_model(net, out)
    return net
