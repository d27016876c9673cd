"""`edm dataset` on the command line: EDM's dataset_tool.py options, progress and summary on stderr, one-line
errors; and the examples of docs/datasets.md, run as written."""

from __future__ import annotations

import contextlib
import io
import os
import re
import shlex
from pathlib import Path

import numpy as np
from click.testing import CliRunner
from PIL import Image

from edm_toolkit.cli import main
from edm_toolkit.training.dataset import ImageDataset

DOCS = Path(__file__).resolve().parents[1] / "docs" / "datasets.md"


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def one_error_line(result, pattern):
    assert result.exit_code != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) >= 1 and lines[-1].startswith("Error: ") and re.search(pattern, lines[-1]), result.stderr
    assert "Traceback" not in result.stderr


def test_convert_with_progress_and_summary(tmp_path):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(12, 16, 16, 3), dtype=np.uint8)
    np.savez(tmp_path / "a.npz", images=images, labels=np.arange(12) % 3)
    result = run("dataset", "--source", tmp_path / "a.npz", "--dest", tmp_path / "out.zip", "--resolution", "8,8",
                 "--max-images", 10)
    assert result.exit_code == 0, result.stderr
    assert "10/10 images" in result.stderr
    assert "Wrote 10 images (8x8 RGB, 3 classes)" in result.stderr
    ds = ImageDataset(tmp_path / "out.zip")
    assert (len(ds), ds.resolution, ds.label_dim) == (10, 8, 3)
    expected = np.asarray(Image.fromarray(images[9]).resize((8, 8), Image.LANCZOS))
    np.testing.assert_array_equal(ds[9][0], expected.transpose(2, 0, 1))


def test_center_crop_and_skip_bad_summary(tmp_path):
    src = tmp_path / "photos"
    src.mkdir()
    rng = np.random.default_rng(1)
    for i in range(3):
        Image.fromarray(rng.integers(0, 256, size=(24, 40), dtype=np.uint8)).save(src / f"{i}.png")
    (src / "3.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 20)
    result = run("dataset", "--source", src, "--dest", tmp_path / "out", "--transform", "center-crop",
                 "--resolution", "16x16", "--skip-bad")
    assert result.exit_code == 0, result.stderr
    assert "Wrote 3 images (16x16 RGB, no labels)" in result.stderr  # center-crop makes RGB, as in EDM
    assert re.search(r"Skipped 1 bad images \(--skip-bad\); the first: .*3.png is not an image of a supported format", result.stderr)


def test_one_line_errors(tmp_path):
    one_error_line(run("dataset", "--source", tmp_path / "missing", "--dest", tmp_path / "o.zip"),
                   r"--source '.*missing' does not exist; give an image folder")
    np.savez(tmp_path / "a.npz", images=np.zeros((2, 8, 8), np.uint8))
    one_error_line(run("dataset", "--source", tmp_path / "a.npz", "--dest", tmp_path / "o.zip", "--transform",
                       "center-crop"), r"--transform center-crop needs --resolution WxH")
    one_error_line(run("dataset", "--source", tmp_path / "a.npz", "--dest", tmp_path / "o.zip", "--resolution",
                       "32"), r"--resolution '32' is not WxH")
    one_error_line(run("dataset", "--source", tmp_path / "a.npz", "--dest", tmp_path / "o.zip", "--resolution",
                       "24x24"), r"a.npz:images\[0\] comes out 24x24; the size must be a power of two")
    one_error_line(run("dataset", "--source", tmp_path / "a.npz", "--dest", ""), "--dest must not be empty")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.npz"]  # nothing half-written


def test_help_lists_every_option_with_help_text():
    result = run("dataset", "--help")
    assert result.exit_code == 0
    for option in ("--source", "--dest", "--max-images", "--transform", "--resolution", "--skip-bad"):
        assert option in result.output
    command = main.get_command(None, "dataset")
    assert all(p.help for p in command.params)


def test_docs_examples_run_as_written(tmp_path, monkeypatch):
    """docs/datasets.md: the ```python example prints what its comment says; each `edm dataset` line of the
    ```sh example succeeds and writes a dataset the reader opens."""
    text = DOCS.read_text()
    python = re.search(r"```python\n(.*?)```", text, re.S).group(1)
    shell = re.search(r"```sh\n(.*?)```", text, re.S).group(1)
    monkeypatch.chdir(tmp_path)
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        exec(compile(python, str(DOCS), "exec"), {})
    expected = re.search(r"print\(.*\)\s*# (.*)", python).group(1)
    assert printed.getvalue().strip() == expected.strip()
    lines = [line for line in shell.splitlines() if line.startswith("edm dataset")]
    assert lines
    for line in lines:
        args = shlex.split(line)[1:]
        result = run(*args)
        assert result.exit_code == 0, (line, result.stderr)
        dest = args[args.index("--dest") + 1]
        assert len(ImageDataset(dest)) > 0 and os.path.exists(dest)
