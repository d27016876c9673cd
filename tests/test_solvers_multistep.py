"""Multistep solvers and the adaptive reference solver: orders against the exact ODE, honest NFE, options."""

import functools
import math

import numpy as np
import pytest
import torch

from edm_toolkit.errors import ConfigError
from edm_toolkit.ideal import IdealDenoiser, solve_pf_ode
from edm_toolkit.precond import IDDPMPrecond, VPPrecond
from edm_toolkit.sampling import Churn, Sampler
from edm_toolkit.solvers import SOLVERS
from edm_toolkit.solvers.multistep import exponential_weights, integrate_basis, step_orders

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
    ({"name": "dpmpp", "order": 3}, 3, HIGH, list(SETTINGS)),
    ({"name": "unipc", "order": 1}, 2, LOW, list(SETTINGS)),  # UniC raises the order by one
    ({"name": "unipc", "order": 2}, 3, LOW, list(SETTINGS)),
    ({"name": "unipc", "order": 2, "variant": "bh1"}, 3, HIGH, list(SETTINGS)),
    ({"name": "unipc", "order": 3}, 4, HIGH, list(SETTINGS)),
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
    # Adams-Bashforth (iPNDM) coefficients.
    np.testing.assert_allclose(integrate_basis([0, -1, -2, -3], 0, 1), np.array([55, -59, 37, -9]) / 24, rtol=1e-13)
    np.testing.assert_allclose(integrate_basis([0, -1, -2], 0, 1), np.array([23, -16, 5]) / 12, rtol=1e-13)


def test_lower_order_warm_up_and_final_steps():
    assert step_orders([0] * 6, 3) == [1, 2, 3, 3, 3, 3]
    # DPM-Solver's rule below 15 steps to sigma_min (the final step to 0 is the solver's own business).
    assert step_orders([0] * 6, 3, lower_order_final=True)[:-1] == [1, 2, 3, 2, 1]
    assert step_orders([0] * 20, 3, lower_order_final=True)[-3:] == [3, 3, 3]
    assert step_orders([0, 0, 2, 2, 2], 3) == [1, 2, 1, 2, 3]  # churn at step 2 restarts the warm-up


SOLVER_SPECS = [
    "dpmpp", {"name": "dpmpp", "order": 2, "lower_order_final": False}, {"name": "dpmpp", "order": 1},
    "unipc", {"name": "unipc", "order": 2, "variant": "bh1"}, {"name": "unipc", "order": 1},
    "ipndm", {"name": "ipndm", "order": 1}, "lms", {"name": "lms", "order": 2}, "deis", {"name": "deis", "order": 1},
]
RUN_SETTINGS = {
    "edm": dict(discretization="edm"),
    "vp": dict(discretization="vp", schedule="vp", scaling="vp"),
    "ve": dict(discretization="ve", schedule="ve"),
    "iddpm": dict(discretization="iddpm"),
}


class Counting:
    """The ideal denoiser behind a preconditioner's sigma range and round_sigma (VP range, iDDPM's grid)."""

    def __init__(self, precond=None):
        self.calls = 0
        self.sigma_min = NET.sigma_min if precond is None else precond.sigma_min
        self.sigma_max = NET.sigma_max if precond is None else precond.sigma_max
        self.round_sigma = NET.round_sigma if precond is None else precond.round_sigma

    def __call__(self, x, sigma, labels=None):
        self.calls += 1
        return NET(x, sigma, labels)


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
    assert {"dpmpp", "unipc", "ipndm", "lms", "deis", "adaptive"} <= set(SOLVERS.names())
