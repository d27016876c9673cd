"""ADM's noisy classifier trained by `edm train-classifier` (issue 11, item 3): it beats chance on noisy inputs at
mid t, and guidance with its snapshot, read directly by `edm generate --classifier`, raises its own accuracy on
generated samples. A toy labelled set: 8x8 grayscale discs (class 0) and their negatives (class 1)."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from edm_toolkit.adapters.openai import OpenAIClassifier, load_openai_classifier
from edm_toolkit.checkpoints import save_model
from edm_toolkit.errors import CheckpointError
from edm_toolkit.ideal import IdealDenoiser
from edm_toolkit.training.classifier import ClassifierOptions, ClassifierTrainer, random_crop
from edm_toolkit.training.dataset import ImageDataset
from edm_toolkit.training.state import load_state
from edm_toolkit.training.streams import TrainingStreams

from test_cli_train import edm, fails_cleanly
from test_training import make_dataset, training_tensors

pytestmark = pytest.mark.usefixtures("one_thread")

T = 50
FLAGS = ("--classifier_width 32 --classifier_depth 1 --channel_mult 1,2 --classifier_attention_resolutions 4 "
         "--num_head_channels 32 --classifier_pool attention")


def make_labelled(path, n: int = 16):
    """n 8x8 images: discs (label 0) and negated discs (label 1), alternating; EDM's layout with dataset.json."""
    path.mkdir(parents=True)
    rng = np.random.RandomState(0)
    yy, xx = np.mgrid[0:8, 0:8]
    labels = []
    for i in range(n):
        cx, cy = rng.uniform(1, 7, size=2)
        r = rng.uniform(0.2, 0.45) * 8
        image = (255 / (1 + np.exp(((xx - cx) ** 2 + (yy - cy) ** 2 - r * r) / 2))).astype(np.uint8)
        image = 255 - image if i % 2 else image
        Image.fromarray(image, "L").save(path / f"img{i:08d}.png")
        labels.append([f"img{i:08d}.png", i % 2])
    (path / "dataset.json").write_text(json.dumps({"labels": labels}))
    return path


def train_args(data, outdir, steps: int, batch: int = 16, *extra):
    return ["train-classifier", "--outdir", outdir, "--data", data, "--model-flags", FLAGS, "--diffusion-steps", T,
            "--noise-schedule", "cosine", "--batch", batch, "--duration", f"{steps * batch / 1e6:.6f}",
            "--tick", steps * batch / 1000 / 4, "--snap", 4, "--dump", 4, "--workers", 0, "--seed", 0, "--nosubdir",
            "--lr", "1e-3", *extra]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_labelled(tmp_path_factory.mktemp("classifier") / "toy")


