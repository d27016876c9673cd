"""Images from a folder (recursively) or a zip, read one file at a time, in the order of EDM's fid.py.

EDM's ``ImageFolderDataset`` lists every file whose extension PIL knows (``PIL.Image.EXTENSION``), sorted by
relative path; a random subset of ``num`` images is ``RandomState(seed % 2**31)``'s shuffle of all indices, the
first ``num`` of them, sorted. Grayscale is repeated to 3 channels; images of any size are accepted (the
detector resizes each one).
"""

from __future__ import annotations

import io
import os
import zipfile
from pathlib import Path

import numpy as np
import PIL.Image

from ..errors import EDMToolkitError

__all__ = ["ImageFolder", "select_subset"]

# Modes converted with PIL's convert('RGB') (alpha dropped, palette expanded); 16-bit and float modes are refused.
_CONVERTIBLE_MODES = frozenset({"1", "P", "PA", "RGBA", "RGBa", "RGBX", "LA", "La", "CMYK", "YCbCr", "LAB", "HSV"})


def _image_extensions() -> frozenset[str]:
    PIL.Image.init()
    return frozenset(PIL.Image.EXTENSION)


class ImageFolder:
    """The image files of a folder (searched recursively) or a zip archive, as uint8 [3, H, W] arrays.

    Only the sorted list of names is held in memory; each image is read when asked for. Use it as a context
    manager (or call :meth:`close`) to release a zip file.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self._zip: zipfile.ZipFile | None = None
        extensions = _image_extensions()
        if self.path.is_dir():
            names = (os.path.relpath(os.path.join(root, name), self.path)
                     for root, _dirs, files in os.walk(self.path) for name in files)
        elif self.path.is_file():
            try:
                self._zip = zipfile.ZipFile(self.path)
            except (zipfile.BadZipFile, OSError):
                raise EDMToolkitError(f"{self.path} is neither a folder nor a zip file of images") from None
            names = (info.filename for info in self._zip.infolist() if not info.is_dir())
        else:
            raise EDMToolkitError(f"image folder or zip {str(self.path)!r} not found")
        self.names = sorted(name for name in names if os.path.splitext(name)[1].lower() in extensions)
        if not self.names:
            self.close()
            raise EDMToolkitError(f"no image files found in {self.path} (looked for: .png, .jpg and every other "
                                  "extension PIL reads)")

    def __len__(self) -> int:
        return len(self.names)

    def describe(self, index: int) -> str:
        """The file of image ``index`` as a user finds it: 'DIR/NAME' or 'ZIP:MEMBER'."""
        name = self.names[index]
        return f"{self.path}:{name}" if self._zip is not None else str(self.path / name)

    def read(self, index: int) -> np.ndarray:
        """Image ``index`` as uint8 [3, H, W]; a file that cannot be decoded is a one-line error naming it."""
        try:
            if self._zip is not None:
                data = self._zip.read(self.names[index])
            else:
                data = (self.path / self.names[index]).read_bytes()
            with PIL.Image.open(io.BytesIO(data)) as image:
                image.load()
                if image.mode in _CONVERTIBLE_MODES:
                    image = image.convert("RGB")
                if image.mode not in ("L", "RGB"):
                    raise EDMToolkitError(f"{image.mode} images are not supported; convert them to 8-bit RGB or "
                                          "grayscale")
                array = np.asarray(image, dtype=np.uint8)
        except EDMToolkitError as exc:
            raise EDMToolkitError(f"cannot use image {self.describe(index)}: {exc}") from None
        except Exception as exc:  # PIL raises many kinds for truncated or corrupt files
            detail = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:160]
            raise EDMToolkitError(f"cannot read image {self.describe(index)} ({detail}); remove or replace the "
                                  "file") from None
        if array.ndim == 2:
            array = np.repeat(array[np.newaxis], 3, axis=0)
        else:
            array = array.transpose(2, 0, 1)
        return np.ascontiguousarray(array)

    def close(self) -> None:
        if self._zip is not None:
            self._zip.close()
            self._zip = None

    def __enter__(self) -> "ImageFolder":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def select_subset(count: int, num: int | None, seed: int = 0) -> np.ndarray:
    """EDM's choice of ``num`` of ``count`` images: all of them if there are not more, else the first ``num`` of
    ``RandomState(seed % 2**31)``'s shuffle of 0..count-1, sorted."""
    indices = np.arange(count, dtype=np.int64)
    if num is not None and count > num:
        np.random.RandomState(seed % (1 << 31)).shuffle(indices)
        indices = np.sort(indices[:num])
    return indices
