"""The dataset reader (edm_toolkit.training.dataset): EDM's folder/zip layout, labels, max_size, xflip, errors."""

from __future__ import annotations

import io
import json
import pickle
import zipfile

import numpy as np
import pytest
from PIL import Image

from edm_toolkit.errors import EDMToolkitError
from edm_toolkit.training.dataset import ImageDataset


def _png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array[:, :, 0] if array.shape[2] == 1 else array).save(buffer, format="PNG")
    return buffer.getvalue()


def _images(n: int, resolution: int = 8, channels: int = 3, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(n, resolution, resolution, channels), dtype=np.uint8)


def _names(n: int) -> list[str]:
    return [f"{i // 3:05d}/img{i:08d}.png" for i in range(n)]  # several sub-folders, as EDM's layout has


def write_dataset(path, images, labels=None, *, kind="zip", compression=zipfile.ZIP_STORED, names=None,
                  meta=None):
    """A dataset in EDM's layout: {kind: zip|folder}, dataset.json from `labels` (or `meta` verbatim)."""
    names = names or _names(len(images))
    if meta is None:
        meta = {"labels": None if labels is None else [[n, l] for n, l in zip(names, labels)]}
    files = {n: _png(img) for n, img in zip(names, images)}
    files["dataset.json"] = json.dumps(meta).encode()
    if kind == "zip":
        with zipfile.ZipFile(path, "w", compression=compression) as z:
            for name, data in files.items():
                z.writestr(name, data)
    else:
        for name, data in files.items():
            (path / name).parent.mkdir(parents=True, exist_ok=True)
            (path / name).write_bytes(data)
    return path


@pytest.mark.parametrize("kind", ["zip", "folder", "deflated"])
def test_layout_pixels_and_one_hot_labels(tmp_path, kind):
    images, labels = _images(7), [3, 0, 1, 3, 2, 0, 1]
    path = tmp_path / ("cifar-tiny.zip" if kind != "folder" else "cifar-tiny")
    if kind == "folder":
        path.mkdir()
    write_dataset(path, images, labels, kind="folder" if kind == "folder" else "zip",
                  compression=zipfile.ZIP_DEFLATED if kind == "deflated" else zipfile.ZIP_STORED)
    with ImageDataset(path) as ds:
        assert (ds.name, len(ds), ds.resolution, ds.num_channels) == ("cifar-tiny", 7, 8, 3)
        assert ds.label_dim == 4 and ds.has_labels and ds.has_onehot_labels
        for i in range(7):
            image, label = ds[i]
            assert image.dtype == np.uint8 and image.shape == (3, 8, 8)
            np.testing.assert_array_equal(image, images[i].transpose(2, 0, 1))
            assert label.dtype == np.float32 and label.tolist() == np.eye(4)[labels[i]].tolist()
            assert ds.raw_label(i) == labels[i]


def test_grayscale_vector_labels_and_use_labels_off(tmp_path):
    images = _images(4, resolution=4, channels=1)
    vectors = [[0.5, -1.0], [1.0, 2.0], [0.0, 0.0], [3.0, 0.25]]
    write_dataset(tmp_path / "g.zip", images, vectors)
    ds = ImageDataset(tmp_path / "g.zip")
    assert (ds.num_channels, ds.resolution, ds.label_dim, ds.has_onehot_labels) == (1, 4, 2, False)
    image, label = ds[3]
    np.testing.assert_array_equal(image, images[3].transpose(2, 0, 1))
    assert label.tolist() == vectors[3]
    off = ImageDataset(tmp_path / "g.zip", use_labels=False)
    assert (off.label_dim, off.has_labels, off[0][1].shape, off.raw_label(0)) == (0, False, (0,), None)


def test_unlabelled_null_or_no_json(tmp_path):
    write_dataset(tmp_path / "a.zip", _images(3), None)
    assert ImageDataset(tmp_path / "a.zip").label_dim == 0
    folder = tmp_path / "b"
    folder.mkdir()
    for i, img in enumerate(_images(3)):
        (folder / f"{i}.png").write_bytes(_png(img))
    ds = ImageDataset(folder)
    assert (ds.name, len(ds), ds.label_dim) == ("b", 3, 0)


