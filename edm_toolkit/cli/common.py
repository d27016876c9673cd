"""Helpers shared by the commands: the device and the network that --device and --network name."""

from __future__ import annotations

import click

from ..registry import show


def resolve_device(name):
    """--device: a torch device that exists here (default cuda if available, else cpu); BadParameter otherwise."""
    import torch

    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError, TypeError):
        raise click.BadParameter(f"{show(name)} is not a torch device; use cpu, cuda or cuda:N", param_hint="'--device'")
    if device.type not in ("cpu", "cuda", "mps"):
        raise click.BadParameter(f"unsupported device type {device.type!r}; use cpu or cuda", param_hint="'--device'")
    if device.type == "cpu" and device.index not in (None, 0):
        raise click.BadParameter("there is one cpu device; use --device cpu", param_hint="'--device'")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise click.BadParameter("CUDA was requested but is not available; use --device cpu", param_hint="'--device'")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise click.BadParameter(f"CUDA device {device.index} does not exist ({torch.cuda.device_count()} visible)",
                                 param_hint="'--device'")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise click.BadParameter("MPS (Apple GPU) was requested but is not available in this PyTorch build or on "
                                 "this machine; use --device cpu", param_hint="'--device'")
    return device


def load_network(path, device, echo=True, **source):
    """--network: a model file of any supported format as a denoiser; None is the built-in default model and
    "ideal" the built-in ideal denoiser (a name, as a preset's: a file of that name is ./ideal)."""
    from ..default_model import IDEAL, IDEAL_NAME, NAME, default_model, ideal_model
    from ..loading import load_denoiser

    if path is None or path == IDEAL:
        if echo:
            click.echo(f"Using the {NAME if path is None else IDEAL_NAME}", err=True)
        return (default_model() if path is None else ideal_model()).to(device)
    if echo:
        click.echo(f"Loading network from {str(path)!r}...", err=True)
    return load_denoiser(path, device=device, **source)
