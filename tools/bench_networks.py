"""Network benchmark (issue 3): images per second per network evaluation and peak memory of DDPM++ (32x32),
NCSN++ (32x32) and ADM (64x64) at batch 1, 8 and 64, for the faithful path and each fast option.

Each measurement runs in a fresh subprocess (so its peak RSS is its own): the preconditioned network
(EDMPrecond around the published architecture, random weights) evaluates D(x; sigma) at sigma = 1; one warm-up
call, then the best of the timed calls. Every fast option is also compared with the faithful fp32 path on the
same input at batch 1: relative error ||D_fast - D_faithful|| / ||D_faithful||. Configurations whose estimated
time (from the smaller batches) exceeds --budget seconds per evaluation are skipped and listed as such. No GPU is used unless present
(--device cuda).

    python tools/bench_networks.py                 # writes its section of docs/benchmarks.md
    python tools/bench_networks.py --quick         # DDPM++ at batch 8 only, prints only
    python tools/bench_networks.py --startup --before REF   # start-up CPU time, this tree against git REF

--startup (issue 13, item 4) measures what a process costs before it does any work: the CPU time (user + system,
which the load of other processes on the machine affects less than wall time) of fresh interpreters that import
the CLI, print ``edm --help``, load a small model file, and run ``edm generate`` on it (4 images, 2 steps),
best of R interleaved repetitions; and whether loading imported the compiler (torch._dynamo). With --before REF
the same runs are made on that git revision of the package (exported to a temporary directory) in between.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

NETWORKS = {
    "DDPM++ 32x32": ("song_unet", "ddpmpp", 32),
    "NCSN++ 32x32": ("song_unet", "ncsnpp", 32),
    "ADM 64x64": ("dhariwal_unet", "adm", 64),
}
OPTIONS = {
    "faithful (fp32)": dict(precision="fp32"),
    "channels_last": dict(precision="fp32", channels_last=True),
    "bf16 autocast": dict(precision="bf16"),
    "compile": dict(precision="fp32", compile=True),
}


def build(name: str, device: str):
    import torch

    from edm_toolkit.networks.dhariwal_unet import DhariwalUNet, published_config as adm_config
    from edm_toolkit.networks.song_unet import SongUNet, published_config as song_config
    from edm_toolkit.precond import EDMPrecond

    kind, config, resolution = NETWORKS[name]
    torch.manual_seed(0)
    if kind == "song_unet":
        model = SongUNet(img_resolution=resolution, in_channels=3, out_channels=3, **song_config(config, dropout=0.0))
    else:
        model = DhariwalUNet(img_resolution=resolution, in_channels=3, out_channels=3, **adm_config(config, dropout=0.0))
    with torch.no_grad():  # random weights everywhere (the zero-initialised output layers would hide errors)
        for pname, p in model.named_parameters():
            p.copy_(1 + 0.1 * torch.randn_like(p) if "norm" in pname else 0.05 * torch.randn_like(p))
    return EDMPrecond(model, img_resolution=resolution, img_channels=3).eval().requires_grad_(False).to(device)


def measure(name: str, option: str, batch: int, device: str, calls: int, with_error: bool) -> dict:
    """Runs in the subprocess: times D(x; 1) and reports peak memory (and the error against fp32)."""
    import torch

    from edm_toolkit.inference import InferenceOptions, optimize

    net = build(name, device)
    resolution = NETWORKS[name][2]
    x = torch.randn(batch, 3, resolution, resolution, generator=torch.Generator().manual_seed(1)).to(device)
    sigma = torch.tensor(1.0, device=device)
    result = {}
    with torch.no_grad():
        reference = net(x, sigma).double() if with_error else None
        fast = optimize(net, InferenceOptions(**OPTIONS[option]))
        start = time.perf_counter()
        out = fast(x, sigma)  # warm-up (and compilation)
        result["first_call_s"] = time.perf_counter() - start
        best = result["first_call_s"] if result["first_call_s"] > 5 and option != "compile" else float("inf")
        for _ in range(calls if best == float("inf") else 0):  # a slow configuration is timed by its first call
            if device == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            out = fast(x, sigma)
            if device == "cuda":
                torch.cuda.synchronize()
            best = min(best, time.perf_counter() - start)
    result["seconds_per_nfe"] = best
    result["images_per_s"] = batch / best
    result["peak_rss_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    if device == "cuda":
        result["peak_gpu_gb"] = torch.cuda.max_memory_allocated() / 2**30
    if reference is not None:
        result["rel_error"] = float((out.double() - reference).norm() / reference.norm())
    return result


def run_one(name, option, batch, device, calls, with_error, timeout):
    cmd = [sys.executable, __file__, "--child", json.dumps([name, option, batch, device, calls, with_error])]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"skipped": f"over {timeout:.0f} s"}
    if done.returncode != 0:
        return {"skipped": "failed: " + (done.stderr.strip().splitlines() or ["?"])[-1][:120]}
    return json.loads(done.stdout.strip().splitlines()[-1])


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--quick", action="store_true", help="DDPM++ at batch 8 only; print, do not write docs")
    parser.add_argument("--budget", type=float, default=150.0, help="skip configurations estimated slower (s per NFE)")
    parser.add_argument("--compile-timeout", type=float, default=900.0, help="seconds allowed for a compiled run")
    parser.add_argument("--startup", action="store_true", help="measure start-up CPU time instead (see above)")
    parser.add_argument("--before", metavar="REF", help="with --startup: also measure this git revision")
    parser.add_argument("--reps", type=int, default=5, help="with --startup: interleaved repetitions")
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(*json.loads(args.child))))
        return
    if args.startup:
        startup(args.before, args.reps, write=not args.quick)
        return

    networks = ["DDPM++ 32x32"] if args.quick else list(NETWORKS)
    batches = [8] if args.quick else [1, 8, 64]
    rows = []
    for name in networks:
        per_image: dict[str, float] = {}  # seconds per image per option, to estimate larger batches
        for batch in batches:
            for option in OPTIONS:
                if option == "compile" and (batch != 8 or name != "DDPM++ 32x32"):
                    rows.append((name, option, batch, {"skipped": "compiled for DDPM++ at batch 8 only (minutes per shape on CPU)"}))
                    continue
                if option == "bf16 autocast" and args.device == "cpu" and (batch != batches[0] or name == "ADM 64x64"):
                    rows.append((name, option, batch, {"skipped": "bf16 on a CPU without bf16 arithmetic: batch 1 of the 32x32 nets only"}))
                    continue
                estimate = per_image.get(option, 0.0) * batch
                if estimate > args.budget:
                    rows.append((name, option, batch, {"skipped": f"estimated {estimate:.0f} s per NFE"}))
                    continue
                calls = 3 if estimate < 5 else 1
                timeout = args.compile_timeout if option == "compile" else max(900.0, 20 * estimate)
                with_error = batch == batches[0] and option != "faithful (fp32)"
                result = run_one(name, option, batch, args.device, calls, with_error, timeout)
                if "seconds_per_nfe" in result:
                    per_image[option] = result["seconds_per_nfe"] / batch
                rows.append((name, option, batch, result))
                print(name, option, batch, result, flush=True)
    if args.quick:
        return
    from _report import write_section

    import torch

    lines = ["## Network throughput (`tools/bench_networks.py`)", "", "Command: `python tools/bench_networks.py`  ",
             f"Device: {args.device} ({platform.machine()}, {torch.get_num_threads()} threads), torch {torch.__version__}. "
             "No GPU was lent to the session that produced this table; run the command with `--device cuda` where "
             "one is available.", "",
             "One network evaluation D(x; sigma) of EDMPrecond around the published architecture (random weights). "
             "images/s = batch / seconds per evaluation (best of the timed calls after one warm-up); peak RSS of the "
             "measuring process; rel. error = ||D_fast - D_fp32|| / ||D_fp32|| at the smallest batch.", "",
             "| network | option | batch | s per NFE | images/s per NFE | peak RSS (GB) | rel. error vs fp32 | first call (s) |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    for name, option, batch, r in rows:
        if "skipped" in r:
            lines.append(f"| {name} | {option} | {batch} | skipped: {r['skipped']} | | | | |")
            continue
        err = f"{r['rel_error']:.1e}" if "rel_error" in r else ""
        lines.append(f"| {name} | {option} | {batch} | {r['seconds_per_nfe']:.3f} | {r['images_per_s']:.2f} | "
                     f"{r['peak_rss_gb']:.2f} | {err} | {r['first_call_s']:.1f} |")
    write_section("networks", "\n".join(lines))
    print("wrote docs/benchmarks.md")


REPO = Path(__file__).resolve().parents[1]
STARTUP_STEPS = {  # name: command line after the interpreter, {model} and {out} filled in
    "import the CLI": ["-c", "import edm_toolkit.cli"],
    "edm --help": ["-m", "edm_toolkit", "--help"],
    "load a model": ["-c", "import sys; from edm_toolkit.loading import load_denoiser; load_denoiser(sys.argv[1]); "
                     "print('torch._dynamo' in sys.modules)", "{model}"],
    "edm generate (4 images, 2 steps)": ["-m", "edm_toolkit", "generate", "--network", "{model}", "--seeds", "0-3",
                                         "--steps", "2", "--outdir", "{out}", "--device", "cpu"],
}


def startup(before: str | None, reps: int, write: bool) -> None:
    """Start-up CPU time of fresh interpreters, this tree (and git revision ``before``), best of ``reps``."""
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model = tmp / "ddpmpp-tiny.pt"
        subprocess.run([sys.executable, "-c", (
            "import sys, torch\n"
            "from edm_toolkit.checkpoints import save_model\n"
            "from edm_toolkit.networks.song_unet import SongUNet, published_config\n"
            "from edm_toolkit.precond import EDMPrecond\n"
            "torch.manual_seed(0)\n"
            "net = SongUNet(img_resolution=16, in_channels=3, out_channels=3, **published_config('ddpmpp', "
            "model_channels=32, channel_mult=[1, 2], num_blocks=1, attn_resolutions=[8]))\n"
            "save_model(EDMPrecond(net, img_resolution=16, img_channels=3), sys.argv[1])\n"), str(model)], check=True)
        trees = {"this tree": None}  # the installed (editable) package
        if before:
            export = tmp / "before"
            export.mkdir()
            archive = subprocess.run(["git", "-C", str(REPO), "archive", before, "edm_toolkit", "presets"],
                                     capture_output=True, check=True).stdout
            subprocess.run(["tar", "-x", "-C", str(export)], input=archive, check=True)
            (export / "edm_toolkit" / "preset_data").symlink_to(export / "presets")  # as the installed package has it
            trees = {f"before ({before})": export, **trees}
        best = {(tree, step): float("inf") for tree in trees for step in STARTUP_STEPS}
        dynamo = {}
        for _ in range(reps):
            for tree, root in trees.items():
                env = {**os.environ, "OMP_NUM_THREADS": "1", **({"PYTHONPATH": str(root)} if root else {})}
                for step, command in STARTUP_STEPS.items():
                    argv = [a.format(model=model, out=tmp / "out") for a in command]
                    before_usage = resource.getrusage(resource.RUSAGE_CHILDREN)
                    done = subprocess.run([sys.executable, *argv], capture_output=True, text=True, env=env, cwd=tmp)
                    after_usage = resource.getrusage(resource.RUSAGE_CHILDREN)
                    if done.returncode != 0:
                        raise SystemExit(f"{tree}: {step} failed: {done.stderr.strip()[-300:]}")
                    cpu = (after_usage.ru_utime - before_usage.ru_utime) + (after_usage.ru_stime - before_usage.ru_stime)
                    best[tree, step] = min(best[tree, step], cpu)
                    if step == "load a model":
                        dynamo[tree] = done.stdout.strip() == "True"
    import torch

    lines = ["## Start-up time (`tools/bench_networks.py --startup`)", "",
             f"Command: `python tools/bench_networks.py --startup{f' --before {before}' if before else ''}`  ",
             f"Machine: {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
             f"Python {platform.python_version()}.", "",
             f"CPU time (user + system) of a fresh interpreter, best of {reps} interleaved repetitions; the model is "
             "DDPM++ at 16x16 with 32 channels (a toolkit model file). Every step is a process of its own, imports included.",
             "", "| step | " + " | ".join(trees) + " |", "|---|" + "---:|" * len(trees)]
    for step in STARTUP_STEPS:
        lines.append(f"| {step} | " + " | ".join(f"{best[tree, step]:.2f} s" for tree in trees) + " |")
    lines.append("| loading imports torch._dynamo | " + " | ".join("yes" if dynamo[t] else "no" for t in trees) + " |")
    print("\n".join(lines))
    if write:
        from _report import write_section

        write_section("startup", "\n".join(lines))
        print("wrote docs/benchmarks.md")


if __name__ == "__main__":
    main()
