"""edm phema: post-hoc EMA reconstruction (EDM2's reconstruct_phema.py) from the power-EMA snapshots of a run."""

from __future__ import annotations

import click

from ..registry import show
from .types import Count, Number, OutputDir, ParsedList, check_file_name


MAX_WIDTHS = 1000  # widths in one list; EDM2's finest sweeps hold a few hundred


def parse_sigma_rels(value) -> list[float]:
    """EDM2's list syntax: numbers, and '...' for an evenly spaced run, e.g. 0.01,0.02,...,0.05. Each width lies in
    0 < sigma_rel < 0.2887 (:func:`~edm_toolkit.training.ema.check_sigma_rel`), at most MAX_WIDTHS of them
    (counted before a run is expanded); sorted, without repeats."""
    from ..errors import ConfigError
    from ..training.ema import check_sigma_rel

    if isinstance(value, list):
        return value
    parts = [part.strip() for part in str(value).split(",")]
    if len(parts) > MAX_WIDTHS or not all(parts):
        raise click.BadParameter(f"{show(value)} is not a list of widths: give numbers separated by commas, e.g. "
                                 "0.05,0.1 or 0.01,0.02,...,0.05" + (" (an item is empty)" if not all(parts) else ""))
    raw: list[float | None] = []
    for part in parts:
        if part == "...":
            raw.append(None)
            continue
        try:
            raw.append(check_sigma_rel(Number().convert(part, None, None)))
        except click.BadParameter as exc:
            raise click.BadParameter(f"item {show(part, 24)}: {exc.message}") from None
        except ConfigError as exc:
            raise click.BadParameter(str(exc)) from None
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
        if len(out) + count > MAX_WIDTHS:
            raise click.BadParameter(f"'...' makes more than {MAX_WIDTHS} widths; use a larger step")
        out.extend(raw[i - 1] + step * (j + 1) for j in range(round(count)))
    return sorted(set(round(v, 12) for v in out))


class _Prefix(click.ParamType):
    """--outprefix: the start of a file name (PREFIX-KIMG-SIGMA_REL.pt), so no '/' and not empty."""

    name = "STR"

    def convert(self, value, param, ctx):
        problem = check_file_name(f"{value}-000000-0.05.pt")
        if not str(value).strip() or "/" in str(value) or problem:
            self.fail(f"{show(value, 24)} cannot start a file name: give a name without '/', e.g. phema", param, ctx)
        return value


@click.command(context_settings={"show_default": True})
@click.option("--indir", required=True, metavar="DIR", help="Run directory holding power-ema-*.pt snapshots")
@click.option("--instd", type=ParsedList(parse_sigma_rels), default=None, metavar="LIST",
              help="Use only the snapshots of these widths  [default: all]")
@click.option("--outdir", required=True, metavar="DIR", type=OutputDir(),
              help="Where to write the reconstructed network files")
@click.option("--outprefix", type=_Prefix(), default="phema", metavar="STR", help="Output file name prefix")
@click.option("--outstd", type=ParsedList(parse_sigma_rels), required=True, metavar="LIST",
              help="Widths sigma_rel to reconstruct, 0 < sigma_rel < 0.289 (e.g. 0.05,0.06,...,0.15)")
@click.option("--outkimg", type=Count(min=0), default=None, metavar="KIMG",
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
        click.echo(f"Wrote {str(path)!r}")
