"""edm dataset: a drop-in for EDM's dataset_tool.py (same options and output layout), streamed and atomic."""

from __future__ import annotations

import sys
import time

import click

from ..errors import EDMToolkitError


class _Resolution(click.ParamType):
    name = "WxH"

    def convert(self, value, param, ctx):
        from ..training.dataset_tool import parse_resolution

        if isinstance(value, tuple):
            return value
        try:
            return parse_resolution(value)
        except EDMToolkitError as exc:
            self.fail(str(exc), param, ctx)


class _Progress:
    """Progress on stderr: one updating line on a terminal, a line every few seconds otherwise."""

    def __init__(self, stream=None):
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty()
        self.start = self.last = time.perf_counter()
        self.shown = False

    def __call__(self, done: int, total: int | None) -> None:
        now = time.perf_counter()
        if now - self.last < (0.2 if self.tty else 5.0) and done != total:
            return
        self.last = now
        rate = done / max(now - self.start, 1e-9)
        line = f"{done}/{total} images" if total is not None else f"{done} images"
        line += f" | {now - self.start:.1f} s | {rate:.0f} img/s"
        self.stream.write(f"\r{line}\033[K" if self.tty else line + "\n")
        self.stream.flush()
        self.shown = True

    def close(self) -> None:
        if self.tty and self.shown:
            self.stream.write("\n")
            self.stream.flush()


@click.command()
@click.option("--source", required=True, metavar="PATH",
              help="Input: an image folder or .zip (labels from its dataset.json or sub-folder names), "
                   "cifar-10-python.tar.gz, MNIST *-images-idx3-ubyte[.gz], or a numpy .npz")
@click.option("--dest", required=True, metavar="PATH",
              help="Output folder (new or empty) or .zip (uncompressed), in EDM's dataset layout")
@click.option("--max-images", type=click.IntRange(min=0), default=None, metavar="INT",
              help="Read at most this many source images  [default: all]")
@click.option("--transform", type=click.Choice(["center-crop", "center-crop-wide"]), default=None,
              help="Crop before resizing (needs --resolution): the centred square, or the centred wide strip on "
                   "a square black canvas  [default: resize only]")
@click.option("--resolution", type=_Resolution(), default=None, metavar="WxH",
              help="Output size, e.g. 32x32 (Lanczos resize)  [default: the source's]")
@click.option("--skip-bad", is_flag=True,
              help="Leave out images that do not decode or differ in size/channels (counted at the end) instead "
                   "of stopping with an error")
def dataset(source, dest, max_images, transform, resolution, skip_bad):
    """Convert images into a training dataset in EDM's layout (EDM's dataset_tool.py options).

    \b
    Output: {idx:08d}[:5]/img{idx:08d}.png as uncompressed PNGs and dataset.json
    {"labels": [[name, label], ...]} (or null), in a folder or an uncompressed zip,
    which 'edm train' and EDM's train.py read as is. Images must come out square,
    of one power-of-two size, grayscale or RGB.

    \b
    Examples:
      edm dataset --source downloads/cifar-10-python.tar.gz --dest datasets/cifar10-32x32.zip
      edm dataset --source downloads/train-images-idx3-ubyte.gz --dest datasets/mnist-32x32.zip
      edm dataset --source photos/ --dest datasets/photos-64x64.zip --transform center-crop --resolution 64x64
      edm dataset --source arrays.npz --dest datasets/arrays/
    """
    from ..training.dataset_sources import open_source
    from ..training.dataset_tool import convert_dataset

    src = open_source(source)
    click.echo(f"Converting {src.description} to {dest!r}", err=True)
    progress = _Progress()
    try:
        result = convert_dataset(src, dest, max_images=max_images, transform=transform, resolution=resolution,
                                 skip_bad=skip_bad, progress=progress)
    finally:
        progress.close()
    channels = {1: "grayscale", 3: "RGB"}[result.channels]
    labels = ("no labels" if not result.label_dim else f"label vectors of {result.label_dim}" if result.label_vectors
              else f"{result.label_dim} class{'es' if result.label_dim > 1 else ''}")
    click.echo(f"Wrote {result.written} images ({result.resolution}x{result.resolution} {channels}, {labels}) "
               f"to {dest!r}", err=True)
    if result.unlabelled and result.unlabelled < result.written:
        click.echo(f"Note: {result.unlabelled} images had no label, so dataset.json holds no labels", err=True)
    if result.too_small:
        click.echo(f"Left out {result.too_small} images smaller than --resolution (center-crop-wide)", err=True)
    if result.skipped:
        click.echo(f"Skipped {result.skipped} bad images (--skip-bad); the first: {result.skip_reasons[0]}", err=True)
