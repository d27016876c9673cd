"""OpenAI ADM networks with their original state_dict layout.

* :class:`UNetModel`: the ADM U-Net of guided-diffusion ("Diffusion Models Beat GANs on Image
  Synthesis", Dhariwal & Nichol 2021), which contains the U-Net of improved-diffusion ("Improved
  Denoising Diffusion Probabilistic Models", Nichol & Dhariwal 2021) as a special case
  (:meth:`UNetModel.from_improved_diffusion`).
* :class:`SuperResModel`: the upsampler; ``low_res`` is bilinearly resized and concatenated after ``x``.
* :class:`EncoderUNetModel`: the noisy classifier used for classifier guidance (encoder half,
  middle block and a pooling head).

The three share one trunk, described by an :class:`ADMConfig` (the original constructors' arguments).
Building them from the original command-line flags, and the published flags of the released checkpoints,
belong to the checkpoint reader: :mod:`edm_toolkit.adapters.openai_flags`.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import nn

from .openai_layers import (
    AttentionBlock,
    class_embedding,
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

__all__ = ["ADMConfig", "EncoderUNetModel", "SuperResModel", "UNetModel"]

_CONV_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


@dataclasses.dataclass(frozen=True)
class ADMConfig:
    """The arguments of guided-diffusion's ``UNetModel`` (``EncoderUNetModel`` has no ``num_classes``).

    ``attention_resolutions`` are *downsampling factors* (``image_size // res`` of the
    ``--attention_resolutions`` flag); ``num_head_channels`` (if not -1) overrides ``num_heads``;
    ``num_heads_upsample`` (-1: same as ``num_heads``) sets the decoder's heads; ``use_new_attention_order``
    selects the qkv split (the legacy order is per-head ``[q|k|v]``); ``dims`` must be 2; ``use_checkpoint``
    is accepted for compatibility (gradient checkpointing is not used).
    """

    image_size: int | None
    in_channels: int
    model_channels: int
    out_channels: int
    num_res_blocks: int
    attention_resolutions: tuple[int, ...]
    dropout: float = 0
    channel_mult: tuple[float, ...] = (1, 2, 4, 8)
    conv_resample: bool = True
    dims: int = 2
    num_classes: int | None = None
    use_checkpoint: bool = False
    use_fp16: bool = False
    num_heads: int = 1
    num_head_channels: int = -1
    num_heads_upsample: int = -1
    use_scale_shift_norm: bool = False
    resblock_updown: bool = False
    use_new_attention_order: bool = False

    def __post_init__(self):
        require_2d(self.dims)
        if isinstance(self.attention_resolutions, str):
            raise ValueError(
                f"attention_resolutions={self.attention_resolutions!r} must be downsampling factors such as "
                "(2, 4, 8), not a flag string of resolutions; the flag builders (create_model, model_from_flags) "
                "convert '32,16,8' to image_size // res"
            )
        object.__setattr__(self, "attention_resolutions", tuple(int(ds) for ds in self.attention_resolutions))
        object.__setattr__(self, "channel_mult", tuple(self.channel_mult))
        if not self.channel_mult:
            raise ValueError("channel_mult must name at least one resolution level")

    def record(self) -> dict[str, Any]:
        """The arguments as plain data (tuples as lists), as model files store them."""
        return {name: list(value) if isinstance(value, tuple) else value
                for name, value in dataclasses.asdict(self).items()}


class _ADMTrunk(nn.Module):
    """What the U-Net and the classifier share: embeddings, encoder (``input_blocks``) and ``middle_block``."""

    def __init__(self, config: ADMConfig):
        super().__init__()
        self.config = config
        self.image_size = config.image_size
        self.in_channels = config.in_channels
        self.model_channels = config.model_channels
        self.num_res_blocks = config.num_res_blocks
        self.attention_resolutions = config.attention_resolutions
        self.dropout = config.dropout
        self.channel_mult = config.channel_mult
        self.conv_resample = config.conv_resample
        self.num_classes = config.num_classes
        self.use_checkpoint = config.use_checkpoint
        self.use_fp16 = config.use_fp16
        self.num_heads = config.num_heads
        self.num_head_channels = config.num_head_channels
        self.num_heads_upsample = config.num_heads if config.num_heads_upsample == -1 else config.num_heads_upsample
        self.use_scale_shift_norm = config.use_scale_shift_norm
        self.resblock_updown = config.resblock_updown
        self.use_new_attention_order = config.use_new_attention_order

        model_channels = config.model_channels
        emb_dim = 4 * model_channels
        self.time_embed = nn.Sequential(nn.Linear(model_channels, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        if config.num_classes is not None:
            self.label_emb = class_embedding(config.num_classes, emb_dim)

        ch = int(self.channel_mult[0] * model_channels)
        self.input_blocks = nn.ModuleList([EmbedSequential(nn.Conv2d(config.in_channels, ch, 3, padding=1))])
        self._skip_channels = [ch]  # width of every input block's output, consumed by the decoder
        ds = 1
        for level, mult in enumerate(self.channel_mult):
            for _ in range(config.num_res_blocks):
                layers = [self._res_block(ch, int(mult * model_channels))]
                ch = int(mult * model_channels)
                if ds in self.attention_resolutions:
                    layers.append(self._attention(ch, config.num_heads))
                self.input_blocks.append(EmbedSequential(*layers))
                self._skip_channels.append(ch)
            if level != len(self.channel_mult) - 1:
                if config.resblock_updown:
                    down = self._res_block(ch, ch, down=True)
                else:
                    down = Downsample(ch, config.conv_resample, out_channels=ch)
                self.input_blocks.append(EmbedSequential(down))
                self._skip_channels.append(ch)
                ds *= 2
        self.middle_block = EmbedSequential(
            self._res_block(ch, ch), self._attention(ch, config.num_heads), self._res_block(ch, ch)
        )
        self._bottleneck_channels = ch
        self._bottleneck_factor = ds

    def _init_record(self) -> dict[str, Any]:
        """The constructor arguments that model files store (the registry records these)."""
        return self.config.record()

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

    Constructor arguments are those of guided-diffusion (:class:`ADMConfig`).
    ``forward(x, timesteps, y=None)`` returns ``[N, out_channels, H, W]``; for ``learn_sigma``
    models the channels are ``[eps, v]``.
    """

    def __init__(self, image_size, in_channels, model_channels, out_channels, num_res_blocks, attention_resolutions,
                 **options):
        """``options``: the other fields of :class:`ADMConfig`, by name."""
        super().__init__(ADMConfig(image_size, in_channels, model_channels, out_channels, num_res_blocks,
                                   attention_resolutions, **options))
        self.out_channels = out_channels
        model_channels, num_res_blocks = self.model_channels, self.num_res_blocks
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
                    if self.resblock_updown:
                        layers.append(self._res_block(ch, ch, up=True))
                    else:
                        layers.append(Upsample(ch, self.conv_resample, out_channels=ch))
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

    def _init_record(self) -> dict[str, Any]:
        return {**self.config.record(), "in_channels": self.config.in_channels // 2}  # what the constructor takes

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

    def __init__(self, image_size, in_channels, model_channels, out_channels, num_res_blocks, attention_resolutions,
                 pool="adaptive", **options):
        """``options``: the fields of :class:`ADMConfig` after ``attention_resolutions``, except ``num_classes``."""
        if pool not in ("adaptive", "attention", "spatial", "spatial_v2"):
            raise ValueError(f"unknown pool {pool!r}; expected 'adaptive', 'attention', 'spatial' or 'spatial_v2'")
        if "num_classes" in options:
            raise TypeError("EncoderUNetModel has no num_classes: its classes are its out_channels")
        config = ADMConfig(image_size, in_channels, model_channels, out_channels, num_res_blocks,
                           attention_resolutions, **options)
        if pool == "attention" and config.num_head_channels == -1:
            raise ValueError("pool='attention' needs num_head_channels (the width of each pooling head)")
        if pool == "attention" and image_size is None:
            raise ValueError("pool='attention' needs image_size (the positional embedding covers every position)")
        super().__init__(config)
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
                normalization(ch), nn.SiLU(), AttentionPool2d(spatial, ch, config.num_head_channels, out_channels)
            )
        else:
            features = sum(self._skip_channels) + ch
            if pool == "spatial":
                self.out = nn.Sequential(nn.Linear(features, 2048), nn.ReLU(), nn.Linear(2048, out_channels))
            else:
                self.out = nn.Sequential(
                    nn.Linear(features, 2048), normalization(2048), nn.SiLU(), nn.Linear(2048, out_channels)
                )

    def _init_record(self) -> dict[str, Any]:
        record = self.config.record()
        del record["num_classes"]
        return {**record, "pool": self.pool}

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
