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


@dataclass
class Inputs:
    """Valid input files, made once, outside the working directory of each run; ``text`` fills the templates'
    <key> placeholders (valid flags and configs with '@' where the value goes)."""

    root: Path
    model: Path  # a toolkit model file (the built-in model)
    gd_model: Path | None  # a guided-diffusion checkpoint, described by MODEL_FLAGS (from the fixtures)
    sde_model: Path | None  # a score_sde checkpoint, which --model-config describes (from the fixtures)
    images: Path  # a folder of two images (edm dataset --source)
    text: dict[str, str]


_GENERATE = ["--outdir", "out", "--seeds", "0", "--steps", "2"]


def _sde(inputs: Inputs) -> list[str]:
    return ["--model-config", inputs.text["sde_config"]]


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
        },
    ),
    ("presets",): Command(lambda i: []),
    ("presets", "show"): Command(lambda i: ["edm"]),
    ("solvers",): Command(lambda i: []),
    ("inspect",): Command(lambda i: [str(i.model)], variants={"--model-flags": lambda i: [str(i.gd_model)],
                                                              "--model-config": lambda i: [str(i.sde_model), *_sde(i)]}),
    ("convert",): Command(lambda i: [str(i.model), "out.pt"],
                          variants={"--model-flags": lambda i: [str(i.gd_model), "out.pt"],
                                    "--model-config": lambda i: [str(i.sde_model), "out.pt", *_sde(i)],
                                    "--weights": lambda i: [str(i.sde_model), "out.pt", *_sde(i)]}),
    ("dataset",): Command(lambda i: ["--source", str(i.images), "--dest", "ds"]),
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
    return [*path, *_replace_or_add(args, name, text)]


def _name(param: click.Parameter) -> str:
    return param.opts[0] if isinstance(param, click.Option) else param.human_readable_name


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, load_fixture):
    import numpy as np
    from PIL import Image

    from edm_toolkit.checkpoints import save_model
    from edm_toolkit.default_model import default_model

    root = tmp_path_factory.mktemp("fuzz-inputs")
    save_model(default_model(), root / "model.pt")
    (root / "images").mkdir()
    for k in range(2):
        Image.fromarray(np.full((8, 8, 3), 40 * k, np.uint8)).save(root / "images" / f"{k}.png")
    text = {"model_flags": MODEL_FLAGS}
    for flag, value in (("diffusion_steps", "1000"), ("image_size", "16"), ("num_heads", "2"),
                        ("noise_schedule", "cosine")):
        assert f"--{flag} {value}" in MODEL_FLAGS
        text[f"model_flags:{flag}"] = MODEL_FLAGS.replace(f"--{flag} {value}", f"--{flag} @")
    gd_model = sde_model = None
    try:
        import torch

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
    return Inputs(root, root / "model.pt", gd_model, sde_model, root / "images", text)


def _needs_fixtures(case: Case) -> bool:
    _, name, template, _ = case
    return name in ("--model-flags", "--model-config", "--weights") or "<" in template.text + "".join(template.extra)


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
    """Each command with its valid arguments (and each variant) succeeds, so a rejection is the value's doing."""
    if inputs.gd_model is None:
        pytest.skip("needs the guided-diffusion and score_sde fixtures")
    for path, spec in COMMANDS.items():
        for option, make in [(None, spec.args), *spec.variants.items()]:
            workdir = tmp_path / f"{'-'.join(path)}{option or ''}"
            workdir.mkdir()
            monkeypatch.chdir(workdir)
            args = list(make(inputs))
            if option == "--model-flags":
                args += ["--model-flags", MODEL_FLAGS]
            if option in ("--classifier-scale", "--classifier-flags", "--guide-network"):
                continue  # these need a classifier or a second network: their values are rejected before use
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
