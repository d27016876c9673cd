"""Start-up cost (issue 13, item 4): loading a model and running it eagerly never imports the compiler.

Networks are built on the meta device before their weights load; out-of-place arithmetic there runs PyTorch's
Python reference kernels, which import ``torch._dynamo`` (about a second of CPU per process). These tests load
one file of every family in a fresh interpreter and read ``sys.modules`` there.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
import torch
from click.testing import CliRunner

from edm_toolkit.networks.edm_layers import weight_init

COMPILER_MODULES = ("torch._dynamo", "torch._inductor")

# Runs in a fresh interpreter: imports the CLI, loads the file, evaluates it once (eager, and through the eager
# fast path) and prints which compiler modules got imported after each step.
CHILD = """
import json, sys
import torch
from edm_toolkit.cli import main  # the CLI's import cost is part of every run
from edm_toolkit.inference import InferenceOptions, optimize
from edm_toolkit.loading import load_denoiser

def compiler():
    return [m for m in {modules!r} if m in sys.modules]

path, source = json.loads(sys.argv[1])
report = {{"import": compiler()}}
net = load_denoiser(path, **source)
report["load"] = compiler()
x = torch.zeros(1, net.img_channels, net.img_resolution, net.img_resolution)
labels = torch.eye(net.label_dim)[:1] if net.label_dim else None
with torch.no_grad():
    net(x, torch.tensor(1.0), labels)
    report["eager"] = compiler()
    optimize(net, InferenceOptions(precision="bf16", channels_last=True))(x, torch.tensor(1.0), labels)
    report["fast path"] = compiler()
print(json.dumps(report))
"""

def test_weight_init_draws_edms_values():
    """In-place arithmetic (no meta-device reference kernels) gives EDM's values bit for bit."""
    for mode, formula in (
        ("xavier_uniform", lambda shape, fi, fo: math.sqrt(6 / (fi + fo)) * (torch.rand(*shape) * 2 - 1)),
        ("xavier_normal", lambda shape, fi, fo: math.sqrt(2 / (fi + fo)) * torch.randn(*shape)),
        ("kaiming_uniform", lambda shape, fi, fo: math.sqrt(3 / fi) * (torch.rand(*shape) * 2 - 1)),
        ("kaiming_normal", lambda shape, fi, fo: math.sqrt(1 / fi) * torch.randn(*shape)),
    ):
        torch.manual_seed(7)
        expected = formula([5, 3, 3, 3], 27, 45)
        torch.manual_seed(7)
        got = weight_init([5, 3, 3, 3], mode, fan_in=27, fan_out=45)
        assert torch.equal(got, expected), mode


def _file(family, load_fixture, tmp_path):
    """A file of ``family`` (the CLI tests' factories; 'toolkit' = the EDM pickle converted to the toolkit's file)."""
    from test_cli_networks import FAMILIES

    from edm_toolkit.cli import main

    path, extra = FAMILIES["edm-pickle" if family == "toolkit" else family](load_fixture, tmp_path)
    if family == "toolkit":
        native = tmp_path / "converted.pt"
        result = CliRunner().invoke(main, ["convert", str(path), str(native)])
        assert result.exit_code == 0, result.output
        return str(native), {}
    flags = dict(zip(extra[::2], extra[1::2]))
    source = {key: flags[flag] for flag, key in (("--model-flags", "model_flags"), ("--model-config", "config"))
              if flag in flags}
    return str(path), source


@pytest.mark.parametrize("family", ["edm-pickle", "toolkit", "guided-diffusion",
                                    "improved-diffusion", "score_sde"])
def test_loading_and_running_a_model_does_not_import_the_compiler(family, load_fixture, tmp_path):
    path, source = _file(family, load_fixture, tmp_path)
    done = subprocess.run([sys.executable, "-c", CHILD.format(modules=COMPILER_MODULES), json.dumps([path, source])],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report == {"import": [], "load": [], "eager": [], "fast path": []}, report


def test_class_embedding_draws_nn_embeddings_values():
    from edm_toolkit.networks.openai_layers import class_embedding

    torch.manual_seed(3)
    expected = torch.nn.Embedding(10, 7).weight
    torch.manual_seed(3)
    got = class_embedding(10, 7)
    assert isinstance(got, torch.nn.Embedding) and torch.equal(got.weight, expected) and got.weight.requires_grad
