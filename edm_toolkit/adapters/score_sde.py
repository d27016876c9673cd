"""score_sde_pytorch checkpoints (DDPM++ cont. / VP, NCSN++ cont. / VE) as EDM denoisers D(x; sigma).

Song, Sohl-Dickstein, Kingma, Kumar, Ermon & Poole, "Score-Based Generative Modeling through Stochastic
Differential Equations", ICLR 2021; Karras, Aittala, Aila & Laine, "Elucidating the Design Space of
Diffusion-Based Generative Models" (EDM), NeurIPS 2022, Sec. 2 and Appendix C.

A ``checkpoint_*.pth`` of yang-song/score_sde_pytorch is ``{'optimizer', 'model', 'ema', 'step'}`` (see
:mod:`edm_toolkit.adapters.score_sde_checkpoint`). Its network is evaluated exactly as the original's
``get_score_fn(sde, model, continuous=True)`` does; only the units change. EDM's denoiser sees
``x = x0 + sigma n`` with data in [-1, 1]. Song's data are ``y0 = a x0 + b``: ``a, b = 1, 0`` when
``data.centered`` and ``1/2, 1/2`` otherwise (data in [0, 1]; the network then maps ``2y - 1`` itself). So
Song's noise level is ``sigma_song = a sigma`` and the VE-form input is ``y = a x + b``, and then

* VP (``x_t = alpha y0 + std z``, ``sigma_song = std / alpha``): the network gets ``x_t = y / sqrt(1 + sigma_song^2)``
  and the label ``999 t`` with ``t = sigma_vp^-1(sigma_song)`` for beta(t) = beta_min + t (beta_max - beta_min)
  (EDM Table 1: beta_d = 19.9, beta_min = 0.1). Its output is eps (score = -out / std), so ``D = x - sigma eps``.
* VE: the network gets ``y`` and the label ``sigma_song``; its output (``scale_by_sigma``) is the score in
  Song's units, ``D_song = y + sigma_song^2 score``, so ``D = (D_song - b) / a = x + a sigma^2 score``.

The released CIFAR-10 models are centred for VP and uncentred for VE, which gives EDM's VE range
[0.02, 100] (twice Song's [0.01, 50]); the VP range is ``sigma_vp([1e-5, 1])`` ~ [0.001, 152] (score_sde trains
on t >= 1e-5; EDM's VPPrecond evaluates the same bound in float32 and gets 0.0009765625).

The network config is given by name (``'vp/cifar10_ddpmpp_continuous'``), as a dict in score_sde's nested
layout, or inferred from the tensors. Two things are never stored and never guessed: the image size (known
only when the weights are those of a released config) and, for a positional time embedding, the SDE (the
released VP and sub-VP DDPM++ checkpoints have identical tensors). A partial dict supplies them:
``config={'training': {'sde': 'vpsde'}, 'data': {'image_size': 32}}``; the rest is still inferred.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import json
import math
import os
import re
from collections.abc import Mapping
from typing import Any, Union

import torch
from torch import nn

from ..errors import CheckpointError, ConfigError
from ..io.formats import (
    FileSource, LoadOptions, check_arguments, check_geometry, construction_budget, dtype_summary, load_wrapper,
    materialize, register_format, register_model_type, shapes, verify,
)
from ..networks.registry import network_config
from ..networks.score_sde import PUBLISHED_CONFIGS, NCSNpp, NCSNppConfig, published_config
from ..protocol import DenoiserBase
from ..schedules import vp_sigma, vp_sigma_inv
from .score_sde_checkpoint import ema_parameter_names, score_sde_state_dict

__all__ = [
    "SCORE_SDE",
    "ScoreSDEDenoiser",
    "inspect_score_sde_checkpoint",
    "is_score_sde_checkpoint",
    "load_score_sde_denoiser",
]

FAMILY = "score_sde"
VP_LABEL_SCALE = 999  # get_score_fn, continuous VP: "the maximum value of time embedding is assumed to be 999"
VP_EPSILON_T = 1e-5  # the smallest time score_sde trains on (losses.get_sde_loss_fn, eps=1e-5)
VP_BETA_MIN, VP_BETA_MAX = 0.1, 20.0  # sde_lib.VPSDE's defaults, and every released VP config's
SDE_NAMES = {"vpsde": "vp", "vesde": "ve"}
# Where the tensors say nothing, inference takes the released config of the same family.
TEMPLATES = {"vp": "vp/cifar10_ddpmpp_continuous", "ve": "ve/cifar10_ncsnpp_continuous"}

PathOrCheckpoint = Union[str, os.PathLike, FileSource, Mapping]


# ----------------------------------------------------------------------------------------------------------
# The denoiser


def _data_map(centered: bool) -> tuple[float, float]:
    """(a, b) with Song's data y = a x + b for EDM's x in [-1, 1]: identity if centred, else onto [0, 1]."""
    return (1.0, 0.0) if centered else (0.5, 0.5)


def _song_sigma_range(sde: str, ve_range: tuple[float, float], beta_min: float | None = None,
                      beta_max: float | None = None, epsilon_t: float = VP_EPSILON_T) -> tuple[float, float]:
    """The trained noise levels in Song's units: the VE SDE's [sigma_min, sigma_max], or sigma_vp([epsilon_t, 1])."""
    if sde == "ve":
        low, high = float(ve_range[0]), float(ve_range[1])
    elif not (0 <= beta_min < beta_max < math.inf):
        raise ConfigError(f"the VP SDE needs 0 <= beta_min < beta_max (finite), got {beta_min} and {beta_max}")
    else:
        low, high = vp_sigma(torch.tensor([epsilon_t, 1.0], dtype=torch.float64), beta_max - beta_min, beta_min).tolist()
    if not (0 < low < high < math.inf):
        raise ConfigError(f"the {sde.upper()} SDE's noise range [{low:.4g}, {high:.4g}] is not finite, positive and "
                          "increasing; check beta_min/beta_max (VP) or sigma_min/sigma_max (VE) in the config")
    return low, high


class ScoreSDEDenoiser(DenoiserBase):
    """A score_sde ``NCSNpp`` (VP or VE, continuous time) behind EDM's denoiser protocol.

    ``D = net(x, sigma)`` with ``x = x0 + sigma n`` in EDM's units (data in [-1, 1]); the network receives
    exactly the input and label the original's ``get_score_fn`` gives it (see the module docstring).

    Args:
        network: the NCSNpp, with the checkpoint's weights.
        sde: "vp" or "ve".
        beta_min, beta_max: the VP SDE's beta(t) range (``config.model.beta_min/beta_max``).
        epsilon_t: the smallest VP time, which sets ``sigma_min``.
        config_name: the released config the network follows, if any (for descriptions only).

    The VE range and the data scaling come from ``network.config`` (``sigma_min``, ``sigma_max``,
    ``centered``).
    """

    def __init__(self, network: NCSNpp, sde: str, *, beta_min: float = VP_BETA_MIN, beta_max: float = VP_BETA_MAX,
                 epsilon_t: float = VP_EPSILON_T, config_name: str | None = None):
        super().__init__()
        if not isinstance(network, NCSNpp):
            raise ConfigError(f"ScoreSDEDenoiser wraps a score_sde NCSNpp, got {type(network).__name__}")
        if sde not in ("vp", "ve"):
            raise ConfigError(f"unknown score_sde SDE {sde!r}; choose 'vp' or 've'")
        if sde == "vp" and not 0 < epsilon_t < 1:
            raise ConfigError(f"VP SDE needs 0 < epsilon_t < 1, got {epsilon_t}")
        cfg = network.config
        self.network = network
        self.sde, self.config_name = sde, config_name
        self.beta_min, self.beta_max, self.epsilon_t = float(beta_min), float(beta_max), float(epsilon_t)
        self.data_scale, self.data_shift = _data_map(cfg.centered)
        song_range = _song_sigma_range(sde, (cfg.sigma_min, cfg.sigma_max), self.beta_min, self.beta_max,
                                       self.epsilon_t)
        self.sigma_min, self.sigma_max = song_range[0] / self.data_scale, song_range[1] / self.data_scale
        self.img_resolution, self.img_channels, self.label_dim = int(cfg.image_size), int(cfg.num_channels), 0

    @property
    def architecture(self) -> str:
        """E.g. ``'DDPM++ cont. (VP), vp/cifar10_ddpmpp_continuous'``."""
        cfg = self.network.config
        return _architecture(cfg.fir, cfg.progressive_input, self.sde, self.config_name)

    def network_input(self, x: torch.Tensor, sigma) -> tuple[torch.Tensor, torch.Tensor]:
        """(image, label) that the original network receives for EDM's ``x`` [B, C, H, W] at noise level ``sigma``."""
        x = x.to(torch.float32)
        song_sigma = self._sigma64(sigma, x) * self.data_scale
        y = x * self.data_scale + self.data_shift  # Song's data units (exact when centred)
        if self.sde == "ve":
            return y, song_sigma.to(torch.float32)
        alpha = (1 / (1 + song_sigma**2).sqrt()).to(torch.float32).reshape(-1, 1, 1, 1)
        label = VP_LABEL_SCALE * vp_sigma_inv(song_sigma, self.beta_max - self.beta_min, self.beta_min)
        return y * alpha, label.to(torch.float32)

    def forward(self, x: torch.Tensor, sigma, class_labels=None, force_fp32: bool = False, **unused) -> torch.Tensor:
        """Float32 D(x; sigma). The network is unconditional (``class_labels`` is ignored, label_dim is 0) and
        always runs in float32 (``force_fp32`` is accepted for EDM's signature)."""
        x = x.to(torch.float32)
        sigma64 = self._sigma64(sigma, x)
        out = self.network(*self.network_input(x, sigma64)).to(torch.float32)
        if self.sde == "vp":
            c_out = -sigma64  # out is eps
        else:
            c_out = self.data_scale * sigma64**2  # out is Song's score
        return x + c_out.to(torch.float32).reshape(-1, 1, 1, 1) * out

    @staticmethod
    def _sigma64(sigma, x: torch.Tensor) -> torch.Tensor:
        """sigma as float64 [B] on x's device (one value, or one per image)."""
        sigma = torch.as_tensor(sigma, device=x.device).to(torch.float64).reshape(-1)
        if sigma.numel() == 1:
            return sigma.expand(x.shape[0])
        if sigma.numel() != x.shape[0]:
            raise ValueError(f"sigma has {sigma.numel()} values for a batch of {x.shape[0]} images")
        return sigma

    def extra_repr(self) -> str:
        return f"{self.architecture}, sigma in [{self.sigma_min:.4g}, {self.sigma_max:.4g}]"


