"""Presets: the Table 1 columns as data, strict validation, mix and match."""

import math

import pytest

from edm_toolkit.errors import ConfigError
from edm_toolkit.presets import builtin_presets, load_preset, preset_from_dict

try:
    import tomllib
except ModuleNotFoundError:
    import tomli as tomllib


def test_builtin_presets_hold_the_published_defaults():
    assert builtin_presets() == ["edm", "iddpm", "ve", "vp"]
    edm, vp, ve, iddpm = (load_preset(n) for n in ("edm", "vp", "ve", "iddpm"))
    s = edm.sampling
    assert (s.solver.name, s.discretization.name, s.schedule.name, s.scaling.name) == ("heun", "edm", "linear", "none")
    assert (s.num_steps, s.discretization.rho, s.nfe) == (18, 7.0, 35)
    assert edm.preconditioning.params["sigma_data"] == 0.5
    assert (edm.training.P_mean, edm.training.P_std, edm.training.sigma_data) == (-1.2, 1.2, 0.5)
    s = vp.sampling
    assert (s.solver.name, s.discretization.name, s.schedule.name, s.scaling.name) == ("euler", "vp", "vp", "vp")
    assert s.discretization.epsilon_s == 1e-3
    assert vp.preconditioning.params == {"beta_d": 19.9, "beta_min": 0.1, "M": 1000, "epsilon_t": 1e-5}
    assert (vp.training.beta_d, vp.training.beta_min, vp.training.epsilon_t) == (19.9, 0.1, 1e-5)
    s = ve.sampling
    assert (s.solver.name, s.discretization.name, s.schedule.name, s.scaling.name) == ("euler", "ve", "ve", "none")
    assert (ve.training.sigma_min, ve.training.sigma_max) == (0.02, 100.0)
    s = iddpm.sampling
    assert (s.solver.name, s.discretization.name, s.schedule.name) == ("euler", "iddpm", "linear")
    assert (s.discretization.C_1, s.discretization.C_2, s.discretization.M) == (0.001, 0.008, 1000)
    assert iddpm.preconditioning.build().sigma_max == pytest.approx(20291.17, rel=1e-6)


@pytest.mark.parametrize("name", ["edm", "vp", "ve", "iddpm"])
def test_round_trip_through_toml(name, tmp_path):
    preset = load_preset(name)
    path = tmp_path / f"{name}.toml"
    path.write_text(preset.to_toml())
    assert load_preset(path) == preset
    assert preset_from_dict(tomllib.loads(preset.to_toml())) == preset


def test_mix_and_match():
    vp, edm = load_preset("vp"), load_preset("edm")
    mixed = vp.replace(sampling=edm.sampling)  # the EDM sampler over a VP-trained network
    assert mixed.sampling == edm.sampling and mixed.preconditioning == vp.preconditioning
    tweaked = edm.replace(solver="euler", num_steps=35, S_churn=40.0)
    assert (tweaked.sampling.solver.name, tweaked.sampling.num_steps, tweaked.sampling.churn.S_churn) == ("euler", 35, 40.0)
    assert tweaked.sampling.churn.S_max == math.inf
    with pytest.raises(ConfigError, match="unknown preset option 'steps'; valid options: .*num_steps"):
        edm.replace(steps=10)


@pytest.mark.parametrize("text,match", [
    ('[sampling]\nnum_stepz = 3', "unknown key 'num_stepz' in \\[sampling\\]; valid keys: solver, discretization"),
    ('[sampling]\nsolver = "rk9"', "unknown solver 'rk9'; choose one of: euler, heun"),
    ('[sampling]\ndiscretization = { name = "edm", rho = "x" }', "discretization 'edm' option 'rho' must be a number"),
    ('[sampling]\nnum_steps = 1', "num_steps must be an integer >= 2"),
    ('[sampling]\nchurn = { S_churn = -1.0 }', "S_churn must be >= 0"),
    ('[sampling]\nchurn = { S_chrn = 1.0 }', "unknown option 'S_chrn' for \\[sampling.churn\\]"),
    ('[preconditioning]\nname = "edn"', "unknown preconditioner 'edn'; choose one of: vp, ve, iddpm, edm"),
    ('[preconditioning]\nname = "edm"\nsigma_dta = 0.5', "bad option for preconditioner 'edm'"),
    ('[training]\nname = "edm"\nP_mean = true', "must be a number"),
    ('colour = "blue"', "unknown key 'colour' in preset"),
    ('[sampling', "is not valid TOML"),
])
def test_validation_names_the_bad_key(text, match, tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=match) as info:
        load_preset(path)
    assert str(path) in str(info.value) and "\n" not in str(info.value)


def test_unknown_preset_lists_the_builtin_ones():
    with pytest.raises(ConfigError, match="unknown preset 'edn'; built-in presets: edm, iddpm, ve, vp"):
        load_preset("edn")
    with pytest.raises(ConfigError, match="not found"):
        load_preset("missing.toml")


# Issue 10, item 2: preset names are names; item 4: bounded reading.

