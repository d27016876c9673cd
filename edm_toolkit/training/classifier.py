"""ADM's noisy classifier (Dhariwal & Nichol 2021, Sec. 4.1; guided-diffusion's scripts/classifier_train.py),
trained by the toolkit's loop (``edm train-classifier``).

The classifier p_phi(y | x_t, t) (the encoder half of the U-Net, ``EncoderUNetModel``) sees
x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps with t uniform over the T steps of its diffusion (the original's
``q_sample`` with the uniform schedule sampler) and learns the label y by cross-entropy. Defaults are the
published training flags (guided-diffusion's README): AdamW with lr 3e-4 and weight decay 0.05, batch 256, the
learning rate annealed linearly to 0 over the run (``anneal_lr``), and the augmentation of ``load_data(...,
random_crop=True)``: the image resized (bicubic) so that its side is a random integer in [R, ceil(R / 0.8)], a
random R x R crop, then a horizontal flip with probability 1/2. The script's own argparse defaults differ (lr
3e-4 but weight decay 0, no anneal, batch 4): the README's are the ones its classifiers were trained with.

Every draw of an image (the step t, the crop size and offsets, the flip, the noise eps) comes from the
generator of its position (streams.py): the run is deterministic, independent of processes and accumulation,
and resumes exactly. Snapshots ``classifier-snapshot-{kimg:06d}.pt`` are toolkit model files of the classifier
with its diffusion and flags, which ``edm generate --classifier`` (``load_openai_classifier``) reads directly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from ..adapters.openai import OpenAIClassifier, OpenAIDiffusion
from ..adapters.openai_flags import classifier_defaults, classifier_from_flags
from ..checkpoints import save_model
from ..errors import ConfigError
from ..io.formats import model_config
from ..losses import UniformStepSampler
from .architectures import CONSTRUCTOR_ERRORS, given_model_flags, parameter_count
from .loop import Meters, TrainingRun
from .options import PRECISIONS, OptionsRecord, is_finite_number
from .samples import ImageSource
from .streams import TrainingStreams

__all__ = ["ClassifierOptions", "ClassifierSamples", "ClassifierTrainer", "random_crop", "train_classifier"]

MIN_CROP_FRACTION = 0.8  # guided-diffusion's random_crop_arr(min_crop_frac=0.8, max_crop_frac=1.0)
_EXTENSIONS = ("num_head_channels", "channel_mult")  # flags that override what create_classifier hard-codes


@dataclass(frozen=True)
class ClassifierOptions(OptionsRecord):
    """One training of a noisy classifier. Defaults: guided-diffusion's published classifier training flags."""

    data: str
    outdir: str
    model_flags: str | None = None  # --image_size, --classifier_* (and --num_head_channels, --channel_mult)
    noise_schedule: str | None = None  # the diffusion it classifies for (default: guided-diffusion's linear)
    diffusion_steps: int | None = None  # its T (default 1000)
    duration: float = 76.8  # Mimg: 300k iterations of batch 256
    batch: int = 256
    batch_gpu: int | None = None
    lr: float = 3e-4
    weight_decay: float = 0.05
    anneal_lr: bool = True
    random_crop: bool = True
    random_flip: bool = True
    xflip: bool = False  # dataset x-flips (EDM's), on top of the random flip
    precision: str = "fp32"
    ls: float = 1.0
    bench: bool = True
    cache: bool = True
    workers: int = 1
    compile: bool = False
    desc: str | None = None
    nosubdir: bool = False
    tick: float = 50.0  # kimg
    snap: int = 50  # ticks
    dump: int = 500  # ticks
    seed: int | None = None
    resume: str | None = None
    device: str | None = None

    cond = True  # a classifier needs the dataset's labels

    def __post_init__(self):
        def need(condition, message):
            if not condition:
                raise ConfigError(message)

        need(is_finite_number(self.weight_decay) and self.weight_decay >= 0,
             f"--weight-decay must be >= 0, got {self.weight_decay}")
        need(self.precision in PRECISIONS and self.precision != "fp16",
             f"--precision {self.precision!r}: a classifier trains in fp32 or bf16")
        self.check_run()


def classifier_flags(model_flags: str | None, *, resolution: int, noise_schedule: str | None = None,
                     diffusion_steps: int | None = None) -> dict[str, Any]:
    """The complete flags of the classifier: --model-flags in the original syntax, the options that set a flag, the
    data's resolution (--image_size), then ``classifier_and_diffusion_defaults``."""
    given = given_model_flags(model_flags, noise_schedule=noise_schedule, diffusion_steps=diffusion_steps)
    if given.setdefault("image_size", resolution) != resolution:
        raise ConfigError(f"--model-flags '--image_size {given['image_size']}' but the dataset's images are "
                          f"{resolution}x{resolution}; drop the flag or use a dataset of that resolution")
    flags = {**classifier_defaults(), **given}
    try:
        betas = OpenAIDiffusion.from_flags(flags).betas
    except (ConfigError, ValueError) as exc:
        raise ConfigError(f"--model-flags: {exc}") from None
    if not bool((betas < 1).all()):
        raise ConfigError(f"the {flags['noise_schedule']} schedule of {flags['diffusion_steps']} steps has beta_t >= 1 "
                          "(the linear schedule needs T > 20); use more steps or --noise-schedule cosine")
    return flags


