"""OpenAI ADM networks with their original state_dict layout, and the original flag handling.

* :class:`UNetModel`: the ADM U-Net of guided-diffusion ("Diffusion Models Beat GANs on Image
  Synthesis", Dhariwal & Nichol 2021), which contains the U-Net of improved-diffusion ("Improved
  Denoising Diffusion Probabilistic Models", Nichol & Dhariwal 2021) as a special case
  (:meth:`UNetModel.from_improved_diffusion`).
* :class:`SuperResModel`: the upsampler; ``low_res`` is bilinearly resized and concatenated after ``x``.
* :class:`EncoderUNetModel`: the noisy classifier used for classifier guidance (encoder half,
  middle block and a pooling head).

Released ``.pt`` files are plain state_dicts without any configuration; the architecture comes from
the command-line flags the authors published. :func:`parse_model_flags` reads such flag strings with
the original argparse semantics, :func:`model_from_flags` / :func:`classifier_from_flags` apply the
original defaults and build the network like ``script_util`` does, and :data:`RELEASED_CHECKPOINTS`
records the published flags of every released checkpoint, keyed by file name.
"""

from __future__ import annotations

import inspect
import shlex
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import nn

from .openai_layers import (
    AttentionBlock,
    AttentionPool2d,
    Downsample,
    EmbedSequential,
    ResBlock,
    Upsample,
    normalization,
    require_2d,
    timestep_embedding,
    zero_init,
)
from .registry import register_network

