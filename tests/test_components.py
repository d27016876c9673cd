"""Closed forms of EDM Table 1 (FACTS.md section 1): schedules, scalings, discretizations, preconditioners."""

import math

import numpy as np
import pytest
import torch

from edm_toolkit.discretizations import DISCRETIZATIONS, iddpm_sigma_table
from edm_toolkit.errors import ConfigError
from edm_toolkit.precond import PRECONDITIONERS, EDMPrecond, IDDPMPrecond, VEPrecond, VPPrecond, build_precond
from edm_toolkit.schedules import SCALINGS, SCHEDULES, VPSchedule

T = torch.tensor([1e-3, 0.01, 0.1, 0.37, 0.8, 1.0], dtype=torch.float64)


def numeric_derivative(f, t, h=1e-6):
    return (f(t + h) - f(t - h)) / (2 * h)


# --- schedules -----------------------------------------------------------------------------------------------

def test_vp_schedule_closed_form():
    s = VPSchedule(beta_d=19.9, beta_min=0.1)
    expected = np.sqrt(np.exp(0.5 * 19.9 * T.numpy() ** 2 + 0.1 * T.numpy()) - 1)
    np.testing.assert_allclose(s.sigma(T).numpy(), expected, rtol=1e-12)
    # FACTS: the default VP range sigma_vp(1e-3) ~ 0.010486 .. sigma_vp(1) ~ 152.167
    assert float(s.sigma(1e-3)) == pytest.approx(0.010486, rel=1e-4)
    assert float(s.sigma(1.0)) == pytest.approx(152.167, rel=1e-5)


@pytest.mark.parametrize("name", SCHEDULES.names())
def test_schedule_derivative_and_inverse(name):
    schedule = SCHEDULES.create(name)
    torch.testing.assert_close(schedule.sigma_deriv(T), numeric_derivative(schedule.sigma, T), rtol=1e-6, atol=0)
    torch.testing.assert_close(schedule.sigma_inv(schedule.sigma(T)), T, rtol=1e-10, atol=0)
    sigmas = torch.tensor([0.002, 0.1, 1.0, 80.0], dtype=torch.float64)
    torch.testing.assert_close(schedule.sigma(schedule.sigma_inv(sigmas)), sigmas, rtol=1e-12, atol=0)


def test_ve_and_linear_closed_forms():
    ve, linear = SCHEDULES.create("ve"), SCHEDULES.create("linear")
    torch.testing.assert_close(ve.sigma(T), T.sqrt())
    torch.testing.assert_close(ve.sigma_inv(T), T**2)
    torch.testing.assert_close(linear.sigma(T), T)
    torch.testing.assert_close(linear.sigma_deriv(T), torch.ones_like(T))


def test_vp_refit_hits_the_range_and_recovers_defaults():
    lo, hi = DISCRETIZATIONS.create("vp").default_sigma_range
    fit = VPSchedule.fit(lo, hi, 1e-3)
    assert fit.beta_d == pytest.approx(19.9, rel=1e-9) and fit.beta_min == pytest.approx(0.1, rel=1e-7)
    clamped = VPSchedule.fit(0.02, 60.0, 1e-3)
    assert float(clamped.sigma(1e-3)) == pytest.approx(0.02, rel=1e-10)
    assert float(clamped.sigma(1.0)) == pytest.approx(60.0, rel=1e-12)
    # FACTS: beta_d' = 2 (ln(smin^2+1)/eps - ln(smax^2+1))/(eps - 1), beta_min' = ln(smax^2+1) - beta_d'/2
    beta_d = 2 * (math.log(0.02**2 + 1) / 1e-3 - math.log(60.0**2 + 1)) / (1e-3 - 1)
    assert clamped.beta_d == pytest.approx(beta_d, rel=1e-14)
    assert clamped.beta_min == pytest.approx(math.log(60.0**2 + 1) - 0.5 * beta_d, rel=1e-14)


