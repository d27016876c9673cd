"""guided-diffusion and improved-diffusion checkpoints as EDM denoisers D(x; sigma).

The released ``.pt`` files of improved-diffusion ("Improved Denoising Diffusion Probabilistic Models",
Nichol & Dhariwal 2021) and guided-diffusion ("Diffusion Models Beat GANs on Image Synthesis", Dhariwal &
Nichol 2021) are plain state_dicts of the ADM U-Net (or its upsampler, or the noisy classifier) with no
configuration inside. The architecture and the discrete diffusion the network was trained with therefore come
from elsewhere, in this order:

1. the registry of released checkpoints, by file name (``RELEASED_CHECKPOINTS``, e.g. ``64x64_diffusion.pt``);
   flags given as well override single entries;
2. a flag string in the original syntax (``"--attention_resolutions 32,16,8 --class_cond True ..."``) that
   names the architecture: the flags the original scripts were run with, unset flags taking the code base's
   defaults as they did;
3. the tensor shapes, which fix the channel widths, depth, attention levels, learned variances and classes,
   completed by the flags the weights cannot tell: the resolution, the noise schedule and its length, the
   timestep convention and the attention heads and qkv order (same shapes, different results).

The network of a model with T steps sees x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps at step index t and
predicts eps (optionally also the variance interpolation v of the learned-range variance). In EDM terms
(Karras et al. 2022, Table 1, VP scaling) x_t is x/sqrt(1 + sigma^2) at sigma_t = sqrt((1 - abar_t)/abar_t),
so D(x; sigma_t) = x - sigma_t eps on the grid of the T noise levels; sigma is rounded to the nearest level.
The network receives the step index exactly as the original did: t itself, or t * 1000/T (float32) when the
model was trained with ``rescale_timesteps``.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, fields
from functools import cached_property
from typing import Any, NamedTuple

import torch
from torch import nn

from ..checkpoints import TOOLKIT, model_from_file, read_model_file
from ..discrete import StepGrid, check_schedule, named_beta_schedule, nearest_index
from ..errors import CheckpointError, ConfigError
from ..io.formats import (
    FileSource, LoadOptions, check_arguments, check_geometry, dtype_summary, load_wrapper, materialize,
    register_format, register_model_type, verify,
)
from ..networks.openai_unet import EncoderUNetModel
from ..networks.registry import network_config
from .generic import PredictionDenoiser
from .openai_flags import (
    NUM_CLASSES,
    RELEASED_CHECKPOINTS,
    classifier_defaults,
    classifier_from_flags,
    format_model_flags,
    model_and_diffusion_defaults,
    model_from_flags,
    parse_model_flags,
    sr_model_and_diffusion_defaults,
)

__all__ = [
    "OPENAI",
    "OpenAIClassifier",
    "OpenAIDenoiser",
    "OpenAIDiffusion",
    "inspect_openai_checkpoint",
    "is_openai_state_dict",
    "load_openai_checkpoint",
    "load_openai_classifier",
]

FAMILIES = {"guided": "guided-diffusion", "improved": "improved-diffusion"}
IMG_CHANNELS = 3  # the original scripts build every network for RGB images

# Flags that only one code base has: they tell which defaults apply to a flag string.
_GUIDED_ONLY = frozenset(model_and_diffusion_defaults("guided")) - frozenset(model_and_diffusion_defaults("improved"))
_IMPROVED_ONLY = frozenset(model_and_diffusion_defaults("improved")) - frozenset(model_and_diffusion_defaults("guided"))
# Flags that the tensor shapes decide; a flag string naming any of them describes the architecture itself.
_SHAPE_FLAGS = ("num_channels", "num_res_blocks", "channel_mult", "attention_resolutions", "use_scale_shift_norm",
                "resblock_updown")
_DIFFUSION_FLAGS = ("noise_schedule", "diffusion_steps", "rescale_timesteps")
# Classifier options that create_classifier hard-codes; given as flags they override its 64 heads / size table.
_CLASSIFIER_EXTENSIONS = ("num_head_channels", "channel_mult")


# ----------------------------------------------------------------------------------------------------------
# The discrete diffusion


@dataclass(frozen=True)
class OpenAIDiffusion:
    """The diffusion a network was trained with, from the ``create_gaussian_diffusion`` flags.

    Only what sampling needs is kept: the schedule (``noise_schedule``, ``diffusion_steps``), what the network
    predicts (eps, or x_0 with ``predict_xstart``), its variance (learned range with ``learn_sigma``, else
    fixed large, or small with ``sigma_small``) and the timestep convention (``rescale_timesteps``).
    ``timestep_respacing``, ``use_kl`` and ``rescale_learned_sigmas`` concern sampling schedules and training
    only. Schedule arrays are float64 like the originals' numpy arrays.
    """

    noise_schedule: str = "linear"
    diffusion_steps: int = 1000
    learn_sigma: bool = False
    sigma_small: bool = False
    predict_xstart: bool = False
    rescale_timesteps: bool = False

    def __post_init__(self):
        check_schedule(self.noise_schedule, self.diffusion_steps)

    @classmethod
    def from_flags(cls, flags: Mapping[str, Any]) -> "OpenAIDiffusion":
        """From (complete) flag values; flags of other kinds are ignored."""
        return cls(**{f.name: flags[f.name] for f in fields(cls) if f.name in flags})

    def to_config(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def num_timesteps(self) -> int:
        return self.diffusion_steps

    @cached_property
    def betas(self) -> torch.Tensor:
        return named_beta_schedule(self.noise_schedule, self.diffusion_steps)

    @cached_property
    def alphas_cumprod(self) -> torch.Tensor:
        return torch.cumprod(1.0 - self.betas, dim=0)

    @cached_property
    def sigmas(self) -> torch.Tensor:
        """EDM noise level of every step index: sigma_t = sqrt((1 - abar_t) / abar_t), increasing."""
        return ((1.0 - self.alphas_cumprod) / self.alphas_cumprod).sqrt()

    @property
    def model_var_type(self) -> str:
        """'learned_range', 'fixed_small' or 'fixed_large', as ``create_gaussian_diffusion`` chooses."""
        if self.learn_sigma:
            return "learned_range"
        return "fixed_small" if self.sigma_small else "fixed_large"

    @property
    def variance(self) -> str:
        """The step grid's variance: 'learned', 'small' or 'large' (:class:`~edm_toolkit.discrete.StepGrid`)."""
        return {"learned_range": "learned", "fixed_small": "small", "fixed_large": "large"}[self.model_var_type]

    def scale_timesteps(self, t: torch.Tensor) -> torch.Tensor:
        """What the network receives for step indices ``t``: t, or float32 t * 1000/T with rescale_timesteps."""
        t = torch.as_tensor(t)
        return t.float() * (1000.0 / self.diffusion_steps) if self.rescale_timesteps else t


