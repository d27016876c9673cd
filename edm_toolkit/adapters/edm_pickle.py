"""Safe reading of NVlabs/edm network pickles, without executing any code from the file.

EDM writes ``edm-*.pkl``, ``baseline-*.pkl`` and ``network-snapshot-*.pkl`` with ``pickle.dump`` of
``{'ema': <preconditioner>, 'loss_fn', 'augment_pipe' (or None), 'dataset_kwargs'}`` and
``training-state-*.pt`` with ``torch.save`` of ``{'net': <preconditioner>, 'optimizer_state'}``. Every
network class is a ``torch_utils.persistence`` class: it pickles as a call
``_reconstruct_persistent_obj(meta)``, ``meta = {'type': 'class', 'version': 6, 'module_src': <source text>,
'class_name', 'state': obj.__dict__}``, and EDM's own loader *executes* ``module_src``.

This reader never does. It unpickles with an explicit allowlist of globals, each mapped to a handler of its
own that only builds data: persistent objects become :class:`PersistentObject` records (their source text is
only hashed), tensors are rebuilt from their storages (each checked to be a plain view,
:func:`~edm_toolkit.io.tensorfile.check_view`), numpy scalars become Python numbers. Any other global
(``os.system``, ``builtins.eval``, ...) and any unknown persistent class name raises
:class:`~edm_toolkit.errors.CheckpointError`. The networks are then built from the toolkit's own classes
(:mod:`edm_toolkit.precond`, ``SongUNet``, ``DhariwalUNet``) with the constructor arguments that EDM records
(``_init_args`` / ``_init_kwargs``), checked first on the meta device against the tensors in the file
(:func:`~edm_toolkit.io.formats.verify`), and all tensors are loaded by name with ``strict=True``.

An embedded source that is not one of NVlabs/edm's released module files (known by their SHA-256) draws a
:class:`~edm_toolkit.errors.CheckpointWarning`: EDM's own loader would run that code, which may compute
something else than the toolkit's implementation that is used here.

Other readers of files in this style (NVIDIA's FID Inception pickle, TorchScript archives and state_dicts read as
data, :mod:`edm_toolkit.metrics.detector_files`) use the same unpickler through a small public API:
:class:`Allowlist` (which persistent classes, torch modules and further globals a file may name),
:func:`read_restricted` (a plain pickle, a torch zip or a legacy torch file, read with bounded memory),
:class:`PersistentObject` / :class:`ModuleRecord` (what the unpickler builds), :func:`module_tensors` (the
state_dict of a pickled module tree) and :func:`persistent_top_class` (a sniffer's look at a bare pickle).
"""

from __future__ import annotations

import _compat_pickle
import collections
import contextlib
import dataclasses
import hashlib
import io
import os
import pickle
import pickletools
import re
import sys
import warnings
import zipfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import IO, Any, NamedTuple, Union

import torch
from torch import nn

from ..errors import CheckpointError
from ..io.formats import (
    FileSource, LoadOptions, check_arguments, check_geometry, dtype_summary, materialize, register_format, verify, warn,
)
from ..networks.dhariwal_unet import DhariwalUNet
from ..networks.song_unet import SongUNet
from ..precond import EDMPrecond, IDDPMPrecond, Preconditioner, VEPrecond, VPPrecond
from ..io.tensorfile import check_tensors, check_view, check_zip_records, sniff_container

__all__ = ["EDM_ALLOWLIST", "EDM_PICKLE", "Allowlist", "ModuleRecord", "PersistentObject", "Unpickled",
           "inspect_edm_pickle", "load_edm_network", "module_tensors", "persistent_top_class", "read_edm_pickle",
           "read_restricted"]

FAMILY = "edm-pickle"
PERSISTENCE_VERSION = 6  # torch_utils.persistence._version of NVlabs/edm
# SHA-256 of the module sources NVlabs/edm's pickles embed (inspect.getsource of the module): training/networks.py
# at the initial release (0a2ff34, 2022-10-31) and after its one change (b2a26c9, 2022-11-21, unchanged through
# 008a4e5), training/loss.py and training/augment.py (unchanged since 0a2ff34).
OFFICIAL_SOURCES = {
    "2294828d5f59f5fd008f7141e6b8af2095918f2ce019f280a933e4779b5c3cef": "training/networks.py@0a2ff34",
    "5db27dcd96674b95c72d5e6491b879cdc35e24039ada3411b4b46a28ed1fe284": "training/networks.py@b2a26c9",
    "b26f0937bc72b18cc5f9869c86035ca9b872138cdfae7994237e9733951e4415": "training/loss.py@0a2ff34",
    "fd411af7c2d74489ce11a245293047369fc044d00a9aeed1c0bd46b322c8a8b5": "training/augment.py@0a2ff34",
}

PathOrFile = Union[str, os.PathLike, IO[bytes]]


class _PrecondSpec(NamedTuple):
    """How EDM's preconditioner class maps onto the toolkit's."""

    cls: type[Preconditioner]
    own_params: tuple[str, ...]  # EDM's parameters between use_fp16 and model_type, in order
    default_model: str  # EDM's default model_type
    out_channel_factor: int  # out_channels = img_channels * factor (learned variance doubles it)


