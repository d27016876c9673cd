"""Measures what `edm generate`'s determinism guarantee holds: the same PNGs across batch sizes, process counts
and thread counts? Prints a Markdown table (the one in docs/cli.md) and writes it to docs/determinism.md.

    python tools/measure_determinism.py [--fixtures ../shared/fixtures] [--seeds 0-15] [--steps 8]

Networks: the built-in model (the ideal denoiser, float64 arithmetic) and a small EDM SongUNet (DDPM++, float32
convolutions, weights of the reference fixture edm_precond_vp), both with churn (S_churn 30), so that the per-seed
noise streams matter. Every configuration is a separate process; threads are set with OMP_NUM_THREADS (as torchrun
does, which sets 1 unless told otherwise). Each run is compared with the reference run (1 process, 1 thread,
batch = all seeds): the number of differing pixels (of all channels) and the largest difference in uint8 levels.
The float64 samples of the single-process runs are compared too (torch.equal), through the Python API: with the
reference, and with the 1-thread run of the same batch size (the effect of the thread count alone).
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image

REPO = Path(__file__).resolve().parents[1]


def songunet_file(fixtures: Path, path: Path) -> Path:
    """The reference SongUNet (DDPM++) under EDM's VP preconditioning, as a toolkit model file."""
    import json

    from edm_toolkit.checkpoints import save_model
    from edm_toolkit.networks.song_unet import SongUNet
    from edm_toolkit.precond import build_precond

    meta = json.loads((fixtures / "edm_precond_vp.json").read_text())
    state_dict = torch.load(fixtures / "edm_precond_vp.pt", weights_only=True)["state_dict"]
    kwargs = dict(meta["constructor_kwargs"])
    precond = {k: kwargs.pop(k) for k in ("beta_d", "beta_min", "M", "epsilon_t")}
    geometry = {k: kwargs[k] for k in ("img_resolution", "img_channels", "label_dim")}
    kwargs.pop("use_fp16"), kwargs.pop("model_type")
    backbone = SongUNet(img_resolution=geometry["img_resolution"], in_channels=geometry["img_channels"],
                        out_channels=geometry["img_channels"], label_dim=geometry["label_dim"],
                        **{k: v for k, v in kwargs.items() if k not in geometry})
    net = build_precond({"name": "vp", **precond}, backbone).eval()
    net.load_state_dict(state_dict, strict=True)
    save_model(net, path)
    return path


def run_cli(outdir: Path, network: Path | None, seeds: str, steps: int, batch: int, threads: int, procs: int) -> None:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    env.pop("WORLD_SIZE", None)
    args = ["generate", "--outdir", str(outdir), "--seeds", seeds, "--steps", str(steps), "--batch", str(batch),
            "--S_churn", "30", "--S_min", "0.05", "--S_max", "50", "--device", "cpu"]
    if network is not None:
        args += ["--network", str(network)]
    if procs == 1:
        cmd = [sys.executable, "-m", "edm_toolkit", *args]
    else:
        cmd = [shutil.which("torchrun"), "--standalone", f"--nproc_per_node={procs}", "-m", "edm_toolkit", *args]
    subprocess.run(cmd, check=True, env=env, capture_output=True, timeout=1800)


def api_samples(network: Path | None, seeds: list[int], steps: int, batch: int, threads: int, out: Path) -> None:
    """The float64 samples of the single-process run, through sample_batch, in a process of its own."""
    code = (
        "import sys, torch\n"
        "from edm_toolkit.generate import sample_batch\n"
        "from edm_toolkit.sampling import Churn, Sampler\n"
        "from edm_toolkit.default_model import default_model\n"
        "from edm_toolkit.loading import load_denoiser\n"
        f"net = default_model() if {str(network)!r} == 'None' else load_denoiser({str(network)!r})\n"
        f"seeds, batch = {seeds!r}, {batch}\n"
        f"sampler = Sampler(num_steps={steps}, churn=Churn(30.0, 0.05, 50.0))\n"
        "parts = [sample_batch(net, sampler, seeds[i:i + batch], 'cpu') for i in range(0, len(seeds), batch)]\n"
        f"torch.save(torch.cat(parts), {str(out)!r})\n"
    )
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    subprocess.run([sys.executable, "-c", code], check=True, env=env, timeout=1800)


def compare(x: torch.Tensor, y: torch.Tensor) -> str:
    return "yes" if torch.equal(x, y) else f"no (max {float((x - y).abs().max()):.1e})"


def pixels(outdir: Path, seeds: list[int]) -> np.ndarray:
    return np.stack([np.asarray(Image.open(outdir / f"{s:06d}.png")).astype(np.int16) for s in seeds])


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--fixtures", type=Path, default=REPO.parent / "shared" / "fixtures")
    parser.add_argument("--seeds", default="0-15")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "determinism.md")
    args = parser.parse_args()
    lo, hi = (int(v) for v in args.seeds.split("-"))
    seeds = list(range(lo, hi + 1))
    configs = [(1, 1, len(seeds))] + [(procs, threads, batch) for procs in (1, 2) for threads in (1, 2)
                                      for batch in (1, 3, len(seeds)) if (procs, threads, batch) != (1, 1, len(seeds))]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        networks = {"built-in (ideal denoiser, float64)": None,
                    "SongUNet DDPM++ (float32 conv)": songunet_file(args.fixtures, tmp / "songunet.pt")}
        for label, network in networks.items():
            reference = reference_float = None
            one_thread = {}
            for procs, threads, batch in configs:
                outdir = tmp / f"{len(rows)}"
                run_cli(outdir, network, args.seeds, args.steps, batch, threads, procs)
                images = pixels(outdir, seeds)
                float_equal = same_threads = "-"
                if procs == 1:
                    api_samples(network, seeds, args.steps, batch, threads, tmp / "x.pt")
                    x = torch.load(tmp / "x.pt")
                    reference_float = x if reference_float is None else reference_float
                    one_thread.setdefault(batch, x)
                    float_equal, same_threads = compare(x, reference_float), compare(x, one_thread[batch])
                reference = images if reference is None else reference
                diff = np.abs(images - reference)
                rows.append((label, procs, threads, batch, int((diff > 0).sum()), int(diff.max()), float_equal,
                             same_threads))
                print(rows[-1], flush=True)
    lines = [
        f"Command: `python tools/measure_determinism.py --seeds {args.seeds} --steps {args.steps}`; "
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
        f"Python {platform.python_version()}. {len(seeds)} images of the network's size, S_churn 30; "
        "reference: 1 process, 1 thread, one batch of all seeds.",
        "",
        "| network | processes | threads each | batch | PNG values differing | max diff (levels) | float64 equal to "
        "reference | float64 equal to 1 thread, same batch |",
        "|---|---|---|---|---|---|---|---|",
    ]
    lines += ["| " + " | ".join(str(v) for v in row) + " |" for row in rows]
    text = "\n".join(lines) + "\n"
    args.out.write_text("# Determinism of edm generate (measured)\n\n" + text)
    print(text)


if __name__ == "__main__":
    main()