def build_classifier(flags: dict[str, Any], *, channels: int, num_classes: int) -> OpenAIClassifier:
    """A fresh noisy classifier of these complete flags for ``channels``-channel images and ``num_classes``."""
    extensions = {k: flags[k] for k in _EXTENSIONS if k in flags}
    try:
        model = classifier_from_flags({k: v for k, v in flags.items() if k not in _EXTENSIONS},
                                      num_classes=num_classes, in_channels=channels, **extensions)
    except (*CONSTRUCTOR_ERRORS, AssertionError) as exc:
        raise ConfigError(f"cannot build the classifier from --model-flags: {str(exc)[:200]} (e.g. --channel_mult 1,2 for "
                          "small images, --num_head_channels C dividing the widths)") from None
    return OpenAIClassifier(model, OpenAIDiffusion.from_flags(flags), flags=flags)


def random_crop(image: np.ndarray, resolution: int, generator: torch.Generator) -> np.ndarray:
    """guided-diffusion's random_crop_arr on a uint8 [C, H, W] image: bicubic resize of the shorter side to a random
    integer in [ceil(R / 1.0), ceil(R / 0.8)] (after halving with a box filter while it is at least twice that),
    then a random R x R crop (row offset drawn first, as the original)."""
    low, high = math.ceil(resolution / 1.0), math.ceil(resolution / MIN_CROP_FRACTION)
    size = int(torch.randint(low, high + 1, [], generator=generator))
    picture = Image.fromarray(image[0] if image.shape[0] == 1 else image.transpose(1, 2, 0))
    while min(picture.size) >= 2 * size:
        picture = picture.resize(tuple(x // 2 for x in picture.size), resample=Image.BOX)
    scale = size / min(picture.size)
    picture = picture.resize(tuple(round(x * scale) for x in picture.size), resample=Image.BICUBIC)
    array = np.asarray(picture)
    array = array[None] if array.ndim == 2 else array.transpose(2, 0, 1)
    top = int(torch.randint(array.shape[1] - resolution + 1, [], generator=generator))
    left = int(torch.randint(array.shape[2] - resolution + 1, [], generator=generator))
    return array[:, top:top + resolution, left:left + resolution]


@dataclass
class ClassifierSamples(torch.utils.data.Dataset):
    """Position p -> (x_0 float32 [C, R, R] in [-1, 1], label int64, step t int64, eps float32 [C, R, R]), drawn
    from the position's generator in the order t, crop, flip, eps."""

    source: ImageSource
    streams: TrainingStreams
    num_timesteps: int
    crop: bool = True
    flip: bool = True

    def __post_init__(self):
        self.steps = UniformStepSampler(self.num_timesteps)

    def __getitem__(self, position: int):
        image, labels = self.source[self.streams.item(position)]
        generator = self.streams.sample_generator(position)
        t, _ = self.steps.sample(1, generator)
        image = np.asarray(image, dtype=np.uint8)
        if self.crop:
            image = random_crop(image, image.shape[-1], generator)
        if self.flip and float(torch.rand([], generator=generator)) < 0.5:
            image = image[:, :, ::-1]
        x0 = torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32)) / 127.5 - 1
        noise = torch.randn(x0.shape, generator=generator)
        label = torch.as_tensor(int(np.argmax(labels)), dtype=torch.int64)
        return x0, label, t[0], noise


