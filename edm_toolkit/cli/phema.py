"""edm phema: post-hoc EMA reconstruction (EDM2's reconstruct_phema.py) from the power-EMA snapshots of a run."""

from __future__ import annotations

import click


def parse_sigma_rels(value) -> list[float]:
    """EDM2's list syntax: numbers, and '...' for an evenly spaced run, e.g. 0.01,0.02,...,0.05."""
    if isinstance(value, list):
        return value
    raw = [None if v.strip() == "..." else v.strip() for v in str(value).split(",") if v.strip()]
    try:
        raw = [None if v is None else float(v) for v in raw]
    except ValueError:
        raise click.BadParameter(f"{value!r} is not a list of numbers (e.g. 0.05,0.1 or 0.01,0.02,...,0.05)") from None
    out: list[float] = []
    for i, v in enumerate(raw):
        if v is not None:
            out.append(v)
            continue
        if i < 2 or raw[i - 2] is None or raw[i - 1] is None or i + 1 >= len(raw) or raw[i + 1] is None:
            raise click.BadParameter("'...' needs two numbers before it and one after it")
        step = raw[i - 1] - raw[i - 2]
        count = (raw[i + 1] - raw[i - 1]) / step - 1 if step else -1
        if step == 0 or count < 0 or abs(count - round(count)) > 1e-4:
            raise click.BadParameter("'...' must continue an evenly spaced, non-empty interval")
        out.extend(raw[i - 1] + step * (j + 1) for j in range(round(count)))
    return sorted(set(round(v, 12) for v in out))


class _SigmaRels(click.ParamType):
    name = "LIST"

    def convert(self, value, param, ctx):
        try:
            return parse_sigma_rels(value)
        except click.BadParameter as exc:
            self.fail(exc.message, param, ctx)


@click.command(context_settings={"show_default": True})
@click.option("--indir", required=True, metavar="DIR", help="Run directory holding power-ema-*.pt snapshots")
@click.option("--instd", type=_SigmaRels(), default=None, metavar="LIST",
              help="Use only the snapshots of these widths  [default: all]")
@click.option("--outdir", required=True, metavar="DIR", help="Where to write the reconstructed network files")
@click.option("--outprefix", default="phema", metavar="STR", help="Output file name prefix")
@click.option("--outstd", type=_SigmaRels(), required=True, metavar="LIST",
              help="Widths sigma_rel to reconstruct, 0 < sigma_rel < 0.289 (e.g. 0.05,0.06,...,0.15)")
@click.option("--outkimg", type=click.IntRange(min=0), default=None, metavar="KIMG",
              help="Reconstruct at the snapshot of this kimg  [default: the latest]")
def phema(indir, instd, outdir, outprefix, outstd, outkimg):
    """Reconstruct the power-function EMA of any width from a run's snapshots (EDM2 post-hoc EMA).

    Each result is a network file for 'edm generate --network'.

    \b
    Example:
      edm train ... --phema 0.05,0.10          # tracks two widths, stores snapshots
      edm phema --indir runs/00000-... --outdir out --outstd 0.05,0.06,...,0.15
    """
    from ..errors import ConfigError
    from ..training.phema import list_power_snapshots, write_power_ema

    nimg = None
    if outkimg is not None:
        times = sorted({s.nimg for s in list_power_snapshots(indir, instd) if s.nimg // 1000 == outkimg})
        if not times:
            raise ConfigError(f"--outkimg {outkimg}: no power-EMA snapshot at that kimg in {indir}")
        nimg = times[-1]
    for path in write_power_ema(indir, outdir, outstd, nimg=nimg, in_sigma_rels=instd, prefix=outprefix):
        click.echo(f"Wrote {path}")
