"""edm dataset's library (edm_toolkit.training.dataset_tool / dataset_sources): every source in its original layout
built from tiny random data, EDM's output layout and transforms, restricted unpickling, streaming, atomicity."""

from __future__ import annotations

import gzip
import io
import json
import os
import pickle
import tarfile
import tracemalloc
import zipfile

import numpy as np
import pytest
from PIL import Image

from edm_toolkit.errors import EDMToolkitError
from edm_toolkit.training.dataset import ImageDataset
from edm_toolkit.training.dataset_sources import load_array_pickle, open_source
from edm_toolkit.training.dataset_tool import archive_name, convert_dataset, make_transform

from test_dataset import write_dataset  # noqa: E402  (EDM-layout zips/folders)


def rand_images(n, h, w, c=3, seed=0):
    return np.random.default_rng(seed).integers(0, 256, size=(n, h, w, c), dtype=np.uint8)


def read_output(dest):
    """{name: HWC array} and the dataset.json text of an output folder or zip."""
    if str(dest).endswith(".zip"):
        with zipfile.ZipFile(dest) as z:
            assert all(i.compress_type == zipfile.ZIP_STORED for i in z.infolist())
            files = {n: z.read(n) for n in z.namelist()}
    else:
        files = {p.relative_to(dest).as_posix(): p.read_bytes() for p in dest.rglob("*") if p.is_file()}
    meta = files.pop("dataset.json").decode()
    images = {}
    for name, data in files.items():
        array = np.asarray(Image.open(io.BytesIO(data)))
        images[name] = array[:, :, None] if array.ndim == 2 else array
    return images, meta


def expected_json(labels):
    names = [archive_name(i) for i in range(len(labels))]
    return json.dumps({"labels": [[n, l] for n, l in zip(names, labels)]})


def no_leftovers(folder):
    return [p.name for p in folder.iterdir() if p.name.startswith(".")] == []


# --- CIFAR-10 ---------------------------------------------------------------------------------------------------


class Py2Pickler(pickle._Pickler):
    """Writes str and bytes as Python 2 `str` (SHORT_BINSTRING/BINSTRING), as the real CIFAR-10 files hold them."""

    dispatch = dict(pickle._Pickler.dispatch)

    def save_py2_str(self, obj):
        data = obj.encode("latin1") if isinstance(obj, str) else obj
        if len(data) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(data)]) + data)
        else:
            self.write(pickle.BINSTRING + len(data).to_bytes(4, "little") + data)
        self.memoize(obj)

    dispatch[str] = save_py2_str
    dispatch[bytes] = save_py2_str


def py2_pickle(obj) -> bytes:
    buffer = io.BytesIO()
    Py2Pickler(buffer, protocol=2).dump(obj)
    return buffer.getvalue()


def cifar_batch(n, seed, py2=True):
    rng = np.random.default_rng(seed)
    data = rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)
    labels = rng.integers(0, 10, size=n).tolist()
    batch = {b"batch_label": b"training batch", b"labels": labels, b"data": data,
             b"filenames": [f"img_{seed}_{i}.png".encode() for i in range(n)]}
    return batch, (py2_pickle(batch) if py2 else pickle.dumps(batch, protocol=2))


