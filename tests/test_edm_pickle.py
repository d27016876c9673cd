"""Safe loading of NVlabs/edm network pickles (edm_toolkit.adapters.edm_pickle).

The files are written here in EDM's exact layout: every network class pickles as a REDUCE of
``torch_utils.persistence._reconstruct_persistent_obj(meta)`` with ``meta = {'type': 'class', 'version': 6,
'module_src', 'class_name', 'state': <module __dict__ with _init_args/_init_kwargs>}``, tensors through torch's
own reduction (``_rebuild_parameter`` / ``_rebuild_tensor_v2`` / ``_load_from_bytes``), plain containers such as
``ModuleDict`` by default pickling. The stand-in modules that pickle needs to name EDM's globals exist in
``sys.modules`` only while a file is written. Weights, inputs and expected outputs are the reference fixtures of
the original EDM preconditioners (../shared/fixtures, README A5).
"""

from __future__ import annotations

import builtins
import collections
import contextlib
import io
import os
import pickle
import subprocess
import sys
import types

import numpy as np
import pytest
import torch
from torch import nn

from edm_toolkit.adapters.edm_pickle import inspect_edm_pickle, load_edm_network, read_edm_pickle
from edm_toolkit.errors import CheckpointError
from edm_toolkit.networks.dhariwal_unet import DhariwalUNet
from edm_toolkit.networks.song_unet import SongUNet
from edm_toolkit.precond import EDMPrecond, IDDPMPrecond, VEPrecond, VPPrecond

CASES = {  # fixture case -> (toolkit class, EDM's own parameters of the preconditioner)
    "vp": (VPPrecond, ("beta_d", "beta_min", "M", "epsilon_t")),
    "ve": (VEPrecond, ("sigma_min", "sigma_max")),
    "iddpm": (IDDPMPrecond, ("C_1", "C_2", "M")),
    "edm": (EDMPrecond, ("sigma_min", "sigma_max", "sigma_data")),
}
EDM_CLASS_NAMES = {"IDDPMPrecond": "iDDPMPrecond"}  # toolkit name -> EDM name where they differ
PERSISTENT_CLASSES = {
    "VPPrecond", "VEPrecond", "iDDPMPrecond", "EDMPrecond", "SongUNet", "DhariwalUNet",
    "UNetBlock", "Conv2d", "Linear", "GroupNorm", "PositionalEmbedding", "FourierEmbedding",
}
MODULE_SRC = "# stands in for the text of training/networks.py; a reader must never execute it\n"
DATASET_KWARGS = {
    "class_name": "training.dataset.ImageFolderDataset", "path": "datasets/tiny-16x16.zip", "use_labels": True,
    "xflip": False, "cache": True, "resolution": 16, "max_size": 50000,
}


# ----------------------------------------------------------------------------------------------------------
# Writing EDM-layout files


@contextlib.contextmanager
def edm_globals():
    """Stand-ins for torch_utils.persistence and dnnlib.util, registered only while a file is written."""

    def _reconstruct_persistent_obj(meta):
        raise AssertionError("only named by the pickler, never called")

    class EasyDict(dict):
        pass

    persistence = types.ModuleType("torch_utils.persistence")
    _reconstruct_persistent_obj.__module__ = persistence.__name__
    _reconstruct_persistent_obj.__qualname__ = "_reconstruct_persistent_obj"
    persistence._reconstruct_persistent_obj = _reconstruct_persistent_obj
    util = types.ModuleType("dnnlib.util")
    EasyDict.__module__, EasyDict.__qualname__ = util.__name__, "EasyDict"
    util.EasyDict = EasyDict
    added = {"torch_utils": types.ModuleType("torch_utils"), "torch_utils.persistence": persistence,
             "dnnlib": types.ModuleType("dnnlib"), "dnnlib.util": util}
    assert not set(added) & set(sys.modules)
    sys.modules.update(added)
    try:
        yield types.SimpleNamespace(reconstruct=_reconstruct_persistent_obj, EasyDict=EasyDict)
    finally:
        for name in added:
            del sys.modules[name]


class Recorded:
    """A persistent EDM object that is not a network (loss, augment pipe): class name and constructor kwargs."""

    def __init__(self, class_name, **kwargs):
        self.class_name, self.kwargs = class_name, kwargs


