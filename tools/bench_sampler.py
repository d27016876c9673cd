"""Sampler benchmark (issue 2): accuracy versus network evaluations, and the sampling loop's own overhead.

Accuracy: every solver x discretization x schedule x scaling, on the ideal denoiser of the built-in image set
(64 images, 3x32x32), 32 seeds. The error of a seed is the RMS difference of x/s(t) at the last non-zero noise
level sigma_min = sigma_{N-1} from the exact probability-flow ODE solution (scipy DOP853, rtol = atol = 1e-10, in
ln sigma), which is the same trajectory for every schedule and scaling (EDM Eq. 4); the table gives the median
over seeds (a seed that lands on another training image has an O(0.1) error, so the mean would be bimodal).

Overhead: time per step of the composed Sampler with a zero-cost denoiser (it returns a preallocated tensor),
batch 8, 3x32x32, float64, against a bare hand-written loop doing the same arithmetic for the same configuration
(time steps and coefficients precomputed as Python floats, as a hand-tuned script would), for euler and heun,
with and without churn, on vp and edm settings. The three variants run interleaved and each reports its best
of R runs, which is what the code costs when nothing else competes for the CPU.

    python tools/bench_sampler.py                    # both parts; writes docs/benchmarks.md
    python tools/bench_sampler.py --part overhead    # only the overhead section (a minute)
    python tools/bench_sampler.py --quick            # fewer combinations, prints only
"""

from __future__ import annotations

import argparse
import itertools
import math
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _report import write_section  # noqa: E402

from edm_toolkit.rng import SeedGenerators  # noqa: E402
from edm_toolkit.sampling import Churn, Sampler  # noqa: E402

DISCS = ["edm", "vp", "ve", "iddpm", "logsnr"]
SCHEDULES = ["linear", "vp", "ve"]
SCALINGS = ["none", "vp"]
STEPS = {"euler": [8, 16, 32, 64, 128], "heun": [5, 9, 17, 33, 65]}


def accuracy(quick: bool):
    from _accuracy import AccuracyProbe

    probe = AccuracyProbe()
    rows = []
    combos = list(itertools.product(["euler", "heun"], DISCS, SCHEDULES, SCALINGS))
    if quick:
        combos = [c for c in combos if c[2] == "linear" and c[3] == "none"]
    for solver, disc, schedule, scaling in combos:
        errors = [probe.error(Sampler(solver=solver, discretization=disc, schedule=schedule, scaling=scaling,
                                      num_steps=n)) for n in STEPS[solver]]
        rows.append((solver, disc, schedule, scaling, errors))
        print(f"{solver:5s} {disc:6s} {schedule:6s} {scaling:4s} " + " ".join(f"{e:.2e}@{k}" for k, e in errors), flush=True)
    return rows


class ZeroCost:
    """A denoiser that costs nothing: it returns the same preallocated tensor."""

    sigma_min, sigma_max = 0.0, math.inf

    def __init__(self, like):
        self.out = torch.zeros_like(like)

    def round_sigma(self, sigma):
        return torch.as_tensor(sigma)

    def __call__(self, x, sigma, labels=None):
        return self.out


def bare_loop(net, latents, steps, randn_like, heun):
    """The hand-written loop: same arithmetic as EDM Algorithm 2 with precomputed floats."""
    x = latents.to(torch.float64) * steps[0]
    for _, scale_hat, std, sigma_hat_t, inv_s_hat, a, b, h, prime in steps[1]:
        if std is not None:
            eps = randn_like(x)
            if std > 0:
                x = scale_hat * x + std * eps
        D = net(x * inv_s_hat, sigma_hat_t).to(torch.float64)
        d = a * x - b * D
        if not heun or prime is None:
            x = x + h * d
        else:
            sigma_p_t, inv_s_p, a_p, b_p = prime
            x_p = x + h * d
            D2 = net(x_p * inv_s_p, sigma_p_t).to(torch.float64)
            d2 = a_p * x_p - b_p * D2
            x = x + h * (0.5 * d + 0.5 * d2)
    return x


def bare_steps(sampler: Sampler, net):
    """Precomputes the bare loop's floats from the same plan (so both loops do identical arithmetic)."""
    plan = sampler.plan(net)
    out = []
    for step in plan.steps:
        rec = step.record
        p = rec.point
        prime = getattr(rec, "prime", None)
        prime_t = None if prime is None else (prime.sigma_net, prime.inv_s, prime.a, prime.a * prime.c)
        out.append((None, step.scale_hat, step.noise_std if step.draw_noise else None, p.sigma_net, p.inv_s,
                    p.a, p.a * p.c, rec.h, prime_t))
    return (plan.x_scale, out)


def best_times(fns, repeats):
    """Best-of-``repeats`` wall time of each function, run interleaved so that load affects all alike."""
    best = [math.inf] * len(fns)
    for _ in range(repeats):
        for k, fn in enumerate(fns):
            start = time.perf_counter()
            fn()
            best[k] = min(best[k], time.perf_counter() - start)
    return best


