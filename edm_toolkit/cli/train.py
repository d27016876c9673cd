"""edm train: EDM's train.py (options, names, defaults, run directory) on any loss x preconditioner x backbone, and
the discrete-time models of improved-/guided-diffusion (--arch iddpm|guided) with their own flags and losses."""

from __future__ import annotations

import json
import re

import click

from ..discretizations import MAX_STEPS
from ..losses import LOSSES, STEP_SAMPLERS
from ..precond import PRECONDITIONERS
from ..registry import show
from .common import training_run_options
from .types import Bool, Count, Number, NumberList, OutputDir, Seeds


class NetOpt(click.ParamType):
    """--net-opt KEY=VALUE: VALUE is JSON (finite numbers, lists, true/false) or else a string."""

    name = "KEY=VALUE"

    def convert(self, value, param, ctx):
        if isinstance(value, tuple):
            return value
        key, sep, text = str(value).partition("=")
        if not sep or not re.fullmatch(r"[A-Za-z_]\w{0,63}", key):
            self.fail(f"{show(value)} is not KEY=VALUE (KEY a constructor argument's name)", param, ctx)
        try:
            parsed = json.loads(text, parse_constant=_no_constant)
        except json.JSONDecodeError:
            parsed = text  # not JSON: a string
        except ValueError as exc:  # NaN, Infinity, or an integer of thousands of digits
            self.fail(f"{key}={show(text)}: {exc}", param, ctx)
        return key, parsed


def _no_constant(name):
    raise ValueError(f"{name} is not a finite number")


def _architectures():
    from ..training.architectures import architecture_names

    return architecture_names()


@click.command(context_settings={"show_default": True})
# Main options.
@click.option("--outdir", required=True, metavar="DIR", type=OutputDir(), help="Where to save the results")
@click.option("--data", required=True, metavar="ZIP|DIR", help="Path to the dataset (EDM's layout, see 'edm dataset')")
@click.option("--cond", type=Bool(), default=False, metavar="BOOL", help="Train class-conditional model")
@click.option("--arch", type=click.Choice(_architectures()), default="ddpmpp",
              help="Network architecture: train.py's ddpmpp|ncsnpp|adm, a registered backbone with its defaults, or "
                   "iddpm|guided: improved-/guided-diffusion's U-Net on its own discrete diffusion (see --model-flags)")
@click.option("--model-flags", default=None, metavar="FLAGS",
              help="--arch iddpm|guided: the original flags, e.g. \"--num_channels 128 --learn_sigma True "
                   "--noise_schedule cosine\" (unset flags: that code base's defaults; --large_size/--small_size: "
                   "an upsampler)")
@click.option("--noise-schedule", type=click.Choice(["linear", "cosine"]), default=None,
              help="--arch iddpm|guided: the model's beta schedule (= the flag --noise_schedule)  [default: linear]")
@click.option("--diffusion-steps", type=Count(min=1, max=MAX_STEPS), default=None, metavar="T",
              help="--arch iddpm|guided: the number of diffusion steps (= the flag --diffusion_steps)  [default: 1000]")
@click.option("--precond", type=click.Choice(PRECONDITIONERS.names()), default=None,
              help="Preconditioning  [default: the preset's, else edm]")
@click.option("--loss", type=click.Choice(LOSSES.names()), default=None,
              help="Loss (noise distribution and weighting), independent of --precond  "
                   "[default: the preset's, else the one named like --precond; --arch iddpm|guided: iddpm-kl with "
                   "use_kl, iddpm-hybrid with learn_sigma, else iddpm-simple]")
@click.option("--schedule-sampler", type=click.Choice(STEP_SAMPLERS.names()), default=None,
              help="The iddpm-* losses: how steps t are drawn (uniform, or loss-second-moment importance sampling)  "
                   "[default: uniform]")
@click.option("--preset", default=None, metavar="NAME|PATH",
              help="Take preconditioning and loss, with their parameters, from a preset (see 'edm presets')")
# Hyperparameters.
@click.option("--duration", type=Number(min=0, min_open=True), default=200, metavar="MIMG",
              help="Training duration")
@click.option("--batch", type=Count(min=1), default=512, metavar="INT", help="Total batch size")
@click.option("--cbase", type=Count(min=1), default=None, metavar="INT", help="Channel multiplier  [default: varies]")
@click.option("--cres", type=NumberList(Count(min=1)), default=None, metavar="LIST",
              help="Channels per resolution  [default: varies]")
@click.option("--lr", type=Number(min=0, min_open=True), default=10e-4, metavar="FLOAT", help="Learning rate")
@click.option("--lr-rampup", type=Number(min=0), default=10000, metavar="KIMG",
              help="Learning-rate ramp-up duration (EDM: 10000)")