class Hostile:
    """Pickles as a call of ``func(*args)``, the way a malicious file would."""

    def __init__(self, func, *args):
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args


def edm_module_state(module: nn.Module, init_kwargs: dict) -> dict:
    """A module's __dict__ as EDM pickles it (torch 1.12 era: OrderedDicts), with the recorded arguments."""
    hooks = ("_backward_hooks", "_forward_hooks", "_forward_pre_hooks", "_state_dict_hooks",
             "_load_state_dict_pre_hooks", "_load_state_dict_post_hooks")
    attributes = {k: v for k, v in vars(module).items()
                  if not k.startswith("_") and isinstance(v, (bool, int, float, str, type(None)))}
    return {
        "training": module.training,
        "_parameters": collections.OrderedDict(module._parameters),
        "_buffers": collections.OrderedDict(module._buffers),
        "_non_persistent_buffers_set": set(),
        **{name: collections.OrderedDict() for name in hooks},
        "_modules": collections.OrderedDict(module._modules),
        **attributes,
        "_init_args": (),
        "_init_kwargs": init_kwargs,
    }


class EDMPickler(pickle.Pickler):
    """Writes toolkit modules and Recorded objects the way EDM's persistent classes pickle.

    The top-level network carries its train.py keyword arguments in ``_edm_init_kwargs``; submodules record
    their simple attributes, floats as numpy scalars (EDM passes e.g. ``skip_scale=np.sqrt(0.5)``).
    """

    module_src = MODULE_SRC
    rename: dict[str, str] = {}  # EDM class name -> name written instead (hostile variants)

    def reducer_override(self, obj):
        if isinstance(obj, nn.Module):
            name = EDM_CLASS_NAMES.get(type(obj).__name__, type(obj).__name__)
            if name not in PERSISTENT_CLASSES:
                return NotImplemented  # ModuleDict & co.: torch's default pickling
            init_kwargs = getattr(obj, "_edm_init_kwargs", None)
            if init_kwargs is None:
                init_kwargs = {k: np.float64(v) if isinstance(v, float) else v for k, v in vars(obj).items()
                               if not k.startswith("_") and isinstance(v, (int, float))}
            return self._persistent(name, edm_module_state(obj, init_kwargs))
        if isinstance(obj, Recorded):
            return self._persistent(obj.class_name, {**obj.kwargs, "_init_args": (), "_init_kwargs": dict(obj.kwargs)})
        return NotImplemented

    def _persistent(self, class_name, state):
        meta = dict(type="class", version=6, module_src=self.module_src,
                    class_name=self.rename.get(class_name, class_name), state=state)
        return sys.modules["torch_utils.persistence"]._reconstruct_persistent_obj, (meta,), None


def pickler_class(module_src=MODULE_SRC, rename=None) -> type[EDMPickler]:
    return type("ConfiguredEDMPickler", (EDMPickler,), {"module_src": module_src, "rename": rename or {}})


def write_pickle(path, data, protocol=pickle.DEFAULT_PROTOCOL, pickler=EDMPickler):
    with edm_globals(), open(path, "wb") as f:
        pickler(f, protocol=protocol).dump(data)
    return path


def write_training_state(path, data, pickler=EDMPickler):
    """torch.save zip as EDM's training loop writes it, with the EDM-layout pickler."""
    pickle_module = types.ModuleType("edm_layout_pickle")
    pickle_module.Pickler = pickler
    with edm_globals():
        torch.save(data, path, pickle_module=pickle_module)
    return path


def toolkit_network(fx, case):
    """The fixture's preconditioner as toolkit modules, recording EDM's train.py keyword arguments."""
    precond_cls, own_params = CASES[case]
    kwargs = dict(fx.meta["constructor_kwargs"])
    geometry = {k: kwargs.pop(k) for k in ("img_resolution", "img_channels", "label_dim", "use_fp16")}
    own = {k: kwargs.pop(k) for k in own_params}
    backbone_cls = {"SongUNet": SongUNet, "DhariwalUNet": DhariwalUNet}[kwargs.pop("model_type")]
    channels = geometry["img_channels"]
    backbone = backbone_cls(img_resolution=geometry["img_resolution"], in_channels=channels,
                            out_channels=channels * (2 if case == "iddpm" else 1), label_dim=geometry["label_dim"],
                            **kwargs)
    net = precond_cls(backbone, **geometry, **own)
    net.load_state_dict(fx.state_dict, strict=True)
    net._edm_init_kwargs = dict(fx.meta["constructor_kwargs"])
    return net.eval().requires_grad_(False)


