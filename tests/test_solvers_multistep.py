"""Multistep solvers and the adaptive reference solver: orders against the exact ODE, honest NFE, options."""

import functools
import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from edm_toolkit.errors import ConfigError
from edm_toolkit.ideal import IdealDenoiser, solve_pf_ode
from edm_toolkit.precond import IDDPMPrecond, VPPrecond
from edm_toolkit.protocol import DenoiserWrapper
from edm_toolkit.sampling import Churn, Sampler
from edm_toolkit.solvers import SOLVERS
from edm_toolkit.solvers.multistep import (dpmpp_weights, exponential_weights, integrate_basis, phi_functions,
                                           step_orders)

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: one thread (conftest)

_gen = torch.Generator().manual_seed(0)
DATA = torch.randn(6, 1, 2, 2, generator=_gen, dtype=torch.float64) * 0.5
LATENTS = torch.randn(3, 1, 2, 2, generator=_gen, dtype=torch.float64)
NET = IdealDenoiser(DATA, width=0.3)  # a smooth Gaussian mixture: every ODE solution is smooth


@functools.lru_cache(maxsize=None)
def _exact(sigma_start: float, sigma_end: float) -> torch.Tensor:
    return solve_pf_ode(NET, LATENTS * sigma_start, sigma_start, sigma_end, rtol=1e-11, atol=1e-11)


def exact(sigma_start: float, sigma_end: float) -> torch.Tensor:
    """x/s at sigma_end on the exact trajectory (shared by every schedule and scaling, EDM Eq. 4); keyed to 10
    digits so that the sigmas a schedule maps back with round-off share one solve."""
    return _exact(float(f"{sigma_start:.10g}"), float(f"{sigma_end:.10g}"))


def error_at_last_nonzero_step(sampler: Sampler, net=NET) -> float:
    """Max error of x/s at sigma_{N-1}, the last noise level before the final step to 0."""
    plan = sampler.plan(net)
    n = sampler.num_steps
    states = {}
    sampler(net, LATENTS, callback=lambda info: states.__setitem__(info.step, (info.x, info.nfe)), plan=plan)
    if hasattr(net, "calls"):
        assert states[n][1] == net.calls  # what the loop reports is what the network saw
    states = {step: x for step, (x, _) in states.items()}
    sigma_start, sigma_end = float(plan.sigma_steps[0]), float(plan.sigma_steps[n - 1])
    s_end = 1 / math.sqrt(1 + sigma_end**2) if sampler.scaling.name == "vp" else 1.0
    return float((states[n - 1] / s_end - exact(sigma_start, sigma_end)).abs().max())


def observed_order(sampler: Sampler, steps) -> float:
    """Least-squares slope of -log2(error) against log2(N) as N doubles."""
    errors = [error_at_last_nonzero_step(sampler.replace(num_steps=n)) for n in steps]
    return -np.polyfit(np.log2(steps), np.log2(errors), 1)[0]


SETTINGS = {
    "edm": dict(discretization="edm"),
    "vp": dict(discretization="edm", schedule="vp", scaling="vp"),
    "ve": dict(discretization="ve", schedule="ve"),
    "logsnr": dict(discretization="logsnr"),
}
# EDM's full VP setting: t uniform down to epsilon_s, so sigma ~ sqrt(t) and the last step in lambda = -log sigma
# shrinks only like log N (3.1 at N = 16, the others ~0.35); the exponential integrators reach their order there only
# for N in the thousands, the sigma-space solvers at once.
VP_FULL = dict(discretization="vp", schedule="vp", scaling="vp")

