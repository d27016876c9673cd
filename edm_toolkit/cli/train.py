"""edm train: EDM's train.py (options, names, defaults, run directory) on any loss x preconditioner x backbone, and
the discrete-time models of improved-/guided-diffusion (--arch iddpm|guided) with their own flags and losses."""

from __future__ import annotations

import json
import re

import click

from ..losses import LOSSES, STEP_SAMPLERS
from ..precond import PRECONDITIONERS
from .types import parse_seeds


def _int_list(value):
    """A comma-separated list of integers and ranges (train.py's --cres syntax), e.g. 1,2,2,2."""
    if value is None or isinstance(value, tuple):
        return value
    try:
        return tuple(parse_seeds(value))
    except click.BadParameter as exc:
        raise click.BadParameter(exc.message) from None


def _float_list(value):
    if value is None or isinstance(value, tuple):
        return value
    try:
        return tuple(float(v) for v in str(value).split(",") if v.strip())
    except ValueError:
        raise click.BadParameter(f"{value!r} is not a comma-separated list of numbers") from None


class _List(click.ParamType):
    def __init__(self, parse, name):
        self.parse, self.name = parse, name

    def convert(self, value, param, ctx):
        try:
            return self.parse(value)
        except click.BadParameter as exc:
            self.fail(exc.message, param, ctx)


def _net_opts(values) -> dict:
    """--net-opt KEY=VALUE pairs; VALUE is JSON (numbers, lists, true/false) or else a string."""
    opts = {}
    for item in values:
        key, sep, text = item.partition("=")
        if not sep or not re.fullmatch(r"[A-Za-z_]\w*", key):
            raise click.BadParameter(f"{item!r} is not KEY=VALUE", param_hint="'--net-opt'")
        try:
            opts[key] = json.loads(text)
        except json.JSONDecodeError:
            opts[key] = text
    return opts


def _architectures():
    from ..training.architectures import architecture_names

    return architecture_names()


@click.command(context_settings={"show_default": True})
# Main options.
@click.option("--outdir", required=True, metavar="DIR", help="Where to save the results")
@click.option("--data", required=True, metavar="ZIP|DIR", help="Path to the dataset (EDM's layout, see 'edm dataset')")
@click.option("--cond", type=bool, default=False, metavar="BOOL", help="Train class-conditional model")
@click.option("--arch", type=click.Choice(_architectures()), default="ddpmpp",
              help="Network architecture: train.py's ddpmpp|ncsnpp|adm, a registered backbone with its defaults, or "
                   "iddpm|guided: improved-/guided-diffusion's U-Net on its own discrete diffusion (see --model-flags)")
@click.option("--model-flags", default=None, metavar="FLAGS",
              help="--arch iddpm|guided: the original flags, e.g. \"--num_channels 128 --learn_sigma True "
                   "--noise_schedule cosine\" (unset flags: that code base's defaults; --large_size/--small_size: "
                   "an upsampler)")
@click.option("--noise-schedule", type=click.Choice(["linear", "cosine"]), default=None,
              help="--arch iddpm|guided: the model's beta schedule (= the flag --noise_schedule)  [default: linear]")
