"""docs/recipes.md: every improved-/guided-diffusion command of the tables resolves (flags, loss, network), and
those naming a released checkpoint build its published parameter count (networks built on the meta device)."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
import torch

from edm_toolkit.adapters.openai import OpenAIDenoiser, OpenAIDiffusion
from edm_toolkit.adapters.openai_flags import (RELEASED_CHECKPOINTS, classifier_from_flags, model_from_flags,
                                               parse_model_flags)
from edm_toolkit.training.architectures import OPENAI_ARCHITECTURES, discrete_loss, openai_flags
from edm_toolkit.training.classifier import classifier_flags

RECIPES = Path(__file__).resolve().parents[1] / "docs" / "recipes.md"
IMAGENET_CLASSES = 1000


def commands():
    """(row text, tokens of the command cell) of every table row whose command trains a discrete model."""
    for line in RECIPES.read_text().splitlines():
        if not line.startswith("| "):
            continue
        cells = [c.strip() for c in line.strip("|").split(" | ")]
        spans = re.findall(r"`([^`]*)`", cells[-1]) if len(cells) >= 2 else []
        for span in spans:
            if "--arch iddpm" in span or "--arch guided" in span or span.startswith("edm train-classifier"):
                yield pytest.param(cells[0], shlex.split(span), id=cells[0][:60])


def option(tokens, name, default=None):
    return tokens[tokens.index(name) + 1] if name in tokens else default


def published_parameters(row: str) -> float | None:
    for name, entry in RELEASED_CHECKPOINTS.items():
        if name in row and entry["params"] is not None:
            return float(entry["params"].rstrip("M")) * 1e6
    return None


@pytest.mark.parametrize("row,tokens", list(commands()))
def test_recipe_resolves(row, tokens):
    resolution = int(re.search(r"-(\d+)x\d+\.zip", option(tokens, "--data")).group(1))
    cond = option(tokens, "--cond", "0") == "1"
    label_dim = IMAGENET_CLASSES if cond else 0
    steps = option(tokens, "--diffusion-steps")
    if tokens[:2] == ["edm", "train-classifier"]:
        flags = classifier_flags(option(tokens, "--model-flags"), resolution=resolution,
                                 noise_schedule=option(tokens, "--noise-schedule"))
        with torch.device("meta"):
            net = classifier_from_flags(flags, num_classes=IMAGENET_CLASSES, num_head_channels=64)
    else:
        arch = option(tokens, "--arch")
        flags = openai_flags(arch, option(tokens, "--model-flags"), resolution=resolution, cond=cond,
                             noise_schedule=option(tokens, "--noise-schedule"),
                             diffusion_steps=int(steps) if steps else None)
        with torch.device("meta"):
            model = model_from_flags(flags, codebase=OPENAI_ARCHITECTURES[arch], num_classes=label_dim or 1)
        net = OpenAIDenoiser(model, OpenAIDiffusion.from_flags(flags), codebase=OPENAI_ARCHITECTURES[arch])
        loss = discrete_loss(flags, parse_model_flags(option(tokens, "--model-flags")), option(tokens, "--loss"),
                             option(tokens, "--schedule-sampler", "uniform"))
        loss.check_model(net)  # the loss the flags name trains this model
    count = sum(p.numel() for p in net.parameters())
    expected = published_parameters(row)
    if expected is not None:
        assert abs(count - expected) <= 0.05e6, (row, count, expected)  # published to 0.1M


def test_the_tables_hold_the_recipes():
    rows = [p.values[0] for p in commands()]
    assert len(rows) >= 9 and any("64x64_diffusion.pt" in r for r in rows) and any("classifier" in r for r in rows)
