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


def training_run_options(command):
    """The options every training command shares (EDM train.py's names, defaults and help): the run's
    --batch-gpu, --ls, --bench, --cache, --workers, --device and the I/O options --desc, --nosubdir, --tick,
    --snap, --dump, --seed."""
    from .types import Bool, Count, Number

    options = [
        click.option("--batch-gpu", type=Count(min=1), default=None, metavar="INT",
                     help="Limit batch size per process (gradient accumulation)"),
        click.option("--ls", type=Number(min=0, min_open=True), default=1, metavar="FLOAT", help="Loss scaling"),
        click.option("--bench", type=Bool(), default=True, metavar="BOOL", help="Enable cuDNN benchmarking"),
        click.option("--cache", type=Bool(), default=True, metavar="BOOL", help="Cache dataset in CPU memory"),
        click.option("--workers", type=Count(min=0), default=1, metavar="INT",
                     help="DataLoader worker processes (0: load in the training process)"),
        click.option("--device", default=None, metavar="DEVICE",
                     help="Torch device  [default: cuda if available, else cpu]"),
        click.option("--desc", default=None, metavar="STR", help="String to include in result dir name"),
        click.option("--nosubdir", is_flag=True, help="Do not create a subdirectory for results"),
        click.option("--tick", type=Number(min=0, min_open=True), default=50, metavar="KIMG",
                     help="How often to print progress"),
        click.option("--snap", type=Count(min=1), default=50, metavar="TICKS", help="How often to save snapshots"),
        click.option("--dump", type=Count(min=1), default=500, metavar="TICKS", help="How often to dump state"),
        click.option("--seed", type=Count(min=0), default=None, metavar="INT", help="Random seed  [default: random]"),
    ]
    for option in reversed(options):
        command = option(command)
    return command