PRECONDITIONERS: dict[str, _PrecondSpec] = {
    "VPPrecond": _PrecondSpec(VPPrecond, ("beta_d", "beta_min", "M", "epsilon_t"), "SongUNet", 1),
    "VEPrecond": _PrecondSpec(VEPrecond, ("sigma_min", "sigma_max"), "SongUNet", 1),
    "iDDPMPrecond": _PrecondSpec(IDDPMPrecond, ("C_1", "C_2", "M"), "DhariwalUNet", 2),
    "EDMPrecond": _PrecondSpec(EDMPrecond, ("sigma_min", "sigma_max", "sigma_data"), "DhariwalUNet", 1),
}
BACKBONES: dict[str, type[nn.Module]] = {"SongUNet": SongUNet, "DhariwalUNet": DhariwalUNet}
_LAYERS = frozenset({"Linear", "Conv2d", "GroupNorm", "UNetBlock", "PositionalEmbedding", "FourierEmbedding"})
# Persistent classes accepted; the network classes are rebuilt, the others are kept as data records.
NETWORK_CLASSES = frozenset(PRECONDITIONERS) | frozenset(BACKBONES) | _LAYERS
DATA_CLASSES = frozenset({"VPLoss", "VELoss", "EDMLoss", "AugmentPipe"})
_GEOMETRY = ("img_resolution", "img_channels", "label_dim", "use_fp16")
# What malformed pickle data raises inside the unpickler and the handlers (truncation, wrong argument types
# or counts, bad memo references, nesting); anything else is a bug, not a malformed file.
_MALFORMED = (pickle.UnpicklingError, EOFError, ValueError, TypeError, KeyError, IndexError, OverflowError,
              RecursionError, RuntimeError, zipfile.BadZipFile)


# ----------------------------------------------------------------------------------------------------------
# Records built by the unpickler (data only, no behaviour taken from the file)


class PersistentObject:
    """An EDM persistent object as data: its class name and pickled ``__dict__`` (``state``)."""

    def __init__(self, class_name: str, state: dict):
        self.class_name = class_name
        self.state = state

    def raw_arguments(self) -> tuple[list | tuple, dict]:
        """The recorded ``(_init_args, _init_kwargs)`` as unpickled, checked for their container types."""
        args, kwargs = self.state.get("_init_args"), self.state.get("_init_kwargs")
        if args is None or kwargs is None:
            raise CheckpointError(f"{self.class_name} does not record its constructor arguments")
        if not isinstance(args, (list, tuple)) or not isinstance(kwargs, dict):
            raise CheckpointError(f"{self.class_name} has malformed constructor arguments")
        if not all(isinstance(key, str) for key in kwargs):
            raise CheckpointError(f"{self.class_name} has a non-string constructor keyword")
        return args, kwargs

    def init_arguments(self) -> tuple[list, dict]:
        """The recorded constructor arguments, as plain data."""
        args, kwargs = self.raw_arguments()
        return _plain(list(args)), _plain(dict(kwargs))

    def __setstate__(self, state):
        raise CheckpointError(f"unexpected state for persistent {self.class_name} (EDM passes it in meta)")

    def __repr__(self) -> str:
        return f"PersistentObject({self.class_name!r})"


class ModuleRecord(PersistentObject):
    """A module pickled by NEWOBJ + BUILD as data: a plain ``torch.nn`` module (ModuleDict, Sequential,
    MaxPool2d, ...; its ``__dict__``) or a TorchScript object (its attributes), in ``state``."""

    def __new__(cls, *args):  # NEWOBJ calls only __new__, with the () that modules pickle with
        if args:
            raise CheckpointError("a module record built with arguments (modules are pickled without any)")
        record = super().__new__(cls)
        PersistentObject.__init__(record, "torch.nn module", {})
        return record

    def __init__(self, *args):
        pass

    def __setstate__(self, state):
        if not isinstance(state, dict) or not all(isinstance(key, str) for key in state):
            raise CheckpointError("a torch.nn module has a malformed state")
        self.state = state


class _EasyDict(dict):
    """dnnlib.util.EasyDict (a dict with attribute access) as a plain dict."""


class _StorageType:
    """torch.<Name>Storage as named in torch.save's persistent storage ids: only its dtype."""

    def __init__(self, dtype: torch.dtype):
        self.dtype = dtype


class _NumpyDtype:
    """numpy.dtype(spec, align, copy) + BUILD(state) for plain numeric and bool dtypes only."""

    _SPEC = re.compile(r"[biufc]\d{1,2}")

    def __init__(self, spec, align=False, copy=False):
        if not (isinstance(spec, str) and self._SPEC.fullmatch(spec)):
            raise CheckpointError(f"refused numpy dtype {spec!r} (only numeric and bool scalars are read)")
        self.spec, self.byteorder = spec, "="

    def __setstate__(self, state):
        if not (isinstance(state, tuple) and len(state) > 1 and state[1] in ("<", ">", "|", "=")):
            raise CheckpointError("malformed numpy dtype state")
        self.byteorder = state[1]

    def resolve(self):
        import numpy as np

        dtype = np.dtype(self.spec)
        return dtype.newbyteorder(self.byteorder) if self.byteorder in "<>" else dtype


# ----------------------------------------------------------------------------------------------------------
# Handlers of the allowlisted globals


def _numpy_scalar(dtype, data):
    """numpy.core.multiarray.scalar(dtype, bytes) as the equivalent Python number."""
    import numpy as np

    if not isinstance(dtype, _NumpyDtype) or not isinstance(data, bytes):
        raise CheckpointError("malformed numpy scalar")
    resolved = dtype.resolve()
    if len(data) != resolved.itemsize:
        raise CheckpointError("malformed numpy scalar (wrong byte count)")
    return np.frombuffer(data, dtype=resolved)[0].item()


def _storage_from_legacy_bytes(data):
    """torch.storage._load_from_bytes(data): a legacy ``torch.save`` of one storage, read restrictedly.

    The stream is torch's magic number, protocol version and system info, the storage's persistent id
    ``('storage', <type>, key, location, numel, None)``, the key list, then the element count (8 bytes) and the
    raw bytes. The count is checked against the bytes present before any memory is allocated (torch's own
    reader allocates what the file declares first).
    """
    if not isinstance(data, (bytes, bytearray)):
        raise CheckpointError("malformed tensor storage (not bytes)")
    stream = io.BytesIO(data)
    _legacy_header(stream, "malformed tensor storage (not a torch storage record)")
    reference = _LegacyUnpickler(stream).load()
    keys = _LegacyUnpickler(stream).load()
    storage_type, key, numel = reference
    if keys != [key]:
        raise CheckpointError("malformed tensor storage (one storage per record expected)")
    itemsize = torch.empty((), dtype=storage_type.dtype).element_size()
    count = int.from_bytes(stream.read(8), "little")
    raw = stream.read()
    if count != numel or len(raw) != numel * itemsize:
        raise CheckpointError(f"malformed tensor storage ({len(raw)} bytes for {numel} elements of {itemsize} bytes)")
    return _storage_from_record(raw, storage_type.dtype, numel)


