"""FID detector files as file formats of kind "detector", and hostile detector files (the file side of issue 10).

Each detector form is a registered format: ``edm inspect`` describes it, ``load_denoiser`` (``edm generate``,
``edm convert``) refuses it by name, and ``load_detector`` refuses a denoiser's file. Every form is read with
memory bounded by the file: small crafted files that, read naively, ask for gigabytes (tensors with zero or
overlapping strides, many views of one storage, storages that claim more elements than the file holds,
compressed zip records, zip records sharing bytes) are refused by ``load_detector``, ``edm inspect`` and
``edm fid ref --detector`` under :func:`bounded` (new resident memory sampled, address space capped, an alarm),
with one ``Error:`` line naming the problem and nothing written.

The files are written here in each form's layout (tests/test_metrics_detector_files.py writes the valid ones with
the originals' own writers): NVIDIA's bare pickle of ``torch_utils.persistence`` objects, TorchScript archives
(``<archive>/data.pkl`` of ``__torch__`` objects, ``data/<key>`` records, ``constants.pkl`` and a deflated
``code/`` record, as ``torch.jit.save`` writes them) and pytorch-fid's state_dict (torch zip and legacy stream).
"""

from __future__ import annotations

import collections
import contextlib
import io
import pickle
import sys
import types
import zipfile
from pathlib import Path

import pytest
import torch
from PIL import Image
from test_edm_pickle import Hostile, edm_globals, snapshot, toolkit_network, write_pickle
from test_metrics_detector import random_state_dict
from test_metrics_detector_files import pytorch_fid_state, write_nvidia_pickle
from test_formats import cli, one_error
from test_security_files import CraftingPickler, Raw, StorageRef, View, bounded, write_zero_record

from edm_toolkit.adapters.edm_pickle import read_restricted
from edm_toolkit.errors import CheckpointError
from edm_toolkit.io.formats import FORMATS, format_kind
from edm_toolkit.loading import convert_file, identify, load_denoiser
from edm_toolkit.metrics.detector_files import STATE_DICT_ALLOWLIST, detector_from_state_dict, load_detector

HUGE = (2**14, 2**12, 3, 3)  # 604M values: 2.4 GB of float32 from one (or 19,000) stored values
SHARED_STORAGE, SHARED_VIEWS = 2**20, 300  # 300 views of one 4 MB storage: 1.2 GB once copied apart
CLAIMED = 10**9  # elements a storage claims while the file holds 4 bytes of it
LEGACY_MAGIC, LEGACY_PROTOCOL = 0x1950A86A20F9469CFC6C, 1001
SYS_INFO = {"protocol_version": LEGACY_PROTOCOL, "little_endian": sys.byteorder == "little",
            "type_sizes": {"short": 2, "int": 4, "long": 4}}




# ----------------------------------------------------------------------------------------------------------
# Writing the forms


class Script:
    """A TorchScript module object as data, its attributes (submodules, tensors, numbers) in its ``__dict__``: it
    pickles as TorchScript's objects do, NEWOBJ of its class ``__torch__.inceptionv3.Module``, then BUILD."""

    def __init__(self, **attributes):
        self.__dict__.update(attributes)

    @classmethod
    def tree(cls, tensors: dict) -> Script:
        """The module tree of a state_dict's dotted names."""
        root = cls()
        for name, tensor in tensors.items():
            node, *path, leaf = [root, *name.split(".")]
            for part in path:
                node = node.__dict__.setdefault(part, cls(training=False))
            node.__dict__[leaf] = tensor
        return root


Script.__module__, Script.__qualname__ = "__torch__.inceptionv3", "Module"


@contextlib.contextmanager
def torchscript_classes():
    """The stand-in module ``__torch__.inceptionv3`` that names :class:`Script`, only while a file is written."""
    module = types.ModuleType(Script.__module__)
    module.Module = Script
    added = {"__torch__": types.ModuleType("__torch__"), module.__name__: module}
    assert not set(added) & set(sys.modules)
    sys.modules.update(added)
    try:
        yield
    finally:
        for name in added:
            del sys.modules[name]


