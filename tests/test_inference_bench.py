"""tools/bench_gpu.py: runs on a CPU with tiny networks (the smoke test its docstring documents), writes its table
to the markdown file it is given, and refuses cleanly what it cannot do.

Set EDM_TOOLKIT_EDM_REF to a checkout of NVlabs/edm to include the official network's columns.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

TOOL = Path(__file__).resolve().parents[1] / "tools" / "bench_gpu.py"


def bench(*args, timeout=900):
    return subprocess.run([sys.executable, str(TOOL), *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "OMP_NUM_THREADS": "1"})


def test_tiny_run_on_cpu_writes_its_table(tmp_path):
    doc = tmp_path / "benchmarks.md"
    doc.write_text("# Benchmarks\n\n<!-- BEGIN other -->\nkept\n<!-- END other -->\n")
    edm_ref = os.environ.get("EDM_TOOLKIT_EDM_REF")
    extra = ["--edm-ref", edm_ref] if edm_ref else []
    done = bench("--device", "cpu", "--tiny", "--no-compile", "--reps", "1", "--steps", "2", "--doc", doc, *extra)
    assert done.returncode == 0, done.stderr[-3000:]
    text = doc.read_text()
    assert "kept" in text and "<!-- BEGIN gpu -->" in text and "<!-- END gpu -->" in text
    section = text[text.index("<!-- BEGIN gpu -->"):]
    assert "Command: `python tools/bench_gpu.py --device cpu --tiny" in section and "Device: cpu" in section
    rows = [line for line in section.splitlines() if line.startswith(("| DDPM++ 32x32 |", "| ADM 64x64 |"))]
    variants = 4 + (2 if edm_ref else 0)
    assert len(rows) == 2 * variants
    for row in rows:
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert float(cells[3]) > 0 and float(cells[4].replace(",", "")) > 0  # ms per evaluation, images/s
        if cells[1] != "fp32 (faithful)":
            bound = {"fp16": 5e-3, "bf16": 3e-2}.get(cells[1][:4], 1e-5)  # tests/test_inference.py's tolerances
            assert float(cells[8]) < bound, row
    e2e = [line for line in section.splitlines() if line.startswith("| toolkit") or line.startswith("| official")]
    assert len(e2e) == 2 + (1 if edm_ref else 0) and "3 NFE" in section
    goals = section[section.index("Against the goals of issue 13"):]
    assert "eager bf16 + channels_last speed / fp32" in goals and "minutes for 50,000 images" in goals


def test_refuses_a_full_size_run_on_a_cpu():
    done = bench("--device", "cpu", "--no-write")
    assert done.returncode == 2 and done.stderr.strip().startswith("Error:") and "--tiny" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_fails_cleanly_without_a_gpu():
    done = bench("--no-write")
    assert done.returncode == 2 and done.stderr.strip() == (
        "Error: no CUDA device here: run on a machine with a GPU, or smoke-test with --device cpu --tiny")


def test_refuses_a_directory_that_is_not_an_edm_checkout(tmp_path):
    done = bench("--device", "cpu", "--tiny", "--no-write", "--edm-ref", tmp_path)
    assert done.returncode == 2 and "not a checkout of NVlabs/edm" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1