def test_files_sorted_by_path_like_edm(tmp_path):
    images = _images(3)
    names = ["b/2.png", "a/9.png", "a/10.png"]  # string order: a/10 < a/9 < b/2
    write_dataset(tmp_path / "s.zip", images, [0, 1, 2], names=names)
    ds = ImageDataset(tmp_path / "s.zip")
    assert ds.image_names == ["a/10.png", "a/9.png", "b/2.png"]
    assert [ds.raw_label(i) for i in range(3)] == [2, 1, 0]
    np.testing.assert_array_equal(ds[0][0], images[2].transpose(2, 0, 1))


def test_max_size_is_edms_seeded_subset_and_xflip_doubles(tmp_path):
    n, k, seed = 20, 6, 123
    images = _images(n, resolution=4)
    write_dataset(tmp_path / "m.zip", images, list(range(n)))
    ds = ImageDataset(tmp_path / "m.zip", max_size=k, random_seed=seed, xflip=True)
    # EDM: RandomState(seed).shuffle(arange(n)), first k, sorted; then the flipped copies after them.
    chosen = sorted(np.random.RandomState(seed).permutation(n)[:k].tolist())
    assert len(ds) == 2 * k
    assert [ds.raw_label(i) for i in range(2 * k)] == chosen + chosen
    assert [ds.is_flipped(i) for i in range(2 * k)] == [False] * k + [True] * k
    for i, raw in enumerate(chosen):
        np.testing.assert_array_equal(ds[i][0], images[raw].transpose(2, 0, 1))
        np.testing.assert_array_equal(ds[k + i][0], images[raw].transpose(2, 0, 1)[:, :, ::-1])
        assert ds[k + i][0].flags.c_contiguous
    # max_size >= n keeps everything in order; label_dim counts the classes of the whole dataset
    whole = ImageDataset(tmp_path / "m.zip", max_size=n, random_seed=seed)
    assert [whole.raw_label(i) for i in range(n)] == list(range(n)) and whole.label_dim == n
    other = ImageDataset(tmp_path / "m.zip", max_size=k, random_seed=seed + 1)
    assert [other.raw_index(i) for i in range(k)] != chosen


@pytest.mark.parametrize("channels", [1, 3])
def test_items_are_writable_copies_and_the_cache_is_untouched(tmp_path, channels):
    images = _images(3, channels=channels)
    write_dataset(tmp_path / "c.zip", images)
    for cache in (False, True):
        ds = ImageDataset(tmp_path / "c.zip", cache=cache, xflip=True)
        first = ds[0][0]
        assert first.flags.writeable and first.flags.owndata and first.flags.c_contiguous
        first[...] = 0  # the caller's copy; the cache is untouched
        np.testing.assert_array_equal(ds[0][0], images[0].transpose(2, 0, 1))
        np.testing.assert_array_equal(ds[3][0], images[0].transpose(2, 0, 1)[:, :, ::-1])


def test_pickles_and_works_in_forked_dataloader_workers(tmp_path):
    torch = pytest.importorskip("torch")
    images, labels = _images(8, resolution=4), [0, 1] * 4
    write_dataset(tmp_path / "w.zip", images, labels)
    ds = ImageDataset(tmp_path / "w.zip")
    ds[0]  # the zip is open in this process before the workers fork
    clone = pickle.loads(pickle.dumps(ds))
    np.testing.assert_array_equal(clone[5][0], ds[5][0])
    loader = torch.utils.data.DataLoader(ds, batch_size=4, num_workers=2, shuffle=False)
    got = torch.cat([x for x, _ in loader])
    np.testing.assert_array_equal(got.numpy(), images.transpose(0, 3, 1, 2))


def _expect_error(match, *args, **kwargs):
    with pytest.raises(EDMToolkitError, match=match) as info:
        ds = ImageDataset(*args, **kwargs)
        ds.verify()
    assert "\n" not in str(info.value)
    return str(info.value)