def write_cifar(path, n_per_batch=3, py2=True, replace=None):
    """cifar-10-python.tar.gz: cifar-10-batches-py/{data_batch_1..5, test_batch, batches.meta}, members out of
    order as in the real file. Returns the images (NHWC) and labels of the five training batches in order."""
    images, labels, members = [], [], {}
    for b in range(1, 6):
        batch, data = cifar_batch(n_per_batch, b, py2)
        members[f"data_batch_{b}"] = data
        images.append(batch[b"data"].reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
        labels += batch[b"labels"]
    members["test_batch"] = cifar_batch(2, 99, py2)[1]
    members["batches.meta"] = py2_pickle({b"label_names": [b"airplane"] * 10, b"num_vis": 3072})
    members.update(replace or {})
    with tarfile.open(path, "w:gz") as tar:
        for name in ["data_batch_4", "test_batch", "data_batch_3", "batches.meta", "data_batch_2", "data_batch_5",
                     "data_batch_1"]:
            info = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
            info.size = len(members[name])
            tar.addfile(info, io.BytesIO(members[name]))
    return np.concatenate(images), labels


@pytest.mark.parametrize("py2", [True, False], ids=["python2-pickles", "python3-protocol2"])
def test_cifar10_tarball(tmp_path, py2):
    images, labels = write_cifar(tmp_path / "cifar-10-python.tar.gz", py2=py2)
    result = convert_dataset(tmp_path / "cifar-10-python.tar.gz", tmp_path / "cifar10-32x32.zip")
    assert (result.written, result.resolution, result.channels, result.label_dim) == (15, 32, 3, max(labels) + 1)
    out, meta = read_output(tmp_path / "cifar10-32x32.zip")
    assert meta == expected_json(labels)
    for i in range(15):
        np.testing.assert_array_equal(out[archive_name(i)], images[i])


def test_restricted_unpickler_reads_arrays_and_refuses_everything_else(tmp_path):
    batch, data = cifar_batch(4, 0)
    loaded = load_array_pickle(io.BytesIO(data), "batch")
    assert sorted(loaded) == ["batch_label", "data", "filenames", "labels"]
    np.testing.assert_array_equal(loaded["data"], batch[b"data"])
    wide = {"x": np.arange(6, dtype=">i4").reshape(2, 3), "f": np.linspace(0, 1, 4)}
    for protocol in (2, 4):
        back = load_array_pickle(io.BytesIO(pickle.dumps(wide, protocol=protocol)), "w")
        assert back["x"].dtype == np.dtype(">i4") and back["x"].tolist() == [[0, 1, 2], [3, 4, 5]]
        np.testing.assert_array_equal(back["f"], wide["f"])

    marker = tmp_path / "pwned"

    class Hostile:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    hostile = pickle.dumps({b"data": Hostile(), b"labels": []}, protocol=2)
    with pytest.raises(EDMToolkitError, match=r"asks for (posix|os)\.system.*refusing to load it"):
        load_array_pickle(io.BytesIO(hostile), "evil")
    assert not marker.exists()
    objects = pickle.dumps({"data": np.array([1, "a"], dtype=object)}, protocol=2)
    with pytest.raises(EDMToolkitError, match="not a plain numeric dtype"):
        load_array_pickle(io.BytesIO(objects), "objects")
    honest = pickle.dumps({"a": np.zeros(4, np.uint8)}, protocol=2)
    lying = honest.replace(b"K\x04\x85", b"K\x05\x85", 1)  # the shape claims 5 bytes, the data holds 4
    assert lying != honest
    with pytest.raises(EDMToolkitError, match="ndarray of shape"):
        load_array_pickle(io.BytesIO(lying), "lying")
    # a hostile batch inside the tarball: refused, nothing written
    write_cifar(tmp_path / "cifar-10-python.tar.gz", replace={"data_batch_2": hostile})
    with pytest.raises(EDMToolkitError, match=r"data_batch_2 is not a plain pickle"):
        convert_dataset(tmp_path / "cifar-10-python.tar.gz", tmp_path / "out.zip")
    assert not marker.exists() and not (tmp_path / "out.zip").exists() and no_leftovers(tmp_path)


def test_cifar_errors(tmp_path):
    with tarfile.open(tmp_path / "other.tar.gz", "w:gz") as tar:
        info = tarfile.TarInfo("readme.txt")
        tar.addfile(info, io.BytesIO(b""))
    with pytest.raises(EDMToolkitError, match="has no cifar-10-batches-py/data_batch_1; it is not CIFAR-10"):
        open_source(tmp_path / "other.tar.gz")
    wrong = py2_pickle({b"data": np.zeros((2, 100), np.uint8), b"labels": [0, 1]})
    write_cifar(tmp_path / "c.tar.gz", replace={"data_batch_1": wrong})
    with pytest.raises(EDMToolkitError, match="data_batch_1 is not a CIFAR-10 batch"):
        convert_dataset(tmp_path / "c.tar.gz", tmp_path / "out")


# --- MNIST idx --------------------------------------------------------------------------------------------------


def write_idx(path, array, gz):
    header = bytes([0, 0, 8, array.ndim]) + b"".join(int(s).to_bytes(4, "big") for s in array.shape)
    (gzip.open if gz else open)(path, "wb").write(header + array.astype(np.uint8).tobytes())


@pytest.mark.parametrize("gz", [True, False])
def test_mnist_idx_padded_to_32(tmp_path, gz):
    images = rand_images(5, 28, 28, 1)[:, :, :, 0]
    labels = np.array([7, 2, 1, 0, 4])
    suffix = ".gz" if gz else ""
    write_idx(tmp_path / f"train-images-idx3-ubyte{suffix}", images, gz)
    write_idx(tmp_path / f"train-labels-idx1-ubyte{suffix}", labels, gz)
    result = convert_dataset(tmp_path / f"train-images-idx3-ubyte{suffix}", tmp_path / "mnist")
    assert (result.written, result.resolution, result.channels, result.label_dim) == (5, 32, 1, 8)
    out, meta = read_output(tmp_path / "mnist")
    assert meta == expected_json(labels.tolist())
    for i in range(5):
        assert out[archive_name(i)].shape == (32, 32, 1)
        np.testing.assert_array_equal(out[archive_name(i)][2:30, 2:30, 0], images[i])  # EDM: 2 px of zeros
        assert out[archive_name(i)].sum() == images[i].astype(int).sum()


def test_mnist_errors(tmp_path):
    write_idx(tmp_path / "t10k-images-idx3-ubyte", rand_images(3, 28, 28, 1)[:, :, :, 0], False)
    with pytest.raises(EDMToolkitError, match="no labels file t10k-labels-idx1-ubyte"):
        open_source(tmp_path / "t10k-images-idx3-ubyte")
    write_idx(tmp_path / "t10k-labels-idx1-ubyte", np.arange(4), False)
    with pytest.raises(EDMToolkitError, match="holds 4 labels but .* holds 3 images"):
        open_source(tmp_path / "t10k-images-idx3-ubyte")
    write_idx(tmp_path / "t10k-labels-idx1-ubyte", np.zeros((3, 2)), False)
    with pytest.raises(EDMToolkitError, match="magic 00000802, expected 00000801"):
        open_source(tmp_path / "t10k-images-idx3-ubyte")
    write_idx(tmp_path / "t10k-labels-idx1-ubyte", np.arange(3), False)
    data = (tmp_path / "t10k-images-idx3-ubyte").read_bytes()
    (tmp_path / "t10k-images-idx3-ubyte").write_bytes(data[:-100])
    with pytest.raises(EDMToolkitError, match=r"t10k-images-idx3-ubyte\[2\] is truncated"):
        convert_dataset(tmp_path / "t10k-images-idx3-ubyte", tmp_path / "out.zip")
    assert not (tmp_path / "out.zip").exists() and no_leftovers(tmp_path)


# --- numpy .npz -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("layout", ["NHWC", "NCHW", "NHW", "NHW1"])
def test_npz_layouts(tmp_path, layout):
    images = rand_images(6, 8, 8, 1 if layout in ("NHW", "NHW1") else 3)
    stored = {"NHWC": images, "NCHW": images.transpose(0, 3, 1, 2), "NHW": images[:, :, :, 0], "NHW1": images}[layout]
    labels = np.array([0, 2, 1, 2, 0, 1], dtype=np.int32)
    np.savez(tmp_path / "a.npz", images=stored, labels=labels, other=np.zeros(3))
    convert_dataset(tmp_path / "a.npz", tmp_path / "a.zip")
    out, meta = read_output(tmp_path / "a.zip")
    assert meta == expected_json(labels.tolist())
    for i in range(6):
        np.testing.assert_array_equal(out[archive_name(i)], images[i])


def test_npz_names_compression_vectors_and_unlabelled(tmp_path):
    images = rand_images(4, 4, 4)
    vectors = np.array([[0.5, 1.0], [0.0, -2.0], [1.5, 0.25], [3.0, 4.0]], dtype=np.float32)
    np.savez_compressed(tmp_path / "xy.npz", x=images, y=vectors)
    result = convert_dataset(tmp_path / "xy.npz", tmp_path / "xy")
    assert (result.label_dim, result.label_vectors) == (2, True)
    ds = ImageDataset(tmp_path / "xy")
    assert ds.label_dim == 2 and ds[2][1].tolist() == vectors[2].tolist()
    np.testing.assert_array_equal(ds[3][0], images[3].transpose(2, 0, 1))
    np.savez(tmp_path / "adm.npz", arr_0=images)  # ADM's sample batches: arr_0 only -> no labels
    assert convert_dataset(tmp_path / "adm.npz", tmp_path / "adm.zip").label_dim == 0
    assert read_output(tmp_path / "adm.zip")[1] == '{"labels": null}'


def test_npz_errors(tmp_path):
    np.savez(tmp_path / "f.npz", images=np.zeros((2, 4, 4, 3), np.float32))
    with pytest.raises(EDMToolkitError, match="is float32; images must be uint8"):
        open_source(tmp_path / "f.npz")
    np.savez(tmp_path / "o.npz", images=np.zeros((2, 4, 4, 3), np.uint8), labels=np.array([1, None], dtype=object))
    with pytest.raises(EDMToolkitError, match="object array.*allow_pickle=False"):
        open_source(tmp_path / "o.npz")
    np.savez(tmp_path / "n.npz", pictures=np.zeros((2, 4, 4, 3), np.uint8))
    with pytest.raises(EDMToolkitError, match=r"holds arrays \['pictures'\] but none of images, x, arr_0"):
        open_source(tmp_path / "n.npz")
    np.savez(tmp_path / "c.npz", images=np.zeros((3, 4, 4, 3), np.uint8), labels=np.arange(2))
    with pytest.raises(EDMToolkitError, match="holds 2 labels for 3 images"):
        open_source(tmp_path / "c.npz")
    np.savez(tmp_path / "s.npz", images=np.zeros((3, 4, 4, 5), np.uint8))
    with pytest.raises(EDMToolkitError, match=r"shape \[3, 4, 4, 5\]"):
        open_source(tmp_path / "s.npz")


# --- image folders and zips -------------------------------------------------------------------------------------


def test_folder_with_class_subfolders(tmp_path):
    src = tmp_path / "animals"
    images = rand_images(5, 8, 8)
    layout = [("dog/b.png", 1), ("cat/x.png", 0), ("dog/a.jpg", 1), ("zebra/q.png", 2), ("cat/sub/y.png", 0)]
    for (name, _), img in zip(layout, images):
        (src / name).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img).save(src / name, quality=100)
    (src / "notes.txt").write_text("not an image")
    source = open_source(src)
    assert source.class_names == ["cat", "dog", "zebra"]
    convert_dataset(source, tmp_path / "out")
    out, meta = read_output(tmp_path / "out")
    order = sorted(range(5), key=lambda i: layout[i][0])  # sorted by path: cat/sub/y, cat/x, dog/a, dog/b, zebra/q
    assert meta == expected_json([layout[i][1] for i in order])
    for k, i in enumerate(order):
        if layout[i][0].endswith(".png"):  # the JPEG is lossy
            np.testing.assert_array_equal(out[archive_name(k)], images[i])