# --- scalings ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("schedule_name", SCHEDULES.names())
@pytest.mark.parametrize("scaling_name", SCALINGS.names())
def test_scaling_and_its_derivative(schedule_name, scaling_name):
    schedule, scaling = SCHEDULES.create(schedule_name), SCALINGS.create(scaling_name)
    s_of_t = lambda t: scaling.s(schedule.sigma(t))
    sigma = schedule.sigma(T)
    expected = 1 / torch.sqrt(1 + sigma**2) if scaling_name == "vp" else torch.ones_like(sigma)
    torch.testing.assert_close(s_of_t(T), expected)
    torch.testing.assert_close(scaling.s_deriv(sigma, schedule.sigma_deriv(T)), numeric_derivative(s_of_t, T),
                               rtol=1e-6, atol=1e-9)


# --- discretizations -----------------------------------------------------------------------------------------

def test_default_sigma_ranges():
    ranges = {n: DISCRETIZATIONS.create(n).default_sigma_range for n in ("edm", "ve", "iddpm", "logsnr")}
    assert ranges == {"edm": (0.002, 80.0), "ve": (0.02, 100.0), "iddpm": (0.002, 81.0), "logsnr": (0.002, 80.0)}


def test_edm_discretization_is_uniform_in_sigma_to_the_one_over_rho():
    sigmas = DISCRETIZATIONS.create({"name": "edm", "rho": 7}).sigma_steps(10, 0.002, 80.0)
    assert float(sigmas[0]) == pytest.approx(80.0, rel=1e-14) and float(sigmas[-1]) == pytest.approx(0.002, rel=1e-12)
    steps = sigmas ** (1 / 7)
    torch.testing.assert_close(steps.diff(), steps.diff()[:1].expand(9), rtol=1e-10, atol=0)


def test_vp_discretization_is_uniform_in_t():
    lo, hi = 0.01, 100.0
    sigmas = DISCRETIZATIONS.create("vp").sigma_steps(8, lo, hi)
    t = VPSchedule.fit(lo, hi, 1e-3).sigma_inv(sigmas)
    torch.testing.assert_close(t, torch.linspace(1, 1e-3, 8, dtype=torch.float64), rtol=1e-10, atol=0)
    assert float(sigmas[0]) == pytest.approx(hi, rel=1e-12) and float(sigmas[-1]) == pytest.approx(lo, rel=1e-9)


@pytest.mark.parametrize("name", ["ve", "logsnr"])
def test_geometric_discretizations(name):
    sigmas = DISCRETIZATIONS.create(name).sigma_steps(7, 0.02, 100.0)
    ratios = sigmas[1:] / sigmas[:-1]
    torch.testing.assert_close(ratios, ratios[:1].expand(6), rtol=1e-12, atol=0)
    assert float(sigmas[0]) == pytest.approx(100.0) and float(sigmas[-1]) == pytest.approx(0.02)


def test_iddpm_table_matches_edm_buffer_and_cosine_schedule(load_fixture):
    u32 = iddpm_sigma_table(dtype=torch.float32)
    assert torch.equal(u32, load_fixture("edm_precond_iddpm").state_dict["u"])  # EDM's own float32 buffer
    # Against guided-diffusion's cosine schedule (T = 1000): beta_i = min(1 - abar((i+1)/T)/abar(i/T), 0.999),
    # alphas_cumprod = prod(1 - beta), sigma_t = sqrt((1 - alphas_cumprod)/alphas_cumprod). EDM's float32
    # alpha_bar ratios leave a relative error below 1e-3 (FACTS: ~3e-13 if done in float64).
    abar = lambda i: np.cos((i / 1000 + 0.008) / 1.008 * np.pi / 2) ** 2
    i = np.arange(1000)
    alphas_cumprod = np.cumprod(1 - np.minimum(1 - abar(i + 1) / abar(i), 0.999))
    sigma_gd = np.sqrt((1 - alphas_cumprod) / alphas_cumprod)  # t = 0..999 <-> u_{999}..u_0
    u = iddpm_sigma_table().numpy()
    np.testing.assert_allclose(u[:-1][::-1], sigma_gd, rtol=1e-3)
    assert float(u[999]) == pytest.approx(0.006425, rel=1e-3) and float(u[0]) == pytest.approx(20291.17, rel=1e-5)


