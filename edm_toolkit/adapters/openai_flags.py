"""The original command-line flags of guided-diffusion and improved-diffusion, and the released checkpoints.

Released ``.pt`` files are plain state_dicts without any configuration; the architecture comes from the
command-line flags the authors published. :func:`parse_model_flags` reads such flag strings with the original
argparse semantics; :func:`model_from_flags` / :func:`classifier_from_flags` apply the original defaults and
build the network like ``script_util`` does (:func:`create_model`, :func:`sr_create_model`,
:func:`create_classifier`); :data:`RELEASED_CHECKPOINTS` records the published flags of every released
checkpoint, keyed by file name.
"""

from __future__ import annotations

import inspect
import shlex
from collections.abc import Iterable, Mapping
from typing import Any

from torch import nn

from ..networks.openai_unet import EncoderUNetModel, SuperResModel, UNetModel

__all__ = [
    "NUM_CLASSES",
    "RELEASED_CHECKPOINTS",
    "SCRIPT_FLAGS",
    "classifier_defaults",
    "classifier_from_flags",
    "create_classifier",
    "create_model",
    "format_model_flags",
    "model_and_diffusion_defaults",
    "model_from_flags",
    "parse_model_flags",
    "released_network",
    "sr_create_model",
    "sr_model_and_diffusion_defaults",
    "str2bool",
]

NUM_CLASSES = 1000
"""ImageNet classes; ``class_cond`` models get ``nn.Embedding(NUM_CLASSES, 4 * num_channels)``."""

_DIFFUSION_DEFAULTS = {
    "guided": dict(
        learn_sigma=False,
        diffusion_steps=1000,
        noise_schedule="linear",
        timestep_respacing="",
        use_kl=False,
        predict_xstart=False,
        rescale_timesteps=False,
        rescale_learned_sigmas=False,
    ),
    "improved": dict(
        learn_sigma=False,
        sigma_small=False,
        diffusion_steps=1000,
        noise_schedule="linear",
        timestep_respacing="",
        use_kl=False,
        predict_xstart=False,
        rescale_timesteps=True,
        rescale_learned_sigmas=True,
    ),
}

_MODEL_DEFAULTS = {
    "guided": dict(
        image_size=64,
        num_channels=128,
        num_res_blocks=2,
        num_heads=4,
        num_heads_upsample=-1,
        num_head_channels=-1,
        attention_resolutions="16,8",
        channel_mult="",
        dropout=0.0,
        class_cond=False,
        use_checkpoint=False,
        use_scale_shift_norm=True,
        resblock_updown=False,
        use_fp16=False,
        use_new_attention_order=False,
    ),
    "improved": dict(
        image_size=64,
        num_channels=128,
        num_res_blocks=2,
        num_heads=4,
        num_heads_upsample=-1,
        attention_resolutions="16,8",
        dropout=0.0,
        class_cond=False,
        use_checkpoint=False,
        use_scale_shift_norm=True,
    ),
}

_CLASSIFIER_DEFAULTS = dict(
    image_size=64,
    classifier_use_fp16=False,
    classifier_width=128,
    classifier_depth=2,
    classifier_attention_resolutions="32,16,8",
    classifier_use_scale_shift_norm=True,
    classifier_resblock_updown=True,
    classifier_pool="attention",
)

# Flags of the sampling scripts (image_sample.py, classifier_sample.py, super_res_sample.py) that
# users paste together with the model flags; they do not affect the network.
_SCRIPT_FLAG_DEFAULTS = dict(
    clip_denoised=True,
    num_samples=10000,
    batch_size=16,
    use_ddim=False,
    model_path="",
    classifier_path="",
    classifier_scale=1.0,
    base_samples="",
    large_size=256,
    small_size=64,
)

SCRIPT_FLAGS = frozenset(_SCRIPT_FLAG_DEFAULTS) - {"large_size", "small_size"}
"""Flags of the original scripts that describe a run, not a model (batch size, paths, sampling options)."""