# ----------------------------------------------------------------------------------------------------------
# The modules


class OpenAIDenoiser(PredictionDenoiser):
    """An ADM network (``UNetModel`` or ``SuperResModel``) with its own diffusion, as an EDM denoiser.

    ``forward(x, sigma, class_labels=None, **model_kwargs)`` is D(x; sigma) (see the module docstring);
    ``model_kwargs`` go to the network (``low_res=`` for the upsampler). Its ``step_grid`` is the diffusion's
    (with the variance the original chose); with ``learn_sigma`` the variance channels v come back from
    ``denoise_with_variance``. :meth:`model_output` calls the network exactly as the original
    ``p_mean_variance`` does.
    """

    def __init__(self, model: nn.Module, diffusion: OpenAIDiffusion, *, codebase: str = "guided",
                 flags: Mapping[str, Any] | None = None, img_resolution: int | None = None):
        if codebase not in FAMILIES:
            raise ConfigError(f"unknown codebase {codebase!r}; choose 'guided' or 'improved'")
        out_channels = model.out[-1].out_channels
        factor = 2 if diffusion.learn_sigma else 1
        if out_channels % factor:
            raise ConfigError(f"learn_sigma needs an even number of output channels, the network has {out_channels}")
        super().__init__(
            model,
            prediction="x0" if diffusion.predict_xstart else "eps",
            parameterization="vp",
            sigmas=diffusion.sigmas,
            time="index",
            img_resolution=img_resolution if img_resolution is not None else model.image_size,
            img_channels=out_channels // factor,
            label_dim=model.num_classes or 0,
            label_arg="y",
            variance=diffusion.variance,
        )
        self.diffusion = diffusion
        self.codebase = codebase
        self.family = FAMILIES[codebase]
        self.flags = dict(flags or {})

    def time_input(self, sigma: torch.Tensor) -> torch.Tensor:
        """The original's timestep for the grid level nearest to ``sigma``."""
        return self.diffusion.scale_timesteps(nearest_index(sigma, self.grid_sigmas))

    def model_output(self, x_t: torch.Tensor, t_index: torch.Tensor, y: torch.Tensor | None = None,
                     **model_kwargs) -> torch.Tensor:
        """The raw network output for x_t at step indices ``t_index`` (``[eps, v]`` with learn_sigma)."""
        t = self.diffusion.scale_timesteps(torch.as_tensor(t_index, device=x_t.device))
        return self.model(x_t, t, y=y, **model_kwargs)