def test_iddpm_discretization_picks_table_entries():
    u = iddpm_sigma_table()
    sigmas = DISCRETIZATIONS.create("iddpm").sigma_steps(12, 0.002, 81.0)
    kept = u[(u >= 0.002) & (u <= 81.0)]
    assert all(bool((kept == s).any()) for s in sigmas)
    assert float(sigmas[0]) == float(kept[0]) and float(sigmas[-1]) == float(kept[-1])


def test_explicit_discretization_validation():
    d = DISCRETIZATIONS.create({"name": "explicit", "sigmas": [10, 1, 0.1]})
    torch.testing.assert_close(d.sigma_steps(3, 0.0, math.inf), torch.tensor([10, 1, 0.1], dtype=torch.float64))
    with pytest.raises(ConfigError, match="num_steps is 4"):
        d.sigma_steps(4, 0.0, math.inf)
    with pytest.raises(ConfigError, match="strictly decreasing"):
        DISCRETIZATIONS.create({"name": "explicit", "sigmas": [1, 10]})
    with pytest.raises(ConfigError, match="outside the supported range"):
        d.sigma_steps(3, 0.5, 80)


def test_registry_errors_name_the_choices():
    with pytest.raises(ConfigError, match="unknown discretization 'edn'; choose one of: edm, vp"):
        DISCRETIZATIONS.create("edn")
    with pytest.raises(ConfigError, match="unknown option 'rhoo' for discretization 'edm'; valid options: rho"):
        DISCRETIZATIONS.create({"name": "edm", "rhoo": 7})
    with pytest.raises(ConfigError, match="must be a number"):
        DISCRETIZATIONS.create({"name": "edm", "rho": "seven"})
    with pytest.raises(ConfigError, match="rho must be > 0"):
        DISCRETIZATIONS.create({"name": "edm", "rho": -1})


# --- preconditioners -----------------------------------------------------------------------------------------

SIGMA = torch.tensor([0.002, 0.05, 0.5, 2.0, 10.0, 80.0])


def test_edm_precond_closed_forms():
    p, sd, s = EDMPrecond(sigma_data=0.5), 0.5, SIGMA.double().numpy()
    np.testing.assert_allclose(p.c_skip(SIGMA).numpy(), sd**2 / (s**2 + sd**2), rtol=1e-6)
    np.testing.assert_allclose(p.c_out(SIGMA).numpy(), s * sd / np.sqrt(s**2 + sd**2), rtol=1e-6)
    np.testing.assert_allclose(p.c_in(SIGMA).numpy(), 1 / np.sqrt(s**2 + sd**2), rtol=1e-6)
    np.testing.assert_allclose(p.c_noise(SIGMA).numpy(), np.log(s) / 4, rtol=1e-6)
    # Unit variance of the training target and the network input (EDM Eqs. 114-117) for y ~ N(0, sd^2):
    np.testing.assert_allclose((p.c_in(SIGMA) ** 2 * (sd**2 + SIGMA**2)).numpy(), 1, rtol=1e-6)
    target_var = (sd**2 * (1 - p.c_skip(SIGMA)) ** 2 + p.c_skip(SIGMA) ** 2 * SIGMA**2) / p.c_out(SIGMA) ** 2
    np.testing.assert_allclose(target_var.numpy(), 1, rtol=1e-5)
    assert (p.sigma_min, p.sigma_max) == (0.0, math.inf)


