"""edm presets: list the built-in presets, or print one."""

import click

from ..presets import builtin_presets, load_preset


@click.group(invoke_without_command=True)
@click.pass_context
def presets(ctx):
    """List the built-in presets (EDM Table 1 columns); 'edm presets show NAME' prints one as TOML."""
    if ctx.invoked_subcommand is None:
        for name in builtin_presets():
            preset = load_preset(name)
            click.echo(f"{name:8s} {preset.sampling.nfe:3d} NFE  {preset.description}")


@presets.command()
@click.argument("name", metavar="NAME|PATH")
def show(name):
    """Print a preset (built-in name or a .toml path), with every default filled in."""
    click.echo(load_preset(name).to_toml(), nl=False)
