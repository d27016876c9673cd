"""Images from a folder (recursively) or a zip, read one file at a time, in the order of EDM's fid.py.

EDM's ``ImageFolderDataset`` lists every file whose extension PIL knows (``PIL.Image.EXTENSION``), sorted by
relative path (only formats PIL decodes in-process are opened: :mod:`edm_toolkit.io.images`); a random subset of ``num`` images is ``RandomState(seed % 2**31)``'s shuffle of all indices, the
first ``num`` of them, sorted. Grayscale is repeated to 3 channels; images of any size are accepted (the
detector resizes each one).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from ..errors import EDMToolkitError
from ..io.images import ImageStore, decode_image

__all__ = ["ImageFolder", "select_subset"]

class ImageFolder:
    """The image files of a folder (searched recursively) or a zip archive, as uint8 [3, H, W] arrays.

    Only the sorted list of names is held in memory; each image is read when asked for (through
    :class:`edm_toolkit.io.images.ImageStore`, the reader the training datasets use). Use it as a context manager
    (or call :meth:`close`) to release a zip file.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self._store = ImageStore(self.path)
        self.names = self._store.image_names()
        if not self.names:
            self.close()
            raise EDMToolkitError(f"no image files found in {self.path} (looked for: .png, .jpg and every other "
                                  "extension PIL reads)")

    def __len__(self) -> int:
        return len(self.names)

    def describe(self, index: int) -> str:
        """The file of image ``index`` as a user finds it: 'DIR/NAME' or 'ZIP:MEMBER'."""
        return self._store.where(self.names[index])

    def read(self, index: int) -> np.ndarray:
        """Image ``index`` as uint8 [3, H, W] (grayscale repeated, alpha dropped, as EDM's fid.py reads it); a
        file that cannot be decoded is a one-line error naming it."""
        with self._store.open(self.names[index]) as file:
            array = decode_image(file, self.describe(index), rgb=True)
        return np.ascontiguousarray(np.repeat(array, 3, axis=2) if array.shape[2] == 1 else array).transpose(2, 0, 1)

    def close(self) -> None:
        self._store.close()

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