# channel_mult by image size when the channel_mult flag is empty.
_CHANNEL_MULT = {
    ("guided", "model"): {
        512: (0.5, 1, 1, 2, 2, 4, 4),
        256: (1, 1, 2, 2, 4, 4),
        128: (1, 1, 2, 3, 4),
        64: (1, 2, 3, 4),
    },
    ("guided", "sr"): {512: (1, 1, 2, 2, 4, 4), 256: (1, 1, 2, 2, 4, 4), 64: (1, 2, 3, 4)},
    ("improved", "model"): {256: (1, 1, 2, 2, 4, 4), 64: (1, 2, 3, 4), 32: (1, 2, 2, 2)},
    ("improved", "sr"): {256: (1, 1, 2, 2, 4, 4), 64: (1, 2, 3, 4)},
}


def _flag_types() -> dict[str, type]:
    types: dict[str, type] = {}
    for defaults in (
        *_MODEL_DEFAULTS.values(),
        *_DIFFUSION_DEFAULTS.values(),
        _CLASSIFIER_DEFAULTS,
        _SCRIPT_FLAG_DEFAULTS,
    ):
        types.update({name: type(value) for name, value in defaults.items()})
    return dict(sorted(types.items()))


_FLAG_TYPES = _flag_types()


def _check_codebase(codebase: str) -> None:
    if codebase not in _MODEL_DEFAULTS:
        raise ValueError(f"unknown codebase {codebase!r}; expected 'guided' or 'improved'")


def model_and_diffusion_defaults(codebase: str = "guided") -> dict[str, Any]:
    """The argparse defaults of ``image_sample.py`` / ``image_train.py`` for ``codebase``.

    They differ between the code bases: improved-diffusion rescales timesteps and learned sigmas by
    default and has no ``num_head_channels``, ``channel_mult``, ``resblock_updown``, ``use_fp16`` or
    ``use_new_attention_order`` flags; it also has ``sigma_small``.
    """
    _check_codebase(codebase)
    return {**_MODEL_DEFAULTS[codebase], **_DIFFUSION_DEFAULTS[codebase]}


def sr_model_and_diffusion_defaults(codebase: str = "guided") -> dict[str, Any]:
    """The argparse defaults of ``super_res_sample.py``: large_size 256, small_size 64, no image_size."""
    defaults = model_and_diffusion_defaults(codebase)
    for name in ("image_size", "channel_mult", "use_new_attention_order", "sigma_small"):
        defaults.pop(name, None)
    return {"large_size": 256, "small_size": 64, **defaults}


def classifier_defaults() -> dict[str, Any]:
    """guided-diffusion's classifier flags with their defaults (plus the diffusion ones)."""
    return {**_CLASSIFIER_DEFAULTS, **_DIFFUSION_DEFAULTS["guided"]}


def str2bool(value: str | bool) -> bool:
    """The originals' boolean flag parser: yes/true/t/y/1 and no/false/f/n/0, any case."""
    if isinstance(value, bool):
        return value
    lowered = value.lower()
    if lowered in ("yes", "true", "t", "y", "1"):
        return True
    if lowered in ("no", "false", "f", "n", "0"):
        return False
    raise ValueError(f"boolean value expected, got {value!r}")


def _unknown_flag(name: str) -> ValueError:
    return ValueError(f"unknown flag --{name}; valid flags: {', '.join('--' + n for n in _FLAG_TYPES)}")


def _convert_flag(name: str, value: Any) -> Any:
    """Give ``value`` the type argparse would (only strings are converted; other values pass through)."""
    if name not in _FLAG_TYPES:
        raise _unknown_flag(name)
    kind = _FLAG_TYPES[name]
    if not isinstance(value, str) or kind is str:
        return value
    try:
        return str2bool(value) if kind is bool else kind(value)
    except ValueError as err:
        raise ValueError(f"invalid value {value!r} for --{name} ({kind.__name__} expected): {err}") from None