LOW, HIGH = [16, 32, 64], [32, 64, 128]  # higher orders need more steps to leave the pre-asymptotic range
ORDER_CASES = [  # (solver, global order, N, settings)
    ({"name": "dpmpp", "order": 2}, 2, LOW, list(SETTINGS)),
    # The exact 3M weighting, with full order up to sigma_min (the default 'reference' weighting is second order:
    # test_dpmpp_3m_weightings_measured_orders).
    ({"name": "dpmpp", "order": 3, "third_order": "exact", "lower_order_final": "never"}, 3, HIGH, list(SETTINGS)),
    ({"name": "unipc", "order": 1}, 2, LOW, list(SETTINGS)),  # UniC raises the order by one
    ({"name": "unipc", "order": 2}, 3, LOW, list(SETTINGS)),
    ({"name": "unipc", "order": 2, "variant": "bh1"}, 3, HIGH, list(SETTINGS)),
    # Full order up to sigma_min: UniPC's own rule lowers the last steps at every N, which leaves a first-order
    # last step to sigma_min whose small error shows at high N on the ve grid.
    ({"name": "unipc", "order": 3, "lower_order_final": "never"}, 4, HIGH, list(SETTINGS)),
    ({"name": "ipndm", "order": 4}, 2, LOW, list(SETTINGS)),  # fixed coefficients on non-uniform grids
    ({"name": "lms", "order": 3}, 3, HIGH, list(SETTINGS) + ["vp_full"]),
    ({"name": "lms", "order": 4}, 4, HIGH, list(SETTINGS)),
    ({"name": "deis", "order": 2}, 2, LOW, list(SETTINGS) + ["vp_full"]),
    ({"name": "deis", "order": 3}, 3, HIGH, list(SETTINGS) + ["vp_full"]),
]
BOUNDS = {2: (1.7, 2.7), 3: (2.5, 3.7), 4: (3.4, 4.7)}


@pytest.mark.parametrize("solver,order,steps,setting", [
    pytest.param(solver, order, steps, setting, id=f"{'-'.join(map(str, solver.values()))}-{setting}")
    for solver, order, steps, settings in ORDER_CASES for setting in settings
])
def test_solver_reaches_its_order(solver, order, steps, setting):
    options = VP_FULL if setting == "vp_full" else SETTINGS[setting]
    lo, hi = BOUNDS[order]
    assert lo < observed_order(Sampler(solver=solver, **options), steps) < hi


@pytest.mark.parametrize("order", [2, 3, 4])
def test_ipndm_reaches_its_order_on_a_grid_uniform_in_sigma(order):
    """iPNDM's fixed Adams-Bashforth coefficients assume equal steps: there it has its full order."""
    errors = [error_at_last_nonzero_step(Sampler(
        solver={"name": "ipndm", "order": order}, num_steps=n,
        discretization={"name": "explicit", "sigmas": np.linspace(3.0, 0.3, n).tolist()})) for n in (32, 64, 128)]
    assert order - 0.6 < -np.polyfit(np.log2([32, 64, 128]), np.log2(errors), 1)[0] < order + 0.7


def test_coefficients_match_the_published_formulas():
    h, r = 0.7, 0.6  # step and ratio h_{i-1}/h_i
    # DPM-Solver++(2M), Algorithm 2: (1 - e^-h) ((1 + 1/(2r)) D_i - 1/(2r) D_{i-1}).
    phi = -math.expm1(-h)
    np.testing.assert_allclose(exponential_weights([0.0, -r * h], h, phi), [phi * (1 + 1 / (2 * r)), -phi / (2 * r)])
    # DPM-Solver++(3M), UniP-3, UniC-p: the interpolating polynomial integrated exactly against e^(u - h).
    nodes = [0.0, -0.6 * h, -1.5 * h]
    for poly in ([1.0], [0.5, 2.0], [1.0, -2.0, 3.0]):
        value = np.dot(exponential_weights(nodes, h, phi), np.polynomial.polynomial.polyval(nodes, poly))
        u, w = np.polynomial.legendre.leggauss(40)
        u, w = 0.5 * h * (u + 1), 0.5 * h * w
        assert value == pytest.approx(np.sum(w * np.exp(u - h) * np.polynomial.polynomial.polyval(u, poly)), rel=1e-13)
    # DPM-Solver++(2M) is also UniPC-bh2's two-node rule, and the exact 3M weighting the exact integral above.
    for nodes in ([0.0, -r * h], [0.0, -0.6 * h, -1.5 * h]):
        np.testing.assert_allclose(dpmpp_weights(nodes, h, third_order="exact"), exponential_weights(nodes, h, phi),
                                   rtol=1e-13)
    # Adams-Bashforth (iPNDM) coefficients.
    np.testing.assert_allclose(integrate_basis([0, -1, -2, -3], 0, 1), np.array([55, -59, 37, -9]) / 24, rtol=1e-13)
    np.testing.assert_allclose(integrate_basis([0, -1, -2], 0, 1), np.array([23, -16, 5]) / 12, rtol=1e-13)