def test_errors_missing_not_a_dataset_empty(tmp_path):
    _expect_error("not found", tmp_path / "nope.zip")
    (tmp_path / "x.tar").write_bytes(b"abc")
    _expect_error("neither a folder nor a .zip.*edm dataset", tmp_path / "x.tar")
    (tmp_path / "bad.zip").write_bytes(b"not a zip at all")
    _expect_error("not a readable zip", tmp_path / "bad.zip")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("hi")
    _expect_error("no image files", tmp_path / "empty")


def test_errors_shapes(tmp_path):
    write_dataset(tmp_path / "r.zip", [np.zeros((8, 4, 3), np.uint8)])
    _expect_error(r"img00000000.png is 4x8; dataset images must be square", tmp_path / "r.zip")
    write_dataset(tmp_path / "p.zip", _images(2, resolution=6))
    _expect_error(r"6x6; the resolution must be a power of two", tmp_path / "p.zip")
    mixed = [_images(1, 8)[0], _images(1, 8)[0], _images(1, 4)[0]]
    write_dataset(tmp_path / "m.zip", mixed)
    message = _expect_error(r"img00000002.png is 4x4 with 3 channels but .*img00000000.png is 8x8", tmp_path / "m.zip")
    assert "m.zip" in message
    channels = [_images(1, 8)[0], _images(1, 8, channels=1)[0]]
    write_dataset(tmp_path / "c.zip", channels)
    ds = ImageDataset(tmp_path / "c.zip")  # lazy: the second file is checked when read
    with pytest.raises(EDMToolkitError, match="img00000001.png is 8x8 with 1 channel but"):
        ds[1]


def test_errors_corrupt_and_alpha_images(tmp_path):
    folder = tmp_path / "d"
    write_dataset(folder.mkdir() or folder, _images(2), kind="folder")
    good = (folder / "00000" / "img00000001.png").read_bytes()
    (folder / "00000" / "img00000001.png").write_bytes(good[: len(good) // 2])
    _expect_error(r"img00000001.png: it cannot be decoded .*replace or remove", folder)
    (folder / "00000" / "img00000001.png").write_bytes(b"garbage")
    _expect_error(r"img00000001.png is not an image of a supported format", folder)
    rgba = tmp_path / "a"
    rgba.mkdir()
    Image.fromarray(np.zeros((4, 4, 4), np.uint8), "RGBA").save(rgba / "0.png")
    _expect_error(r"0.png has mode RGBA.*flatten the alpha", rgba)


def test_errors_labels_do_not_match(tmp_path):
    images = _images(3)
    write_dataset(tmp_path / "a.zip", images, [0, 1])  # third image unlabelled
    _expect_error(r"dataset.json has no label for '00000/img00000002.png' \(1 of 3", tmp_path / "a.zip")
    names = _names(3)
    meta = {"labels": [[n, 0] for n in names] + [["99999/img.png", 1]]}
    write_dataset(tmp_path / "b.zip", images, meta=meta)
    _expect_error(r"labels 4 files but the dataset holds 3 images \('99999/img.png'", tmp_path / "b.zip")
    write_dataset(tmp_path / "c.zip", images, [0, -1, 2])
    _expect_error("class label -1 is negative", tmp_path / "c.zip")
    write_dataset(tmp_path / "d.zip", images, [0, [1.0], 2])
    _expect_error("all class integers or all lists", tmp_path / "d.zip")
    write_dataset(tmp_path / "e.zip", images, meta={"nolabels": 1})
    _expect_error("has no 'labels' key", tmp_path / "e.zip")
    write_dataset(tmp_path / "f.zip", images, [[1.0], [1.0, 2.0], [0.0]])
    _expect_error(r"different lengths \[1, 2\]", tmp_path / "f.zip")
    # without labels, a broken dataset.json is never read
    assert ImageDataset(tmp_path / "e.zip", use_labels=False).label_dim == 0
