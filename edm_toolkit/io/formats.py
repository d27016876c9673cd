"""Model file formats as a registry, and the one way a network described by a file is built.

Every family of checkpoint (EDM pickle, guided/improved-diffusion state_dict, score_sde checkpoint, the
toolkit's own model file, ...) is one :class:`FileFormat` object, registered by name with
:func:`register_format` in the module that implements it. A format recognises its files by content
(``sniff``), describes one without loading its weights (``inspect``) and loads one (``load``). A format is
registered with its kind: ``"denoiser"`` (a diffusion model, the default) or ``"detector"`` (the FID Inception
weights of :mod:`edm_toolkit.metrics.detector_files`); :func:`format_kind` tells which, so that a reader of one
kind refuses a file of the other by name. This module knows no format; :mod:`edm_toolkit.loading` imports them
all and dispatches.

The toolkit's own model file stores any model type registered here with :func:`register_model_type` (its
``to_config`` / ``from_config`` hooks), so that the writer and reader of that format never import an adapter.

Whatever the format, a network described by a file is built the same bounded way (:func:`verify`,
:func:`load_network`): its constructor arguments are checked against sane limits (:func:`check_arguments`,
:func:`check_geometry`), it is constructed on the meta device within a budget set by the tensors the file
really holds (:func:`construction_budget`), its state_dict layout is compared with those tensors, and only then
is memory allocated and the weights loaded strictly. ``inspect`` runs the same checks as ``load`` and so gives
the same verdict.
"""

from __future__ import annotations

import dataclasses
import warnings
import zipfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from ..errors import CheckpointError, CheckpointWarning
from ..networks.registry import build_network
from .tensorfile import check_zip_records, read_safetensors, read_torch, sniff_container

__all__ = [
    "DENOISER", "DETECTOR", "FORMATS", "KINDS", "MODEL_TYPES", "FileFormat", "FileSource", "LoadOptions",
    "ModelType", "OverBudget", "check_arguments", "check_geometry", "check_kind", "check_options", "construct",
    "construction_budget", "dtype_summary", "format_kind", "identify", "layout_mismatch", "load_network",
    "load_wrapper", "materialize", "model_config", "register_format", "register_model_type", "registered_network",
    "shapes", "verify", "warn",
]

# Sane bounds on what a file may ask the toolkit to allocate per image (generate draws float64 latents of
# img_channels x img_resolution^2 per image): published pixel models reach 512, latent models 16 channels.
MAX_RESOLUTION = 2048
MAX_IMG_CHANNELS = 16
MAX_LABEL_DIM = 100_000  # ImageNet-21k has 21,841 classes
# Constructor arguments are plain data of bounded size: numbers, short strings, short lists, small tables.
MAX_ARGUMENT = 2**31 - 1
MAX_LIST = 64
MAX_TABLE = 256
MAX_DEPTH = 6


# ----------------------------------------------------------------------------------------------------------
# Files and formats


@dataclasses.dataclass(frozen=True)
class LoadOptions:
    """What a user may add to a file: ``model_flags`` (guided/improved-diffusion flags, ``--model-flags``),
    ``config`` (a score_sde config, ``--model-config``) and ``use_ema`` (False: ``--weights raw``).
    A format declares which it uses; any other that is given is refused rather than ignored."""

    model_flags: str | Mapping[str, Any] | None = None
    config: str | Mapping[str, Any] | None = None
    use_ema: bool = True

    def given(self) -> dict[str, str]:
        """The options that differ from their defaults: field name -> how a user wrote it."""
        given = {}
        if self.model_flags is not None:
            given["model_flags"] = "model_flags (--model-flags)"
        if self.config is not None:
            given["config"] = "config (--model-config)"
        if not self.use_ema:
            given["use_ema"] = "use_ema=False (--weights raw)"
        return given