def snapshot(net):
    return {
        "ema": net,
        "loss_fn": Recorded("EDMLoss", P_mean=-1.2, P_std=1.2, sigma_data=0.5),
        "augment_pipe": Recorded("AugmentPipe", p=0.12, xflip=1e8, yflip=1, scale=1, rotate_frac=1),
        "dataset_kwargs": dict(DATASET_KWARGS),
    }


@pytest.fixture(scope="module")
def networks():
    """Cached toolkit networks per fixture case."""
    cache = {}

    def get(load_fixture, case):
        if case not in cache:
            fx = load_fixture(f"edm_precond_{case}")
            cache[case] = (fx, toolkit_network(fx, case))
        return cache[case]

    return get


def assert_matches_fixture(net, fx):
    """D(x, sigma, labels) within README A5's tolerance, and the supported sigma range."""
    x, sigma = fx.inputs["x"], fx.inputs["sigma"]
    labels = fx.inputs["class_labels"] if net.label_dim else None
    with torch.no_grad():
        D = net(x, sigma, labels)
    expected = fx.outputs["D"]
    atol = 1e-4 * sigma.clamp(min=1).reshape(-1, 1, 1, 1)
    assert ((D - expected).abs() <= atol + 1e-4 * expected.abs()).all(), (D - expected).abs().max()
    assert net.sigma_min == pytest.approx(fx.outputs["sigma_min"], rel=1e-6)
    assert net.sigma_max == pytest.approx(fx.outputs["sigma_max"], rel=1e-6)


def assert_no_trace(directory, *expected_files):
    assert sorted(directory.iterdir()) == sorted(expected_files)
    assert "torch_utils" not in sys.modules and not any(name.startswith("_imported_module_") for name in sys.modules)


# ----------------------------------------------------------------------------------------------------------
# Reading


@pytest.mark.parametrize("case", list(CASES))
def test_snapshot_rebuilds_each_preconditioner(case, load_fixture, networks, tmp_path):
    fx, net = networks(load_fixture, case)
    path = write_pickle(tmp_path / f"network-snapshot-{case}.pkl", snapshot(net))

    data = read_edm_pickle(path)

    ema = data["ema"]
    assert type(ema) is CASES[case][0] and type(ema.model) is type(net.model)
    assert not ema.training and not any(p.requires_grad for p in ema.parameters())
    assert_matches_fixture(ema, fx)
    assert data["dataset_kwargs"] == DATASET_KWARGS and type(data["dataset_kwargs"]) is dict
    assert data["loss_fn"] == {"class_name": "EDMLoss", "init_args": [],
                               "init_kwargs": {"P_mean": -1.2, "P_std": 1.2, "sigma_data": 0.5}}
    assert data["augment_pipe"]["class_name"] == "AugmentPipe" and data["augment_pipe"]["init_kwargs"]["p"] == 0.12
    assert any("never executed" in note for note in data["notes"])
    assert_no_trace(tmp_path, path)


def test_protocol_2_and_old_numpy_module_name(load_fixture, networks, tmp_path):
    fx, net = networks(load_fixture, "iddpm")
    raw = io.BytesIO()
    with edm_globals():
        EDMPickler(raw, protocol=2).dump(snapshot(net))
    old_numpy = raw.getvalue().replace(b"cnumpy._core.multiarray\nscalar\n", b"cnumpy.core.multiarray\nscalar\n")
    for spelling in (b"cnumpy.core.multiarray\nscalar\n", b"c__builtin__\nset\n", b"c_codecs\nencode\n"):
        assert spelling in old_numpy
    path = tmp_path / "edm-protocol2.pkl"
    path.write_bytes(old_numpy)

    net_read = load_edm_network(path)

    assert type(net_read) is IDDPMPrecond and torch.equal(net_read.u, fx.state_dict["u"])
    assert_matches_fixture(net_read, fx)