class ArchivePickler(CraftingPickler):
    """data.pkl of a torch zip: storages as records ('storage', type, key, 'cpu', numel), as torch.save and
    torch.jit.save write them; plus the crafting pickler's views, EDM persistent records and hand-made storage
    references."""

    def __init__(self, file, records: dict):
        super().__init__(file, protocol=2)
        self.records, self.keys = records, {}

    def persistent_id(self, obj):
        if isinstance(obj, torch.storage.TypedStorage):
            key = self.keys.setdefault(obj._cdata, str(len(self.keys)))
            raw = torch.empty(0, dtype=torch.uint8).set_(obj._untyped_storage)
            self.records.setdefault(key, raw.numpy().tobytes())
            return "storage", getattr(torch, obj.pickle_storage_type()), key, "cpu", obj.size()
        return super().persistent_id(obj)


def write_archive(path: Path, obj, script: bool = False, records: dict | None = None, zeros: dict | None = None,
                  compress: bool = False) -> Path:
    """A torch zip in torch.save's layout, or with ``script`` in torch.jit.save's (``constants.pkl``, and a
    ``code/`` record deflated as torch.jit.save deflates it). ``records``: extra storage records (key -> bytes);
    ``zeros``: records of that many float32 zeros, streamed, and deflated with ``compress`` (then a few hundred
    MB fit in a file of a few hundred KB)."""
    records = dict(records or {})
    data = io.BytesIO()
    with edm_globals(), torchscript_classes():
        ArchivePickler(data, records).dump(obj)
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("archive/data.pkl", data.getvalue())
        archive.writestr("archive/byteorder", sys.byteorder)
        if script:
            archive.writestr("archive/constants.pkl", pickle.dumps((), protocol=2))
            archive.writestr("archive/code/__torch__/inceptionv3.py", "def forward(self, x):\n    return x\n" * 50,
                             compress_type=zipfile.ZIP_DEFLATED)
        for key, raw in records.items():
            archive.writestr(f"archive/data/{key}", raw)
        for key, numel in (zeros or {}).items():
            write_zero_record(archive, f"archive/data/{key}", numel, compress)
        archive.writestr("archive/version", "3\n")
    return path


class LegacyPickler(CraftingPickler):
    """The pickle of a legacy torch.save stream: storages as ('storage', type, key, 'cpu', numel, None)."""

    def __init__(self, file, records: dict):
        super().__init__(file, protocol=2)
        self.records, self.keys = records, {}

    def persistent_id(self, obj):
        if isinstance(obj, StorageRef):
            self.records.setdefault(obj.key, (obj.numel, bytes(4)))  # declares numel, holds one float
            return "storage", torch.FloatStorage, obj.key, "cpu", obj.numel, None
        if isinstance(obj, torch.storage.TypedStorage):
            key = self.keys.setdefault(obj._cdata, str(len(self.keys)))
            raw = torch.empty(0, dtype=torch.uint8).set_(obj._untyped_storage).numpy().tobytes()
            self.records.setdefault(key, (obj.size(), raw))
            return "storage", getattr(torch, obj.pickle_storage_type()), key, "cpu", obj.size(), None
        return None


def write_legacy(path: Path, obj) -> Path:
    """A legacy (torch < 1.6) torch.save stream: magic number, protocol, system info, the pickle, its storage
    keys, then each storage as an 8-byte element count and its bytes."""
    records: dict = {}
    with open(path, "wb") as stream:
        for value in (LEGACY_MAGIC, LEGACY_PROTOCOL, SYS_INFO):
            pickle.dump(value, stream, protocol=2)
        with edm_globals():
            LegacyPickler(stream, records).dump(obj)
        pickle.dump(sorted(records), stream, protocol=2)
        for key in sorted(records):
            numel, raw = records[key]
            stream.write(numel.to_bytes(8, "little") + raw)
    return path


