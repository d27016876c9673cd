"""Post-hoc EMA (EDM2): the average of any power profile, reconstructed from stored power-EMA snapshots.

``edm train --phema 0.05,0.10`` writes, with every network snapshot, one model file per tracked width,
``power-ema-{nimg:012d}-{sigma_rel}.pt`` (the exact image count and width in the name, as the reconstruction
needs them). ``reconstruct_power_ema`` combines the snapshots at or before a chosen time with the least-squares
weights of ``ema.posthoc_coefficients`` into the average of another width at that time, written as an ordinary
model file that ``edm generate --network`` reads.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from ..checkpoints import save_model
from ..loading import load_model
from ..errors import ConfigError
from .ema import check_sigma_rel, posthoc_coefficients

_NAME = re.compile(r"power-ema-(\d+)-(\d+(?:\.\d+)?(?:e-?\d+)?)\.pt")


def power_ema_name(nimg: int, sigma_rel: float) -> str:
    return f"power-ema-{int(nimg):012d}-{float(sigma_rel)!r}.pt"


@dataclass(frozen=True)
class PowerEMASnapshot:
    path: Path
    nimg: int
    sigma_rel: float


def list_power_snapshots(directory: str | Path, sigma_rels: Sequence[float] | None = None) -> list[PowerEMASnapshot]:
    """The power-EMA snapshots in ``directory`` (optionally only those of the given widths), by time then width."""
    directory = Path(directory)
    if not directory.is_dir():
        raise ConfigError(f"{str(directory)!r} is not a directory (give the run directory of 'edm train --phema')")
    wanted = None if sigma_rels is None else {float(s) for s in sigma_rels}
    found = []
    for path in directory.iterdir():
        match = _NAME.fullmatch(path.name)
        if match and path.is_file():
            snapshot = PowerEMASnapshot(path, int(match.group(1)), float(match.group(2)))
            if wanted is None or snapshot.sigma_rel in wanted:
                found.append(snapshot)
    return sorted(found, key=lambda s: (s.nimg, s.sigma_rel))


def reconstruct_power_ema(snapshots: Sequence[PowerEMASnapshot], sigma_rels: Sequence[float],
                          nimg: int | None = None) -> list[nn.Module]:
    """The power-function EMAs of widths ``sigma_rels`` at time ``nimg`` (default: the latest snapshot's), one
    model per width, from the snapshots at times 0 < t <= nimg. Reads one snapshot at a time; sums in float64."""
    targets = [check_sigma_rel(s) for s in sigma_rels]
    if not targets:
        raise ConfigError("no sigma_rel to reconstruct")
    if not snapshots:
        raise ConfigError("no power-EMA snapshots (power-ema-*.pt) found; train with --phema 0.05,0.10")
    if nimg is None:
        nimg = max(s.nimg for s in snapshots)
    elif not any(s.nimg == nimg for s in snapshots):
        raise ConfigError(f"no snapshot at {nimg} images: the reconstruction time must be a snapshot's "
                          f"(snapshots at kimg {', '.join(sorted({f'{s.nimg / 1e3:g}' for s in snapshots}))})")
    used = [s for s in snapshots if 0 < s.nimg <= nimg]
    if not used:
        raise ConfigError(f"no snapshot at or before {nimg} images")
    coefficients = posthoc_coefficients([s.nimg for s in used], [s.sigma_rel for s in used], nimg, targets)
    outputs: list[nn.Module] = []
    sums: list[dict[str, torch.Tensor]] = []
    for i, snapshot in enumerate(used):
        model = load_model(snapshot.path)
        params = {name for name, _ in model.named_parameters()}
        state = model.state_dict()
        if not outputs:
            outputs = [model] + [load_model(snapshot.path) for _ in targets[1:]]
            sums = [{k: torch.zeros_like(v, dtype=torch.float64) for k, v in state.items() if k in params}
                    for _ in targets]
        elif set(state) != set(outputs[0].state_dict()):
            raise ConfigError(f"{snapshot.path} holds a different network than {used[0].path}")
        for j in range(len(targets)):
            for name, total in sums[j].items():
                total += state[name].to(torch.float64) * float(coefficients[i, j])
    for model, total in zip(outputs, sums):
        with torch.no_grad():
            for name, tensor in model.named_parameters():
                tensor.copy_(total[name].to(tensor.dtype))
    return outputs


def write_power_ema(indir: str | Path, outdir: str | Path, sigma_rels: Sequence[float], nimg: int | None = None,
                    in_sigma_rels: Sequence[float] | None = None, prefix: str = "phema") -> list[Path]:
    """Reconstructs the widths ``sigma_rels`` from the snapshots in ``indir`` and writes each as a model file
    ``outdir/{prefix}-{kimg:06d}-{sigma_rel}.pt``; returns the paths."""
    snapshots = list_power_snapshots(indir, in_sigma_rels)
    if nimg is None and snapshots:
        nimg = max(s.nimg for s in snapshots)
    models = reconstruct_power_ema(snapshots, sigma_rels, nimg)
    paths = []
    for sigma_rel, model in zip(sigma_rels, models):
        path = Path(outdir) / f"{prefix}-{nimg // 1000:06d}-{float(sigma_rel)!r}.pt"
        save_model(model, path)
        paths.append(path)
    return paths