class FileSource:
    """A model file opened for recognition: path, size, first bytes and container kind; its contents are read
    at most once, on demand, through the bounded readers of :mod:`edm_toolkit.io.tensorfile`."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if self.path.is_dir():
            raise CheckpointError(f"{self.path} is a directory, not a model file; give the path of the file itself")
        if not self.path.exists():
            raise CheckpointError(f"model file {str(self.path)!r} not found")
        if not self.path.is_file():
            raise CheckpointError(f"{self.path} is not a regular file")
        self.size = self.path.stat().st_size
        if self.size == 0:
            raise CheckpointError(f"{self.path} is empty")
        with open(self.path, "rb") as stream:
            self.head = stream.read(16)
        self.container = sniff_container(self.head, self.size)
        self._contents: dict[str, Any] = {}

    def __str__(self) -> str:
        return str(self.path)

    def _cached(self, kind: str, read: Callable[[], Any]) -> Any:
        if kind not in self._contents:
            try:
                self._contents[kind] = (read(), None)
            except CheckpointError as exc:
                self._contents[kind] = (None, exc)
        value, error = self._contents[kind]
        if error is not None:
            raise error
        return value

    def torch_object(self) -> Any:
        """The weights-only object of a torch zip file (CheckpointError if it cannot be read so). A TorchScript
        archive is refused, its records checked first so that a crafted one is named as such: torch.load would
        hand it to torch.jit.load."""
        if self.torchscript_prefix() is not None:
            with zipfile.ZipFile(self.path) as archive:  # its directory was read by torchscript_prefix
                self._check_records(archive)
            raise CheckpointError(f"{self} is a TorchScript archive (code and weights), which the toolkit reads only "
                                  "as an FID detector file, as data, never as code")
        return self._cached("torch", lambda: read_torch(self.path))

    def readable_torch_object(self) -> Any:
        """:meth:`torch_object`, or None when the file is not a torch zip readable weights-only (for sniffing)."""
        if self.container != "torch-zip" or self.torchscript_prefix() is not None:
            return None
        try:
            return self.torch_object()
        except CheckpointError:
            return None

    def safetensors(self) -> tuple[dict[str, str], dict[str, torch.Tensor]]:
        """(metadata, tensors) of a safetensors file."""
        return self._cached("safetensors", lambda: read_safetensors(self.path))

    def zip_names(self) -> tuple[str, ...]:
        """The record names of a zip file, from its directory only; () when the file is no readable zip."""
        def read() -> tuple[str, ...]:
            try:
                with zipfile.ZipFile(self.path) as archive:
                    return tuple(archive.namelist())
            except (zipfile.BadZipFile, OSError, EOFError, ValueError):
                return ()

        return self._cached("zip-names", read) if self.container == "torch-zip" else ()

    def torchscript_prefix(self) -> str | None:
        """``'<archive>/'`` when the file is a TorchScript archive (``torch.jit.save``: ``<archive>/data.pkl``
        beside ``<archive>/constants.pkl``, which is how torch itself tells one), else None."""
        names = set(self.zip_names())
        for name in names:
            if name.endswith("/data.pkl") and name.count("/") == 1:
                prefix = name[: -len("data.pkl")]
                if f"{prefix}constants.pkl" in names:
                    return prefix
        return None

    def _check_records(self, archive: zipfile.ZipFile) -> None:
        """The zip record checks of :mod:`~edm_toolkit.io.tensorfile`; a TorchScript archive's ``code/``, which
        torch.jit.save deflates and no reader opens, left out."""
        prefix = self.torchscript_prefix()
        check_zip_records(archive, self.size, str(self), unread=(f"{prefix}code/",) if prefix else ())

    def pickle_mentions(self, text: bytes) -> bool:
        """Whether the pickle of a torch zip file (its ``data.pkl`` record) contains ``text``: a sniffer's
        look at the names it holds, without unpickling anything."""
        if self.container != "torch-zip":
            return False
        try:
            with zipfile.ZipFile(self.path) as archive:
                self._check_records(archive)
                names = [name for name in archive.namelist() if name.endswith("/data.pkl") and name.count("/") == 1]
                return len(names) == 1 and text in archive.read(names[0])
        except (zipfile.BadZipFile, OSError, EOFError, ValueError):  # CheckpointError included: not sniffed
            return False


class FileFormat(Protocol):
    """A family of model files.

    ``name`` identifies it (``identify`` returns it); ``options`` are the :class:`LoadOptions` fields it uses.
    ``sniff`` recognises a file by content, never by name, and must not raise for a file of another format;
    ``inspect`` describes one as a dict, after the same checks as ``load``; ``load`` returns its network on the
    CPU, in eval mode, without gradients. What the network is depends on the kind the format is registered
    with (:func:`register_format`):

    * ``"denoiser"`` (the default): ``load`` returns the denoiser ``D(x, sigma, class_labels)``; ``inspect``
      gives at least ``family``, ``architecture``, ``parameters``, ``label_dim``, ``img_resolution``,
      ``img_channels``, ``sigma_min``, ``sigma_max`` and ``dtype``.
    * ``"detector"``: ``load`` returns the FID Inception detector
      (:class:`~edm_toolkit.metrics.inception.InceptionV3`); ``inspect`` gives at least ``family``, ``kind``,
      ``form``, ``architecture``, ``parameters``, ``outputs`` and ``dtype``.

    Problems raise CheckpointError; what a user must know but is no error is a :func:`warn`.
    """

    name: str
    options: frozenset[str]

    def sniff(self, source: FileSource) -> bool: ...

    def inspect(self, source: FileSource, options: LoadOptions) -> dict[str, Any]: ...

    def load(self, source: FileSource, options: LoadOptions) -> nn.Module: ...


FORMATS: dict[str, FileFormat] = {}
DENOISER, DETECTOR = "denoiser", "detector"
KINDS = {DENOISER: "a denoiser", DETECTOR: "an FID Inception detector"}  # kind -> what its files hold
_FORMAT_KINDS: dict[str, str] = {}


def register_format(file_format: FileFormat, kind: str = DENOISER) -> FileFormat:
    """Adds a format of the given kind (:data:`DENOISER` or :data:`DETECTOR`) to the registry (once per name)."""
    if file_format.name in FORMATS:
        raise RuntimeError(f"file format {file_format.name!r} registered twice")
    if kind not in KINDS:
        raise ValueError(f"file format kind {kind!r} is not one of {', '.join(KINDS)}")
    FORMATS[file_format.name] = file_format
    _FORMAT_KINDS[file_format.name] = kind
    return file_format


def format_kind(file_format: FileFormat) -> str:
    """The kind a registered format was registered with: ``"denoiser"`` or ``"detector"``."""
    return _FORMAT_KINDS[file_format.name]


def check_kind(file_format: FileFormat, kind: str, source: FileSource, fix: str) -> None:
    """Refuses a file whose format is of another kind than the reader wants, naming both and the ``fix``."""
    found = format_kind(file_format)
    if found != kind:
        raise CheckpointError(f"{source} holds {KINDS[found]} ({file_format.name} format), not {KINDS[kind]}; {fix}")


def identify(source: FileSource) -> FileFormat:
    """The registered format that recognises ``source``; CheckpointError naming the formats otherwise."""
    matches = [file_format for file_format in FORMATS.values() if file_format.sniff(source)]
    if len(matches) == 1:
        return matches[0]
    if matches:
        raise CheckpointError(f"{source} looks like several formats ({', '.join(f.name for f in matches)})")
    if source.container in ("torch-zip", "torch-legacy"):
        obj = source.torch_object()  # raises why it cannot be read, if that is why no format knows it
        what = f"a dict with keys {sorted(map(str, obj))[:6]}" if isinstance(obj, Mapping) else type(obj).__name__
        raise CheckpointError(f"{source} holds {what}, which is not a model file of a known format ({known_formats()})")
    raise CheckpointError(f"{source} is not a model file of a supported format ({known_formats()})")


def known_formats() -> str:
    return ", ".join(FORMATS)


def check_options(file_format: FileFormat, options: LoadOptions, source: FileSource) -> None:
    """Refuses an option the format does not use: a flag that would be ignored silently is a mistake."""
    extra = {name: text for name, text in options.given().items() if name not in file_format.options}
    if extra:
        raise CheckpointError(f"{' and '.join(extra.values())} does not apply to {source}, a {file_format.name} "
                              "file; drop it")


def warn(message: str) -> None:
    """A :class:`~edm_toolkit.errors.CheckpointWarning`: something a user must know about a file, no error."""
    warnings.warn(message, CheckpointWarning, stacklevel=3)


# ----------------------------------------------------------------------------------------------------------
# Model types of the toolkit's own model file


@dataclasses.dataclass(frozen=True)
class ModelType:
    """A model class that the toolkit's model file can store: ``to_config(model)`` gives its JSON-ready config,
    ``from_config(config, tensors, what)`` rebuilds it with the file's state_dict loaded (strictly, through
    :func:`load_network` for its backbone)."""

    name: str
    cls: type
    to_config: Callable[[nn.Module], dict[str, Any]]
    from_config: Callable[[dict[str, Any], Mapping[str, torch.Tensor], str], nn.Module]


MODEL_TYPES: dict[str, ModelType] = {}


def register_model_type(name: str, cls: type, to_config: Callable, from_config: Callable) -> None:
    """Makes ``cls`` (and its subclasses) storable in the toolkit's model files under the type ``name``."""
    if name in MODEL_TYPES:
        raise RuntimeError(f"model type {name!r} registered twice")
    MODEL_TYPES[name] = ModelType(name, cls, to_config, from_config)