def write_nvidia_bomb(path: Path, tensors: dict) -> Path:
    """NVIDIA's form: a bare pickle whose top level is a persistent InceptionV3 holding ``tensors``."""
    state = {"_parameters": collections.OrderedDict(tensors), "_buffers": {}, "_modules": {}, "_init_args": (),
             "_init_kwargs": {}}
    with edm_globals(), open(path, "wb") as stream:
        CraftingPickler(stream, protocol=4).dump(Raw("InceptionV3", state))
    return path


def legacy_storage_bytes(numel: int, held: bytes) -> bytes:
    """torch.storage._load_from_bytes' argument (a legacy torch.save of one storage) declaring ``numel`` float32
    elements but holding ``held``: how a storage is written inside a bare pickle."""
    stream = io.BytesIO()
    for value in (LEGACY_MAGIC, LEGACY_PROTOCOL, SYS_INFO):
        pickle.dump(value, stream, protocol=2)
    reference = StorageRef("0", numel)

    class Reference(pickle.Pickler):
        def persistent_id(self, obj):
            return ("storage", torch.FloatStorage, "0", "cpu", numel, None) if obj is reference else None

    Reference(stream, protocol=2).dump(reference)
    pickle.dump(["0"], stream, protocol=2)
    stream.write(numel.to_bytes(8, "little") + held)
    return stream.getvalue()


def share_record_bytes(path: Path) -> Path:
    """Points every central-directory entry of a data record at the largest record's bytes: the records then
    claim many times the file's size."""
    with zipfile.ZipFile(path) as archive:
        infos = archive.infolist()
    largest = max((i for i in infos if "/data/" in i.filename), key=lambda i: i.file_size)
    data = bytearray(path.read_bytes())
    directory, position = data.rfind(b"PK\x05\x06"), data.find(b"PK\x01\x02")
    while 0 <= position < directory:
        name_length = int.from_bytes(data[position + 28:position + 30], "little")
        extra = sum(int.from_bytes(data[position + at:position + at + 2], "little") for at in (30, 32))
        if "/data/" in bytes(data[position + 46:position + 46 + name_length]).decode():
            for field, value in ((16, largest.CRC), (20, largest.compress_size), (24, largest.file_size),
                                 (42, largest.header_offset)):
                data[position + field:position + field + 4] = value.to_bytes(4, "little")
        position += 46 + name_length + extra
    path.write_bytes(data)
    return path


# ----------------------------------------------------------------------------------------------------------
# The bombs, in each form


def strided(kind: str) -> dict:
    return {"a": View.of(HUGE, kind)}


def shared() -> dict:
    """Views of one storage, each a different plain view (a tensor stored under two names is no bomb)."""
    storage = torch.zeros(SHARED_STORAGE).storage()
    return {f"a{i}": View(storage, (SHARED_STORAGE - i,), (1,), offset=i) for i in range(SHARED_VIEWS)}


PYTORCH_FID_NAME = "Conv2d_1a_3x3.conv.weight"  # what the pytorch-fid form is recognised by


def named(tensors: dict, first: str) -> dict:
    """The tensors under names of a form: the recognised name first, then the others."""
    values = list(tensors.values())
    return {first: values[0], **{f"{first}.{i}": value for i, value in enumerate(values[1:])}}


def nvidia(path: Path, bomb: str) -> Path:
    if bomb in ("zero", "overlapping"):
        return write_nvidia_bomb(path, strided(bomb))
    if bomb == "shared":
        return write_nvidia_bomb(path, shared())
    storage = Hostile(torch.storage._load_from_bytes, legacy_storage_bytes(CLAIMED, bytes(4)))
    return write_nvidia_bomb(path, {"a": Hostile(torch._utils._rebuild_tensor_v2, storage, 0, (CLAIMED,), (1,),
                                                 False, collections.OrderedDict())})


