"""Reading score_sde_pytorch checkpoints (``checkpoint_*.pth``) for :class:`~edm_toolkit.networks.score_sde.NCSNpp`.

Song et al., "Score-Based Generative Modeling through Stochastic Differential Equations", ICLR 2021;
checkpoints of yang-song/score_sde_pytorch. ``utils.save_checkpoint`` stores

    {'optimizer': Adam state_dict, 'model': DataParallel(NCSNpp).state_dict(),
     'ema': {'decay', 'num_updates', 'shadow_params'}, 'step': int}

* ``model`` keys carry DataParallel's ``module.`` prefix; they include the float64 ``sigmas`` buffer
  and, for the Fourier embedding, the frozen ``all_modules.0.W``.
* ``ema['shadow_params']`` is a *positional* list: one tensor per parameter that had
  ``requires_grad=True``, in ``parameters()`` order (``ExponentialMovingAverage.copy_to``). For
  NCSNpp that is every parameter except the Gaussian Fourier projection's ``W``.
* ``optimizer`` and ``step`` are not needed for inference and are ignored.

The published results (paper Table 3, README) were computed with the EMA weights, the default here.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from torch import nn

from ..io.formats import layout_mismatch, shapes
from ..networks.score_sde import GaussianFourierProjection
from ..io.tensorfile import read_torch

__all__ = [
    "ema_parameter_names",
    "load_score_sde_checkpoint",
    "read_checkpoint_file",
    "score_sde_state_dict",
    "strip_module_prefix",
]

_PREFIX = "module."


def read_checkpoint_file(path: str | os.PathLike) -> dict:
    """Loads a score_sde ``.pth`` file safely (``weights_only=True``, onto the CPU, with bounded memory:
    :func:`edm_toolkit.io.tensorfile.read_torch`); CheckpointError if it cannot be read so."""
    return read_torch(Path(path))


def strip_module_prefix(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Removes DataParallel's ``module.`` prefix from every key that has it."""
    out: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        if not isinstance(key, str):
            raise ValueError(f"score_sde checkpoint: state_dict key {key!r} is not a string")
        name = key[len(_PREFIX):] if key.startswith(_PREFIX) else key
        if name in out:
            raise ValueError(f"score_sde checkpoint: key {name!r} appears both with and without 'module.'")
        out[name] = value
    return out


def ema_parameter_names(model: nn.Module) -> list[str]:
    """Names of the parameters the EMA's ``shadow_params`` cover, in order.

    That is every parameter except those of :class:`GaussianFourierProjection` (its ``W`` is created
    with ``requires_grad=False``). The rule is structural, so it also holds after
    ``model.requires_grad_(False)``.
    """
    frozen = {f"{prefix}.W" if prefix else "W" for prefix, module in model.named_modules()
              if isinstance(module, GaussianFourierProjection)}
    return [name for name, _ in model.named_parameters() if name not in frozen]


def _entry(container: Mapping, key: str, kinds: tuple[type, ...], what: str):
    """``container[key]``, which must exist and be one of ``kinds``."""
    if key not in container:
        found = sorted(map(str, container))
        raise ValueError(f"score_sde checkpoint has no '{key}' entry ({what}); found keys: {found}")
    value = container[key]
    if not isinstance(value, kinds):
        wanted = " or ".join(kind.__name__ for kind in kinds)
        raise ValueError(f"score_sde checkpoint: '{key}' should be a {wanted}, got {type(value).__name__}")
    return value


def score_sde_state_dict(checkpoint: Mapping, ema_names: Sequence[str], *, use_ema: bool = True
                         ) -> dict[str, torch.Tensor]:
    """The model state_dict of a score_sde checkpoint, without ``module.``, optionally with the EMA weights.

    Args:
        checkpoint: the dict stored by score_sde's ``save_checkpoint``.
        ema_names: the names (without ``module.``) that ``shadow_params`` cover, in order; see
            :func:`ema_parameter_names`.
        use_ema: put ``shadow_params[i]`` in place of parameter ``ema_names[i]`` (the weights the
            paper evaluates); ``False`` gives the raw training weights.

    Raises ValueError, naming the problem, when the dict is malformed: missing entries, a
    ``shadow_params`` list of the wrong length, an unknown name, or a shape mismatch.
    Tensors are shared with ``checkpoint``, not copied.
    """
    if not isinstance(checkpoint, Mapping):
        raise ValueError(f"score_sde checkpoint should be a dict, got {type(checkpoint).__name__}")
    model = _entry(checkpoint, "model", (Mapping,), "the network's state_dict")
    state = strip_module_prefix(model)
    for name, value in state.items():
        if not isinstance(value, torch.Tensor):
            raise ValueError(f"score_sde checkpoint: model[{name!r}] is a {type(value).__name__}, not a tensor")
    if not use_ema:
        return state

    ema = _entry(checkpoint, "ema", (Mapping,), "ExponentialMovingAverage.state_dict()")
    shadow = _entry(ema, "shadow_params", (list, tuple), "the EMA weights")
    if len(shadow) != len(ema_names):
        raise ValueError(f"score_sde checkpoint: ema['shadow_params'] has {len(shadow)} tensors but the model has "
                         f"{len(ema_names)} trainable parameters (frozen Fourier W excluded); wrong config?")
    for index, (name, value) in enumerate(zip(ema_names, shadow)):
        if name not in state:
            raise ValueError(f"score_sde checkpoint: model state_dict has no parameter {name!r} "
                             f"(the target of ema['shadow_params'][{index}])")
        if not isinstance(value, torch.Tensor):
            raise ValueError(f"score_sde checkpoint: ema['shadow_params'][{index}] is a {type(value).__name__}, "
                             f"not a tensor")
        if value.shape != state[name].shape:
            raise ValueError(f"score_sde checkpoint: ema['shadow_params'][{index}] has shape {tuple(value.shape)} "
                             f"but parameter {name!r} has shape {tuple(state[name].shape)}")
        state[name] = value
    return state


def load_score_sde_checkpoint(model: nn.Module, checkpoint: Mapping | str | os.PathLike, *, use_ema: bool = True,
                              strict: bool = True) -> nn.Module:
    """Loads a score_sde checkpoint (dict or file path) into ``model`` (an NCSNpp) and returns it.

    Key and shape mismatches against ``model`` raise ValueError listing them (with ``strict=False``
    missing and unexpected keys are allowed, as the original's ``restore_checkpoint`` allows).
    """
    if isinstance(checkpoint, (str, os.PathLike)):
        checkpoint = read_checkpoint_file(checkpoint)
    state = score_sde_state_dict(checkpoint, ema_parameter_names(model), use_ema=use_ema)
    expected = shapes(model.state_dict())
    found = shapes(state) if strict else {key: shape for key, shape in shapes(state).items() if key in expected}
    if not strict:
        expected = {key: shape for key, shape in expected.items() if key in found}
    problem = layout_mismatch(expected, found)
    if problem:
        raise ValueError(f"score_sde checkpoint does not match the model ({problem}); was the model built with the "
                         "checkpoint's config?")
    model.load_state_dict(state, strict=strict)
    return model
