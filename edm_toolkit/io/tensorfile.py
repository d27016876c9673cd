"""Tensor files read with memory bounded by what they hold, and written atomically.

A model file is untrusted input: a few hundred bytes must not make a reader allocate gigabytes. Every reader of
the toolkit goes through these checks (docs/security.md):

* torch zip files (``torch.save``): the zip directory is checked before anything is unpickled. Every record
  must be stored uncompressed (a deflated record inflates a thousandfold) and the records together must be no
  larger than the file (so no two records share bytes). Legacy (pre-zip) torch files are refused: their
  reader allocates each storage at the size the file declares before reading it.
* every tensor read from a file must be a plain view of its storage (:func:`check_view`): each element
  reachable once (no zero or overlapping strides, which let one stored number pose as gigabytes), inside the
  storage; and all tensors of a file together no larger than their storages (:func:`check_tensors`).
* safetensors: a JSON header and one byte buffer, read here without the optional ``safetensors`` package; every
  tensor's byte range must lie in the buffer, fit its dtype and shape, and overlap no other.

Files are written by :func:`edm_toolkit.io.outputs.write_atomically` (a temporary file and ``os.replace``), with the mode a plain
``open`` gives (0666 less the umask), and never over something that is not a regular file.
"""

from __future__ import annotations

import json
import math
import pickle
import sys
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import IO, Any

import torch

from ..errors import CheckpointError

ZIP_MAGIC = b"PK\x03\x04"
# The legacy torch.save stream starts with a protocol-2 pickle of torch's magic number.
LEGACY_TORCH_MAGIC = b"\x80\x02\x8a\x0al\xfc\x9cF\xf9 j\xa8P\x19"
SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}
_SAFETENSORS_NAMES = {dtype: name for name, dtype in SAFETENSORS_DTYPES.items()}
MAX_SAFETENSORS_HEADER = 100_000_000  # the safetensors library's own bound


def sniff_container(head: bytes, size: int) -> str | None:
    """What kind of container a file is, from its first 16 bytes and its size: 'safetensors' (an 8-byte header
    length that fits the file, then '{'), 'torch-zip', 'torch-legacy', 'pickle' (protocol 2 to 5) or None."""
    if len(head) > 8 and head[8:9] == b"{" and 2 <= int.from_bytes(head[:8], "little") <= size - 8:
        return "safetensors"  # checked first: about 1 in 256 header lengths starts with a pickle's 0x80
    if head.startswith(ZIP_MAGIC):
        return "torch-zip"
    if head.startswith(LEGACY_TORCH_MAGIC):
        return "torch-legacy"
    if len(head) > 1 and head[0] == 0x80 and 2 <= head[1] <= 5:
        return "pickle"
    return None


def _first_line(exc: BaseException) -> str:
    text = str(exc)
    if "WeightsUnpickler error:" in text:  # torch's weights-only refusals: keep the unpickler's own reason
        text = text.split("WeightsUnpickler error:", 1)[1]
    return next((line.strip() for line in text.splitlines() if line.strip()), type(exc).__name__)[:160]


# ----------------------------------------------------------------------------------------------------------
# torch zip files


def check_zip_records(archive: zipfile.ZipFile, file_size: int, source: str, unread: tuple[str, ...] = ()) -> None:
    """Refuses compressed records and records that together claim more bytes than the file has. Records under
    the folders ``unread`` are left out: the reader never opens them (TorchScript's ``code/``, which
    ``torch.jit.save`` deflates)."""
    total = 0
    for info in archive.infolist():
        if info.filename.startswith(unread):  # () matches nothing
            continue
        if info.compress_type != zipfile.ZIP_STORED or info.compress_size != info.file_size:
            raise CheckpointError(f"{source}: record {info.filename!r} is compressed; torch.save stores every record "
                                  "uncompressed, and a compressed one could inflate far beyond the file's size")
        total += info.file_size
    if total > file_size:
        raise CheckpointError(f"{source}: its zip records claim {total:,} bytes in a {file_size:,}-byte file "
                              "(records that share bytes); refused")