def zip_bomb(path: Path, bomb: str, wrap, script: bool = False) -> Path:
    """A torch zip bomb; ``wrap(tensors)`` is the object the form stores (a script tree with ``script``, or a
    state_dict)."""
    if bomb in ("zero", "overlapping"):
        return write_archive(path, wrap(strided(bomb)), script)
    if bomb == "shared":
        return write_archive(path, wrap(shared()), script)
    if bomb == "claim":
        return write_archive(path, wrap({"a": View(StorageRef("0", CLAIMED), (CLAIMED,), (1,))}), script,
                             records={"0": bytes(4)})
    if bomb == "compressed":
        return write_archive(path, wrap({"a": View(StorageRef("0", 10**8), (10**8,), (1,))}), script,
                             zeros={"0": 10**8}, compress=True)
    # records sharing bytes: 100 storages of 1M float32 each, 4 MB stored once
    tensors = {f"a{i}": View(StorageRef(str(i), 2**20), (2**20,), (1,)) for i in range(100)}
    path = write_archive(path, wrap(tensors), script, records={str(i): bytes(4) for i in range(1, 100)},
                         zeros={"0": 2**20})
    return share_record_bytes(path)


def torchscript(path: Path, bomb: str) -> Path:
    def tree(tensors):  # recognised by its last block's name, as NVIDIA's
        return Script(training=False, layers=Script(training=False, mixed_10=Script(training=False, **tensors)))

    return zip_bomb(path, bomb, tree, script=True)


def pytorch_fid_zip(path: Path, bomb: str) -> Path:
    return zip_bomb(path, bomb, lambda tensors: named(tensors, PYTORCH_FID_NAME))


def state_dict_zip(path: Path, bomb: str) -> Path:
    return zip_bomb(path, bomb, lambda tensors: named(tensors, "layers.conv.weight"))


def pytorch_fid_legacy(path: Path, bomb: str) -> Path:
    if bomb in ("zero", "overlapping"):
        return write_legacy(path, named(strided(bomb), PYTORCH_FID_NAME))
    if bomb == "shared":
        return write_legacy(path, named(shared(), PYTORCH_FID_NAME))
    return write_legacy(path, {PYTORCH_FID_NAME: View(StorageRef("0", CLAIMED), (CLAIMED,), (1,))})


MESSAGES = {"zero": "zero stride", "overlapping": "overlapping stride", "shared": "tensors that share stored values",
            "compressed": "is compressed", "records": "records claim"}
CASES = [
    *[("nvidia-pickle", nvidia, bomb, MESSAGES.get(bomb, "4 bytes for 1000000000 elements"))
      for bomb in ("zero", "overlapping", "shared", "claim")],
    *[(form, write, bomb, MESSAGES.get(bomb, "tensor storage has 4 bytes, expected 1000000000 x 4"))
      for form, write in (("torchscript", torchscript), ("pytorch-fid-zip", pytorch_fid_zip))
      for bomb in ("zero", "overlapping", "shared", "claim", "compressed", "records")],
    *[("state-dict-zip", state_dict_zip, bomb, MESSAGES[bomb]) for bomb in ("zero", "compressed")],
    *[("pytorch-fid-legacy", pytorch_fid_legacy, bomb, MESSAGES.get(bomb, "storages declare more bytes than the file"))
      for bomb in ("zero", "overlapping", "shared", "claim")],
]


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    folder = tmp_path_factory.mktemp("images")
    for index in range(2):
        Image.new("RGB", (8, 8), (index * 100, 50, 200)).save(folder / f"{index}.png")
    return folder