class ClassifierTrainer(TrainingRun):
    """One training of ADM's noisy classifier on a labelled dataset (module docstring)."""

    kind = "classifier"

    def _no_labels(self) -> str:
        return (f"a classifier learns the dataset's class labels, but {self.options.data!r} has none (dataset.json "
                "without 'labels'); use a labelled dataset (edm dataset writes the labels of its sources)")

    def _configure(self) -> None:
        o = self.options
        self.flags = classifier_flags(o.model_flags, resolution=int(self.source.resolution),
                                      noise_schedule=o.noise_schedule, diffusion_steps=o.diffusion_steps)
        if self.label_dim < 2:
            raise ConfigError(f"the dataset has {self.label_dim} class(es); a classifier needs at least 2")
        f = self.flags
        self.description = (f"{self.source.name}-classifier-w{f['classifier_width']}d{f['classifier_depth']}-"
                            f"{f['noise_schedule']}{f['diffusion_steps']}-gpus{self.group.world_size}-batch{o.batch}-"
                            f"{o.precision}" + (f"-{o.desc}" if o.desc is not None else ""))

    def _build(self) -> None:
        o = self.options
        channels = int(self.source.num_channels)
        classifier = build_classifier(self.flags, channels=channels, num_classes=self.label_dim)
        self.net = classifier.train().requires_grad_(True).to(self.device)
        self.model: Callable = self.net
        grid = self.net.step_grid
        self.sqrt_abar = grid.alphas_cumprod.sqrt().to(self.device, torch.float32)
        self.sqrt_one_minus_abar = (1 - grid.alphas_cumprod).sqrt().to(self.device, torch.float32)
        self._check_forward(channels)
        self.optimizer = torch.optim.AdamW(self.net.parameters(), lr=o.lr, weight_decay=o.weight_decay)

    def _check_forward(self, channels: int) -> None:
        R = int(self.source.resolution)
        self.net.eval()
        try:
            with torch.no_grad():
                logits = self.net(torch.zeros([1, channels, R, R], device=self.device),
                                  torch.zeros([1], dtype=torch.int64, device=self.device))
        except (RuntimeError, ValueError, AssertionError) as exc:
            raise ConfigError(f"the classifier does not run on {channels}x{R}x{R} images "
                              f"({str(exc).splitlines()[0][:200]}); check --model-flags") from None
        finally:
            self.net.train()
        if logits.shape != (1, self.label_dim):
            raise ConfigError(f"the classifier maps an image to logits {list(logits.shape)}, expected [1, "
                              f"{self.label_dim}]; check --model-flags")

    def _model_config(self) -> dict[str, Any]:
        return model_config(self.net)

    def _summary_lines(self) -> list[str]:
        o, f, R = self.options, self.flags, self.source.resolution
        return [
            f"Dataset:                 {o.data if self.dataset is None else self.source.name} "
            f"({len(self.source)} images, {self.source.num_channels}x{R}x{R}, {self.label_dim} classes)",
            f"Classifier:              EncoderUNetModel (width {f['classifier_width']}, depth {f['classifier_depth']}, "
            f"{f['classifier_pool']} pool), {parameter_count(self.net):,} parameters",
            f"Diffusion:               {f['noise_schedule']} schedule, T = {f['diffusion_steps']}, t uniform",
            f"Optimizer:               AdamW lr {o.lr:g}{' annealed to 0' if o.anneal_lr else ''}, weight decay "
            f"{o.weight_decay:g}; random crop {o.random_crop}, flip {o.random_flip}",
            f"Processes, batch:        {self.group.world_size}, {o.batch} ({self.batch_gpu} per micro-batch, "
            f"{self.rounds} accumulation rounds)",
            f"Precision, device:       {o.precision}{' compiled' if o.compile else ''}, {self.device}",
            f"Seed:                    {self.seed}",
        ]

    def _options_record(self) -> dict[str, Any]:
        return dict(self.options.to_dict(), seed=self.seed, flags=self.flags)

    def _samples(self):
        return ClassifierSamples(self.source, self.streams, self.net.step_grid.num_timesteps, self.options.random_crop,
                                 self.options.random_flip)

    def _route(self, calls: Callable | None) -> None:
        self.model = self.net if calls is None else calls

    def _meter_names(self) -> list[str]:
        return ["Loss/loss", "Accuracy/top1", *(["Accuracy/top5"] if self.label_dim > 5 else [])]

    def _objective(self, batch, meters: Meters) -> torch.Tensor:
        x0, labels, t, noise = batch
        shape = (-1, *[1] * (x0.ndim - 1))
        x_t = self.sqrt_abar[t].reshape(shape) * x0 + self.sqrt_one_minus_abar[t].reshape(shape) * noise
        logits = self.model(x_t, t)
        loss = F.cross_entropy(logits.float(), labels, reduction="none")
        meters.add("Loss/loss", loss)
        with torch.no_grad():
            meters.add("Accuracy/top1", (logits.argmax(dim=1) == labels).float())
            if self.label_dim > 5:
                meters.add("Accuracy/top5", (logits.topk(5, dim=1).indices == labels[:, None]).any(dim=1).float())
        return loss

    def _learning_rate(self) -> float:
        """The original's set_annealed_lr: lr (1 - done) with done the fraction of the run before this step."""
        o = self.options
        return o.lr * (1 - self.nimg / o.total_nimg) if o.anneal_lr else o.lr

    def _snapshot(self, run_dir: Path) -> None:
        save_model(self.net, run_dir / f"classifier-snapshot-{self.nimg // 1000:06d}.pt")


def train_classifier(options: ClassifierOptions, dataset: ImageSource | None = None, stream=None) -> Path:
    """Trains a noisy classifier; returns the run directory."""
    return ClassifierTrainer(options, dataset, stream).run()
