"""edm train / edm phema on the command line: EDM's run directory, snapshots that edm generate reads, the
design-space options, and one-line errors that leave nothing half-written."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from edm_toolkit.loading import load_model
from edm_toolkit.cli import main
from edm_toolkit.training.state import load_state

from test_training import TINY_ARGS, make_dataset

pytestmark = pytest.mark.usefixtures("one_thread")

STAT_NAMES = {"Loss/loss", "Progress/tick", "Progress/kimg", "Timing/total_sec", "Timing/sec_per_tick",
              "Timing/sec_per_kimg", "Timing/maintenance_sec", "Resources/cpu_mem_gb", "Resources/peak_gpu_mem_gb",
              "Resources/peak_gpu_mem_reserved_gb", "timestamp"}


def edm(*args):
    return CliRunner().invoke(main, list(map(str, args)), catch_exceptions=False)


def short_run(data, outdir, *extra, steps=3, batch=4):
    """A few steps of the tiny network, one tick per step, a snapshot and state at every tick."""
    return edm("train", "--outdir", outdir, "--data", data, *TINY_ARGS, "--batch", batch,
               "--duration", f"{steps * batch / 1e6:.6f}", "--tick", batch / 1000, "--snap", 1, "--dump", 1,
               "--seed", 1, "--workers", 0, "--dropout", 0, "--lr-rampup", 0.004, *extra)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("datasets") / "discs", num_classes=3)


def test_dry_run_prints_options_and_network_and_writes_nothing(data, tmp_path):
    result = edm("train", "--outdir", tmp_path / "runs", "--data", data, "--cond", "1", *TINY_ARGS, "--batch", 8, "-n")
    assert result.exit_code == 0, result.output
    out = result.stdout
    assert "Training options:" in out and '"batch": 8' in out and '"lr": 0.001' in out
    assert "Class-conditional:       True (label_dim 3" in out and "Preconditioning, loss:   edm, edm" in out
    assert "Module" in out and "Parameters" in out and "Output shape" in out and "model.map_label" in out
    assert "[1, 1, 8, 8]" in out  # the output shape of the network on one 8x8 image
    assert out.rstrip().endswith("Dry run; exiting.")
    assert not (tmp_path / "runs").exists()


def test_run_directory_is_edms_and_snapshots_generate(data, tmp_path):
    result = short_run(data, tmp_path / "runs", "--cond", "1", "--grid-seeds", "0-3")
    assert result.exit_code == 0, result.output
    run = tmp_path / "runs" / "00000-discs-cond-song_unet-edm-gpus1-batch4-fp32"
    names = sorted(p.name for p in run.iterdir())
    assert names == ["grid-000000.png", "log.txt", "network-snapshot-000000.pt", "stats.jsonl",
                     "training-state-000000.pt", "training_options.json"]
    stats = [json.loads(line) for line in (run / "stats.jsonl").read_text().splitlines()]
    assert [s["Progress/kimg"]["mean"] for s in stats] == [0.004, 0.008, 0.012]
    assert all(set(s) == STAT_NAMES for s in stats) and stats[0]["Loss/loss"]["num"] == 4 * 64
    assert stats[0]["Resources/cpu_mem_gb"]["mean"] > 0.05  # psutil's resident memory
    log = (run / "log.txt").read_text()
    for field in ("tick 2 ", "kimg 0.012", "loss ", "sec/kimg ", "ETA ", "cpumem "):
        assert field in log
    options = json.loads((run / "training_options.json").read_text())
    assert options["batch"] == 4 and options["seed"] == 1 and options["backbone"]["type"] == "song_unet"
    assert options["loss_params"] == {"name": "edm", "P_mean": -1.2, "P_std": 1.2, "sigma_data": 0.5}
    assert np.asarray(Image.open(run / "grid-000000.png")).shape == (16, 16)  # 2x2 tiles of 8x8, grayscale

    # The snapshot is the EMA in the toolkit's model format: edm generate reads it.
    state = load_state(run / "training-state-000000.pt")
    snapshot = load_model(run / "network-snapshot-000000.pt")
    assert all(torch.equal(snapshot.state_dict()[k], v) for k, v in state["ema"]["ema"].items())
    generated = edm("generate", "--network", run / "network-snapshot-000000.pt", "--outdir", tmp_path / "images",
                    "--seeds", "0-1", "--steps", 4, "--class", 2)
    assert generated.exit_code == 0, generated.output
    assert np.asarray(Image.open(tmp_path / "images" / "000001.png")).shape == (8, 8)

    # The next run gets the next id; --transfer starts from the snapshot.
    again = short_run(data, tmp_path / "runs", "--cond", "1", "--transfer", run / "network-snapshot-000000.pt",
                      "--desc", "ft", steps=1)
    assert again.exit_code == 0, again.output
    assert (tmp_path / "runs" / "00001-discs-cond-song_unet-edm-gpus1-batch4-fp32-ft").is_dir()


def test_loss_is_independent_of_the_preconditioner(data, tmp_path):
    result = short_run(data, tmp_path, "--precond", "vp", "--loss", "edm", "--nosubdir", steps=1)
    assert result.exit_code == 0, result.output
    assert "Preconditioning, loss:   vp, edm" in result.stdout
    options = json.loads((tmp_path / "training_options.json").read_text())
    assert options["precond_params"] == {} and options["loss_params"]["name"] == "edm"
    assert load_model(tmp_path / "network-snapshot-000000.pt").config()["name"] == "vp"

    preset = short_run(data, tmp_path / "preset", "--preset", "ve", "--nosubdir", steps=1)
    assert preset.exit_code == 0 and "Preconditioning, loss:   ve, ve" in preset.stdout
    assert json.loads((tmp_path / "preset" / "training_options.json").read_text())["loss_params"]["sigma_max"] == 100.0


@pytest.mark.parametrize("precond", ["vp", "ve", "iddpm", "edm"])
def test_every_preconditioner_trains_with_its_loss(data, tmp_path, precond):
    result = short_run(data, tmp_path, "--precond", precond, "--nosubdir", steps=2)
    assert result.exit_code == 0, result.output
    assert f"Preconditioning, loss:   {precond}, {precond}" in result.stdout
    losses = [json.loads(l)["Loss/loss"]["mean"] for l in (tmp_path / "stats.jsonl").read_text().splitlines()]
    assert len(losses) == 2 and all(np.isfinite(losses))
    assert load_model(tmp_path / "network-snapshot-000000.pt").config()["name"] == precond


def test_bf16_runs_on_the_cpu(data, tmp_path):
    result = short_run(data, tmp_path, "--precision", "bf16", steps=2)
    assert result.exit_code == 0, result.output
    run = next(tmp_path.iterdir())
    assert run.name.endswith("-batch4-bf16")
    losses = [json.loads(l)["Loss/loss"]["mean"] for l in (run / "stats.jsonl").read_text().splitlines()]
    assert all(np.isfinite(losses))


def test_resume_auto_without_a_previous_run_starts_and_a_finished_run_stays_finished(data, tmp_path):
    first = short_run(data, tmp_path, "--resume", "auto", steps=2)
    assert first.exit_code == 0 and "Resuming" not in first.stdout
    second = short_run(data, tmp_path, "--resume", "auto", steps=2)
    assert second.exit_code == 0 and "Training is complete" in second.stdout
    assert len(list(tmp_path.iterdir())) == 1  # continued in the same run directory
    longer = short_run(data, tmp_path, "--resume", "auto", steps=3)
    assert longer.exit_code == 0 and "Resuming at 0.008 kimg (tick 2)" in longer.stdout
    stats = next(tmp_path.iterdir()) / "stats.jsonl"
    assert [json.loads(l)["Progress/tick"]["mean"] for l in stats.read_text().splitlines()] == [0, 1, 2]


@pytest.mark.skipif(not Path(__file__).resolve().parents[1].joinpath("edm_toolkit/training/augment.py").exists(),
                    reason="the augmentation module is not in this tree yet")
def test_augmentation_conditions_the_network(data, tmp_path):
    result = short_run(data, tmp_path, "--augment", "0.5", "--nosubdir", steps=1)
    assert result.exit_code == 0, result.output
    assert load_model(tmp_path / "network-snapshot-000000.pt").model.init_kwargs["augment_dim"] == 9


# --- bad input: one line, nothing written --------------------------------------------------------------------


def fails_cleanly(result, *fragments):
    assert result.exit_code != 0
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.stderr
    assert "Traceback" not in result.output
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


def test_bad_datasets(tmp_path, data):
    out = tmp_path / "runs"
    fails_cleanly(short_run(tmp_path / "missing", out), "not found")
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "readme.txt").write_text("no images here")
    fails_cleanly(short_run(tmp_path / "notes", out), "no image files")
    (tmp_path / "broken.zip").write_bytes(b"PK\x03\x04 this is not a zip")
    fails_cleanly(short_run(tmp_path / "broken.zip", out))
    unlabelled = make_dataset(tmp_path / "unlabelled")
    fails_cleanly(short_run(unlabelled, out, "--cond", "1"), "--cond 1 needs class labels")
    assert not out.exists()


@pytest.mark.parametrize("option,value,fragment", [
    ("--arch", "unet9000", "'--arch'"), ("--precond", "rectified", "'--precond'"), ("--loss", "l1", "'--loss'"),
    ("--batch-gpu", "3", "not divisible by processes x --batch-gpu"), ("--cond-drop", "0.1", "--cond-drop needs"),
    ("--phema", "0.3", "sigma_rel"), ("--cres", "1,2,3,4,5,6", "does not run on 1x8x8 images"),
    ("--net-opt", "warp_drive=1", "backbone has no such argument"), ("--precision", "fp16", "CUDA only"),
    ("--device", "tpu9", "unknown --device"),
])
def test_bad_options(data, tmp_path, option, value, fragment):
    fails_cleanly(short_run(data, tmp_path / "runs", option, value), fragment)
    assert not (tmp_path / "runs").exists()


def test_nosubdir_refuses_to_mix_two_runs(data, tmp_path):
    assert short_run(data, tmp_path, "--nosubdir", steps=1).exit_code == 0
    before = sorted(p.name for p in tmp_path.iterdir())
    fails_cleanly(short_run(data, tmp_path, "--nosubdir", steps=1), "already holds a training run", "--resume auto")
    assert sorted(p.name for p in tmp_path.iterdir()) == before


@pytest.mark.slow
def test_compile_trains(data, tmp_path):
    result = short_run(data, tmp_path, "--compile", "--nosubdir", steps=2)
    assert result.exit_code == 0, result.output
    assert "fp32 compiled" in result.stdout


def test_unwritable_outdir(data, tmp_path):
    (tmp_path / "file").write_text("a file, not a directory")
    fails_cleanly(short_run(data, tmp_path / "file" / "runs"), "cannot write to --outdir")


def test_bad_resume_states(data, tmp_path):
    out = tmp_path / "runs"
    assert short_run(data, tmp_path / "good", "--nosubdir", steps=2).exit_code == 0
    state = tmp_path / "good" / "training-state-000000.pt"
    truncated = tmp_path / "truncated" / "training-state-000000.pt"
    truncated.parent.mkdir()
    truncated.write_bytes(state.read_bytes()[: state.stat().st_size // 2])
    fails_cleanly(short_run(data, out, "--resume", truncated), "not a readable training state")
    fails_cleanly(short_run(data, out, "--resume", tmp_path / "good" / "network-snapshot-000000.pt"),
                  "not an edm-toolkit training state")
    torch.save({"step": 3, "model": {}}, tmp_path / "foreign.pt")
    fails_cleanly(short_run(data, out, "--resume", tmp_path / "foreign.pt"), "not an edm-toolkit training state")
    fails_cleanly(short_run(data, out, "--resume", state, "--cbase", "32"), "different network")
    fails_cleanly(short_run(data, out, "--resume", state, "--seed", "5"), "differs from the resumed run's seed")
    fails_cleanly(short_run(data, out, "--resume", tmp_path / "nowhere"), "no such file or directory")
    fails_cleanly(short_run(data, out, "--resume", tmp_path / "truncated" / "..", "--nosubdir"), "no training-state")
    assert not out.exists()


def _doc_block(heading: str, language: str) -> str:
    text = (Path(__file__).resolve().parents[1] / "docs" / "training.md").read_text()
    section = text[text.index(heading):]
    start = section.index(f"```{language}\n") + len(f"```{language}\n")
    return section[start:section.index("```", start)]


def test_docs_quickstart_runs(tmp_path, monkeypatch):
    """The quickstart of docs/training.md, shortened: fewer seeds and steps, 96 training images instead of 10k."""
    import shlex

    shorter = {"--seeds 0-63": "--seeds 0-7", "--steps 18": "--steps 4", "--duration 0.01": "--duration 0.000096",
               "network-snapshot-000010.pt": "network-snapshot-000000.pt", "--seeds 0-15": "--seeds 0-3"}
    monkeypatch.chdir(tmp_path)
    commands = [line.split("#")[0].strip() for line in _doc_block("## Quickstart", "bash").splitlines()]
    assert len(commands) == 4
    for command in commands:
        for old, new in shorter.items():
            command = command.replace(old, new)
        args = shlex.split(command)
        assert args[0] == "edm"
        result = edm(*args[1:])
        assert result.exit_code == 0, (command, result.output)
    assert (tmp_path / "samples" / "grid.png").is_file()
    assert "kimg 0.096" in (tmp_path / "run" / "log.txt").read_text()

    code = _doc_block("## From Python", "python").replace("duration=0.01", "duration=0.000064")
    namespace: dict = {}
    exec(compile(code, "docs/training.md", "exec"), namespace)
    assert (namespace["run_dir"] / "network-snapshot-000000.pt").is_file()


def test_cres_takes_edms_int_list_syntax():
    """train.py reads --cres with parse_int_list: '1-3' is 1,2,3; the list stays bounded."""
    import click

    from edm_toolkit.cli.types import MAX_LIST, Count, NumberList

    cres = NumberList(Count(min=1))
    assert cres.convert("1,2-4,2", None, None) == (1, 2, 3, 4, 2)
    for bad in (f"1-{MAX_LIST + 1}", "3-1", "0-2"):
        with pytest.raises(click.BadParameter):
            cres.convert(bad, None, None)