def test_edm_zip_resized_keeps_labels(tmp_path):
    images = rand_images(4, 16, 16)
    write_dataset(tmp_path / "src.zip", images, [3, 1, 0, 2])
    convert_dataset(tmp_path / "src.zip", tmp_path / "small.zip", resolution=(8, 8))
    out, meta = read_output(tmp_path / "small.zip")
    assert meta == expected_json([3, 1, 0, 2])
    for i in range(4):
        expected = np.asarray(Image.fromarray(images[i]).resize((8, 8), Image.LANCZOS))
        np.testing.assert_array_equal(out[archive_name(i)], expected)
    # a source whose dataset.json says null: no labels, and the chunk folders are not taken as classes
    write_dataset(tmp_path / "null.zip", rand_images(6, 8, 8), None)
    assert convert_dataset(tmp_path / "null.zip", tmp_path / "null-out.zip").label_dim == 0


def test_transforms_match_edm_definitions():
    rng = np.random.default_rng(1)
    tall = rng.integers(0, 256, size=(20, 12, 3), dtype=np.uint8)  # H=20, W=12
    crop = make_transform("center-crop", (8, 8))(tall)
    expected = np.asarray(Image.fromarray(tall).crop((0, 4, 12, 16)).resize((8, 8), Image.LANCZOS))
    np.testing.assert_array_equal(crop, expected)
    gray = rng.integers(0, 256, size=(10, 10), dtype=np.uint8)
    assert make_transform("center-crop", (4, 4))(gray).shape == (4, 4, 3)  # EDM: grayscale becomes RGB
    wide = rng.integers(0, 256, size=(12, 24, 3), dtype=np.uint8)  # W=24, H=12 -> rows round(16*12/24) = 8
    out = make_transform("center-crop-wide", (16, 8))(wide)
    strip = np.asarray(Image.fromarray(wide[2:10]).resize((16, 8), Image.LANCZOS))
    assert out.shape == (16, 16, 3)
    np.testing.assert_array_equal(out[4:12], strip)
    assert out[:4].max() == 0 and out[12:].max() == 0
    assert make_transform("center-crop-wide", (32, 8))(wide) is None  # narrower than W: left out
    assert make_transform(None, None)(wide) is wide
    with pytest.raises(EDMToolkitError, match="--transform center-crop needs --resolution"):
        make_transform("center-crop", None)


