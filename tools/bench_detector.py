"""FID detector benchmark (issue 9): images per second of the FID Inception detector (uint8 images -> TF1 resize
to 299x299 -> 2048 pool features) at several batch sizes and input resolutions, the cost of the float64 statistics
update, of reading the detector file, and of the Frechet distance at D = 2048.

The detector's weights come from the file that `edm fid` would use (--detector, $EDM_TOOLKIT_FID_DETECTOR or
the installed extra); without one, zero weights are timed (the cost does not depend on the values).

    python tools/bench_detector.py                   # CPU; writes its section of docs/benchmarks.md
    python tools/bench_detector.py --device cuda     # on a GPU (writes the GPU section)
    python tools/bench_detector.py --quick           # batch 8 at 32x32 only; prints, does not write
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from edm_toolkit.errors import EDMToolkitError  # noqa: E402
from edm_toolkit.metrics.detector_files import (  # noqa: E402
    detector_from_state_dict, find_detector, read_detector_weights)
from edm_toolkit.metrics.inception import InceptionV3  # noqa: E402
from edm_toolkit.metrics.statistics import FeatureStatistics, frechet_distance  # noqa: E402


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def best_time(function, device, calls: int) -> tuple[float, float]:
    """(first call, best of ``calls`` further calls) in seconds."""
    start = time.perf_counter()
    function()
    synchronize(device)
    first = time.perf_counter() - start
    best = first if first > 20 else float("inf")  # a very slow configuration is timed by its first call
    for _ in range(calls if best == float("inf") else 0):
        start = time.perf_counter()
        function()
        synchronize(device)
        best = min(best, time.perf_counter() - start)
    return first, best


def machine(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)}, torch {torch.__version__}"
    model = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        names = [line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines()
                 if line.startswith("model name")]
        model = names[0] if names else model
    load = f", load average {os.getloadavg()[0]:.1f} while measuring" if hasattr(os, "getloadavg") else ""
    return (f"{model} ({platform.machine()}), {torch.get_num_threads()} threads{load}, torch {torch.__version__}, "
            f"Python {platform.python_version()}")


def load(device: torch.device) -> tuple[InceptionV3, str, str]:
    """(detector, where its weights came from, how long reading took)."""
    try:
        found = find_detector()
    except EDMToolkitError:
        return InceptionV3().eval().to(device), "zero weights (no detector file found)", ""
    start = time.perf_counter()
    tensors, form = read_detector_weights(found.path)
    detector = detector_from_state_dict(tensors, str(found.path)).to(device)
    seconds = time.perf_counter() - start
    return detector, f"{found.path.name} ({form}, {found.origin})", f"{seconds:.1f} s"


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", help="torch device (cpu, cuda)")
    parser.add_argument("--calls", type=int, default=3, help="timed calls per configuration (best is reported)")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads  [default: torch's]")
    parser.add_argument("--sqrtm", action="store_true", help="also time fid.py's scipy sqrtm (minutes on a CPU)")
    parser.add_argument("--quick", action="store_true", help="batch 8 at 32x32 only; print, do not write docs")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    detector, source, load_time = load(device)
    batches = [8] if args.quick else ([1, 16, 64] if device.type == "cpu" else [1, 64, 256])
    resolutions = [32] if args.quick else [32, 64, 256]

    rows = []
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for resolution in resolutions:
            for batch in batches:
                images = torch.randint(0, 256, (batch, 3, resolution, resolution), dtype=torch.uint8,
                                       generator=generator).to(device)
                first, best = best_time(lambda: detector(images), device, args.calls)
                rows.append(f"| {resolution}x{resolution} | {batch} | {best:.3f} | {batch / best:.1f} | {first:.2f} |")
                print(rows[-1], flush=True)

        features = torch.randn(64, 2048, generator=generator).to(device)
        stats = FeatureStatistics(2048, device)
        _, update = best_time(lambda: stats.update(features), device, args.calls)

    rng = np.random.default_rng(0)
    timings = []
    if not args.quick:
        x, y = rng.normal(size=(3000, 2048)), rng.normal(size=(3000, 2048)) * 1.1
        s1, s2 = np.cov(x, rowvar=False), np.cov(y, rowvar=False)
        methods = ["eigh", "sqrtm"] if args.sqrtm else ["eigh"]
        for method in methods:
            start = time.perf_counter()
            frechet_distance(x.mean(0), s1, y.mean(0), s2, method=method)
            timings.append(f"`{method}` {time.perf_counter() - start:.1f} s")
            print(timings[-1], flush=True)

    command = "python tools/bench_detector.py" + (f" --device {args.device}" if args.device != "cpu" else "")
    command += f" --threads {args.threads}" if args.threads else ""
    lines = [
        f"## FID detector throughput, {device.type.upper()} (`tools/bench_detector.py`)",
        "",
        f"Command: `{command}{' --sqrtm' if args.sqrtm else ''}`  ",
        f"Machine: {machine(device)}.  ",
        f"Weights: {source}{f', read in {load_time}' if load_time else ''}.",
        "",
        "One detector call on uint8 images of the given size: TF1 bilinear resize to 299x299, (x - 128)/128, the",
        "94 conv layers, 2048 pool features (float32). images/s = batch / seconds per call (best of the timed calls",
        "after one warm-up call).",
        "",
        "| input | batch | s per call | images/s | first call (s) |",
        "|---|---:|---:|---:|---:|",
        *rows,
        "",
        f"Streaming statistics: one float64 update with a batch of 64 features takes {update * 1e3:.1f} ms "
        f"({64 / update:.0f} images/s).",
    ]
    if timings:
        lines.append(f"Frechet distance at D = 2048 (CPU, float64): {', '.join(timings)}.")
    if hasattr(os, "getloadavg") and device.type == "cpu" and os.getloadavg()[0] > (os.cpu_count() or 1):
        lines += ["", "The CPU was shared with other jobs while measuring (load average above the number of cores):",
                  "the rates are lower bounds, and the spread between batch sizes comes from that contention."]
    if device.type == "cpu" and not torch.cuda.is_available():
        lines += ["", "No GPU was available to the session that produced this table; "
                  "`python tools/bench_detector.py --device cuda` writes the GPU section where one is."]
    body = "\n".join(lines)
    if args.quick:
        print(body)
        return
    from _report import write_section

    write_section(f"detector-{device.type}", body)
    print(f"wrote the detector-{device.type} section of docs/benchmarks.md")


if __name__ == "__main__":
    main()
