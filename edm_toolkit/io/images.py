"""Image files: reading a folder or zip of images safely, and turning samples into PNG files (EDM's uint8
conversion, atomic writes, grids).

Reading is shared by the training datasets and the FID statistics: the image files of a folder (recursively) or a
zip, in EDM's sorted order, opened one at a time, decoded only by formats PIL handles in-process (an EPS file,
which PIL hands to Ghostscript, is never opened).
"""

from __future__ import annotations

import math
import os
import zipfile
import zlib
from pathlib import Path
from typing import IO, Sequence

import numpy as np
import torch
from PIL import Image

from ..errors import EDMToolkitError
from .outputs import write_atomically

# Formats decoded in-process by PIL itself; EPS (Ghostscript) and the stub formats are never opened.
SAFE_IMAGE_FORMATS = ("PNG", "JPEG", "BMP", "DIB", "GIF", "TIFF", "WEBP", "PPM", "TGA")
# Modes that PIL's convert('RGB') turns into 8-bit RGB (alpha dropped, palette expanded), as EDM's fid.py reads.
_RGB_CONVERTIBLE = frozenset({"1", "L", "P", "PA", "RGB", "RGBA", "RGBa", "RGBX", "LA", "La", "CMYK", "YCbCr",
                              "LAB", "HSV"})
_DECODE_ERRORS = (OSError, ValueError, SyntaxError, EOFError, zlib.error, zipfile.BadZipFile,
                  Image.DecompressionBombError)


def is_image_name(name: str) -> bool:
    """EDM's rule: a file is an image when its (lower-cased) extension is one PIL registers."""
    Image.init()
    return os.path.splitext(name)[1].lower() in Image.EXTENSION


class ImageStore:
    """The files of a dataset folder or zip, by their '/'-separated path inside it.

    A zip is opened lazily once per process (the handle is dropped when pickled and reopened after a fork), so
    one store can be shared by DataLoader worker processes.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if not self.path.exists():
            raise EDMToolkitError(f"{str(self.path)!r} not found; give a folder or a .zip of images (a dataset "
                                  f"made by 'edm dataset' or EDM's dataset_tool.py)")
        self.is_zip = self.path.is_file()
        self._zip: zipfile.ZipFile | None = None
        self._zip_pid: int | None = None
        if self.is_zip:
            if self.path.suffix.lower() != ".zip":
                raise EDMToolkitError(f"{str(self.path)!r} is neither a folder nor a .zip; convert it first with "
                                      f"'edm dataset --source {self.path} --dest DATASET.zip'")
            names = [n for n in self._zipfile().namelist() if not n.endswith("/")]
        else:
            names = [p.relative_to(self.path).as_posix() for p in self.path.rglob("*") if p.is_file()]
        self.names = frozenset(names)

    def _zipfile(self) -> zipfile.ZipFile:
        if self._zip is None or self._zip_pid != os.getpid():
            try:
                self._zip = zipfile.ZipFile(self.path)
            except (zipfile.BadZipFile, OSError) as exc:
                raise EDMToolkitError(f"{str(self.path)!r} is not a readable zip ({exc}); rebuild it with "
                                      f"'edm dataset'") from None
            self._zip_pid = os.getpid()
        return self._zip

    def image_names(self) -> list[str]:
        """Every image file, sorted by path (EDM's order)."""
        return sorted(n for n in self.names if is_image_name(n))

    def open(self, name: str) -> IO[bytes]:
        if self.is_zip:
            return self._zipfile().open(name, "r")
        return open(self.path / name, "rb")

    def where(self, name: str) -> str:
        """How an error names one file of the store."""
        return f"{self.path}:{name}" if self.is_zip else str(self.path / name)

    def close(self) -> None:
        if self._zip is not None and self._zip_pid == os.getpid():
            self._zip.close()
        self._zip = None

    def __getstate__(self):
        return dict(self.__dict__, _zip=None, _zip_pid=None)


def decode_image(file: IO[bytes], where: str, *, rgb: bool = False) -> np.ndarray:
    """One image file -> uint8 HWC. By default (datasets) C = 1 or 3: palette and 1-bit images become RGB and L,
    images with alpha or of more than 8 bits per channel are refused with the fix. With ``rgb`` (EDM's fid.py)
    every 8-bit mode is converted to RGB, alpha dropped. Files that do not decode are refused naming ``where``."""
    Image.init()
    formats = [f for f in SAFE_IMAGE_FORMATS if f in Image.OPEN]  # a Pillow may be built without WebP
    try:
        with Image.open(file, formats=formats) as image:
            if rgb and image.mode in _RGB_CONVERTIBLE:
                image = image.convert("RGB")
            elif image.mode == "P":
                image = image.convert("RGBA" if "transparency" in image.info else "RGB")
            elif image.mode == "1":
                image = image.convert("L")
            if image.mode not in ("L", "RGB"):
                raise EDMToolkitError(f"{where} has mode {image.mode}; use grayscale (L) or RGB images: flatten "
                                      f"the alpha channel or convert it to 8-bit RGB first")
            array = np.asarray(image)
    except Image.UnidentifiedImageError:
        raise EDMToolkitError(f"{where} is not an image of a supported format ({', '.join(SAFE_IMAGE_FORMATS)});"
                              f" convert it to PNG or remove it") from None
    except EDMToolkitError:
        raise
    except _DECODE_ERRORS as exc:
        raise EDMToolkitError(f"cannot read image {where}: it cannot be decoded ({exc}); replace or remove the "
                              "file") from None
    return array[:, :, np.newaxis] if array.ndim == 2 else array


def quantize(images: torch.Tensor) -> torch.Tensor:
    """float images [N, C, H, W] in [-1, 1] -> uint8 [N, C, H, W], as EDM's generate.py: (x 127.5 + 128).clip(0,
    255)."""
    return (images * 127.5 + 128).clip(0, 255).to(torch.uint8)


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """[N, C, H, W] in [-1, 1] -> uint8 [N, H, W, C] numpy arrays, as PNG files hold them (:func:`quantize`)."""
    return quantize(images).permute(0, 2, 3, 1).cpu().numpy()


def save_png(image: np.ndarray, path: str | Path) -> None:
    """Writes one HWC uint8 image ('L' for one channel, else 'RGB') atomically, with the permissions the umask
    gives (:func:`edm_toolkit.io.outputs.write_atomically`): a reader or an interrupted run never sees a truncated
    file."""
    picture = Image.fromarray(image[:, :, 0], "L") if image.shape[2] == 1 else Image.fromarray(image, "RGB")
    write_atomically(path, lambda f: picture.save(f, format="PNG"))


def image_path(outdir: str | Path, seed: int, subdirs: bool = False) -> Path:
    """EDM's layout: outdir/{seed:06d}.png, or outdir/{seed - seed % 1000:06d}/{seed:06d}.png with subdirs."""
    outdir = Path(outdir)
    return (outdir / f"{seed - seed % 1000:06d}" if subdirs else outdir) / f"{seed:06d}.png"


def make_grid(images: Sequence[np.ndarray], columns: int | None = None) -> np.ndarray:
    """Tiles equally sized HWC images into one image, row-major, in a near-square layout."""
    if not images:
        raise ValueError("no images to put in a grid")
    columns = columns or math.ceil(math.sqrt(len(images)))
    rows = math.ceil(len(images) / columns)
    h, w, c = images[0].shape
    grid = np.zeros((rows * h, columns * w, c), dtype=np.uint8)
    for index, image in enumerate(images):
        r, q = divmod(index, columns)
        grid[r * h:(r + 1) * h, q * w:(q + 1) * w] = image
    return grid
