"""The inputs of ``edm dataset``: an image folder or zip, CIFAR-10's python tarball, MNIST idx files, a numpy .npz.

Each source is an iterable of :class:`SourceImage` (one image, decoded only when asked, and its label) that holds
at most one image (one pickled batch for CIFAR-10) in memory at a time. Nothing in an input is executed: the
CIFAR-10 pickles are read by a restricted unpickler that rebuilds numpy arrays itself and refuses every other
object, and .npz arrays are parsed from their .npy headers (object arrays refused, as ``allow_pickle=False``).
"""

from __future__ import annotations

import gzip
import pickle
import re
import tarfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Callable, Iterator, Protocol

import numpy as np

from ..errors import EDMToolkitError
from ..io.images import ImageStore, decode_image
from .dataset import read_labels

@dataclass(frozen=True)
class SourceImage:
    """One input image: ``where`` names it in messages, ``load()`` returns it as uint8 HW (grayscale) or HWC
    (RGB), decoding it only then, so that a corrupt file is an error of that image alone."""

    where: str
    load: Callable[[], np.ndarray]
    label: int | list | None


class Source(Protocol):
    """An input of ``edm dataset``: its images in their order."""

    description: str
    count: int | None  # how many images it holds; None when only reading them all would tell

    def __iter__(self) -> Iterator[SourceImage]: ...


def _hw(image: np.ndarray) -> np.ndarray:
    """HWC with one channel -> HW, the form EDM's transforms take for grayscale."""
    return image[:, :, 0] if image.ndim == 3 and image.shape[2] == 1 else image


# --- image folder or zip ----------------------------------------------------------------------------------------


class ImageFilesSource:
    """Every image file of a folder or zip, sorted by path. Labels: the source's ``dataset.json`` when there is
    one (EDM's layout; ``"labels": null`` means none), otherwise the top-level sub-folder names, sorted, as class
    indices when there are at least two of them (EDM's rule, here applied to zips too)."""

    def __init__(self, path: Path):
        self.store = ImageStore(path)
        self.names = self.store.image_names()
        self.class_names: list[str] = []
        labels = read_labels(self.store) if "dataset.json" in self.store.names else None
        if labels is not None:
            missing = [n for n in self.names if n not in labels]
            if missing:
                raise EDMToolkitError(f"{self.store.where('dataset.json')} has no label for {missing[0]!r} "
                                      f"({len(missing)} of {len(self.names)} images); add the labels, or delete "
                                      f"dataset.json to convert without labels")
            self.labels = labels
            kind = "dataset.json"
        elif "dataset.json" not in self.store.names:
            top = {n: n.split("/")[0] if "/" in n else "" for n in self.names}
            classes = sorted(set(top.values()))
            self.labels = {n: classes.index(t) for n, t in top.items()} if len(classes) > 1 else {}
            self.class_names = classes if len(classes) > 1 else []
            kind = f"{len(classes)} sub-folder classes" if self.class_names else "no labels"
        else:
            self.labels, kind = {}, "no labels"
        what = "zip" if self.store.is_zip else "folder"
        self.count = len(self.names)
        self.description = f"image {what} {str(path)!r} ({self.count} images, {kind})"

    def __iter__(self) -> Iterator[SourceImage]:
        for name in self.names:
            yield SourceImage(self.store.where(name), lambda name=name: self._load(name), self.labels.get(name))

    def _load(self, name: str) -> np.ndarray:
        with self.store.open(name) as f:
            return _hw(decode_image(f, self.store.where(name)))


# --- CIFAR-10 python tarball ------------------------------------------------------------------------------------


class _Marker:
    """Stands for numpy.ndarray inside a pickle: it can only be passed to _reconstruct, never called."""

    __slots__ = ()


_NDARRAY = _Marker()


class _DtypeStub:
    """numpy.dtype(spec, align, copy) as a pickle builds it; BUILD then sets its byte order."""

    def __init__(self, spec, align=False, copy=False):
        spec = spec.decode("ascii") if isinstance(spec, bytes) else spec
        if not isinstance(spec, str) or not re.fullmatch(r"[biuf][1248]", spec):
            raise pickle.UnpicklingError(f"dtype {spec!r} is not a plain numeric dtype")
        self.spec, self.byteorder = spec, "|"

    def __setstate__(self, state):
        if not isinstance(state, tuple) or len(state) < 2:
            raise pickle.UnpicklingError("malformed dtype state")
        order = state[1].decode("ascii") if isinstance(state[1], bytes) else state[1]
        if order not in ("<", ">", "|", "="):
            raise pickle.UnpicklingError(f"dtype byte order {order!r}")
        self.byteorder = order

    def dtype(self) -> np.dtype:
        return np.dtype(self.spec).newbyteorder(self.byteorder) if self.byteorder in "<>" else np.dtype(self.spec)