@click.option("--diffusion-steps", type=click.IntRange(min=1), default=None, metavar="T",
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
@click.option("--duration", type=click.FloatRange(min=0, min_open=True), default=200, metavar="MIMG",
              help="Training duration")
@click.option("--batch", type=click.IntRange(min=1), default=512, metavar="INT", help="Total batch size")
@click.option("--batch-gpu", type=click.IntRange(min=1), default=None, metavar="INT",
              help="Limit batch size per process (gradient accumulation)")
@click.option("--cbase", type=click.IntRange(min=1), default=None, metavar="INT", help="Channel multiplier  [default: varies]")
@click.option("--cres", type=_List(_int_list, "LIST"), default=None, metavar="LIST",
              help="Channels per resolution  [default: varies]")
@click.option("--lr", type=click.FloatRange(min=0, min_open=True), default=10e-4, metavar="FLOAT", help="Learning rate")
@click.option("--lr-rampup", type=click.FloatRange(min=0), default=10000, metavar="KIMG",
              help="Learning-rate ramp-up duration (EDM: 10000)")
@click.option("--ema", type=click.FloatRange(min=0), default=0.5, metavar="MIMG", help="EMA half-life")
@click.option("--ema-rampup", type=click.FloatRange(min=0), default=0.05, metavar="FLOAT",
              help="EMA ramp-up ratio: half-life at most this fraction of the images seen (0 or --transfer: off)")
@click.option("--phema", type=_List(_float_list, "LIST"), default=None, metavar="LIST",
              help="Also track power-function EMAs of these widths sigma_rel (EDM2: 0.05,0.10) for 'edm phema'")
@click.option("--dropout", type=click.FloatRange(min=0, max=1), default=None, metavar="FLOAT",
              help="Dropout probability  [default: 0.13; --arch iddpm|guided: the flag --dropout, 0]")
@click.option("--augment", type=click.FloatRange(min=0, max=1), default=None, metavar="FLOAT",
              help="Augment probability  [default: 0.12; --arch iddpm|guided: none]")
@click.option("--xflip", type=bool, default=False, metavar="BOOL", help="Enable dataset x-flips")
@click.option("--cond-drop", type=click.FloatRange(min=0, max=1), default=0.0, metavar="P",
              help="Label dropout: train the unconditional model too (classifier-free guidance)")
# Performance-related.
@click.option("--fp16", type=bool, default=False, metavar="BOOL", help="Enable mixed-precision training (= --precision fp16)")
@click.option("--precision", type=click.Choice(["fp32", "bf16", "fp16"]), default=None,
              help="Network precision: fp32 (faithful), bf16 (autocast), fp16 (EDM's --fp16, CUDA)  [default: fp32]")
@click.option("--compile", "compile_net", is_flag=True, help="torch.compile the network (slow start, faster steps)")
@click.option("--ls", type=click.FloatRange(min=0, min_open=True), default=1, metavar="FLOAT", help="Loss scaling")
@click.option("--bench", type=bool, default=True, metavar="BOOL", help="Enable cuDNN benchmarking")
@click.option("--cache", type=bool, default=True, metavar="BOOL", help="Cache dataset in CPU memory")
@click.option("--workers", type=click.IntRange(min=0), default=1, metavar="INT",
              help="DataLoader worker processes (0: load in the training process)")
@click.option("--device", default=None, metavar="DEVICE", help="Torch device  [default: cuda if available, else cpu]")
# I/O-related.
@click.option("--desc", default=None, metavar="STR", help="String to include in result dir name")
@click.option("--nosubdir", is_flag=True, help="Do not create a subdirectory for results")
@click.option("--tick", type=click.FloatRange(min=0, min_open=True), default=50, metavar="KIMG",
              help="How often to print progress")
@click.option("--snap", type=click.IntRange(min=1), default=50, metavar="TICKS", help="How often to save snapshots")
@click.option("--dump", type=click.IntRange(min=1), default=500, metavar="TICKS", help="How often to dump state")
@click.option("--seed", type=click.IntRange(min=0), default=None, metavar="INT", help="Random seed  [default: random]")
@click.option("--transfer", default=None, metavar="PATH", help="Transfer learning from a network file (any supported format)")
@click.option("--resume", default=None, metavar="PT|DIR|auto",
              help="Resume from a training state, the latest one in a run directory, or 'auto' (the latest run "
                   "of these options in --outdir, else start)")
@click.option("--net-opt", "net_opts", multiple=True, metavar="KEY=VALUE",
              help="A backbone constructor argument, e.g. --net-opt num_blocks=2 (repeatable; VALUE is JSON)")
@click.option("--grid-seeds", type=_List(_int_list, "LIST"), default=None, metavar="LIST",
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
    metric_names = tuple(m.strip() for m in metrics.split(",") if m.strip()) if metrics else ()
    trainer = Trainer(TrainingOptions(**options, precision=precision, compile=compile_net, net_opts=_net_opts(net_opts),
                                      phema=phema or (), metrics=metric_names, ema_rampup=ema_rampup or None))
    if dry_run:
        trainer.dry_run()
    else:
        trainer.run()