_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C


def _legacy_header(stream: IO[bytes], malformed: str) -> None:
    """The three pickles that start a legacy torch.save stream: magic number, protocol version, system info."""
    magic, protocol, system = (_LegacyUnpickler(stream).load() for _ in range(3))
    if magic != _LEGACY_MAGIC or protocol != 1001 or not isinstance(system, dict):
        raise CheckpointError(malformed)
    if system.get("little_endian") is not (sys.byteorder == "little"):
        raise CheckpointError(f"tensors were saved in the byte order opposite to this {sys.byteorder}-endian CPU")


class _LegacyUnpickler(pickle.Unpickler):
    """The pickles of a legacy storage record: plain data, storage types, and the storage's persistent id."""

    def find_class(self, module: str, name: str):
        if module == "torch" and name in _STORAGE_DTYPES:
            return PLAIN_GLOBALS[("torch", name)]
        raise CheckpointError(f"refused to load global '{module}.{name}' in a tensor storage record")

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) == 6 and pid[0] == "storage" and isinstance(pid[1], _StorageType)
                and isinstance(pid[2], str) and _is_int(pid[4]) and pid[4] >= 0 and pid[5] is None):
            raise CheckpointError(f"malformed storage reference {pid!r:.80}")
        return pid[1], pid[2], pid[4]


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _rebuild_tensor(storage, storage_offset, size, stride, requires_grad=False, backward_hooks=None, metadata=None):
    """torch._utils._rebuild_tensor_v2 without hooks or metadata: a view of a storage read from the file."""
    if not isinstance(storage, torch.storage.TypedStorage):
        raise CheckpointError("malformed tensor (its storage is not a tensor storage)")
    if not (_is_int(storage_offset) and isinstance(size, (tuple, list)) and isinstance(stride, (tuple, list))
            and len(size) == len(stride) and all(_is_int(n) and n >= 0 for n in (storage_offset, *size, *stride))):
        raise CheckpointError("malformed tensor (bad offset, size or stride)")
    # Before set_, which would grow a storage that is too small, and so that no view poses as more data than
    # is stored: every element inside the storage and reachable once.
    check_view(storage.size(), storage_offset, size, stride, "a tensor")
    tensor = torch.empty((0,), dtype=storage.dtype)
    return tensor.set_(storage.untyped(), storage_offset, tuple(size), tuple(stride))


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None):
    """torch._utils._rebuild_parameter: the parameter's tensor (the toolkit makes its own parameters)."""
    if not isinstance(data, torch.Tensor):
        raise CheckpointError("malformed parameter (no tensor)")
    return data


def _make_set(items=()):
    """builtins.set(list) as written by pickle protocols 2 and 3."""
    if not isinstance(items, (list, tuple)):
        raise CheckpointError("malformed set")
    return set(items)


def _latin1_bytes(text, encoding="latin1"):
    """_codecs.encode(text, 'latin1'): how protocol 2 writes bytes."""
    if not (isinstance(text, str) and encoding in ("latin1", "latin-1")):
        raise CheckpointError("malformed bytes (only latin-1 text is decoded)")
    return text.encode("latin-1")


_RECONSTRUCT = ("torch_utils.persistence", "_reconstruct_persistent_obj")
_STORAGE_DTYPES = {
    "FloatStorage": torch.float32, "DoubleStorage": torch.float64, "HalfStorage": torch.float16,
    "BFloat16Storage": torch.bfloat16, "LongStorage": torch.int64, "IntStorage": torch.int32,
    "ShortStorage": torch.int16, "CharStorage": torch.int8, "ByteStorage": torch.uint8,
    "BoolStorage": torch.bool, "UntypedStorage": torch.uint8,
}
# The globals every restricted read admits: plain data, tensors and their storages.
PLAIN_GLOBALS: dict[tuple[str, str], Callable] = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch.storage", "_load_from_bytes"): _storage_from_legacy_bytes,
    ("numpy.core.multiarray", "scalar"): _numpy_scalar,
    ("numpy._core.multiarray", "scalar"): _numpy_scalar,
    ("numpy", "dtype"): _NumpyDtype,
    ("builtins", "set"): _make_set,
    ("_codecs", "encode"): _latin1_bytes,
    **{("torch", name): _StorageType(dtype) for name, dtype in _STORAGE_DTYPES.items()},
}


@dataclasses.dataclass(frozen=True)
class Allowlist:
    """What a restricted read admits besides :data:`PLAIN_GLOBALS`, and how its refusals read.

    ``persistent_classes``: the ``torch_utils.persistence`` class names a file may hold, each read as a
    :class:`PersistentObject` (its meta checked, its ``module_src`` hashed, never run); ``torch_modules``:
    ``(module, name)`` of torch classes read as :class:`ModuleRecord` (``torch.nn.modules.container``,
    ``Sequential``); ``record_packages``: packages every class of which is read as a :class:`ModuleRecord`
    (TorchScript's ``__torch__``); ``handlers``: further globals, each mapped to a function that builds only data.
    The texts word the errors: ``name`` what the files are ('EDM network pickle'), ``classes`` what the
    persistent classes are, ``advice`` what a refusal means, ``hint`` what to check in a malformed file.
    """

    name: str
    classes: str
    advice: str
    hint: str
    persistent_classes: frozenset[str] = frozenset()
    torch_modules: frozenset[tuple[str, str]] = frozenset()
    record_packages: tuple[str, ...] = ()
    handlers: Mapping[tuple[str, str], Callable] = dataclasses.field(default_factory=dict)

    def resolve(self, module: str, name: str) -> Callable | None:
        """The handler of a global (Python 3 name), or None when it is not admitted."""
        if (module, name) in self.torch_modules or module.split(".", 1)[0] in self.record_packages:
            return ModuleRecord
        return self.handlers.get((module, name)) or PLAIN_GLOBALS.get((module, name))


