"""Backbones for training: EDM's train.py architectures by name, or any registered backbone of EDM's protocol.

``--arch ddpmpp|ncsnpp|adm`` are train.py's configurations (SongUNet DDPM++/NCSN++, DhariwalUNet ADM);
``--arch song_unet|dhariwal_unet`` are the bare registered networks with their constructor defaults. Each is a
backbone F(x, c_noise, class_labels, augment_labels) that a preconditioner turns into a denoiser; the image
geometry, label count, augment labels (9 with --augment) and dropout come from the run, and
``overrides`` (``--net-opt KEY=VALUE``) replace any other constructor argument.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any, Mapping

from torch import nn

from ..errors import ConfigError
from ..networks import dhariwal_unet, song_unet
from ..networks.registry import build_network, network_config
from ..precond import Preconditioner
from ..presets import PrecondConfig


@dataclass(frozen=True)
class Architecture:
    """A registered backbone type with the constructor arguments that define an architecture."""

    name: str
    network: str
    kwargs: Mapping[str, Any] = field(default_factory=dict)
    description: str = ""


ARCHITECTURES: dict[str, Architecture] = {
    a.name: a
    for a in (
        Architecture("ddpmpp", "song_unet", song_unet.PUBLISHED_CONFIGS["ddpmpp"], "DDPM++ (EDM config F, SongUNet)"),
        Architecture("ncsnpp", "song_unet", song_unet.PUBLISHED_CONFIGS["ncsnpp"], "NCSN++ (SongUNet)"),
        Architecture("adm", "dhariwal_unet", dhariwal_unet.PUBLISHED_CONFIGS["adm"], "ADM (DhariwalUNet)"),
        Architecture("song_unet", "song_unet", {}, "SongUNet with its constructor defaults"),
        Architecture("dhariwal_unet", "dhariwal_unet", {}, "DhariwalUNet with its constructor defaults"),
    )
}


def get_architecture(name: str) -> Architecture:
    if name not in ARCHITECTURES:
        raise ConfigError(f"unknown architecture {name!r}; choose one of: {', '.join(ARCHITECTURES)}")
    return ARCHITECTURES[name]


def backbone_config(arch: str, *, resolution: int, channels: int, label_dim: int, augment_dim: int, dropout: float,
                    cbase: int | None = None, cres: list[int] | None = None,
                    overrides: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """{"type", "kwargs"} of the backbone of train.py's ``--arch`` with ``--cbase``/``--cres`` and overrides."""
    architecture = get_architecture(arch)
    kwargs = copy.deepcopy(dict(architecture.kwargs))
    kwargs.update(img_resolution=resolution, in_channels=channels, out_channels=channels, label_dim=label_dim,
                  augment_dim=augment_dim, dropout=dropout)
    if cbase is not None:
        kwargs["model_channels"] = cbase
    if cres is not None:
        kwargs["channel_mult"] = list(cres)
    kwargs.update(copy.deepcopy(dict(overrides or {})))
    return {"type": architecture.network, "kwargs": kwargs}


def build_denoiser(backbone: Mapping[str, Any], precond: PrecondConfig, *, use_fp16: bool = False) -> Preconditioner:
    """The preconditioned network D(x; sigma) = c_skip x + c_out F(c_in x; c_noise) with a fresh backbone F."""
    kwargs = backbone["kwargs"]
    try:
        model = build_network(dict(backbone))
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"cannot build the {backbone['type']} backbone: {exc} (check --net-opt/--cbase/--cres)"
                          ) from None
    return precond.build(model, img_resolution=kwargs["img_resolution"], img_channels=kwargs["in_channels"],
                         label_dim=kwargs["label_dim"], use_fp16=use_fp16)


def denoiser_config(net: Preconditioner) -> dict[str, Any]:
    """Plain data that identifies a preconditioned network's structure (to match training states against)."""
    return {"precond": net.config(), "network": network_config(net.model)}


def parameter_count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
