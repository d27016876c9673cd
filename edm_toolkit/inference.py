"""The fast inference path: mixed precision, channels_last and torch.compile around any denoiser.

The default (fp32, contiguous, eager) is the faithful path that matches the original code within fixture
tolerance. The options trade a little accuracy (bf16/fp16) or start-up time (compile) for speed; they wrap the
denoiser without changing its protocol, so every sampler drives the result unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .errors import ConfigError

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
_PROTOCOL = ("sigma_min", "sigma_max", "img_resolution", "img_channels", "label_dim")


@dataclass(frozen=True)
class InferenceOptions:
    precision: str = "fp32"  # fp32 | bf16 | fp16 (autocast around the network)
    channels_last: bool = False
    compile: bool = False  # torch.compile the backbone (or the whole denoiser when it has none)

    def __post_init__(self):
        if self.precision not in PRECISIONS:
            raise ConfigError(f"unknown precision {self.precision!r}; choose one of: {', '.join(PRECISIONS)}")

    @property
    def faithful(self) -> bool:
        return self == InferenceOptions()


class FastDenoiser(nn.Module):
    """Wraps a denoiser: inputs in channels_last, the network under autocast, float32 output."""

    def __init__(self, net: nn.Module, options: InferenceOptions):
        super().__init__()
        self.net, self.options = net, options
        self.dtype = PRECISIONS[options.precision]
        for name in _PROTOCOL:
            if hasattr(net, name):
                setattr(self, name, getattr(net, name))
        if options.channels_last:
            net.to(memory_format=torch.channels_last)
        if options.compile:
            if isinstance(getattr(net, "model", None), nn.Module):
                net.model = torch.compile(net.model)
            else:
                self.net = torch.compile(net)

    def round_sigma(self, sigma, *args, **kwargs):
        return self.net.round_sigma(sigma, *args, **kwargs) if hasattr(self.net, "round_sigma") else torch.as_tensor(sigma)

    def forward(self, x, sigma, class_labels=None, **kwargs):
        if self.options.channels_last and x.ndim == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast(device_type=x.device.type, dtype=self.dtype or torch.float32, enabled=self.dtype is not None):
            out = self.net(x, sigma, class_labels, **kwargs)
        return out.to(torch.float32) if out.dtype in (torch.bfloat16, torch.float16) else out


def optimize(net: nn.Module, options: InferenceOptions | None = None) -> nn.Module:
    """``net`` itself for the faithful defaults, else a FastDenoiser around it."""
    options = options or InferenceOptions()
    return net if options.faithful else FastDenoiser(net, options)
