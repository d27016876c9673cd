"""edm train-classifier: ADM's noisy classifier (guided-diffusion's classifier_train.py) in the toolkit's loop."""

from __future__ import annotations

import click

from ..discretizations import MAX_STEPS
from .common import training_run_options
from .types import Bool, Count, Number, OutputDir


@click.command("train-classifier", context_settings={"show_default": True})
@click.option("--outdir", required=True, metavar="DIR", type=OutputDir(), help="Where to save the results")
@click.option("--data", required=True, metavar="ZIP|DIR", help="Labelled dataset (EDM's layout, see 'edm dataset')")
@click.option("--model-flags", default=None, metavar="FLAGS",
              help="The classifier's flags in the original syntax, e.g. \"--classifier_depth 4\" (unset: "
                   "guided-diffusion's defaults; --image_size is the data's; --channel_mult and --num_head_channels "
                   "override what create_classifier hard-codes)")
@click.option("--noise-schedule", type=click.Choice(["linear", "cosine"]), default=None,
              help="The beta schedule of the diffusion it will guide (= the flag --noise_schedule)  [default: linear]")
@click.option("--diffusion-steps", type=Count(min=1, max=MAX_STEPS), default=None, metavar="T",
              help="The diffusion's number of steps (= the flag --diffusion_steps)  [default: 1000]")
@click.option("--duration", type=Number(min=0, min_open=True), default=76.8, metavar="MIMG",
              help="Training duration (300k iterations of 256 images)")
@click.option("--batch", type=Count(min=1), default=256, metavar="INT", help="Total batch size")
@click.option("--lr", type=Number(min=0, min_open=True), default=3e-4, metavar="FLOAT",
              help="Learning rate (AdamW)")
@click.option("--weight-decay", type=Number(min=0), default=0.05, metavar="FLOAT", help="AdamW weight decay")
@click.option("--anneal-lr", type=Bool(), default=True, metavar="BOOL",
              help="Anneal the learning rate linearly to 0 over the run")
@click.option("--random-crop", type=Bool(), default=True, metavar="BOOL",
              help="guided-diffusion's random crop (resize to [R, R/0.8], crop R x R)")
@click.option("--random-flip", type=Bool(), default=True, metavar="BOOL", help="Horizontal flip with probability 1/2")
@click.option("--xflip", type=Bool(), default=False, metavar="BOOL", help="Enable dataset x-flips (EDM's)")
@click.option("--precision", type=click.Choice(["fp32", "bf16"]), default="fp32", help="Network precision")
@click.option("--compile", "compile_net", is_flag=True, help="torch.compile the classifier")
@training_run_options
@click.option("--resume", default=None, metavar="PT|DIR|auto",
              help="Resume from a training state, the latest one in a run directory, or 'auto'")
def train_classifier(compile_net, **options):
    """Train ADM's noisy classifier p(y | x_t, t) for classifier guidance (Dhariwal & Nichol 2021).

    t is uniform over the diffusion's T steps; the defaults are guided-diffusion's published classifier flags
    (AdamW, lr 3e-4, weight decay 0.05, batch 256, annealed lr, random crop and flip). Snapshots
    classifier-snapshot-KIMG.pt drive 'edm generate --classifier' directly.

    \b
    Examples:
      edm train-classifier --outdir runs --data imagenet-64x64.zip --model-flags "--classifier_depth 4"
      edm generate --network 64x64_diffusion.pt --classifier runs/.../classifier-snapshot-076800.pt --seeds 0-63
    """
    from ..training.classifier import ClassifierOptions, ClassifierTrainer

    ClassifierTrainer(ClassifierOptions(**options, compile=compile_net)).run()