class _ArrayStub:
    """numpy's _reconstruct(ndarray, shape, typecode) followed by BUILD with (version, shape, dtype, fortran,
    raw bytes): recorded here and turned into an array by :func:`_resolve`, never by numpy's own unpickling."""

    state = None

    def __setstate__(self, state):
        self.state = state


def _reconstruct(cls, shape, typecode):
    if cls is not _NDARRAY:
        raise pickle.UnpicklingError("_reconstruct of something other than numpy.ndarray")
    return _ArrayStub()


def _latin1(text, encoding="latin1"):
    """_codecs.encode as Python 3 pickles bytes at protocol 2: only str -> latin-1 bytes."""
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise pickle.UnpicklingError("_codecs.encode with other arguments than (str, 'latin1')")
    return text.encode("latin1")


class _ArrayUnpickler(pickle.Unpickler):
    """Allows exactly the globals a pickled dict of numeric numpy arrays, lists, ints and bytes needs, each
    mapped to the stand-ins above; anything else (a function, a class, os.system ...) is refused."""

    ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"): _reconstruct,
        ("numpy._core.multiarray", "_reconstruct"): _reconstruct,
        ("numpy", "ndarray"): _NDARRAY,
        ("numpy", "dtype"): _DtypeStub,
        ("_codecs", "encode"): _latin1,
    }

    def find_class(self, module, name):
        try:
            return self.ALLOWED[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(f"it asks for {module}.{name}") from None


def _resolve(obj):
    """Replaces the array stand-ins of an unpickled structure by numpy arrays, checking size against shape."""
    if isinstance(obj, dict):
        return {_key(k): _resolve(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_resolve(v) for v in obj]
    if isinstance(obj, _ArrayStub):
        state = obj.state
        if not (isinstance(state, tuple) and len(state) == 5 and isinstance(state[2], _DtypeStub)):
            raise pickle.UnpicklingError("malformed ndarray state")
        _, shape, dtype_stub, fortran, raw = state
        raw = raw.encode("latin1") if isinstance(raw, str) else raw
        if not (isinstance(shape, tuple) and all(isinstance(s, int) and s >= 0 for s in shape)
                and isinstance(raw, bytes)):
            raise pickle.UnpicklingError("malformed ndarray shape or data")
        dtype = dtype_stub.dtype()
        if int(np.prod(shape, dtype=np.int64)) * dtype.itemsize != len(raw):
            raise pickle.UnpicklingError(f"ndarray of shape {shape} with {len(raw)} bytes of data")
        return np.frombuffer(raw, dtype=dtype).reshape(shape, order="F" if fortran else "C")
    if isinstance(obj, (_Marker, _DtypeStub)) or callable(obj):
        raise pickle.UnpicklingError(f"unexpected {type(obj).__name__} object")
    return obj


def _key(key):
    return key.decode("latin1") if isinstance(key, bytes) else key


def load_array_pickle(file: IO[bytes], where: str):
    """A pickle of numeric numpy arrays, possibly inside dicts and lists with numbers and bytes (CIFAR-10's
    batches, written by Python 2 or 3, protocols 2-4), read without executing anything; bytes keys become str."""
    try:
        return _resolve(_ArrayUnpickler(file, encoding="bytes").load())
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError, KeyError) as exc:
        raise EDMToolkitError(f"{where} is not a plain pickle of arrays ({exc}); refusing to load it (a pickle "
                              f"can execute code): use the original file") from None


class Cifar10Source:
    """CIFAR-10's python tarball (cifar-10-python.tar.gz): the five training batches data_batch_1..5 in order
    (EDM's rule; test_batch is left out), images 3x32x32 stored row-major per channel, labels 0..9."""

    PREFIX = "cifar-10-batches-py/data_batch_"

    def __init__(self, path: Path):
        self.path = path
        try:
            with tarfile.open(path, "r:*") as tar:
                members = {m.name for m in tar.getmembers()}
        except (tarfile.TarError, OSError, EOFError) as exc:
            raise EDMToolkitError(f"{str(path)!r} is not a readable tarball ({exc}); download "
                                  f"cifar-10-python.tar.gz again") from None
        self.batches = [f"{self.PREFIX}{i}" for i in range(1, 6)]
        missing = [b for b in self.batches if b not in members]
        if missing:
            raise EDMToolkitError(f"{str(path)!r} has no {missing[0]}; it is not CIFAR-10's python tarball "
                                  f"(cifar-10-python.tar.gz from https://www.cs.toronto.edu/~kriz/cifar.html)")
        self.count = None  # 50,000 in the real file; counting would unpickle every batch twice
        self.description = f"CIFAR-10 tarball {str(path)!r} (training batches 1-5)"

    def _batches(self) -> Iterator[tuple[str, dict]]:
        with tarfile.open(self.path, "r:*") as tar:
            for name in self.batches:
                where = f"{self.path}:{name}"
                member = tar.extractfile(name)
                if member is None:
                    raise EDMToolkitError(f"{where} is not a regular file; download the tarball again")
                with member:
                    batch = load_array_pickle(member, where)
                data, labels = (batch.get("data"), batch.get("labels")) if isinstance(batch, dict) else (None, None)
                if not (isinstance(data, np.ndarray) and data.dtype == np.uint8 and data.ndim == 2
                        and data.shape[1] == 3 * 32 * 32 and isinstance(labels, list)
                        and len(labels) == data.shape[0]
                        and all(isinstance(v, int) and 0 <= v <= 9 for v in labels)):
                    raise EDMToolkitError(f"{where} is not a CIFAR-10 batch (uint8 data [N, 3072] and N labels in "
                                          f"0..9); download cifar-10-python.tar.gz again")
                yield where, batch

    def __iter__(self) -> Iterator[SourceImage]:
        for where, batch in self._batches():
            images = batch["data"].reshape(-1, 3, 32, 32)
            for i, label in enumerate(batch["labels"]):
                image = images[i].transpose(1, 2, 0)  # CHW -> HWC
                yield SourceImage(f"{where}[{i}]", lambda image=image: np.ascontiguousarray(image), label)


# --- MNIST idx files --------------------------------------------------------------------------------------------


def next_power_of_two(n: int) -> int:
    return 1 << (n - 1).bit_length()


def _open_maybe_gzip(path: Path) -> IO[bytes]:
    with open(path, "rb") as f:
        gzipped = f.read(2) == b"\x1f\x8b"
    return gzip.open(path, "rb") if gzipped else open(path, "rb")


def _read_exactly(f: IO[bytes], n: int, where: str) -> bytes:
    try:
        data = f.read(n)
    except (OSError, EOFError, gzip.BadGzipFile) as exc:
        raise EDMToolkitError(f"{where} cannot be read ({exc}); download it again") from None
    if len(data) != n:
        raise EDMToolkitError(f"{where} is truncated; download it again")
    return data


def _idx_header(f: IO[bytes], where: str, ndim: int) -> tuple[int, ...]:
    """An idx file's header: 0x00 0x00, type 0x08 (unsigned byte), ndim, then ndim big-endian uint32 sizes."""
    magic = _read_exactly(f, 4, where)
    if magic[:3] != b"\x00\x00\x08" or magic[3] != ndim:
        raise EDMToolkitError(f"{where} is not an idx file of unsigned bytes with {ndim} dimension(s) (magic "
                              f"{magic.hex()}, expected 000008{ndim:02x}); give MNIST's train-images-idx3-ubyte(.gz)")
    return tuple(int(v) for v in np.frombuffer(_read_exactly(f, 4 * ndim, where), dtype=">u4"))


def mnist_labels_path(images: Path) -> Path | None:
    """train-images-idx3-ubyte.gz -> train-labels-idx1-ubyte.gz (gzipped or not), if it exists."""
    stem = images.name.removesuffix(".gz").replace("images", "labels").replace("idx3", "idx1")
    for candidate in (images.with_name(stem + ".gz"), images.with_name(stem)):
        if candidate.is_file():
            return candidate
    return None


class MnistSource:
    """MNIST-style idx files (MNIST, Fashion-MNIST, KMNIST): images ``*-images-idx3-ubyte[.gz]`` and labels
    ``*-labels-idx1-ubyte[.gz]`` beside them, parsed from their headers and streamed one image at a time.
    Images are padded with zeros, centred, to the next power of two (28x28 -> 32x32 as EDM's dataset_tool)."""

    def __init__(self, path: Path):
        self.path = path
        labels = mnist_labels_path(path)
        if labels is None:
            expected = path.name.removesuffix(".gz").replace("images", "labels").replace("idx3", "idx1")
            raise EDMToolkitError(f"no labels file {expected}[.gz] next to {str(path)!r}; put MNIST's labels "
                                  f"file beside the images file")
        self.labels_path = labels
        with _open_maybe_gzip(path) as f:
            self.count, self.rows, self.cols = _idx_header(f, str(path), 3)
        with _open_maybe_gzip(labels) as f:
            (num_labels,) = _idx_header(f, str(labels), 1)
        if num_labels != self.count:
            raise EDMToolkitError(f"{str(labels)!r} holds {num_labels} labels but {str(path)!r} holds "
                                  f"{self.count} images; use the labels file of the same split")
        side = next_power_of_two(max(self.rows, self.cols, 1))
        self.pad = [((side - n) // 2, side - n - (side - n) // 2) for n in (self.rows, self.cols)]
        self.description = (f"idx files {str(path)!r} ({self.count} images {self.cols}x{self.rows}"
                            f"{f', padded to {side}x{side}' if side != self.rows or side != self.cols else ''})")

    def __iter__(self) -> Iterator[SourceImage]:
        size = self.rows * self.cols
        with _open_maybe_gzip(self.path) as images, _open_maybe_gzip(self.labels_path) as labels:
            _idx_header(images, str(self.path), 3)
            _idx_header(labels, str(self.labels_path), 1)
            for i in range(self.count):
                where = f"{self.path}[{i}]"
                pixels = np.frombuffer(_read_exactly(images, size, where), dtype=np.uint8)
                image = np.pad(pixels.reshape(self.rows, self.cols), self.pad)
                label = _read_exactly(labels, 1, f"{self.labels_path}[{i}]")[0]
                yield SourceImage(where, lambda image=image: image, int(label))


# --- numpy .npz -------------------------------------------------------------------------------------------------

NPZ_NAMES = (("images", "labels"), ("x", "y"), ("arr_0", "arr_1"))


class _NpyStream:
    """One array of an .npz read row by row from its .npy header and data, without loading it whole."""

    def __init__(self, archive: zipfile.ZipFile, member: str, where: str):
        self.archive, self.member, self.where = archive, member, where
        with archive.open(member) as f:
            self.shape, self.dtype, self.offset = self._header(f)
        self.row_bytes = int(np.prod(self.shape[1:], dtype=np.int64)) * self.dtype.itemsize

    def _header(self, f):
        try:
            version = np.lib.format.read_magic(f)
            read = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}
            if version not in read:
                raise ValueError(f"unsupported .npy version {version}")
            shape, fortran, dtype = read[version](f)
        except (ValueError, OSError, EOFError, zipfile.BadZipFile) as exc:
            raise EDMToolkitError(f"{self.where} is not a readable .npy array ({exc}); save it with np.savez") from None
        if dtype.hasobject:
            raise EDMToolkitError(f"{self.where} is an object array, which only a pickle can read; save plain "
                                  f"numeric arrays (allow_pickle=False)")
        if fortran and len(shape) > 1:
            raise EDMToolkitError(f"{self.where} is stored in Fortran order; save np.ascontiguousarray(x) instead")
        return shape, dtype, f.tell()

    def rows(self) -> Iterator[np.ndarray]:
        with self.archive.open(self.member) as f:
            f.read(self.offset)
            for i in range(self.shape[0]):
                data = _read_exactly(f, self.row_bytes, f"{self.where}[{i}]")
                yield np.frombuffer(data, dtype=self.dtype).reshape(self.shape[1:])


class NpzSource:
    """A numpy .npz of uint8 images ``images``, ``x`` or ``arr_0`` ([N, H, W], [N, H, W, C] or [N, C, H, W] with
    C = 1 or 3) and optional labels under the matching name ``labels``, ``y`` or ``arr_1`` (integer classes [N]
    or float vectors [N, D]); streamed one image at a time, compressed or not; object arrays are refused."""

    def __init__(self, path: Path):
        self.path = path
        try:
            self.archive = zipfile.ZipFile(path)
        except (zipfile.BadZipFile, OSError) as exc:
            raise EDMToolkitError(f"{str(path)!r} is not a readable .npz ({exc}); save it with np.savez") from None
        members = {m.removesuffix(".npy"): m for m in self.archive.namelist() if m.endswith(".npy")}
        pair = next(((x, y) for x, y in NPZ_NAMES if x in members), None)
        if pair is None:
            raise EDMToolkitError(f"{str(path)!r} holds arrays {sorted(members)} but none of "
                                  f"{', '.join(x for x, _ in NPZ_NAMES)}; save the images as 'images' (and labels "
                                  f"as 'labels')")
        self.images = _NpyStream(self.archive, members[pair[0]], f"{path}:{pair[0]}")
        self.layout = self._layout(self.images)
        self.labels = _NpyStream(self.archive, members[pair[1]], f"{path}:{pair[1]}") if pair[1] in members else None
        if self.labels is not None:
            self._check_labels(self.labels, self.images.shape[0])
        self.count = self.images.shape[0]
        kind = "no labels" if self.labels is None else f"labels {pair[1]!r}"
        self.description = f"npz {str(path)!r} ({self.images.shape[0]} images {pair[0]!r} {self.layout}, {kind})"

    @staticmethod
    def _layout(images: _NpyStream) -> str:
        shape, where = images.shape, images.where
        if images.dtype != np.uint8:
            raise EDMToolkitError(f"{where} is {images.dtype}; images must be uint8 in 0..255: save "
                                  f"np.clip(x, 0, 255).astype(np.uint8)")
        if len(shape) == 3:
            return "NHW"
        if len(shape) == 4 and shape[3] in (1, 3):
            return "NHWC"
        if len(shape) == 4 and shape[1] in (1, 3):
            return "NCHW"
        raise EDMToolkitError(f"{where} has shape {list(shape)}; images must be [N, H, W], [N, H, W, C] or "
                              f"[N, C, H, W] with C = 1 or 3")

    @staticmethod
    def _check_labels(labels: _NpyStream, count: int) -> None:
        shape, kind = labels.shape, labels.dtype.kind
        if not ((len(shape) == 1 and kind in "iu") or (len(shape) == 2 and kind in "iuf")):
            raise EDMToolkitError(f"{labels.where} is {labels.dtype} {list(shape)}; labels must be integer "
                                  f"classes [N] or numeric vectors [N, D]")
        if shape[0] != count:
            raise EDMToolkitError(f"{labels.where} holds {shape[0]} labels for {count} images; give one per image")

    def __iter__(self) -> Iterator[SourceImage]:
        labels = self.labels.rows() if self.labels is not None else None
        for i, image in enumerate(self.images.rows()):
            if self.layout == "NCHW":
                image = image.transpose(1, 2, 0)
            label = None
            if labels is not None:
                raw = next(labels)
                label = [float(v) for v in raw] if raw.ndim else int(raw)
                if isinstance(label, int) and label < 0:
                    raise EDMToolkitError(f"{self.labels.where}[{i}] is {label}; classes are 0, 1, 2, ...")
            yield SourceImage(f"{self.images.where}[{i}]", lambda image=image: _hw(np.ascontiguousarray(image)),
                              label)


# --- which source -----------------------------------------------------------------------------------------------

SOURCE_KINDS = (
    "an image folder or .zip (labels from dataset.json or sub-folder names)",
    "cifar-10-python.tar.gz",
    "MNIST *-images-idx3-ubyte[.gz] (labels file beside it)",
    "a numpy .npz (images/x/arr_0 + labels/y/arr_1)",
)


def open_source(source: str | Path) -> Source:
    """The input format, from the path as EDM's dataset_tool guesses it (folder, .zip, tarball, idx, .npz)."""
    path = Path(source)
    if not path.exists():
        raise EDMToolkitError(f"--source {str(source)!r} does not exist; give {', '.join(SOURCE_KINDS)}")
    if path.is_dir():
        if path.name.endswith("_lmdb") and (path / "data.mdb").exists():
            raise EDMToolkitError(f"{str(source)!r} is an LSUN lmdb database, which edm dataset does not read; "
                                  f"export its images to a folder first")
        return ImageFilesSource(path)
    name = path.name.lower()
    if name.endswith(".npz"):
        return NpzSource(path)
    if name.endswith(".zip"):
        return ImageFilesSource(path)
    if name.endswith((".tar.gz", ".tgz", ".tar")):
        return Cifar10Source(path)
    if "idx3-ubyte" in name:
        return MnistSource(path)
    raise EDMToolkitError(f"--source {str(source)!r} is of no known kind; give {', '.join(SOURCE_KINDS)}")