@pytest.mark.parametrize("form, write, bomb, message", CASES, ids=[f"{c[0]}-{c[2]}" for c in CASES])
def test_hostile_detector_files_are_refused_within_bounds(form, write, bomb, message, images, tmp_path):
    path = write(tmp_path / "detector.bin", bomb)
    assert path.stat().st_size < 5_000_000
    with bounded():
        with pytest.raises(CheckpointError, match=message) as info:
            load_detector(path)
    assert str(path) in str(info.value) and "\n" not in str(info.value)
    out = tmp_path / "ref.npz"
    for args in (["inspect", path], ["fid", "ref", "--data", images, "--dest", out, "--detector", path,
                                     "--device", "cpu"]):
        with bounded():
            code, stderr, _ = cli(*args)
        assert code == 1 and message in one_error(stderr), (args[0], stderr)
    assert not out.exists()


def test_legacy_storages_are_read_as_declared_and_no_further(tmp_path):
    """A legacy file whose storage list or element counts disagree with its pickle is refused, the storages
    never allocated beyond the file's size (each declared size is checked against it first)."""
    tensor = torch.arange(6.0)
    path = write_legacy(tmp_path / "ok.pth", {PYTORCH_FID_NAME: tensor})
    assert torch.equal(read_restricted(path, STATE_DICT_ALLOWLIST).top[PYTORCH_FID_NAME], tensor)
    data = path.read_bytes()
    count = (6).to_bytes(8, "little")
    assert data.count(count) == 1
    for name, content, message in [
        ("short.pth", data[:-4], "storage '0' ends early"),
        ("count.pth", data.replace(count, (5).to_bytes(8, "little")), "holds 5 elements, its tensors declare 6"),
        ("keys.pth", data.replace(pickle.dumps(["0"], protocol=2), pickle.dumps(["1"], protocol=2)),
         "its storage list does not match its tensors"),
    ]:
        (tmp_path / name).write_bytes(content)
        with pytest.raises(CheckpointError, match=message):
            load_detector(tmp_path / name)


# ----------------------------------------------------------------------------------------------------------
# The detector forms in the format registry


@pytest.fixture(scope="module")
def detector_files(tmp_path_factory):
    """One valid file of each form with the same random weights in float16 (half the bytes; loaded as float32):
    NVIDIA's pickle, a TorchScript archive (the NVIDIA/clean-fid root and fid-helper's WrapNet.net without
    output layer), pytorch-fid's legacy state_dict and a state_dict in the toolkit's names (a torch zip)."""
    folder = tmp_path_factory.mktemp("forms")
    weights = {name: tensor.half() for name, tensor in random_state_dict(seed=21).items()}
    features = {name: tensor for name, tensor in weights.items() if name.startswith("layers.")}
    network = detector_from_state_dict(weights).half()
    files = {
        "nvidia-pickle": write_nvidia_pickle(folder / "inception-2015-12-05.pkl", network),
        "torchscript": write_archive(folder / "inception-2015-12-05.pt", Script.tree(weights), script=True),
        "torchscript-features": write_archive(
            folder / "default_1.pt", Script(training=False, net=Script.tree(features)), script=True),
        "pytorch-fid-legacy": folder / "pt_inception-2015-12-05-6726825d.pth",
        "state-dict": folder / "inception.pt",
    }
    torch.save(pytorch_fid_state(weights), files["pytorch-fid-legacy"], _use_new_zipfile_serialization=False)
    torch.save(weights, files["state-dict"])
    return files, weights


FORMS = {  # file -> (format, form, output layer)
    "nvidia-pickle": ("detector-nvidia-pickle", "nvidia-pickle", True),
    "torchscript": ("detector-torchscript", "torchscript", True),
    "torchscript-features": ("detector-torchscript", "torchscript", False),
    "pytorch-fid-legacy": ("detector-state-dict", "pytorch-fid", True),
    "state-dict": ("detector-state-dict", "state-dict", True),
}


def test_detector_formats_are_registered_with_their_kind():
    assert {name: format_kind(FORMATS[name]) for name in FORMATS if name.startswith("detector-")} == {
        "detector-nvidia-pickle": "detector", "detector-torchscript": "detector", "detector-state-dict": "detector"}
    assert {format_kind(FORMATS[name]) for name in ("edm-toolkit", "edm-pickle", "openai", "score_sde")} == {
        "denoiser"}