def test_lower_order_warm_up_and_final_steps():
    assert step_orders([0] * 6, 3) == [1, 2, 3, 3, 3, 3]
    # DPM-Solver's rule below 10 steps to sigma_min (the final step to 0 is the solver's own business).
    assert step_orders([0] * 6, 3, final_below=10)[:-1] == [1, 2, 3, 2, 1]
    assert step_orders([0] * 20, 3, final_below=10)[-3:] == [3, 3, 3]
    assert step_orders([0, 0, 2, 2, 2], 3) == [1, 2, 1, 2, 3]  # churn at step 2 restarts the warm-up


SOLVER_SPECS = [
    "dpmpp", {"name": "dpmpp", "order": 2, "lower_order_final": "never"}, {"name": "dpmpp", "order": 1},
    "unipc", {"name": "unipc", "order": 2, "variant": "bh1"}, {"name": "unipc", "order": 1},
    "ipndm", {"name": "ipndm", "order": 1}, "lms", {"name": "lms", "order": 2}, "deis", {"name": "deis", "order": 1},
    {"name": "dpmpp_2m", "solver_type": "heun"},
    {"name": "dpmpp_3m", "third_order": "exact", "lower_order_final": "always"},
]
RUN_SETTINGS = {
    "edm": dict(discretization="edm"),
    "vp": dict(discretization="vp", schedule="vp", scaling="vp"),
    "ve": dict(discretization="ve", schedule="ve"),
    "iddpm": dict(discretization="iddpm"),
}


class Counting(DenoiserWrapper):
    """The ideal denoiser behind a preconditioner's sigma range and round_sigma (VP range, iDDPM's grid)."""

    sigma_min = sigma_max = None  # instance values below, in place of the wrapped denoiser's

    def __init__(self, precond=None):
        super().__init__(NET)
        self.calls = 0
        source = NET if precond is None else precond
        self.sigma_min, self.sigma_max, self.round_sigma = source.sigma_min, source.sigma_max, source.round_sigma

    def forward(self, x, sigma, labels=None):
        self.calls += 1
        return self.denoiser(x, sigma, labels)


@pytest.mark.parametrize("setting", list(RUN_SETTINGS))
@pytest.mark.parametrize("precond", [None, VPPrecond(), IDDPMPrecond()], ids=["continuous", "vp_range", "iddpm_grid"])
def test_every_solver_runs_with_honest_evaluation_counts(setting, precond):
    for solver in SOLVER_SPECS:
        for steps, churn in ((2, Churn()), (7, Churn()), (12, Churn(S_churn=30, S_min=0.05, S_max=50))):
            sampler = Sampler(solver=solver, num_steps=steps, churn=churn, **RUN_SETTINGS[setting])
            net, reported = Counting(precond), []
            x = sampler(net, LATENTS, callback=lambda info: reported.append(info.nfe))
            assert bool(torch.isfinite(x).all()), (solver, steps)
            assert net.calls == sampler.nfe == reported[-1] == steps, (solver, steps)


