"""GPU benchmark (issue 13): the toolkit's inference paths side by side with the official EDM code, on one GPU.

For DDPM++ 32x32 (EDM's CIFAR-10 architecture, 56M parameters) and ADM 64x64 (EDM's ImageNet-64 architecture),
with the same random weights in every variant: images per second per network evaluation D(x; sigma) for the
official network in fp32 and with its ``use_fp16``, and for the toolkit's fp32 (faithful), eager fast paths and
compiled path; the error of each against the toolkit's fp32 output; and, end to end, 35-NFE Heun sampling (EDM's
deterministic sampler, 18 steps) at a fixed batch: images per second, the time that 50,000 images would take, and
how far the images (8-bit) are from the fp32 path's.

Timings are the best of R interleaved repetitions (every variant once per repetition), after a warm-up call that
also compiles; throughput in TFLOP/s uses the FLOPs of one evaluation as counted by torch's FlopCounterMode, and is
compared with the bf16 matrix-multiply peak measured on the same device at the start. A time budget (default 280 s)
keeps the run under 5 minutes: variants that would not fit are listed as skipped.

    python tools/bench_gpu.py --edm-ref ~/src/edm                  # one GPU; writes its section of docs/benchmarks.md
    python tools/bench_gpu.py --device cpu --tiny --no-write       # smoke test on a CPU with tiny networks

``--edm-ref`` is a checkout of NVlabs/edm (its ``training/networks.py``, imported from there; nothing of it is
copied). Without it the official columns are left out.
"""

from __future__ import annotations

import argparse
import importlib
import math
import platform
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

NETWORKS = {
    # name: (toolkit network type, EDM --arch, resolution, label_dim, augment_dim) of the released models.
    "DDPM++ 32x32": ("song_unet", "ddpmpp", 32, 0, 9),
    "ADM 64x64": ("dhariwal_unet", "adm", 64, 1000, 0),
}
# --tiny: the same architectures, narrow and small, for a CPU.
TINY = {
    "DDPM++ 32x32": dict(resolution=16, model_channels=16, channel_mult=[1, 2], num_blocks=1, attn_resolutions=[8]),
    "ADM 64x64": dict(resolution=16, model_channels=32, channel_mult=[1, 2], num_blocks=1, attn_resolutions=[8],
                      label_dim=10),
}
EAGER = {  # label: InferenceOptions fields
    "fp32 (faithful)": dict(),
    "fp16": dict(precision="fp16"),
    "fp16 + channels_last": dict(precision="fp16", channels_last=True),
    "bf16 + channels_last": dict(precision="bf16", channels_last=True),
}
COMPILED = {"bf16 + channels_last + compile": dict(precision="bf16", channels_last=True, compile=True)}
OFFICIAL = {"official fp32": False, "official fp16 (use_fp16)": True}
REFERENCE = "official fp16 (use_fp16)"  # the figure the goals are stated against
COMPILE_ALLOWANCE_S = 100.0  # assumed cost of one compilation when deciding whether it fits the budget


@dataclass
class Variant:
    network: str
    label: str
    batch: int
    call: object  # net(x, sigma, labels)
    official: bool = False
    compiled: bool = False
    times: list = field(default_factory=list)
    error: float | None = None