EDM_ALLOWLIST = Allowlist(
    name="EDM network pickle",
    classes="an EDM network, loss or augment class known to edm-toolkit",
    advice="this file is not a plain EDM snapshot",
    hint="check that the file is a complete edm-*.pkl, network-snapshot-*.pkl or training-state-*.pt",
    persistent_classes=NETWORK_CLASSES | DATA_CLASSES,
    torch_modules=frozenset(("torch.nn.modules.container", name)
                            for name in ("ModuleDict", "ModuleList", "Sequential")),
    handlers={("dnnlib.util", "EasyDict"): _EasyDict},
)


def _python3_name(module: str, name: str) -> tuple[str, str]:
    """A global as Python 3 spells it: protocols 0-2 write Python 2 names (``__builtin__.set``)."""
    if (module, name) in _compat_pickle.NAME_MAPPING:
        return _compat_pickle.NAME_MAPPING[(module, name)]
    return _compat_pickle.IMPORT_MAPPING.get(module, module), name


class _RestrictedUnpickler(pickle.Unpickler):
    """Unpickles from the globals an :class:`Allowlist` admits only. Storages: ``read_record(key)`` serves those
    of a torch zip (5-tuple ids), ``legacy`` declares those of a legacy torch.save stream (6-tuple ids)."""

    def __init__(self, file: IO[bytes], allowlist: Allowlist, read_record: Callable[[str], bytes] | None = None,
                 legacy: _LegacyStorages | None = None):
        super().__init__(file)
        self._allowlist = allowlist
        self._read_record = read_record
        self._legacy = legacy
        self._storages: dict[str, torch.storage.TypedStorage] = {}
        self.sources: dict[str, set[str]] = {}  # SHA-256 of each distinct module_src -> its class names

    def find_class(self, module: str, name: str):
        module, name = _python3_name(module, name)
        if (module, name) == _RECONSTRUCT and self._allowlist.persistent_classes:
            return self._persistent_object
        handler = self._allowlist.resolve(module, name)
        if handler is None:
            raise CheckpointError(f"refused to load global '{module}.{name}' (not on the allowlist of "
                                  f"{self._allowlist.name}s); {self._allowlist.advice}")
        return handler

    def _persistent_object(self, meta):
        """torch_utils.persistence._reconstruct_persistent_obj(meta), as a data record."""
        if not isinstance(meta, dict) or meta.get("type") != "class":
            raise CheckpointError("malformed persistent object (expected meta type 'class')")
        if meta.get("version") != PERSISTENCE_VERSION:
            raise CheckpointError(
                f"persistent object of version {meta.get('version')!r}; this reader knows version {PERSISTENCE_VERSION}"
            )
        class_name, source, state = meta.get("class_name"), meta.get("module_src"), meta.get("state")
        if class_name not in self._allowlist.persistent_classes:
            raise CheckpointError(f"refused persistent class {class_name!r:.80} (not {self._allowlist.classes}); "
                                  f"{self._allowlist.advice}")
        if not isinstance(source, str) or not isinstance(state, dict):
            raise CheckpointError(f"malformed persistent {class_name} (no source text or state)")
        digest = hashlib.sha256(source.encode("utf-8", "surrogatepass")).hexdigest()  # hashed, never run
        self.sources.setdefault(digest, set()).add(class_name)
        return PersistentObject(class_name, state)

    def persistent_load(self, pid):
        """torch.save's storage ids: ('storage', <storage type>, key, location, numel) in a zip, served from its
        records; ('storage', <storage type>, key, location, numel, None) in a legacy stream, declared here and
        filled from the stream after the pickle."""
        if self._legacy is not None:
            if not (isinstance(pid, tuple) and len(pid) == 6 and pid[0] == "storage"
                    and isinstance(pid[1], _StorageType) and isinstance(pid[2], str) and _is_int(pid[4])
                    and pid[4] >= 0 and pid[5] is None):
                raise CheckpointError(f"malformed storage reference {pid!r:.80} (storage views are not read)")
            return self._legacy.declare(pid[1].dtype, pid[2], pid[4])
        if self._read_record is None:
            raise CheckpointError("unexpected persistent id in a plain pickle")
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"
                and isinstance(pid[1], _StorageType) and isinstance(pid[2], str) and _is_int(pid[4])):
            raise CheckpointError(f"malformed storage reference {pid!r:.80}")
        _, storage_type, key, _location, numel = pid
        if key not in self._storages:
            self._storages[key] = _storage_from_record(self._read_record(key), storage_type.dtype, numel)
        return self._storages[key]


def _typed_storage(data: bytearray, dtype: torch.dtype) -> torch.storage.TypedStorage:
    """A CPU storage of ``dtype`` sharing the memory of ``data`` (raw little-endian bytes)."""
    raw = torch.frombuffer(data, dtype=torch.uint8) if data else torch.empty(0, dtype=torch.uint8)
    return torch.storage.TypedStorage(wrap_storage=raw.untyped_storage(), dtype=dtype, _internal=True)


