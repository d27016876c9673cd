"""SongUNet: EDM's re-implementation of DDPM++ and NCSN++ (Song et al. 2021).

Follows ``SongUNet`` of NVlabs/edm ``training/networks.py``; the configurations
are config A-F of Karras et al. 2022, Table 7 / Appendix F.2.  Parameter and
buffer names equal EDM's (``enc.32x32_conv``, ``enc.16x16_down``,
``dec.32x32_aux_conv``, ``map_noise.freqs`` ...), so EDM weights load with
``strict=True``.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .edm_layers import Conv2d, FourierEmbedding, GroupNorm, Linear, PositionalEmbedding, UNetBlock
from .registry import register_network

__all__ = ["SongUNet", "PUBLISHED_CONFIGS", "published_config"]

# Architecture flags of EDM's train.py (--arch); dropout and augment_dim are
# training options there, see published_config().
PUBLISHED_CONFIGS: dict[str, dict] = {
    "ddpmpp": dict(
        embedding_type="positional",
        encoder_type="standard",
        decoder_type="standard",
        channel_mult_noise=1,
        resample_filter=[1, 1],
        model_channels=128,
        channel_mult=[2, 2, 2],
    ),
    "ncsnpp": dict(
        embedding_type="fourier",
        encoder_type="residual",
        decoder_type="standard",
        channel_mult_noise=2,
        resample_filter=[1, 3, 3, 1],
        model_channels=128,
        channel_mult=[2, 2, 2],
    ),
}

# EDM train.py defaults: --dropout 0.13, and --augment 0.12 > 0 turns on the 9 augment labels.
TRAIN_DEFAULTS = dict(dropout=0.13, augment_dim=9)


def published_config(name: str, **overrides) -> dict:
    """SongUNet kwargs of EDM's ``train.py --arch=name`` ('ddpmpp' or 'ncsnpp').

    Includes train.py's defaults ``dropout=0.13`` and ``augment_dim=9``;
    ``overrides`` (e.g. ``augment_dim=0``, ``channel_mult=[1, 2, 2, 2]`` for
    the 64x64 models) replace any entry.  The image size and channel counts
    are not included.
    """
    if name not in PUBLISHED_CONFIGS:
        raise ValueError(f"unknown SongUNet architecture {name!r}; expected one of {sorted(PUBLISHED_CONFIGS)}")
    return {**copy.deepcopy(PUBLISHED_CONFIGS[name]), **TRAIN_DEFAULTS, **overrides}


def _check_choice(option: str, value: str, choices: Sequence[str]) -> None:
    if value not in choices:
        raise ValueError(f"SongUNet: unknown {option} {value!r}; expected one of {', '.join(choices)}")


@register_network("song_unet")
class SongUNet(nn.Module):
    """DDPM++ / NCSN++ U-Net as in EDM: ``forward(x, noise_labels, class_labels, augment_labels=None) -> F(x)``.

    Arguments and defaults are those of EDM's ``SongUNet``:
    ``embedding_type`` 'positional' (DDPM++) or 'fourier' (NCSN++);
    ``encoder_type`` 'standard', 'skip' (downsampled input added at every
    level) or 'residual' (NCSN++'s progressive input path); ``decoder_type``
    'standard' or 'skip' (an RGB output head at every level, upsampled and
    summed).  Blocks use one attention head, ``skip_scale`` sqrt(1/2),
    GroupNorm eps 1e-6 and additive embedding injection.

    The noise embedding has ``model_channels * channel_mult_noise`` channels;
    class labels (scaled by sqrt(label_dim)) and augmentation labels are
    added to it before the two-layer mapping MLP.
    """

    def __init__(
        self,
        img_resolution: int,
        in_channels: int,
        out_channels: int,
        label_dim: int = 0,
        augment_dim: int = 0,
        model_channels: int = 128,
        channel_mult: Sequence[int] = (1, 2, 2, 2),
        channel_mult_emb: int = 4,
        num_blocks: int = 4,
        attn_resolutions: Sequence[int] = (16,),
        dropout: float = 0.10,
        label_dropout: float = 0,
        embedding_type: str = "positional",
        channel_mult_noise: int = 1,
        encoder_type: str = "standard",
        decoder_type: str = "standard",
        resample_filter: Sequence[float] = (1, 1),
    ):
        _check_choice("embedding_type", embedding_type, ("positional", "fourier"))
        _check_choice("encoder_type", encoder_type, ("standard", "skip", "residual"))
        _check_choice("decoder_type", decoder_type, ("standard", "skip"))
        super().__init__()
        self.img_resolution = img_resolution
        self.label_dropout = label_dropout
        emb_channels = model_channels * channel_mult_emb
        noise_channels = model_channels * channel_mult_noise
        init = dict(init_mode="xavier_uniform")
        init_zero = dict(init_mode="xavier_uniform", init_weight=1e-5)
        init_attn = dict(init_mode="xavier_uniform", init_weight=math.sqrt(0.2))
        block_kwargs = dict(
            emb_channels=emb_channels,
            num_heads=1,
            dropout=dropout,
            skip_scale=math.sqrt(0.5),
            eps=1e-6,
            resample_filter=resample_filter,
            resample_proj=True,
            adaptive_scale=False,
            init=init,
            init_zero=init_zero,
            init_attn=init_attn,
        )

        # Mapping network.
        if embedding_type == "positional":
            self.map_noise = PositionalEmbedding(noise_channels, endpoint=True)
        else:
            self.map_noise = FourierEmbedding(noise_channels)
        self.map_label = Linear(label_dim, noise_channels, **init) if label_dim else None
        self.map_augment = Linear(augment_dim, noise_channels, bias=False, **init) if augment_dim else None
        self.map_layer0 = Linear(noise_channels, emb_channels, **init)
        self.map_layer1 = Linear(emb_channels, emb_channels, **init)

        # Encoder and decoder are ModuleDicts with EDM's entry names; `_enc_steps`
        # and `_dec_steps` record, per entry, what forward() does with it.
        self.enc = nn.ModuleDict()
        self.dec = nn.ModuleDict()
        self._enc_steps: list[tuple[str, str]] = []
        self._dec_steps: list[tuple[str, str]] = []

        def add_enc(name: str, kind: str, module: nn.Module) -> None:
            self.enc[name] = module
            self._enc_steps.append((name, kind))

        def add_dec(name: str, kind: str, module: nn.Module) -> None:
            self.dec[name] = module
            self._dec_steps.append((name, kind))

        cout = in_channels
        caux = in_channels
        for level, mult in enumerate(channel_mult):
            res = img_resolution >> level
            if level == 0:
                cin, cout = cout, model_channels
                add_enc(f"{res}x{res}_conv", "layer", Conv2d(cin, cout, kernel=3, **init))
            else:
                add_enc(f"{res}x{res}_down", "block", UNetBlock(cout, cout, down=True, **block_kwargs))
                if encoder_type == "skip":
                    add_enc(f"{res}x{res}_aux_down", "aux_down",
                            Conv2d(caux, caux, kernel=0, down=True, resample_filter=resample_filter))
                    add_enc(f"{res}x{res}_aux_skip", "aux_skip", Conv2d(caux, cout, kernel=1, **init))
                elif encoder_type == "residual":
                    add_enc(f"{res}x{res}_aux_residual", "aux_residual",
                            Conv2d(caux, cout, kernel=3, down=True, resample_filter=resample_filter,
                                   fused_resample=True, **init))
                    caux = cout
            for idx in range(num_blocks):
                cin, cout = cout, model_channels * mult
                add_enc(f"{res}x{res}_block{idx}", "block",
                        UNetBlock(cin, cout, attention=res in attn_resolutions, **block_kwargs))
        skip_channels = [self.enc[name].out_channels for name, kind in self._enc_steps if not kind.startswith("aux")]

        # Decoder.  Blocks named *_block{idx} take the matching encoder output as extra input.
        for level, mult in reversed(list(enumerate(channel_mult))):
            res = img_resolution >> level
            if level == len(channel_mult) - 1:
                add_dec(f"{res}x{res}_in0", "block", UNetBlock(cout, cout, attention=True, **block_kwargs))
                add_dec(f"{res}x{res}_in1", "block", UNetBlock(cout, cout, **block_kwargs))
            else:
                add_dec(f"{res}x{res}_up", "block", UNetBlock(cout, cout, up=True, **block_kwargs))
            for idx in range(num_blocks + 1):
                cin, cout = cout + skip_channels.pop(), model_channels * mult
                attention = idx == num_blocks and res in attn_resolutions
                add_dec(f"{res}x{res}_block{idx}", "skip_block",
                        UNetBlock(cin, cout, attention=attention, **block_kwargs))
            if decoder_type == "skip" or level == 0:
                if decoder_type == "skip" and level < len(channel_mult) - 1:
                    add_dec(f"{res}x{res}_aux_up", "aux_up",
                            Conv2d(out_channels, out_channels, kernel=0, up=True, resample_filter=resample_filter))
                # The output head is one step; its norm is stored under *_aux_norm.
                self.dec[f"{res}x{res}_aux_norm"] = GroupNorm(cout, eps=1e-6)
                add_dec(f"{res}x{res}_aux_conv", "aux_out", Conv2d(cout, out_channels, kernel=3, **init_zero))

    def _embed(self, noise_labels, class_labels, augment_labels):
        """Conditioning vector fed to every block (EDM's mapping network)."""
        emb = self.map_noise(noise_labels)
        emb = emb.reshape(emb.shape[0], 2, -1).flip(1).reshape(emb.shape)  # [cos, sin] -> [sin, cos]
        if self.map_label is not None:
            if class_labels is None:
                raise ValueError("SongUNet was built with label_dim > 0: class_labels are required")
            labels = class_labels
            if self.training and self.label_dropout:
                keep = torch.rand([labels.shape[0], 1], device=labels.device) >= self.label_dropout
                labels = labels * keep.to(labels.dtype)
            emb = emb + self.map_label(labels * math.sqrt(self.map_label.in_features))
        if self.map_augment is not None and augment_labels is not None:
            emb = emb + self.map_augment(augment_labels)
        emb = F.silu(self.map_layer0(emb))
        return F.silu(self.map_layer1(emb))

    def forward(
        self,
        x: torch.Tensor,
        noise_labels: torch.Tensor,
        class_labels: torch.Tensor | None = None,
        augment_labels: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Raw network output F(x) for inputs x [B, C, H, W] and noise labels [B] (or [1])."""
        emb = self._embed(noise_labels, class_labels, augment_labels)

        skips = []
        aux = x  # downsampled input for the skip/residual encoders
        for name, kind in self._enc_steps:
            layer = self.enc[name]
            if kind == "aux_down":
                aux = layer(aux)
            elif kind == "aux_skip":
                x = skips[-1] = x + layer(aux)
            elif kind == "aux_residual":
                x = skips[-1] = aux = (x + layer(aux)) / math.sqrt(2)
            else:
                x = layer(x, emb) if kind == "block" else layer(x)
                skips.append(x)

        out = None  # running sum of the output heads
        for name, kind in self._dec_steps:
            layer = self.dec[name]
            if kind == "aux_up":
                out = layer(out)
            elif kind == "aux_out":
                norm = self.dec[name.replace("aux_conv", "aux_norm")]
                head = layer(F.silu(norm(x)))
                out = head if out is None else head + out
            else:
                if kind == "skip_block":
                    x = torch.cat([x, skips.pop()], dim=1)
                x = layer(x, emb)
        return out
