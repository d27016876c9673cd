"""What `edm generate` writes (issue 10, items 5, 6 and 8): atomic PNGs with the umask's permissions, SIGTERM as
SIGINT, stale temporary files removed, --skip-existing, no all-black PNGs from non-finite samples, and nothing in
the way of an output. Every subprocess runs under a timeout."""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys
import time

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from edm_toolkit import generate as generate_module
from edm_toolkit.checkpoints import save_model
from edm_toolkit.cli import main
from edm_toolkit.default_model import ideal_dataset, ideal_model
from edm_toolkit.errors import EDMToolkitError
from edm_toolkit.generate import generate_images
from edm_toolkit.ideal import IdealDenoiser
from edm_toolkit.io.images import save_png
from edm_toolkit.io.outputs import remove_stale_temp_files, temp_name, write_atomically
from edm_toolkit.sampling import Sampler

FAST = ["--steps", "2"]


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def one_error_line(result_or_stderr) -> str:
    stderr = getattr(result_or_stderr, "stderr", result_or_stderr)
    lines = stderr.strip().splitlines()
    errors = [line for line in lines if line.startswith("Error: ")]
    assert len(errors) == 1 and lines[-1] == errors[0] and "Traceback" not in stderr, stderr
    return errors[0]


def env_one_thread():
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("WORLD_SIZE", None)
    return env


@pytest.fixture
def umask():
    """Sets a umask for the test and restores the previous one."""
    previous = os.umask(0o022)
    os.umask(previous)

    def set_mask(mask):
        os.umask(mask)

    yield set_mask
    os.umask(previous)


# Item 5: permissions, signals, stale temporary files, resuming.

@pytest.mark.parametrize("mask,mode", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_pngs_get_the_permissions_the_umask_gives(tmp_path, umask, mask, mode, one_thread):
    """As open(path, 'w') would: 0666 less the umask (EDM writes 0644 under the usual umask 022)."""
    umask(mask)
    result = run("generate", "--network", "ideal", "--outdir", tmp_path / "out", "--seeds", "0-1", "--grid", *FAST)
    assert result.exit_code == 0, result.stderr
    for name in ("000000.png", "000001.png", "grid.png"):
        assert stat.S_IMODE((tmp_path / "out" / name).stat().st_mode) == mode
    with open(tmp_path / "reference", "w"):
        pass
    assert stat.S_IMODE((tmp_path / "reference").stat().st_mode) == mode  # the same as a plain open()


def test_sigterm_stops_like_ctrl_c_and_leaves_only_whole_pngs(tmp_path):
    """SIGTERM mid-run: exit 128 + 15 with one Error line, no temporary file left, every PNG complete."""
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-m", "edm_toolkit", "generate", "--network", "ideal", "--outdir", str(out), "--seeds", "0-4999",
                             "--batch", "1", "--steps", "2"], stderr=subprocess.PIPE, text=True, env=env_one_thread())
    try:
        deadline = time.monotonic() + 120
        while not (out.is_dir() and any(p.suffix == ".png" for p in out.iterdir())):
            assert proc.poll() is None and time.monotonic() < deadline, "no PNG appeared"
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 128 + signal.SIGTERM
    assert one_error_line(stderr) == "Error: terminated by signal 15"
    names = [p.name for p in out.iterdir()]
    assert names and all(n.endswith(".png") and not n.startswith(".") for n in names)
    assert len(names) < 5000
    for path in out.iterdir():
        Image.open(path).load()  # a whole PNG (a truncated one raises)


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait(timeout=60)
    return child.pid


def temp_of(pid: int, path):
    """The temporary name process ``pid`` of this host would write ``path`` to."""
    return path.with_name(temp_name(path).name.replace(f".{os.getpid()}.", f".{pid}."))