def overhead(repeats: int, num_steps: int = 32):
    latents = torch.randn(8, 3, 32, 32, dtype=torch.float64)
    net = ZeroCost(latents)
    settings = {
        "edm": dict(discretization="edm", schedule="linear", scaling="none"),
        "vp": dict(discretization="vp", schedule="vp", scaling="vp"),
    }
    rows = []
    for (name, kw), solver, churn in itertools.product(settings.items(), ["euler", "heun"], [False, True]):
        c = Churn(S_churn=40, S_min=0.05, S_max=50, S_noise=1.003) if churn else Churn()
        sampler = Sampler(solver=solver, num_steps=num_steps, churn=c, **kw)
        steps = bare_steps(sampler, net)
        seeds = list(range(8))
        # Fresh per-seed generators each run, in both loops (their cost is part of a churned step).
        plan = sampler.plan(net)
        t_sampler, t_loop, t_bare = best_times([
            lambda: sampler(net, latents, randn_like=SeedGenerators(seeds).randn_like),
            lambda: sampler(net, latents, randn_like=SeedGenerators(seeds).randn_like, plan=plan),
            lambda: bare_loop(net, latents, steps, SeedGenerators(seeds).randn_like, solver == "heun"),
        ], repeats)
        rows.append((name, solver, churn, t_sampler / num_steps, t_loop / num_steps, t_bare / num_steps))
        print(f"{name:4s} {solver:5s} churn={churn!s:5s} sampler {1e6 * t_sampler / num_steps:7.1f} us/step "
              f"(loop only {1e6 * t_loop / num_steps:7.1f}), bare {1e6 * t_bare / num_steps:7.1f} us/step, "
              f"ratio {t_sampler / t_bare:.2f}", flush=True)
    return rows


def _machine():
    return (f"Machine: {platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}, "
            f"Python {platform.python_version()}.")


def accuracy_report(acc_rows, command):
    lines = ["## Sampler accuracy versus network evaluations (`tools/bench_sampler.py`)", "",
             f"Command: `{command}`  ", _machine(), "",
             "Median over 32 seeds of the RMS error of x/s at sigma_min against the exact PF-ODE solution (scipy "
             "DOP853, rtol = atol = 1e-10) for the ideal denoiser of the built-in 64-image set. Columns are NFE "
             "(Euler: N steps = N NFE; Heun: N steps = 2N - 1 NFE).", ""]
    for solver in ("euler", "heun"):
        nfes = [k for k, _ in next(r for r in acc_rows if r[0] == solver)[4]]
        lines += [f"**{solver}**", "", "| discretization | schedule | scaling | " + " | ".join(f"NFE {k}" for k in nfes) + " |",
                  "|---|---|---|" + "---:|" * len(nfes)]
        for s, d, sc, sl, errs in acc_rows:
            if s == solver:
                lines.append(f"| {d} | {sc} | {sl} | " + " | ".join(f"{e:.2e}" for _, e in errs) + " |")
        lines.append("")
    return "\n".join(lines)


def overhead_report(ovh_rows, command, repeats):
    lines = ["## Sampling-loop overhead (`tools/bench_sampler.py`)", "", f"Command: `{command}`  ", _machine(), "",
             f"Time per step with a zero-cost denoiser (batch 8, 3x32x32, float64, 32 steps), best of {repeats} "
             "interleaved runs. "
              "'sampler' is a full call (plan + loop), 'loop only' reuses a precomputed plan, 'bare' is the "
              "hand-written loop in the tool; ratio = sampler / bare (acceptance: at most 1.5).", "",
              "| settings | solver | churn | sampler (us/step) | loop only (us/step) | bare (us/step) | ratio |",
              "|---|---|---|---:|---:|---:|---:|"]
    for name, solver, churn, ts, tl, tb in ovh_rows:
        lines.append(f"| {name} | {solver} | {'yes' if churn else 'no'} | {1e6 * ts:.1f} | {1e6 * tl:.1f} | "
                     f"{1e6 * tb:.1f} | {ts / tb:.2f} |")
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="EDM-style settings only; print, do not write docs")
    parser.add_argument("--part", choices=["all", "accuracy", "overhead"], default="all", help="what to run")
    parser.add_argument("--repeats", type=int, default=50, help="timed repetitions per overhead configuration")
    args = parser.parse_args()
    torch.manual_seed(0)
    command = "python tools/bench_sampler.py" + ("" if args.part == "all" else f" --part {args.part}")
    if args.part in ("all", "overhead"):
        ovh = overhead(args.repeats)
        if not args.quick:
            write_section("sampler-overhead", overhead_report(ovh, command, args.repeats))
    if args.part in ("all", "accuracy"):
        acc = accuracy(args.quick)
        if not args.quick:
            write_section("sampler-accuracy", accuracy_report(acc, command))
    if not args.quick:
        print("wrote docs/benchmarks.md")


if __name__ == "__main__":
    main()