def model_config(model: nn.Module) -> dict[str, Any]:
    """{"type", ...} of a model of a registered type (the nearest registered class of its MRO)."""
    by_class = {model_type.cls: model_type for model_type in MODEL_TYPES.values()}
    for cls in type(model).__mro__:
        if cls in by_class:
            return {"type": by_class[cls].name, **by_class[cls].to_config(model)}
    raise CheckpointError(f"cannot save a {type(model).__name__}: it is not a model type of this toolkit "
                          f"({', '.join(MODEL_TYPES)})")


# ----------------------------------------------------------------------------------------------------------
# Building networks described by a file


def check_geometry(what: str, img_resolution: Any, img_channels: Any, label_dim: Any = 0) -> None:
    """The image geometry a file declares, within :data:`MAX_RESOLUTION`, :data:`MAX_IMG_CHANNELS` and
    :data:`MAX_LABEL_DIM` (every image generated costs img_channels x img_resolution^2)."""
    for name, value, limit in (("img_resolution", img_resolution, MAX_RESOLUTION),
                               ("img_channels", img_channels, MAX_IMG_CHANNELS), ("label_dim", label_dim, MAX_LABEL_DIM)):
        if value is None and name == "img_resolution":
            continue  # a fully convolutional network that does not state its size
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= limit:
            raise CheckpointError(f"{what} declares {name}={value!r}; the toolkit reads 0 to {limit:,}")


