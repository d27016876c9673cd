"""The fast inference path: mixed precision, channels_last and torch.compile around any denoiser.

The default (fp32, contiguous, eager) is the faithful path that matches the original code within fixture
tolerance. The options trade a little accuracy (bf16/fp16) or start-up time (compile) for speed; they wrap the
denoiser without changing its protocol, so every sampler drives the result unchanged.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import nn

from .errors import ConfigError
from .protocol import DenoiserWrapper

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class InferenceOptions:
    precision: str = "fp32"  # fp32 | bf16 | fp16 (autocast around the network)
    channels_last: bool = False
    compile: bool = False  # torch.compile the denoiser

    def __post_init__(self):
        if self.precision not in PRECISIONS:
            raise ConfigError(f"unknown precision {self.precision!r}; choose one of: {', '.join(PRECISIONS)}")

    @property
    def faithful(self) -> bool:
        return self == InferenceOptions()


class FastDenoiser(DenoiserWrapper):
    """Wraps a denoiser: inputs in channels_last, the network under autocast, float32 output.

    channels_last and compile work on a private copy of the network, so the wrapped denoiser is left as it was.
    """

    def __init__(self, net: nn.Module, options: InferenceOptions):
        if options.channels_last or options.compile:
            net = copy.deepcopy(net)
            if options.channels_last:
                net.to(memory_format=torch.channels_last)
        super().__init__(net)
        self.options = options
        self.dtype = PRECISIONS[options.precision]
        self.compiled = torch.compile(net) if options.compile else None

    def _run(self, call, x, sigma, class_labels, **kwargs):
        if self.options.channels_last and x.ndim == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast(device_type=x.device.type, dtype=self.dtype or torch.float32, enabled=self.dtype is not None):
            out = call(x, sigma, class_labels, **kwargs)
        return out

    def forward(self, x, sigma, class_labels=None, **kwargs):
        return _as_float32(self._run(self.compiled or self.denoiser, x, sigma, class_labels, **kwargs))

    def denoise_with_variance(self, x, sigma, class_labels=None, **kwargs):
        D, v = self._run(self.denoiser.denoise_with_variance, x, sigma, class_labels, **kwargs)
        return _as_float32(D), _as_float32(v)


def _as_float32(out: torch.Tensor) -> torch.Tensor:
    return out.to(torch.float32) if out.dtype in (torch.bfloat16, torch.float16) else out


def optimize(net: nn.Module, options: InferenceOptions | None = None) -> nn.Module:
    """``net`` itself for the faithful defaults, else a FastDenoiser around it."""
    options = options or InferenceOptions()
    return net if options.faithful else FastDenoiser(net, options)
