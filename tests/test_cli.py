"""The `edm` command line: generate (EDM generate.py options), presets, one-line errors, torchrun sharding."""

import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from edm_toolkit.checkpoints import save_model
from edm_toolkit.cli import main
from edm_toolkit.default_model import ideal_model
from edm_toolkit.generate import sample_batch
from edm_toolkit.io.images import save_png, to_uint8
from edm_toolkit.sampling import Churn, Sampler


def run(*args):
    return CliRunner().invoke(main, list(args), catch_exceptions=False)


def read(path):
    return np.asarray(Image.open(path))


def test_generate_writes_pngs_and_grid(tmp_path):
    out = tmp_path / "out"
    result = run("generate", "--network", "ideal", "--outdir", str(out), "--seeds", "0-3", "--batch", "3", "--steps", "6", "--grid")
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in out.iterdir()) == ["000000.png", "000001.png", "000002.png", "000003.png", "grid.png"]
    assert read(out / "grid.png").shape == (64, 64, 3)  # 2x2 tiles of 32x32
    assert "4/4 images" in result.stderr and "11 denoiser calls per image" in result.stderr
    # The PNG is exactly EDM's uint8 conversion of the sampler's output for that seed.
    expected = to_uint8(sample_batch(ideal_model(), Sampler(num_steps=6), [2], "cpu"))[0]
    assert np.array_equal(read(out / "000002.png"), expected)


def test_generate_options_reach_the_sampler(tmp_path):
    out = tmp_path / "out"
    args = ["--seeds", "5", "--steps", "7", "--solver", "euler", "--disc", "vp", "--schedule", "vp", "--scaling", "vp",
            "--S_churn", "10", "--S_min", "0.1", "--S_max", "20", "--S_noise", "1.01", "--sigma_min", "0.02",
            "--sigma_max", "60", "--class", "2"]
    assert run("generate", "--network", "ideal", "--outdir", str(out), *args).exit_code == 0
    sampler = Sampler(solver="euler", discretization="vp", schedule="vp", scaling="vp", num_steps=7,
                      sigma_min=0.02, sigma_max=60.0, churn=Churn(10.0, 0.1, 20.0, 1.01))
    expected = to_uint8(sample_batch(ideal_model(), sampler, [5], "cpu", class_idx=2))[0]
    assert np.array_equal(read(out / "000005.png"), expected)


def test_generate_with_a_preset_and_rho(tmp_path):
    assert run("generate", "--network", "ideal", "--outdir", str(tmp_path), "--seeds", "0", "--preset", "ve", "--steps", "4").exit_code == 0
    assert run("generate", "--network", "ideal", "--outdir", str(tmp_path / "b"), "--seeds", "0", "--rho", "3", "--steps", "4").exit_code == 0


def test_subdirs_layout(tmp_path):
    assert run("generate", "--network", "ideal", "--outdir", str(tmp_path), "--seeds", "999,1000", "--steps", "2", "--subdirs").exit_code == 0
    assert (tmp_path / "000000" / "000999.png").is_file() and (tmp_path / "001000" / "001000.png").is_file()


def test_images_do_not_depend_on_batch_size(tmp_path):
    """Seeds 0-7 (with churn, so the per-seed noise streams matter) are bit-identical for --batch 1, 3 and 8."""
    common = ["--seeds", "0-7", "--steps", "8", "--S_churn", "30", "--S_min", "0.05", "--S_max", "50"]
    images = {}
    for batch in (1, 3, 8):
        out = tmp_path / f"b{batch}"
        assert run("generate", "--network", "ideal", "--outdir", str(out), "--batch", str(batch), *common).exit_code == 0
        images[batch] = [read(out / f"{s:06d}.png") for s in range(8)]
    for batch in (3, 8):
        assert all(np.array_equal(a, b) for a, b in zip(images[1], images[batch]))
    # And the underlying float64 samples too, not only their uint8 rounding.
    sampler = Sampler(num_steps=8, churn=Churn(30.0, 0.05, 50.0))
    whole = sample_batch(ideal_model(), sampler, list(range(8)), "cpu")
    parts = torch.cat([sample_batch(ideal_model(), sampler, list(range(i, min(i + 3, 8))), "cpu") for i in (0, 3, 6)])
    assert torch.equal(whole, parts)


def test_network_from_a_model_file(tmp_path):
    path = tmp_path / "model.pt"
    save_model(ideal_model(), path)
    a, b = tmp_path / "a", tmp_path / "b"
    assert run("generate", "--network", "ideal", "--outdir", str(a), "--seeds", "0-1", "--steps", "3").exit_code == 0
    assert run("generate", "--outdir", str(b), "--seeds", "0-1", "--steps", "3", "--network", str(path)).exit_code == 0
    assert all(np.array_equal(read(a / f"00000{s}.png"), read(b / f"00000{s}.png")) for s in (0, 1))


