"""The file-format registry and what the CLI promises about files (issue 10, items 3, 5, 7, 8 of the file side).

Files are recognised by content; the CLI reads what it writes (safetensors included); training states load
their 'net' with a warning; embedded code that is not NVlabs/edm's draws a warning; options that a file's
format does not use are refused; ``edm convert`` never destroys its input or replaces what is not a regular
file, and respects the umask.
"""

from __future__ import annotations

import hashlib
import os
import warnings

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image
from test_edm_pickle import MODULE_SRC, snapshot, toolkit_network, write_pickle, write_training_state
from test_security_files import CraftingPickler, Raw

from edm_toolkit.adapters import edm_pickle
from edm_toolkit.checkpoints import FORMAT, save_model
from edm_toolkit.cli import main
from edm_toolkit.errors import CheckpointError, CheckpointWarning, EDMToolkitError
from edm_toolkit.io.formats import FORMATS
from edm_toolkit.loading import identify, inspect_file, load_denoiser
from edm_toolkit.io.tensorfile import read_safetensors, write_safetensors

GENERATE = ["--seeds", "0", "--steps", "2", "--batch", "1", "--class", "1"]


def cli(*args):
    result = CliRunner().invoke(main, [str(a) for a in args])
    return result.exit_code, result.stderr, result.stdout