# --- layout, errors, atomicity, memory --------------------------------------------------------------------------


def test_mismatched_images_error_or_skip_with_gaps(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    images = rand_images(4, 8, 8)
    for i, img in enumerate(images):
        Image.fromarray(img).save(src / f"{i}.png")
    Image.fromarray(rand_images(1, 4, 4)[0]).save(src / "1.png")  # a smaller image
    (src / "2.png").write_bytes((src / "2.png").read_bytes()[:60])  # truncated
    with pytest.raises(EDMToolkitError, match=r"1.png \(-> 00000/img00000001.png\) is 4x4 with 3 channels but "
                                              r".*0.png is 8x8"):
        convert_dataset(src, tmp_path / "out")
    assert not (tmp_path / "out").exists() and no_leftovers(tmp_path)
    result = convert_dataset(src, tmp_path / "out", skip_bad=True)
    assert (result.written, result.skipped) == (2, 2)
    assert "2.png" in result.skip_reasons[1] and "cannot be decoded" in result.skip_reasons[1]
    out, meta = read_output(tmp_path / "out")
    assert sorted(out) == [archive_name(0), archive_name(3)]  # the source index names the file, as in EDM
    np.testing.assert_array_equal(out[archive_name(3)], images[3])
    assert meta == '{"labels": null}'


def test_dataset_level_errors(tmp_path):
    np.savez(tmp_path / "r.npz", images=rand_images(2, 8, 4))
    with pytest.raises(EDMToolkitError, match="comes out 4x8; images must be square"):
        convert_dataset(tmp_path / "r.npz", tmp_path / "o.zip")
    np.savez(tmp_path / "p.npz", images=rand_images(2, 12, 12))
    with pytest.raises(EDMToolkitError, match=r"12x12; the size must be a power of two: give --resolution RxR "
                                              r"\(e.g. 16x16\)"):
        convert_dataset(tmp_path / "p.npz", tmp_path / "o.zip", skip_bad=True)
    assert convert_dataset(tmp_path / "p.npz", tmp_path / "o.zip", resolution=(16, 16)).resolution == 16
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "x").write_text("")
    with pytest.raises(EDMToolkitError, match="exists and is not empty"):
        convert_dataset(tmp_path / "p.npz", tmp_path / "busy")
    (tmp_path / "empty").mkdir()
    assert convert_dataset(tmp_path / "p.npz", tmp_path / "empty", max_images=1, resolution=(4, 4)).written == 1
    with pytest.raises(EDMToolkitError, match="no images were written"):
        convert_dataset(tmp_path / "p.npz", tmp_path / "none.zip", max_images=0, resolution=(4, 4))
    with pytest.raises(EDMToolkitError, match="is of no known kind"):
        (tmp_path / "a.bin").write_bytes(b"")
        convert_dataset(tmp_path / "a.bin", tmp_path / "x.zip")
    labels = tmp_path / "mixed"
    write_dataset(labels.mkdir() or labels, rand_images(2, 4, 4), [1, [0.5]], kind="folder")
    with pytest.raises(EDMToolkitError, match=r"img00000001.png has label \[0.5\] unlike the labels before it"):
        convert_dataset(labels, tmp_path / "m.zip")


