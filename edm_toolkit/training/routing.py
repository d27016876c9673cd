"""A denoiser whose network calls run through a DistributedDataParallel (or compiled) module.

DDP synchronises gradients only for what runs through its own ``forward``, and a compiled module only compiles
its ``forward``; a loss, however, needs the denoiser protocol (``step_grid``, ``learned_variance``) and calls
either ``net(x, sigma, labels)`` or ``net.denoise_with_variance(...)``. :class:`DenoiserCalls` makes both calls
one ``forward`` (the module to wrap in DDP or ``torch.compile``), and :class:`RoutedDenoiser` is the protocol
view the loss gets: the trained denoiser's capabilities, with every call sent through the wrapped module.
"""

from __future__ import annotations

from typing import Callable

from torch import nn

from ..protocol import DenoiserWrapper

__all__ = ["DenoiserCalls", "RoutedDenoiser"]


class DenoiserCalls(nn.Module):
    """``forward(x, sigma, class_labels, with_variance, model_kwargs)``: the denoiser's ``D`` or, with
    ``with_variance``, its ``(D, v)``. Its parameters are the denoiser's (for DDP's gradient buckets)."""

    def __init__(self, denoiser: nn.Module):
        super().__init__()
        self.denoiser = denoiser

    def forward(self, x, sigma, class_labels, with_variance: bool, model_kwargs: dict):
        if with_variance:
            return self.denoiser.denoise_with_variance(x, sigma, class_labels, **model_kwargs)
        return self.denoiser(x, sigma, class_labels, **model_kwargs)


class RoutedDenoiser(DenoiserWrapper):
    """The protocol of ``denoiser`` with both calls sent through ``calls``: a :class:`DenoiserCalls` of the same
    denoiser, wrapped in DDP and/or ``torch.compile`` (kept outside the module tree, so that the wrapper holds
    the denoiser's parameters once)."""

    def __init__(self, denoiser: nn.Module, calls: Callable):
        super().__init__(denoiser)
        object.__setattr__(self, "_calls", calls)  # not a submodule: its parameters are the denoiser's

    def forward(self, x, sigma, class_labels=None, **model_kwargs):
        return self._calls(x, sigma, class_labels, False, model_kwargs)

    def denoise_with_variance(self, x, sigma, class_labels=None, **model_kwargs):
        return self._calls(x, sigma, class_labels, True, model_kwargs)