@pytest.fixture(scope="module")
def snapshot(data, tmp_path_factory):
    """200 steps of batch 16 (one thread: module fixtures run before one_thread)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        outdir = tmp_path_factory.mktemp("classifier-run")
        result = edm(*train_args(data, outdir, 200))
        assert result.exit_code == 0, result.output
        return outdir / "classifier-snapshot-000003.pt"
    finally:
        torch.set_num_threads(threads)


def images_and_labels(data):
    dataset = ImageDataset(data, use_labels=True)
    images = torch.stack([torch.from_numpy(np.array(dataset[i][0])) for i in range(len(dataset))]).float() / 127.5 - 1
    return images, torch.tensor([int(np.argmax(dataset[i][1])) for i in range(len(dataset))])


def test_beats_chance_on_noisy_inputs_at_mid_t(data, snapshot):
    """At t = T/2 (abar about 1/2) on fresh noise, the trained classifier labels nearly every image right; at
    initialisation its zero-initialised head gives equal logits (chance)."""
    classifier = load_openai_classifier(snapshot)
    assert isinstance(classifier, OpenAIClassifier) and classifier.num_classes == 2
    assert classifier.step_grid.num_timesteps == T and not classifier.training
    images, labels = images_and_labels(data)
    t = torch.full([64], T // 2)
    index = torch.arange(64) % len(images)
    abar = classifier.step_grid.alphas_cumprod[t].float().reshape(-1, 1, 1, 1)
    noise = torch.randn(64, 1, 8, 8, generator=torch.Generator().manual_seed(5))
    x_t = abar.sqrt() * images[index] + (1 - abar).sqrt() * noise
    with torch.no_grad():
        accuracy = float((classifier(x_t, t).argmax(dim=1) == labels[index]).float().mean())
    assert accuracy >= 0.9, accuracy  # chance: 0.5; measured 1.0 (0.94 at t = 3T/4)


def test_guidance_raises_the_classifiers_accuracy_on_samples(data, snapshot, tmp_path):
    """edm generate with the exact denoiser of the toy set (it draws dataset images) and --classifier SNAPSHOT:
    guided to --class c, the classifier finds class c in nearly every sample; unguided, the fraction of samples
    it assigns to class c, averaged over both classes, is exactly 1/2."""
    images, _ = images_and_labels(data)
    save_model(IdealDenoiser(images.double()), tmp_path / "ideal.pt")
    classifier = load_openai_classifier(snapshot)

    def predicted(outdir):
        pixels = torch.stack([torch.from_numpy(np.array(Image.open(p))) for p in sorted(outdir.glob("*.png"))])
        with torch.no_grad():
            return classifier(pixels.float()[:, None] / 127.5 - 1, torch.zeros(len(pixels), dtype=torch.int64))

    accuracy = []
    for c in (0, 1):
        result = edm("generate", "--network", tmp_path / "ideal.pt", "--outdir", tmp_path / f"guided{c}", "--seeds",
                     "0-15", "--steps", 18, "--class", c, "--classifier", snapshot, "--classifier-scale", 4)
        assert result.exit_code == 0, result.output
        accuracy.append(float((predicted(tmp_path / f"guided{c}").argmax(dim=1) == c).float().mean()))
    result = edm("generate", "--network", tmp_path / "ideal.pt", "--outdir", tmp_path / "unguided", "--seeds", "0-15",
                 "--steps", 18)
    assert result.exit_code == 0, result.output
    unguided = predicted(tmp_path / "unguided").argmax(dim=1)
    assert 0 < int(unguided.sum()) < 16  # the unguided samples show both classes
    assert min(accuracy) >= 0.85, accuracy  # measured 1.0, 1.0 (scale 1: 1.0, 0.81)


def test_classifier_files_and_errors(data, snapshot, tmp_path):
    """The snapshot holds its flags and diffusion; flags given as well are refused, a denoiser is not a
    classifier, and datasets without two labelled classes are one-line errors."""
    classifier = load_openai_classifier(snapshot)
    assert classifier.flags["classifier_width"] == 32 and classifier.diffusion.noise_schedule == "cosine"
    with pytest.raises(CheckpointError, match="drop --classifier-flags"):
        load_openai_classifier(snapshot, model_flags="--classifier_depth 2")
    save_model(IdealDenoiser(torch.zeros(2, 1, 8, 8, dtype=torch.float64)), tmp_path / "ideal.pt")
    with pytest.raises(CheckpointError, match="holds a 'ideal' model, not a noisy classifier"):
        load_openai_classifier(tmp_path / "ideal.pt")
    inspected = edm("inspect", snapshot)
    assert inspected.exit_code == 0 and "openai-classifier" in inspected.stdout, inspected.output
    options = json.loads((snapshot.parent / "training_options.json").read_text())
    assert options["lr"] == 1e-3 and options["weight_decay"] == 0.05 and options["flags"]["image_size"] == 8

    unlabelled = make_dataset(tmp_path / "unlabelled")
    fails_cleanly(edm(*train_args(unlabelled, tmp_path / "a", 1)), "a classifier learns the dataset's class labels")
    one_class = make_dataset(tmp_path / "one", num_classes=1)
    fails_cleanly(edm(*train_args(one_class, tmp_path / "b", 1)), "needs at least 2")
    fails_cleanly(edm(*train_args(data, tmp_path / "c", 1, 16, "--model-flags", "--image_size 64")), "8x8")
    fails_cleanly(edm(*train_args(data, tmp_path / "d", 1, 16, "--model-flags", "--classifier_width 16")),
                  "cannot build the classifier")
    assert not any((tmp_path / name).exists() for name in "abcd")


def test_resume_is_exact(data, tmp_path):
    """4 steps, and 2 steps resumed to 4, end bit-identical (network, AdamW moments). The annealed learning rate
    depends on --duration, which the first half changes here, so this run keeps it constant (--anneal-lr 0)."""
    common = ("--tick", 0.008, "--dump", 1, "--anneal-lr", 0)
    edm(*train_args(data, tmp_path / "reference", 4, 8, *common, "--duration", 32e-6))
    first = edm(*train_args(data, tmp_path / "resumed", 4, 8, *common, "--duration", 16e-6))
    assert first.exit_code == 0, first.output
    again = edm(*train_args(data, tmp_path / "resumed", 4, 8, *common, "--duration", 32e-6, "--resume", "auto"))
    assert again.exit_code == 0 and "Resuming at 0.016 kimg" in again.stdout, again.output
    expected = load_state(tmp_path / "reference" / "training-state-000000.pt")
    actual = load_state(tmp_path / "resumed" / "training-state-000000.pt")
    assert actual["kind"] == "classifier" and actual["nimg"] == expected["nimg"] == 32
    a = training_tensors({**expected, "ema": {}, "power_ema": {}})
    b = training_tensors({**actual, "ema": {}, "power_ema": {}})
    assert a.keys() == b.keys() and len(a) > 20 and not [k for k in a if not torch.equal(a[k], b[k])]


def test_learning_rate_anneals_linearly_to_zero():
    """The original's set_annealed_lr: lr (1 - step / iterations), here with images before the step over the run."""
    options = ClassifierOptions(data="d", outdir="o", duration=1e-3, lr=3e-4)
    rate = lambda nimg, o=options: ClassifierTrainer._learning_rate(SimpleNamespace(options=o, nimg=nimg))  # noqa
    assert rate(0) == 3e-4 and rate(500) == pytest.approx(1.5e-4) and rate(999) == pytest.approx(3e-7)
    assert ClassifierTrainer._learning_rate(SimpleNamespace(options=options.replace(anneal_lr=False), nimg=500)) == 3e-4


def test_random_crop_is_guided_diffusions():
    """Resized so that the side is in [R, ceil(R / 0.8)] (8..10 for R = 8), then cropped to R x R: a draw of size R
    keeps the image, larger ones zoom in; the draws are the generator's."""
    image = np.arange(3 * 8 * 8, dtype=np.uint8).reshape(3, 8, 8)
    streams = TrainingStreams(seed=0, num_items=1)
    crops = [random_crop(image, 8, streams.sample_generator(p)) for p in range(40)]
    assert all(c.shape == (3, 8, 8) and c.dtype == np.uint8 for c in crops)
    unchanged = sum(np.array_equal(c, image) for c in crops)
    assert 5 <= unchanged <= 25  # a third of the sizes is R (measured 13 of 40)
    again = [random_crop(image, 8, streams.sample_generator(p)) for p in range(40)]
    assert all(np.array_equal(a, b) for a, b in zip(crops, again))