def _architecture(fir: bool, progressive_input: str, sde: str | None, name: str | None) -> str:
    """'NCSN++' with FIR resampling or a progressive input (Song et al. Sec. 4.4), else 'DDPM++'."""
    kind = "NCSN++" if fir or progressive_input != "none" else "DDPM++"
    family = sde.upper() if sde else "VP or sub-VP: not recorded"
    return f"{kind} cont. ({family})" + (f", {name}" if name else "")


# ----------------------------------------------------------------------------------------------------------
# Native model files


def _to_config(model: ScoreSDEDenoiser) -> dict[str, Any]:
    config = {"network": network_config(model.network), "sde": model.sde, "config_name": model.config_name}
    if model.sde == "vp":
        config.update(beta_min=model.beta_min, beta_max=model.beta_max, epsilon_t=model.epsilon_t)
    return config


def _from_config(config: dict[str, Any], tensors: Mapping[str, torch.Tensor], what: str) -> ScoreSDEDenoiser:
    params = {k: config[k] for k in ("beta_min", "beta_max", "epsilon_t") if k in config}
    return load_wrapper(config["network"], tensors, "network", what, lambda network: ScoreSDEDenoiser(
        network, config["sde"], config_name=config.get("config_name"), **params))


register_model_type(FAMILY, ScoreSDEDenoiser, _to_config, _from_config)


