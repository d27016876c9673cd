"""Image generation: seeds -> per-seed latents, labels and churn noise -> sampler -> PNG files.

Follows EDM's generate.py: one generator per seed (latent, then label, then churn noise), so an image depends
only on its seed, not on the batch it was drawn in or on the process that drew it.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from PIL import Image

from .distributed import ProcessGroup, rank_batches
from .errors import EDMToolkitError
from .io.images import decode_image, image_path, make_grid, save_png, to_uint8
from .io.outputs import remove_stale_temp_files
from .protocol import BoundInputs
from .rng import SeedGenerators
from .sampling import Sampler, StepInfo


def check_class(net, class_idx: int | None) -> None:
    if class_idx is None:
        return
    if net.label_dim == 0:
        raise EDMToolkitError("--class was given but the network is unconditional (label_dim 0); drop --class")
    if not 0 <= class_idx < net.label_dim:
        raise EDMToolkitError(f"--class {class_idx} is out of range: the network has classes 0..{net.label_dim - 1}")


def sample_batch(net, sampler: Sampler, seeds: Sequence[int] | None = None, device="cpu", class_idx: int | None = None,
                 callback: Callable[[StepInfo], None] | None = None, plan=None, *, latents: torch.Tensor | None = None,
                 class_labels: torch.Tensor | None = None) -> torch.Tensor:
    """float64 images [batch, C, H, W] from any sampler, exactly as EDM's generate.py draws them.

    With ``seeds``, one generator per seed draws the latent, then the class label, then the solver's noise (EDM's
    order), so an image depends only on its seed; given ``latents`` (unit variance, [len(seeds), C, H, W]) or
    one-hot ``class_labels`` replace those draws, which are still made, so the rest of each stream is unchanged.
    Without seeds, ``latents`` are required and the noise comes from torch's global generator. ``class_idx``
    forces one class for every image.
    """
    if seeds is None and latents is None:
        raise EDMToolkitError("sample_batch needs seeds or latents")
    shape = [net.img_channels, net.img_resolution, net.img_resolution]
    if seeds is not None:
        rnd = SeedGenerators(seeds, device)
        drawn = rnd.randn([len(seeds), *shape], device=device)
        latents = drawn if latents is None else latents
        drawn_labels = rnd.randint(net.label_dim, size=[len(seeds)], device=device) if net.label_dim else None
        randn_like = rnd.randn_like
    else:
        drawn_labels, randn_like = None, torch.randn_like
    latents = latents.to(device)
    if list(latents.shape[1:]) != shape:
        raise EDMToolkitError(f"latents have shape {tuple(latents.shape)}; the network needs [batch, {', '.join(map(str, shape))}]")
    if net.label_dim and class_labels is None:
        if class_idx is not None:
            drawn_labels = torch.full([len(latents)], class_idx, dtype=torch.int64, device=device)
        elif drawn_labels is None:
            drawn_labels = torch.randint(net.label_dim, [len(latents)], device=device)
        class_labels = torch.eye(net.label_dim, device=device)[drawn_labels]
    with torch.no_grad():
        return sampler(net, latents, class_labels, randn_like=randn_like, callback=callback, plan=plan)


class Progress:
    """Progress on stderr: one updating line on a terminal, one line per batch otherwise."""

    def __init__(self, num_images: int, nfe_per_batch: int, enabled: bool = True, stream=None):
        self.stream = stream or sys.stderr
        self.enabled = enabled
        self.tty = self.enabled and self.stream.isatty()
        self.num_images, self.nfe_per_batch = num_images, nfe_per_batch
        self.done = 0
        self.start = time.perf_counter()

    def _line(self, extra: str = "") -> str:
        elapsed = time.perf_counter() - self.start
        rate = self.done / elapsed if elapsed > 0 else 0.0
        return f"{self.done}/{self.num_images} images{extra} | {elapsed:.1f} s | {rate:.2f} img/s"

    def step(self, info: StepInfo) -> None:
        if self.tty:
            self.stream.write(f"\r{self._line(f' | step {info.step}/{info.num_steps}, {info.nfe}/{self.nfe_per_batch} NFE')}\033[K")
            self.stream.flush()

    def batch_done(self, count: int) -> None:
        self.done += count
        if self.enabled:
            self.stream.write(("\r" + self._line() + "\033[K") if self.tty else self._line() + "\n")
            self.stream.flush()

    def close(self) -> None:
        if self.tty:
            self.stream.write("\n")
            self.stream.flush()


def _output_entries(outdir: str | Path, seeds: Sequence[int], subdirs: bool):
    """(seed or None, directory entry) for the entries of the existing output directories that are the PNG of one
    of ``seeds`` (seed given) or anything else (None). Reads each directory once and holds no path per seed, so a
    million seeds cost a set of integers. A file where an output directory must be is an error."""
    wanted = set(seeds)
    directories = {Path(outdir)}
    if subdirs:
        directories |= {image_path(outdir, group, True).parent for group in {s - s % 1000 for s in wanted}}
    for directory in directories:
        try:
            entries = os.scandir(directory)
        except FileNotFoundError:
            continue
        except NotADirectoryError:
            raise EDMToolkitError(f"{str(directory)!r} is a file in the way of an output directory; move or "
                                  "remove it") from None
        with entries:
            for entry in entries:
                seed = _seed_of(entry.name)
                mine = seed is not None and seed in wanted and image_path(outdir, seed, subdirs).parent == directory
                yield (seed if mine else None), entry


def _seed_of(name: str) -> int | None:
    """The seed whose PNG is called ``name`` ({seed:06d}.png), or None."""
    stem = name[:-4] if name.endswith(".png") else ""
    if len(stem) < 6 or not stem.isascii() or not stem.isdigit() or f"{int(stem):06d}" != stem:
        return None
    return int(stem)


def check_outputs(outdir: str | Path, seeds: Sequence[int], subdirs: bool = False, extra: Sequence[str] = ()) -> None:
    """Checks, creating nothing, that nothing is in the way of the outputs: ``outdir`` and the subdirectories are
    directories where they exist, and no seed's PNG name (nor one of ``extra`` in outdir, e.g. grid.png) is a
    directory or another non-file."""
    outdir = Path(outdir)
    for seed, entry in _output_entries(outdir, seeds, subdirs):
        named = seed is not None or (entry.name in extra and Path(entry.path).parent == outdir)
        if named and not entry.is_file():
            kind = "directory" if entry.is_dir() else "non-file"
            raise EDMToolkitError(f"{entry.path!r} is a {kind} in the way of an output image; move or remove it")


def existing_seeds(outdir: str | Path, seeds: Sequence[int], subdirs: bool = False) -> set[int]:
    """The seeds whose PNG exists as a non-empty regular file (this toolkit writes atomically: a whole PNG)."""
    done = set()
    for seed, entry in _output_entries(outdir, seeds, subdirs):
        try:
            if seed is not None and entry.is_file(follow_symlinks=False) and entry.stat().st_size > 0:
                done.add(seed)
        except OSError:
            pass
    return done


def generate_images(
    net, sampler: Sampler, seeds: Sequence[int], outdir: str | Path, *, max_batch_size: int = 64,
    class_idx: int | None = None, subdirs: bool = False, device="cpu", group: ProcessGroup = ProcessGroup(),
    progress: bool = True, plan=None, skip_existing: bool = False, upsample_from: str | Path | None = None,
    fixed_batch: bool = False,
) -> list[Path]:
    """Writes one PNG per seed (this process's share of the seeds); returns the paths it wrote.

    With ``upsample_from`` (a cascade), ``net`` is an upsampler conditioned on the PNG of each seed found in that
    directory (:func:`upsample_batch`). With ``fixed_batch`` every batch has the size of the largest (a shorter
    one is padded with repeats of its last seed, whose extra images are dropped), so that a compiled network
    sees one shape and compiles once.

    Temporary files that killed runs left in the output directories are removed first. With ``skip_existing``,
    seeds whose PNG already exists are left out (an image depends only on its seed, so a resumed run writes the
    same files an uninterrupted one would). A seed whose image is not finite (NaN or inf: a broken network or an
    extreme noise range) stops the run with an error naming it, before its batch is written.
    """
    check_class(net, class_idx)
    device = torch.device(device)
    check_outputs(outdir, seeds, subdirs)
    for directory in {Path(outdir), *(image_path(outdir, s - s % 1000, subdirs).parent for s in set(seeds))}:
        remove_stale_temp_files(directory)
    if skip_existing:
        done = existing_seeds(outdir, seeds, subdirs)
        pending = [s for s in seeds if s not in done]
        group.barrier()  # every rank lists the files before any rank writes one, so all split the same seeds
        if progress and group.rank == 0 and len(pending) < len(seeds):
            print(f"Skipping {len(seeds) - len(pending)} seeds whose PNG exists", file=sys.stderr, flush=True)
        seeds = pending
    batches = rank_batches(list(seeds), max_batch_size, group)
    plan = plan if plan is not None else sampler.plan(net, device)
    meter = Progress(sum(len(b) for b in batches), plan.nfe, enabled=progress and group.rank == 0)
    written: list[Path] = []
    size = max((len(b) for b in rank_batches(list(seeds), max_batch_size, ProcessGroup())), default=0)
    try:
        for batch_seeds in batches:
            if not batch_seeds:
                continue
            run = batch_seeds + batch_seeds[-1:] * (size - len(batch_seeds)) if fixed_batch else batch_seeds
            if upsample_from is None:
                images = sample_batch(net, sampler, run, device, class_idx, callback=meter.step, plan=plan)
            else:
                images = upsample_batch(net, sampler, read_low_res(upsample_from, run, subdirs), run, device,
                                        class_idx=class_idx, callback=meter.step, plan=plan)
            images = images[:len(batch_seeds)]
            check_finite(images, batch_seeds)
            for seed, image in zip(batch_seeds, to_uint8(images)):
                path = image_path(outdir, seed, subdirs)
                save_png(image, path)
                written.append(path)
            meter.batch_done(len(batch_seeds))
    finally:
        meter.close()
    return written


def low_res_from_uint8(images, device: torch.device | str = "cpu") -> torch.Tensor:
    """uint8 low-resolution images [N, C, h, w] (a tensor or array; or [N, h, w, C] arrays as read from PNG
    files, recognised by C in (1, 3) last) -> float32 [N, C, h, w] in [-1, 1], as the training data is scaled."""
    array = images if isinstance(images, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(images))
    if array.dtype != torch.uint8 or array.ndim != 4:
        raise EDMToolkitError(f"low-resolution images must be uint8 [N, C, h, w], got {array.dtype} "
                              f"{list(array.shape)}")
    if array.shape[1] not in (1, 3) and array.shape[3] in (1, 3):
        array = array.permute(0, 3, 1, 2)
    return array.to(device, torch.float32) / 127.5 - 1


def upsample_batch(net, sampler, low_res_uint8, seeds: Sequence[int], device: torch.device | str = "cpu", *,
                   class_labels: torch.Tensor | None = None, class_idx: int | None = None,
                   callback: Callable | None = None, plan=None) -> torch.Tensor:
    """High-resolution samples (float64 [N, C, H, W] in [-1, 1]) of the upsampler ``net`` conditioned on the
    low-resolution images ``low_res_uint8`` (uint8, one per seed, see :func:`low_res_from_uint8`).

    The noise of image i comes from its seed alone (:func:`~edm_toolkit.generate.sample_batch`), so an image
    depends on its seed and its low-resolution input, not on the batch. A class-conditional upsampler takes the
    classes of the low-resolution samples as one-hot ``class_labels`` [N, label_dim], or one ``class_idx``; by
    default each seed's class is the one a base model of the same classes drew for it
    (:func:`base_class_labels`).
    """

    seeds = [int(s) for s in seeds]
    low_res = low_res_from_uint8(low_res_uint8, device)
    if len(low_res) != len(seeds):
        raise EDMToolkitError(f"{len(low_res)} low-resolution images for {len(seeds)} seeds; give one per seed")
    if low_res.shape[1] != net.img_channels:
        raise EDMToolkitError(f"the low-resolution images have {low_res.shape[1]} channels, the upsampler makes "
                              f"{net.img_channels}")
    if low_res.shape[-1] >= net.img_resolution:
        raise EDMToolkitError(f"the low-resolution images are {low_res.shape[-1]}x{low_res.shape[-2]}, not smaller "
                              f"than the upsampler's {net.img_resolution}x{net.img_resolution}")
    check_class(net, class_idx)
    if class_labels is not None:
        class_labels = torch.as_tensor(class_labels, dtype=torch.float32, device=device)
    elif net.label_dim and class_idx is None:
        class_labels = base_class_labels(seeds, low_res.shape[1:], net.label_dim, device)
    return sample_batch(BoundInputs(net, low_res=low_res), sampler, seeds, device, class_idx, callback=callback,
                        class_labels=class_labels, plan=plan)


def base_class_labels(seeds: Sequence[int], low_res_shape: Sequence[int], label_dim: int, device) -> torch.Tensor:
    """One-hot classes [N, label_dim] that ``edm generate`` drew for ``seeds`` from a conditional base model of
    ``label_dim`` classes making images of ``low_res_shape`` [C, h, w]: EDM's per-seed generator draws the
    latent, then the class, so the class follows from the seed and the base image's shape."""
    rnd = SeedGenerators(seeds, device)
    rnd.randn([len(seeds), *low_res_shape], device=device)  # the base model's latents, drawn first
    return torch.eye(label_dim, device=device)[rnd.randint(label_dim, size=[len(seeds)], device=device)]


def read_low_res(directory: str | Path, seeds: Sequence[int], subdirs: bool = False) -> np.ndarray:
    """The base model's PNGs of ``seeds`` in ``directory`` (EDM's layout) as uint8 [N, h, w, C]; a missing or
    mismatched image is an error naming it."""
    images = []
    for seed in seeds:
        path = image_path(directory, seed, subdirs)
        if not path.is_file():
            raise EDMToolkitError(f"--upsample-from: {path} not found; generate the low-resolution images of the "
                                  "same seeds first (edm generate --network BASE --outdir DIR)")
        with path.open("rb") as file:
            image = decode_image(file, str(path))
        if images and image.shape != images[0].shape:
            raise EDMToolkitError(f"--upsample-from: {path} is {list(image.shape)}, the others {list(images[0].shape)}")
        images.append(image)
    return np.stack(images)


def check_finite(images: torch.Tensor, seeds: Sequence[int]) -> None:
    """Raises naming the first seed whose image holds NaN or inf (which EDM's uint8 conversion writes as black)."""
    finite = torch.isfinite(images).flatten(1).all(1)
    if not bool(finite.all()):
        seed = seeds[int((~finite).nonzero()[0])]
        raise EDMToolkitError(f"the image of seed {seed} is not finite (NaN or inf), so nothing of its batch was "
                              "written: the network's output or the noise range (--sigma_max, --sigma_min) is broken")


def write_grid(seeds: Sequence[int], outdir: str | Path, subdirs: bool = False, name: str = "grid.png") -> Path:
    """Tiles the images of ``seeds`` (read back from outdir) into outdir/grid.png."""
    images = [np.asarray(Image.open(image_path(outdir, s, subdirs))) for s in dict.fromkeys(seeds)]
    images = [im[:, :, None] if im.ndim == 2 else im for im in images]
    path = Path(outdir) / name
    save_png(make_grid(images), path)
    return path
