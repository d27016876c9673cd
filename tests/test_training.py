"""The training loop: it learns, resumes bit-exactly after SIGKILL, and DDP/accumulation do not change the result.

Tiny networks (SongUNet, 16 channels, one block per level) on 8x8 grayscale datasets written in EDM's layout.
Subprocess runs use one thread each (OMP_NUM_THREADS=1): bit-exact comparisons need the same thread count, and
extra threads only slow tiny tensors down.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from edm_toolkit.loading import load_model
from edm_toolkit.cli import main
from edm_toolkit.errors import ConfigError
from edm_toolkit.ideal import IdealDenoiser
from edm_toolkit.training import TrainingOptions, train
from edm_toolkit.training.architectures import backbone_config, build_denoiser
from edm_toolkit.training.dataset import ImageDataset
from edm_toolkit.training.loop import clean_gradients, learning_rate
from edm_toolkit.training.samples import PositionBatches
from edm_toolkit.training.state import load_state
from edm_toolkit.training.streams import TrainingStreams
from edm_toolkit.presets import PrecondConfig

REPO = Path(__file__).resolve().parents[1]
TINY_NET = {"num_blocks": 1, "attn_resolutions": []}
TINY_ARGS = ["--arch", "song_unet", "--cbase", "16", "--cres", "1,2", "--net-opt", "num_blocks=1",
             "--net-opt", "attn_resolutions=[]", "--augment", "0"]


def make_dataset(path: Path, n: int = 8, resolution: int = 8, num_classes: int | None = None, seed: int = 0) -> Path:
    """n grayscale discs (smooth edges) in EDM's folder layout, labelled i % num_classes when num_classes is set."""
    path.mkdir(parents=True)
    rng = np.random.RandomState(seed)
    yy, xx = np.mgrid[0:resolution, 0:resolution]
    labels = []
    for i in range(n):
        cx, cy = rng.uniform(1, resolution - 1, size=2)
        r = rng.uniform(0.2, 0.45) * resolution
        image = (255 / (1 + np.exp(((xx - cx) ** 2 + (yy - cy) ** 2 - r * r) / 2))).astype(np.uint8)
        name = f"img{i:08d}.png"
        Image.fromarray(image, "L").save(path / name)
        labels.append([name, i % num_classes] if num_classes else None)
    if num_classes:
        (path / "dataset.json").write_text(json.dumps({"labels": labels}))
    return path


def tiny_options(data: Path, outdir: Path, **changes) -> TrainingOptions:
    options = dict(data=str(data), outdir=str(outdir), arch="song_unet", cbase=16, cres=(1, 2), net_opts=TINY_NET,
                   dropout=0.0, augment=0.0, workers=0, seed=0, nosubdir=True)
    options.update(changes)
    return TrainingOptions(**options)


def run_edm(*args, env=None, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "edm_toolkit", *map(str, args)], env=env or single_thread_env(),
                          capture_output=True, text=True, cwd=REPO, **kwargs)


def run_in_process(*args):
    return CliRunner().invoke(main, list(map(str, args)), catch_exceptions=False)


def single_thread_env() -> dict:
    return dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1")


def tensors(obj, prefix=""):
    """Every tensor in a nested state, by path."""
    if isinstance(obj, torch.Tensor):
        yield prefix, obj
    elif isinstance(obj, dict):
        for key in sorted(obj, key=str):
            yield from tensors(obj[key], f"{prefix}/{key}")
    elif isinstance(obj, (list, tuple)):
        for i, value in enumerate(obj):
            yield from tensors(value, f"{prefix}/{i}")


def training_tensors(state: dict) -> dict[str, torch.Tensor]:
    return dict(tensors({k: state[k] for k in ("net", "ema", "power_ema", "optimizer")}))


# --- units --------------------------------------------------------------------------------------------------


def test_learning_rate_ramp_and_gradient_cleaning():
    assert learning_rate(1e-3, 0, 10000) == 0.0  # EDM's first step: no images seen yet
    assert learning_rate(1e-3, 5_000_000, 10000) == pytest.approx(5e-4)
    assert learning_rate(1e-3, 20_000_000, 10000) == 1e-3
    p = torch.nn.Parameter(torch.zeros(4))
    p.grad = torch.tensor([float("nan"), float("inf"), -float("inf"), 2.0])
    clean_gradients([p, torch.nn.Parameter(torch.zeros(1))])
    assert p.grad.tolist() == [0.0, 1e5, -1e5, 2.0]


def test_data_order_visits_every_item_once_per_epoch():
    streams = TrainingStreams(seed=5, num_items=10)
    for epoch in range(3):
        items = [streams.item(epoch * 10 + i) for i in range(10)]
        assert sorted(items) == list(range(10))
    first, second = ([streams.item(e * 10 + i) for i in range(10)] for e in range(2))
    assert first != second  # reshuffled each epoch
    assert [TrainingStreams(5, 10).item(p) for p in range(25)] == [streams.item(p) for p in range(25)]
    assert [TrainingStreams(6, 10).item(p) for p in range(10)] != first


