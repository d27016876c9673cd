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
