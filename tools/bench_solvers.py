"""Solver benchmark (issue 4): error versus network evaluations (NFE 5 to 100) of every deterministic solver on
every discretization, against the exact probability-flow ODE of the ideal denoiser of the built-in image set;
each solver's sampling-loop overhead per step; and the acceptance checks (how few NFE reach heun/edm's error at
35 NFE; whether the best solver beats heun at every NFE from 8 to 50). Writes a table and a PNG plot.

The error is the median over 32 seeds of the RMS error of x/s at sigma_min (see tools/_accuracy.py).

    python tools/bench_solvers.py            # writes docs/benchmarks.md and docs/solvers_edm.png
    python tools/bench_solvers.py --quick    # edm discretization only, prints only
    python tools/bench_solvers.py --quick --solvers "dpm++ 3M,dpm++ 3M exact"   # some solvers, prints only
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _accuracy import AccuracyProbe  # noqa: E402
from _plot import loglog_plot  # noqa: E402
from _report import DOC, write_section  # noqa: E402

from edm_toolkit.rng import SeedGenerators  # noqa: E402
from edm_toolkit.sampling import Sampler  # noqa: E402
from edm_toolkit.solvers import SOLVERS  # noqa: E402

SOLVER_SPECS = {
    "euler": {"name": "euler"},
    "heun": {"name": "heun"},
    "dpm++ 2M": {"name": "dpmpp_2m"},
    "dpm++ 3M": {"name": "dpmpp_3m"},  # the reference weighting (DPM-Solver, k-diffusion, diffusers)
    "dpm++ 3M exact": {"name": "dpmpp_3m", "third_order": "exact"},
    "unipc bh1-3": {"name": "unipc", "variant": "bh1", "order": 3},
    "unipc bh2-2": {"name": "unipc", "variant": "bh2", "order": 2},
    "unipc bh2-3": {"name": "unipc", "variant": "bh2", "order": 3},
    "ipndm-4": {"name": "ipndm", "order": 4},
    "lms-4": {"name": "lms", "order": 4},
    "deis tAB3": {"name": "deis", "order": 3},
}
NFE_TARGETS = [5, 6, 8, 10, 12, 15, 20, 25, 35, 50, 75, 100]
DISCRETIZATIONS = ["edm", "logsnr", "vp", "ve", "iddpm"]
# FACTS.md section 7: 50k FID on edm-cifar10-32x32-uncond-vp at NFE 5/8/10 (diff-sampler README).
PUBLISHED = {"ipndm-4": (13.59, 3.69, 2.77), "unipc bh2-3": (23.98, 3.99, 2.89), "dpm++ 3M": (24.97, 4.54, 3.00),
             "deis tAB3": (14.39, 5.55, 4.09), "heun": (math.nan, 38.06, 15.93), "euler": (49.66, 22.32, 15.69)}


def steps_for(solver, nfe: int) -> int | None:
    """The largest number of steps whose cost is at most ``nfe`` (None when even 2 steps cost more)."""
    best = None
    for n in range(2, nfe + 2):
        if solver.evaluations(n) <= nfe:
            best = n
    return best


def accuracy(probe: AccuracyProbe, discretizations, labels):
    table = {}  # (disc, solver label) -> [(nfe, error)]
    for disc in discretizations:
        for label in labels:
            spec = SOLVER_SPECS[label]
            solver = SOLVERS.create(spec)
            rows, seen = [], set()
            for target in NFE_TARGETS:
                n = steps_for(solver, target)
                if n is None or n in seen:
                    continue
                seen.add(n)
                rows.append(probe.error(Sampler(solver=solver, discretization=disc, num_steps=n)))
            table[(disc, label)] = rows
            print(disc, label, " ".join(f"{e:.2e}@{k}" for k, e in rows), flush=True)
    return table


def overhead(repeats: int = 20, num_steps: int = 32):
    """Per-step time of each solver with a zero-cost denoiser (batch 8, 3x32x32, float64), best of runs."""
    from bench_sampler import ZeroCost

    latents = torch.randn(8, 3, 32, 32, dtype=torch.float64)
    net = ZeroCost(latents)
    result = {}
    for label, spec in SOLVER_SPECS.items():
        sampler = Sampler(solver=spec, num_steps=num_steps)
        best = math.inf
        for _ in range(repeats):
            start = time.perf_counter()
            sampler(net, latents, randn_like=SeedGenerators(range(8)).randn_like)
            best = min(best, time.perf_counter() - start)
        result[label] = (best / num_steps, sampler.nfe / num_steps)
    return result


def error_at(rows, nfe):
    """Error with at most ``nfe`` evaluations (the best run within budget)."""
    within = [e for k, e in rows if k <= nfe]
    return min(within) if within else math.inf


def checks(table):
    heun = table[("edm", "heun")]
    target = error_at(heun, 35)
    reach = {label: min((k for k, e in table[("edm", label)] if e <= target), default=None) for label in SOLVER_SPECS}
    beats = []
    for nfe in [t for t in NFE_TARGETS if 8 <= t <= 50]:
        candidates = [(error_at(rows, nfe), label, disc) for (disc, label), rows in table.items() if label != "heun"]
        best, label, disc = min(candidates)
        beats.append((nfe, f"{label} ({disc})", best, error_at(heun, nfe)))
    return target, reach, beats


def report(table, ovh, command):
    target, reach, beats = checks(table)
    discs = sorted({d for d, _ in table}, key=DISCRETIZATIONS.index)
    lines = ["## Solvers: error versus network evaluations (`tools/bench_solvers.py`)", "", f"Command: `{command}`", "",
             "Median over 32 seeds of the RMS error of x/s at sigma_min against the exact PF-ODE solution, ideal "
             "denoiser of the built-in 64-image set, schedule sigma(t) = t, no scaling. Each cell is the error of the "
             "run with the most steps whose cost is at most that many network evaluations.", "",
             "![error versus NFE, edm discretization](solvers_edm.png)", ""]
    for disc in discs:
        lines += [f"**{disc} discretization**", "", "| solver | " + " | ".join(f"NFE {t}" for t in NFE_TARGETS) + " |",
                  "|---|" + "---:|" * len(NFE_TARGETS)]
        for label in SOLVER_SPECS:
            rows = table.get((disc, label))
            if rows is not None:
                cells = [error_at(rows, t) for t in NFE_TARGETS]
                lines.append(f"| {label} | " + " | ".join("" if math.isinf(c) else f"{c:.2e}" for c in cells) + " |")
        lines.append("")
    lines += ["### Acceptance checks", "",
              f"heun with the edm discretization reaches a median error of {target:.2e} with 35 NFE. "
              "Fewest NFE with which each solver (edm discretization) reaches that error:", "",
              "| solver | NFE to reach heun@35 |", "|---|---:|"]
    lines += [f"| {label} | {'not within 100' if k is None else k} |" for label, k in reach.items()]
    lines += ["", "Best solver (any discretization) against heun/edm at the same budget:", "",
              "| NFE | best solver | its error | heun/edm error | best beats heun |", "|---:|---|---:|---:|---|"]
    lines += [f"| {n} | {b} | {e:.2e} | {h:.2e} | {'yes' if e < h else 'NO'} |" for n, b, e, h in beats]
    ours = sorted((error_at(table[("edm", label)], 10), label) for label in PUBLISHED if ("edm", label) in table)
    published = sorted((fid[2], label) for label, fid in PUBLISHED.items())
    lines += ["", "### Ranking against the published NFE table (FACTS.md section 7)", "",
              "At NFE 10 (edm discretization), ranking here (best first): " + ", ".join(l for _, l in ours) + ". "
              "Published 50k-FID ranking at NFE 10 on edm-cifar10-32x32-uncond-vp: " +
              ", ".join(l for _, l in published) + ". The published numbers are FIDs of a trained network; these are "
              "ODE errors on an exact denoiser, so only the order is comparable.", "",
              "### Sampling-loop overhead per step", "",
              "Zero-cost denoiser, batch 8, 3x32x32, float64, 32 steps, best of 20 runs.", "",
              "| solver | us per step | NFE per step |", "|---|---:|---:|"]
    lines += [f"| {label} | {1e6 * t:.1f} | {n:.2f} |" for label, (t, n) in ovh.items()]
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="edm discretization only; print, do not write docs")
    parser.add_argument("--solvers", default=None, help="comma-separated solver labels to run (print only); "
                                                         f"default all: {', '.join(SOLVER_SPECS)}")
    args = parser.parse_args()
    labels = list(SOLVER_SPECS) if args.solvers is None else [label.strip() for label in args.solvers.split(",")]
    unknown = [label for label in labels if label not in SOLVER_SPECS]
    if unknown:
        parser.error(f"unknown solver label {unknown[0]!r}; choose from: {', '.join(SOLVER_SPECS)}")
    table = accuracy(AccuracyProbe(), ["edm"] if args.quick else DISCRETIZATIONS, labels)
    if args.solvers is not None:
        for (disc, label), rows in table.items():
            print(f"| {disc} | {label} | " + " | ".join(f"{error_at(rows, t):.2e}" for t in NFE_TARGETS) + " |")
        return
    target, reach, beats = checks(table)
    print("heun@35:", target, "reach:", reach)
    for row in beats:
        print("NFE %d best %s %.2e heun %.2e" % row)
    if args.quick:
        return
    ovh = overhead()
    loglog_plot({label: table[("edm", label)] for label in SOLVER_SPECS}, DOC.parent / "solvers_edm.png",
                "Median error at sigma_min vs NFE (ideal denoiser, edm discretization)", "network evaluations", "error")
    write_section("solvers", report(table, ovh, "python tools/bench_solvers.py"))
    print("wrote docs/benchmarks.md and docs/solvers_edm.png")


if __name__ == "__main__":
    main()