def read_torch(path: Path) -> Any:
    """The object of a torch zip file, read with ``torch.load(weights_only=True)`` after the zip directory is
    checked, its tensors checked by :func:`check_tensors`. Raises CheckpointError naming the problem."""
    size = path.stat().st_size
    with open(path, "rb") as stream:
        head = stream.read(16)
    kind = sniff_container(head, size)
    if kind == "torch-legacy":
        raise CheckpointError(f"{path} is a legacy torch file (saved by torch < 1.6), which cannot be read with "
                              "bounded memory; load and save it again with a current torch.save")
    if kind in ("pickle", "safetensors"):
        other = ("a plain pickle (EDM network pickles are read by edm_toolkit.loading.load_denoiser, "
                 "edm generate --network)" if kind == "pickle" else "a safetensors file")
        raise CheckpointError(f"{path} is {other}, not a torch checkpoint (the zip file torch.save writes)")
    try:
        with zipfile.ZipFile(path) as archive:
            check_zip_records(archive, size, str(path))
    except CheckpointError:
        raise
    except (zipfile.BadZipFile, OSError, EOFError, ValueError) as exc:
        raise CheckpointError(f"{path} cannot be read: it is not a readable torch checkpoint ({_first_line(exc)})"
                              ) from None
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:  # torch's weights-only unpickler refused something
        detail = _first_line(exc)
        if "global" in detail.lower():
            raise CheckpointError(f"{path} refers to Python code or classes ({detail[:120]}); it was refused "
                                  "unread: torch.load(weights_only=True) admits only tensors and plain data") from None
        raise CheckpointError(f"{path} cannot be read: it is not a readable torch checkpoint ({detail})") from None
    except (RuntimeError, EOFError, ValueError, zipfile.BadZipFile, OSError) as exc:
        raise CheckpointError(f"{path} cannot be read: it is not a readable torch checkpoint ({_first_line(exc)})"
                              ) from None
    check_tensors(obj, str(path))
    return obj


# ----------------------------------------------------------------------------------------------------------
# Tensor views


def check_view(storage_numel: int, offset: int, size, stride, what: str) -> None:
    """Refuses a view that reaches an element twice (a zero or overlapping stride) or leaves its storage.

    With the dimensions of more than one element sorted by stride, each stride must exceed the last index the
    smaller ones reach; then every index maps to its own element.
    """
    if any(n == 0 for n in size):
        return
    extent = 1  # elements spanned by the dimensions seen so far
    for step, n in sorted((step, n) for n, step in zip(size, stride) if n > 1):
        if step < extent:
            raise CheckpointError(f"{what} has {'a zero' if step == 0 else 'an overlapping'} stride (size "
                                  f"{list(size)}, stride {list(stride)}): its elements would repeat stored values, "
                                  "posing as more data than the file holds; refused")
        extent += step * (n - 1)
    if offset + extent > storage_numel:
        raise CheckpointError(f"{what} reaches past the end of its storage (offset {offset}, size {list(size)}, "
                              f"stride {list(stride)}, storage of {storage_numel} elements)")


def check_tensors(obj: Any, source: str) -> None:
    """Every tensor in ``obj`` (nested dicts, lists, tuples, sets) passes :func:`check_view`, and the tensors
    together are no larger than the storages they view, so that copying them costs at most the file's size.

    Every occurrence counts: one stored tensor under many names would be copied once per name when loaded."""
    storages: dict[int, int] = {}
    view_bytes = 0
    seen: set[int] = set()  # containers already walked (a pickle may reference one from several places)
    pending: list[tuple[Any, str]] = [(obj, "")]
    while pending:
        item, where = pending.pop()
        if isinstance(item, torch.Tensor):
            storage = item.untyped_storage()
            itemsize = item.element_size()
            check_view(storage.nbytes() // itemsize, item.storage_offset(), tuple(item.shape), item.stride(),
                       f"{source}: tensor {where or '(top level)'}")
            storages[storage.data_ptr()] = max(storages.get(storage.data_ptr(), 0), storage.nbytes())
            view_bytes += item.numel() * itemsize
            continue
        if id(item) in seen:
            continue
        seen.add(id(item))
        if isinstance(item, Mapping):
            pending.extend((value, f"{where}.{key}" if where else str(key)) for key, value in item.items())
        elif isinstance(item, (list, tuple, set, frozenset)):
            pending.extend((value, f"{where}[{index}]") for index, value in enumerate(item))
    if view_bytes > sum(storages.values()):
        raise CheckpointError(f"{source}: its tensors claim {view_bytes:,} bytes but store {sum(storages.values()):,} "
                              "(tensors that share stored values); refused")