def check_arguments(value: Any, what: str, name: str = "", depth: int = 0) -> None:
    """Constructor arguments read from a file are plain data of bounded size: numbers of at most 2^31 - 1,
    strings of at most 256 characters, lists of at most 64 entries and tables of at most 256, nested at most
    6 deep. (How large a network they describe is bounded by :func:`construction_budget`.)"""
    where = f"{what}: {name or 'a constructor argument'}"
    if depth > MAX_DEPTH:
        raise CheckpointError(f"{where} is nested more than {MAX_DEPTH} deep")
    if value is None or isinstance(value, (bool, float)):
        return
    if isinstance(value, int):
        if abs(value) > MAX_ARGUMENT:
            raise CheckpointError(f"{where}={value} is out of range (at most {MAX_ARGUMENT:,})")
    elif isinstance(value, str):
        if len(value) > 256:
            raise CheckpointError(f"{where} is a string of {len(value):,} characters (at most 256)")
    elif isinstance(value, (list, tuple)):
        if len(value) > MAX_LIST:
            raise CheckpointError(f"{where} is a list of {len(value):,} entries (at most {MAX_LIST})")
        for item in value:
            check_arguments(item, what, name, depth + 1)
    elif isinstance(value, Mapping):
        if len(value) > MAX_TABLE:
            raise CheckpointError(f"{where} is a table of {len(value):,} entries (at most {MAX_TABLE})")
        for key, item in value.items():
            if not isinstance(key, str):
                raise CheckpointError(f"{what}: argument names must be strings, got {key!r:.40}")
            check_arguments(item, what, f"{name}.{key}" if name else key, depth + 1)
    else:
        raise CheckpointError(f"{where} is a {type(value).__name__}, not plain data")