def _storage_from_record(data: bytes, dtype: torch.dtype, numel: int) -> torch.storage.TypedStorage:
    """A CPU storage of ``numel`` elements of ``dtype`` from the raw little-endian bytes of a zip record."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    if len(data) != numel * itemsize:
        raise CheckpointError(f"tensor storage has {len(data)} bytes, expected {numel} x {itemsize}")
    return _typed_storage(bytearray(data), dtype)


class _LegacyStorages:
    """The storages of a legacy torch.save stream. Its pickle declares each (key, dtype, element count) before
    the stream gives their bytes; a declaration is checked against the bytes the file can still hold before it
    is allocated (torch's own reader allocates whatever is declared), and :meth:`fill` then reads each in turn,
    its element count checked again."""

    def __init__(self, budget: int):
        self.budget = budget  # bytes the file can still hold
        self.declared: dict[str, tuple[torch.dtype, int, bytearray, torch.storage.TypedStorage]] = {}

    def declare(self, dtype: torch.dtype, key: str, numel: int) -> torch.storage.TypedStorage:
        if key in self.declared:
            known_dtype, known_numel, _, storage = self.declared[key]
            if (known_dtype, known_numel) != (dtype, numel):
                raise CheckpointError(f"storage {key!r:.40} declared twice, differently")
            return storage
        nbytes = numel * torch.empty((), dtype=dtype).element_size()
        if nbytes > self.budget:
            raise CheckpointError(f"its storages declare more bytes than the file holds ({nbytes:,} for storage "
                                  f"{key!r:.40}, at most {self.budget:,} left); refused before allocating them")
        self.budget -= nbytes
        data = bytearray(nbytes)
        self.declared[key] = (dtype, numel, data, _typed_storage(data, dtype))
        return self.declared[key][3]

    def fill(self, stream: IO[bytes], keys) -> None:
        """Reads the storages in the order of ``keys`` (the pickled key list): each an 8-byte element count,
        then its bytes."""
        if not (isinstance(keys, list) and all(isinstance(key, str) for key in keys) and len(set(keys)) == len(keys)
                and set(keys) == set(self.declared)):
            raise CheckpointError("malformed legacy torch file (its storage list does not match its tensors)")
        for key in keys:
            dtype, numel, data, _ = self.declared[key]
            count = int.from_bytes(stream.read(8), "little")
            if count != numel:
                raise CheckpointError(f"malformed legacy torch file (storage {key!r:.40} holds {count} elements, "
                                      f"its tensors declare {numel})")
            view, done = memoryview(data), 0
            while done < len(data):
                got = stream.readinto(view[done:])
                if not got:
                    raise CheckpointError(f"truncated legacy torch file (storage {key!r:.40} ends early)")
                done += got


# ----------------------------------------------------------------------------------------------------------
# Reading files


class Unpickled(NamedTuple):
    """What :func:`read_restricted` read: the top-level object, and the SHA-256 of each embedded module source
    (``torch_utils.persistence``'s ``module_src``) with the class names defined by it."""

    top: Any
    sources: dict[str, set[str]]


def _unofficial(result: Unpickled) -> list[str]:
    """Class names whose embedded source is not one of NVlabs/edm's released module files."""
    return sorted({name for digest, names in result.sources.items() if digest not in OFFICIAL_SOURCES
                   for name in names})


def _source_name(path_or_file: PathOrFile) -> str:
    if isinstance(path_or_file, (str, os.PathLike)):
        return os.fspath(path_or_file)
    return str(getattr(path_or_file, "name", "<stream>"))


def _unpickle_stream(stream: IO[bytes], source: str, allowlist: Allowlist) -> Unpickled:
    """Top level of a plain pickle, of a torch zip (a training-state-*.pt, a TorchScript archive's data.pkl) or
    of a legacy torch.save stream."""
    if not stream.seekable():
        stream = io.BytesIO(stream.read())
    start = stream.tell()
    head = stream.read(16)
    size = stream.seek(0, io.SEEK_END) - start
    stream.seek(start)
    container = sniff_container(head, size)
    if container == "torch-legacy":
        _legacy_header(stream, "malformed legacy torch file (not torch.save's header)")
        storages = _LegacyStorages(size)
        unpickler = _RestrictedUnpickler(stream, allowlist, legacy=storages)
        top = unpickler.load()
        storages.fill(stream, _LegacyUnpickler(stream).load())
        return Unpickled(top, unpickler.sources)
    if container != "torch-zip":
        unpickler = _RestrictedUnpickler(stream, allowlist)
        return Unpickled(unpickler.load(), unpickler.sources)
    with zipfile.ZipFile(stream) as archive:
        pickles = [name for name in archive.namelist() if name.endswith("/data.pkl") and name.count("/") == 1]
        if len(pickles) != 1:
            raise CheckpointError("zip file without exactly one <archive>/data.pkl: not a torch.save file")
        prefix = pickles[0][: -len("data.pkl")]
        check_zip_records(archive, size, source, unread=(f"{prefix}code/",))  # TorchScript's code, never opened
        byteorder = f"{prefix}byteorder"
        if byteorder in archive.namelist() and archive.read(byteorder) != sys.byteorder.encode():
            raise CheckpointError(f"tensors were saved in the byte order opposite to this {sys.byteorder}-endian CPU")
        with archive.open(pickles[0]) as data_pkl:
            unpickler = _RestrictedUnpickler(data_pkl, allowlist, lambda key: archive.read(f"{prefix}data/{key}"))
            return Unpickled(unpickler.load(), unpickler.sources)


_MEMO_OPS = frozenset({"PROTO", "FRAME", "MEMOIZE", "PUT", "BINPUT", "LONG_BINPUT"})
_STRING_OPS = frozenset({"SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8", "UNICODE", "STRING", "BINSTRING",
                         "SHORT_BINSTRING"})
_PEEK_OPS = 64  # a persistent object's meta names its class within its first 30 opcodes


def persistent_top_class(source: FileSource) -> str | None:
    """The class name of a bare pickle's top-level ``torch_utils.persistence`` object, read from its first
    opcodes without unpickling anything (NVIDIA's detector pickle is one such object; EDM's snapshots are dicts);
    None when the top level is anything else or the pickle cannot be read so. For sniffers: never raises."""
    if source.container != "pickle":
        return None
    try:
        with open(source.path, "rb") as stream:
            return _top_class(pickletools.genops(stream))
    except (ValueError, EOFError, OSError, UnicodeDecodeError, OverflowError):
        return None


def _top_class(opcodes) -> str | None:
    """The pickle starts with the global _reconstruct_persistent_obj (GLOBAL, or two strings and STACK_GLOBAL)
    and its meta dict, whose 'class_name' entry is the first one that string names."""
    strings: list[str] = []
    persistent = False
    for count, (opcode, arg, _position) in enumerate(opcodes):
        if count > _PEEK_OPS:
            return None
        if opcode.name in _MEMO_OPS:
            continue
        if not persistent:
            if opcode.name == "GLOBAL":
                persistent = arg == " ".join(_RECONSTRUCT)
            elif opcode.name in _STRING_OPS and len(strings) < 2:
                strings.append(arg)
                continue
            elif opcode.name == "STACK_GLOBAL":
                persistent = tuple(strings) == _RECONSTRUCT
            if not persistent:
                return None
            strings = []
        elif opcode.name in _STRING_OPS:
            if strings[-1:] == ["class_name"]:
                return arg if isinstance(arg, str) else None
            strings.append(arg)
    return None


@contextlib.contextmanager
def _reported_as(context: str):
    """Prefixes every CheckpointError with ``context`` (file, entry), so that it names where the problem is."""
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*TypedStorage is deprecated")
            yield
    except CheckpointError as exc:
        raise CheckpointError(f"{context}: {exc}") from None


def read_restricted(path_or_file: PathOrFile, allowlist: Allowlist) -> Unpickled:
    """A plain pickle, a torch zip (``<archive>/data.pkl``, torch.save or TorchScript) or a legacy torch.save
    stream, unpickled from :data:`PLAIN_GLOBALS` and what ``allowlist`` admits only, with memory bounded by the
    file: zip records checked by :func:`~edm_toolkit.io.tensorfile.check_zip_records` before any is read (a
    TorchScript archive's ``code/`` is never opened), legacy storages checked against the file's size before
    they are allocated, every tensor checked by :func:`~edm_toolkit.io.tensorfile.check_view` before it is made.
    Every problem is one CheckpointError line that starts with the file's name."""
    source = _source_name(path_or_file)
    with _reported_as(source):
        try:
            if isinstance(path_or_file, (str, os.PathLike)):
                if not Path(path_or_file).is_file():
                    raise CheckpointError("file not found")
                with open(path_or_file, "rb") as stream:
                    return _unpickle_stream(stream, source, allowlist)
            return _unpickle_stream(path_or_file, source, allowlist)
        except CheckpointError:
            raise
        except _MALFORMED as exc:  # truncated or corrupt data, wrong types for a handler, ...
            detail = (str(exc).strip().splitlines() or [""])[0][:160]
            raise CheckpointError(
                f"not a readable {allowlist.name} ({type(exc).__name__}: {detail}); {allowlist.hint}") from None


def _read(path_or_file: PathOrFile) -> tuple[Unpickled, str]:
    """Unpickles a snapshot restrictedly: (top-level dict and embedded sources), file name. Warns when an
    embedded source is not NVlabs/edm's."""
    source = _source_name(path_or_file)
    result = read_restricted(path_or_file, EDM_ALLOWLIST)
    with _reported_as(source):
        if not isinstance(result.top, dict):
            raise CheckpointError(f"top level is a {type(result.top).__name__}, not the dict of an EDM snapshot")
    unofficial = _unofficial(result)
    if unofficial:
        warn(f"{source}: the Python code embedded for {', '.join(unofficial)} is not NVlabs/edm's released code "
             "(EDM's own loader would run it, and it may compute something else); it was not run: edm-toolkit's "
             "implementation of these classes is used instead")
    return Unpickled(dict(result.top), result.sources), source


def _plain(value):
    """Unpickled data as plain Python: dicts, lists, tuples, sets, numbers, strings, tensors, and persistent
    objects as ``{'class_name', 'init_args', 'init_kwargs'}`` (their public attributes when no arguments were
    recorded). Shared references are converted once; reference cycles are refused."""
    converted: dict[int, tuple[Any, Any]] = {}  # id -> (item, result); the item is kept so ids stay unique
    active: set[int] = set()

    def convert(item):
        if isinstance(item, _NumpyDtype):
            return str(item.resolve())
        if not isinstance(item, (PersistentObject, dict, list, tuple, set, frozenset)):
            return item
        if id(item) in converted:
            return converted[id(item)][1]
        if id(item) in active:
            raise CheckpointError("self-referencing data structure")
        active.add(id(item))
        if isinstance(item, PersistentObject):
            if item.state.get("_init_args") is None or item.state.get("_init_kwargs") is None:
                args = []
                kwargs = {k: convert(v) for k, v in item.state.items() if not str(k).startswith("_")}
            else:
                args, kwargs = item.raw_arguments()
                args, kwargs = list(convert(args)), convert(kwargs)
            result = {"class_name": item.class_name, "init_args": args, "init_kwargs": kwargs}
        elif isinstance(item, dict):
            result = {key: convert(entry) for key, entry in item.items()}
        else:
            container = list if isinstance(item, list) else tuple if isinstance(item, tuple) else set
            result = container(convert(entry) for entry in item)
        active.discard(id(item))
        converted[id(item)] = (item, result)
        return result

    try:
        return convert(value)
    except RecursionError:
        raise CheckpointError("data nested too deeply") from None


# ----------------------------------------------------------------------------------------------------------
# Rebuilding networks


def module_tensors(node: PersistentObject) -> dict[str, torch.Tensor]:
    """The state_dict of a pickled module tree (persistent objects and :class:`ModuleRecord` s, each with its
    ``__dict__``): _parameters and persistent _buffers by qualified name. A module that appears twice, a
    submodule that is no module and a non-tensor entry are refused."""
    tensors: dict[str, torch.Tensor] = {}
    groups = ("_parameters", "_buffers")
    pending, seen = [("", node)], set()
    while pending:
        prefix, module = pending.pop()
        if id(module) in seen:
            raise CheckpointError(f"module {prefix.rstrip('.') or module.class_name} appears twice in the network tree")
        seen.add(id(module))
        state = module.state
        skipped = state.get("_non_persistent_buffers_set") or set()
        if not isinstance(skipped, (set, frozenset, list, tuple)):
            raise CheckpointError(f"{prefix}_non_persistent_buffers_set of {module.class_name} is not a set")
        for group in groups:
            entries = state.get(group) or {}
            if not isinstance(entries, dict):
                raise CheckpointError(f"{prefix}{group} of {module.class_name} is not a dict")
            for name, tensor in entries.items():
                if tensor is None or (group == "_buffers" and name in skipped):
                    continue
                if not isinstance(tensor, torch.Tensor):
                    raise CheckpointError(f"{prefix}{name} is a {type(tensor).__name__}, not a tensor")
                tensors[f"{prefix}{name}"] = tensor
        children = state.get("_modules") or {}
        if not isinstance(children, dict):
            raise CheckpointError(f"{prefix}_modules of {module.class_name} is not a dict")
        for name, child in children.items():
            if child is None:
                continue
            if not isinstance(child, PersistentObject) or child.class_name in DATA_CLASSES:
                raise CheckpointError(f"submodule {prefix}{name} is not a network module")
            pending.append((f"{prefix}{name}.", child))
    return tensors


def _precond_spec(node, key: str) -> _PrecondSpec:
    if not isinstance(node, PersistentObject) or node.class_name not in PRECONDITIONERS:
        found = node.class_name if isinstance(node, PersistentObject) else type(node).__name__
        raise CheckpointError(f"'{key}' is a {found}, not one of EDM's preconditioners ({', '.join(PRECONDITIONERS)})")
    return PRECONDITIONERS[node.class_name]


def _bind_arguments(node: PersistentObject, spec: _PrecondSpec) -> dict[str, Any]:
    """EDM's preconditioner signature bound to the recorded arguments, defaults filled in (model_type too)."""
    args, kwargs = node.init_arguments()
    names = (*_GEOMETRY, *spec.own_params, "model_type")
    if len(args) > len(names):
        raise CheckpointError(f"{node.class_name} records {len(args)} positional arguments, more than EDM's signature")
    bound = dict(zip(names, args))
    if set(bound) & set(kwargs):
        raise CheckpointError(f"{node.class_name} records {sorted(set(bound) & set(kwargs))} twice")
    bound.update(kwargs)
    missing = [name for name in ("img_resolution", "img_channels") if name not in bound]
    if missing:
        raise CheckpointError(f"{node.class_name} does not record {', '.join(missing)}")
    bound = {"label_dim": 0, "use_fp16": False, "model_type": spec.default_model, **bound}
    counts = {name: bound[name] for name in ("img_resolution", "img_channels", "label_dim")}
    if not all(_is_int(n) and n >= 0 for n in counts.values()) or not isinstance(bound["use_fp16"], bool):
        raise CheckpointError(f"{node.class_name} records a malformed {counts}, use_fp16={bound['use_fp16']!r}")
    return bound


def _architecture(node: PersistentObject, bound: dict[str, Any]) -> type[nn.Module]:
    """The backbone class named by model_type, checked against the pickled submodule ``model``."""
    model_type = bound["model_type"]
    if not isinstance(model_type, str) or model_type not in BACKBONES:
        raise CheckpointError(f"model_type {model_type!r:.80} is not supported (only {', '.join(BACKBONES)})")
    children = node.state.get("_modules") or {}
    if not isinstance(children, dict):
        raise CheckpointError(f"_modules of {node.class_name} is not a dict")
    child = children.get("model")
    if not isinstance(child, PersistentObject) or child.class_name != model_type:
        found = child.class_name if isinstance(child, PersistentObject) else type(child).__name__
        raise CheckpointError(f"{node.class_name} records model_type {model_type!r} but its pickled model is a {found}")
    return BACKBONES[model_type]


class _Plan(NamedTuple):
    """How to rebuild a pickled preconditioner: the builder of its backbone, the preconditioner around it, and
    the tensors they must hold."""

    what: str  # e.g. "VPPrecond(SongUNet)"
    build: Callable[[], nn.Module]
    wrap: Callable[[nn.Module], Preconditioner]
    tensors: dict[str, torch.Tensor]
    bound: dict[str, Any]  # EDM's signature bound to the recorded arguments, defaults filled in
    spec: _PrecondSpec


def _plan(node, key: str) -> _Plan:
    """The toolkit preconditioner + backbone for a pickled EDM preconditioner, its arguments checked."""
    spec = _precond_spec(node, key)
    bound = _bind_arguments(node, spec)
    backbone_cls = _architecture(node, bound)
    what = f"{node.class_name}({backbone_cls.__name__})"
    check_arguments(bound, what)
    arguments = dict(bound)
    geometry = {name: arguments.pop(name) for name in _GEOMETRY}
    check_geometry(what, geometry["img_resolution"], geometry["img_channels"], geometry["label_dim"])
    own = {name: arguments.pop(name) for name in spec.own_params if name in arguments}
    arguments.pop("model_type")
    backbone_kwargs = dict(
        img_resolution=geometry["img_resolution"], in_channels=geometry["img_channels"],
        out_channels=geometry["img_channels"] * spec.out_channel_factor, label_dim=geometry["label_dim"],
    )
    if set(arguments) & set(backbone_kwargs):
        raise CheckpointError(f"{what} records {sorted(set(arguments) & set(backbone_kwargs))}, which EDM sets itself")
    backbone_kwargs.update(arguments)

    tensors = module_tensors(node)
    check_tensors(tensors, what)  # views that share stored values would be copied apart when loaded
    return _Plan(what, lambda: backbone_cls(**backbone_kwargs), lambda backbone: spec.cls(backbone, **geometry, **own),
                 tensors, bound, spec)


def _verified(plan: _Plan) -> nn.Module:
    """The preconditioner around its backbone built on the meta device, its state_dict layout checked against
    the pickled tensors."""
    return verify(plan.build, plan.tensors, plan.what, lambda problem: (
        f"the pickled weights do not match {plan.what} built from the recorded arguments: {problem}"), plan.wrap)


def _build_network(node, key: str) -> Preconditioner:
    """The toolkit preconditioner + backbone for a pickled EDM preconditioner, weights loaded strictly."""
    plan = _plan(node, key)
    precond = materialize(_verified(plan), plan.build, plan.tensors, plan.what, network="model")
    return precond.eval().requires_grad_(False)


# ----------------------------------------------------------------------------------------------------------
# Public API


def read_edm_pickle(path_or_file: PathOrFile) -> dict[str, Any]:
    """Reads an EDM snapshot (or training state) without executing code from it.

    Returns the file's top-level dict with every pickled preconditioner ('ema', or 'net' of a training state)
    rebuilt as a toolkit :class:`~edm_toolkit.precond.Preconditioner` (CPU, eval mode, requires_grad False),
    the other persistent objects (loss_fn, augment_pipe) as ``{'class_name', 'init_args', 'init_kwargs'}``,
    the rest (dataset_kwargs, optimizer_state) as plain data, plus ``'notes'``: a list of what was skipped.
    Raises :class:`CheckpointError` for anything that is not a plain EDM snapshot.
    """
    (top, sources), source = _read(path_or_file)
    result: dict[str, Any] = {}
    notes = [f"{len(sources)} embedded Python module source(s) ignored, never executed"] if sources else []
    for key, value in top.items():
        if isinstance(value, PersistentObject) and value.class_name in PRECONDITIONERS:
            with _reported_as(f"{source}: '{key}'"):
                result[key] = _build_network(value, key)
            notes.append(f"'{key}': {value.class_name} rebuilt as edm_toolkit {type(result[key]).__name__} "
                         f"around {type(result[key].model).__name__} from its recorded constructor arguments")
        else:
            with _reported_as(f"{source}: '{key}'"):
                result[key] = _plain(value)
            if isinstance(value, PersistentObject):
                notes.append(f"'{key}': {value.class_name} kept as data (class name and constructor arguments)")
    if not any(isinstance(value, Preconditioner) for value in result.values()):
        raise CheckpointError(f"{source}: no EDM network in the file (top-level keys: {sorted(map(str, top))})")
    if "notes" in top:
        notes.append("the file's own top-level 'notes' entry was replaced by these notes")
    result["notes"] = notes
    return result


def load_edm_network(path: PathOrFile, key: str = "ema") -> Preconditioner:
    """The network stored under ``key`` ('ema' in snapshots, 'net' in training states), ready for sampling."""
    (top, _sources), source = _read(path)
    if key not in top:
        hint = "; training-state files store key 'net'" if "net" in top else ""
        raise CheckpointError(f"{source}: no '{key}' entry (keys: {sorted(map(str, top))}){hint}")
    with _reported_as(f"{source}: '{key}'"):
        return _build_network(top[key], key)


def _network_key(top: Mapping, source: str) -> str:
    """'ema' (snapshots), else 'net' (training states, with a warning: those are the raw training weights)."""
    if "ema" in top:
        return "ema"
    if "net" in top:
        warn(f"{source} has no 'ema' entry (an EDM training state): using 'net', the training weights, not their "
             "exponential moving average")
        return "net"
    raise CheckpointError(f"{source}: no 'ema' or 'net' entry (keys: {sorted(map(str, top))})")


def inspect_edm_pickle(path: PathOrFile) -> dict[str, Any]:
    """Summary of an EDM snapshot after the checks of loading it, without allocating its network.

    Keys: family, key, entries, preconditioner, architecture, init_kwargs (the recorded arguments bound to
    EDM's signature, defaults filled in), parameters (parameter count, buffers excluded), label_dim,
    img_resolution, img_channels, use_fp16, sigma_min, sigma_max, dtype.
    """
    (top, _sources), source = _read(path)
    key = _network_key(top, source)
    with _reported_as(f"{source}: '{key}'"):
        plan = _plan(top[key], key)
        meta = _verified(plan)
        sigma_range = _sigma_range(top[key], plan.spec, plan.bound)
    parameters = {name: plan.tensors[name] for name, _ in meta.named_parameters()}
    bound = plan.bound
    return {
        "family": FAMILY,
        "key": key,
        "entries": sorted(map(str, top)),
        "preconditioner": top[key].class_name,
        "architecture": bound["model_type"],
        "init_kwargs": bound,
        "parameters": sum(t.numel() for t in parameters.values()),
        "label_dim": bound["label_dim"],
        "img_resolution": bound["img_resolution"],
        "img_channels": bound["img_channels"],
        "use_fp16": bound["use_fp16"],
        **sigma_range,
        "dtype": dtype_summary(parameters),
    }


def _sigma_range(node: PersistentObject, spec: _PrecondSpec, bound: dict[str, Any]) -> dict[str, float]:
    """sigma_min/sigma_max as EDM recorded them on the object, else as the toolkit computes them."""
    recorded = {name: node.state.get(name) for name in ("sigma_min", "sigma_max")}
    if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in recorded.values()):
        return {name: float(value) for name, value in recorded.items()}
    own = {name: bound[name] for name in spec.own_params if name in bound}
    try:
        precond = spec.cls(None, **own)
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"cannot compute the sigma range of {node.class_name} ({exc})") from None
    return {"sigma_min": float(precond.sigma_min), "sigma_max": float(precond.sigma_max)}


class EDMPickleFormat:
    """NVlabs/edm's network pickles and training states (:mod:`edm_toolkit.adapters.edm_pickle`).

    Recognised as a bare pickle whose top level is not a persistent object of another class (EDM writes a dict
    there; other bare pickles are refused by its reader), or a torch zip whose pickle names EDM's
    ``torch_utils.persistence``. Loads 'ema', else 'net' (training states) with a warning.
    """

    name = FAMILY
    options = frozenset()  # the architecture is recorded in the file

    def sniff(self, source: FileSource) -> bool:
        if source.container == "pickle":
            top = persistent_top_class(source)
            return top is None or top in EDM_ALLOWLIST.persistent_classes
        return source.pickle_mentions(b"torch_utils.persistence")

    def inspect(self, source: FileSource, options: LoadOptions) -> dict[str, Any]:
        return inspect_edm_pickle(source.path)

    def load(self, source: FileSource, options: LoadOptions) -> nn.Module:
        (top, _sources), name = _read(source.path)
        key = _network_key(top, name)
        with _reported_as(f"{name}: '{key}'"):
            return _build_network(top[key], key)


EDM_PICKLE = register_format(EDMPickleFormat())
