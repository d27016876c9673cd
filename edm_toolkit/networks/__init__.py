"""Backbone networks F(x, c_noise, class_labels, augment_labels) with their original state_dict layouts.

song_unet (DDPM++/NCSN++) and dhariwal_unet (ADM) as in EDM, openai_unet (guided/improved-diffusion UNet,
classifier, super-resolution model) and score_sde (NCSNpp). Registered networks record their constructor
arguments, so model files can rebuild them (``registry.build_network``).
"""

from .registry import NETWORKS, build_network, network_config, register_network

__all__ = ["NETWORKS", "build_network", "network_config", "register_network", "load_all"]


def load_all() -> None:
    """Imports every network module so that all of them are registered."""
    from . import dhariwal_unet, openai_unet, score_sde, song_unet  # noqa: F401