# ----------------------------------------------------------------------------------------------------------
# Reading checkpoints


def is_score_sde_checkpoint(obj: Any) -> bool:
    """Whether ``obj`` looks like score_sde's checkpoint: a dict with 'model', 'ema' and 'step', whose
    'model' state_dict carries DataParallel's ``module.`` prefix."""
    if not isinstance(obj, Mapping) or not all(key in obj for key in ("model", "ema", "step")):
        return False
    model = obj["model"]
    return (isinstance(model, Mapping) and len(model) > 0
            and all(isinstance(key, str) and key.startswith("module.") for key in model))


def _read(path_or_checkpoint: PathOrCheckpoint) -> tuple[Mapping, str]:
    """(checkpoint dict, name for messages); files are read with ``torch.load(weights_only=True)`` after the
    checks of :func:`edm_toolkit.io.tensorfile.read_torch`."""
    if isinstance(path_or_checkpoint, Mapping):
        return path_or_checkpoint, "score_sde checkpoint"
    if isinstance(path_or_checkpoint, (str, os.PathLike)):
        path_or_checkpoint = FileSource(path_or_checkpoint)
    if not isinstance(path_or_checkpoint, FileSource):
        raise CheckpointError(f"expected a score_sde checkpoint file or dict, got {type(path_or_checkpoint).__name__}")
    checkpoint = path_or_checkpoint.torch_object()
    if not isinstance(checkpoint, Mapping):
        raise CheckpointError(f"{path_or_checkpoint} holds a {type(checkpoint).__name__}, not the dict of a score_sde "
                              "checkpoint ({'model', 'ema', 'step', 'optimizer'})")
    return checkpoint, str(path_or_checkpoint)


def _model_state(checkpoint: Mapping, source: str) -> dict[str, torch.Tensor]:
    """The checkpoint's raw 'model' state_dict without ``module.``, validated."""
    try:
        state = score_sde_state_dict(checkpoint, [], use_ema=False)
    except ValueError as exc:
        raise CheckpointError(f"{source}: {exc}") from None
    if not state:
        raise CheckpointError(f"{source}: the 'model' state_dict is empty")
    return state


# ----------------------------------------------------------------------------------------------------------
# The network's config: by name, from a dict, or inferred from the tensors


