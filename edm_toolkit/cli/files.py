"""edm inspect / edm convert: what a model file (or an FID detector file) is, and conversion to the toolkit's safe
format."""

from __future__ import annotations

import json
import math

import click

_source_options = [
    click.option("--model-flags", default=None, metavar="FLAGS",
                 help="guided/improved-diffusion flags in the original syntax, e.g. \"--attention_resolutions 32,16,8 "
                      "--class_cond True ...\" (needed where the file name and the shapes do not tell)"),
    click.option("--model-config", "model_config", default=None, metavar="NAME",
                 help="score_sde config: a published name (e.g. vp/cifar10_ddpmpp_continuous) or a JSON config, "
                      "where it cannot be inferred from the weights"),
]


def source_options(command):
    for option in reversed(_source_options):
        command = option(command)
    return command


def _format(value) -> str:
    if isinstance(value, float):
        return "inf" if math.isinf(value) else f"{value:.6g}"
    if isinstance(value, int) and not isinstance(value, bool):
        return f"{value:,}"
    if isinstance(value, (dict, list)):
        return json.dumps(value)
    return str(value)


@click.command()
@click.argument("path", type=click.Path(dir_okay=False))
@source_options
@click.option("--json", "as_json", is_flag=True, help="Print the description as JSON")
def inspect(path, model_flags, model_config, as_json):
    """Describe a model file (family, architecture, parameters, conditioning, sigma range, dtype), or an FID
    detector file (kind detector: its form, outputs and dtype), without executing anything from it."""
    from ..loading import inspect_file

    info = inspect_file(path, model_flags=model_flags, config=model_config)
    if as_json:
        click.echo(json.dumps(info, indent=1, default=str))
        return
    width = max(len(k) for k in info)
    for key, value in info.items():
        click.echo(f"{key:{width}s}  {_format(value)}")


@click.command()
@click.argument("path", type=click.Path(dir_okay=False))
@click.argument("out", type=click.Path(dir_okay=False))
@source_options
@click.option("--weights", type=click.Choice(["ema", "raw"]), default="ema", show_default=True,
              help="score_sde checkpoints: the EMA or the raw training weights")
def convert(path, out, model_flags, model_config, weights):
    """Convert any supported model file to the toolkit's own format (tensors + JSON config, loaded with
    torch.load(weights_only=True); OUT ending in .safetensors writes safetensors). OUT must be a new or regular
    file other than PATH; it is written atomically with the mode a plain open() gives (umask respected)."""
    from ..loading import convert_file

    net = convert_file(path, out, model_flags=model_flags, config=model_config, use_ema=weights == "ema")
    click.echo(f"Wrote {out} ({sum(p.numel() for p in net.parameters()):,} parameters)", err=True)