def test_vp_precond_closed_forms():
    p, s = VPPrecond(), SIGMA.double().numpy()
    np.testing.assert_allclose(p.c_skip(SIGMA).numpy(), 1)
    np.testing.assert_allclose(p.c_out(SIGMA).numpy(), -s, rtol=1e-6)
    np.testing.assert_allclose(p.c_in(SIGMA).numpy(), 1 / np.sqrt(s**2 + 1), rtol=1e-6)
    t_of_sigma = (np.sqrt(0.1**2 + 2 * 19.9 * np.log1p(s**2)) - 0.1) / 19.9
    # In float64 the closed form is exact; in float32 (EDM's arithmetic, checked against the fixture below)
    # log(1 + sigma^2) cancels at small sigma.
    np.testing.assert_allclose(p.c_noise(SIGMA.double()).numpy(), 999 * t_of_sigma, rtol=1e-12)
    assert (p.sigma_min, p.sigma_max) == (0.0009765625, 152.16697692871094)  # float32, as EDM (fixture)


def test_ve_precond_closed_forms():
    p, s = VEPrecond(), SIGMA.double().numpy()
    np.testing.assert_allclose(p.c_out(SIGMA).numpy(), s, rtol=1e-6)
    np.testing.assert_allclose(p.c_in(SIGMA).numpy(), 1)
    np.testing.assert_allclose(p.c_noise(SIGMA).numpy(), np.log(s / 2), rtol=1e-6)
    assert (p.sigma_min, p.sigma_max) == (0.02, 100.0)


def test_iddpm_precond_closed_forms():
    p = IDDPMPrecond()
    u = p.u.double().numpy()
    index = np.abs(SIGMA.double().numpy()[:, None] - u[None]).argmin(1)  # nearest u_j, u_M = 0 included
    np.testing.assert_allclose(p.c_noise(SIGMA).numpy(), 999 - index)
    np.testing.assert_allclose(p.round_sigma(SIGMA).numpy(), u[index].astype(np.float32))
    assert p.c_noise(torch.tensor([0.002])).item() == -1  # rounds to u_M = 0 (EDM pitfall)
    assert p.sigma_min == pytest.approx(0.006422337) and p.sigma_max == pytest.approx(20291.17)


@pytest.mark.parametrize("case", ["vp", "ve", "iddpm", "edm"])
def test_precond_wraps_a_backbone_like_edm(load_fixture, case):
    """With the backbone replaced by a stub that returns the original F(x), the wrapper reproduces the original
    network inputs (c_in x, c_noise) and output D, and the sigma range, of each EDM preconditioner."""
    fx = load_fixture(f"edm_precond_{case}")
    kw = fx.meta["constructor_kwargs"]
    params = {k: kw[k] for k in {"vp": ("beta_d", "beta_min", "M", "epsilon_t"), "ve": ("sigma_min", "sigma_max"),
                                 "iddpm": ("C_1", "C_2", "M"), "edm": ("sigma_min", "sigma_max", "sigma_data")}[case]}
    seen = {}

    class Stub(torch.nn.Module):
        def forward(self, x, noise_labels, class_labels=None, **kwargs):
            seen.update(x=x, noise=noise_labels, labels=class_labels)
            return fx.outputs["model_output"]

    net = build_precond({"name": case, **params}, Stub(), img_resolution=16, img_channels=3, label_dim=kw["label_dim"])
    D = net(fx.inputs["x"], fx.inputs["sigma"], fx.inputs.get("class_labels"))
    torch.testing.assert_close(seen["x"], fx.outputs["model_input"], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(seen["noise"], fx.outputs["model_noise_labels"], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(D, fx.outputs["D"], rtol=1e-6, atol=1e-5)
    assert net.sigma_min == pytest.approx(fx.outputs["sigma_min"], rel=1e-7)
    assert net.sigma_max == pytest.approx(fx.outputs["sigma_max"], rel=1e-7)
    if case == "iddpm":
        torch.testing.assert_close(net.round_sigma(fx.inputs["sigma"]), fx.outputs["round_sigma"])
        assert torch.equal(net.round_sigma(fx.inputs["sigma"], return_index=True), fx.outputs["round_sigma_index"])
    assert sorted(PRECONDITIONERS.names()) == ["edm", "iddpm", "ve", "vp"]
