"""Every option of every command with hostile values: one `Error:` line, exit 1 or 2, no traceback, nothing written.

The commands are listed in COMMANDS (a new command, e.g. `edm train` or `edm fid`, is fuzzed by adding an entry:
the arguments that make it valid, and any companions an option needs to apply). Each option of each command is
found by introspection and given each HOSTILE value in turn (a flag gets `--flag=VALUE`); so are the command's
positional arguments, an unknown option and an extra argument. Options whose text is parsed further (seed lists,
--solver-opt, --model-flags, --model-config, --resolution, preset files) also get each value inside valid text
(TEMPLATES: `--solver-opt order=VALUE`, a preset file with `rho = VALUE`, ...). A run must end in one of two ways:

* rejected: exit status 1 or 2, exactly one `Error:` line (the last one), no traceback, no "internal error", no
  file created or changed anywhere in the working directory or next to the inputs;
* accepted, only where ACCEPTED lists the (command, option, value) with the reason it is a valid value (e.g.
  `--guidance -1` is a weight like any other): exit status 0 and no traceback.

Runs are in-process (click's CliRunner), each under a time limit; a few run as real processes (non-UTF-8 bytes in
argv, as a shell passes them) under a time and memory limit.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import click
import pytest
from click.testing import CliRunner

from cli_limits import limit_memory, time_limit
from edm_toolkit.cli import main
from gd_fixture_flags import MODEL_FLAGS
from test_training import TINY_ARGS

HOSTILE = {
    "huge": "9" * 5000,
    "huge-float": "1e400",
    "huge-range": "0-99999999999999",
    "tiny": "1e-400",
    "negative": "-1",
    "nan": "nan",
    "inf": "inf",
    "empty": "",
    "non-utf8": "\udcff\udcfe",  # the bytes ff fe as Python passes undecodable argv (surrogate escapes)
}
TIME_LIMIT_S = 60  # per in-process run; a hostile value must never make a command work for long


@dataclass
class Command:
    """How to run one command validly: its arguments given the inputs, and for options that apply only with
    others, the arguments to use instead (so that the fuzzed value itself is what gets checked)."""

    args: Callable[["Inputs"], list[str]]
    variants: dict[str, Callable[["Inputs"], list[str]]] = field(default_factory=dict)
    valid: dict[str, Callable[["Inputs"], str]] = field(default_factory=dict)  # a valid value of a variant's option


@dataclass
class Inputs:
    """Valid input files, made once, outside the working directory of each run; ``text`` fills the templates'
    <key> placeholders (valid flags and configs with '@' where the value goes)."""

    root: Path
    model: Path  # a toolkit model file (the built-in model)
    gd_model: Path | None  # a guided-diffusion checkpoint, described by MODEL_FLAGS (from the fixtures)
    sde_model: Path | None  # a score_sde checkpoint, which --model-config describes (from the fixtures)
    images: Path  # two 16x16 RGB images labelled in EDM's layout (edm dataset --source, edm fid, edm nll)
    text: dict[str, str]
    data: Path  # a labelled dataset of four 8x8 grayscale images, 2 classes, in EDM's layout (edm train)
    run: Path  # a run directory of 'edm train --arch iddpm --phema 0.05,0.1' with power-EMA snapshots
    discrete: Path  # that run's network snapshot: a tiny improved-diffusion model on 10 steps (nll --method vlb)
    upsampler: Path  # a tiny guided-diffusion upsampler, 4x4 -> 8x8 grayscale
    low_res: Path  # the 4x4 PNGs of seeds 0 and 1 for it (generate --upsample-from)
    detector: Path  # random-weight FID Inception weights, with the output layer (edm fid adm)
    ref: Path  # FID reference statistics .npz (2048 features)
    adm_ref: Path  # an ADM reference batch .npz of five 16x16 images with its statistics
    adm_samples: Path  # an ADM sample batch .npz of five 16x16 images


_GENERATE = ["--outdir", "out", "--seeds", "0", "--steps", "2"]


def _fid(inputs: Inputs) -> list[str]:
    """edm generate --fid: the FID of two images (none written)."""
    return ["--fid", str(inputs.ref), "--num", "2", "--detector", str(inputs.detector), "--steps", "2"]

IDDPM_FLAGS = "--num_channels 32 --num_res_blocks 1 --channel_mult 1 --attention_resolutions 1 --num_heads 1"
SR_FLAGS = IDDPM_FLAGS + " --large_size 8 --small_size 4"
TINY_CLASSIFIER_FLAGS = ("--classifier_width 32 --classifier_depth 1 --channel_mult 1,2 "
                         "--classifier_attention_resolutions 4 --num_head_channels 32 --classifier_pool attention")
_ONE_STEP = ["--batch", "2", "--duration", "2e-6", "--workers", "0", "--seed", "0"]  # one step of two images


def _sde(inputs: Inputs) -> list[str]:
    return ["--model-config", inputs.text["sde_config"]]


def _train(inputs: Inputs, *extra: str) -> list[str]:
    """edm train: one step of the tiny EDM network (SongUNet, 16 channels) on the 8x8 dataset."""
    return ["--outdir", "runs", "--data", str(inputs.data), *TINY_ARGS, *_ONE_STEP, *extra]


def _train_iddpm(data: Path, outdir: Path | str = "runs", *extra: str) -> list[str]:
    """edm train --arch iddpm: one step of a tiny improved-diffusion model on 10 cosine steps."""
    return ["--outdir", str(outdir), "--data", str(data), "--arch", "iddpm", "--model-flags", IDDPM_FLAGS,
            "--diffusion-steps", "10", "--noise-schedule", "cosine", "--augment", "0", *_ONE_STEP, *extra]


def _nll(inputs: Inputs, method: str = "ode") -> list[str]:
    """edm nll of one image under the tiny improved-diffusion model; the ODE at a loose tolerance."""
    ode = ["--rtol", "0.01", "--atol", "0.01"] if method == "ode" else []
    return ["--network", str(inputs.discrete), "--data", str(inputs.data), "--method", method, "--num", "1", *ode]


def _nll_rgb(inputs: Inputs, network: Path | None, *extra: str) -> list[str]:
    return ["--network", str(network), "--data", str(inputs.images), "--method", "ode", "--num", "1", "--rtol", "0.1",
            "--atol", "0.1", *extra]


COMMANDS: dict[tuple[str, ...], Command] = {
    ("generate",): Command(
        lambda i: _GENERATE,
        variants={
            "--model-flags": lambda i: [*_GENERATE, "--network", str(i.gd_model), "--solver", "ddim"],
            "--model-config": lambda i: [*_GENERATE, "--network", str(i.sde_model), *_sde(i)],
            "--weights": lambda i: [*_GENERATE, "--network", str(i.sde_model), *_sde(i)],
            "--guide-network": lambda i: [*_GENERATE, "--guidance", "2"],
            "--classifier-scale": lambda i: [*_GENERATE, "--classifier", str(i.model)],
            "--classifier-flags": lambda i: [*_GENERATE, "--classifier", str(i.model)],
            "--guidance-interval": lambda i: [*_GENERATE, "--guidance", "2"],
            "--fid": _fid,
            "--num": _fid,
            "--detector": _fid,
            "--upsample-from": lambda i: ["--network", str(i.upsampler), "--outdir", "out", "--seeds", "0-1",
                                          "--solver", "ddpm", "--steps", "2"],
        },
        valid={"--model-flags": lambda i: MODEL_FLAGS, "--upsample-from": lambda i: str(i.low_res)},
    ),
    ("presets",): Command(lambda i: []),
    ("presets", "show"): Command(lambda i: ["edm"]),
    ("solvers",): Command(lambda i: []),
    ("inspect",): Command(lambda i: [str(i.model)], variants={"--model-flags": lambda i: [str(i.gd_model)],
                                                              "--model-config": lambda i: [str(i.sde_model), *_sde(i)]},
                          valid={"--model-flags": lambda i: MODEL_FLAGS}),
    ("convert",): Command(lambda i: [str(i.model), "out.pt"],
                          variants={"--model-flags": lambda i: [str(i.gd_model), "out.pt"],
                                    "--model-config": lambda i: [str(i.sde_model), "out.pt", *_sde(i)],
                                    "--weights": lambda i: [str(i.sde_model), "out.pt", *_sde(i)]},
                          valid={"--model-flags": lambda i: MODEL_FLAGS}),
    ("dataset",): Command(lambda i: ["--source", str(i.images), "--dest", "ds"]),
    ("train",): Command(
        _train,
        variants={
            **{option: lambda i: _train_iddpm(i.data) for option in ("--model-flags", "--noise-schedule",
                                                                      "--diffusion-steps", "--schedule-sampler")},
            "--cond-drop": lambda i: _train(i, "--cond", "1"),
            **{option: lambda i: _train(i, "--metrics", "fid2", "--ref", str(i.ref), "--detector", str(i.detector))
               for option in ("--metrics", "--ref", "--detector")},
        },
    ),
    ("train-classifier",): Command(lambda i: ["--outdir", "runs", "--data", str(i.data), "--model-flags",
                                              TINY_CLASSIFIER_FLAGS, *_ONE_STEP]),
    ("phema",): Command(lambda i: ["--indir", str(i.run), "--outdir", "out", "--outstd", "0.07"]),
    ("fid",): Command(lambda i: []),
    ("fid", "ref"): Command(lambda i: ["--data", str(i.images), "--dest", "ref.npz", "--detector", str(i.detector)]),
    ("fid", "calc"): Command(lambda i: ["--images", str(i.images), "--ref", str(i.ref), "--num", "2", "--detector",
                                        str(i.detector)]),
    ("fid", "adm"): Command(lambda i: ["--ref", str(i.adm_ref), "--samples", str(i.adm_samples), "--detector",
                                       str(i.detector)]),
    ("fid", "pack"): Command(lambda i: ["--images", str(i.images), "--dest", "batch.npz"]),
    ("nll",): Command(
        _nll,
        variants={"--clip-denoised": lambda i: _nll(i, "vlb"),
                  "--model-flags": lambda i: _nll_rgb(i, i.gd_model),
                  "--model-config": lambda i: _nll_rgb(i, i.sde_model, *_sde(i)),
                  "--weights": lambda i: _nll_rgb(i, i.sde_model, *_sde(i))},
        valid={"--model-flags": lambda i: MODEL_FLAGS},
    ),
}


@dataclass(frozen=True)
class Template:
    """Where a hostile value goes: '@' in ``text`` is replaced by it, and ``<key>`` by ``Inputs.text[key]``;
    with ``as_file`` the text is written to a file whose path becomes the value; ``extra`` arguments make the
    template apply (e.g. --solver dpmpp for --solver-opt order=@)."""

    text: str = "@"
    extra: tuple[str, ...] = ()
    as_file: bool = False

    def __str__(self):
        return self.text.replace("\n", " ") + (" (file)" if self.as_file else "") + "".join(f" {a}" for a in self.extra)


PLAIN = Template()
_PRESET_FILES = [Template(text, as_file=True) for text in (
    "@\n",  # the whole file
    "[sampling]\nnum_steps = @",
    "[sampling]\nsigma_min = @",
    "[sampling]\nsigma_max = @",
    '[sampling]\ndiscretization = { name = "edm", rho = @ }',
    '[sampling]\ndiscretization = { name = "iddpm", M = @ }',
    '[sampling]\ndiscretization = { name = "vp", beta_d = @ }',
    "[sampling]\nchurn = { S_churn = @ }",
    "[sampling]\nchurn = { S_max = @ }",
    '[sampling]\nsolver = { name = "adaptive", rtol = @ }',
    '[sampling]\nsolver = { name = "restart", intervals = [[3, @, 0.06, 0.3]] }',
    '[sampling]\nschedule = { name = "vp", beta_min = @ }',
    '[preconditioning]\nname = "iddpm"\nM = @',
    '[preconditioning]\nname = "edm"\nsigma_data = @',
    '[preconditioning]\nname = "vp"\nepsilon_t = @',
    '[training]\nname = "edm"\nP_std = @',
)]
_MODEL_FLAGS = [PLAIN] + [Template(f"<model_flags:{flag}>") for flag in
                          ("diffusion_steps", "image_size", "num_heads", "noise_schedule")]
_MODEL_CONFIG = [PLAIN] + [Template(f"<sde_config:{key}>") for key in ("nf", "num_scales", "beta_max")]
TEMPLATES: dict[tuple[tuple[str, ...], str], list[Template]] = {
    (("generate",), "--seeds"): [PLAIN, Template("0-@"), Template("@,1")],
    (("generate",), "--guidance-interval"): [PLAIN, Template("0,@"), Template("@,10")],
    (("generate",), "--solver-opt"): [PLAIN, Template("alpha=@")] + [
        Template(text, ("--solver", solver)) for text, solver in (
            ("order=@", "dpmpp"), ("lower_order_final=@", "dpmpp"), ("eta=@", "euler_ancestral"),
            ("rtol=@", "adaptive"), ("atol=@", "adaptive"), ("max_evaluations=@", "adaptive"),
            ("intervals=[[@, 2, 0.06, 0.3]]", "restart"), ("intervals=[[3, 2, 0.06, @]]", "restart"))
    ] + [Template(text, ("--solver", "ddim", "--network", "<gd_model>", "--model-flags", "<model_flags>"))
         for text in ("respacing=@", "eta=@")],
    (("generate",), "--preset"): [PLAIN, *_PRESET_FILES],
    (("presets", "show"), "NAME|PATH"): [PLAIN, *_PRESET_FILES],
    (("generate",), "--model-flags"): _MODEL_FLAGS,
    (("inspect",), "--model-flags"): _MODEL_FLAGS,
    (("convert",), "--model-flags"): _MODEL_FLAGS,
    (("generate",), "--model-config"): _MODEL_CONFIG,
    (("inspect",), "--model-config"): _MODEL_CONFIG,
    (("convert",), "--model-config"): _MODEL_CONFIG,
    (("dataset",), "--resolution"): [PLAIN, Template("@x32"), Template("32x@")],
    (("train",), "--cres"): [PLAIN, Template("1,@"), Template("@,2")],
    (("train",), "--net-opt"): [PLAIN, Template("@=1")] + [Template(f"{key}=@") for key in (
        "num_blocks", "model_channels", "dropout", "attn_resolutions")] + [Template("attn_resolutions=[@]")],
    (("train",), "--phema"): [PLAIN, Template("0.05,@")],
    (("train",), "--metrics"): [PLAIN, Template("fid@"), Template("fid@k"), Template("fid2,@")],
    (("train",), "--grid-seeds"): [PLAIN, Template("0-@"), Template("@,1")],
    (("train",), "--model-flags"): [PLAIN] + [Template(f"<iddpm_flags:{flag}>") for flag in (
        "num_channels", "num_res_blocks", "channel_mult", "attention_resolutions", "num_heads")] + [
        Template(f"<iddpm_flags> --{flag} @") for flag in ("learn_sigma", "dropout", "image_size", "num_head_channels")],
    (("train",), "--preset"): [PLAIN] + [t for t in _PRESET_FILES if t.text.startswith(("@", "[prec", "[training]"))],
    (("train-classifier",), "--model-flags"): [PLAIN] + [Template(f"<classifier_flags:{flag}>") for flag in (
        "classifier_width", "classifier_depth", "channel_mult", "classifier_attention_resolutions",
        "num_head_channels", "classifier_pool")] + [
        Template(f"<classifier_flags> --{flag} @") for flag in ("diffusion_steps", "image_size", "noise_schedule")],
    (("phema",), "--outstd"): [PLAIN, Template("0.05,@"), Template("0.01,0.02,...,@"), Template("@,0.06,...,0.1")],
    (("phema",), "--instd"): [PLAIN, Template("0.05,@"), Template("0.01,0.02,...,@")],
    (("nll",), "--preset"): [PLAIN] + [t for t in _PRESET_FILES if t.text.startswith("@") or "sigma_m" in t.text
                                       or "schedule" in t.text],
    (("nll",), "--model-flags"): _MODEL_FLAGS,
    (("nll",), "--model-config"): _MODEL_CONFIG,
}

# Hostile-looking values that are valid, with the reason: (command, option, template text, value) -> reason.
# Everything else must be rejected.
_ZERO = "1e-400 reads as 0.0"
_NAME = "a valid file name on Linux"
ACCEPTED: dict[tuple[tuple[str, ...], str, str, str], str] = {
    (("generate",), "--guidance", "@", "tiny"): "weight 0: the unconditional denoiser alone",
    (("generate",), "--guidance", "@", "negative"): "a negative weight extrapolates away from the conditional one",
    (("generate",), "--S_churn", "@", "tiny"): _ZERO + ", no churn",
    (("generate",), "--S_min", "@", "tiny"): _ZERO + ", EDM's default",
    (("generate",), "--S_max", "@", "tiny"): _ZERO + ": churn only at sigma 0, i.e. never",
    (("generate",), "--S_max", "@", "inf"): "EDM's default S_max",
    (("generate",), "--S_max", "@", "huge-float"): "reads as inf, EDM's default S_max",
    (("generate",), "--S_noise", "@", "tiny"): _ZERO + ", no churn noise",
    (("generate",), "--guidance-interval", "0,@", "huge-float"): "HI reads as inf: no upper end",
    (("generate",), "--guidance-interval", "0,@", "inf"): "no upper end",
    (("generate",), "--guidance-interval", "0,@", "tiny"): _ZERO + ": guidance at sigma 0 only, i.e. never",
    (("generate",), "--guidance-interval", "@,10", "tiny"): _ZERO + ": from sigma 0",
    (("generate",), "--solver-opt", "eta=@", "tiny"): _ZERO + ": the deterministic sampler (ancestral or DDIM)",
    (("generate",), "--solver-opt", "respacing=@", "empty"): "respacing '' is the default: --steps steps",
    **{(path, option, text, value): reason for path, option in ((("generate",), "--preset"),
                                                                 (("presets", "show"), "NAME|PATH"))
       for text, value, reason in (
           ("@\n", "empty", "an empty preset file is all defaults"),
           ("[sampling]\nchurn = { S_churn = @ }", "tiny", _ZERO + ", no churn"),
           ("[sampling]\nchurn = { S_max = @ }", "tiny", _ZERO + ": churn never"),
           ("[sampling]\nchurn = { S_max = @ }", "inf", "EDM's default S_max"),
           ("[sampling]\nchurn = { S_max = @ }", "huge-float", "TOML reads 1e400 as inf, EDM's default S_max"),
           ('[sampling]\nschedule = { name = "vp", beta_min = @ }', "tiny", _ZERO + ", a valid VP schedule"))},
    **{(("generate",), "--outdir", "@", v): _NAME for v in ("non-utf8", "negative", "tiny", "nan", "inf",
                                                            "huge-float", "huge-range")},
    **{(("convert",), "OUT", "@", v): _NAME for v in ("non-utf8", "tiny", "nan", "inf", "huge-float", "huge-range")},
    **{(("dataset",), "--dest", "@", v): _NAME for v in ("non-utf8", "negative", "tiny", "nan", "inf", "huge-float",
                                                         "huge-range")},
    **{(path, option, "@", v): _NAME for path, option in (
        (("train",), "--outdir"), (("train",), "--desc"), (("train-classifier",), "--outdir"),
        (("train-classifier",), "--desc"), (("phema",), "--outdir"), (("phema",), "--outprefix"),
        (("fid", "ref"), "--dest"), (("fid", "pack"), "--dest"), (("nll",), "--out"))
       for v in ("non-utf8", "negative", "tiny", "nan", "inf", "huge-float", "huge-range")},
    **{(path, option, "@", "tiny"): _ZERO + reason for path, option, reason in (
        (("train",), "--lr-rampup", ": no learning-rate ramp-up"),
        (("train",), "--ema", ": half-life 0, the EMA is the network itself"),
        (("train",), "--ema-rampup", ": no EMA ramp-up (as the help says)"),
        (("train",), "--dropout", ": no dropout"), (("train",), "--augment", ": no augmentation"),
        (("train",), "--cond-drop", ": no label dropout"), (("train-classifier",), "--weight-decay", ": plain Adam"))},
    (("train",), "--model-flags", "<iddpm_flags> --dropout @", "tiny"): _ZERO + ": no dropout",
    (("train",), "--net-opt", "dropout=@", "tiny"): _ZERO + ": no dropout",
    (("train",), "--net-opt", "attn_resolutions=[@]", "empty"): "[]: attention at no resolution (the tiny runs' own)",
    (("train",), "--model-flags", "<iddpm_flags> --num_head_channels @", "negative"):
        "-1 is the originals' default: heads counted by --num_heads",
    **{(path, "--preset", "@\n", "empty"): "an empty preset file is all defaults" for path in (("train",), ("nll",))},
}


# Cases that fail for want of validation in another module, with where the fix belongs; strict xfails: once
# fixed they pass, pytest reports XPASS as a failure, and the entry is to be removed. (None today.)
KNOWN_GAPS: dict[tuple[tuple[str, ...], str, str, str], str] = {
}


def snapshot(*roots: Path) -> dict[str, tuple[int, int]]:
    """Every file under the roots with its size and modification time."""
    files = {}
    for root in roots:
        for dirpath, _, names in os.walk(root):
            for name in names:
                path = os.path.join(dirpath, name)
                info = os.lstat(path)
                files[path] = (info.st_size, info.st_mtime_ns)
    return files


def check_rejected(exit_code: int, stderr: str, what: str) -> None:
    """Exit 1 or 2, exactly one Error line and it is the last line, no traceback, not an internal error."""
    lines = stderr.strip().splitlines()
    errors = [line for line in lines if line.startswith("Error: ")]
    assert exit_code in (1, 2), f"{what}: exit {exit_code}\n{stderr[-3000:]}"
    assert len(errors) == 1 and lines[-1] == errors[0], f"{what}: not one Error line\n{stderr[-3000:]}"
    assert "Traceback" not in stderr and "internal error" not in errors[0], f"{what}\n{stderr[-3000:]}"


def _command_object(path: tuple[str, ...]) -> click.Command:
    command = main
    for name in path:
        command = command.commands[name]
    return command


Case = tuple[tuple[str, ...], str, Template, str]  # command, option or argument, template, hostile value name


def cases() -> list[Case]:
    """Everything fuzzed: each option and argument of each command, in each of its templates, with each value."""
    out: list[Case] = []
    for path in COMMANDS:
        for param in _command_object(path).params:
            name = _name(param)
            if name in ("--help", "-h", "--version") or (isinstance(param, click.Option) and param.hidden):
                continue
            for template in TEMPLATES.get((path, name), [PLAIN]):
                out.extend((path, name, template, value) for value in HOSTILE)
        out.extend((path, "(unknown option)", PLAIN, value) for value in ("huge", "non-utf8"))
        out.extend((path, "(extra argument)", PLAIN, value) for value in ("huge", "non-utf8"))
    return out


def _replace_or_add(args: list[str], option: str, value: str) -> list[str]:
    if option in args:
        i = args.index(option)
        return [*args[:i + 1], value, *args[i + 2:]]
    return [*args, option, value]


def _fill(text: str, inputs: "Inputs") -> str:
    return re.sub(r"<([a-z_:]+)>", lambda m: inputs.text[m.group(1)], text)


def build_args(case: Case, inputs: "Inputs", workdir: Path) -> list[str]:
    """The command line of a case (with as_file templates, the file is written into ``workdir``)."""
    path, name, template, value = case
    spec = COMMANDS[path]
    args = list(spec.variants.get(name, spec.args)(inputs)) + [_fill(a, inputs) for a in template.extra]
    text = _fill(template.text, inputs).replace("@", HOSTILE[value])
    if template.as_file:
        (workdir / "fuzz.toml").write_bytes(text.encode("utf-8", "surrogateescape"))
        text = str(workdir / "fuzz.toml")
    if name == "(unknown option)":
        return [*path, *args, "--" + text]
    if name == "(extra argument)":
        return [*path, *args, text]
    command = _command_object(path)
    param = next(p for p in command.params if _name(p) == name)
    if isinstance(param, click.Argument):
        index = [p for p in command.params if isinstance(p, click.Argument)].index(param)
        args[index] = text  # the positional arguments lead the argument list
        return [*path, *args]
    if param.is_flag:
        return [*path, *args, f"{name}={text}"]
    if param.multiple:  # after the valid occurrences, so that it is the one that counts (--net-opt KEY=...)
        return [*path, *args, name, text]
    return [*path, *_replace_or_add(args, name, text)]


def _name(param: click.Parameter) -> str:
    return param.opts[0] if isinstance(param, click.Option) else param.human_readable_name


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, load_fixture):
    import numpy as np
    import torch
    from PIL import Image

    from edm_toolkit.checkpoints import save_model
    from edm_toolkit.default_model import default_model
    from edm_toolkit.metrics.adm import write_sample_batch
    from edm_toolkit.metrics.statistics import FIDStatistics
    from test_metrics_detector import random_state_dict
    from test_training import make_dataset

    root = tmp_path_factory.mktemp("fuzz-inputs")
    save_model(default_model(), root / "model.pt")
    rng = np.random.default_rng(0)
    (root / "images").mkdir()
    for k in range(2):
        Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(root / "images" / f"{k}.png")
    (root / "images" / "dataset.json").write_text(json.dumps({"labels": [["0.png", 0], ["1.png", 9]]}))
    data = make_dataset(root / "data", n=4, num_classes=2)
    torch.save(random_state_dict(0), root / "detector.pt")
    FIDStatistics(rng.normal(size=2048), np.eye(2048)).save(root / "ref.npz")
    batch = [rng.integers(0, 256, (5, 16, 16, 3), dtype=np.uint8)]
    write_sample_batch(root / "adm_ref.npz", batch, 5, (FIDStatistics(np.zeros(2048), np.eye(2048)),
                                                        FIDStatistics(np.zeros(2023), np.eye(2023))))
    write_sample_batch(root / "adm_samples.npz", [rng.integers(0, 256, (5, 16, 16, 3), dtype=np.uint8)], 5)
    # Two steps of a tiny improved-diffusion model tracking two power EMAs, and one of a tiny upsampler.
    with time_limit(TIME_LIMIT_S):
        for args in (_train_iddpm(data, root / "run", "--phema", "0.05,0.1", "--duration", "4e-6"),
                     _train_iddpm(data, root / "sr", "--arch", "guided", "--model-flags", SR_FLAGS)):
            result = CliRunner().invoke(main, ["train", *args, "--nosubdir", "--tick", "0.002", "--snap", "1"])
            assert result.exit_code == 0, result.output
    (root / "low").mkdir()
    for seed in (0, 1):
        Image.fromarray(rng.integers(0, 256, (4, 4), dtype=np.uint8)).save(root / "low" / f"{seed:06d}.png")
    text = {"model_flags": MODEL_FLAGS}
    for flag, value in (("diffusion_steps", "1000"), ("image_size", "16"), ("num_heads", "2"),
                        ("noise_schedule", "cosine")):
        assert f"--{flag} {value}" in MODEL_FLAGS
        text[f"model_flags:{flag}"] = MODEL_FLAGS.replace(f"--{flag} {value}", f"--{flag} @")
    for name, flags in (("iddpm_flags", IDDPM_FLAGS), ("classifier_flags", TINY_CLASSIFIER_FLAGS)):
        text[name] = flags
        for flag, value in re.findall(r"--(\w+) (\S+)", flags):
            text[f"{name}:{flag}"] = flags.replace(f"--{flag} {value}", f"--{flag} @")
    text.update(data=str(data), ref=str(root / "ref.npz"), detector=str(root / "detector.pt"))
    gd_model = sde_model = None
    try:
        torch.save(dict(load_fixture("gd_unet_legacy").state_dict), root / "gd_model.pt")
        sde = load_fixture("sde_ddpmpp_vp")
        torch.save(sde.state_dict, root / "sde_model.pth")
        gd_model, sde_model = root / "gd_model.pt", root / "sde_model.pth"
        text["sde_config"] = json.dumps(sde.meta["config"])
        for key in ("nf", "num_scales", "beta_max"):
            config = json.loads(json.dumps(sde.meta["config"]))
            config["model"][key] = "@"
            text[f"sde_config:{key}"] = json.dumps(config).replace('"@"', "@")
        text["gd_model"] = str(gd_model)
    except pytest.skip.Exception:
        pass
    return Inputs(root, root / "model.pt", gd_model, sde_model, root / "images", text, data, root / "run",
                  root / "run" / "network-snapshot-000000.pt", root / "sr" / "network-snapshot-000000.pt",
                  root / "low", root / "detector.pt", root / "ref.npz", root / "adm_ref.npz", root / "adm_samples.npz")


def _needs_fixtures(case: Case) -> bool:
    path, name, template, _ = case
    uses_source_options = path not in (("train",), ("train-classifier",))  # theirs are the tiny runs' own flags
    text = template.text + "".join(template.extra)
    return (uses_source_options and name in ("--model-flags", "--model-config", "--weights")) or any(
        f"<{key}" in text for key in ("model_flags", "sde_config", "gd_model"))


def _id(case: Case) -> str:
    path, name, template, value = case
    return f"{' '.join(path)} {name} {template} [{value}]"


def accepted(case: Case) -> str | None:
    path, name, template, value = case
    return ACCEPTED.get((path, name, template.text, value))


def _params():
    for case in cases():
        path, name, template, value = case
        gap = KNOWN_GAPS.get((path, name, template.text, value))
        marks = [pytest.mark.xfail(strict=True, reason=gap)] if gap else []
        yield pytest.param(case, id=_id(case), marks=marks)


@pytest.mark.parametrize("case", list(_params()))
def test_hostile_value(case, inputs, tmp_path, monkeypatch, one_thread):
    if inputs.gd_model is None and _needs_fixtures(case):
        pytest.skip("needs the guided-diffusion and score_sde fixtures")
    monkeypatch.chdir(tmp_path)
    args = build_args(case, inputs, tmp_path)
    before = snapshot(tmp_path, inputs.root)
    with time_limit(TIME_LIMIT_S):
        result = CliRunner().invoke(main, args)
    what = f"edm {_id(case)}"
    assert result.exception is None or isinstance(result.exception, SystemExit), (what, result.exception)
    reason = accepted(case)
    if reason:
        assert result.exit_code == 0, f"{what} is valid ({reason})\n{result.stderr[-3000:]}"
        assert "Traceback" not in result.stderr
        return
    check_rejected(result.exit_code, result.stderr, what)
    after = snapshot(tmp_path, inputs.root)
    assert after == before, f"{what} wrote {sorted(set(after.items()) - set(before.items()))[:3]}"


def test_every_listed_acceptance_is_a_fuzzed_case():
    """ACCEPTED and KNOWN_GAPS name only cases the fuzzer runs (a stale entry would mislead)."""
    fuzzed = {(p, n, t.text, v) for p, n, t, v in cases()}
    assert set(ACCEPTED) <= fuzzed and set(KNOWN_GAPS) <= fuzzed and not set(ACCEPTED) & set(KNOWN_GAPS)


def test_the_valid_arguments_are_valid(inputs, tmp_path, monkeypatch, one_thread):
    """Each command with its valid arguments (and each variant, with a valid value of its option) succeeds, so a
    rejection is the value's doing."""
    if inputs.gd_model is None:
        pytest.skip("needs the guided-diffusion and score_sde fixtures")
    done = set()
    for path, spec in COMMANDS.items():
        if isinstance(_command_object(path), click.Group) and not _command_object(path).invoke_without_command:
            continue  # a group that needs a subcommand: its subcommands are listed
        for option, make in [(None, spec.args), *spec.variants.items()]:
            args = list(make(inputs))
            if option in spec.valid:
                args = _replace_or_add(args, option, spec.valid[option](inputs))
            if option in ("--classifier-scale", "--classifier-flags", "--guide-network") or (path, *args) in done:
                continue  # these need a classifier or a second network: their values are rejected before use
            done.add((path, *args))
            workdir = tmp_path / f"{'-'.join(path)}{option or ''}"
            workdir.mkdir()
            monkeypatch.chdir(workdir)
            with time_limit(TIME_LIMIT_S):
                result = CliRunner().invoke(main, [*path, *args])
            assert result.exit_code == 0, (path, args, result.stderr[-2000:])


@pytest.mark.parametrize("argv", [
    [b"generate", b"--outdir", b"out", b"--seeds", b"\xff"],
    [b"generate", b"--outdir", b"out", b"--preset", b"\xff\xfe.toml"],
    [b"presets", b"show", b"\xff"],
    [b"generate", b"--outdir", b"out", b"--seeds", b"0-4294967295"],
    [b"generate", b"--outdir", b"out", b"--steps", b"99999"],  # valid steps, but one option bad: --sigma_max
], ids=["seeds", "preset", "presets-show", "seed-count", "steps-with-bad-sigma"])
def test_hostile_bytes_in_a_real_process(argv, tmp_path):
    if argv[-2:] == [b"--steps", b"99999"]:
        argv = [*argv, b"--sigma_max", b"1e309"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("WORLD_SIZE", None)
    done = subprocess.run([sys.executable.encode(), b"-m", b"edm_toolkit", *argv], cwd=tmp_path, env=env,
                          capture_output=True, timeout=120, preexec_fn=limit_memory)
    stderr = done.stderr.decode("utf-8", "replace")
    check_rejected(done.returncode, stderr, repr(argv))
    assert list(tmp_path.iterdir()) == []