def test_training_state_zip(load_fixture, networks, tmp_path):
    fx, net = networks(load_fixture, "vp")
    training = toolkit_network(fx, "vp").train().requires_grad_(True)
    optimizer = torch.optim.Adam(training.parameters(), lr=1e-3)
    for p in training.parameters():
        p.grad = torch.zeros_like(p)
    optimizer.step()  # zero gradients: fills the Adam state, leaves the weights unchanged
    path = write_training_state(tmp_path / "training-state-000010.pt",
                                {"net": training, "optimizer_state": optimizer.state_dict()})

    data = read_edm_pickle(path)

    assert not data["net"].training and not any(p.requires_grad for p in data["net"].parameters())
    assert_matches_fixture(data["net"], fx)
    state = data["optimizer_state"]
    assert len(state["state"]) == len(list(training.parameters()))
    assert torch.equal(state["state"][0]["exp_avg_sq"], torch.zeros_like(next(training.parameters())))
    assert state["param_groups"][0]["betas"] == (0.9, 0.999)
    with pytest.raises(CheckpointError, match="no 'ema' entry.*key 'net'"):
        load_edm_network(path)
    assert_matches_fixture(load_edm_network(path, key="net"), fx)
    assert inspect_edm_pickle(path)["key"] == "net"


def test_edm2_style_easydict_and_file_objects(load_fixture, networks, tmp_path):
    fx, net = networks(load_fixture, "ve")
    raw = io.BytesIO()
    with edm_globals() as edm:
        EDMPickler(raw).dump(edm.EasyDict(ema=net, dataset_kwargs=edm.EasyDict(DATASET_KWARGS)))
    assert b"dnnlib.util" in raw.getvalue()
    raw.seek(0)

    data = read_edm_pickle(raw)

    assert type(data["dataset_kwargs"]) is dict and data["dataset_kwargs"] == DATASET_KWARGS
    assert_matches_fixture(data["ema"], fx)


@pytest.mark.parametrize("case, preconditioner, architecture", [
    ("vp", "VPPrecond", "SongUNet"), ("iddpm", "iDDPMPrecond", "DhariwalUNet")])
def test_inspect_summarises_without_building(case, preconditioner, architecture, load_fixture, networks, tmp_path):
    fx, net = networks(load_fixture, case)
    path = write_pickle(tmp_path / "edm.pkl", snapshot(net))

    summary = inspect_edm_pickle(path)

    assert summary["family"] == "edm-pickle" and summary["key"] == "ema"
    assert summary["preconditioner"] == preconditioner and summary["architecture"] == architecture
    assert summary["parameters"] == sum(p.numel() for p in net.parameters())
    assert (summary["img_resolution"], summary["img_channels"], summary["label_dim"]) == (16, 3, 10)
    assert summary["sigma_min"] == pytest.approx(fx.outputs["sigma_min"], rel=1e-6)
    assert summary["sigma_max"] == pytest.approx(fx.outputs["sigma_max"], rel=1e-6)
    assert summary["dtype"] == "float32" and summary["use_fp16"] is False
    assert summary["init_kwargs"]["model_channels"] == 16
    assert summary["entries"] == ["augment_pipe", "dataset_kwargs", "ema", "loss_fn"]


# ----------------------------------------------------------------------------------------------------------
# Hostile and broken files


def writing_source(marker):
    return f"open({str(marker)!r}, 'w').write('pwned')\nimport os; os.system('touch {marker}')\n"


def test_module_source_is_never_executed(load_fixture, networks, tmp_path, no_code_execution):
    fx, net = networks(load_fixture, "edm")
    marker = tmp_path / "pwned"
    path = write_pickle(tmp_path / "edm.pkl", snapshot(net), pickler=pickler_class(module_src=writing_source(marker)))

    data = read_edm_pickle(path)

    assert_matches_fixture(data["ema"], fx)
    assert not marker.exists()
    assert_no_trace(tmp_path, path)


def test_unknown_persistent_class_is_refused(load_fixture, networks, tmp_path, no_code_execution):
    fx, net = networks(load_fixture, "edm")
    marker = tmp_path / "pwned"
    pickler = pickler_class(module_src=writing_source(marker), rename={"UNetBlock": "EvilBlock"})
    path = write_pickle(tmp_path / "edm.pkl", snapshot(net), pickler=pickler)

    with pytest.raises(CheckpointError, match=r"edm\.pkl: refused persistent class 'EvilBlock'"):
        read_edm_pickle(path)
    assert_no_trace(tmp_path, path)


