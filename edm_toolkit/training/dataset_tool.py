"""``edm dataset``: any supported source -> EDM's dataset layout (EDM's dataset_tool.py, streamed and atomic).

Output, as EDM's dataset_tool writes it: images ``{idx:08d}[:5]/img{idx:08d}.png`` (idx = the image's position in
the source, so an image left out leaves a gap), uncompressed PNGs (compress_level 0) in a folder or an
uncompressed (ZIP_STORED) zip, and ``dataset.json`` = ``{"labels": [[name, label], ...]}``, or
``{"labels": null}`` unless every image has a label. All images must come out square, of the same power-of-two
size and with 1 or 3 channels.

Transforms (EDM's): none = resize to --resolution (when given and different) with Lanczos; ``center-crop`` =
crop the centred square of side min(H, W), then Lanczos to WxH (grayscale becomes RGB); ``center-crop-wide`` =
crop the centred rows of height round(W * H_in / W_in), Lanczos to WxH, and centre that on a black WxW canvas
(images narrower than W or shorter than H are left out; RGB).

Memory stays bounded by one image (one pickled batch for CIFAR-10) whatever the dataset size: the labels are
streamed to a temporary file and the output is built under a temporary name that is renamed into place only
when complete, so a failed or interrupted run leaves no half-written --dest.
"""

from __future__ import annotations

import io
import json
import os
import secrets
import shutil
import tempfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Callable, Optional, Protocol

import numpy as np
from PIL import Image

from ..errors import EDMToolkitError
from .dataset import LABELS_FILE, is_power_of_two
from .dataset_sources import Source, next_power_of_two, open_source

TRANSFORMS = ("center-crop", "center-crop-wide")

Transform = Callable[[np.ndarray], Optional[np.ndarray]]


def archive_name(idx: int) -> str:
    """EDM's output name of source image ``idx``: 00000/img00000000.png, 00001/img00001000.png, ..."""
    idx_str = f"{idx:08d}"
    return f"{idx_str[:5]}/img{idx_str}.png"


def _lanczos(image: np.ndarray, width: int, height: int) -> np.ndarray:
    mode = "L" if image.ndim == 2 else "RGB"
    return np.asarray(Image.fromarray(image, mode).resize((width, height), Image.LANCZOS))


def _rgb(image: np.ndarray) -> np.ndarray:
    return image[:, :, np.newaxis].repeat(3, axis=2) if image.ndim == 2 else image


def make_transform(transform: str | None, resolution: tuple[int, int] | None) -> Transform:
    """EDM's crop/resize of one HW or HWC uint8 image; returns None for an image center-crop-wide leaves out."""
    if transform is not None and transform not in TRANSFORMS:
        raise EDMToolkitError(f"unknown --transform {transform!r}; choose {' or '.join(TRANSFORMS)}")
    if transform is not None and resolution is None:
        raise EDMToolkitError(f"--transform {transform} needs --resolution WxH (e.g. 256x256)")
    if resolution is None:
        return lambda image: image
    width, height = resolution

    def scale(image):
        if image.shape[1] == width and image.shape[0] == height:
            return image
        return _lanczos(image, width, height)

    def center_crop(image):
        crop = min(image.shape[:2])
        top, left = (image.shape[0] - crop) // 2, (image.shape[1] - crop) // 2
        return _lanczos(_rgb(image[top:top + crop, left:left + crop]), width, height)

    def center_crop_wide(image):
        rows = int(np.round(width * image.shape[0] / image.shape[1]))
        if image.shape[1] < width or rows < height:
            return None
        top = (image.shape[0] - rows) // 2
        strip = _lanczos(_rgb(image[top:top + rows]), width, height)
        canvas = np.zeros([width, width, 3], dtype=np.uint8)
        canvas[(width - height) // 2:(width + height) // 2, :] = strip
        return canvas

    return {None: scale, "center-crop": center_crop, "center-crop-wide": center_crop_wide}[transform]


def parse_resolution(text: str) -> tuple[int, int]:
    """'WxH' or 'W,H' (EDM's syntax) -> (W, H)."""
    parts = text.lower().replace(",", "x").split("x")
    if len(parts) != 2 or not all(p.strip().isdigit() and len(p.strip()) <= 5 and int(p) > 0 for p in parts):
        raise EDMToolkitError(f"--resolution {text[:40]!r} is not WxH with positive integers of at most 5 digits, "
                              "e.g. 32x32")
    return int(parts[0]), int(parts[1])


def encode_png(image: np.ndarray) -> bytes:
    """An uncompressed PNG (EDM: compress_level 0, fast to decode in the training loop); 'L' or 'RGB'."""
    buffer = io.BytesIO()
    Image.fromarray(image, "L" if image.ndim == 2 else "RGB").save(buffer, format="PNG", compress_level=0,
                                                                    optimize=False)
    return buffer.getvalue()


# --- the output -------------------------------------------------------------------------------------------------


class Destination(Protocol):
    """The output, built under a temporary name beside --dest: renamed onto it by commit(), deleted by abort()."""

    def write(self, name: str, data: bytes) -> None: ...

    def open(self, name: str) -> IO[bytes]: ...

    def commit(self) -> None: ...

    def abort(self) -> None: ...


class _ZipDestination:
    def __init__(self, dest: Path):
        dest.parent.mkdir(parents=True, exist_ok=True)
        self.dest = dest
        self.tmp = _temporary_name(dest)
        self.file = open(self.tmp, "xb")
        self.zip = zipfile.ZipFile(self.file, "w", compression=zipfile.ZIP_STORED)

    def write(self, name, data):
        self.zip.writestr(name, data)

    def open(self, name):
        return self.zip.open(name, "w")

    def commit(self):
        self.zip.close()
        self.file.close()
        os.replace(self.tmp, self.dest)

    def abort(self):
        try:
            self.zip.close()
        except (OSError, ValueError):
            pass  # the error that made us abort is the one to report
        finally:
            self.file.close()
            self.tmp.unlink(missing_ok=True)


class _FolderDestination:
    def __init__(self, dest: Path):
        if dest.exists() and (not dest.is_dir() or any(dest.iterdir())):
            raise EDMToolkitError(f"--dest folder {str(dest)!r} exists and is not empty; give a new or empty "
                                  f"folder (or a .zip)")
        dest.parent.mkdir(parents=True, exist_ok=True)
        self.dest = dest
        self.tmp = _temporary_name(dest)
        self.tmp.mkdir()

    def write(self, name, data):
        path = self.tmp / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)

    def open(self, name):
        return open(self.tmp / name, "wb")

    def commit(self):
        if self.dest.exists():
            self.dest.rmdir()  # checked empty at the start
        os.replace(self.tmp, self.dest)

    def abort(self):
        shutil.rmtree(self.tmp, ignore_errors=True)