def test_the_next_run_removes_temporary_files_of_killed_runs(tmp_path, one_thread):
    out = tmp_path / "out"
    out.mkdir()
    # A run killed (SIGKILL) while its temporary file was open: nothing of it could clean up.
    script = ("import pathlib, sys, time\n"
              "from edm_toolkit.io.outputs import temp_name\n"
              "tmp = temp_name(pathlib.Path(sys.argv[1]) / '000003.png')\n"
              "tmp.write_bytes(b'partial png')\n"
              "print(tmp, flush=True)\n"
              "time.sleep(300)\n")
    killed = subprocess.Popen([sys.executable, "-c", script, str(out)], stdout=subprocess.PIPE, text=True)
    try:
        stale = out / os.path.basename(killed.stdout.readline().strip())
    finally:
        killed.kill()
        killed.wait(timeout=60)
    assert stale.is_file()
    live = temp_of(os.getppid(), out / "000004.png")  # a live process (this one's parent) is still writing it
    live.write_bytes(b"being written")
    other_host = out / ".000005.png.0123abcd.12345.89abcdef.tmp"  # another host's: cannot be checked from here
    other_host.write_bytes(b"x")
    unrelated = out / ".notes.tmp"
    unrelated.write_bytes(b"mine")
    result = run("generate", "--network", "ideal", "--outdir", out, "--seeds", "0-1", *FAST)
    assert result.exit_code == 0, result.stderr
    assert not stale.exists()
    assert live.exists() and other_host.exists() and unrelated.exists()
    assert sorted(p.name for p in out.glob("*.png")) == ["000000.png", "000001.png"]


def test_remove_stale_temp_files_keeps_live_processes_files(tmp_path):
    dead, alive = temp_of(_dead_pid(), tmp_path / "a.png"), temp_of(os.getppid(), tmp_path / "b.png")
    dead.write_bytes(b"")
    alive.write_bytes(b"")
    assert remove_stale_temp_files(tmp_path) == [dead]
    assert list(tmp_path.iterdir()) == [alive]
    assert remove_stale_temp_files(tmp_path / "missing") == []


def test_write_atomically_leaves_nothing_on_failure(tmp_path):
    def broken(f):
        f.write(b"\x89PNG partial")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        write_atomically(tmp_path / "x.png", broken)
    assert list(tmp_path.iterdir()) == []
    save_png(np.zeros((2, 2, 1), np.uint8), tmp_path / "sub" / "y.png")  # makes the parent directory
    assert Image.open(tmp_path / "sub" / "y.png").size == (2, 2)


def test_skip_existing_continues_where_a_run_stopped(tmp_path, one_thread):
    out = tmp_path / "out"
    assert run("generate", "--network", "ideal", "--outdir", out, "--seeds", "0-3", *FAST).exit_code == 0
    reference = {p.name: p.read_bytes() for p in out.iterdir()}
    (out / "000002.png").unlink()  # as if the run had stopped before seed 2
    kept = (out / "000001.png").stat().st_mtime_ns
    time.sleep(0.01)
    result = run("generate", "--network", "ideal", "--outdir", out, "--seeds", "0-3", "--skip-existing", *FAST)
    assert result.exit_code == 0, result.stderr
    assert "Skipping 3 seeds whose PNG exists" in result.stderr and "1/1 images" in result.stderr
    assert {p.name: p.read_bytes() for p in out.iterdir()} == reference  # the same bytes as the full run
    assert (out / "000001.png").stat().st_mtime_ns == kept  # not rewritten
    # An empty file is no finished image: it is redone.
    (out / "000003.png").write_bytes(b"")
    assert run("generate", "--network", "ideal", "--outdir", out, "--seeds", "0-3", "--skip-existing", *FAST).exit_code == 0
    assert (out / "000003.png").read_bytes() == reference["000003.png"]


# Item 6: no silent garbage.

def test_a_network_with_nan_weights_stops_naming_the_first_seed(tmp_path, one_thread):
    images, labels, classes = ideal_dataset()
    images[5] = float("nan")
    path = tmp_path / "nan.pt"
    save_model(IdealDenoiser(images, labels, label_dim=len(classes)), path)
    result = run("generate", "--network", path, "--outdir", tmp_path / "out", "--seeds", "3-6", *FAST)
    assert result.exit_code == 1
    assert "the image of seed 3 is not finite (NaN or inf)" in one_error_line(result)
    assert not any((tmp_path / "out").glob("*.png"))