def one_error(stderr: str) -> str:
    errors = [line for line in stderr.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and "Traceback" not in stderr, stderr
    return errors[0]


@pytest.fixture(scope="module")
def edm_net(load_fixture):
    return toolkit_network(load_fixture("edm_precond_edm"), "edm")


@pytest.fixture
def edm_file(edm_net, tmp_path):
    return write_pickle(tmp_path / "network-snapshot-000000.pkl", snapshot(edm_net))


def image(outdir):
    return np.asarray(Image.open(outdir / "000000.png"))


# ----------------------------------------------------------------------------------------------------------
# The registry


def test_every_family_is_recognised_by_content(edm_file, edm_net, load_fixture, tmp_path):
    assert list(FORMATS) == ["edm-toolkit", "edm-pickle", "openai", "score_sde", "detector-nvidia-pickle",
                            "detector-torchscript", "detector-state-dict"]
    torch.save(dict(load_fixture("gd_unet_legacy").state_dict), tmp_path / "a")
    torch.save(load_fixture("sde_ncsnpp_ve").state_dict, tmp_path / "b")
    save_model(edm_net, tmp_path / "c.safetensors")
    os.replace(tmp_path / "c.safetensors", tmp_path / "c")  # the name says nothing
    found = {name: identify(path) for name, path in [("pickle", edm_file), ("adm", tmp_path / "a"),
                                                      ("sde", tmp_path / "b"), ("toolkit", tmp_path / "c")]}
    assert found == {"pickle": "edm-pickle", "adm": "openai", "sde": "score_sde", "toolkit": "edm-toolkit"}
    (tmp_path / "text").write_text("hello")
    with pytest.raises(CheckpointError, match="not a model file of a supported format"):
        identify(tmp_path / "text")
    torch.save({"weights": torch.zeros(3)}, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match=r"holds a dict with keys \['weights'\], which is not a model file"):
        identify(tmp_path / "other.pt")


# ----------------------------------------------------------------------------------------------------------
# The CLI reads what it writes (item 3)


def test_converted_safetensors_inspect_and_generate(edm_file, tmp_path):
    out = tmp_path / "model.safetensors"
    assert cli("convert", edm_file, out)[0] == 0
    code, _, stdout = cli("inspect", out)
    assert code == 0 and stdout.split()[:2] == ["family", "edm-toolkit"]
    assert cli("generate", "--network", edm_file, "--outdir", tmp_path / "a", *GENERATE)[0] == 0
    assert cli("generate", "--network", out, "--outdir", tmp_path / "b", *GENERATE)[0] == 0
    assert np.array_equal(image(tmp_path / "a"), image(tmp_path / "b"))


def test_safetensors_header_starting_like_a_pickle(tmp_path):
    """A header length whose first byte is 0x80 (one in 256 lengths) is still a safetensors file."""
    tensors = {"data": torch.randn(2, 3, 4, 4, dtype=torch.float64)}
    config = '{"type": "ideal", "shape": [2, 3, 4, 4], "label_dim": 0, "width": 0.0, "labelled": false}'
    for padding in range(300):
        path = tmp_path / "model.safetensors"
        with open(path, "wb") as stream:
            write_safetensors(stream, tensors, {"format": FORMAT, "version": "1", "config": config + " " * padding})
        if path.read_bytes()[0] == 0x80:
            break
    assert path.read_bytes()[0] == 0x80 and identify(path) == "edm-toolkit"
    assert torch.equal(load_denoiser(path).data, tensors["data"])


def test_safetensors_files_are_interchangeable_with_the_library(tmp_path):
    st = pytest.importorskip("safetensors.torch")
    tensors = {"a": torch.randn(3, 5), "b": torch.arange(7, dtype=torch.int64), "c": torch.randn(2).half(),
               "d": torch.randn(4).bfloat16(), "e": torch.tensor([True, False]), "f": torch.zeros(0, 3)}
    with open(tmp_path / "ours.safetensors", "wb") as stream:
        write_safetensors(stream, tensors, {"k": "v"})
    theirs = st.load_file(str(tmp_path / "ours.safetensors"))
    st.save_file(tensors, str(tmp_path / "theirs.safetensors"), metadata={"k": "v"})
    metadata, ours = read_safetensors(tmp_path / "theirs.safetensors")
    assert metadata == {"k": "v"}
    for name, tensor in tensors.items():
        assert torch.equal(theirs[name], tensor) and torch.equal(ours[name], tensor)


def test_training_states_load_their_net_with_a_warning(edm_net, tmp_path):
    path = write_training_state(tmp_path / "training-state-000010.pt", {"net": edm_net, "optimizer_state": {}})
    code, stderr, _ = cli("convert", path, tmp_path / "net.pt")
    assert code == 0 and "Warning: " in stderr and "using 'net'" in stderr
    converted = load_denoiser(tmp_path / "net.pt")
    assert all(torch.equal(a, b) for a, b in zip(converted.state_dict().values(), edm_net.state_dict().values()))
    code, stderr, _ = cli("generate", "--network", path, "--outdir", tmp_path / "out", *GENERATE)
    assert code == 0 and "using 'net'" in stderr


# ----------------------------------------------------------------------------------------------------------
# What is not official (item 7)


def test_embedded_code_that_is_not_edms_draws_a_warning(edm_file, monkeypatch):
    with pytest.warns(CheckpointWarning, match="is not NVlabs/edm's released code"):
        load_denoiser(edm_file)
    code, stderr, _ = cli("inspect", edm_file)
    warned = [line for line in stderr.splitlines() if line.startswith("Warning:")]
    assert code == 0 and len(warned) == 1 and "edm-toolkit's implementation of these classes is used" in warned[0]
    official = hashlib.sha256(MODULE_SRC.encode()).hexdigest()
    monkeypatch.setitem(edm_pickle.OFFICIAL_SOURCES, official, "stand-in for training/networks.py")
    with warnings.catch_warnings():
        warnings.simplefilter("error", CheckpointWarning)
        load_denoiser(edm_file)


def test_inspect_does_not_invent_an_architecture(tmp_path):
    """An EDMPrecond record without its network: no 'DhariwalUNet with 0 parameters', an error."""
    from test_edm_pickle import edm_globals

    path = tmp_path / "edm.pkl"
    state = {"_parameters": {}, "_buffers": {}, "_modules": {}, "_init_args": (),
             "_init_kwargs": {"img_resolution": 32, "img_channels": 3}}
    with edm_globals(), open(path, "wb") as stream:
        CraftingPickler(stream, protocol=4).dump({"ema": Raw("EDMPrecond", state)})
    code, stderr, stdout = cli("inspect", path)
    assert code == 1 and "its pickled model is a NoneType" in one_error(stderr) and "DhariwalUNet" not in stdout


# ----------------------------------------------------------------------------------------------------------
# edm convert's output (item 5)


def test_convert_refuses_its_input_and_what_is_not_a_regular_file(edm_file, tmp_path):
    before = edm_file.read_bytes()
    os.link(edm_file, tmp_path / "hardlink.pkl")
    for target in (edm_file, tmp_path / "hardlink.pkl"):
        code, stderr, _ = cli("convert", edm_file, target)
        assert code == 1 and "is the input file itself" in one_error(stderr)
    os.mkfifo(tmp_path / "fifo")
    (tmp_path / "directory").mkdir()
    for target, kind in ((tmp_path / "fifo", "not a regular file"), (tmp_path / "directory", "is a directory")):
        code, stderr, _ = cli("convert", edm_file, target)
        assert code in (1, 2) and kind in one_error(stderr)  # 2: click's own check of OUT (dir_okay=False)
    with pytest.raises(EDMToolkitError, match="is a directory; refusing to replace it"):
        save_model(load_denoiser(edm_file), tmp_path / "directory")
    assert edm_file.read_bytes() == before and (tmp_path / "fifo").is_fifo()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["directory", "fifo", "hardlink.pkl", edm_file.name])


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o077, 0o600)])
def test_converted_files_respect_the_umask(umask, mode, edm_file, tmp_path):
    previous = os.umask(umask)
    try:
        for name in ("out.pt", "out.safetensors"):
            assert cli("convert", edm_file, tmp_path / name)[0] == 0
            assert (tmp_path / name).stat().st_mode & 0o777 == mode
    finally:
        os.umask(previous)