# ----------------------------------------------------------------------------------------------------------
# safetensors


def read_safetensors(path: Path) -> tuple[dict[str, str], dict[str, torch.Tensor]]:
    """(metadata, tensors) of a safetensors file; the tensors are views of one buffer of the file's size."""
    if sys.byteorder != "little":
        raise CheckpointError(f"{path}: safetensors files are little-endian; this reader runs on little-endian CPUs")
    data = bytearray(path.read_bytes())
    length = int.from_bytes(data[:8], "little")
    if not 2 <= length <= min(len(data) - 8, MAX_SAFETENSORS_HEADER):
        raise CheckpointError(f"{path} is not a safetensors file (header length {length} does not fit the file)")
    try:
        header = json.loads(data[8:8 + length].decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise CheckpointError(f"{path}: malformed safetensors header ({_first_line(exc)})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: malformed safetensors header (not a JSON object)")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise CheckpointError(f"{path}: malformed safetensors metadata (it must map names to strings)")
    buffer = memoryview(data)[8 + length:]
    tensors, spans = {}, []
    for name, entry in header.items():
        tensors[name] = _safetensors_entry(buffer, name, entry, f"{path}: tensor {name!r}")
        spans.append(tuple(entry["data_offsets"]))
    spans.sort()
    if any(begin < end for (_, end), (begin, _) in zip(spans, spans[1:])):
        raise CheckpointError(f"{path}: safetensors byte ranges overlap; refused")
    return metadata, tensors


def _safetensors_entry(buffer: memoryview, name: str, entry: Any, what: str) -> torch.Tensor:
    if not (isinstance(entry, dict) and entry.get("dtype") in SAFETENSORS_DTYPES and isinstance(entry.get("shape"), list)
            and isinstance(entry.get("data_offsets"), list) and len(entry["data_offsets"]) == 2):
        raise CheckpointError(f"{what}: malformed entry (dtype, shape and data_offsets expected)")
    shape, (begin, end) = entry["shape"], entry["data_offsets"]
    if not all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in (*shape, begin, end)):
        raise CheckpointError(f"{what}: malformed shape or offsets")
    dtype = SAFETENSORS_DTYPES[entry["dtype"]]
    itemsize = torch.empty((), dtype=dtype).element_size()
    if not begin <= end <= len(buffer) or end - begin != math.prod(shape) * itemsize:
        raise CheckpointError(f"{what}: byte range [{begin}, {end}) does not fit its shape {shape} and dtype "
                              f"{entry['dtype']} inside the {len(buffer)}-byte buffer")
    if begin == end:
        return torch.empty(shape, dtype=dtype)
    return torch.frombuffer(buffer, dtype=dtype, count=math.prod(shape), offset=begin).reshape(shape)


def write_safetensors(stream: IO[bytes], tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str]) -> None:
    """Writes ``tensors`` (CPU, any layout) and string ``metadata`` in the safetensors format, the tensors ordered
    by alignment and name, the header padded with spaces to a multiple of 8 bytes as the library writes it."""
    order = sorted(tensors, key=lambda name: (-tensors[name].element_size(), name))
    header: dict[str, Any] = {"__metadata__": dict(metadata)} if metadata else {}
    offset = 0
    for name in order:
        tensor = tensors[name]
        if tensor.dtype not in _SAFETENSORS_NAMES:
            raise CheckpointError(f"tensor {name!r} has dtype {tensor.dtype}, which safetensors cannot store")
        nbytes = tensor.numel() * tensor.element_size()
        header[name] = {"dtype": _SAFETENSORS_NAMES[tensor.dtype], "shape": list(tensor.shape),
                        "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    text = json.dumps(header, separators=(",", ":")).encode("utf-8")
    text += b" " * (-len(text) % 8)
    stream.write(len(text).to_bytes(8, "little"))
    stream.write(text)
    for name in order:
        flat = tensors[name].detach().cpu().contiguous().reshape(-1)
        if flat.numel():
            stream.write(flat.view(torch.uint8).numpy().tobytes())


# ----------------------------------------------------------------------------------------------------------
# Writing