@pytest.mark.parametrize("solver", SOLVER_SPECS[::3])
def test_every_schedule_and_scaling_gives_the_same_trajectory(solver):
    """The solvers work on x/s and sigma, so the schedule and scaling change nothing beyond round-off."""
    outputs = [Sampler(solver=solver, num_steps=9, schedule=schedule, scaling=scaling)(NET, LATENTS)
               for schedule, scaling in (("linear", "none"), ("vp", "vp"), ("ve", "none"))]
    for out in outputs[1:]:
        torch.testing.assert_close(out, outputs[0], rtol=0, atol=1e-9)


def test_repeated_noise_levels_of_a_rounded_grid_are_harmless():
    """Many steps on iDDPM's grid repeat levels (zero-length steps); the solvers skip the repeated points."""
    for solver in ("dpmpp", "unipc", "lms", "ipndm", "deis"):
        sampler = Sampler(solver=solver, num_steps=300)
        net = Counting(IDDPMPrecond())
        plan = sampler.plan(net)
        assert bool((plan.sigma_steps[1:-1] == plan.sigma_steps[:-2]).any())
        x = sampler(net, LATENTS, plan=plan)
        expected = exact(float(plan.sigma_steps[0]), float(plan.sigma_steps[-2]))
        assert float((x - NET(expected, float(plan.sigma_steps[-2]))).abs().max()) < 1e-3, solver


# --- DPM-Solver++: the weights, the two 3M weightings, the names -------------------------------------------------


def published_dpmpp(h: float, r0: float, r1: float, eta: float, solver_type: str, c2: float) -> np.ndarray:
    """[3, 3]: coefficients on (D_i, D_{i-1}, D_{i-2}) of the 1-, 2- and 3-point DPM-Solver++ steps as DPM-Solver's
    multistep updates and k-diffusion's dpmpp_2m_sde/dpmpp_3m_sde write them (phi's of z = (1 + eta) h, closed
    forms; r0, r1 = h_{i-1}/h, h_{i-2}/h; c2 = 1 for their 3M, 2 for the exact one)."""
    z = (1 + eta) * h
    phi_1 = -math.expm1(-z)
    phi_2 = 1 - phi_1 / z
    phi_3 = phi_2 / z - 0.5
    e = np.eye(3)
    d1_0, d1_1 = (e[0] - e[1]) / r0, (e[1] - e[2]) / r1
    d1 = d1_0 + (d1_0 - d1_1) * r0 / (r0 + r1)
    d2 = (d1_0 - d1_1) / (r0 + r1)
    two = phi_1 * e[0] + (0.5 * phi_1 if solver_type == "midpoint" else phi_2) * d1_0
    return np.stack([phi_1 * e[0], two, phi_1 * e[0] + phi_2 * d1 - c2 * phi_3 * d2])


@pytest.mark.parametrize("h", [0.05, 0.7, 3.0])
@pytest.mark.parametrize("eta", [0.0, 0.5])
def test_dpmpp_weights_match_the_published_updates(h, eta):
    r0, r1 = 0.6, 0.9
    nodes = [0.0, -r0 * h, -(r0 + r1) * h]
    for solver_type, third_order, c2 in (("midpoint", "reference", 1.0), ("heun", "exact", 2.0)):
        expected = published_dpmpp(h, r0, r1, eta, solver_type, c2)
        for k in (1, 2, 3):
            got = dpmpp_weights(nodes[:k], h, eta, solver_type, third_order)
            np.testing.assert_allclose(got, expected[k - 1][:k], rtol=1e-11, atol=1e-15)


