"""Backbones for training: EDM's train.py architectures by name, any registered backbone of EDM's protocol, or
the discrete-time models of improved-/guided-diffusion with their own flags.

``--arch ddpmpp|ncsnpp|adm`` are train.py's configurations (SongUNet DDPM++/NCSN++, DhariwalUNet ADM);
``--arch song_unet|dhariwal_unet`` are the bare registered networks with their constructor defaults. Each is a
backbone F(x, c_noise, class_labels, augment_labels) that a preconditioner turns into a denoiser; the image
geometry, label count, augment labels (9 with --augment) and dropout come from the run, and
``overrides`` (``--net-opt KEY=VALUE``) replace any other constructor argument.

``--arch iddpm|guided`` build improved-diffusion's or guided-diffusion's U-Net (or, with ``--large_size`` /
``--small_size``, its upsampler) from a flag string in the original syntax, unset flags taking that code base's
defaults, as an :class:`~edm_toolkit.adapters.openai.OpenAIDenoiser` on the model's own diffusion (its grid of T
steps, its variance): no EDM preconditioner; it trains with the iddpm-* losses (:func:`discrete_loss`).
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass, field
from typing import Any, Mapping

from torch import nn

from ..adapters.openai import OpenAIDenoiser, OpenAIDiffusion
from ..adapters.openai_flags import (NUM_CLASSES, SCRIPT_FLAGS, model_and_diffusion_defaults, model_from_flags,
                                     parse_model_flags, sr_model_and_diffusion_defaults)
from ..discretizations import MAX_STEPS
from ..errors import ConfigError
from ..io.formats import MAX_ARGUMENT
from ..losses import LOSSES, DiscreteDiffusionLoss
from ..networks import dhariwal_unet, song_unet
from ..networks.registry import build_network, network_config
from ..precond import Preconditioner
from ..presets import PrecondConfig
from ..registry import show


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


OPENAI_ARCHITECTURES: dict[str, str] = {"iddpm": "improved", "guided": "guided"}
"""``--arch`` -> the code base whose flags and defaults build the discrete-time model: iDDPM (improved-diffusion,
Nichol & Dhariwal 2021) and ADM (guided-diffusion, Dhariwal & Nichol 2021)."""


def architecture_names() -> list[str]:
    return [*ARCHITECTURES, *OPENAI_ARCHITECTURES]


def get_architecture(name: str) -> Architecture:
    if name not in ARCHITECTURES:
        raise ConfigError(f"unknown architecture {name!r}; choose one of: {', '.join(architecture_names())}")
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


CONSTRUCTOR_ERRORS = (TypeError, ValueError, KeyError, IndexError, ZeroDivisionError, OverflowError, RuntimeError)
"""What constructors raise for arguments they cannot take (e.g. a negative width: RuntimeError from torch)."""


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]


def build_denoiser(backbone: Mapping[str, Any], precond: PrecondConfig, *, use_fp16: bool = False) -> Preconditioner:
    """The preconditioned network D(x; sigma) = c_skip x + c_out F(c_in x; c_noise) with a fresh backbone F."""
    kwargs = backbone["kwargs"]
    try:
        model = build_network(dict(backbone))
    except CONSTRUCTOR_ERRORS as exc:
        raise ConfigError(f"cannot build the {backbone['type']} backbone: {_first_line(exc)} (check --net-opt/--cbase/"
                          "--cres)") from None
    return precond.build(model, img_resolution=kwargs["img_resolution"], img_channels=kwargs["in_channels"],
                         label_dim=kwargs["label_dim"], use_fp16=use_fp16)


def denoiser_config(net: Preconditioner) -> dict[str, Any]:
    """Plain data that identifies a preconditioned network's structure (to match training states against)."""
    return {"precond": net.config(), "network": network_config(net.model)}


def parameter_count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


# ----------------------------------------------------------------------------------------------------------
# improved-/guided-diffusion models on their own grid


