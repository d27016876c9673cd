"""edm nll: bits/dim of a dataset under a model, by the variational bound (discrete-time models, iDDPM's
image_nll.py) or the probability-flow ODE likelihood (any denoiser, score_sde's likelihood evaluation)."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import click

from ..io.outputs import write_atomically
from ..schedules import SCALINGS, SCHEDULES
from .common import load_network, resolve_device
from .files import source_options
from .types import Count, Number, OutputFile


@click.command()
@click.option("--network", "network_path", metavar="PATH", default=None,
              help="Model file  [default: the built-in model, no download]")
@click.option("--data", required=True, metavar="DIR|ZIP", type=click.Path(),
              help="Dataset of 8-bit images (a folder or zip in EDM's layout, e.g. made by 'edm dataset'); its "
                   "labels condition a class-conditional network")
@click.option("--method", required=True, type=click.Choice(["vlb", "ode"]),
              help="vlb: the variational bound of a model with a discrete step grid (every step, iDDPM); ode: the "
                   "probability-flow ODE likelihood of any denoiser (score_sde)")
@click.option("--num", type=Count(min=1), default=None, metavar="N",
              help="Evaluate the first N images  [default: all]")
@click.option("--batch", "batch_size", type=Count(min=1), default=64, show_default=True, metavar="B",
              help="Images per batch (ode: one adaptive solve per batch)")
@click.option("--seed", type=Count(min=0), default=0, show_default=True, metavar="INT",
              help="Random seed: image i draws its noise (vlb), dequantisation and probe (ode) from (seed, i)")
@click.option("--clip-denoised/--no-clip-denoised", default=None,
              help="vlb: clip D to [-1, 1] before each term, as the original evaluation does  [default: clip]")
@click.option("--preset", default=None, metavar="NAME|PATH",
              help="ode: the ODE (schedule, scaling, noise range) of a preset's sampler  [default: edm]")
@click.option("--schedule", type=click.Choice(SCHEDULES.names()), default=None,
              help="ode: noise schedule sigma(t)  [default: the preset's]")
@click.option("--scaling", type=click.Choice(SCALINGS.names()), default=None,
              help="ode: signal scaling s(t)  [default: the preset's]")
@click.option("--sigma_min", type=Number(min=0, min_open=True), default=None, metavar="FLOAT",
              help="ode: the noise level whose density is evaluated (score_sde: 0.001, its t = 1e-5)  "
                   "[default: the preset's]")
@click.option("--sigma_max", type=Number(min=0, min_open=True), default=None, metavar="FLOAT",
              help="ode: where the prior N(0, sigma_max^2 I) is taken  [default: the preset's]")
@click.option("--estimator", type=click.Choice(["rademacher", "gaussian", "exact"]), default=None,
              help="ode: trace estimator: Hutchinson-Skilling with one probe per image, or the exact trace (one "
                   "backward pass per dimension: small images only)  [default: rademacher]")
@click.option("--rtol", type=Number(min=0, min_open=True), default=None, metavar="FLOAT",
              help="ode: RK45 relative tolerance  [default: 1e-5, score_sde's]")
@click.option("--atol", type=Number(min=0, min_open=True), default=None, metavar="FLOAT",
              help="ode: RK45 absolute tolerance  [default: 1e-5, score_sde's]")
@click.option("--max-evaluations", "max_evaluations", type=Count(min=1), default=None, metavar="INT",
              help="ode: stop a batch's solve after this many evaluations  [default: 10000]")
@click.option("--out", "out_path", default=None, metavar="FILE.json", type=OutputFile(),
              help="Also write the per-image results and the summary as JSON")
@click.option("--device", default=None, metavar="DEVICE", help="Torch device  [default: cuda if available, else cpu]")
@source_options
@click.option("--weights", type=click.Choice(["ema", "raw"]), default="ema", show_default=True,
              help="score_sde checkpoints: EMA or raw weights")
def nll(network_path, data, method, num, batch_size, seed, clip_denoised, out_path, device, model_flags,
        model_config, weights, **ode_options):
    """Negative log-likelihood of a dataset in bits/dim.

    \b
    --method vlb: -log2 p(x) <= sum of the variational bound's terms, every step of the model's own grid and
    the decoder NLL at t = 0 (Nichol & Dhariwal 2021; iDDPM reports 2.94 on CIFAR-10); T network evaluations
    per image.
    --method ode: log p(x) of uniformly dequantised images under the probability-flow ODE, RK45 at 1e-5 with a
    Hutchinson-Skilling trace (Song et al. 2021; DDPM++ cont. 3.16 on CIFAR-10), plus 7 bits for the 8-bit
    bins in [-1, 1].

    \b
    Examples:
      edm nll --network model.pt --data cifar10-test.zip --method vlb --batch 256
      edm nll --network vp.pth --data cifar10-test.zip --method ode --preset vp --sigma_min 0.001
    """
    given = {k: v for k, v in ode_options.items() if v is not None}
    if method == "vlb" and given:
        flag = next(p.opts[0] for p in click.get_current_context().command.params if p.name == next(iter(given)))
        raise click.UsageError(f"{flag} applies to --method ode; drop it for --method vlb")
    if method == "ode" and clip_denoised is not None:
        raise click.UsageError("--clip-denoised/--no-clip-denoised applies to --method vlb; drop it for --method ode")
    if out_path is not None and Path(out_path).exists() and Path(out_path).is_dir():
        raise click.BadParameter(f"{out_path!r} is a folder; give a file name", param_hint="'--out'")
    if network_path is None and (model_flags is not None or model_config is not None):
        raise click.UsageError("--model-flags/--model-config describe a --network file; give --network PATH")
    device = resolve_device(device)
    net = load_network(network_path, device, model_flags=model_flags, config=model_config,
                        use_ema=weights == "ema")
    evaluate = _VLB(net, clip_denoised is not False) if method == "vlb" else _ODE(net, given)
    dataset, count = _open_data(data, net, num)
    click.echo(f"Evaluating {count} images of {str(data)!r} ({evaluate.describe()}, batch {batch_size}, {device})",
               err=True)
    values = _run(evaluate, dataset, count, batch_size, seed, device)
    mean = sum(values) / len(values)
    stderr = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1) / len(values)) if len(values) > 1 else 0.0
    summary = {"method": method, "bits_per_dim": mean, "standard_error": stderr, "num_images": len(values),
               "seed": seed, "network": network_path, "data": str(data), "settings": evaluate.settings()}
    if out_path is not None:
        _write_json(Path(out_path), {**summary, "per_image_bits_per_dim": values})
        click.echo(f"Wrote {out_path}", err=True)
    click.echo(f"{mean:.4f} bits/dim (+- {stderr:.4f} standard error, {len(values)} images, {method})")


def _open_data(path, net, num):
    from ..errors import EDMToolkitError
    from ..training.dataset import ImageDataset

    dataset = ImageDataset(path, use_labels=net.label_dim > 0)
    geometry = (dataset.num_channels, dataset.resolution)
    if geometry != (net.img_channels, net.img_resolution):
        raise EDMToolkitError(f"the dataset holds {dataset.num_channels}x{dataset.resolution}x{dataset.resolution} "
                              f"images but the network takes {net.img_channels}x{net.img_resolution}x"
                              f"{net.img_resolution}; convert it with 'edm dataset --resolution RxR'")
    if net.label_dim > 0 and dataset.label_dim != net.label_dim:
        what = "no labels" if dataset.label_dim == 0 else f"{dataset.label_dim} classes"
        raise EDMToolkitError(f"the network is conditional on {net.label_dim} classes but the dataset has {what}; "
                              "give a dataset with matching labels (dataset.json)")
    if num is not None and num > len(dataset):
        raise EDMToolkitError(f"--num {num} but the dataset holds {len(dataset)} images; lower --num or drop it")
    return dataset, len(dataset) if num is None else num


def _image_seeds(seed: int, indices) -> list[int]:
    """One 32-bit seed per (seed, image index), independent across both."""
    import numpy as np

    return [int(np.random.SeedSequence([seed, i]).generate_state(1)[0]) for i in indices]


class _Progress:
    """A line on stderr at most every ``every`` seconds (and at the end of every batch)."""

    def __init__(self, every: float = 10.0):
        self.every, self.start, self.last = every, time.monotonic(), time.monotonic()

    def maybe(self, text: str) -> None:
        now = time.monotonic()
        if now - self.last >= self.every:
            self.last = now
            click.echo(f"  {text} ({now - self.start:.0f} s)", err=True)

    def batch(self, done: int, total: int, mean: float) -> None:
        self.last = time.monotonic()
        click.echo(f"{done}/{total} images, {mean:.4f} bits/dim so far ({self.last - self.start:.0f} s)", err=True)


class _VLB:
    def __init__(self, net, clip_denoised: bool):
        if net.step_grid is None:
            from ..errors import EDMToolkitError

            raise EDMToolkitError(f"--method vlb needs a model with a discrete step grid, and {type(net).__name__} "
                                  "has none (continuous noise levels); use --method ode")
        self.net, self.clip_denoised = net, clip_denoised

    def describe(self) -> str:
        grid = self.net.step_grid
        return f"variational bound, {grid.num_timesteps} steps, {grid.variance} variance"

    def settings(self) -> dict:
        return {"num_timesteps": self.net.step_grid.num_timesteps, "clip_denoised": self.clip_denoised}

    def __call__(self, images, labels, generators, progress):
        import torch

        from ..metrics.likelihood import variational_bound

        x0 = images.to(torch.float32) / 127.5 - 1
        result = variational_bound(self.net, x0, labels, clip_denoised=self.clip_denoised,
                                   randn_like=generators.randn_like,
                                   progress=lambda done, T: progress.maybe(f"step {done}/{T} of the batch"))
        return result.total_bpd.tolist()


class _ODE:
    def __init__(self, net, given: dict):
        from ..metrics.likelihood import ProbabilityFlowLikelihood
        from ..presets import load_preset

        sampler = load_preset(given.get("preset", "edm")).sampling
        changes = {k: given[k] for k in ("sigma_min", "sigma_max") if k in given}
        changes.update({k: given[k] for k in ("schedule", "scaling") if k in given})
        sampler = sampler.replace(**changes)
        fields = {k: given[k] for k in ("estimator", "rtol", "atol", "max_evaluations") if k in given}
        self.likelihood = ProbabilityFlowLikelihood.from_sampler(sampler, net, **fields)
        self.net = net

    def describe(self) -> str:
        lik = self.likelihood
        return (f"probability-flow ODE, {lik.schedule.name}/{lik.scaling.name}, sigma {lik.sigma_min:g}..."
                f"{lik.sigma_max:g}, {lik.method} rtol {lik.rtol:g} atol {lik.atol:g}, {lik.estimator} trace")

    def settings(self) -> dict:
        lik = self.likelihood
        return {"schedule": lik.schedule.name, "scaling": lik.scaling.name, "sigma_min": lik.sigma_min,
                "sigma_max": lik.sigma_max, "estimator": lik.estimator, "rtol": lik.rtol, "atol": lik.atol,
                "method": lik.method}

    def __call__(self, images, labels, generators, progress):
        import torch

        from ..metrics.likelihood import bits_per_dim, dequantize

        uniform = torch.stack([torch.rand(images.shape[1:], generator=g, dtype=torch.float64, device=images.device)
                               for g in generators.generators])
        x = dequantize(images, uniform)
        probes = [self.likelihood.probe(x[i:i + 1], g) for i, g in enumerate(generators.generators)]
        probe = None if probes[0] is None else torch.cat(probes)
        result = self.likelihood(self.net, x, labels, probe=probe,
                                 progress=lambda sigma, nfe: progress.maybe(
                                     f"the batch's ODE at sigma {sigma:.4g} (from {self.likelihood.sigma_min:g} to "
                                     f"{self.likelihood.sigma_max:g}), {nfe} evaluations"))
        return bits_per_dim(result.log_likelihood, x[0].numel()).tolist()


def _run(evaluate, dataset, count, batch_size, seed, device) -> list[float]:
    import numpy as np
    import torch

    from ..rng import SeedGenerators

    progress, values = _Progress(), []
    for start in range(0, count, batch_size):
        indices = range(start, min(start + batch_size, count))
        items = [dataset[i] for i in indices]
        images = torch.from_numpy(np.stack([image for image, _ in items])).to(device)
        labels = torch.from_numpy(np.stack([label for _, label in items])).to(device) if evaluate.net.label_dim else None
        generators = SeedGenerators(_image_seeds(seed, indices), device)
        values += evaluate(images, labels, generators, progress)
        progress.batch(len(values), count, sum(values) / len(values))
    return values


def _write_json(path: Path, payload: dict) -> None:
    write_atomically(path, lambda f: f.write(json.dumps(payload, indent=1).encode()))