def test_the_reference_3m_weighting_halves_the_second_difference():
    """For D quadratic in lambda, int_0^z e^(v - z) D(v/(1 + eta)) dv is what the exact weighting returns; the
    reference weighting returns that plus phi_3 D2 (D2 = h^2 D''/2): half the exact weight of D2, a local error of
    h^3 D''/12 as h -> 0 (phi_3 ~ -h/6)."""
    h, eta = 0.8, 0.3
    nodes = np.array([0.0, -0.5 * h, -1.2 * h])
    z = (1 + eta) * h
    v, w = np.polynomial.legendre.leggauss(40)
    v, w = 0.5 * z * (v + 1), 0.5 * z * w
    for quad in (1.0, -2.5):
        poly = [0.3, -1.1, quad]  # D(u) = 0.3 - 1.1 u + quad u^2
        values = np.polynomial.polynomial.polyval(nodes, poly)
        integral = np.sum(w * np.exp(v - z) * np.polynomial.polynomial.polyval(v / (1 + eta), poly))
        exact = np.dot(dpmpp_weights(nodes, h, eta, third_order="exact"), values)
        reference = np.dot(dpmpp_weights(nodes, h, eta, third_order="reference"), values)
        assert exact == pytest.approx(integral, rel=1e-13)
        assert reference - exact == pytest.approx(phi_functions(z)[2] * h**2 * quad, rel=1e-10)


def test_phi_functions_agree_with_their_closed_forms():
    for z in (1e-3, 0.3, 0.999, 1.0, 1.5, 20.0):
        phi_1 = -math.expm1(-z)
        phi_2 = 1 - phi_1 / z
        np.testing.assert_allclose(phi_functions(z), (phi_1, phi_2, phi_2 / z - 0.5), rtol=1e-9)
    phi_1, phi_2, phi_3 = phi_functions(1e-9)  # series: no cancellation for tiny steps
    assert (phi_1, phi_2, phi_3) == pytest.approx((1e-9, 0.5e-9, -1e-9 / 6), rel=1e-8)


@pytest.mark.parametrize("setting", ["ve", "logsnr"])
def test_dpmpp_3m_weightings_measured_orders(setting):
    """'reference' (phi_3 on D2, as DPM-Solver, k-diffusion and diffusers) is globally second order, 'exact'
    (2 phi_3) third order (N = 32, 64, 128; on the edm grid the reference one is still pre-asymptotic there)."""
    base = Sampler(solver="dpmpp_3m", **SETTINGS[setting])
    assert 1.8 < observed_order(base, HIGH) < 2.2
    assert 2.8 < observed_order(base.replace(solver={"name": "dpmpp_3m", "third_order": "exact"}), HIGH) < 3.2


def test_dpmpp_names_are_dpmpp_of_that_order():
    for spec, same in (
        ({"name": "dpmpp_2m", "solver_type": "heun"}, {"name": "dpmpp", "order": 2, "solver_type": "heun"}),
        ("dpmpp_3m", "dpmpp"),
        ({"name": "dpmpp_3m", "third_order": "exact"}, {"name": "dpmpp", "order": 3, "third_order": "exact"}),
    ):
        a = Sampler(solver=spec, num_steps=9)(NET, LATENTS)
        assert torch.equal(a, Sampler(solver=same, num_steps=9)(NET, LATENTS)), spec
    assert SOLVERS.create("dpmpp_2m").order == 2 and SOLVERS.create("dpmpp_3m").order == 3


# --- Lower-order final steps ---------------------------------------------------------------------------------


def planned_orders(spec, num_steps: int) -> list[int]:
    """The order of each step from its coefficients: the number of history points it combines."""
    return [len(step.record.predictor.weights) for step in Sampler(solver=spec, num_steps=num_steps).plan(NET).steps]