_FACTORIES = frozenset({
    torch.empty, torch.empty_strided, torch.zeros, torch.ones, torch.full, torch.rand, torch.randn, torch.randint,
    torch.randperm, torch.normal, torch.arange, torch.linspace, torch.logspace, torch.eye, torch.tensor,
    torch.as_tensor, torch.empty_like, torch.zeros_like, torch.ones_like, torch.full_like, torch.rand_like,
    torch.randn_like, torch.randint_like,
})


class OverBudget(CheckpointError):
    """A network described by a file's arguments outgrew the file's own tensors while it was constructed."""

    def __init__(self, what: str, description: str):
        super().__init__(f"{what} is larger than the weights in the file ({description}): refused before building it")
        self.description = description


class construction_budget(TorchFunctionMode):
    """While a network is constructed from a file's arguments, bounds the tensors it may create by the tensors
    the file holds: at most 4 per stored tensor (+256), and (off the meta device, where they take memory)
    twice their elements (+2^20). A network that the file's weights could fill stays well inside; arguments
    that describe a far larger one (``num_blocks=1e6``) stop with :class:`OverBudget` as soon as that is seen,
    in milliseconds, before memory or time is spent. (On the meta device the sizes cost nothing; the exact
    layout check that follows bounds them.)"""

    def __init__(self, tensors: Mapping[str, torch.Tensor], what: str):
        super().__init__()
        self.what = what
        self.stored, self.count = sum(t.numel() for t in tensors.values()), len(tensors)
        self.max_created, self.max_elements = 4 * self.count + 256, 2 * self.stored + 2**20
        self.created = self.elements = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        result = func(*args, **(kwargs or {}))
        if func in _FACTORIES and isinstance(result, torch.Tensor):
            self.created += 1
            if result.device.type != "meta":
                self.elements += result.numel()
            if self.created > self.max_created or self.elements > self.max_elements:
                raise OverBudget(self.what, (
                    f"weights missing: its arguments describe more than {self.created:,} tensors of "
                    f"{self.elements:,} values, the file holds {self.count:,} tensors of {self.stored:,} values"))
        return result


def construct(build: Callable[[], nn.Module], what: str) -> nn.Module:
    """``build()``, with the errors that constructors raise for arguments they cannot take as CheckpointError."""
    try:
        return build()
    except CheckpointError:
        raise
    except (TypeError, ValueError, KeyError, IndexError, ZeroDivisionError, OverflowError, RuntimeError) as exc:
        raise CheckpointError(f"cannot build {what} from the arguments in the file ({_first_line(exc)})") from None


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0][:160]


def shapes(tensors: Mapping[str, torch.Tensor]) -> dict[str, tuple[int, ...]]:
    return {name: tuple(tensor.shape) for name, tensor in tensors.items()}


def layout_mismatch(expected: Mapping[str, tuple], found: Mapping[str, tuple]) -> str | None:
    """How a file's tensor names and shapes (``found``) differ from a module's (``expected``), in one line
    naming the first differences ('missing 2: a, b; unexpected 1: c; wrong shape 1: d [3] (expected [4])'),
    or None when they agree."""
    missing = [name for name in expected if name not in found]
    unexpected = [name for name in found if name not in expected]
    misshaped = [f"{name} {list(found[name])} (expected {list(shape)})"
                 for name, shape in expected.items() if name in found and tuple(found[name]) != tuple(shape)]
    problems = [f"{label} {len(items)}: {', '.join(items[:3])}{' ...' if len(items) > 3 else ''}"
                for label, items in (("missing", missing), ("unexpected", unexpected), ("wrong shape", misshaped))
                if items]
    return "; ".join(problems) or None