@pytest.mark.parametrize("func, args", [
    (os.system, "touch {marker}"),
    (builtins.eval, "open({marker!r}, 'w')"),
    (builtins.exec, "open({marker!r}, 'w')"),
    (subprocess.Popen, ["touch", "{marker}"]),
    (os.remove, "{path}"),
])
@pytest.mark.parametrize("container", ["pickle", "training-state"])
def test_globals_off_the_allowlist_are_refused(func, args, container, load_fixture, networks, tmp_path):
    fx, net = networks(load_fixture, "ve")
    marker, path = tmp_path / "pwned", tmp_path / "edm-hostile.pkl"
    args = [a.format(marker=str(marker), path=str(path)) for a in args] if isinstance(args, list) else \
        args.format(marker=str(marker), path=str(path))
    data = snapshot(net)
    data["dataset_kwargs"] = {**DATASET_KWARGS, "path": Hostile(func, args)}
    (write_pickle if container == "pickle" else write_training_state)(path, data)

    name = f"{func.__module__}.{func.__qualname__}"  # Python 3 names, also for protocol 2 (torch.save)
    with pytest.raises(CheckpointError, match=rf"refused to load global '{name}' \(not on the allowlist"):
        read_edm_pickle(path)
    with pytest.raises(CheckpointError, match=rf"refused to load global '{name}'"):
        inspect_edm_pickle(path)
    assert_no_trace(tmp_path, path)


@pytest.mark.parametrize("mutation, message", [
    (lambda b: b[: len(b) // 2], "not a readable EDM network pickle"),
    (lambda b: b.replace(b"\x4b\x06", b"\x4b\x07", 1), "persistent object of version 7"),
    (lambda b: b"not a pickle at all", "not a readable EDM network pickle"),
])
def test_broken_files_raise_one_line_errors(mutation, message, load_fixture, networks, tmp_path):
    fx, net = networks(load_fixture, "ve")
    raw = io.BytesIO()
    with edm_globals():
        EDMPickler(raw, protocol=4).dump(snapshot(net))
    path = tmp_path / "edm-broken.pkl"
    path.write_bytes(mutation(raw.getvalue()))

    with pytest.raises(CheckpointError, match=message) as info:
        read_edm_pickle(path)
    assert "\n" not in str(info.value) and str(info.value).startswith(str(path))


def _cycle():
    items = []
    items.append(items)
    return items


@pytest.mark.parametrize("payload, message", [
    (_cycle, "self-referencing data structure"),
    (lambda: Hostile(torch._utils._rebuild_tensor_v2, torch.zeros(4).storage(), 0, (100,), (1,), False,
                     collections.OrderedDict()), "reaches past the end of its storage"),
    (lambda: np.array([None], dtype=object)[0:1].dtype, "refused numpy dtype 'O8'"),
])
def test_allowlisted_globals_check_their_arguments(payload, message, load_fixture, networks, tmp_path):
    fx, net = networks(load_fixture, "ve")
    data = snapshot(net)
    data["dataset_kwargs"] = {**DATASET_KWARGS, "extra": payload()}
    path = write_pickle(tmp_path / "edm.pkl", data)

    with pytest.raises(CheckpointError, match=message):
        read_edm_pickle(path)


def test_recorded_arguments_must_match_the_weights(load_fixture, networks, tmp_path):
    fx, net = networks(load_fixture, "vp")
    kwargs = net._edm_init_kwargs
    net._edm_init_kwargs = {**kwargs, "model_channels": 32}
    try:
        path = write_pickle(tmp_path / "edm.pkl", snapshot(net))
    finally:
        net._edm_init_kwargs = kwargs

    with pytest.raises(CheckpointError, match=r"'ema': the pickled weights do not match VPPrecond\(SongUNet\)"):
        read_edm_pickle(path)


def test_missing_file_and_non_network_entries(tmp_path):
    with pytest.raises(CheckpointError, match="file not found"):
        read_edm_pickle(tmp_path / "missing.pkl")
    path = write_pickle(tmp_path / "data.pkl", {"dataset_kwargs": dict(DATASET_KWARGS)})
    with pytest.raises(CheckpointError, match="no EDM network in the file"):
        read_edm_pickle(path)
    with pytest.raises(CheckpointError, match="no 'ema' or 'net' entry"):
        inspect_edm_pickle(path)