def _temporary_name(dest: Path) -> Path:
    """A hidden sibling of --dest; created by the caller with ordinary permissions (mkstemp's would be 0600)."""
    return dest.with_name(f".{dest.name}.{secrets.token_hex(4)}.tmp")


def open_destination(dest: str | Path) -> Destination:
    """--dest ending in .zip -> an uncompressed zip; anything else -> a new or empty folder."""
    if str(dest) == "":
        raise EDMToolkitError("--dest must not be empty; give a folder or a .zip")
    dest = Path(dest)
    return _ZipDestination(dest) if dest.suffix.lower() == ".zip" else _FolderDestination(dest)


class _LabelStream:
    """dataset.json's label list spooled to a temporary file, so memory does not grow with the dataset; written
    as json.dumps would write the whole list, or null once any image has no label (EDM's rule). Labels must be
    all class integers >= 0 or all numeric vectors of one length, as the reader takes them."""

    def __init__(self):
        self.file = tempfile.TemporaryFile()
        self.count = 0
        self.missing = 0
        self.width: int | None = None  # 0 for class integers, else the vector length
        self.max_class = -1

    def add(self, name: str, label, where: str) -> None:
        if label is None:
            self.missing += 1
            return
        if isinstance(label, int) and not isinstance(label, bool) and label >= 0:
            width, self.max_class = 0, max(self.max_class, label)
        elif isinstance(label, list) and label and all(isinstance(v, (int, float)) and not isinstance(v, bool)
                                                       for v in label):
            width = len(label)
        else:
            raise EDMToolkitError(f"{where} has label {json.dumps(label)[:40]}; labels must be class integers >= 0 "
                                  f"or lists of numbers: fix the source's labels")
        if self.width is not None and width != self.width:
            raise EDMToolkitError(f"{where} has label {json.dumps(label)[:40]} unlike the labels before it; give "
                                  f"every image a class integer, or every image a vector of the same length")
        self.width = width
        if not self.missing:
            self.file.write(((", " if self.count else "") + json.dumps([name, label])).encode())
        self.count += 1

    @property
    def label_dim(self) -> int:
        """Classes (max + 1) or the vector length; 0 when dataset.json will say null."""
        if not self.complete:
            return 0
        return self.width or self.max_class + 1

    @property
    def complete(self) -> bool:
        return self.missing == 0 and self.count > 0

    def write_json(self, out: IO[bytes]) -> None:
        if not self.complete:
            out.write(json.dumps({"labels": None}).encode())
            return
        out.write(b'{"labels": [')
        self.file.seek(0)
        shutil.copyfileobj(self.file, out)
        out.write(b"]}")

    def close(self) -> None:
        self.file.close()