def test_generate_images_names_the_first_non_finite_seed(tmp_path, monkeypatch):
    """Batches [10, 11] and [12, 13]; seed 12 is NaN: the first batch is written, nothing of the second."""
    real = generate_module.sample_batch

    def nan_for_seed_12(net, sampler, seeds, *args, **kwargs):
        images = real(net, sampler, seeds, *args, **kwargs)
        if 12 in seeds:
            images[seeds.index(12), 0, 0, 0] = float("nan")
        return images

    monkeypatch.setattr(generate_module, "sample_batch", nan_for_seed_12)
    with pytest.raises(EDMToolkitError, match="the image of seed 12 is not finite"):
        generate_images(ideal_model(), Sampler(num_steps=2), [10, 11, 12, 13], tmp_path, max_batch_size=2,
                        progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["000010.png", "000011.png"]


@pytest.mark.parametrize("args,message", [
    (["--sigma_max", "inf"], "'--sigma_max': 'inf' is not a finite number"),
    (["--sigma_max", "1e300"], "the edm discretization gives no usable noise levels"),
    (["--sigma_min", "nan"], "'--sigma_min': 'nan' is not a finite number"),
    (["--S_churn", "inf"], "'--S_churn': 'inf' is not a finite number"),
    (["--guidance", "nan"], "'--guidance': 'nan' is not a finite number"),
    (["--preset", "{preset}"], "[sampling] sigma_max must be a finite number, got inf"),
])
def test_non_finite_options_are_refused(tmp_path, args, message):
    preset = tmp_path / "inf.toml"
    preset.write_text("[sampling]\nsigma_max = inf\n")
    args = [a.replace("{preset}", str(preset)) for a in args]
    result = run("generate", "--network", "ideal", "--outdir", tmp_path / "out", "--seeds", "0", *FAST, *args)
    assert result.exit_code in (1, 2) and message in one_error_line(result)
    assert not (tmp_path / "out").exists()


# Item 8: messages name the real problem.

@pytest.mark.parametrize("layout,args,message", [
    ("out/000001.png/", [], "out/000001.png' is a directory in the way of an output image"),
    ("out/grid.png/", ["--grid"], "out/grid.png' is a directory in the way of an output image"),
    ("out/000000", ["--subdirs"], "out/000000' is a file in the way of an output directory"),
    ("out/000000/000002.png/", ["--subdirs"], "out/000000/000002.png' is a directory in the way of an output image"),
    ("out", [], "is a file"),
])
def test_something_in_the_way_is_named_before_any_work(tmp_path, layout, args, message):
    target = tmp_path / layout
    if layout.endswith("/"):
        target.mkdir(parents=True)
    else:
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(b"")
    result = run("generate", "--network", "ideal", "--outdir", tmp_path / "out", "--seeds", "0-2", *FAST, *args)
    assert result.exit_code in (1, 2) and message in one_error_line(result)
    assert "Generating" not in result.stderr  # found before loading and sampling
    assert [p for p in tmp_path.rglob("*") if p.is_file() and p.suffix == ".png"] == []


def test_empty_outdir_and_solver_name_option_are_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert "'--outdir': the directory name is empty" in one_error_line(run("generate", "--network", "ideal", "--outdir", "", *FAST))
    result = run("generate", "--network", "ideal", "--outdir", "out", "--solver-opt", "name=euler", *FAST)
    assert "the solver is chosen with --solver NAME, not --solver-opt name=..." in one_error_line(result)
    result = run("generate", "--network", "ideal", "--outdir", "out", "--solver-opt", "classifier_scale=2", "--solver", "ddim", *FAST)
    assert "set the classifier guidance scale with --classifier-scale" in one_error_line(result)
    assert list(tmp_path.iterdir()) == []


def test_skip_existing_with_subdirs_reads_each_directory(tmp_path, one_thread):
    """Seeds 999 and 1000 live in two subdirectories; a look-alike name (0000999.png) is no seed's PNG."""
    from edm_toolkit.generate import existing_seeds

    out = tmp_path / "out"
    assert run("generate", "--network", "ideal", "--outdir", out, "--seeds", "998-1000", "--subdirs", *FAST).exit_code == 0
    (out / "000000" / "000998.png").unlink()
    (out / "000000" / "0000998.png").write_bytes(b"not seed 998")
    (out / "000999.png").write_bytes(b"seed 999, but not where --subdirs puts it")
    assert existing_seeds(out, [998, 999, 1000], subdirs=True) == {999, 1000}
    result = run("generate", "--network", "ideal", "--outdir", out, "--seeds", "998-1000", "--subdirs", "--skip-existing", *FAST)
    assert result.exit_code == 0 and "Skipping 2 seeds" in result.stderr, result.stderr
    assert (out / "000000" / "000998.png").stat().st_size > 0