# ----------------------------------------------------------------------------------------------------------
# Options and messages (item 8)


@pytest.mark.parametrize("option, message", [
    (["--model-flags", "--image_size 16"], "model_flags (--model-flags) does not apply"),
    (["--model-config", "vp/cifar10_ddpmpp_continuous"], "config (--model-config) does not apply"),
    (["--weights", "raw"], "use_ema=False (--weights raw) does not apply"),
])
def test_options_a_format_does_not_use_are_errors(option, message, edm_file, tmp_path):
    for args in (["inspect", edm_file, *option[:2]] if option[0] != "--weights" else None,
                 ["generate", "--network", edm_file, "--outdir", tmp_path / "o", *option, *GENERATE],
                 ["convert", edm_file, tmp_path / "c.pt", *option]):
        if args is not None:
            code, stderr, _ = cli(*args)
            assert code == 1 and message in one_error(stderr) and edm_file.name in one_error(stderr)


def test_directories_pickles_as_classifiers_and_named_paths(edm_file, load_fixture, tmp_path):
    code, stderr, _ = cli("generate", "--network", tmp_path, "--outdir", tmp_path / "o", "--seeds", "0")
    assert code == 1 and "is a directory" in one_error(stderr)
    code, stderr, _ = cli("generate", "--network", "ideal", "--outdir", tmp_path / "o", "--seeds", "0", "--steps", "2", "--classifier",
                          edm_file)
    assert code == 1 and "is a plain pickle" in one_error(stderr) and "Unsupported operand" not in stderr
    path = tmp_path / "model.pt"
    torch.save(dict(load_fixture("gd_unet_legacy").state_dict), path)
    with pytest.raises(CheckpointError, match=f"^{path}: the weights do not match") as error:
        inspect_file(path, model_flags="--image_size 16 --num_heads 2 --num_channels 64 --num_res_blocks 1 "
                                       "--channel_mult 1,2 --attention_resolutions 8 --noise_schedule cosine "
                                       "--use_new_attention_order False --rescale_timesteps False")
    assert "the given state_dict" not in str(error.value)
