"""The training-data reader: EDM's dataset layout (training/dataset.py), a folder or a zip of images with an
optional ``dataset.json`` of labels, read lazily one image at a time.

Layout (what ``edm dataset`` and EDM's dataset_tool.py write)::

    dataset.zip or dataset/
        00000/img00000000.png ...      # any image files, in any sub-folders; sorted by path
        dataset.json                   # optional: {"labels": [["00000/img00000000.png", 6], ...]} or {"labels": null}

As in EDM, the images are every file with an image extension, sorted by their path inside the dataset; a label
is an integer class (one-hot encoded, ``label_dim = max + 1``) or a list of floats (used as is). ``max_size``
keeps a random subset chosen by ``np.random.RandomState(random_seed % 2**31)`` (shuffle, first ``max_size``,
sorted), and ``xflip`` then doubles the dataset with mirrored copies in the second half.

Unlike EDM, every problem (missing path, no images, mixed sizes or channels, a non-square or non-power-of-two
resolution, labels that do not match the files, a corrupt image) is an :class:`EDMToolkitError` naming the file
and the fix, and only formats PIL decodes without external programs are opened (PNG, JPEG, BMP, GIF, TIFF, WebP,
PPM, TGA): an EPS file, which PIL hands to Ghostscript, is refused.
"""

from __future__ import annotations

import json
import zipfile
from typing import Iterator

import numpy as np

from ..errors import EDMToolkitError
from ..io.images import ImageStore, decode_image

LABELS_FILE = "dataset.json"


def is_power_of_two(n: int) -> bool:
    return n >= 1 and n & (n - 1) == 0


def read_labels(store: ImageStore) -> dict[str, object] | None:
    """``dataset.json``'s labels as {path: label}, or None when there is no file or it says ``null``."""
    if LABELS_FILE not in store.names:
        return None
    where = store.where(LABELS_FILE)
    try:
        with store.open(LABELS_FILE) as f:
            meta = json.load(f)
    except (ValueError, OSError, zipfile.BadZipFile) as exc:
        raise EDMToolkitError(f"{where} is not valid JSON ({exc}); rewrite it as {{\"labels\": [[path, label], "
                              f"...]}} or delete it") from None
    if not isinstance(meta, dict) or "labels" not in meta:
        raise EDMToolkitError(f"{where} has no 'labels' key; write {{\"labels\": [[path, label], ...]}} or "
                              f"{{\"labels\": null}}")
    entries = meta["labels"]
    if entries is None:
        return None
    if not isinstance(entries, list) or not all(isinstance(e, list) and len(e) == 2 and isinstance(e[0], str)
                                                for e in entries):
        raise EDMToolkitError(f"{where}: 'labels' must be a list of [path, label] pairs (or null)")
    labels = {name.replace("\\", "/"): label for name, label in entries}
    if len(labels) != len(entries):
        raise EDMToolkitError(f"{where} lists some image twice; keep one label per image")
    return labels


def _one_hot_or_vectors(labels: list, where: str) -> np.ndarray:
    """EDM's label rule: integers >= 0 are classes (int64 [N]), lists of numbers are vectors (float32 [N, D])."""
    if all(isinstance(v, int) and not isinstance(v, bool) for v in labels):
        array = np.asarray(labels, dtype=np.int64)
        if array.size and array.min() < 0:
            bad = int(np.argmin(array))
            raise EDMToolkitError(f"{where}: class label {labels[bad]} is negative; classes are 0, 1, 2, ...")
        return array
    if all(isinstance(v, list) for v in labels):
        widths = {len(v) for v in labels}
        if len(widths) != 1:
            raise EDMToolkitError(f"{where}: label vectors have different lengths {sorted(widths)}; give every "
                                  f"image a vector of the same length")
        try:
            return np.asarray(labels, dtype=np.float32).reshape(len(labels), -1)
        except (TypeError, ValueError):
            raise EDMToolkitError(f"{where}: label vectors must hold numbers only") from None
    raise EDMToolkitError(f"{where}: labels must be all class integers or all lists of numbers")