@pytest.mark.parametrize("spec,num_steps,expected", [
    # DPM-Solver's rule: with fewer than 10 steps to sigma_min, step_order = min(order, steps + 1 - step).
    ("dpmpp_3m", 10, [1, 2, 3, 3, 3, 3, 3, 2, 1, 1]),
    ("dpmpp_3m", 11, [1, 2, 3, 3, 3, 3, 3, 3, 3, 3, 1]),
    ({"name": "dpmpp_3m", "lower_order_final": "always"}, 11, [1, 2, 3, 3, 3, 3, 3, 3, 2, 1, 1]),
    ({"name": "dpmpp_3m", "lower_order_final": "never"}, 8, [1, 2, 3, 3, 3, 3, 3, 1]),
    ("dpmpp_2m", 6, [1, 2, 2, 2, 1, 1]),
    ({"name": "dpmpp", "order": 2}, 12, [1] + [2] * 10 + [1]),
    # UniPC's rule: at every N.
    ("unipc", 20, [1, 2] + [3] * 15 + [2, 1, 1]),
    ({"name": "unipc", "lower_order_final": "never"}, 20, [1, 2] + [3] * 17 + [1]),
    # k-diffusion's dpmpp_3m_sde: warm-up only.
    ("dpmpp_3m_sde", 8, [1, 2, 3, 3, 3, 3, 3, 1]),
    ({"name": "dpmpp_3m_sde", "lower_order_final": "always"}, 8, [1, 2, 3, 3, 3, 2, 1, 1]),
])
def test_lower_order_final_picks_the_order_of_each_step(spec, num_steps, expected):
    assert planned_orders(spec, num_steps) == expected  # the last entry is the final step to 0 (returns D)


def test_dpmpp_reference_rule_switches_at_ten_steps():
    """'reference' is 'always' up to N = 10 (9 steps to sigma_min) and 'never' from N = 11."""
    def run(rule, n):
        return Sampler(solver={"name": "dpmpp_3m", "lower_order_final": rule}, num_steps=n)(NET, LATENTS)
    assert torch.equal(run("reference", 10), run("always", 10)) and not torch.equal(run("never", 10), run("always", 10))
    assert torch.equal(run("reference", 11), run("never", 11)) and not torch.equal(run("never", 11), run("always", 11))


def test_error_no_longer_jumps_at_the_old_threshold():
    """The old fixed rule lowered the final orders below 15 steps to sigma_min only, so unipc bh2-2 was more accurate
    with 15 steps than with 16; every rule now applies the same way at both (sigma in [0.05, 5], edm grid)."""
    def error(spec, rule, n):
        return error_at_last_nonzero_step(Sampler(solver={**spec, "lower_order_final": rule}, num_steps=n,
                                                  sigma_min=0.05, sigma_max=5.0))
    unipc = {"name": "unipc", "variant": "bh2", "order": 2}
    assert error(unipc, "never", 16) > 1.3 * error(unipc, "always", 15)  # the old behaviour: a jump up
    for spec in (unipc, {"name": "dpmpp_2m"}, {"name": "dpmpp_3m"}):
        for rule in ("reference", "always", "never"):
            assert error(spec, rule, 16) < 0.95 * error(spec, rule, 15), (spec, rule)