def test_presets_commands():
    result = run("presets")
    assert result.exit_code == 0 and [line.split()[0] for line in result.output.splitlines()] == ["edm", "iddpm", "ve", "vp"]
    shown = run("presets", "show", "vp")
    assert shown.exit_code == 0 and 'name = "vp"' in shown.output and "[sampling.discretization]" in shown.output


def assert_one_line_error(stderr, message):
    """Exactly one error line, last, naming the problem; informational lines may precede it; no traceback."""
    lines = stderr.strip().splitlines()
    errors = [line for line in lines if line.startswith("Error: ")]
    assert len(errors) == 1 and lines[-1] == errors[0] and message in errors[0], stderr
    assert "Traceback" not in stderr


def _bad_file(tmp_path):
    path = tmp_path / "corrupt.pt"
    path.write_bytes(b"not a checkpoint")
    return str(path)


BAD = [
    (["--steps", "1"], "'--steps': 1 is not in the range 2<=x<=100000"),
    (["--steps", "ten"], "'--steps': 'ten' is not a valid integer"),
    (["--seeds", "a-b"], "'--seeds': 'a-b' is not a seed"),
    (["--seeds", "5-1"], "range '5-1' is empty"),
    (["--batch", "0"], "'--batch': 0 is not in the range x>=1"),
    (["--class", "-1"], "'--class': -1 is not in the range x>=0"),
    (["--class", "7"], "--class 7 is out of range: the network has classes 0..3"),
    (["--sigma_min", "-1"], "'--sigma_min'"),
    (["--sigma_max", "0"], "'--sigma_max'"),
    (["--sigma_min", "10", "--sigma_max", "1"], "sigma_min (10.0) must be below sigma_max (1.0)"),
    (["--rho", "0"], "'--rho'"),
    (["--rho", "5", "--disc", "vp"], "--rho applies to --disc edm only"),
    (["--S_churn", "-1"], "'--S_churn'"),
    (["--S_min", "-1"], "'--S_min'"),
    (["--S_max", "-1"], "'--S_max'"),
    (["--S_noise", "-1"], "'--S_noise'"),
    (["--S_min", "10", "--S_max", "1"], "need 0 <= S_min <= S_max"),
    (["--solver", "rk4"], "'--solver': 'rk4' is not one of 'euler', 'heun'"),
    (["--disc", "edn"], "'--disc': 'edn' is not one of"),
    (["--schedule", "cosine"], "'--schedule': 'cosine' is not one of"),
    (["--scaling", "ve"], "'--scaling': 've' is not one of"),
    (["--preset", "edn"], "unknown preset 'edn'; built-in presets: edm, iddpm, ve, vp"),
    (["--device", "toaster"], "'toaster' is not a torch device"),
    (["--network", "missing.pt"], "model file 'missing.pt' not found"),
    (["--stepz", "3"], "No such option '--stepz'"),
    (["--grid", "yes"], "Got unexpected extra argument (yes)"),
]


@pytest.mark.parametrize("args,message", BAD, ids=[" ".join(a) for a, _ in BAD])
def test_bad_input_gives_one_line_error(tmp_path, args, message):
    result = CliRunner().invoke(main, ["generate", "--network", "ideal", "--outdir", str(tmp_path / "out"), *args])
    assert result.exit_code != 0
    assert_one_line_error(result.stderr, message)
    assert result.exception is None or isinstance(result.exception, SystemExit)
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_more_bad_input(tmp_path):
    cases = [
        (["generate", "--outdir", str(tmp_path), "--network", _bad_file(tmp_path)], "is not a model file of a supported format"),
        (["generate", "--network", "ideal", "--seeds", "0"], "Missing option '--outdir'"),
        (["generate", "--network", "ideal", "--outdir", _bad_file(tmp_path)], "is a file"),
        (["generate", "--network", "ideal", "--outdir", str(tmp_path), "--device", "cuda"] if not torch.cuda.is_available() else
         ["generate", "--network", "ideal", "--outdir", str(tmp_path), "--device", "cuda:99"], "CUDA"),
        (["presets", "show", "edn"], "unknown preset 'edn'"),
        (["frobnicate"], "No such command 'frobnicate'"),
    ]
    for args, message in cases:
        result = CliRunner().invoke(main, args)
        assert result.exit_code != 0, args
        assert_one_line_error(result.stderr, message)