class OpenAIClassifier(nn.Module):
    """guided-diffusion's noisy classifier (``EncoderUNetModel``) with the timestep convention of its diffusion.

    ``forward(x_t, timesteps)`` gives logits for x_t at step indices ``timesteps``, fed to the network as the
    original does (``classifier_sample.py``: the same, possibly rescaled, timestep as the diffusion model).
    :meth:`edm_logits` takes EDM's x and sigma instead. ``step_grid`` is its diffusion's grid and ``num_classes``
    its number of classes (the noisy-classifier protocol that classifier guidance uses).
    """

    def __init__(self, model: EncoderUNetModel, diffusion: OpenAIDiffusion, *,
                 flags: Mapping[str, Any] | None = None):
        super().__init__()
        self.model = model
        self.diffusion = diffusion
        self.flags = dict(flags or {})
        self.family = FAMILIES["guided"]
        self.num_classes = model.out_channels
        self.img_resolution = model.image_size
        self.img_channels = model.in_channels
        self.step_grid = StepGrid(diffusion.alphas_cumprod)
        self.register_buffer("grid_sigmas", diffusion.sigmas, persistent=False)  # on the network's device
        # What a file summary shows (edm inspect): the classes it tells apart and the noise range of its grid.
        self.label_dim = self.num_classes
        self.sigma_min, self.sigma_max = float(diffusion.sigmas[0]), float(diffusion.sigmas[-1])

    def forward(self, x_t: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        return self.model(x_t, self.diffusion.scale_timesteps(torch.as_tensor(timesteps, device=x_t.device)))

    def timestep_of_sigma(self, sigma) -> torch.Tensor:
        """Index of the grid level nearest to ``sigma`` (int64, sigma's shape)."""
        return nearest_index(torch.as_tensor(sigma, dtype=torch.float64), self.grid_sigmas)

    def edm_logits(self, x: torch.Tensor, sigma) -> torch.Tensor:
        """Logits for EDM's x = x_0 + sigma n: the network sees x/sqrt(1 + sigma^2) at the nearest step."""
        sigma = torch.as_tensor(sigma, dtype=torch.float64, device=x.device).reshape(-1).expand(x.shape[0])
        x_t = x / (1 + sigma.to(torch.float32).reshape(-1, 1, 1, 1) ** 2).sqrt()
        return self(x_t.to(torch.float32), self.timestep_of_sigma(sigma).to(x.device))


# ----------------------------------------------------------------------------------------------------------
# Reading files


def is_openai_state_dict(obj: Any) -> bool:
    """True for a flat {str: tensor} dict in the ADM key layout (``input_blocks.0.0.weight``, ``out.*``)."""
    return (
        isinstance(obj, Mapping)
        and len(obj) > 0
        and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items())
        and "input_blocks.0.0.weight" in obj
        and "time_embed.0.weight" in obj
        and any(k.startswith("out.") for k in obj)
    )


def _is_classifier(state_dict: Mapping[str, torch.Tensor]) -> bool:
    return not any(k.startswith("output_blocks.") for k in state_dict)


def _read_state_dict(path_or_state_dict) -> tuple[dict[str, torch.Tensor], str, str | None]:
    """(state_dict, name for messages, file name or None) of a file (read weights-only, bounded) or a dict."""
    if isinstance(path_or_state_dict, (str, os.PathLike, FileSource)):
        source = path_or_state_dict if isinstance(path_or_state_dict, FileSource) else FileSource(path_or_state_dict)
        obj, name, file_name = source.torch_object(), str(source), source.path.name
    else:
        obj, name, file_name = path_or_state_dict, "the given state_dict", None
    if not is_openai_state_dict(obj):
        if isinstance(obj, Mapping):
            keys = sorted(map(str, obj))[:4]
            found = f"a dict with keys {keys}{' ...' if len(obj) > 4 else ''}"
        else:
            found = f"a {type(obj).__name__}"
        raise CheckpointError(
            f"{name} is not a guided/improved-diffusion state_dict (found {found}; expected tensors named like "
            "'input_blocks.0.0.weight' and 'out.2.weight')"
        )
    return dict(obj), name, file_name


# ----------------------------------------------------------------------------------------------------------
# Resolving the architecture


class _Resolution(NamedTuple):
    kind: str  # "diffusion", "upsampler" or "classifier"
    codebase: str
    flags: dict[str, Any]  # complete flag values (code base defaults filled in)
    num_classes: int
    resolved_from: str
    notes: list[str]


