"""The fast inference path: mixed precision, channels_last and torch.compile around any denoiser.

The default (fp32, contiguous, eager) is the faithful path that matches the original code within fixture
tolerance. The options trade a little accuracy (bf16/fp16) or start-up time (compile) for speed; they wrap the
denoiser without changing its protocol, so every sampler drives the result unchanged, and they work on a private
copy of the network, so the wrapped denoiser is never modified.

What each option does to the private copy and to every call (docs/speed.md has the measurements):

* ``precision`` bf16/fp16: the weights of every convolution are cast to that dtype once, here, instead of by
  autocast on every call; the network runs under ``torch.autocast``; the networks' GroupNorms keep their
  statistics in fp32 without fp32 copies of the activations (``edm_layers.group_norm``); the output is float32.
* ``channels_last``: weights and inputs in the NHWC memory format that tensor-core convolutions use; GroupNorm and
  attention keep that layout instead of converting to NCHW and back.
* ``compile``: ``torch.compile`` with fixed shapes; ``compile_mode='reduce-overhead'`` adds CUDA graphs (a whole
  network evaluation replayed as one graph launch); ``compile_cache`` keeps the compiler's caches in a directory of
  the user's choosing, so that a second run loads the compiled kernels instead of compiling again.

Nothing here imports the compiler (``torch._dynamo``) unless ``compile`` is asked for.
"""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .errors import ConfigError
from .networks.edm_layers import Conv2d as EDMConv2d
from .protocol import DenoiserWrapper

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}

# torch.compile modes; those that record CUDA graphs reuse their output buffers, so outputs are copied out.
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
_CUDA_GRAPH_MODES = ("reduce-overhead", "max-autotune")

# Layers whose weights feed convolutions only (one of autocast's lower-precision ops): in the private copy they are
# cast to the compute dtype once, which is what autocast would do to them on every call. Linear layers stay fp32:
# they see the small embedding vectors, where autocast's cast costs less than an upcast by the layer itself.
CONVOLUTIONS = (EDMConv2d, nn.Conv1d, nn.Conv2d)


@dataclass(frozen=True)
class InferenceOptions:
    """How to run a denoiser fast; the defaults are the faithful path (see the module docstring).

    ``precision``: fp32 | bf16 | fp16 (autocast around the network, convolution weights cast once).
    ``channels_last``: NHWC memory format for weights and activations.
    ``compile``: torch.compile the denoiser; ``compile_mode`` one of COMPILE_MODES ('reduce-overhead' records
    CUDA graphs); ``compile_cache``: a directory for the compiler's caches, reused by later runs (default: the
    compiler's own, under the system's temporary directory).
    """

    precision: str = "fp32"
    channels_last: bool = False
    compile: bool = False
    compile_mode: str = "default"
    compile_cache: str | None = None

    def __post_init__(self):
        if self.precision not in PRECISIONS:
            raise ConfigError(f"unknown precision {self.precision!r}; choose one of: {', '.join(PRECISIONS)}")
        if self.compile_mode not in COMPILE_MODES:
            raise ConfigError(f"unknown compile mode {self.compile_mode!r}; choose one of: {', '.join(COMPILE_MODES)}")
        if not self.compile and (self.compile_mode != "default" or self.compile_cache is not None):
            raise ConfigError("compile_mode and compile_cache apply to the compiled path: also set compile=True "
                              "(--compile), or drop them")

    @property
    def faithful(self) -> bool:
        return self == InferenceOptions()

    @property
    def dtype(self) -> torch.dtype | None:
        """The autocast dtype, None for fp32."""
        return PRECISIONS[self.precision]


def prepare_network(net: nn.Module, options: InferenceOptions) -> nn.Module:
    """A private copy of ``net`` laid out for ``options``: convolution weights in the compute dtype, channels_last.

    ``net`` itself is left as it was (the copy shares no tensor with it).
    """
    net = copy.deepcopy(net)
    if options.dtype is not None:
        for module in net.modules():
            if isinstance(module, CONVOLUTIONS):
                module.to(options.dtype)
    if options.channels_last:
        net.to(memory_format=torch.channels_last)
    return net


class FastDenoiser(DenoiserWrapper):
    """Wraps a denoiser: its private copy prepared by :func:`prepare_network`, run under autocast (and compiled).

    Inputs go in channels_last when asked for; sigma is handed over as a tensor on the input's device (so a
    compiled network is not specialised on, and recompiled for, every noise level); the output is float32 in the
    standard layout, and a fresh tensor also when CUDA graphs reuse their buffers. ``denoise_with_variance`` (the
    learned-variance samplers) runs the prepared copy eagerly.
    """

    def __init__(self, net: nn.Module, options: InferenceOptions):
        super().__init__(prepare_network(net, options))
        self.options = options
        self.compiled = _compile(self.denoiser, options) if options.compile else None

    def _run(self, call, x, sigma, class_labels, **kwargs):
        if not isinstance(sigma, torch.Tensor):
            sigma = torch.tensor(sigma, dtype=torch.float64)
        sigma = sigma.to(x.device)
        if self.options.channels_last and x.ndim == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        dtype = self.options.dtype
        with torch.autocast(device_type=x.device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            return call(x, sigma, class_labels, **kwargs)

    def forward(self, x, sigma, class_labels=None, **kwargs):
        if self.compiled is None:
            return _standard(self._run(self.denoiser, x, sigma, class_labels, **kwargs))
        if self.options.compile_mode in _CUDA_GRAPH_MODES:
            torch.compiler.cudagraph_mark_step_begin()  # the previous call's outputs have been copied out
            return _standard(self._run(self.compiled, x, sigma, class_labels, **kwargs)).clone()
        return _standard(self._run(self.compiled, x, sigma, class_labels, **kwargs))

    def denoise_with_variance(self, x, sigma, class_labels=None, **kwargs):
        D, v = self._run(self.denoiser.denoise_with_variance, x, sigma, class_labels, **kwargs)
        return _standard(D), _standard(v)


def _standard(out: torch.Tensor) -> torch.Tensor:
    """float32 (from bf16/fp16) in the standard memory layout; other tensors unchanged."""
    if out.dtype in (torch.bfloat16, torch.float16):
        out = out.to(torch.float32)
    return out.contiguous()


def _compile(net: nn.Module, options: InferenceOptions):
    """torch.compile of the prepared copy: fixed shapes (a sampling run repeats one batch shape)."""
    if options.compile_cache is not None:
        cache = Path(options.compile_cache).expanduser()
        try:
            cache.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ConfigError(f"cannot use {str(cache)!r} as the compile cache ({exc.strerror}); give a writable "
                              "directory") from None
        # Inductor reads its cache directory (FX graphs, kernels, autotuning results) from the environment.
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(cache)
    return torch.compile(net, mode=options.compile_mode, dynamic=False)


def optimize(net: nn.Module, options: InferenceOptions | None = None) -> nn.Module:
    """``net`` itself for the faithful defaults, else a FastDenoiser around it."""
    options = options or InferenceOptions()
    return net if options.faithful else FastDenoiser(net, options)