def parse_model_flags(flags: str) -> dict[str, Any]:
    """Parse a flag string such as ``"--attention_resolutions 32,16,8 --class_cond True ..."``.

    Follows the originals' argparse: ``--name value`` or ``--name=value``, booleans through
    :func:`str2bool`, ints and floats by the type of the default, a later occurrence overrides an
    earlier one, shell quoting honoured. Model, diffusion, classifier and sampling-script flags of
    guided-diffusion and improved-diffusion are accepted. Returns only the flags that were given;
    raises ValueError naming an unknown flag and the valid ones.
    """
    tokens = shlex.split(flags)
    parsed: dict[str, Any] = {}
    i = 0
    while i < len(tokens):
        token = tokens[i]
        if not token.startswith("--") or token == "--":
            raise ValueError(f"expected a flag of the form --name, got {token!r} in {flags!r}")
        name, sep, value = token[2:].partition("=")
        if not sep:
            if i + 1 >= len(tokens) or tokens[i + 1].startswith("--"):
                raise ValueError(f"flag --{name} expects a value")
            value = tokens[i + 1]
            i += 1
        parsed[name] = _convert_flag(name, value)
        i += 1
    return parsed


def format_model_flags(flags: Mapping[str, Any]) -> str:
    """The inverse of :func:`parse_model_flags`: ``{'class_cond': True}`` -> ``"--class_cond True"``."""
    parts = []
    for name, value in flags.items():
        if name not in _FLAG_TYPES:
            raise _unknown_flag(name)
        if isinstance(value, (list, tuple)):
            value = ",".join(str(v) for v in value)
        parts.append(f"--{name} {shlex.quote(str(value))}")
    return " ".join(parts)


def _flag_dict(flags: str | Mapping[str, Any]) -> dict[str, Any]:
    if isinstance(flags, str):
        return parse_model_flags(flags)
    return {name: _convert_flag(name, value) for name, value in flags.items()}


def _int_list(value: str | Iterable[Any]) -> tuple[int, ...]:
    if isinstance(value, str):
        return tuple(int(part) for part in value.split(","))
    return tuple(int(part) for part in value)


def _channel_mult(channel_mult: str | Iterable[Any], image_size: int, codebase: str, kind: str):
    if isinstance(channel_mult, str) and channel_mult == "":
        table = _CHANNEL_MULT[(codebase, kind)]
        if image_size not in table:
            raise ValueError(
                f"unsupported image size {image_size} for the {codebase} {kind} defaults (known: {sorted(table)}); "
                "give channel_mult explicitly"
            )
        return table[image_size]
    if isinstance(channel_mult, str):
        return _int_list(channel_mult)
    return tuple(channel_mult)