def test_every_process_and_round_split_covers_the_same_positions():
    def positions(world, batch_gpu):
        steps = []
        for rank in range(world):
            it = iter(PositionBatches(16, 8, batch_gpu, rank, world))
            steps += [p for _ in range(8 // world // batch_gpu * 2) for p in next(it)]
        return sorted(steps)

    assert positions(1, 8) == positions(2, 4) == positions(2, 2) == positions(4, 1) == list(range(16, 32))
    with pytest.raises(ValueError):
        PositionBatches(0, 8, 3)


def test_options_are_validated():
    with pytest.raises(ConfigError, match="--cond-drop needs a conditional"):
        TrainingOptions(data="d", outdir="o", cond_drop=0.1)
    with pytest.raises(ConfigError, match="unknown --arch"):
        TrainingOptions(data="d", outdir="o", arch="unet9000")
    with pytest.raises(ConfigError, match="unknown loss"):
        TrainingOptions(data="d", outdir="o", loss="l1")
    with pytest.raises(ConfigError, match="sigma_rel"):
        TrainingOptions(data="d", outdir="o", phema=(0.3,))
    with pytest.raises(ConfigError, match="--transfer and --resume"):
        TrainingOptions(data="d", outdir="o", transfer="a", resume="b")


# --- it learns ------------------------------------------------------------------------------------------------


def test_it_learns_the_ideal_denoiser(tmp_path, one_thread):
    """200 steps of batch 16 on 8 images: the loss falls, and the EMA snapshot's D(x; sigma) approaches the exact
    denoiser of the data (IdealDenoiser) at noise levels and noise draws the training never saw."""
    data = make_dataset(tmp_path / "data")
    steps, batch = 200, 16
    options = tiny_options(data, tmp_path / "run", batch=batch, duration=steps * batch / 1e6, lr=2e-3,
                           lr_rampup=steps * batch / 1000 / 10, tick=steps * batch / 1000 / 5, snap=5, dump=5)
    run = train(options)
    losses = [json.loads(line)["Loss/loss"]["mean"] for line in (run / "stats.jsonl").read_text().splitlines()]
    assert len(losses) == 6 and losses[-1] < 0.3 * losses[0], losses  # measured: 1.81 -> 0.31

    dataset = ImageDataset(data, use_labels=False)
    y = torch.stack([torch.from_numpy(np.array(dataset[i][0])) for i in range(len(dataset))]).double() / 127.5 - 1
    ideal = IdealDenoiser(y)
    learned = load_model(run / "network-snapshot-000003.pt")
    torch.manual_seed(123)  # an untrained network of the same architecture, as the baseline
    untrained = build_denoiser(backbone_config("song_unet", resolution=8, channels=1, label_dim=0, augment_dim=0,
                                               dropout=0, cbase=16, cres=[1, 2], overrides=TINY_NET),
                               PrecondConfig("edm")).eval()
    g = torch.Generator().manual_seed(2024)
    for sigma in (0.13, 0.37, 1.1, 3.3):
        x = y[torch.randint(len(y), [64], generator=g)] + sigma * torch.randn([64, 1, 8, 8], generator=g, dtype=torch.float64)
        with torch.no_grad():
            exact = ideal(x, sigma)
            error = ((learned(x.float(), sigma).double() - exact) ** 2).mean()
            baseline = ((untrained(x.float(), sigma).double() - exact) ** 2).mean()
        assert error < 0.35 * baseline, (sigma, float(error), float(baseline))  # measured ratios 0.07 .. 0.23


def test_gradient_accumulation_gives_the_same_step(tmp_path, one_thread):
    """--batch-gpu only splits the work: 8 images in one micro-batch or four of two give the same weights (float
    rounding aside), because every draw belongs to an image position, not to a micro-batch."""
    data = make_dataset(tmp_path / "data", num_classes=2)
    finals = {}
    for batch_gpu in (8, 2):
        options = tiny_options(data, tmp_path / f"bg{batch_gpu}", batch=8, batch_gpu=batch_gpu, duration=24e-6,
                               lr_rampup=0.008, tick=0.008, dump=1, snap=100, cond=True, cond_drop=0.25)
        finals[batch_gpu] = training_tensors(load_state(train(options) / "training-state-000000.pt"))
    _assert_close_training(finals[8], finals[2])


def _assert_close_training(a: dict, b: dict, lr: float = 1e-3) -> None:
    """Equal up to float rounding of the gradient sums. Adam turns the rounding noise of a near-zero gradient into
    a step of up to lr, so weights are compared to lr (measured: 2e-3 lr at most) and as a whole (relative L2,
    measured 1e-7); the optimizer's moments to their own scale (measured 2e-6)."""
    assert a.keys() == b.keys()
    for name in a:
        difference = (a[name].double() - b[name].double()).abs().max()
        if name.startswith("/optimizer"):
            assert difference <= 1e-4 * a[name].double().abs().max() + 1e-12, name
        else:
            assert difference <= 0.02 * lr, name
    weights = [k for k in a if k.startswith("/net/")]
    squared = lambda t: float(t.double().square().sum())
    assert sum(squared(a[k] - b[k]) for k in weights) <= 1e-10 * sum(squared(a[k]) for k in weights)


# --- resume after SIGKILL -------------------------------------------------------------------------------------


def test_sigkill_then_resume_auto_is_bit_identical(tmp_path, one_thread):
    """A run of 10 steps, and the same run killed with SIGKILL after a random step and resumed with --resume
    auto, end with bit-identical network, EMAs (half-life and power) and optimizer state. (The reference runs in
    this process, the killed run and its resumption in subprocesses, all on one thread.)"""
    data = make_dataset(tmp_path / "data", num_classes=2)
    steps = 10
    common = [*TINY_ARGS, "--data", data, "--batch", "4", "--duration", f"{steps * 4e-6:.6f}", "--tick", "0.004",
              "--snap", "1", "--dump", "1", "--seed", "7", "--workers", "1", "--lr-rampup", "0.02", "--dropout", "0.1",
              "--cond", "1", "--cond-drop", "0.2", "--phema", "0.05,0.1", "--nosubdir"]
    reference = run_in_process("train", "--outdir", tmp_path / "reference", *common)
    assert reference.exit_code == 0, reference.output

    # The tick line of this step triggers the kill; states are dumped from tick 1 on (EDM skips tick 0), after the
    # line is printed, so the kill comes at step 2 or later for a state to exist.
    kill_after = random.SystemRandom().randint(2, steps - 3)
    killed_dir = tmp_path / "killed"
    process = subprocess.Popen([sys.executable, "-m", "edm_toolkit", "train", "--outdir", str(killed_dir), *map(str, common)],
                               env=single_thread_env(), stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                               cwd=REPO)
    for line in process.stdout:
        if line.startswith(f"tick {kill_after} "):
            os.kill(process.pid, signal.SIGKILL)
            break
    process.wait(timeout=120)
    assert process.returncode == -signal.SIGKILL, f"the run ended before step {kill_after}"
    interrupted = load_state(killed_dir / "training-state-000000.pt")  # the last complete state is readable
    assert interrupted["nimg"] < steps * 4, kill_after

    resumed = run_edm("train", "--outdir", killed_dir, "--resume", "auto", *common)
    assert resumed.returncode == 0, resumed.stderr
    assert f"Resuming at {interrupted['nimg'] / 1e3:.3f} kimg" in resumed.stdout

    expected = load_state(tmp_path / "reference" / "training-state-000000.pt")
    actual = load_state(killed_dir / "training-state-000000.pt")
    assert actual["nimg"] == expected["nimg"] == steps * 4
    expected_tensors, actual_tensors = training_tensors(expected), training_tensors(actual)
    assert expected_tensors.keys() == actual_tensors.keys() and len(expected_tensors) > 50
    different = [k for k in expected_tensors if not torch.equal(expected_tensors[k], actual_tensors[k])]
    assert not different, f"killed after step {kill_after}: {different[:5]}"
    # stats.jsonl holds each tick once, as the uninterrupted run's.
    kimg = lambda d: [json.loads(l)["Progress/kimg"]["mean"] for l in (d / "stats.jsonl").read_text().splitlines()]
    assert kimg(killed_dir) == kimg(tmp_path / "reference")
    assert not [p.name for p in killed_dir.iterdir() if p.name.startswith(".")]  # no temporary files left


# --- DDP ----------------------------------------------------------------------------------------------------


def test_torchrun_two_processes_match_one_process(tmp_path, one_thread):
    """torchrun --nproc_per_node=2 (gloo, CPU) with 4 images per process gives the weights of one process with
    batch 8, within float tolerance: data order, sigma, noise and label dropout depend on the image position."""
    data = make_dataset(tmp_path / "data", num_classes=2)
    common = [*TINY_ARGS, "--data", data, "--batch", "8", "--duration", "0.000024", "--tick", "0.008", "--dump", "1",
              "--snap", "100", "--seed", "3", "--workers", "0", "--lr-rampup", "0.008", "--dropout", "0", "--cond", "1",
              "--cond-drop", "0.25", "--nosubdir"]
    one = run_in_process("train", "--outdir", tmp_path / "one", *common)
    assert one.exit_code == 0, one.output
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          "-m", "edm_toolkit", "train", "--outdir", str(tmp_path / "two"), *map(str, common)],
                         env=single_thread_env(), capture_output=True, text=True, cwd=REPO, timeout=300)
    assert two.returncode == 0, two.stderr[-3000:]
    assert "gpus2" not in str(tmp_path / "two") and "Processes, batch:        2, 8" in two.stdout
    expected = training_tensors(load_state(tmp_path / "one" / "training-state-000000.pt"))
    actual = training_tensors(load_state(tmp_path / "two" / "training-state-000000.pt"))
    _assert_close_training(expected, actual)
    losses = [[json.loads(l)["Loss/loss"]["mean"] for l in (tmp_path / d / "stats.jsonl").read_text().splitlines()]
              for d in ("one", "two")]
    assert np.allclose(losses[0], losses[1], rtol=1e-5), losses