@pytest.mark.parametrize("name", list(FORMS))
def test_edm_inspect_describes_each_detector_form(name, detector_files, tmp_path, monkeypatch):
    files, weights = detector_files
    path = files[name]
    family, form, with_logits = FORMS[name]
    monkeypatch.setattr(torch.jit, "load", lambda *args, **kwargs: pytest.fail("torch.jit.load was called"))
    assert identify(path) == family
    code, stderr, stdout = cli("inspect", path)
    assert code == 0, stderr
    lines = dict(line.split(None, 1) for line in stdout.strip().splitlines())
    stored = sum(t.numel() for n, t in weights.items() if with_logits or n.startswith("layers."))
    assert stored == 21_802_784 + (2_065_392 if with_logits else 0)  # FACTS.md s. 10
    assert lines["family"] == family and lines["kind"] == "detector" and lines["form"] == form
    assert lines["parameters"] == f"{stored:,}" and lines["dtype"] == "float16"
    assert ("logits 1008" in lines["outputs"]) is with_logits and "pool 2048, spatial 2023" in lines["outputs"]
    assert "--detector" in lines["use"]

    detector = load_detector(path)  # the same file loads as the detector, in float32
    reference = {n: t.float() for n, t in weights.items() if with_logits or n.startswith("layers.")}
    assert detector.has_logits is with_logits
    for tensor_name, tensor in detector.state_dict().items():
        assert tensor.dtype == torch.float32 and torch.equal(tensor, reference[tensor_name]), tensor_name


@pytest.mark.parametrize("name", ["nvidia-pickle", "torchscript", "pytorch-fid-legacy", "state-dict"])
def test_denoiser_readers_refuse_a_detector_by_name(name, detector_files, tmp_path):
    path = detector_files[0][name]
    family = FORMS[name][0]
    with bounded():  # recognised, never built
        with pytest.raises(CheckpointError, match=rf"holds an FID Inception detector \({family} format\), not a "
                                                  r"denoiser; use it as the FID detector: edm fid"):
            load_denoiser(path)
    with pytest.raises(CheckpointError, match="not a denoiser"):
        convert_file(path, tmp_path / "converted.pt")
    code, stderr, _ = cli("generate", "--network", path, "--outdir", tmp_path / "out", "--seeds", "0", "--steps", "2")
    assert code == 1 and "holds an FID Inception detector" in one_error(stderr) and str(path) in one_error(stderr)
    assert not (tmp_path / "converted.pt").exists() and not (tmp_path / "out").exists()


def test_load_detector_refuses_a_denoiser_by_name(load_fixture, tmp_path):
    edm_file = write_pickle(tmp_path / "network-snapshot.pkl", snapshot(toolkit_network(load_fixture("edm_precond_ve"),
                                                                                        "ve")))
    adm_file = tmp_path / "model.pt"
    torch.save(dict(load_fixture("gd_unet_legacy").state_dict), adm_file)
    for path, family in ((edm_file, "edm-pickle"), (adm_file, "openai")):
        with pytest.raises(CheckpointError, match=rf"{path.name} holds a denoiser \({family} format\), not an FID "
                                                  "Inception detector; give the FID detector instead"):
            load_detector(path)


def test_other_torchscript_archives_are_neither_denoisers_nor_detectors(tmp_path):
    """A TorchScript archive without the Inception's blocks: no format claims it, no reader runs its code."""
    path = write_archive(tmp_path / "unet.pt", Script(training=False, conv=Script(weight=torch.zeros(2, 2))),
                         script=True)
    with pytest.raises(CheckpointError, match="is a TorchScript archive .* reads only as an FID detector file"):
        load_denoiser(path)
    with pytest.raises(CheckpointError, match="a TorchScript module without the Inception 'layers'"):
        load_detector(path)