def given_model_flags(model_flags: str | None, **options: Any) -> dict[str, Any]:
    """The flags ``--model-flags`` gives in the original syntax (checked by check_model_flags), with the options
    that set a flag of the same name (``--noise-schedule`` sets ``--noise_schedule``, ...) where given; an option
    that contradicts the flag is refused."""
    try:
        given = parse_model_flags(model_flags or "")
    except ValueError as exc:
        raise ConfigError(f"--model-flags: {exc}") from None
    check_model_flags(given)
    for flag, value in options.items():
        if value is None:
            continue
        if flag in given and given[flag] != value:
            option = "--" + flag.replace("_", "-")
            raise ConfigError(f"{option} {value} contradicts --model-flags '--{flag} {given[flag]}'; give one of them")
        given[flag] = value
    return given


def openai_flags(arch: str, model_flags: str | None, *, resolution: int, cond: bool, dropout: float | None = None,
                 noise_schedule: str | None = None, diffusion_steps: int | None = None) -> dict[str, Any]:
    """The complete flags of the model ``--arch iddpm|guided`` trains: ``--model-flags`` in the original syntax,
    the options that set a flag (``--noise-schedule``, ``--diffusion-steps``, ``--dropout``, ``--cond``) and the
    data's resolution (``--image_size``, or ``--large_size`` of an upsampler), then the code base's defaults.
    A flag that contradicts an option or the data is refused."""
    codebase = OPENAI_ARCHITECTURES[arch]
    given = given_model_flags(model_flags, noise_schedule=noise_schedule, diffusion_steps=diffusion_steps,
                              dropout=dropout)
    if given.setdefault("class_cond", bool(cond)) != bool(cond):
        raise ConfigError(f"--model-flags '--class_cond {given['class_cond']}' contradicts --cond {int(cond)}; a "
                          "class-conditional model takes the dataset's labels: use --cond 1 (and no --class_cond)")
    upsampler = "large_size" in given or "small_size" in given
    size_flag = "large_size" if upsampler else "image_size"
    if upsampler and "image_size" in given:
        raise ConfigError("--model-flags: an upsampler (--large_size/--small_size) has no --image_size; drop it")
    if given.setdefault(size_flag, resolution) != resolution:
        raise ConfigError(f"--model-flags '--{size_flag} {given[size_flag]}' but the dataset's images are "
                          f"{resolution}x{resolution}; drop the flag or use a dataset of that resolution")
    if upsampler and not 0 < int(given.get("small_size", 0)) < resolution:
        raise ConfigError(f"an upsampler needs --model-flags '--small_size N' with 0 < N < {resolution} (the "
                          "resolution of its low-resolution input)")
    defaults = (sr_model_and_diffusion_defaults if upsampler else model_and_diffusion_defaults)(codebase)
    complete = {**defaults, **given}
    if complete.get("timestep_respacing"):
        raise ConfigError("--model-flags: timestep_respacing is a sampling option; training covers all "
                          f"{complete['diffusion_steps']} steps (respace with 'edm generate --solver ddpm')")
    try:
        betas = OpenAIDiffusion.from_flags(complete).betas
    except (ConfigError, ValueError) as exc:
        raise ConfigError(f"--model-flags: {exc}") from None
    if not bool((betas < 1).all()):
        raise ConfigError(f"the {complete['noise_schedule']} schedule of {complete['diffusion_steps']} steps has "
                          "beta_t >= 1 (the linear schedule scales beta by 1000/T: it needs T > 20); use more "
                          "steps or --noise-schedule cosine")
    return complete


_UNSET_FLAGS = ("num_heads_upsample", "num_head_channels")  # -1: "not set" in the originals
_LIST_FLAGS = ("attention_resolutions", "channel_mult", "classifier_attention_resolutions")


def check_model_flags(given: Mapping[str, Any]) -> None:
    """Refuses the flags of the original scripts that describe a run rather than a model (``--batch_size`` of
    TRAIN_FLAGS, sampling options), which the options of the toolkit's command set instead, and values that
    describe no network: sizes, widths, depths and counts are positive (-1 is "not set" for
    ``--num_head_channels`` and ``--num_heads_upsample``), ``--diffusion_steps`` at most MAX_STEPS, ``--dropout``
    in [0, 1], and the lists (``--attention_resolutions``, ``--channel_mult``, ...) positive numbers."""
    script = sorted(set(given) & SCRIPT_FLAGS)
    if script:
        fix = "use --batch" if script[0] == "batch_size" else "drop it"
        raise ConfigError(f"--model-flags: --{script[0]} is a flag of the original scripts, not of the model; {fix}")
    for name, value in given.items():
        problem = _flag_problem(name, value)
        if problem:
            raise ConfigError(f"--model-flags: --{name} {show(value, 40)} {problem}")


