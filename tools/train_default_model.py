"""Retrains the built-in default model of `edm generate` from scratch, with one command.

    pip install --no-deps animal-mnist==0.4
    python tools/train_default_model.py --workdir runs/default-model            # about 45 minutes on 2 CPU cores
    python tools/train_default_model.py --workdir runs/default-model --install  # and ship it in the package

Steps (each skipped when its output exists, so an interrupted run continues with --resume auto):
1. data: animal-mnist 0.4 (MIT; 10,000 28x28 silhouettes, 10 classes, padded to 32x32) split by a fixed seed into
   9,000 training images (EDM's dataset layout, train.zip) and 1,000 held-out images, 100 per class
   (held_out.npz), which neither the model nor the evaluation classifier is trained on;
2. train: `edm train` with the options in TRAIN_OPTIONS (recorded with the time taken and the machine in
   record.json);
3. --install: the last EMA snapshot becomes edm_toolkit/data/default_model.pt.

The quality of the result is measured by tools/bench_default_model.py (FID and classification accuracy).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tools"))

from prepare_wheel_dataset import ANIMAL_CLASSES, ArraySource, animal_mnist  # noqa: E402

from _report import write_section  # noqa: E402

from edm_toolkit.training.dataset_tool import convert_dataset  # noqa: E402

HELD_OUT_PER_CLASS = 100
SPLIT_SEED = 2026
# DDPM++ at 32x32, 1 channel, 10 classes, channels 16/32/64 at 32/16/8 pixels: 1.03M parameters (4 MB of float32
# weights), about 12 s per thousand images on 2 CPU cores, so 200 kimg take about 45 minutes.
DURATION_KIMG = 200
TRAIN_OPTIONS = [
    "--cond", "1", "--arch", "ddpmpp", "--cbase", "16", "--cres", "1,2,4", "--net-opt", "num_blocks=2",
    "--net-opt", "attn_resolutions=[8]", "--precond", "edm", "--batch", "64", "--lr", "2e-3", "--lr-rampup", "10",
    "--ema", "0.01", "--dropout", "0.05", "--augment", "0", "--xflip", "1", "--cond-drop", "0.1",
    "--duration", str(DURATION_KIMG / 1000), "--tick", "5", "--snap", "4", "--dump", "4", "--seed", "0", "--workers", "1",
]


def torch_version() -> str:
    import torch

    return torch.__version__


def split(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(training indices, held-out indices): HELD_OUT_PER_CLASS of each class, drawn with SPLIT_SEED."""
    rng = np.random.RandomState(SPLIT_SEED)
    held_out = np.concatenate([rng.permutation(np.flatnonzero(labels == c))[:HELD_OUT_PER_CLASS]
                               for c in range(len(ANIMAL_CLASSES))])
    return np.setdiff1d(np.arange(len(labels)), held_out), np.sort(held_out)


def prepare(workdir: Path) -> Path:
    data = workdir / "train.zip"
    if data.exists() and (workdir / "held_out.npz").exists():
        return data
    images, labels = animal_mnist()
    train, held_out = split(labels)
    np.savez(workdir / "held_out.npz", images=images[held_out], labels=labels[held_out],
             class_names=np.array(ANIMAL_CLASSES))
    convert_dataset(ArraySource("animal-mnist", list(images[train]), labels[train].tolist()), data)
    print(f"Data: {len(train)} training images in {data}, {len(held_out)} held out", file=sys.stderr)
    return data


def train(workdir: Path, data: Path) -> Path:
    run = workdir / "run"
    command = ["edm", "train", "--outdir", str(run), "--nosubdir", "--data", str(data), *TRAIN_OPTIONS]
    if run.exists():
        command += ["--resume", "auto"]
    print("Running:", " ".join(command), file=sys.stderr)
    start, cpu_start = time.time(), resource.getrusage(resource.RUSAGE_CHILDREN)
    subprocess.run([sys.executable, "-m", "edm_toolkit", *command[1:]], check=True, cwd=REPO)
    cpu = resource.getrusage(resource.RUSAGE_CHILDREN)
    record = {
        "command": " ".join(["edm", "train", "--outdir", "RUN", "--nosubdir", "--data", "train.zip", *TRAIN_OPTIONS]),
        "wall_minutes": round((time.time() - start) / 60, 1),
        "cpu_minutes": round((cpu.ru_utime + cpu.ru_stime - cpu_start.ru_utime - cpu_start.ru_stime) / 60, 1),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.processor() or 'cpu'}",
        "load_average_at_end": round(os.getloadavg()[0], 2),
        "torch": torch_version(),
    }
    (workdir / "record.json").write_text(json.dumps(record, indent=1))
    print(json.dumps(record, indent=1), file=sys.stderr)
    write_record(record)
    return run


def write_record(record: dict) -> None:
    """docs/default_model.md's training section: the exact command, its duration and the machine."""
    body = (f"```bash\n{record['command']}\n```\n\nTrained in {record['wall_minutes']} minutes "
            f"({record['cpu_minutes']} CPU minutes) on {record['machine']}, torch {record.get('torch', '?')}.")
    write_section("default-model-training", body, REPO / "docs" / "default_model.md")


def install(run: Path) -> Path:
    snapshots = sorted(run.glob("network-snapshot-*.pt"))
    if not snapshots:
        sys.exit(f"Error: no network snapshot in {run}; train first")
    target = REPO / "edm_toolkit" / "data" / "default_model.pt"
    shutil.copyfile(snapshots[-1], target)
    print(f"Installed {snapshots[-1].name} as {target}", file=sys.stderr)
    return target


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, default=Path("runs/default-model"), help="where data and run go")
    parser.add_argument("--install", action="store_true", help="ship the result as the package's default model")
    args = parser.parse_args(argv)
    args.workdir.mkdir(parents=True, exist_ok=True)
    data = prepare(args.workdir)
    run = args.workdir / "run"
    if not (run / f"network-snapshot-{DURATION_KIMG:06d}.pt").exists():
        run = train(args.workdir.resolve(), data.resolve())
    if args.install:
        install(run)


if __name__ == "__main__":
    main()