@pytest.mark.parametrize("name", ["edm", "vp", "ve", "iddpm"])
def test_builtin_names_win_over_entries_of_the_current_directory(name, tmp_path, monkeypatch):
    """A folder or a file named like a built-in preset changes nothing; ./NAME or NAME.toml is the file."""
    monkeypatch.chdir(tmp_path)
    builtin = load_preset(name)
    (tmp_path / name).mkdir()
    assert load_preset(name) == builtin
    (tmp_path / name).rmdir()
    (tmp_path / name).write_text('[sampling]\nnum_steps = 2\nsolver = "euler"\n')
    assert load_preset(name) == builtin
    assert load_preset(f"./{name}").sampling.num_steps == 2  # a path separator makes it a path
    assert load_preset(tmp_path / name).sampling.num_steps == 2  # so does a Path


def test_a_name_is_a_path_only_with_toml_or_a_separator(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "mine").write_text("[sampling]\nnum_steps = 3\n")
    with pytest.raises(ConfigError, match="unknown preset 'mine'.*a path ending in .toml"):
        load_preset("mine")
    with pytest.raises(ConfigError, match="preset file 'mine.toml' not found"):
        load_preset("mine.toml")
    (tmp_path / "dir.toml").mkdir()
    with pytest.raises(ConfigError, match="is a directory"):
        load_preset("dir.toml")


def test_cli_ignores_look_alike_entries(tmp_path, monkeypatch):
    from click.testing import CliRunner

    from edm_toolkit.cli import main

    monkeypatch.chdir(tmp_path)
    (tmp_path / "edm").mkdir()
    (tmp_path / "vp").write_text('[sampling]\nnum_steps = 2\nsolver = "euler"\n')
    listing = CliRunner().invoke(main, ["presets"])
    assert listing.exit_code == 0 and listing.output.split()[0] == "edm", listing.stderr
    shown = CliRunner().invoke(main, ["presets", "show", "vp"])
    assert shown.exit_code == 0 and "num_steps = 18" in shown.output
    result = CliRunner().invoke(main, ["generate", "--outdir", "out", "--seeds", "0", "--steps", "2"])
    assert result.exit_code == 0 and "heun/edm" in result.stderr, result.stderr


@pytest.mark.parametrize("content,match", [
    (b"\xff\xfe[sampling]\n", "is not UTF-8 text"),
    (b"a = " + b"[" * 100_000 + b"]" * 100_000, "nests lists or tables deeper than 16 levels"),
    (b"a = " + b"[" * 17 + b"]" * 17, "nests lists or tables deeper than 16 levels"),
    (b"[sampling]\nnum_steps = " + b"9" * 5000, "an integer of thousands of digits"),
    (b"[sampling]\nnum_steps = " + b"9" * 4000, "num_steps is out of range: an integer of 4000 digits"),
    (b"[sampling]\nnum_steps = 1e14", "num_steps must be an integer >= 2 and at most 100000"),
    (b"[sampling]\nnum_steps = 100000000000000", "num_steps must be an integer >= 2 and at most 100000"),
    (b"[sampling]\nsigma_max = inf", r"\[sampling\] sigma_max must be a finite number, got inf"),
    (b"[sampling]\nsigma_min = nan", r"\[sampling\] sigma_min must be a finite number, got nan"),
    (b'[sampling]\ndiscretization = { name = "edm", rho = 1e-300 }', "no usable noise levels"),
    (b'[sampling]\ndiscretization = { name = "iddpm", M = 1000000000 }', "M must be an integer >= 2 and at most"),
    (b'[sampling]\nsolver = { name = "restart", intervals = [[3, 1e15, 0.06, 0.3]] }', "at most 1,000,000"),
    (b'[sampling]\nsolver = { name = "heun", alpha = inf }', "alpha must lie in"),
    (b'[preconditioning]\nname = "iddpm"\nM = inf', "option 'M' must be a finite number"),
    (b'[preconditioning]\nname = "edm"\nsigma_data = "x"', "option 'sigma_data' must be a number"),
    (b"x" * (1 << 20 | 1), "larger than 1024 KiB"),
], ids=lambda v: v[:40].decode("utf-8", "replace") if isinstance(v, bytes) else None)
def test_hostile_preset_files_are_config_errors(content, match, tmp_path):
    path = tmp_path / "bad.toml"
    path.write_bytes(content)
    with pytest.raises(ConfigError, match=match) as info:
        load_preset(path)
    assert "\n" not in str(info.value) and len(str(info.value)) < 400


def test_a_fifo_is_not_read(tmp_path):
    """Reading a FIFO would block forever: it is refused by its type, before opening."""
    import os

    fifo = tmp_path / "pipe.toml"
    os.mkfifo(fifo)
    with pytest.raises(ConfigError, match="is not a regular file"):
        load_preset(fifo)


def test_read_toml_is_the_one_bounded_reader():
    from edm_toolkit.presets import TOMLSyntaxError, read_toml

    assert read_toml('a = [1, [2, [3]]]\n[b]\nc = "d"') == {"a": [1, [2, [3]]], "b": {"c": "d"}}
    with pytest.raises(TOMLSyntaxError):
        read_toml("a = ")
    with pytest.raises(ConfigError, match="not UTF-8"):
        read_toml("a = '\udcff'")