def _deep_update(base: dict, override: Mapping) -> dict:
    """``base`` with ``override`` merged in, section by section (copies; the inputs are not modified)."""
    out = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = _deep_update(dict(out[key]), value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def _section_get(config: Mapping, section: str, key: str, default: Any = None) -> Any:
    part = config.get(section)
    return part.get(key, default) if isinstance(part, Mapping) else default


def _network_config(config: Mapping) -> NCSNppConfig | None:
    """The NCSNpp fields of a nested config, or None when some are missing or invalid."""
    try:
        return NCSNppConfig.from_config(config)
    except (ValueError, TypeError):
        return None


@functools.lru_cache(maxsize=None)
def _layout_of_published(name: str) -> dict[str, tuple[int, ...]]:
    return _layout(published_config(name))


def _layout(config: Mapping) -> dict[str, tuple[int, ...]]:
    """Key -> shape of the state_dict that NCSNpp(config) has (built on the meta device: no memory, no init)."""
    with torch.device("meta"):
        return shapes(NCSNpp(config).state_dict())


def _buffer_range(state: Mapping[str, torch.Tensor]) -> tuple[float, float, int] | None:
    """(sigma_min, sigma_max, num_scales) of the ``sigmas`` buffer, exp(linspace(log max, log min, N))."""
    sigmas = state.get("sigmas")
    if sigmas is None or sigmas.ndim != 1 or len(sigmas) < 2 or not sigmas.is_floating_point():
        return None
    high, low = float(sigmas[0]), float(sigmas[-1])
    return float(f"{low:.12g}"), float(f"{high:.12g}"), len(sigmas)


def _same_range(a: tuple[float, float], b: tuple[float, float]) -> bool:
    return all(math.isclose(u, v, rel_tol=1e-6) for u, v in zip(a, b))


class _NotInferable(Exception):
    """The tensors do not fit a network layout this reader recognises (the message says why)."""


@dataclasses.dataclass(frozen=True)
class _Structure:
    """What a checkpoint's tensors say about its network.

    The image size is not among it: attention is found per level (0 = full resolution), and no tensor
    records the resolution of level 0.
    """

    model: dict[str, Any]  # NCSNpp model fields read from the tensors
    num_channels: int
    attn_levels: tuple[int, ...]
    fir_seen: bool  # whether the tensors show FIR resampling (in the input pyramid's downsampler)

    @property
    def fourier(self) -> bool:
        return self.model["embedding_type"] == "fourier"

    def attn_resolutions(self, image_size: int) -> tuple[int, ...]:
        return tuple(image_size // 2**level for level in self.attn_levels)

    def config(self, template: str, image_size: int | None) -> dict:
        """A nested config: the template's settings, this structure, and attention at the same levels
        (without ``data.image_size`` and ``model.attn_resolutions`` when the size is None)."""
        config = _deep_update(published_config(template), {"model": self.model,
                                                           "data": {"num_channels": self.num_channels}})
        if image_size is None:
            del config["data"]["image_size"], config["model"]["attn_resolutions"]
        else:
            config["data"]["image_size"] = image_size
            config["model"]["attn_resolutions"] = self.attn_resolutions(image_size)
        return config


def _kind(params: Mapping[str, tuple] | None) -> str:
    """What an ``all_modules`` entry is, from its parameter names and shapes."""
    if params is None:
        return "empty"  # an index without tensors: a parameter-free resampler
    names = set(params)
    if names == {"W"}:
        return "fourier"
    if "NIN_0.W" in names:
        return "attention"
    if {"GroupNorm_0.weight", "Conv_0.weight", "Conv_1.weight"} <= names:
        return "resblock"
    if names == {"Conv2d_0.weight", "Conv2d_0.bias"}:
        return "fir_conv_downsample"
    if names == {"Conv_0.weight", "Conv_0.bias"}:
        return "conv_downsample"
    if names == {"Conv.weight", "Conv.bias"}:
        return "combine"
    if names == {"weight", "bias"}:
        return {1: "norm", 2: "linear", 4: "conv"}.get(len(params["weight"]), "unknown")
    return "unknown"


def _read_structure(shapes: Mapping[str, tuple[int, ...]], sigma_range: tuple[float, float, int] | None
                    ) -> _Structure:
    """Embedding, width, levels, blocks per level, attention and input pyramid, read off the encoder.

    Covers the BigGAN-style residual blocks of every released NCSN++/DDPM++ config. The number of blocks
    per level is that of level 0 (ended by its downsampling block); each later level must have as many.
    """
    modules: dict[int, dict[str, tuple]] = {}
    for key, shape in shapes.items():
        match = re.fullmatch(r"all_modules\.(\d+)\.(.+)", key)
        if match:
            modules.setdefault(int(match[1]), {})[match[2]] = shape
        elif key != "sigmas":
            raise _NotInferable(f"unexpected key {key!r} for an NCSNpp")
    if sigma_range is None:
        raise _NotInferable("no valid 'sigmas' buffer")

    def kind(i: int) -> str:
        return _kind(modules.get(i))

    def is_block(i: int, resampling: bool) -> bool:  # BigGAN up/down blocks have a Conv_2 at constant width
        if kind(i) != "resblock":
            return False
        params = modules[i]
        constant_width = params["GroupNorm_0.weight"][0] == params["Conv_0.weight"][0]
        return ("Conv_2.weight" in params and constant_width) == resampling

    fourier = kind(0) == "fourier"
    i = int(fourier)
    conditional = kind(i) == "linear"
    i += 2 * conditional
    if kind(i) != "conv" or 0 in modules[i]["weight"]:
        raise _NotInferable(f"no input convolution at all_modules.{i}")
    nf, num_channels = modules[i]["weight"][:2]
    i += 1
    ch_mult, attn_levels, pyramids, num_res_blocks = [], [], set(), None
    while True:
        blocks, width = 0, None
        while is_block(i, resampling=False) and blocks != num_res_blocks:
            width = modules[i]["Conv_0.weight"][0]
            blocks, i = blocks + 1, i + 1
            if kind(i) == "attention":
                i += 1
                if len(ch_mult) not in attn_levels:
                    attn_levels.append(len(ch_mult))
        if not width or width % nf:
            raise _NotInferable(f"no residual block of a width divisible by {nf} at all_modules.{i}")
        num_res_blocks = num_res_blocks or blocks
        ch_mult.append(width // nf)
        if not is_block(i, resampling=True):
            break  # the last level; the middle blocks follow
        i += 1
        if kind(i) == "fir_conv_downsample":
            pyramids.add(("residual", True))
            i += 1
        elif kind(i) == "conv_downsample":
            pyramids.add(("residual", False))
            i += 1
        elif kind(i) == "empty" and kind(i + 1) == "combine":
            pyramids.add(("input_skip", None))
            i += 2
        else:
            pyramids.add(("none", None))
    if len(pyramids) > 1:
        raise _NotInferable("the input pyramid differs between levels")
    progressive_input, fir = pyramids.pop() if pyramids else ("none", None)
    sigma_min, sigma_max, num_scales = sigma_range
    model = {"nf": nf, "ch_mult": tuple(ch_mult), "num_res_blocks": num_res_blocks, "resblock_type": "biggan",
             "progressive_input": progressive_input, "embedding_type": "fourier" if fourier else "positional",
             "conditional": conditional, "num_scales": num_scales, "sigma_min": sigma_min, "sigma_max": sigma_max}
    if fir is not None:
        model["fir"] = fir
    return _Structure(model, num_channels, tuple(attn_levels), fir is not None)


def _fit_decoder(state: Mapping[str, torch.Tensor], structure: _Structure, template: str) -> _Structure:
    """Settles the output pyramid (``progressive``, ``progressive_combine``) by building each candidate on the
    meta device (within the budget the tensors set) and comparing every key and shape with the checkpoint's;
    this also verifies the encoder."""
    layout = shapes(state)
    probe = 2 ** (len(structure.model["ch_mult"]) - 1)  # the smallest image size the levels allow
    combines = ("sum", "cat") if structure.model["progressive_input"] == "input_skip" else ("sum",)
    for progressive in ("none", "output_skip", "residual"):
        for combine in combines:
            candidate = dataclasses.replace(
                structure, model={**structure.model, "progressive": progressive, "progressive_combine": combine})
            try:
                with construction_budget(state, "the inferred NCSNpp"):
                    if _layout(candidate.config(template, probe)) == layout:
                        return candidate
            except CheckpointError:
                raise
            except ValueError:  # e.g. FIR with progressive='residual', which the original cannot run
                continue
    raise _NotInferable("the decoder fits none of the NCSN++/DDPM++ layouts")


@dataclasses.dataclass
class _Resolved:
    """A checkpoint's config as far as it is known, and what is still missing to build the denoiser."""

    config: dict  # nested score_sde config (model / data / training)
    name: str | None = None  # the released config it equals
    missing: list[str] = dataclasses.field(default_factory=list)  # what neither the checkpoint nor config tell
    hint: str = ""  # what to pass for it
    notes: list[str] = dataclasses.field(default_factory=list)  # what was taken from where

    def require_complete(self, source: str) -> None:
        if self.missing:
            raise CheckpointError(f"{source}: cannot tell {' nor '.join(self.missing)}; {self.hint}")


_NO_SDE = ("the SDE (a positional time embedding does not record it: the released VP and sub-VP DDPM++ "
           "checkpoints have identical tensors)")
_NO_IMAGE_SIZE = "the image size (score_sde checkpoints do not store it)"


def _given_sde(config: Mapping) -> str | None:
    sde = _section_get(config, "training", "sde")
    return sde.lower() if isinstance(sde, str) else sde


def _published_name(config: Mapping) -> str | None:
    """The released config that ``config`` equals in everything the denoiser uses, if any."""
    network = _network_config(config)
    if network is None:
        return None
    for name in PUBLISHED_CONFIGS:
        released = published_config(name)
        if NCSNppConfig.from_config(released) == network and all(
                _section_get(released, *field) == _section_get(config, *field)
                for field in (("training", "sde"), ("model", "beta_min"), ("model", "beta_max"))):
            return name
    return None


def _parse_config_argument(config: Any) -> tuple[str | None, Mapping]:
    """(name, dict) from ``config``: a released config's name, JSON object text, a dict, or None."""
    if config is None:
        return None, {}
    if isinstance(config, str):
        text = config.strip()
        if not text.startswith("{"):
            try:
                return text, published_config(text)
            except ValueError:
                raise CheckpointError(f"unknown score_sde config {text!r}; known: {', '.join(PUBLISHED_CONFIGS)}; "
                                      "or pass a config dict") from None
        try:
            config = json.loads(text)
        except (ValueError, RecursionError) as exc:  # JSONDecodeError, and integers of more than 4300 digits
            raise CheckpointError(f"score_sde config is neither a config name nor valid JSON "
                                  f"({str(exc)[:120]})") from None
    if not isinstance(config, Mapping):
        raise CheckpointError(f"score_sde config must be a config name or a dict, got {type(config).__name__}")
    check_arguments(dict(config), "score_sde config")
    return None, config


def _resolve(state: Mapping[str, torch.Tensor], config: Any, source: str) -> _Resolved:
    """The config: a released one by name, a dict with every network field as it is, else inferred from the
    tensors with the (partial) dict on top."""
    name, given = _parse_config_argument(config)
    if name is not None:
        return _Resolved(given, name=name)
    if _network_config(given) is None:
        return _infer(state, given, source)
    resolved = _Resolved(_deep_update({}, given))
    training = resolved.config.setdefault("training", {})
    if training.get("sde") is None and NCSNppConfig.from_config(given).embedding_type == "fourier":
        training["sde"] = "vesde"  # Gaussian Fourier features exist for the VE SDE only
    if training.get("sde") is None:
        resolved.missing.append(_NO_SDE)
        resolved.hint = "add 'training': {'sde': 'vpsde'} to the config if it was trained with the VP SDE"
    else:
        resolved.name = _published_name(resolved.config)
    return resolved


def _infer(state: Mapping[str, torch.Tensor], given: Mapping, source: str) -> _Resolved:
    """Structure from the tensors; the rest from the released config they fit, else the family's template."""
    layout, sigma_range = shapes(state), _buffer_range(state)
    try:
        structure = _read_structure(layout, sigma_range)
        sde = _given_sde(given) or ("vesde" if structure.fourier else None)
        template = TEMPLATES["ve" if sde == "vesde" else "vp"]
        structure = _fit_decoder(state, structure, template)
    except _NotInferable as exc:
        raise CheckpointError(f"{source}: cannot infer the network's config from its weights ({exc}); pass "
                              f"config=<name> ({', '.join(PUBLISHED_CONFIGS)}) or a score_sde config dict") from None
    if structure.fourier and sde != "vesde":
        raise CheckpointError(f"{source}: Gaussian Fourier features (all_modules.0.W) belong to score_sde's VE "
                              f"models, not training.sde={sde!r}; leave the SDE out, or pass a complete config dict")
    released = [name for name in PUBLISHED_CONFIGS
                if _layout_of_published(name) == layout and sde in (None, published_config(name)["training"]["sde"])
                and _same_range(sigma_range[:2], _model_range(published_config(name)))]
    if released:
        base = published_config(released[0])
        notes = [f"the weights fit the released {released[0]}: the image size and the settings they do not "
                 "show are taken from it"]
    else:
        base = structure.config(template, image_size=None)
        notes = [f"settings the weights do not show (activation, skip rescaling, FIR kernel, dropout) are those "
                 f"of the released {template}"]
        if not structure.fir_seen and "fir" not in (given.get("model") or {}):
            notes.append(f"FIR resampling is not visible in the weights: fir={base['model']['fir']}, as there")
    resolved = _Resolved(_deep_update(base, given), notes=notes)
    config = resolved.config
    config["training"]["sde"] = sde
    if "image_size" in config["data"] and "attn_resolutions" not in (given.get("model") or {}):
        config["model"]["attn_resolutions"] = structure.attn_resolutions(config["data"]["image_size"])
    if sde is None:
        resolved.missing.append(_NO_SDE)
    if "image_size" not in config["data"]:
        resolved.missing.append(_NO_IMAGE_SIZE)
    resolved.hint = _hint(sde is None, "image_size" not in config["data"], released)
    if not resolved.missing:
        resolved.name = _published_name(config)
    return resolved


def _model_range(config: Mapping) -> tuple[float, float]:
    """(model.sigma_min, model.sigma_max): the VE SDE's range and the 'sigmas' buffer's (NCSNpp's defaults)."""
    return (float(_section_get(config, "model", "sigma_min", NCSNppConfig.sigma_min)),
            float(_section_get(config, "model", "sigma_max", NCSNppConfig.sigma_max)))


def _hint(no_sde: bool, no_image_size: bool, released: list[str]) -> str:
    """What to pass: the released config the weights fit, else the missing entries as a dict."""
    entries = (["'training': {'sde': 'vpsde'}"] if no_sde else []) + (
        ["'data': {'image_size': <pixels>}"] if no_image_size else [])
    as_dict = "config={" + ", ".join(entries) + "}"
    if not no_sde:
        return f"pass {as_dict}"
    named = f"config={released[0]!r} (CLI: --model-config {released[0]}) or " if released else ""
    return f"if it was trained with the VP SDE pass {named}{as_dict}; sub-VP checkpoints are not supported"


# ----------------------------------------------------------------------------------------------------------
# Building the denoiser


def _sde_parameters(config: Mapping, source: str) -> dict[str, Any] | None:
    """ScoreSDEDenoiser's SDE arguments from a nested config (None while the SDE is not known); only
    continuous-time VP and VE are supported."""
    sde = _given_sde(config)
    if sde is None:
        return None
    if sde == "subvpsde":
        raise CheckpointError(f"{source}: sub-VP SDE checkpoints are not supported (only VP and VE)")
    if sde not in SDE_NAMES:
        raise CheckpointError(f"{source}: unknown SDE {sde!r} in the config's training.sde; expected 'vpsde' or "
                              "'vesde'")
    if not _section_get(config, "training", "continuous", True):
        raise CheckpointError(f"{source}: discrete-time checkpoints (training.continuous=False) are not supported")
    parameters: dict[str, Any] = {"sde": SDE_NAMES[sde]}
    if sde == "vpsde":
        parameters["beta_min"] = float(_section_get(config, "model", "beta_min", VP_BETA_MIN))
        parameters["beta_max"] = float(_section_get(config, "model", "beta_max", VP_BETA_MAX))
    return parameters


def _verified_network(resolved: _Resolved, state: Mapping[str, torch.Tensor], source: str) -> NCSNpp:
    """NCSNpp from the config on the meta device, checked against the checkpoint's keys, shapes and (VE) noise
    levels, its arguments and geometry first."""
    label = repr(resolved.name) if resolved.name else "given"
    check_arguments(resolved.config, f"the score_sde config of {source}")
    check_geometry(source, _section_get(resolved.config, "data", "image_size"),
                   _section_get(resolved.config, "data", "num_channels", NCSNppConfig.num_channels))
    network = verify(lambda: NCSNpp(resolved.config), state, f"the NCSNpp of {source}", lambda problem: (
        f"{source}: the weights do not fit the config {label} ({problem}); pass the config the checkpoint was "
        "trained with, or config=None to infer it"))
    ve_range, stored = (network.config.sigma_min, network.config.sigma_max), _buffer_range(state)
    if _given_sde(resolved.config) == "vesde" and not (stored and _same_range(stored[:2], ve_range)):
        levels = f"span [{stored[0]:g}, {stored[1]:g}]" if stored else "are malformed"
        raise CheckpointError(f"{source}: the checkpoint's noise levels ('sigmas') {levels}, but the config {label} "
                              f"has the VE range [{ve_range[0]:g}, {ve_range[1]:g}]; pass the config it was "
                              "trained with")
    return network


def load_score_sde_denoiser(path_or_checkpoint: PathOrCheckpoint, *, config: str | Mapping | None = None,
                            use_ema: bool = True) -> ScoreSDEDenoiser:
    """A score_sde checkpoint (file or loaded dict) as an EDM denoiser, in eval mode without gradients.

    Args:
        path_or_checkpoint: ``checkpoint_*.pth``, read with ``torch.load(weights_only=True)``, or its dict.
        config: a released config's name (``'vp/cifar10_ddpmpp_continuous'``), a score_sde config dict (or its
            JSON text), or None to infer it; a partial dict supplies what the tensors do not store and the
            rest is inferred (see the module docstring).
        use_ema: the EMA weights (the ones Song et al. evaluate) or, with False, the raw training weights.

    Raises CheckpointError, naming what to pass or fix, for unreadable or malformed files, configs that do not
    fit the weights, and what the checkpoint cannot tell.
    """
    checkpoint, source = _read(path_or_checkpoint)
    state = _model_state(checkpoint, source)
    resolved = _resolve(state, config, source)
    sde = _sde_parameters(resolved.config, source)
    resolved.require_complete(source)
    if use_ema and "ema" not in checkpoint:
        raise CheckpointError(f"{source}: no 'ema' entry (the EMA weights Song et al. evaluate); pass use_ema=False "
                              "to load the raw training weights")
    network = _verified_network(resolved, state, source)
    try:
        weights = score_sde_state_dict(checkpoint, ema_parameter_names(network), use_ema=use_ema)
    except ValueError as exc:
        raise CheckpointError(f"{source}: {exc}") from None
    network = materialize(network, lambda: NCSNpp(resolved.config), weights, f"the NCSNpp of {source}")
    denoiser = ScoreSDEDenoiser(network, config_name=resolved.name, **sde)
    return denoiser.eval().requires_grad_(False)


def inspect_score_sde_checkpoint(path_or_checkpoint: PathOrCheckpoint, *, config: str | Mapping | None = None
                                 ) -> dict[str, Any]:
    """What a score_sde checkpoint holds, without building its network.

    Keys: family, architecture, sde ('vp', 've' or None when not recorded), parameters (buffers excluded),
    label_dim, img_resolution, img_channels, sigma_min, sigma_max (EDM units), dtype, step, ema (whether
    EMA weights are present), notes. Values the checkpoint cannot tell are None, and a note says what to
    pass for them.
    """
    checkpoint, source = _read(path_or_checkpoint)
    state = _model_state(checkpoint, source)
    resolved = _resolve(state, config, source)
    cfg = resolved.config
    sde = _sde_parameters(cfg, source)
    if not resolved.missing:
        _verified_network(resolved, state, source)  # the checks of loading it, on the meta device
    sde_name = sde["sde"] if sde else None
    centered = bool(_section_get(cfg, "data", "centered"))
    sigma_range = (None, None)
    if sde is not None:
        data_scale = _data_map(centered)[0]
        song = _song_sigma_range(sde_name, _model_range(cfg), sde.get("beta_min"), sde.get("beta_max"))
        sigma_range = (song[0] / data_scale, song[1] / data_scale)
    parameters = {key: value for key, value in state.items() if key != "sigmas"}
    ema = checkpoint.get("ema")
    notes = list(resolved.notes)
    if resolved.missing:
        notes.append(f"cannot tell {' nor '.join(resolved.missing)}; {resolved.hint}")
    has_ema = isinstance(ema, Mapping) and isinstance(ema.get("shadow_params"), (list, tuple))
    if has_ema:
        notes.append(f"EMA weights (decay {ema.get('decay')}, {ema.get('num_updates')} updates) are used by default; "
                     "use_ema=False loads the raw training weights")
    else:
        notes.append("no EMA weights: load with use_ema=False (the raw training weights)")
    if sde is not None and not centered:
        notes.append("the network's data are in [0, 1]: it sees (x + 1)/2 at sigma/2 in EDM's units")
    step = checkpoint.get("step")
    if isinstance(step, torch.Tensor) and step.numel() == 1:
        step = step.item()
    return {
        "family": FAMILY,
        "architecture": _architecture(bool(_section_get(cfg, "model", "fir")),
                                      str(_section_get(cfg, "model", "progressive_input")), sde_name, resolved.name),
        "sde": sde_name,
        "parameters": sum(value.numel() for value in parameters.values()),
        "label_dim": 0,
        "img_resolution": _section_get(cfg, "data", "image_size"),
        "img_channels": _section_get(cfg, "data", "num_channels", NCSNppConfig.num_channels),
        "sigma_min": sigma_range[0],
        "sigma_max": sigma_range[1],
        "dtype": dtype_summary(parameters),
        "step": step if isinstance(step, int) and not isinstance(step, bool) else None,
        "ema": has_ema,
        "notes": notes,
    }


class ScoreSDEFormat:
    """score_sde_pytorch checkpoints ``{'model', 'ema', 'step', 'optimizer'}`` in a torch zip; the network config
    by ``config`` (a released name or a dict, ``--model-config``) or inferred; ``use_ema=False`` (``--weights
    raw``) loads the raw training weights."""

    name = FAMILY
    options = frozenset({"config", "use_ema"})

    def sniff(self, source: FileSource) -> bool:
        return is_score_sde_checkpoint(source.readable_torch_object())

    def inspect(self, source: FileSource, options: LoadOptions) -> dict[str, Any]:
        return inspect_score_sde_checkpoint(source, config=options.config)

    def load(self, source: FileSource, options: LoadOptions) -> nn.Module:
        return load_score_sde_denoiser(source, config=options.config, use_ema=options.use_ema)


SCORE_SDE = register_format(ScoreSDEFormat())