def test_docs_example_runs():
    """The Python example of docs/solvers.md (it asserts the eta = 0 equality itself)."""
    text = (Path(__file__).resolve().parent.parent / "docs" / "solvers.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, re.S)
    assert blocks
    for block in blocks:
        exec(compile(block, "docs/solvers.md", "exec"), {})


def test_edm_solvers_lists_each_rule():
    from click.testing import CliRunner

    from edm_toolkit.cli.solvers import solvers

    result = CliRunner().invoke(solvers, [])
    assert result.exit_code == 0, result.output
    rows = {line.split()[0]: line for line in result.output.splitlines() if line.strip()}
    for name in ("dpmpp", "dpmpp_2m", "dpmpp_3m"):
        assert "lower_order_final='reference' [N <= 10 (DPM-Solver)]" in rows[name]
    assert "lower_order_final='reference' [always (UniPC)]" in rows["unipc"]
    for name in ("dpmpp_2m_sde", "dpmpp_3m_sde"):
        assert "lower_order_final='reference' [never (k-diffusion)]" in rows[name]
    assert "third_order='reference'" in rows["dpmpp_3m"] and "lower_order_final" not in rows["lms"]


@pytest.mark.parametrize("tol", [1e-5, 1e-8])
@pytest.mark.parametrize("setting", ["edm", "vp", "ve"])
def test_adaptive_solver_meets_its_tolerance(tol, setting):
    options = VP_FULL if setting == "vp" else SETTINGS[setting]
    sampler = Sampler(solver={"name": "adaptive", "rtol": tol, "atol": tol}, num_steps=4, **options)
    net = Counting()
    assert error_at_last_nonzero_step(sampler, net) < 10 * tol
    assert net.calls >= sampler.nfe == 6 * 3 + 1
    assert net.calls < (400 if tol > 1e-6 else 1000)


@pytest.mark.parametrize("precond", [None, IDDPMPrecond()], ids=["continuous", "iddpm_grid"])
def test_adaptive_solver_runs_everywhere_and_counts_every_evaluation(precond):
    for setting in RUN_SETTINGS.values():
        for churn in (Churn(), Churn(S_churn=30, S_min=0.05, S_max=50), Churn(S_churn=30, S_noise=0.0)):
            sampler = Sampler(solver={"name": "adaptive", "rtol": 1e-4, "atol": 1e-4}, num_steps=5, churn=churn,
                              **setting)
            net, reported = Counting(precond), []
            x = sampler(net, LATENTS, callback=lambda info: reported.append(info.nfe))
            assert bool(torch.isfinite(x).all())
            assert net.calls == reported[-1] >= sampler.nfe


def test_adaptive_solver_guards_its_budget():
    with pytest.raises(RuntimeError, match="max_evaluations"):
        solver = {"name": "adaptive", "rtol": 1e-10, "atol": 1e-10, "max_evaluations": 50}
        Sampler(solver=solver, num_steps=3)(NET, LATENTS)


@pytest.mark.parametrize("spec,match", [
    ({"name": "dpmpp", "order": 4}, "dpmpp order must be an integer from 1 to 3"),
    ({"name": "dpmpp", "order": 0}, "dpmpp order"),
    ({"name": "dpmpp", "lower_order_final": "sometimes"},
     "dpmpp lower_order_final must be 'reference', 'always' or 'never', got 'sometimes'"),
    ({"name": "dpmpp", "lower_order_final": True}, "lower_order_final' must be a string"),
    ({"name": "dpmpp_3m", "third_order": "half"}, "dpmpp_3m third_order must be 'reference' or 'exact'"),
    ({"name": "dpmpp_3m", "solver_type": "rk4"}, "dpmpp_3m solver_type must be 'midpoint' or 'heun'"),
    ({"name": "dpmpp_2m", "third_order": "exact"}, "unknown option 'third_order'"),
    ({"name": "dpmpp_2m", "order": 3}, "unknown option 'order'"),
    ({"name": "unipc", "lower_order_final": "below15"}, "unipc lower_order_final must be"),
    ({"name": "unipc", "order": 4}, "unipc order"),
    ({"name": "unipc", "variant": "bh3"}, "unipc variant must be 'bh1' or 'bh2'"),
    ({"name": "ipndm", "order": 5}, "ipndm order must be an integer from 1 to 4"),
    ({"name": "lms", "order": 2.5}, "must be an integer"),
    ({"name": "deis", "order": 4}, "deis order must be an integer from 1 to 3"),
    ({"name": "deis", "polynomial": "rho"}, "unknown option 'polynomial'"),
    ({"name": "adaptive", "rtol": 0}, "adaptive rtol must be a finite number > 0"),
    ({"name": "adaptive", "atol": -1e-6}, "adaptive atol"),
    ({"name": "adaptive", "max_evaluations": 3}, "max_evaluations must be an integer >= 7"),
])
def test_bad_options_raise_config_errors(spec, match):
    with pytest.raises(ConfigError, match=match):
        SOLVERS.create(spec)


def test_registered_names():
    assert {"dpmpp", "dpmpp_2m", "dpmpp_3m", "unipc", "ipndm", "lms", "deis", "adaptive"} <= set(SOLVERS.names())