def _parse_flags(model_flags: str | Mapping[str, Any] | None) -> dict[str, Any]:
    """Flag values with argparse's types; a dict goes through the same parser (unknown flags refused)."""
    if model_flags is None:
        return {}
    try:
        text = model_flags if isinstance(model_flags, str) else format_model_flags(model_flags)
        return parse_model_flags(text)
    except ValueError as exc:
        raise CheckpointError(f"bad model flags: {exc}") from None


def _registry_entry(file_name: str | None, explicit: bool) -> dict[str, Any] | None:
    if file_name in RELEASED_CHECKPOINTS:
        return RELEASED_CHECKPOINTS[file_name]
    if explicit:
        raise CheckpointError(
            f"unknown released checkpoint {file_name!r}; known: {', '.join(RELEASED_CHECKPOINTS)} "
            "(or pass model_flags instead of file_name)"
        )
    return None


def _flags_codebase(flags: Mapping[str, Any], codebase: str | None, source: str) -> str | None:
    """The code base whose defaults the flags follow: given, or told by flags that only one code base has."""
    if codebase is not None:
        return codebase
    guided, improved = _GUIDED_ONLY & set(flags), _IMPROVED_ONLY & set(flags)
    if guided and improved:
        raise CheckpointError(
            f"the flags for {source} mix guided-diffusion ({', '.join(sorted(guided))}) and improved-diffusion "
            f"({', '.join(sorted(improved))}) options; keep the flags of one code base"
        )
    return "guided" if guided else "improved" if improved else None


def _label_rows(state_dict: Mapping[str, torch.Tensor]) -> int:
    weight = state_dict.get("label_emb.weight")
    return int(weight.shape[0]) if weight is not None else NUM_CLASSES


def _resolve_unet(state_dict, model_flags, file_name, explicit_name, codebase, source) -> _Resolution:
    given = _parse_flags(model_flags)
    entry = _registry_entry(file_name, explicit_name)
    if entry is not None:
        if entry["kind"] == "classifier":
            raise CheckpointError(f"{file_name} is a noisy classifier: load it with load_openai_classifier")
        flags = {**entry["flags"], **given}
        notes = [f"architecture and diffusion from the published flags of {file_name}"]
        if given:
            notes.append(f"overridden by the given flags: {format_model_flags(given)}")
        return _resolution(state_dict, flags, codebase or entry["codebase"], f"registry:{file_name}", notes)
    if any(name in given for name in _SHAPE_FLAGS):
        base = _flags_codebase(given, codebase, source)
        if base is None:
            raise CheckpointError(
                f"cannot tell whether the flags for {source} are guided-diffusion's or improved-diffusion's, whose "
                "defaults differ (--rescale_timesteps False vs True): pass codebase='guided' or codebase='improved'"
            )
        return _resolution(state_dict, given, base, "flags", ["architecture from the given flags"])
    return _inferred_resolution(state_dict, given, codebase, source)


def _resolution(state_dict, flags, codebase, resolved_from, notes) -> _Resolution:
    """Complete ``flags`` with the code base's defaults, noting those that the weights cannot confirm."""
    defaults = (sr_model_and_diffusion_defaults if "large_size" in flags else model_and_diffusion_defaults)(codebase)
    complete = {**defaults, **flags}
    kind = "upsampler" if "large_size" in flags else "diffusion"
    unstated = [f"--{name} {complete[name]}" for name in (*_DIFFUSION_FLAGS, "use_new_attention_order")
                if name in complete and name not in flags]
    if unstated:
        notes.append(f"not stated, {FAMILIES[codebase]} defaults used: {' '.join(unstated)}")
    if complete.get("use_fp16"):
        notes.append("use_fp16: the original runs the U-Net torso in float16; this denoiser computes in float32 "
                     "(denoiser.model.convert_to_fp16() matches the original on a GPU)")
    if complete.get("timestep_respacing"):
        notes.append("timestep_respacing is a sampling option: the denoiser covers all "
                     f"{complete['diffusion_steps']} steps")
    return _Resolution(kind, codebase, complete, _label_rows(state_dict), resolved_from, notes)


# ---- inference from tensor shapes


def _block_modules(state_dict, prefix: str) -> dict[int, dict[int, set[str]]]:
    """{block index: {module index: parameter names}} of ``prefix``.N.M.* keys."""
    blocks: dict[int, dict[int, set[str]]] = {}
    for key in state_dict:
        if key.startswith(prefix):
            block, module, rest = key[len(prefix):].split(".", 2)
            blocks.setdefault(int(block), {}).setdefault(int(module), set()).add(rest)
    return blocks


