"""DhariwalUNet: EDM's re-implementation of ADM (Dhariwal & Nichol 2021).

Follows ``DhariwalUNet`` of NVlabs/edm ``training/networks.py`` (Karras et al.
2022, Table 7, "ADM" column).  Parameter names equal EDM's (``map_label``,
``enc.64x64_conv``, ``dec.8x8_in0``, ``out_norm``, ``out_conv`` ...), so EDM
weights load with ``strict=True``.  It is not bit-compatible with
guided-diffusion checkpoints: the layer names, GroupNorm group counts below
128 channels and the qkv channel order differ.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .edm_layers import Conv2d, GroupNorm, Linear, PositionalEmbedding, UNetBlock
from .registry import register_network

__all__ = ["DhariwalUNet", "PUBLISHED_CONFIGS", "published_config"]

# Architecture flags of EDM's train.py --arch=adm.
PUBLISHED_CONFIGS: dict[str, dict] = {
    "adm": dict(model_channels=192, channel_mult=[1, 2, 3, 4]),
}

# EDM train.py defaults: --dropout 0.13, and --augment 0.12 > 0 turns on the 9
# augment labels.  The released ImageNet-64 model used --dropout 0.10 --augment 0.
TRAIN_DEFAULTS = dict(dropout=0.13, augment_dim=9)


def published_config(name: str, **overrides) -> dict:
    """DhariwalUNet kwargs of EDM's ``train.py --arch=name`` (only 'adm').

    Includes train.py's defaults ``dropout=0.13`` and ``augment_dim=9``;
    ``overrides`` replace any entry (ImageNet-64: ``dropout=0.10, augment_dim=0``).
    """
    if name not in PUBLISHED_CONFIGS:
        raise ValueError(f"unknown DhariwalUNet architecture {name!r}; expected one of {sorted(PUBLISHED_CONFIGS)}")
    return {**copy.deepcopy(PUBLISHED_CONFIGS[name]), **TRAIN_DEFAULTS, **overrides}


@register_network("dhariwal_unet")
class DhariwalUNet(nn.Module):
    """ADM U-Net as in EDM: ``forward(x, noise_labels, class_labels, augment_labels=None) -> F(x)``.

    Arguments and defaults are those of EDM's ``DhariwalUNet``.  Blocks use
    scale/shift modulation, ``skip_scale`` 1, GroupNorm eps 1e-5 and one
    attention head per 64 channels.  The noise embedding is
    ``[cos, sin]`` with ``model_channels`` channels; augmentation labels are
    added before the mapping MLP, class labels (bias-free ``map_label``)
    after it.
    """

    def __init__(
        self,
        img_resolution: int,
        in_channels: int,
        out_channels: int,
        label_dim: int = 0,
        augment_dim: int = 0,
        model_channels: int = 192,
        channel_mult: Sequence[int] = (1, 2, 3, 4),
        channel_mult_emb: int = 4,
        num_blocks: int = 3,
        attn_resolutions: Sequence[int] = (32, 16, 8),
        dropout: float = 0.10,
        label_dropout: float = 0,
    ):
        super().__init__()
        self.img_resolution = img_resolution
        self.label_dropout = label_dropout
        emb_channels = model_channels * channel_mult_emb
        init = dict(init_mode="kaiming_uniform", init_weight=math.sqrt(1 / 3), init_bias=math.sqrt(1 / 3))
        init_zero = dict(init_mode="kaiming_uniform", init_weight=0, init_bias=0)
        block_kwargs = dict(
            emb_channels=emb_channels, channels_per_head=64, dropout=dropout, init=init, init_zero=init_zero
        )

        # Mapping network (creation order = EDM's, for identical random init).
        self.map_noise = PositionalEmbedding(model_channels)
        self.map_augment = Linear(augment_dim, model_channels, bias=False, **init_zero) if augment_dim else None
        self.map_layer0 = Linear(model_channels, emb_channels, **init)
        self.map_layer1 = Linear(emb_channels, emb_channels, **init)
        self.map_label = None
        if label_dim:
            self.map_label = Linear(label_dim, emb_channels, bias=False, init_mode="kaiming_normal",
                                    init_weight=math.sqrt(label_dim))

        # Encoder: every entry's output is kept for the decoder.
        self.enc = nn.ModuleDict()
        cout = in_channels
        for level, mult in enumerate(channel_mult):
            res = img_resolution >> level
            if level == 0:
                cin, cout = cout, model_channels * mult
                self.enc[f"{res}x{res}_conv"] = Conv2d(cin, cout, kernel=3, **init)
            else:
                self.enc[f"{res}x{res}_down"] = UNetBlock(cout, cout, down=True, **block_kwargs)
            for idx in range(num_blocks):
                cin, cout = cout, model_channels * mult
                self.enc[f"{res}x{res}_block{idx}"] = UNetBlock(
                    cin, cout, attention=res in attn_resolutions, **block_kwargs
                )
        skip_channels = [layer.out_channels for layer in self.enc.values()]

        # Decoder: the *_block{idx} entries concatenate one encoder output each.
        self.dec = nn.ModuleDict()
        self._skip_consumers: set[str] = set()
        for level, mult in reversed(list(enumerate(channel_mult))):
            res = img_resolution >> level
            if level == len(channel_mult) - 1:
                self.dec[f"{res}x{res}_in0"] = UNetBlock(cout, cout, attention=True, **block_kwargs)
                self.dec[f"{res}x{res}_in1"] = UNetBlock(cout, cout, **block_kwargs)
            else:
                self.dec[f"{res}x{res}_up"] = UNetBlock(cout, cout, up=True, **block_kwargs)
            for idx in range(num_blocks + 1):
                cin, cout = cout + skip_channels.pop(), model_channels * mult
                name = f"{res}x{res}_block{idx}"
                self.dec[name] = UNetBlock(cin, cout, attention=res in attn_resolutions, **block_kwargs)
                self._skip_consumers.add(name)
        self.out_norm = GroupNorm(cout)
        self.out_conv = Conv2d(cout, out_channels, kernel=3, **init_zero)

    def _embed(self, noise_labels, class_labels, augment_labels):
        """Conditioning vector fed to every block (EDM's mapping network)."""
        emb = self.map_noise(noise_labels)
        if self.map_augment is not None and augment_labels is not None:
            emb = emb + self.map_augment(augment_labels)
        emb = self.map_layer1(F.silu(self.map_layer0(emb)))
        if self.map_label is not None:
            if class_labels is None:
                raise ValueError("DhariwalUNet was built with label_dim > 0: class_labels are required")
            labels = class_labels
            if self.training and self.label_dropout:
                keep = torch.rand([labels.shape[0], 1], device=labels.device) >= self.label_dropout
                labels = labels * keep.to(labels.dtype)
            emb = emb + self.map_label(labels)
        return F.silu(emb)

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
        for layer in self.enc.values():
            x = layer(x, emb) if isinstance(layer, UNetBlock) else layer(x)
            skips.append(x)

        for name, block in self.dec.items():
            if name in self._skip_consumers:
                x = torch.cat([x, skips.pop()], dim=1)
            x = block(x, emb)
        return self.out_conv(F.silu(self.out_norm(x)))
