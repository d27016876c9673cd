"""FID versus NFE for a grid of solvers on one network: a table and a plot.

    python tools/fid_sweep.py --network MODEL --ref REF.npz --solvers heun,dpmpp_2m,unipc --steps 5,10,18 \
        --num 10000 --out sweep/

For each solver and step count the images of seeds 0..num-1 are generated and measured in memory
(edm_toolkit.metrics.generated.generated_statistics, the same path as `edm generate --fid`), so no PNG is
written. The solvers take their own NFE per step count (heun: 2N - 1); the table and the plot are indexed by the
NFE each run actually cost. Writes OUT/fid_sweep.json, OUT/fid_sweep.md and OUT/fid_sweep.png. Runs under torchrun
as `edm generate` does (every rank takes its share of every setting).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tools"))

from _plot import loglog_plot  # noqa: E402

from edm_toolkit.distributed import init_from_env, shutdown  # noqa: E402
from edm_toolkit.errors import EDMToolkitError  # noqa: E402
from edm_toolkit.loading import load_denoiser  # noqa: E402
from edm_toolkit.metrics import FIDStatistics, load_detector  # noqa: E402
from edm_toolkit.metrics.generated import generated_statistics  # noqa: E402
from edm_toolkit.presets import load_preset  # noqa: E402
from edm_toolkit.solvers import SOLVERS  # noqa: E402


def sweep(net, ref: FIDStatistics, detector, preset: str, solvers: list[str], steps: list[int], num: int, batch: int,
          device, group) -> list[dict]:
    base = load_preset(preset).sampling
    rows = []
    for name in solvers:
        for n in steps:
            sampler = base.replace(solver=SOLVERS.create(name), num_steps=n)
            start = time.time()
            stats = generated_statistics(net, sampler, range(num), detector, batch_size=batch, device=device,
                                         group=group)
            rows.append({"solver": name, "steps": n, "nfe": sampler.nfe, "fid": stats.frechet_distance(ref),
                         "seconds": round(time.time() - start, 1)})
            if group.rank == 0:
                print(json.dumps(rows[-1]), flush=True)
    return rows


def report(rows: list[dict], out: Path, args) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "fid_sweep.json").write_text(json.dumps(rows, indent=1))
    nfes = sorted({r["nfe"] for r in rows})
    lines = [f"FID ({args.num:,} images) versus NFE: `{' '.join(sys.argv)}`", "",
             "| solver | " + " | ".join(f"NFE {n}" for n in nfes) + " |", "|---|" + "---:|" * len(nfes)]
    for name in dict.fromkeys(r["solver"] for r in rows):
        cells = {r["nfe"]: f"{r['fid']:.2f}" for r in rows if r["solver"] == name}
        lines.append(f"| {name} | " + " | ".join(cells.get(n, "") for n in nfes) + " |")
    (out / "fid_sweep.md").write_text("\n".join(lines) + "\n")
    series = {name: [(r["nfe"], r["fid"]) for r in rows if r["solver"] == name]
              for name in dict.fromkeys(r["solver"] for r in rows)}
    loglog_plot(series, out / "fid_sweep.png", f"FID ({args.num} images) versus NFE", "NFE", "FID")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--network", required=True, help="any supported model file")
    parser.add_argument("--ref", required=True, help="reference statistics (edm fid ref)")
    parser.add_argument("--detector", default=None, help="FID Inception weights (default: as edm fid finds them)")
    parser.add_argument("--preset", default="edm", help="the sampler settings besides solver and steps")
    parser.add_argument("--solvers", default="euler,heun,dpmpp_2m,unipc", help="comma-separated solver names")
    parser.add_argument("--steps", default="5,10,18,35", help="comma-separated step counts")
    parser.add_argument("--num", type=int, default=10000, help="images per setting")
    parser.add_argument("--batch", type=int, default=64, help="images per batch")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", type=Path, default=Path("fid_sweep"), help="where the table and plot go")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    group = init_from_env(device.type)
    try:
        net = load_denoiser(args.network, device=device)
        ref = FIDStatistics.load(args.ref)
        detector = load_detector(args.detector, device)
        rows = sweep(net, ref, detector, args.preset, args.solvers.split(","), [int(s) for s in args.steps.split(",")],
                     args.num, args.batch, device, group)
        if group.rank == 0:
            report(rows, args.out, args)
    except EDMToolkitError as exc:
        sys.exit(f"Error: {exc}")
    finally:
        shutdown()


if __name__ == "__main__":
    main()