def _flag_problem(name: str, value: Any) -> str | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        if name in _UNSET_FLAGS and value == -1:
            return None
        limit = MAX_STEPS if name == "diffusion_steps" else MAX_ARGUMENT
        return None if 1 <= value <= limit else f"is out of range: give 1 to {limit:,}"
    if isinstance(value, float):
        return None if 0 <= value <= 1 else "is out of range: give a probability in [0, 1]"
    if name in _LIST_FLAGS and isinstance(value, str) and value.strip():
        try:
            numbers = [float(part) for part in value.split(",")]
        except ValueError:
            return "is not a list of numbers, e.g. 16,8"
        if not all(0 < number <= MAX_ARGUMENT for number in numbers):
            return "must list positive numbers"
    return None


def is_upsampler(flags: Mapping[str, Any]) -> bool:
    return "large_size" in flags


def build_openai_denoiser(arch: str, flags: Mapping[str, Any], *, channels: int, label_dim: int) -> OpenAIDenoiser:
    """A fresh improved-/guided-diffusion network of these complete flags (:func:`openai_flags`) as a denoiser on
    its own diffusion, for ``channels``-channel images and ``label_dim`` classes."""
    codebase = OPENAI_ARCHITECTURES[arch]
    try:
        model = model_from_flags(dict(flags), codebase=codebase, in_channels=channels,
                                 num_classes=label_dim if flags.get("class_cond") else NUM_CLASSES)
    except CONSTRUCTOR_ERRORS as exc:
        raise ConfigError(f"cannot build the {arch} network from --model-flags: {_first_line(exc)}") from None
    resolution = int(flags["large_size" if is_upsampler(flags) else "image_size"])
    return OpenAIDenoiser(model, OpenAIDiffusion.from_flags(flags), codebase=codebase, flags=dict(flags),
                          img_resolution=resolution)


def discrete_loss(flags: Mapping[str, Any], given: Mapping[str, Any], loss: str | None,
                  schedule_sampler: str) -> DiscreteDiffusionLoss:
    """The iddpm-* loss of improved-diffusion's flag semantics (``create_gaussian_diffusion``): ``use_kl`` ->
    iddpm-kl (RESCALED_KL), else ``learn_sigma`` -> iddpm-hybrid (RESCALED_MSE with ``rescale_learned_sigmas``,
    else MSE, plus the vb term), else iddpm-simple; ``predict_xstart`` sets the mse target. ``loss`` names one
    explicitly (it must train on the model's grid and agree with ``use_kl`` where the flags ``given`` set it)."""
    if loss is None:
        loss = "iddpm-kl" if flags["use_kl"] else "iddpm-hybrid" if flags["learn_sigma"] else "iddpm-simple"
    cls = LOSSES.get(loss)
    if not cls.draws_on_model_grid:
        grid_losses = [n for n in LOSSES.names() if LOSSES.get(n).draws_on_model_grid]
        raise ConfigError(f"loss {loss!r} draws continuous noise levels, but this model is trained on its own grid of "
                          f"{flags['diffusion_steps']} steps; use --loss {'|'.join(grid_losses)}")
    if given.get("use_kl") and loss != "iddpm-kl":
        raise ConfigError(f"--loss {loss} contradicts --model-flags '--use_kl True' (the variational bound: loss "
                          "iddpm-kl); give one of them")
    params: dict[str, Any] = {"name": loss, "schedule_sampler": schedule_sampler}
    names = {f.name for f in dataclasses.fields(cls)}
    for flag in ("predict_xstart", "rescale_learned_sigmas"):
        if flag in names:
            params[flag] = bool(flags[flag])
    return LOSSES.create(params)