def fail(message: str) -> None:
    print(f"Error: {message}", file=sys.stderr)
    raise SystemExit(2)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda", help="torch device (default cuda; 'cpu' with --tiny for a smoke test)")
    parser.add_argument("--tiny", action="store_true", help="tiny networks and batches (CPU smoke test)")
    parser.add_argument("--edm-ref", metavar="PATH", help="checkout of NVlabs/edm: adds the official network's columns")
    parser.add_argument("--batches", default=None, metavar="N,N", help="DDPM++ batches (default 256,1024; tiny: 2)")
    parser.add_argument("--adm-batches", default=None, metavar="N,N", help="ADM batches (default 256; tiny: 2)")
    parser.add_argument("--e2e-batch", type=int, default=None, help="end-to-end batch (default 1024; tiny: 2)")
    parser.add_argument("--steps", type=int, default=None, help="end-to-end Heun steps (default 18 = 35 NFE; tiny: 3)")
    parser.add_argument("--reps", type=int, default=None, help="interleaved repetitions (default 5; tiny: 2)")
    parser.add_argument("--calls", type=int, default=None, help="timed calls per repetition (default 3; tiny: 1)")
    parser.add_argument("--no-compile", action="store_true", help="leave out the compiled path")
    parser.add_argument("--compile-mode", default=None,
                        help="torch.compile mode of the compiled path (default reduce-overhead on CUDA, default on CPU)")
    parser.add_argument("--compile-cache", default=None, metavar="DIR", help="compile cache directory (reused by later runs)")
    parser.add_argument("--budget", type=float, default=280.0, help="seconds; variants that would not fit are skipped")
    parser.add_argument("--no-write", action="store_true", help="print only; do not write docs/benchmarks.md")
    parser.add_argument("--doc", default=None, metavar="PATH", help="the markdown file to write (default docs/benchmarks.md)")
    args = parser.parse_args(argv)
    tiny = args.tiny
    args.batches = _ints(args.batches or ("2" if tiny else "256,1024"), "--batches")
    args.adm_batches = _ints(args.adm_batches or ("2" if tiny else "256"), "--adm-batches")
    args.e2e_batch = args.e2e_batch or (2 if tiny else 1024)
    args.steps = args.steps or (3 if tiny else 18)
    if args.e2e_batch < 1 or args.steps < 2:
        fail("--e2e-batch must be at least 1 and --steps at least 2")
    args.reps = args.reps or (2 if tiny else 5)
    args.calls = args.calls or (1 if tiny else 3)
    return args