def test_atomic_png_write_leaves_nothing_on_failure(tmp_path, monkeypatch):
    image = np.zeros((4, 4, 3), dtype=np.uint8)

    def broken_save(self, fp, format=None, **kwargs):
        fp.write(b"\x89PNG partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(Image.Image, "save", broken_save)
    with pytest.raises(KeyboardInterrupt):
        save_png(image, tmp_path / "x.png")
    assert list(tmp_path.iterdir()) == []


def _env():
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("WORLD_SIZE", None)
    return env


def test_real_subprocess(tmp_path):
    """The installed entry points, as a user runs them."""
    out = tmp_path / "out"
    cmd = [shutil.which("edm") or sys.executable, *([] if shutil.which("edm") else ["-m", "edm_toolkit"])]
    done = subprocess.run([*cmd, "generate", "--network", "ideal", "--outdir", str(out), "--seeds", "0-1", "--steps", "3"],
                          capture_output=True, text=True, env=_env(), timeout=300)
    assert done.returncode == 0, done.stderr
    assert (out / "000001.png").is_file() and "Done." in done.stderr
    bad = subprocess.run([sys.executable, "-m", "edm_toolkit", "generate", "--network", "ideal", "--outdir", str(out), "--steps", "x"],
                         capture_output=True, text=True, env=_env(), timeout=300)
    assert bad.returncode == 2
    assert_one_line_error(bad.stderr, "'--steps': 'x' is not a valid integer")


def test_torchrun_shards_seeds_with_identical_images(tmp_path):
    """1 versus 2 torchrun processes (gloo on CPU): the same images for seeds 0-7."""
    torchrun = shutil.which("torchrun")
    if torchrun is None:
        pytest.skip("torchrun is not on PATH")
    common = ["generate", "--network", "ideal", "--seeds", "0-7", "--batch", "3", "--steps", "5", "--S_churn", "20", "--device", "cpu"]
    outs = {}
    for procs in (1, 2):
        outs[procs] = tmp_path / f"p{procs}"
        done = subprocess.run(
            [torchrun, "--standalone", f"--nproc_per_node={procs}", "-m", "edm_toolkit", *common, "--outdir", str(outs[procs])],
            capture_output=True, text=True, env=_env(), timeout=300)
        assert done.returncode == 0, done.stderr[-2000:]
    for s in range(8):
        assert np.array_equal(read(outs[1] / f"{s:06d}.png"), read(outs[2] / f"{s:06d}.png"))


# Issue 10, item 4: no traceback from any input; bounds are checked before any work.

def _preset(tmp_path, content: bytes) -> str:
    path = tmp_path / "hostile.toml"
    path.write_bytes(content)
    return str(path)


ITEM_4 = [
    (["--seeds", "0-99999999999999"], "seed '99999999999999' is out of range: seeds lie in 0..4294967295"),
    (["--seeds", "0-4294967295"], "more than 1,000,000 seeds; split the run into several"),
    (["--seeds", "9" * 30], "is out of range: seeds lie in 0..4294967295"),
    (["--steps", "999999999999"], "'--steps': 999999999999 is not in the range 2<=x<=100000"),
    (["--preset", b"[sampling]\nnum_steps = 1e14"], "num_steps must be an integer >= 2 and at most 100000"),
    (["--rho", "1e-300"], "the edm discretization gives no usable noise levels"),
    (["--rho", "1e300"], "the edm discretization gives no usable noise levels"),
    (["--preset", b"\xff\xfe[sampling]"], "is not UTF-8 text"),
    (["--preset", b"a = " + b"[" * 100_000 + b"]" * 100_000], "nests lists or tables deeper than 16 levels"),
    (["--preset", b"[sampling]\nnum_steps = " + b"9" * 5000], "an integer of thousands of digits"),
    (["--solver", "adaptive", "--solver-opt", "max_evaluations=7"],
     "the adaptive solver exceeded max_evaluations=7; raise it or loosen rtol/atol"),  # found while sampling
    (["--solver", "adaptive", "--solver-opt", "max_evaluations=7", "--steps", "3"],
     "adaptive max_evaluations=7 is below the 13 network evaluations 3 steps need at least"),
    (["--solver", "adaptive", "--solver-opt", "rtol=1e-300", "--solver-opt", "atol=1e-300"],
     "adaptive rtol must be at least 2.2e-14"),
    (["--solver", "ddim", "--solver-opt", "foo=1"], "'foo' is not an option of solver 'ddim'"),
    (["--solver", "ddpm", "--solver-opt", "eta=0.5"], "'eta' is not an option of solver 'ddpm'"),
    (["--solver", "heun", "--solver-opt", "respacing=ddim25"], "'respacing' is not an option of solver 'heun'"),
    (["--solver", "ddim", "--solver-opt", "classifier=1"], "'classifier' is not an option of solver 'ddim'"),
    (["--solver", "dpmpp", "--solver-opt", "order=" + "9" * 5000], "an integer of thousands of digits"),
    (["--solver", "dpmpp", "--solver-opt", "order=" + "[" * 50_000], "nests lists or tables deeper than 16"),
    (["--device", "mps"], "MPS (Apple GPU) was requested but is not available"),
    (["--device", "cpu:3"], "there is one cpu device"),
]


@pytest.mark.parametrize("args,message", ITEM_4, ids=[" ".join(str(a)[:30] for a in args) for args, _ in ITEM_4])
def test_item_4_inputs_are_one_line_errors(tmp_path, args, message, one_thread):
    from cli_limits import time_limit

    args = [_preset(tmp_path, a) if isinstance(a, bytes) else a for a in args]
    out = tmp_path / "out"
    steps = [] if "--steps" in args else ["--steps", "2"]
    with time_limit(60):
        result = CliRunner().invoke(main, ["generate", "--network", "ideal", "--outdir", str(out), "--seeds", "0", *steps, *args])
    assert result.exit_code in (1, 2)
    assert_one_line_error(result.stderr, message)
    assert not out.exists()


# Issue 10, item 9: what the determinism guarantee of docs/cli.md states.

@pytest.mark.parametrize("n,batch,procs,same", [(16, 3, 2, True), (16, 8, 2, True), (10, 8, 2, True),
                                                (20, 8, 2, False), (64, 64, 4, False), (9, 2, 3, False)])
def test_torchrun_keeps_the_batches_when_the_counts_agree(n, batch, procs, same):
    """K processes compute the same batches as one process when ceil(n/B) = K ceil(n/(B K)) (docs/cli.md), and
    otherwise in general not: then float32 networks may differ in the last bits."""
    from edm_toolkit.distributed import ProcessGroup, rank_batches

    single = rank_batches(list(range(n)), batch, ProcessGroup())
    ranks = [rank_batches(list(range(n)), batch, ProcessGroup(rank=r, world_size=procs)) for r in range(procs)]
    together = sorted((b for r in ranks for b in r if b), key=lambda b: b[0])
    assert (-(-n // batch) == procs * -(-n // (batch * procs))) == same
    assert (together == single) == same
    assert sorted(s for b in together for s in b) == list(range(n))  # every seed once either way


def test_builtin_model_is_independent_of_batch_and_thread_count():
    """The built-in model's arithmetic is float64 and row by row: bit-identical samples for any batch and thread
    count (measured in docs/determinism.md; float32 convolution networks differ in the last bits)."""
    sampler = Sampler(num_steps=6, churn=Churn(30.0, 0.05, 50.0))
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        whole = sample_batch(ideal_model(), sampler, list(range(6)), "cpu")
        torch.set_num_threads(2)
        parts = torch.cat([sample_batch(ideal_model(), sampler, [s], "cpu") for s in range(6)])
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(whole, parts)


def test_fixed_batches_for_a_compiled_network(tmp_path):
    """With --compile every batch has one shape (the last padded with repeats of its last seed, extra images
    dropped), so the network compiles once; the PNGs are those of plain batches. Compile options without
    --compile are one-line errors."""
    from edm_toolkit.generate import generate_images
    from edm_toolkit.protocol import DenoiserWrapper

    class Shapes(DenoiserWrapper):
        def __init__(self, net):
            super().__init__(net)
            self.batches = set()

        def forward(self, x, sigma, class_labels=None, **kwargs):
            self.batches.add(x.shape[0])
            return self.denoiser(x, sigma, class_labels, **kwargs)

    sampler = Sampler(num_steps=3)
    plain, fixed = Shapes(ideal_model()), Shapes(ideal_model())
    a = generate_images(plain, sampler, range(7), tmp_path / "a", max_batch_size=3, progress=False)
    b = generate_images(fixed, sampler, range(7), tmp_path / "b", max_batch_size=3, progress=False, fixed_batch=True)
    assert plain.batches == {2, 3} and fixed.batches == {3}  # 7 seeds: EDM's split 3, 2, 2
    assert [p.name for p in a] == [p.name for p in b]
    assert all(np.array_equal(np.asarray(Image.open(x)), np.asarray(Image.open(y))) for x, y in zip(a, b))
    for extra in (["--compile-mode", "reduce-overhead"], ["--compile-cache", str(tmp_path / "cache")]):
        result = CliRunner().invoke(main, ["generate", "--network", "ideal", "--outdir", str(tmp_path / "c"), "--seeds", "0", *extra])
        assert result.exit_code == 1 and "also set compile=True (--compile)" in result.stderr.strip().splitlines()[-1]
    assert not (tmp_path / "c").exists() and not (tmp_path / "cache").exists()