class ImageDataset:
    """EDM's dataset layout: a folder or an uncompressed/compressed zip of images + optional dataset.json labels.

    ``dataset[i]`` is ``(image uint8 [C, H, W], label float32 [label_dim])``; images are read lazily, one file
    per item (``cache=True`` keeps the decoded images in memory). Safe to pickle into DataLoader workers.
    """

    def __init__(self, path, *, use_labels: bool = True, max_size: int | None = None, xflip: bool = False,
                 random_seed: int = 0, cache: bool = False):
        self._store = ImageStore(path)
        self.name = self._store.path.stem or self._store.path.resolve().name
        self._fnames = self._store.image_names()
        if not self._fnames:
            raise EDMToolkitError(f"no image files in {str(self._store.path)!r}; is it a dataset? make one with "
                                  f"'edm dataset --source IMAGES --dest {self._store.path}'")
        first = self._load_raw_image(0, check=False)
        self.num_channels, self.resolution = int(first.shape[0]), int(first.shape[1])
        self._check_first_shape(first.shape)
        self._cache = cache
        self._cached: dict[int, np.ndarray] = {}
        self._raw_labels = self._load_raw_labels() if use_labels else None
        if self._raw_labels is None:
            self.label_dim = 0
        elif self._raw_labels.dtype == np.int64:
            self.label_dim = int(self._raw_labels.max()) + 1
        else:
            self.label_dim = int(self._raw_labels.shape[1])
        self.has_labels = self.label_dim != 0

        if max_size is not None and max_size < 0:
            raise EDMToolkitError(f"max_size must be >= 0, got {max_size}")
        raw_idx = np.arange(len(self._fnames), dtype=np.int64)
        if max_size is not None and raw_idx.size > max_size:  # EDM: a seeded random subset, kept in file order
            np.random.RandomState(random_seed % (1 << 31)).shuffle(raw_idx)
            raw_idx = np.sort(raw_idx[:max_size])
        flips = np.zeros(raw_idx.size, dtype=bool)
        if xflip:
            raw_idx, flips = np.tile(raw_idx, 2), np.concatenate([flips, np.ones_like(flips)])
        self._raw_idx, self._xflip = raw_idx, flips

    # --- the layout -------------------------------------------------------------------------------------------

    @property
    def image_shape(self) -> list[int]:
        """[C, H, W] of every image."""
        return [self.num_channels, self.resolution, self.resolution]

    @property
    def has_onehot_labels(self) -> bool:
        """True for class labels (one-hot encoded), False for label vectors or no labels."""
        return self._raw_labels is not None and self._raw_labels.dtype == np.int64

    @property
    def image_names(self) -> list[str]:
        """Every image file of the dataset (before max_size and xflip), sorted: raw index -> path."""
        return list(self._fnames)

    def raw_index(self, idx: int) -> int:
        """Which image file item ``idx`` is (an index into :attr:`image_names`)."""
        return int(self._raw_idx[idx])

    def is_flipped(self, idx: int) -> bool:
        """Whether item ``idx`` is the mirrored copy (the second half with xflip)."""
        return bool(self._xflip[idx])

    def _check_first_shape(self, shape) -> None:
        where = self._store.where(self._fnames[0])
        channels, height, width = shape
        if height != width:
            raise EDMToolkitError(f"{where} is {width}x{height}; dataset images must be square: make the dataset "
                                  f"with 'edm dataset --transform center-crop --resolution RxR'")
        if not is_power_of_two(width):
            raise EDMToolkitError(f"{where} is {width}x{height}; the resolution must be a power of two: make the "
                                  f"dataset with 'edm dataset --resolution RxR' (e.g. 32x32)")

    # --- items ------------------------------------------------------------------------------------------------

    def __len__(self) -> int:
        return int(self._raw_idx.size)

    def __getitem__(self, idx: int) -> tuple[np.ndarray, np.ndarray]:
        raw = int(self._raw_idx[idx])
        image = self._cached.get(raw)
        if image is None:
            image = self._load_raw_image(raw)
            if self._cache:
                self._cached[raw] = image
        if self._xflip[idx]:
            image = image[:, :, ::-1]
        return image.copy(order="C"), self.get_label(idx)  # the caller's own writable copy, never the cache

    def get_label(self, idx: int) -> np.ndarray:
        """float32 [label_dim]: one-hot for a class label, the vector itself otherwise, empty without labels."""
        if self._raw_labels is None:
            return np.zeros([0], dtype=np.float32)
        label = self._raw_labels[self._raw_idx[idx]]
        if self._raw_labels.dtype == np.int64:
            onehot = np.zeros([self.label_dim], dtype=np.float32)
            onehot[label] = 1
            return onehot
        return label.copy()

    def raw_label(self, idx: int) -> int | np.ndarray | None:
        """The label as ``dataset.json`` holds it: a class index, a float32 vector, or None without labels."""
        if self._raw_labels is None:
            return None
        label = self._raw_labels[self._raw_idx[idx]]
        return int(label) if self._raw_labels.dtype == np.int64 else label.copy()

    def __iter__(self) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        for idx in range(len(self)):
            yield self[idx]

    def verify(self) -> None:
        """Decodes every image file once and raises on the first that is corrupt or differs in size or channels
        (``__getitem__`` checks the same lazily; this finds a bad file before training starts)."""
        for raw in range(len(self._fnames)):
            self._load_raw_image(raw)

    def _load_raw_image(self, raw_idx: int, check: bool = True) -> np.ndarray:
        fname = self._fnames[raw_idx]
        where = self._store.where(fname)
        try:
            with self._store.open(fname) as f:
                image = decode_image(f, where).transpose(2, 0, 1)  # HWC -> CHW
        except FileNotFoundError:
            raise EDMToolkitError(f"{where} has disappeared since the dataset was opened; restore it or restart "
                                  f"with the dataset as it is now") from None
        if check and list(image.shape) != self.image_shape:
            first = self._store.where(self._fnames[0])
            raise EDMToolkitError(f"{where} is {_describe(image.shape)} but {first} is "
                                  f"{_describe(self.image_shape)}; every image of a dataset must have the same size "
                                  f"and channels: rebuild it with 'edm dataset --resolution RxR'")
        return image

    def _load_raw_labels(self) -> np.ndarray | None:
        labels = read_labels(self._store)
        if labels is None:
            return None
        where = self._store.where(LABELS_FILE)
        missing = [name for name in self._fnames if name not in labels]
        if missing:
            raise EDMToolkitError(f"{where} has no label for {missing[0]!r} ({len(missing)} of {len(self._fnames)} "
                                  f"images unlabelled); rebuild dataset.json, or train without labels")
        extra = sorted(set(labels) - set(self._fnames))
        if extra:
            raise EDMToolkitError(f"{where} labels {len(labels)} files but the dataset holds {len(self._fnames)} "
                                  f"images ({extra[0]!r} is not among them); rebuild dataset.json to match the files")
        return _one_hot_or_vectors([labels[name] for name in self._fnames], where)

    # --- lifetime ---------------------------------------------------------------------------------------------

    def close(self) -> None:
        self._store.close()

    def __enter__(self) -> "ImageDataset":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return (f"ImageDataset({self.name!r}, {len(self)} items, {self.num_channels}x{self.resolution}x"
                f"{self.resolution}, label_dim={self.label_dim})")


def _describe(shape) -> str:
    channels, height, width = shape
    return f"{width}x{height} with {channels} channel{'s' if channels != 1 else ''}"