def _attention_ds(attention_resolutions: str | Iterable[Any], image_size: int) -> tuple[int, ...]:
    """``--attention_resolutions 32,16,8`` names resolutions; the network wants ``image_size // res``."""
    return tuple(image_size // res for res in _int_list(attention_resolutions))


def _unet(
    cls,
    codebase: str,
    kind: str,
    *,
    image_size,
    num_channels,
    num_res_blocks,
    channel_mult,
    learn_sigma,
    class_cond,
    attention_resolutions,
    num_heads,
    num_head_channels,
    num_heads_upsample,
    use_scale_shift_norm,
    dropout,
    resblock_updown,
    use_fp16,
    use_new_attention_order,
    num_classes,
    in_channels=3,
):
    """The shared body of create_model and sr_create_model."""
    _check_codebase(codebase)
    common = dict(
        in_channels=in_channels,
        model_channels=num_channels,
        out_channels=2 * in_channels if learn_sigma else in_channels,
        num_res_blocks=num_res_blocks,
        attention_resolutions=_attention_ds(attention_resolutions, image_size),
        dropout=dropout,
        channel_mult=_channel_mult(channel_mult, image_size, codebase, kind),
        num_classes=num_classes if class_cond else None,
        num_heads=num_heads,
        num_heads_upsample=num_heads_upsample,
        use_scale_shift_norm=use_scale_shift_norm,
    )
    if codebase == "guided":
        return cls(
            image_size,
            num_head_channels=num_head_channels,
            resblock_updown=resblock_updown,
            use_fp16=use_fp16,
            use_new_attention_order=use_new_attention_order,
            **common,
        )
    unsupported = dict(
        num_head_channels=num_head_channels != -1,
        resblock_updown=resblock_updown,
        use_fp16=use_fp16,
        use_new_attention_order=use_new_attention_order,
    )
    given = [name for name, used in unsupported.items() if used]
    if given:
        raise ValueError(f"improved-diffusion networks have no {', '.join(given)} option; use codebase='guided'")
    return cls.from_improved_diffusion(**common)


def create_model(
    image_size,
    num_channels,
    num_res_blocks,
    channel_mult="",
    learn_sigma=False,
    class_cond=False,
    use_checkpoint=False,
    attention_resolutions="16",
    num_heads=1,
    num_head_channels=-1,
    num_heads_upsample=-1,
    use_scale_shift_norm=False,
    dropout=0,
    resblock_updown=False,
    use_fp16=False,
    use_new_attention_order=False,
    *,
    num_classes: int = NUM_CLASSES,
    codebase: str = "guided",
    in_channels: int = 3,
) -> UNetModel:
    """``script_util.create_model``: a :class:`UNetModel` from flag values.

    An empty ``channel_mult`` is chosen from ``image_size`` (guided: 64/128/256/512; improved:
    32/64/256), ``attention_resolutions`` (``"32,16,8"``) become factors ``image_size // res``,
    ``learn_sigma`` doubles the output channels and ``class_cond`` adds ``num_classes`` labels.
    ``codebase='improved'`` builds improved-diffusion's network (legacy attention, no guided-only
    options; an explicit ``channel_mult`` is accepted there as an extension). ``in_channels`` (an extension:
    the originals build RGB networks) sets the image channels, e.g. 1 for grayscale training data.
    """
    del use_checkpoint
    return _unet(
        UNetModel,
        codebase,
        "model",
        image_size=image_size,
        num_channels=num_channels,
        num_res_blocks=num_res_blocks,
        channel_mult=channel_mult,
        learn_sigma=learn_sigma,
        class_cond=class_cond,
        attention_resolutions=attention_resolutions,
        num_heads=num_heads,
        num_head_channels=num_head_channels,
        num_heads_upsample=num_heads_upsample,
        use_scale_shift_norm=use_scale_shift_norm,
        dropout=dropout,
        resblock_updown=resblock_updown,
        use_fp16=use_fp16,
        use_new_attention_order=use_new_attention_order,
        num_classes=num_classes,
        in_channels=in_channels,
    )


def sr_create_model(
    large_size,
    small_size,
    num_channels,
    num_res_blocks,
    learn_sigma=False,
    class_cond=False,
    use_checkpoint=False,
    attention_resolutions="16",
    num_heads=1,
    num_head_channels=-1,
    num_heads_upsample=-1,
    use_scale_shift_norm=False,
    dropout=0,
    resblock_updown=False,
    use_fp16=False,
    *,
    num_classes: int = NUM_CLASSES,
    codebase: str = "guided",
    channel_mult="",
    in_channels: int = 3,
) -> SuperResModel:
    """``script_util.sr_create_model``: a :class:`SuperResModel` for ``large_size`` outputs.

    ``small_size`` only documents the input size (the network resizes ``low_res`` itself).
    ``channel_mult`` (not an original flag here) overrides the ``large_size`` table.
    """
    del small_size, use_checkpoint
    return _unet(
        SuperResModel,
        codebase,
        "sr",
        image_size=large_size,
        num_channels=num_channels,
        num_res_blocks=num_res_blocks,
        channel_mult=channel_mult,
        learn_sigma=learn_sigma,
        class_cond=class_cond,
        attention_resolutions=attention_resolutions,
        num_heads=num_heads,
        num_head_channels=num_head_channels,
        num_heads_upsample=num_heads_upsample,
        use_scale_shift_norm=use_scale_shift_norm,
        dropout=dropout,
        resblock_updown=resblock_updown,
        use_fp16=use_fp16,
        use_new_attention_order=False,
        num_classes=num_classes,
        in_channels=in_channels,
    )


def create_classifier(
    image_size,
    classifier_use_fp16,
    classifier_width,
    classifier_depth,
    classifier_attention_resolutions,
    classifier_use_scale_shift_norm,
    classifier_resblock_updown,
    classifier_pool,
    *,
    num_classes: int = NUM_CLASSES,
    num_head_channels: int = 64,
    channel_mult="",
    in_channels: int = 3,
) -> EncoderUNetModel:
    """``script_util.create_classifier``: the noisy classifier from its flags.

    The original hard-codes 1000 classes, 64 channels per head and RGB inputs and picks ``channel_mult`` from
    ``image_size``; the keyword-only arguments override these for other set-ups.
    """
    return EncoderUNetModel(
        image_size=image_size,
        in_channels=in_channels,
        model_channels=classifier_width,
        out_channels=num_classes,
        num_res_blocks=classifier_depth,
        attention_resolutions=_attention_ds(classifier_attention_resolutions, image_size),
        channel_mult=_channel_mult(channel_mult, image_size, "guided", "model"),
        use_fp16=classifier_use_fp16,
        num_head_channels=num_head_channels,
        use_scale_shift_norm=classifier_use_scale_shift_norm,
        resblock_updown=classifier_resblock_updown,
        pool=classifier_pool,
    )


def _call_with_flags(builder, flags: Mapping[str, Any], **keywords):
    """Call ``builder`` with the entries of ``flags`` that are among its parameters."""
    names = inspect.signature(builder).parameters
    return builder(**{name: value for name, value in flags.items() if name in names}, **keywords)


def model_from_flags(
    flags: str | Mapping[str, Any], *, codebase: str = "guided", num_classes: int = NUM_CLASSES,
    in_channels: int = 3,
) -> UNetModel:
    """Build the diffusion network that the original scripts build from these flags.

    ``flags`` is a flag string or a dict of flag values (strings are converted like argparse
    does). Unset flags take ``codebase``'s argparse defaults (they differ between guided- and
    improved-diffusion); ``--large_size``/``--small_size`` select the upsampler
    (:class:`SuperResModel`). Flags that do not affect the network (diffusion, sampling,
    classifier) are ignored; unknown flags raise ValueError. ``in_channels``: the image channels (the
    originals': 3).
    """
    given = _flag_dict(flags)
    if "large_size" in given or "small_size" in given:
        merged = {**sr_model_and_diffusion_defaults(codebase), **given}
        return _call_with_flags(sr_create_model, merged, num_classes=num_classes, codebase=codebase,
                                in_channels=in_channels)
    merged = {**model_and_diffusion_defaults(codebase), **given}
    return _call_with_flags(create_model, merged, num_classes=num_classes, codebase=codebase,
                            in_channels=in_channels)


def classifier_from_flags(
    flags: str | Mapping[str, Any],
    *,
    num_classes: int = NUM_CLASSES,
    num_head_channels: int = 64,
    channel_mult="",
    in_channels: int = 3,
) -> EncoderUNetModel:
    """Build guided-diffusion's noisy classifier from ``--image_size`` and ``--classifier_*`` flags.

    Unset flags take the ``classifier_defaults()``; other flags (model, diffusion, sampling) are
    ignored, so a whole ``classifier_sample.py`` command line can be passed.
    """
    merged = {**classifier_defaults(), **_flag_dict(flags)}
    return _call_with_flags(
        create_classifier,
        merged,
        num_classes=num_classes,
        num_head_channels=num_head_channels,
        channel_mult=channel_mult,
        in_channels=in_channels,
    )


# ----------------------------------------------------------------------------------------------
# Released checkpoints and the flags published with them (the README of each repository).

_GUIDED_URL = "https://openaipublic.blob.core.windows.net/diffusion/jul-2021/"
_IMPROVED_URL = "https://openaipublic.blob.core.windows.net/diffusion/march-2021/"

_GUIDED_256 = (
    "--attention_resolutions 32,16,8 --class_cond {cond} --diffusion_steps 1000 {dropout}--image_size 256 "
    "--learn_sigma True --noise_schedule linear --num_channels 256 --num_head_channels 64 --num_res_blocks 2 "
    "--resblock_updown True --use_fp16 True --use_scale_shift_norm True"
)
_LSUN_GUIDED = _GUIDED_256.format(cond="False", dropout="--dropout {} ")
_IMPROVED_IMAGENET64 = "--image_size 64 --num_channels 128 --num_res_blocks 3 --learn_sigma True"
_IMPROVED_CIFAR10 = "--image_size 32 --num_channels 128 --num_res_blocks 3 --learn_sigma True --dropout 0.3"
_IMPROVED_LSUN = (
    "--image_size 256 --num_channels 128 --num_res_blocks 2 --num_heads 1 --learn_sigma True "
    "--use_scale_shift_norm False --attention_resolutions 16 --diffusion_steps 1000 --noise_schedule linear "
    "--rescale_learned_sigmas False --rescale_timesteps False"
)

# file name -> (codebase, kind, published flags, published parameter count, classifier, classifier scale)
_RELEASED = {
    "64x64_diffusion.pt": (
        "guided", "diffusion",
        "--attention_resolutions 32,16,8 --class_cond True --diffusion_steps 1000 --dropout 0.1 --image_size 64 "
        "--learn_sigma True --noise_schedule cosine --num_channels 192 --num_head_channels 64 --num_res_blocks 3 "
        "--resblock_updown True --use_new_attention_order True --use_fp16 True --use_scale_shift_norm True",
        "295.9M", "64x64_classifier.pt", 1.0,
    ),
    "128x128_diffusion.pt": (
        "guided", "diffusion",
        "--attention_resolutions 32,16,8 --class_cond True --diffusion_steps 1000 --image_size 128 "
        "--learn_sigma True --noise_schedule linear --num_channels 256 --num_heads 4 --num_res_blocks 2 "
        "--resblock_updown True --use_fp16 True --use_scale_shift_norm True",
        "421.5M", "128x128_classifier.pt", 0.5,
    ),
    "256x256_diffusion.pt": (
        "guided", "diffusion", _GUIDED_256.format(cond="True", dropout=""), "553.8M", "256x256_classifier.pt", 1.0,
    ),
    "256x256_diffusion_uncond.pt": (
        "guided", "diffusion", _GUIDED_256.format(cond="False", dropout=""), "552.8M", "256x256_classifier.pt", 10.0,
    ),
    "512x512_diffusion.pt": (
        "guided", "diffusion",
        "--attention_resolutions 32,16,8 --class_cond True --diffusion_steps 1000 --image_size 512 "
        "--learn_sigma True --noise_schedule linear --num_channels 256 --num_head_channels 64 --num_res_blocks 2 "
        "--resblock_updown True --use_fp16 False --use_scale_shift_norm True",
        "559.0M", "512x512_classifier.pt", 4.0,
    ),
    "64x64_classifier.pt": ("guided", "classifier", "--image_size 64 --classifier_depth 4", "65.4M", None, None),
    "128x128_classifier.pt": (
        "guided", "classifier",
        "--image_size 128 --classifier_attention_resolutions 32,16,8 --classifier_depth 2 --classifier_width 128 "
        "--classifier_pool attention --classifier_resblock_updown True --classifier_use_scale_shift_norm True "
        "--classifier_use_fp16 True",
        None, None, None,
    ),
    "256x256_classifier.pt": ("guided", "classifier", "--image_size 256", None, None, None),
    "512x512_classifier.pt": ("guided", "classifier", "--image_size 512", None, None, None),
    "64_256_upsampler.pt": (
        "guided", "upsampler",
        "--attention_resolutions 32,16,8 --class_cond True --diffusion_steps 1000 --large_size 256 --small_size 64 "
        "--learn_sigma True --noise_schedule linear --num_channels 192 --num_heads 4 --num_res_blocks 2 "
        "--resblock_updown True --use_fp16 True --use_scale_shift_norm True",
        "311.8M", None, None,
    ),
    "128_512_upsampler.pt": (
        "guided", "upsampler",
        "--attention_resolutions 32,16 --class_cond True --diffusion_steps 1000 --large_size 512 --small_size 128 "
        "--learn_sigma True --noise_schedule linear --num_channels 192 --num_head_channels 64 --num_res_blocks 2 "
        "--resblock_updown True --use_fp16 True --use_scale_shift_norm True",
        "308.8M", None, None,
    ),
    "lsun_bedroom.pt": ("guided", "diffusion", _LSUN_GUIDED.format("0.1"), "552.8M", None, None),
    "lsun_cat.pt": ("guided", "diffusion", _LSUN_GUIDED.format("0.1"), "552.8M", None, None),
    "lsun_horse.pt": ("guided", "diffusion", _LSUN_GUIDED.format("0.1"), "552.8M", None, None),
    "lsun_horse_nodropout.pt": ("guided", "diffusion", _LSUN_GUIDED.format("0.0"), "552.8M", None, None),
    "imagenet64_uncond_100M_1500K.pt": (
        "improved", "diffusion", _IMPROVED_IMAGENET64 + " --diffusion_steps 4000 --noise_schedule cosine",
        None, None, None,
    ),
    "imagenet64_uncond_vlb_100M_1500K.pt": (
        "improved", "diffusion",
        _IMPROVED_IMAGENET64 + " --diffusion_steps 4000 --noise_schedule cosine --use_kl True",
        None, None, None,
    ),
    "cifar10_uncond_50M_500K.pt": (
        "improved", "diffusion", _IMPROVED_CIFAR10 + " --diffusion_steps 4000 --noise_schedule cosine",
        None, None, None,
    ),
    "cifar10_uncond_vlb_50M_500K.pt": (
        "improved", "diffusion", _IMPROVED_CIFAR10 + " --diffusion_steps 4000 --noise_schedule cosine --use_kl True",
        None, None, None,
    ),
    "imagenet64_cond_270M_250K.pt": (
        "improved", "diffusion",
        "--image_size 64 --num_channels 192 --num_res_blocks 3 --learn_sigma True --class_cond True "
        "--diffusion_steps 4000 --noise_schedule cosine --rescale_learned_sigmas False --rescale_timesteps False",
        None, None, None,
    ),
    "upsample_cond_500K.pt": (
        "improved", "upsampler",
        "--large_size 256 --small_size 64 --num_channels 192 --num_res_blocks 2 --learn_sigma True --class_cond True "
        "--diffusion_steps 4000 --noise_schedule linear --rescale_learned_sigmas False --rescale_timesteps False",
        None, None, None,
    ),
    "lsun_uncond_100M_1200K_bs128.pt": ("improved", "diffusion", _IMPROVED_LSUN, None, None, None),
    "lsun_uncond_100M_2400K_bs64.pt": ("improved", "diffusion", _IMPROVED_LSUN, None, None, None),
}


def _released_entry(name, codebase, kind, flag_string, params, classifier, classifier_scale) -> dict[str, Any]:
    flags = parse_model_flags(flag_string)
    if kind != "classifier":
        # State the timestep convention explicitly: the defaults differ (guided False, improved True).
        flags.setdefault("rescale_timesteps", _DIFFUSION_DEFAULTS[codebase]["rescale_timesteps"])
    return dict(
        codebase=codebase,
        kind=kind,
        flags=flags,
        params=params,
        classifier=classifier,
        classifier_scale=classifier_scale,
        url=(_GUIDED_URL if codebase == "guided" else _IMPROVED_URL) + name,
    )


RELEASED_CHECKPOINTS: dict[str, dict[str, Any]] = {
    name: _released_entry(name, *entry) for name, entry in _RELEASED.items()
}
"""Released guided-diffusion (jul-2021) and improved-diffusion (march-2021) checkpoints by file name.

Each entry: ``codebase`` ('guided' or 'improved'), ``kind`` ('diffusion', 'upsampler' or
'classifier'), ``flags`` (the published flags, parsed; diffusion entries always state
``rescale_timesteps``; unset flags take :func:`model_and_diffusion_defaults` of the codebase),
``params`` (published parameter count, e.g. '295.9M', or None), ``classifier`` and
``classifier_scale`` (the README's guidance pairing, or None) and ``url``.
"""


def released_network(file_name: str, *, num_classes: int = NUM_CLASSES) -> nn.Module:
    """Build the (randomly initialised) network of a released checkpoint, ready for ``load_state_dict``.

    Construct it under ``with torch.device('meta'):`` to inspect it without allocating memory.
    """
    if file_name not in RELEASED_CHECKPOINTS:
        raise ValueError(f"unknown checkpoint {file_name!r}; known: {', '.join(RELEASED_CHECKPOINTS)}")
    entry = RELEASED_CHECKPOINTS[file_name]
    if entry["kind"] == "classifier":
        return classifier_from_flags(entry["flags"], num_classes=num_classes)
    return model_from_flags(entry["flags"], codebase=entry["codebase"], num_classes=num_classes)