def _ints(text: str, flag: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        values = []
    if not values or min(values) < 1:
        fail(f"{flag} takes positive integers separated by commas, got {text!r}")
    return values


def check_device(args):
    import torch

    try:
        device = torch.device(args.device)
    except RuntimeError:
        fail(f"unknown device {args.device!r}; use cuda, cuda:N or cpu")
    if device.type == "cuda" and not torch.cuda.is_available():
        fail("no CUDA device here: run on a machine with a GPU, or smoke-test with --device cpu --tiny")
    if device.type == "cpu" and not args.tiny:
        fail("the full-size benchmark needs a GPU (minutes per evaluation on a CPU); add --tiny for a smoke test")
    return device


def describe_device(device) -> str:
    import torch

    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        return (f"{props.name} ({props.total_memory / 2**30:.0f} GiB), CUDA {torch.version.cuda}, "
                f"torch {torch.__version__}")
    return f"cpu ({platform.machine()}, {torch.get_num_threads()} threads), torch {torch.__version__}"


def load_official(edm_ref: str | None):
    """EDM's training.networks module from the checkout, or None (with the reason) when it cannot be imported."""
    if edm_ref is None:
        return None, "no --edm-ref given"
    root = Path(edm_ref).expanduser().resolve()
    if not (root / "training" / "networks.py").is_file():
        fail(f"{root} is not a checkout of NVlabs/edm (no training/networks.py); clone it and pass its path")
    sys.path.insert(0, str(root))
    try:
        return importlib.import_module("training.networks"), None
    except ImportError as exc:  # dnnlib needs e.g. requests
        return None, f"cannot import EDM's networks from {root}: {exc}"


def official_sampler(edm_ref: str | None):
    """EDM's own ``edm_sampler`` from generate.py when its imports are available, else None."""
    if edm_ref is None:
        return None
    try:
        return importlib.import_module("generate").edm_sampler
    except ImportError:
        return None


def network_kwargs(name: str, tiny: bool) -> tuple[str, int, int, dict]:
    from edm_toolkit.networks.dhariwal_unet import published_config as adm_config
    from edm_toolkit.networks.song_unet import published_config as song_config

    kind, arch, resolution, label_dim, augment_dim = NETWORKS[name]
    overrides = dict(TINY[name]) if tiny else {}
    resolution = overrides.pop("resolution", resolution)
    label_dim = overrides.pop("label_dim", label_dim)
    config = (song_config if kind == "song_unet" else adm_config)(arch, dropout=0.0, augment_dim=augment_dim, **overrides)
    return kind, resolution, label_dim, config


def build_pair(name: str, tiny: bool, device, official_module):
    """The toolkit's EDMPrecond around the network, random weights everywhere, and the official copies of it."""
    import torch

    from edm_toolkit.networks.dhariwal_unet import DhariwalUNet
    from edm_toolkit.networks.song_unet import SongUNet
    from edm_toolkit.precond import EDMPrecond

    kind, resolution, label_dim, config = network_kwargs(name, tiny)
    torch.manual_seed(0)
    cls = SongUNet if kind == "song_unet" else DhariwalUNet
    backbone = cls(img_resolution=resolution, in_channels=3, out_channels=3, label_dim=label_dim, **config)
    with torch.no_grad():  # the zero-initialised output layers would hide every error
        for pname, p in backbone.named_parameters():
            p.copy_(1 + 0.1 * torch.randn_like(p) if "norm" in pname else 0.05 * torch.randn_like(p))
    net = EDMPrecond(backbone, img_resolution=resolution, img_channels=3, label_dim=label_dim)
    net = net.eval().requires_grad_(False).to(device)
    official = {}
    if official_module is not None:
        model_type = "SongUNet" if kind == "song_unet" else "DhariwalUNet"
        for label, use_fp16 in OFFICIAL.items():
            ref = official_module.EDMPrecond(img_resolution=resolution, img_channels=3, label_dim=label_dim,
                                             use_fp16=use_fp16, model_type=model_type, **config)
            ref.load_state_dict(net.state_dict(), strict=True)  # the toolkit keeps EDM's state_dict layout
            official[label] = ref.eval().requires_grad_(False).to(device)
    return net, official, resolution, label_dim


def flops_per_image(net, resolution, label_dim, device) -> float:
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    x = torch.zeros(1, 3, resolution, resolution, device=device)
    labels = torch.eye(label_dim, device=device)[:1] if label_dim else None
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        net(x, torch.ones(1, device=device), labels)
    return float(counter.get_total_flops())


def measured_peak_tflops(device) -> float | None:
    """bf16 dense matrix-multiply throughput (the card's practical peak), best of a few timed runs."""
    import torch

    if device.type != "cuda":
        return None
    n = 8192
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    best = math.inf
    for _ in range(5):
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(10):
            a @ b
        torch.cuda.synchronize()
        best = min(best, (time.perf_counter() - start) / 10)
    return 2 * n**3 / best / 1e12


def sync(device):
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_calls(variant: Variant, x, sigma, labels, calls: int, device) -> float:
    import torch

    with torch.no_grad():
        sync(device)
        start = time.perf_counter()
        for _ in range(calls):
            variant.call(x, sigma, labels)
        sync(device)
    return (time.perf_counter() - start) / calls


def relative_error(out, reference) -> float:
    return float((out.double() - reference.double()).norm() / reference.double().norm())


def main(argv=None):
    args = parse_args(argv)
    import torch

    device = check_device(args)
    started = time.perf_counter()
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    compile_mode = args.compile_mode or ("reduce-overhead" if device.type == "cuda" else "default")
    official_module, official_note = load_official(args.edm_ref)
    peak = measured_peak_tflops(device)
    print(f"device: {describe_device(device)}; bf16 matmul peak: {peak and f'{peak:.0f} TFLOP/s'}", flush=True)

    def elapsed():
        return time.perf_counter() - started

    rows, skipped, flops, e2e = [], [], {}, []
    for name in NETWORKS:
        net, official, resolution, label_dim = build_pair(name, args.tiny, device, official_module)
        flops[name] = flops_per_image(net, resolution, label_dim, device)
        batches = args.batches if name.startswith("DDPM") else args.adm_batches
        variants = measure_network(args, device, name, net, official, resolution, label_dim, batches, compile_mode,
                                   elapsed, skipped)
        rows.extend(variants)
        if name.startswith("DDPM"):
            e2e = end_to_end(args, device, net, official, variants, resolution, elapsed, skipped)
        del net, official, variants
        if device.type == "cuda":
            torch.cuda.empty_cache()

    lines = report(args, device, peak, flops, rows, e2e, skipped, official_note, compile_mode)
    print("\n".join(lines))
    if not args.no_write:
        from _report import DOC, write_section

        write_section("gpu", "\n".join(lines), Path(args.doc) if args.doc else DOC)
        print(f"wrote {args.doc or DOC}")


def sampling_inputs(batch, resolution, label_dim, device):
    """x = y + sigma n at sigma = 1 as a sampling step hands it over: float64 x, a 0-d float64 sigma (so that the
    compiled graph timed here is the one the end-to-end run uses)."""
    import torch

    g = torch.Generator().manual_seed(batch)
    x = torch.randn(batch, 3, resolution, resolution, generator=g, dtype=torch.float64).to(device)
    labels = torch.eye(label_dim)[torch.randint(label_dim, [batch], generator=g)].to(device) if label_dim else None
    return x, torch.ones([], dtype=torch.float64, device=device), labels


def measure_network(args, device, name, net, official, resolution, label_dim, batches, compile_mode, elapsed,
                    skipped) -> list[Variant]:
    """Every variant at every batch: warm-up (and error) first, then the best of R interleaved repetitions."""
    import torch

    from edm_toolkit.inference import InferenceOptions, optimize

    variants = []
    for batch in batches:
        for label, fields in EAGER.items():  # the faithful fp32 path first: the others' errors are against it
            variants.append(Variant(name, label, batch, optimize(net, InferenceOptions(**fields))))
        for label, ref in official.items():
            variants.append(Variant(name, label, batch, ref, official=True))
    for batch in ([] if args.no_compile else batches[-1:]):
        for label, fields in COMPILED.items():
            if elapsed() + COMPILE_ALLOWANCE_S > args.budget:
                skipped.append(f"{name} {label} at batch {batch}: the compilation would not fit the budget")
                continue
            options = InferenceOptions(**fields, compile_mode=compile_mode, compile_cache=args.compile_cache)
            variants.append(Variant(name, f"{label} ({compile_mode})", batch, optimize(net, options), compiled=True))
    inputs = {batch: sampling_inputs(batch, resolution, label_dim, device) for batch in batches}
    kept = []
    with torch.no_grad():
        for batch in batches:
            x, sigma, labels = inputs[batch]
            reference = None
            for v in [v for v in variants if v.batch == batch]:
                if elapsed() > args.budget:
                    skipped.append(f"{name} {v.label} at batch {batch}: over the time budget")
                    continue
                start = time.perf_counter()
                try:
                    out = v.call(x, sigma, labels)
                    sync(device)
                except (RuntimeError, torch.cuda.OutOfMemoryError) as exc:  # a failed compile or too large a batch
                    skipped.append(f"{name} {v.label} at batch {batch}: failed ({str(exc).splitlines()[0][:150]})")
                    if reference is None:  # without the fp32 reference nothing else of this batch is comparable
                        break
                    continue
                print(f"{name} batch {batch} {v.label}: first call {time.perf_counter() - start:.1f} s", flush=True)
                if reference is None:
                    reference = out
                else:
                    v.error = relative_error(out[:64], reference[:64])
                kept.append(v)
    for rep in range(args.reps):
        if rep > 0 and elapsed() > args.budget:
            skipped.append(f"{name}: repetitions {rep + 1}-{args.reps} over the time budget")
            break
        for v in kept:
            x, sigma, labels = inputs[v.batch]
            v.times.append(time_calls(v, x, sigma, labels, args.calls, device))
    return kept


def end_to_end(args, device, net, official, variants, resolution, elapsed, skipped) -> list[tuple]:
    """Heun with EDM's discretization (18 steps = 35 NFE) at one batch: the official fp16 network, the toolkit's
    fp32 and fastest paths."""
    import torch

    from edm_toolkit.generate import sample_batch
    from edm_toolkit.inference import InferenceOptions, optimize
    from edm_toolkit.protocol import DenoiserBase
    from edm_toolkit.sampling import Sampler

    batch = args.e2e_batch
    sampler = Sampler(solver="heun", num_steps=args.steps)
    latents = torch.randn(batch, 3, resolution, resolution, generator=torch.Generator().manual_seed(7)).to(device)
    fastest = [v for v in variants if v.batch == batch and v.compiled]  # reuses the compiled graph of that batch
    fastest = fastest or [v for v in variants if v.batch == batch and v.label == "fp16 + channels_last"]
    fastest = fastest or [Variant("", "fp16 + channels_last", batch,
                                  optimize(net, InferenceOptions(precision="fp16", channels_last=True)))]
    # The fastest first and fp32 (the images' reference) last: what the budget cuts is the least important.
    runs = [(f"toolkit {v.label}", v.call, "toolkit") for v in fastest[:1]]
    edm_sampler = official_sampler(args.edm_ref)
    if REFERENCE in official:
        official = official[REFERENCE]
        if edm_sampler is not None:
            runs.append((REFERENCE + ", EDM's sampler", official, "official"))
        else:  # generate.py's imports (tqdm, ...) missing: the toolkit's Heun loop drives the official network
            runs.append((REFERENCE + ", toolkit's Heun loop", _Protocol(official, DenoiserBase), "toolkit"))
    runs.append(("toolkit fp32 (faithful)", net, "toolkit"))
    results, images = [], {}
    for label, net, loop in runs:
        if elapsed() > args.budget:
            skipped.append(f"end to end, {label}: over the time budget")
            continue
        try:
            with torch.no_grad():
                sync(device)
                start = time.perf_counter()
                if loop == "official":
                    x = edm_sampler(net, latents, None, num_steps=args.steps)
                else:
                    x = sample_batch(net, sampler, latents=latents, device=device)
                sync(device)
                seconds = time.perf_counter() - start
        except (RuntimeError, torch.cuda.OutOfMemoryError) as exc:
            skipped.append(f"end to end, {label}: failed ({str(exc).splitlines()[0][:150]})")
            continue
        images[label] = (x * 127.5 + 128).clip(0, 255).to(torch.uint8)
        print(f"end to end {label}: {seconds:.1f} s", flush=True)
        results.append([label, batch, seconds])
    reference = images.get("toolkit fp32 (faithful)")
    rows = []
    for label, batch, seconds in results:
        diff = None
        if reference is not None and label != "toolkit fp32 (faithful)":
            d = (images[label].int() - reference.int()).abs().double()
            diff = (float(d.mean()), float(d.max()), float((d > 2).double().mean()))
        rows.append((label, batch, seconds, diff))
    return rows


def _Protocol(official, base):
    """The official network as a denoiser of the toolkit's protocol (its Heun loop reads these members)."""

    class OfficialDenoiser(base):
        def __init__(self):
            super().__init__()
            self.net = official
            self.img_channels, self.img_resolution = official.img_channels, official.img_resolution
            self.label_dim, self.sigma_min, self.sigma_max = official.label_dim, official.sigma_min, official.sigma_max

        def forward(self, x, sigma, class_labels=None, **kwargs):
            return self.net(x, sigma.to(x.device).reshape(-1), class_labels)

    return OfficialDenoiser()


def report(args, device, peak, flops, rows, e2e, skipped, official_note, compile_mode) -> list[str]:
    command = "python tools/bench_gpu.py " + " ".join(sys.argv[1:]) if sys.argv[1:] else "python tools/bench_gpu.py"
    lines = ["## GPU inference throughput (`tools/bench_gpu.py`)", "",
             f"Command: `{command}`  ", f"Device: {describe_device(device)}"
             + (f"; bf16 matmul peak measured {peak:.0f} TFLOP/s." if peak else ".")]
    if args.tiny:
        lines.append("Tiny networks (a smoke test of the tool, not a measurement of the published architectures).")
    if official_note:
        lines.append(f"Official EDM columns left out: {official_note}.")
    elif device.type != "cuda":
        lines.append("On a CPU, EDM's use_fp16 runs in fp32 (EDM casts to fp16 on CUDA only).")
    lines += ["", "One evaluation D(x; sigma) of EDMPrecond around the architecture (random weights, identical in every "
              "variant). images/s = batch / seconds per evaluation, best of "
              f"{args.reps} interleaved repetitions of {args.calls} calls after a warm-up call (which compiles); "
              f"TFLOP/s from the FLOPs of one evaluation; vs official = images/s over `{REFERENCE}` at the same batch; "
              "rel. error = ||D - D_fp32|| / ||D_fp32|| (toolkit fp32 path, 64 rows) at sigma = 1.", "",
              "| network | variant | batch | ms per eval | images/s | TFLOP/s | % of peak | vs official fp16 | rel. error |",
              "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    best = {(r.network, r.label, r.batch): min(r.times) for r in rows if r.times}
    for r in rows:
        if not r.times:
            continue
        seconds = best[(r.network, r.label, r.batch)]
        ips = r.batch / seconds
        tflops = ips * flops[r.network] / 1e12
        base = best.get((r.network, REFERENCE, r.batch))
        ratio = f"{base / seconds:.2f}x" if base else ""
        err = f"{r.error:.1e}" if r.error is not None else ""
        pct = f"{100 * tflops / peak:.0f}%" if peak else ""
        lines.append(f"| {r.network} | {r.label} | {r.batch} | {1e3 * seconds:.2f} | {ips:,.0f} | {tflops:.1f} | {pct} "
                     f"| {ratio} | {err} |")
    lines += ["", "GFLOP per image per evaluation: " + ", ".join(f"{n} {f / 1e9:.3g}" for n, f in flops.items()) + "."]
    if e2e:
        lines += ["", f"End to end: Heun, {args.steps} steps = {2 * args.steps - 1} NFE, EDM's discretization, batch "
                  f"{e2e[0][1]}; images compared "
                  "with the toolkit's fp32 path in 8-bit levels (mean |diff|, max |diff|, share of pixels off by more "
                  "than 2 levels).", "",
                  "| run | batch | seconds | images/s | 50,000 images (min) | mean / max diff | > 2 levels |",
                  "|---|---:|---:|---:|---:|---:|---:|"]
        for label, batch, seconds, diff in e2e:
            ips = batch / seconds
            d = (f"{diff[0]:.3f} / {diff[1]:.0f}", f"{100 * diff[2]:.3f}%") if diff else ("", "")
            lines.append(f"| {label} | {batch} | {seconds:.2f} | {ips:,.1f} | {50000 / ips / 60:.2f} | {d[0]} | {d[1]} |")
    lines += goals(rows, best, flops, peak, e2e)
    if skipped:
        lines += ["", "Skipped: " + "; ".join(skipped) + "."]
    return lines


def goals(rows, best, flops, peak, e2e) -> list[str]:
    """The figures issue 13 sets goals for, each against its goal (only those this run measured)."""
    checks = []
    for network in NETWORKS:
        for batch in sorted({r.batch for r in rows if r.network == network}):
            fp32 = best.get((network, "fp32 (faithful)", batch))
            official = best.get((network, REFERENCE, batch))
            for label in EAGER:
                seconds = best.get((network, label, batch))
                if seconds is None or label == "fp32 (faithful)":
                    continue
                if fp32:
                    checks.append((f"{network}, batch {batch}: eager {label} speed / fp32", fp32 / seconds, ">= 1"))
                if official and label.startswith("fp16"):
                    checks.append((f"{network}, batch {batch}: eager {label} speed / {REFERENCE}", official / seconds,
                                   ">= 1"))
            for r in rows:
                if r.network == network and r.batch == batch and r.compiled and r.times and official:
                    seconds = best[(network, r.label, batch)]
                    goal = ">= 2.5 (batch 1024)" if network.startswith("DDPM") else ">= 1.5"
                    checks.append((f"{network}, batch {batch}: {r.label} speed / {REFERENCE}", official / seconds, goal))
                    if peak:
                        share = batch / seconds * flops[network] / 1e12 / peak
                        checks.append((f"{network}, batch {batch}: {r.label}, share of the bf16 peak", share,
                                       ">= 0.6 (DDPM++, batch 1024)"))
    for label, batch, seconds, _ in e2e:
        goal = "(the reference)" if label.startswith("official") else "(faithful)" if "fp32" in label else "<= 2.5"
        checks.append((f"end to end, {label}, batch {batch}: minutes for 50,000 images",
                       50000 / (batch / seconds) / 60, goal + " (35 NFE, batch 1024)"))
    if not checks:
        return []
    lines = ["", "Against the goals of issue 13:", "", "| figure | measured | goal |", "|---|---:|---|"]
    lines += [f"| {what} | {value:.2f} | {goal} |" for what, value, goal in checks]
    return lines


if __name__ == "__main__":
    main()