# --- the conversion ---------------------------------------------------------------------------------------------


@dataclass
class ConversionResult:
    """What ``convert_dataset`` wrote and left out."""

    dest: Path
    written: int = 0
    resolution: int = 0
    channels: int = 0
    label_dim: int = 0  # classes (max label + 1) or label vector width; 0 = dataset.json labels are null
    label_vectors: bool = False  # labels are vectors, not class integers
    unlabelled: int = 0  # images without a label (then dataset.json says null)
    too_small: int = 0  # left out by center-crop-wide
    skipped: int = 0  # left out by --skip-bad
    skip_reasons: list[str] = field(default_factory=list)  # why, for the first few of them


Progress = Callable[[int, Optional[int]], None]


def convert_dataset(source: str | Path | Source, dest: str | Path, *, max_images: int | None = None,
                    transform: str | None = None, resolution: tuple[int, int] | None = None,
                    skip_bad: bool = False, progress: Progress | None = None) -> ConversionResult:
    """Converts ``source`` (a path, see :func:`open_source`, or an opened source) into EDM's layout at ``dest``.

    ``max_images`` counts source images (EDM's rule, including any left out); ``skip_bad`` leaves out images that
    do not decode or whose size/channels differ from the first one's, instead of stopping with an error;
    ``progress(done, total)`` is called after each source image (total None when the source cannot tell).
    """
    if max_images is not None and max_images < 0:
        raise EDMToolkitError(f"--max-images must be >= 0, got {max_images}")
    transform_image = make_transform(transform, resolution)
    src = open_source(source) if isinstance(source, (str, os.PathLike)) else source
    total = src.count if max_images is None else (max_images if src.count is None else min(src.count, max_images))
    out = open_destination(dest)
    result = ConversionResult(Path(dest))
    labels = _LabelStream()
    first: tuple[int, int, int] | None = None
    first_where = ""
    try:
        for idx, item in enumerate(src):
            if max_images is not None and idx >= max_images:
                break
            name = archive_name(idx)
            image, bad = None, None
            try:
                image = transform_image(item.load())
            except EDMToolkitError as exc:  # the file does not decode
                bad = str(exc)
            if image is not None:
                shape = (image.shape[1], image.shape[0], 1 if image.ndim == 2 else image.shape[2])
                if first is None:
                    _check_first(shape, item.where)  # a property of the whole dataset: never skipped
                    first, first_where = shape, item.where
                if shape != first:
                    bad = (f"{item.where} (-> {name}) is {_describe(shape)} but {first_where} is "
                           f"{_describe(first)}; all images must have the same size and channels: give "
                           f"--resolution WxH (or --skip-bad to leave such images out)")
            if bad is not None:
                if not skip_bad:
                    raise EDMToolkitError(bad)
                result.skipped += 1
                if len(result.skip_reasons) < 5:
                    result.skip_reasons.append(bad)
            elif image is None:
                result.too_small += 1
            else:
                labels.add(name, item.label, item.where)
                out.write(name, encode_png(image))
                result.written += 1
            if progress is not None:
                progress(idx + 1, total)
        if result.written == 0:
            why = f"{result.skipped} bad, {result.too_small} smaller than --resolution"
            raise EDMToolkitError(f"no images were written from {src.description} ({why}); check --source, "
                                  f"--max-images and --resolution")
        with out.open(LABELS_FILE) as f:
            labels.write_json(f)
        out.commit()
    except BaseException:
        out.abort()
        raise
    finally:
        labels.close()
    result.resolution, result.channels = first[0], first[2]
    result.unlabelled, result.label_dim = labels.missing, labels.label_dim
    result.label_vectors = bool(labels.width)
    return result


def _check_first(shape: tuple[int, int, int], where: str) -> None:
    width, height, channels = shape
    if width != height:
        raise EDMToolkitError(f"{where} comes out {width}x{height}; images must be square: give --resolution RxR, "
                              f"or --transform center-crop --resolution RxR")
    if not is_power_of_two(width):
        side = next_power_of_two(width)
        raise EDMToolkitError(f"{where} comes out {width}x{height}; the size must be a power of two: give "
                              f"--resolution RxR (e.g. {side}x{side})")
    if channels not in (1, 3):  # the sources only produce L or RGB; kept as EDM's check
        raise EDMToolkitError(f"{where} has {channels} channels; images must be RGB or grayscale")


def _describe(shape: tuple[int, int, int]) -> str:
    width, height, channels = shape
    return f"{width}x{height} with {channels} channel{'s' if channels != 1 else ''}"