@click.option("--ema", type=Number(min=0), default=0.5, metavar="MIMG", help="EMA half-life")
@click.option("--ema-rampup", type=Number(min=0), default=0.05, metavar="FLOAT",
              help="EMA ramp-up ratio: half-life at most this fraction of the images seen (0 or --transfer: off)")
@click.option("--phema", type=NumberList(Number(min=0, min_open=True)), default=None, metavar="LIST",
              help="Also track power-function EMAs of these widths sigma_rel (EDM2: 0.05,0.10) for 'edm phema'")
@click.option("--dropout", type=Number(min=0, max=1), default=None, metavar="FLOAT",
              help="Dropout probability  [default: 0.13; --arch iddpm|guided: the flag --dropout, 0]")
@click.option("--augment", type=Number(min=0, max=1), default=None, metavar="FLOAT",
              help="Augment probability  [default: 0.12; --arch iddpm|guided: none]")
@click.option("--xflip", type=Bool(), default=False, metavar="BOOL", help="Enable dataset x-flips")
@click.option("--cond-drop", type=Number(min=0, max=1), default=0.0, metavar="P",
              help="Label dropout: train the unconditional model too (classifier-free guidance)")
# Performance-related.
@click.option("--fp16", type=Bool(), default=False, metavar="BOOL", help="Enable mixed-precision training (= --precision fp16)")
@click.option("--precision", type=click.Choice(["fp32", "bf16", "fp16"]), default=None,
              help="Network precision: fp32 (faithful), bf16 (autocast), fp16 (EDM's --fp16, CUDA)  [default: fp32]")
@click.option("--compile", "compile_net", is_flag=True, help="torch.compile the network (slow start, faster steps)")
@training_run_options
@click.option("--transfer", default=None, metavar="PATH", help="Transfer learning from a network file (any supported format)")
@click.option("--resume", default=None, metavar="PT|DIR|auto",
              help="Resume from a training state, the latest one in a run directory, or 'auto' (the latest run "
                   "of these options in --outdir, else start)")
@click.option("--net-opt", "net_opts", type=NetOpt(), multiple=True,
              help="A backbone constructor argument, e.g. --net-opt num_blocks=2 (repeatable; VALUE is JSON)")
@click.option("--grid-seeds", type=Seeds(), default=None, metavar="LIST",
              help="Write a grid of samples from the EMA with every snapshot (e.g. 0-63)")
@click.option("--metrics", default=None, metavar="LIST",
              help="Metrics of the EMA with every snapshot, to metric-NAME.jsonl and stats.jsonl: fid50k, fid10k "
                   "(FID of 50k/10k generated images against --ref)")
@click.option("--ref", default=None, metavar="NPZ", help="Reference statistics of --metrics (edm fid ref)")
@click.option("--detector", default=None, metavar="PATH",
              help="FID Inception weights for --metrics  [default: $EDM_TOOLKIT_FID_DETECTOR, else the fid extra]")
@click.option("-n", "--dry-run", is_flag=True, help="Print training options and exit")
def train(fp16, precision, compile_net, net_opts, dry_run, phema, metrics, ema_rampup, **options):
    """Train a diffusion model (EDM train.py's options and defaults; any loss, preconditioner and backbone).

    \b
    Examples:
      edm train --outdir runs --data cifar10-32x32.zip --cond 1 --arch ddpmpp
      edm train --outdir runs --data data.zip --precond vp --loss edm --precision bf16 --compile
      edm train --outdir runs --data data.zip --arch iddpm --lr 1e-4 --model-flags "--learn_sigma True"
      torchrun --standalone --nproc_per_node=8 -m edm_toolkit train --outdir runs --data cifar10-32x32.zip
    """
    from ..training.loop import Trainer
    from ..training.options import TrainingOptions

    if precision is None:
        precision = "fp16" if fp16 else "fp32"
    elif fp16 and precision != "fp16":
        raise click.UsageError(f"--fp16 1 contradicts --precision {precision}; give one of them")
    metric_names = tuple(m.strip() for m in metrics.split(",")) if metrics is not None else ()
    grid_seeds = options.pop("grid_seeds")
    trainer = Trainer(TrainingOptions(**options, precision=precision, compile=compile_net, net_opts=dict(net_opts),
                                      phema=phema or (), metrics=metric_names, ema_rampup=ema_rampup or None,
                                      grid_seeds=None if grid_seeds is None else tuple(grid_seeds)))
    if dry_run:
        trainer.dry_run()
    else:
        trainer.run()