def _unrecognised(source: str, why: str) -> CheckpointError:
    return CheckpointError(
        f"cannot infer the architecture of {source} from its weights ({why}); pass the original flags: "
        "--model-flags '--image_size N --num_channels N --num_res_blocks N ...'"
    )


def _infer_shapes(state_dict, source: str) -> tuple[dict[str, Any], tuple[int, ...], bool]:
    """(the shape flags except attention_resolutions, downsampling factors with attention, is an upsampler)."""
    try:
        return _shape_facts(state_dict)
    except (KeyError, ValueError, ZeroDivisionError):
        raise _unrecognised(source, "unexpected block layout") from None


def _shape_facts(sd) -> tuple[dict[str, Any], tuple[int, ...], bool]:
    width = int(sd["time_embed.0.weight"].shape[1])
    in_channels, out_channels = int(sd["input_blocks.0.0.weight"].shape[1]), int(sd["out.2.weight"].shape[0])
    if in_channels not in (IMG_CHANNELS, 2 * IMG_CHANNELS) or out_channels not in (IMG_CHANNELS, 2 * IMG_CHANNELS):
        raise ValueError("channels")
    outputs = _block_modules(sd, "output_blocks.")
    # An output block is [ResBlock, attention?, upsampler?]; the first upsampler closes the lowest level.
    ups = [b for b, modules in sorted(outputs.items())
           for m, names in modules.items() if m > 0 and ("conv.weight" in names or "in_layers.0.weight" in names)]
    per_level = ups[0] + 1 if ups else len(outputs)
    levels = len(outputs) // per_level
    # The encoder has the same number of blocks: a stem, then num_res_blocks per level and a downsampler between.
    if per_level < 2 or levels * per_level != len(outputs) or len(_block_modules(sd, "input_blocks.")) != len(outputs):
        raise ValueError("layout")
    mults, attention_ds = [], []
    for level in range(levels):
        first = f"input_blocks.{1 + level * per_level}"
        channels = int(sd[f"{first}.0.out_layers.3.weight"].shape[0])
        mults.append(channels // width if channels % width == 0 else channels / width)
        if f"{first}.1.qkv.weight" in sd:
            attention_ds.append(2**level)
    if int(sd["input_blocks.0.0.weight"].shape[0]) != int(mults[0] * width):
        raise ValueError("stem")
    emb_width = int(sd["input_blocks.1.0.emb_layers.1.weight"].shape[0])
    upsampler = outputs[ups[0]][max(outputs[ups[0]])] if ups else set()
    flags = {
        "num_channels": width,
        "num_res_blocks": per_level - 1,
        "channel_mult": tuple(mults),
        "use_scale_shift_norm": emb_width == 2 * int(sd["input_blocks.1.0.out_layers.3.weight"].shape[0]),
        "resblock_updown": "in_layers.0.weight" in upsampler,
        "learn_sigma": out_channels == 2 * IMG_CHANNELS,
        "class_cond": "label_emb.weight" in sd,
    }
    return flags, tuple(attention_ds), in_channels == 2 * IMG_CHANNELS


_PLACEHOLDERS = {
    "noise_schedule": "linear|cosine",
    "diffusion_steps": "1000|4000",
    "rescale_timesteps": "True|False",
    "use_new_attention_order": "True|False",
    "num_heads": "N",
    "image_size": "N",
    "large_size": "N",
}


def _inferred_resolution(state_dict, given, codebase, source) -> _Resolution:
    inferred, attention_ds, super_res = _infer_shapes(state_dict, source)
    guided_weights = inferred["resblock_updown"] or inferred["channel_mult"][0] != 1
    base = _flags_codebase(given, codebase, source) or ("guided" if guided_weights else None)
    size_flag = "large_size" if super_res else "image_size"
    # improved-diffusion and every upsampler (sr_create_model has no such flag) use the legacy qkv order.
    order = ["use_new_attention_order"] if base != "improved" and not super_res else []
    required = [*_DIFFUSION_FLAGS, *order, "num_heads", size_flag]
    missing = [name for name in required if name not in given
               and not (name == "num_heads" and "num_head_channels" in given)]
    if missing:
        example = " ".join(f"--{name} {_PLACEHOLDERS[name]}" for name in missing)
        heads = " (--num_head_channels C instead of --num_heads N)" if "num_heads" in missing else ""
        raise CheckpointError(
            f"{source}: the weights cannot tell {', '.join('--' + n for n in missing)}: pass --model-flags "
            f"'{example}'{heads}, or the complete flags it was trained with"
        )
    size = int(given[size_flag])
    resolutions = tuple(size // ds for ds in attention_ds)
    if any(res * ds != size for res, ds in zip(resolutions, attention_ds)):
        raise CheckpointError(f"--{size_flag} {size} does not fit the attention levels of {source}")
    flags = {**inferred, "attention_resolutions": resolutions, **given}
    notes = ["architecture inferred from the tensor shapes"]
    if base is None:
        base = "guided"
        notes.append("the code base is not told by the weights; guided-diffusion and improved-diffusion networks of "
                     "this layout are identical")
    return _resolution(state_dict, flags, base, "weights", notes)


def _resolve_classifier(state_dict, model_flags, file_name, explicit_name, source) -> _Resolution:
    given = _parse_flags(model_flags)
    entry = _registry_entry(file_name, explicit_name)
    if entry is not None:
        if entry["kind"] != "classifier":
            raise CheckpointError(f"{file_name} is a diffusion model, not a classifier: use load_openai_checkpoint")
        paired = next((e for e in RELEASED_CHECKPOINTS.values() if e["classifier"] == file_name), None)
        diffusion = {k: paired["flags"][k] for k in _DIFFUSION_FLAGS if k in paired["flags"]} if paired else {}
        flags, resolved_from = {**diffusion, **entry["flags"], **given}, f"registry:{file_name}"
        notes = [f"architecture from the published flags of {file_name}"]
        if paired:
            notes.append("timestep convention of the diffusion model it guides: " + format_model_flags(diffusion))
    elif given:
        flags, resolved_from, notes = given, "flags", ["architecture from the given flags"]
    else:
        raise CheckpointError(
            f"{source}: a noisy classifier's architecture cannot be inferred from its weights; pass file_name= for "
            "a released classifier or --model-flags '--image_size N --classifier_width N --classifier_depth N "
            "--classifier_attention_resolutions 32,16,8 --classifier_pool attention ...'"
        )
    complete = {**classifier_defaults(), **flags}
    return _Resolution("classifier", "guided", complete, _classifier_classes(state_dict), resolved_from, notes)


def _classifier_classes(state_dict) -> int:
    """Output width of the head: attention pool (out.2.c_proj), adaptive (out.3 conv), spatial(_v2) (Linear)."""
    for key in ("out.2.c_proj.weight", "out.3.weight", "out.2.weight"):
        if key in state_dict:
            return int(state_dict[key].shape[0])
    return NUM_CLASSES


# ----------------------------------------------------------------------------------------------------------
# Building and loading


def _builder(res: _Resolution) -> Callable[[], nn.Module]:
    """Builds the network the resolved flags describe (as the original scripts do)."""
    if res.kind == "classifier":
        flags = {k: v for k, v in res.flags.items() if k not in _CLASSIFIER_EXTENSIONS}
        extensions = {k: res.flags[k] for k in _CLASSIFIER_EXTENSIONS if k in res.flags}
        return lambda: classifier_from_flags(flags, num_classes=res.num_classes, **extensions)
    return lambda: model_from_flags(res.flags, codebase=res.codebase, num_classes=res.num_classes)


def _mismatch(source: str, res: _Resolution, network: str) -> Callable[[str], str]:
    """The message for weights whose keys or shapes differ from the resolved network's."""
    if res.resolved_from.startswith("registry:"):
        fix = f"the file is not the released {res.resolved_from[9:]}; rename it or pass its flags (--model-flags)"
    else:
        fix = "check the flags (--model-flags)"
    return lambda problem: f"{source}: the weights do not match the {network} of {res.resolved_from} ({problem}); {fix}"


def _img_resolution(res: _Resolution) -> int:
    return int(res.flags["large_size" if res.kind == "upsampler" else "image_size"])


class _Checked(NamedTuple):
    state_dict: dict[str, torch.Tensor]
    res: _Resolution
    model: nn.Module  # on the meta device, its layout checked against state_dict
    build: Callable[[], nn.Module]
    what: str

    def loaded(self) -> nn.Module:
        return materialize(self.model, self.build, self.state_dict, self.what)


def _resolved(path_or_state_dict, *, model_flags, file_name, codebase, classifier: bool | None) -> _Checked:
    """The state_dict, its resolved architecture and the network checked against it on the meta device;
    ``classifier`` None accepts either kind."""
    if codebase not in (None, *FAMILIES):
        raise CheckpointError(f"unknown codebase {codebase!r}; choose 'guided' or 'improved'")
    state_dict, source, stored_name = _read_state_dict(path_or_state_dict)
    if classifier is None:
        classifier = _is_classifier(state_dict)
    elif _is_classifier(state_dict) != classifier:
        hint = ("a noisy classifier: use load_openai_classifier" if not classifier
                else "a diffusion network, not a classifier: use load_openai_checkpoint")
        raise CheckpointError(f"{source} holds {hint}")
    name = file_name if file_name is not None else stored_name
    if classifier:
        res = _resolve_classifier(state_dict, model_flags, name, file_name is not None, source)
    else:
        res = _resolve_unet(state_dict, model_flags, name, file_name is not None, codebase, source)
    check_arguments(res.flags, f"the flags of {source}")
    check_geometry(source, _img_resolution(res), IMG_CHANNELS,
                   res.num_classes if res.kind == "classifier" or res.flags.get("class_cond") else 0)
    OpenAIDiffusion.from_flags(res.flags)  # the schedule and its length checked before anything is built
    build = _builder(res)
    network = {"classifier": "EncoderUNetModel", "upsampler": "SuperResModel"}.get(res.kind, "UNetModel")
    what = f"the {network} of {source}"
    return _Checked(state_dict, res, verify(build, state_dict, what, _mismatch(source, res, network)), build, what)


def load_openai_checkpoint(path_or_state_dict, *, model_flags: str | Mapping[str, Any] | None = None,
                           file_name: str | None = None, codebase: str | None = None) -> OpenAIDenoiser:
    """A guided-/improved-diffusion ``.pt`` (or its state_dict) as an :class:`OpenAIDenoiser`, in eval mode.

    ``file_name`` names a released checkpoint (default: the file's own name, if it is one); ``model_flags``
    is a flag string or dict in the original syntax; ``codebase`` ('guided' or 'improved') picks the defaults
    for unset flags where the flags do not tell. The file is read with ``torch.load(weights_only=True)`` and
    loaded strictly; any problem raises :class:`CheckpointError`.
    """
    checked = _resolved(path_or_state_dict, model_flags=model_flags, file_name=file_name, codebase=codebase,
                        classifier=False)
    res = checked.res
    denoiser = OpenAIDenoiser(checked.loaded(), OpenAIDiffusion.from_flags(res.flags), codebase=res.codebase,
                              flags=res.flags, img_resolution=_img_resolution(res))
    return denoiser.eval().requires_grad_(False)


def load_openai_classifier(path_or_state_dict, *, model_flags: str | Mapping[str, Any] | None = None,
                           file_name: str | None = None) -> OpenAIClassifier:
    """guided-diffusion's noisy classifier with its timestep convention, in eval mode.

    Released classifiers resolve by file name (with the schedule of the diffusion model they were published
    with); others need their flags (``--image_size``, ``--classifier_*``; ``--num_head_channels`` and
    ``--channel_mult`` override what ``create_classifier`` hard-codes). A toolkit model file of a classifier
    (``edm train-classifier``'s snapshots) holds its flags and diffusion and is read as it is.
    """
    if isinstance(path_or_state_dict, (str, os.PathLike, FileSource)):
        source = path_or_state_dict if isinstance(path_or_state_dict, FileSource) else FileSource(path_or_state_dict)
        if _is_toolkit_file(source):
            return _toolkit_classifier(source, model_flags, file_name)
        path_or_state_dict = source
    checked = _resolved(path_or_state_dict, model_flags=model_flags, file_name=file_name, codebase=None,
                        classifier=True)
    classifier = OpenAIClassifier(checked.loaded(), OpenAIDiffusion.from_flags(checked.res.flags),
                                  flags=checked.res.flags)
    return classifier.eval().requires_grad_(False)


def inspect_openai_checkpoint(path_or_state_dict, *, model_flags: str | Mapping[str, Any] | None = None,
                              file_name: str | None = None, codebase: str | None = None) -> dict[str, Any]:
    """Summary of a checkpoint after resolving and checking its architecture, without loading the weights.

    Keys: family, architecture, resolved_from, parameters, label_dim, img_resolution, img_channels, sigma_min,
    sigma_max, dtype, flags (complete flag values), notes.
    """
    state_dict, res, model, _, _ = _resolved(path_or_state_dict, model_flags=model_flags, file_name=file_name,
                                             codebase=codebase, classifier=None)
    diffusion = OpenAIDiffusion.from_flags(res.flags)
    learn_sigma = res.kind != "classifier" and diffusion.learn_sigma
    notes = list(res.notes)
    if learn_sigma:
        notes.append("learned variances: channels 3-5 (v) via denoise_with_variance")
    return {
        "family": FAMILIES[res.codebase],
        "architecture": type(model).__name__,
        "resolved_from": res.resolved_from,
        "parameters": sum(t.numel() for t in state_dict.values()),
        "label_dim": res.num_classes if res.kind == "classifier" or res.flags.get("class_cond") else 0,
        "img_resolution": _img_resolution(res),
        "img_channels": IMG_CHANNELS,
        "sigma_min": float(diffusion.sigmas[0]),
        "sigma_max": float(diffusion.sigmas[-1]),
        "dtype": dtype_summary(state_dict),
        "flags": res.flags,
        "notes": notes,
    }


# ----------------------------------------------------------------------------------------------------------
# The toolkit's own model files


def _plain_flags(flags: Mapping[str, Any]) -> dict[str, Any]:
    return {name: list(value) if isinstance(value, tuple) else value for name, value in flags.items()}


def _denoiser_config(denoiser: OpenAIDenoiser) -> dict[str, Any]:
    try:
        network = network_config(denoiser.model)
    except ValueError as exc:
        raise CheckpointError(f"cannot save this model: {exc}") from None
    return {
        "network": network,
        "diffusion": denoiser.diffusion.to_config(),
        "codebase": denoiser.codebase,
        "flags": _plain_flags(denoiser.flags),
        "label_dim": denoiser.label_dim,
        "img_resolution": denoiser.img_resolution,
        "img_channels": denoiser.img_channels,
    }


def _denoiser_from_config(config: dict[str, Any], tensors: Mapping[str, torch.Tensor], what: str) -> OpenAIDenoiser:
    diffusion = OpenAIDiffusion(**config["diffusion"])
    return load_wrapper(config["network"], tensors, "model", what, lambda network: OpenAIDenoiser(
        network, diffusion, codebase=config["codebase"], flags=config.get("flags"),
        img_resolution=config.get("img_resolution")))


register_model_type("openai", OpenAIDenoiser, _denoiser_config, _denoiser_from_config)


def _classifier_config(classifier: OpenAIClassifier) -> dict[str, Any]:
    try:
        network = network_config(classifier.model)
    except ValueError as exc:
        raise CheckpointError(f"cannot save this classifier: {exc}") from None
    return {"network": network, "diffusion": classifier.diffusion.to_config(), "flags": _plain_flags(classifier.flags)}


def _classifier_from_config(config: dict[str, Any], tensors: Mapping[str, torch.Tensor],
                            what: str) -> OpenAIClassifier:
    diffusion = OpenAIDiffusion(**config["diffusion"])
    if config["network"].get("type") != "openai_classifier":
        raise CheckpointError(f"{what}: a noisy classifier's network is an openai_classifier (EncoderUNetModel), "
                              f"not {config['network'].get('type')!r}")
    return load_wrapper(config["network"], tensors, "model", what,
                        lambda network: OpenAIClassifier(network, diffusion, flags=config.get("flags")))


register_model_type("openai-classifier", OpenAIClassifier, _classifier_config, _classifier_from_config)


def _is_toolkit_file(source: FileSource) -> bool:
    return TOOLKIT.sniff(source)


def _toolkit_classifier(source: FileSource, model_flags, file_name) -> OpenAIClassifier:
    """The noisy classifier of a toolkit model file (its flags and diffusion are in the file)."""
    if model_flags is not None or file_name is not None:
        raise CheckpointError(f"{source} is an edm-toolkit model file, which holds its classifier's flags; drop "
                              "--classifier-flags (model_flags/file_name)")
    config, _ = read_model_file(source)
    if config["type"] != "openai-classifier":
        raise CheckpointError(f"{source} holds a {config['type']!r} model, not a noisy classifier; pass a classifier "
                              "(edm train-classifier's classifier-snapshot-*.pt, or a released *_classifier.pt)")
    return model_from_file(source).eval().requires_grad_(False)


class OpenAIFormat:
    """guided-diffusion and improved-diffusion checkpoints: plain state_dicts of the ADM networks in a torch zip.

    The architecture comes from the released file name, ``model_flags`` or the tensor shapes (module
    docstring); a noisy classifier is recognised too, but loads through :func:`load_openai_classifier`.
    """

    name = "openai"
    options = frozenset({"model_flags"})

    def sniff(self, source: FileSource) -> bool:
        return is_openai_state_dict(source.readable_torch_object())

    def inspect(self, source: FileSource, options: LoadOptions) -> dict[str, Any]:
        return inspect_openai_checkpoint(source, model_flags=options.model_flags)

    def load(self, source: FileSource, options: LoadOptions) -> nn.Module:
        return load_openai_checkpoint(source, model_flags=options.model_flags)


OPENAI = register_format(OpenAIFormat())