__all__ = [
    "NUM_CLASSES",
    "RELEASED_CHECKPOINTS",
    "EncoderUNetModel",
    "SuperResModel",
    "UNetModel",
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

_CONV_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


def _attention_factors(attention_resolutions: Any) -> tuple[int, ...]:
    """Validate the downsampling factors at which the network has attention."""
    if isinstance(attention_resolutions, str):
        raise ValueError(
            f"attention_resolutions={attention_resolutions!r} must be downsampling factors such as (2, 4, 8), "
            "not a flag string of resolutions; the flag builders (create_model, model_from_flags) convert "
            "'32,16,8' to image_size // res"
        )
    return tuple(int(ds) for ds in attention_resolutions)


class _ADMTrunk(nn.Module):
    """What the U-Net and the classifier share: embeddings, encoder (``input_blocks``) and ``middle_block``."""

    def __init__(
        self,
        *,
        image_size,
        in_channels,
        model_channels,
        num_res_blocks,
        attention_resolutions,
        dropout,
        channel_mult,
        conv_resample,
        dims,
        num_classes,
        use_checkpoint,
        use_fp16,
        num_heads,
        num_head_channels,
        num_heads_upsample,
        use_scale_shift_norm,
        resblock_updown,
        use_new_attention_order,
    ):
        super().__init__()
        require_2d(dims)
        if not channel_mult:
            raise ValueError("channel_mult must name at least one resolution level")
        self.image_size = image_size
        self.in_channels = in_channels
        self.model_channels = model_channels
        self.num_res_blocks = num_res_blocks
        self.attention_resolutions = _attention_factors(attention_resolutions)
        self.dropout = dropout
        self.channel_mult = tuple(channel_mult)
        self.conv_resample = conv_resample
        self.num_classes = num_classes
        self.use_checkpoint = use_checkpoint  # accepted for compatibility; gradient checkpointing is not used
        self.use_fp16 = use_fp16
        self.num_heads = num_heads
        self.num_head_channels = num_head_channels
        self.num_heads_upsample = num_heads if num_heads_upsample == -1 else num_heads_upsample
        self.use_scale_shift_norm = use_scale_shift_norm
        self.resblock_updown = resblock_updown
        self.use_new_attention_order = use_new_attention_order

        emb_dim = 4 * model_channels
        self.time_embed = nn.Sequential(nn.Linear(model_channels, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        if num_classes is not None:
            self.label_emb = nn.Embedding(num_classes, emb_dim)

        ch = int(self.channel_mult[0] * model_channels)
        self.input_blocks = nn.ModuleList([EmbedSequential(nn.Conv2d(in_channels, ch, 3, padding=1))])
        self._skip_channels = [ch]  # width of every input block's output, consumed by the decoder
        ds = 1
        for level, mult in enumerate(self.channel_mult):
            for _ in range(num_res_blocks):
                layers = [self._res_block(ch, int(mult * model_channels))]
                ch = int(mult * model_channels)
                if ds in self.attention_resolutions:
                    layers.append(self._attention(ch, num_heads))
                self.input_blocks.append(EmbedSequential(*layers))
                self._skip_channels.append(ch)
            if level != len(self.channel_mult) - 1:
                if resblock_updown:
                    down = self._res_block(ch, ch, down=True)
                else:
                    down = Downsample(ch, conv_resample, out_channels=ch)
                self.input_blocks.append(EmbedSequential(down))
                self._skip_channels.append(ch)
                ds *= 2
        self.middle_block = EmbedSequential(
            self._res_block(ch, ch), self._attention(ch, num_heads), self._res_block(ch, ch)
        )
        self._bottleneck_channels = ch
        self._bottleneck_factor = ds

    def _res_block(self, channels: int, out_channels: int, *, up: bool = False, down: bool = False) -> ResBlock:
        return ResBlock(
            channels,
            4 * self.model_channels,
            self.dropout,
            out_channels=out_channels,
            use_scale_shift_norm=self.use_scale_shift_norm,
            up=up,
            down=down,
        )

    def _attention(self, channels: int, num_heads: int) -> AttentionBlock:
        return AttentionBlock(
            channels,
            num_heads=num_heads,
            num_head_channels=self.num_head_channels,
            use_new_attention_order=self.use_new_attention_order,
        )

    def _torso(self) -> list[nn.Module]:
        return [self.input_blocks, self.middle_block]

    @property
    def dtype(self) -> torch.dtype:
        """The dtype the torso runs in: float16 after :meth:`convert_to_fp16`, else that of the weights."""
        return self.input_blocks[0][0].weight.dtype

    def convert_to_fp16(self) -> None:
        """Cast the torso's convolutions to float16, as the original ``use_fp16`` scripts do.

        Norms, embeddings and the output head stay float32 (GroupNorm32 computes in float32).
        ``use_fp16=True`` alone only records the flag: weights are loaded in float32 first.
        """
        self._cast_torso_convs(torch.float16)

    def convert_to_fp32(self) -> None:
        """Undo :meth:`convert_to_fp16`."""
        self._cast_torso_convs(torch.float32)

    def _cast_torso_convs(self, dtype: torch.dtype) -> None:
        for part in self._torso():
            for module in part.modules():
                if isinstance(module, _CONV_TYPES):
                    module.to(dtype)

    def _embedding(self, timesteps: torch.Tensor, y: torch.Tensor | None, batch: int) -> torch.Tensor:
        """``time_embed(timestep_embedding(t))``, plus ``label_emb(y)`` for class-conditional models."""
        if (y is None) != (self.num_classes is None):
            raise ValueError(
                "y (an [N] tensor of class indices) must be given if and only if the model is class-conditional; "
                f"this model has num_classes={self.num_classes}"
            )
        timesteps = torch.as_tensor(timesteps, device=self.time_embed[0].weight.device).reshape(-1)
        emb = self.time_embed(timestep_embedding(timesteps, self.model_channels))
        if y is not None:
            if y.shape != (batch,):
                raise ValueError(f"y must have shape [{batch}], got {list(y.shape)}")
            emb = emb + self.label_emb(y)
        return emb


@register_network("openai_unet")
class UNetModel(_ADMTrunk):
    """The ADM U-Net (Dhariwal & Nichol 2021; Nichol & Dhariwal 2021), guided-diffusion's ``UNetModel``.

    Constructor arguments are those of guided-diffusion: ``attention_resolutions`` are
    *downsampling factors* (``image_size // res`` of the ``--attention_resolutions`` flag),
    ``num_head_channels`` (if not -1) overrides ``num_heads``, ``num_heads_upsample`` (-1: same as
    ``num_heads``) sets the decoder's heads, ``use_new_attention_order`` selects the qkv split (the
    legacy order is per-head ``[q|k|v]``), ``dims`` must be 2, and ``use_checkpoint`` is ignored.
    ``forward(x, timesteps, y=None)`` returns ``[N, out_channels, H, W]``; for ``learn_sigma``
    models the channels are ``[eps, v]``.
    """

    def __init__(
        self,
        image_size,
        in_channels,
        model_channels,
        out_channels,
        num_res_blocks,
        attention_resolutions,
        dropout=0,
        channel_mult=(1, 2, 4, 8),
        conv_resample=True,
        dims=2,
        num_classes=None,
        use_checkpoint=False,
        use_fp16=False,
        num_heads=1,
        num_head_channels=-1,
        num_heads_upsample=-1,
        use_scale_shift_norm=False,
        resblock_updown=False,
        use_new_attention_order=False,
    ):
        super().__init__(
            image_size=image_size,
            in_channels=in_channels,
            model_channels=model_channels,
            num_res_blocks=num_res_blocks,
            attention_resolutions=attention_resolutions,
            dropout=dropout,
            channel_mult=channel_mult,
            conv_resample=conv_resample,
            dims=dims,
            num_classes=num_classes,
            use_checkpoint=use_checkpoint,
            use_fp16=use_fp16,
            num_heads=num_heads,
            num_head_channels=num_head_channels,
            num_heads_upsample=num_heads_upsample,
            use_scale_shift_norm=use_scale_shift_norm,
            resblock_updown=resblock_updown,
            use_new_attention_order=use_new_attention_order,
        )
        self.out_channels = out_channels
        skips = list(self._skip_channels)
        ch, ds = self._bottleneck_channels, self._bottleneck_factor
        self.output_blocks = nn.ModuleList()
        for level, mult in reversed(list(enumerate(self.channel_mult))):
            for i in range(num_res_blocks + 1):
                layers = [self._res_block(ch + skips.pop(), int(model_channels * mult))]
                ch = int(model_channels * mult)
                if ds in self.attention_resolutions:
                    layers.append(self._attention(ch, self.num_heads_upsample))
                if level and i == num_res_blocks:
                    if resblock_updown:
                        layers.append(self._res_block(ch, ch, up=True))
                    else:
                        layers.append(Upsample(ch, conv_resample, out_channels=ch))
                    ds //= 2
                self.output_blocks.append(EmbedSequential(*layers))
        first_ch = int(self.channel_mult[0] * model_channels)
        self.out = nn.Sequential(
            normalization(ch), nn.SiLU(), zero_init(nn.Conv2d(first_ch, out_channels, 3, padding=1))
        )

    @classmethod
    def from_improved_diffusion(
        cls,
        in_channels,
        model_channels,
        out_channels,
        num_res_blocks,
        attention_resolutions,
        dropout=0,
        channel_mult=(1, 2, 4, 8),
        conv_resample=True,
        dims=2,
        num_classes=None,
        use_checkpoint=False,
        num_heads=1,
        num_heads_upsample=-1,
        use_scale_shift_norm=False,
    ):
        """Build from the arguments of improved-diffusion's ``UNetModel`` (or ``SuperResModel``).

        improved-diffusion's U-Net is this one with legacy attention split by ``num_heads`` only,
        plain up/downsampling layers and no ``image_size``; the parameter names are identical.
        """
        if channel_mult[0] != 1:
            raise ValueError(f"improved-diffusion networks need channel_mult[0] == 1, got {tuple(channel_mult)}")
        return cls(  # by keyword, so that the registry records every argument by name
            image_size=None,
            in_channels=in_channels,
            model_channels=model_channels,
            out_channels=out_channels,
            num_res_blocks=num_res_blocks,
            attention_resolutions=attention_resolutions,
            dropout=dropout,
            channel_mult=channel_mult,
            conv_resample=conv_resample,
            dims=dims,
            num_classes=num_classes,
            use_checkpoint=use_checkpoint,
            num_heads=num_heads,
            num_heads_upsample=num_heads_upsample,
            use_scale_shift_norm=use_scale_shift_norm,
        )

    def _torso(self) -> list[nn.Module]:
        return [self.input_blocks, self.middle_block, self.output_blocks]

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """``x`` [N, in_channels, H, W], ``timesteps`` [N] (original step indices), ``y`` [N] class ids."""
        emb = self._embedding(timesteps, y, x.shape[0])
        h = x.to(self.dtype)
        skips = []
        for block in self.input_blocks:
            h = block(h, emb)
            skips.append(h)
        h = self.middle_block(h, emb)
        for block in self.output_blocks:
            h = block(torch.cat([h, skips.pop()], dim=1), emb)
        return self.out(h.to(x.dtype))


@register_network("openai_superres")
class SuperResModel(UNetModel):
    """The ADM upsampler: a :class:`UNetModel` with twice the input channels.

    ``forward(x, timesteps, low_res, y=None)`` resizes ``low_res`` bilinearly to ``x``'s size
    (``align_corners=False``) and concatenates it after ``x`` on the channel axis.
    """

    def __init__(self, image_size, in_channels, *args, **kwargs):
        super().__init__(image_size, 2 * in_channels, *args, **kwargs)

    def forward(self, x, timesteps, low_res=None, y=None):
        if low_res is None:
            raise ValueError("SuperResModel needs the low-resolution image: forward(x, timesteps, low_res=...)")
        upsampled = nn.functional.interpolate(low_res, size=tuple(x.shape[-2:]), mode="bilinear")
        return super().forward(torch.cat([x, upsampled], dim=1), timesteps, y=y)


@register_network("openai_classifier")
class EncoderUNetModel(_ADMTrunk):
    """The noisy ImageNet classifier of guided-diffusion (Dhariwal & Nichol 2021).

    The U-Net's encoder and middle block followed by a head chosen by ``pool``:
    ``'adaptive'`` (norm, SiLU, global average pool, 1x1 conv), ``'attention'`` (norm, SiLU,
    :class:`AttentionPool2d`; needs ``num_head_channels``), ``'spatial'`` / ``'spatial_v2'`` (MLP
    on the spatial means of every block's output). ``forward(x, timesteps)`` returns logits
    ``[N, out_channels]``.
    """

    def __init__(
        self,
        image_size,
        in_channels,
        model_channels,
        out_channels,
        num_res_blocks,
        attention_resolutions,
        dropout=0,
        channel_mult=(1, 2, 4, 8),
        conv_resample=True,
        dims=2,
        use_checkpoint=False,
        use_fp16=False,
        num_heads=1,
        num_head_channels=-1,
        num_heads_upsample=-1,
        use_scale_shift_norm=False,
        resblock_updown=False,
        use_new_attention_order=False,
        pool="adaptive",
    ):
        if pool not in ("adaptive", "attention", "spatial", "spatial_v2"):
            raise ValueError(f"unknown pool {pool!r}; expected 'adaptive', 'attention', 'spatial' or 'spatial_v2'")
        if pool == "attention" and num_head_channels == -1:
            raise ValueError("pool='attention' needs num_head_channels (the width of each pooling head)")
        if pool == "attention" and image_size is None:
            raise ValueError("pool='attention' needs image_size (the positional embedding covers every position)")
        super().__init__(
            image_size=image_size,
            in_channels=in_channels,
            model_channels=model_channels,
            num_res_blocks=num_res_blocks,
            attention_resolutions=attention_resolutions,
            dropout=dropout,
            channel_mult=channel_mult,
            conv_resample=conv_resample,
            dims=dims,
            num_classes=None,
            use_checkpoint=use_checkpoint,
            use_fp16=use_fp16,
            num_heads=num_heads,
            num_head_channels=num_head_channels,
            num_heads_upsample=num_heads_upsample,
            use_scale_shift_norm=use_scale_shift_norm,
            resblock_updown=resblock_updown,
            use_new_attention_order=use_new_attention_order,
        )
        self.out_channels = out_channels
        self.pool = pool
        ch = self._bottleneck_channels
        if pool == "adaptive":
            self.out = nn.Sequential(
                normalization(ch),
                nn.SiLU(),
                nn.AdaptiveAvgPool2d((1, 1)),
                zero_init(nn.Conv2d(ch, out_channels, 1)),
                nn.Flatten(),
            )
        elif pool == "attention":
            spatial = image_size // self._bottleneck_factor
            self.out = nn.Sequential(
                normalization(ch), nn.SiLU(), AttentionPool2d(spatial, ch, num_head_channels, out_channels)
            )
        else:
            features = sum(self._skip_channels) + ch
            if pool == "spatial":
                self.out = nn.Sequential(nn.Linear(features, 2048), nn.ReLU(), nn.Linear(2048, out_channels))
            else:
                self.out = nn.Sequential(
                    nn.Linear(features, 2048), normalization(2048), nn.SiLU(), nn.Linear(2048, out_channels)
                )

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """Logits ``[N, out_channels]`` for noisy images ``x`` at (original) ``timesteps``."""
        emb = self._embedding(timesteps, None, x.shape[0])
        spatial = self.pool.startswith("spatial")
        means = []
        h = x.to(self.dtype)
        for block in self.input_blocks:
            h = block(h, emb)
            if spatial:
                means.append(h.to(x.dtype).mean(dim=(2, 3)))
        h = self.middle_block(h, emb)
        if spatial:
            means.append(h.to(x.dtype).mean(dim=(2, 3)))
            return self.out(torch.cat(means, dim=-1))
        return self.out(h.to(x.dtype))


# ----------------------------------------------------------------------------------------------
# Original command-line flags (script_util.py of guided-diffusion and improved-diffusion).

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
):
    """The shared body of create_model and sr_create_model."""
    _check_codebase(codebase)
    common = dict(
        in_channels=3,
        model_channels=num_channels,
        out_channels=6 if learn_sigma else 3,
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
) -> UNetModel:
    """``script_util.create_model``: a :class:`UNetModel` from flag values.

    An empty ``channel_mult`` is chosen from ``image_size`` (guided: 64/128/256/512; improved:
    32/64/256), ``attention_resolutions`` (``"32,16,8"``) become factors ``image_size // res``,
    ``learn_sigma`` doubles the output channels and ``class_cond`` adds ``num_classes`` labels.
    ``codebase='improved'`` builds improved-diffusion's network (legacy attention, no guided-only
    options; an explicit ``channel_mult`` is accepted there as an extension).
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
) -> EncoderUNetModel:
    """``script_util.create_classifier``: the noisy classifier from its flags.

    The original hard-codes 1000 classes and 64 channels per head and picks ``channel_mult`` from
    ``image_size``; the keyword-only arguments override these for other set-ups.
    """
    return EncoderUNetModel(
        image_size=image_size,
        in_channels=3,
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
    flags: str | Mapping[str, Any], *, codebase: str = "guided", num_classes: int = NUM_CLASSES
) -> UNetModel:
    """Build the diffusion network that the original scripts build from these flags.

    ``flags`` is a flag string or a dict of flag values (strings are converted like argparse
    does). Unset flags take ``codebase``'s argparse defaults (they differ between guided- and
    improved-diffusion); ``--large_size``/``--small_size`` select the upsampler
    (:class:`SuperResModel`). Flags that do not affect the network (diffusion, sampling,
    classifier) are ignored; unknown flags raise ValueError.
    """
    given = _flag_dict(flags)
    if "large_size" in given or "small_size" in given:
        merged = {**sr_model_and_diffusion_defaults(codebase), **given}
        return _call_with_flags(sr_create_model, merged, num_classes=num_classes, codebase=codebase)
    merged = {**model_and_diffusion_defaults(codebase), **given}
    return _call_with_flags(create_model, merged, num_classes=num_classes, codebase=codebase)


def classifier_from_flags(
    flags: str | Mapping[str, Any],
    *,
    num_classes: int = NUM_CLASSES,
    num_head_channels: int = 64,
    channel_mult="",
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