def dtype_summary(tensors: Mapping[str, torch.Tensor]) -> str:
    """'float32', or 'mixed (float16, float32)'."""
    dtypes = sorted({str(tensor.dtype).removeprefix("torch.") for tensor in tensors.values()})
    return dtypes[0] if len(dtypes) == 1 else "mixed (" + ", ".join(dtypes) + ")"


def verify(build: Callable[[], nn.Module], tensors: Mapping[str, torch.Tensor], what: str,
           mismatch: Callable[[str], str], wrap: Callable[[nn.Module], nn.Module] | None = None) -> nn.Module:
    """The network ``build()`` makes, constructed on the meta device (no memory, no initialisation) within the
    :class:`construction_budget` of ``tensors`` and, with ``wrap``, wrapped (on the CPU: a preconditioner or
    an adapter around it); the state_dict of the result must have exactly the names and shapes of ``tensors``,
    otherwise CheckpointError(``mismatch(description)``)."""
    try:
        with construction_budget(tensors, what):
            with torch.device("meta"):
                module = construct(build, what)
            if wrap is not None:
                network = module
                module = construct(lambda: wrap(network), what)
    except OverBudget as exc:
        raise CheckpointError(mismatch(exc.description)) from None
    problem = layout_mismatch(shapes(module.state_dict()), shapes(tensors))
    if problem:
        raise CheckpointError(mismatch(problem))
    return module


def materialize(verified: nn.Module, build: Callable[[], nn.Module], tensors: Mapping[str, torch.Tensor],
                what: str, network: str = "") -> nn.Module:
    """The :func:`verify`-ed module on the CPU with ``tensors`` loaded strictly. The network (the submodule
    named ``network`` of a wrapped one) gets uninitialised memory; one with buffers that are not stored
    (computed by its constructor) is constructed again on the CPU instead."""
    target = verified.get_submodule(network)
    if {name for name, _ in target.named_buffers()} - set(target.state_dict()):
        with construction_budget(tensors, what):
            rebuilt = construct(build, what)
        if network:
            parent, _, name = network.rpartition(".")
            setattr(verified.get_submodule(parent), name, rebuilt)
        else:
            verified = rebuilt
    else:
        target.to_empty(device="cpu")
    try:
        verified.load_state_dict(tensors, strict=True)
    except RuntimeError as exc:
        raise CheckpointError(f"cannot load the weights into {what} ({_first_line(exc)})") from None
    return verified


def load_network(build: Callable[[], nn.Module], tensors: Mapping[str, torch.Tensor], what: str,
                 mismatch: Callable[[str], str] | None = None, wrap: Callable[[nn.Module], nn.Module] | None = None,
                 network: str = "") -> nn.Module:
    """:func:`verify` then :func:`materialize`: the network described by a file (``wrap``-ped, the wrapper
    holding it as submodule ``network``), with the file's weights."""
    mismatch = mismatch or (lambda problem: f"the weights do not match {what} ({problem})")
    return materialize(verify(build, tensors, what, mismatch, wrap), build, tensors, what, network)


def registered_network(config: Any, what: str) -> Callable[[], nn.Module]:
    """A builder for the registered network {"type", "kwargs"} named by a model file, its arguments checked."""
    if not isinstance(config, Mapping) or not isinstance(config.get("kwargs", {}), Mapping):
        raise CheckpointError(f"{what}: malformed network config (a table with 'type' and 'kwargs' expected)")
    check_arguments(dict(config), what)

    def build() -> nn.Module:
        return build_network(dict(config))

    return build


def load_wrapper(network_config: Any, tensors: Mapping[str, torch.Tensor], prefix: str, what: str,
                 wrap: Callable[[nn.Module], nn.Module]) -> nn.Module:
    """A model of the toolkit's file that wraps a registered network held as submodule ``prefix``: the network
    from its {"type", "kwargs"} config, wrapped, checked and loaded by :func:`load_network`."""
    return load_network(registered_network(network_config, what), tensors, what, wrap=wrap, network=prefix)