def test_interrupted_run_leaves_old_dest_and_no_temp_files(tmp_path):
    np.savez(tmp_path / "a.npz", images=rand_images(10, 4, 4))
    convert_dataset(tmp_path / "a.npz", tmp_path / "d.zip", max_images=3)
    before = (tmp_path / "d.zip").read_bytes()

    def interrupt(done, total):
        assert total == 10
        if done == 5:
            raise KeyboardInterrupt

    for dest in ("d.zip", "folder"):
        with pytest.raises(KeyboardInterrupt):
            convert_dataset(tmp_path / "a.npz", tmp_path / dest, progress=interrupt)
    assert (tmp_path / "d.zip").read_bytes() == before and not (tmp_path / "folder").exists()
    assert no_leftovers(tmp_path)


def test_memory_does_not_grow_with_the_dataset(tmp_path):
    """Streaming: converting ~12 MB of images (1,000 of 64x64 RGB, npz -> zip) allocates at most a small fixed
    amount at any time (the zip's per-entry index is the only per-image state, ~0.1 KB an image)."""
    n = 1000
    images = rand_images(n, 64, 64)
    np.savez(tmp_path / "big.npz", images=images, labels=np.arange(n) % 10)
    del images
    tracemalloc.start()
    try:
        result = convert_dataset(tmp_path / "big.npz", tmp_path / "big.zip")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    data_size = n * 64 * 64 * 3
    assert result.written == n and archive_name(n - 1) == "00000/img00000999.png"
    assert peak < data_size / 4, f"peak {peak / 1e6:.1f} MB for {data_size / 1e6:.1f} MB of images"
