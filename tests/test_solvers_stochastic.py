"""Stochastic samplers (euler_ancestral, dpmpp_2m_sde, dpmpp_3m_sde, restart): per-seed determinism, the right
distribution, honest NFE counts, every schedule/scaling/discretization, churn compatibility and option checks."""

import itertools
import math

import pytest
import torch

from edm_toolkit.errors import ConfigError
from edm_toolkit.generate import sample_batch
from edm_toolkit.ideal import IdealDenoiser
from edm_toolkit.precond import IDDPMPrecond, VEPrecond, VPPrecond
from edm_toolkit.protocol import DenoiserWrapper
from edm_toolkit.sampling import Churn, Sampler
from edm_toolkit.schedules import LinearSchedule, NoScaling
from edm_toolkit.solvers import SOLVERS, ProbabilityFlowODE

SAMPLERS = {
    "euler_ancestral": {"name": "euler_ancestral"},
    "euler_ancestral_eta0.5": {"name": "euler_ancestral", "eta": 0.5, "s_noise": 1.0},
    "dpmpp_2m_sde": {"name": "dpmpp_2m_sde"},
    "dpmpp_2m_sde_heun": {"name": "dpmpp_2m_sde", "solver_type": "heun", "eta": 0.7},
    "dpmpp_3m_sde": {"name": "dpmpp_3m_sde"},
    "restart": {"name": "restart"},
    "restart_two_intervals": {"name": "restart", "intervals": [[4, 1, 2.0, 5.0], [6, 2, 0.2, 1.0]]},
}
TAKE_CHURN = {"euler_ancestral", "euler_ancestral_eta0.5", "restart", "restart_two_intervals"}
CHURN = Churn(S_churn=30, S_min=0.01, S_max=50, S_noise=1.007)

_gen = torch.Generator().manual_seed(0)
MIXTURE = IdealDenoiser(torch.randn(5, 3, 4, 4, generator=_gen, dtype=torch.float64) * 0.5, width=0.1)
LATENTS = torch.randn(3, 3, 4, 4, generator=_gen, dtype=torch.float64)


class Counting(DenoiserWrapper):
    """A denoiser wrapper that counts calls and records the noise levels it is given."""

    def __init__(self, net):
        super().__init__(net)
        self.calls, self.sigmas = 0, []

    def forward(self, x, sigma, class_labels=None):
        self.calls += 1
        self.sigmas.append(float(sigma))
        return self.denoiser(x, sigma, class_labels)


class OnGrid(Counting):
    """The ideal denoiser behind a real preconditioner's sigma range and round_sigma (VP range, iDDPM's grid)."""

    sigma_min = sigma_max = None  # instance values below, in place of the wrapped denoiser's

    def __init__(self, net, precond):
        super().__init__(net)
        self.sigma_min, self.sigma_max, self.round_sigma = precond.sigma_min, precond.sigma_max, precond.round_sigma


def seeded_noise(seed: int = 0):
    """A fast randn_like for large batches (one generator for the batch; per-seed streams are tested separately)."""
    gen = torch.Generator().manual_seed(seed)
    return lambda x: torch.randn(x.shape, generator=gen, dtype=x.dtype)


# --- Per-seed determinism -----------------------------------------------------------------------------------


@pytest.mark.parametrize("key", SAMPLERS)
@pytest.mark.parametrize("churn", [False, True])
def test_images_depend_only_on_their_seed(key, churn):
    if churn and key not in TAKE_CHURN:
        pytest.skip("multistep sampler: no churn")
    sampler = Sampler(solver=SAMPLERS[key], num_steps=8, churn=CHURN if churn else Churn())
    seeds = list(range(8))
    torch.manual_seed(123)  # the global generator must play no part
    whole = sample_batch(MIXTURE, sampler, seeds, "cpu")
    torch.manual_seed(456)
    for sizes in ([1] * 8, [3, 3, 2]):
        chunks = torch.tensor(seeds).split(sizes)
        parts = torch.cat([sample_batch(MIXTURE, sampler, c.tolist(), "cpu") for c in chunks])
        assert torch.equal(whole, parts), sizes
    distinct = [not torch.equal(whole[i], whole[j]) for i, j in itertools.combinations(range(8), 2)]
    assert all(distinct) and whole.isfinite().all()


@pytest.mark.parametrize("key", SAMPLERS)
def test_noise_is_drawn_from_the_given_stream(key):
    """Two runs from the same latents with different noise streams give different images."""
    sampler = Sampler(solver=SAMPLERS[key], num_steps=6)
    draws = []

    def counted(x):
        draws.append(1)
        return torch.randn(x.shape, generator=gen, dtype=x.dtype)

    gen = torch.Generator().manual_seed(0)
    a = sampler(MIXTURE, LATENTS, randn_like=counted)
    gen = torch.Generator().manual_seed(1)
    b = sampler(MIXTURE, LATENTS, randn_like=counted)
    assert not torch.equal(a, b) and len(draws) > 0


def test_eta_zero_euler_ancestral_is_euler():
    """eta = 0 leaves no noise: x_next = x + (sigma_next - sigma)(x - D)/sigma, Euler's step (also with churn)."""
    for churn in (Churn(), CHURN):
        euler = Sampler(solver="euler", num_steps=12, churn=churn)
        ancestral = euler.replace(solver={"name": "euler_ancestral", "eta": 0.0})
        a = sample_batch(MIXTURE, euler, range(4), "cpu")
        b = sample_batch(MIXTURE, ancestral, range(4), "cpu")
        torch.testing.assert_close(b, a, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("key", ["euler_ancestral", "dpmpp_2m_sde", "dpmpp_2m_sde_heun", "dpmpp_3m_sde"])
def test_level_based_samplers_ignore_schedule_and_scaling(key):
    """These samplers see only the noise levels, so every schedule and scaling gives the same images to round-off
    (a check that x/s and s(t) are converted correctly)."""
    base = Sampler(solver=SAMPLERS[key], num_steps=10)
    expected = sample_batch(MIXTURE, base, range(3), "cpu")
    for schedule, scaling in [("vp", "vp"), ("ve", "none"), ("linear", "vp"), ("vp", "none")]:
        got = sample_batch(MIXTURE, base.replace(schedule=schedule, scaling=scaling), range(3), "cpu")
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-9)


# --- DPM-Solver++ SDE: the ODE solvers at eta = 0, and the published updates ---------------------------------


@pytest.mark.parametrize("setting", [{}, {"schedule": "vp", "scaling": "vp"}])
@pytest.mark.parametrize("num_steps", [5, 12])
def test_dpmpp_sde_at_eta_zero_is_the_ode_solver(setting, num_steps):
    """dpmpp_2m/dpmpp_3m and dpmpp_2m_sde/dpmpp_3m_sde at eta = 0 agree to round-off under equal options (the
    SDE samplers' defaults: k-diffusion's rule, no lower-order final steps; dpmpp_3m_sde's 2M warm-up is 'heun')."""
    pairs = [({"name": "dpmpp_3m", "solver_type": "heun", "lower_order_final": "never"}, {"name": "dpmpp_3m_sde"}),
             ({"name": "dpmpp_2m", "lower_order_final": "never"}, {"name": "dpmpp_2m_sde"})]
    for solver_type, third_order, rule in (("midpoint", "exact", "always"), ("heun", "reference", "never")):
        pairs.append(({"name": "dpmpp_2m", "solver_type": solver_type, "lower_order_final": rule},
                      {"name": "dpmpp_2m_sde", "solver_type": solver_type, "lower_order_final": rule}))
        pairs.append(({"name": "dpmpp_3m", "solver_type": "heun", "third_order": third_order,
                       "lower_order_final": rule},
                      {"name": "dpmpp_3m_sde", "third_order": third_order, "lower_order_final": rule}))
    draws = []
    for ode, sde in pairs:
        expected = Sampler(solver=ode, num_steps=num_steps, **setting)(MIXTURE, LATENTS)
        got = Sampler(solver={**sde, "eta": 0.0}, num_steps=num_steps, **setting)(
            MIXTURE, LATENTS, randn_like=lambda x: draws.append(1) or torch.randn_like(x))
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-12, msg=lambda m: f"{ode}, {sde}: {m}")
    assert not draws  # no noise at eta = 0


def published_dpmpp_sampler(net, latents, sigmas, order, solver_type, c2, final_below, eta=0.0, noise=()):
    """DPM-Solver++ as the reference codes write the loop (DPM-Solver's multistep sampler with denoise-to-zero,
    k-diffusion's sample_dpmpp_2m_sde / sample_dpmpp_3m_sde): noise levels ``sigmas`` ending in 0, data prediction,
    phi's of h_eta = (1 + eta) h, noise sigma_next sqrt(1 - e^(-2 eta h)) eps from ``noise``."""
    noise = iter(noise)
    x = latents * sigmas[0]
    denoised, hs = [], []
    to_min = len(sigmas) - 2
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        D = net(x, sigma)
        if sigma_next == 0:
            return D
        h = math.log(sigma / sigma_next)
        z = (1 + eta) * h
        step_order = min(order, i + 1, to_min - i if to_min < final_below else order)
        phi_1 = -math.expm1(-z)
        phi_2 = 1 - phi_1 / z
        phi_3 = phi_2 / z - 0.5
        x = sigma_next / sigma * math.exp(-eta * h) * x + phi_1 * D
        if step_order >= 2:
            r0 = hs[-1] / h
            d1_0 = (D - denoised[-1]) / r0
        if step_order == 2:
            x = x + (0.5 * phi_1 if solver_type == "midpoint" else phi_2) * d1_0
        if step_order == 3:
            r1 = hs[-2] / h
            d1_1 = (denoised[-1] - denoised[-2]) / r1
            d1 = d1_0 + (d1_0 - d1_1) * r0 / (r0 + r1)
            d2 = (d1_0 - d1_1) / (r0 + r1)
            x = x + phi_2 * d1 - c2 * phi_3 * d2
        if eta:
            x = x + next(noise) * sigma_next * math.sqrt(-math.expm1(-2 * eta * h))
        denoised.append(D)
        hs.append(h)


@pytest.mark.parametrize("spec,order,solver_type,c2,final_below,num_steps", [
    ({"name": "dpmpp_3m"}, 3, "midpoint", 1.0, 10, 8),  # DPM-Solver's code: lower-order final steps below 10
    ({"name": "dpmpp_3m"}, 3, "midpoint", 1.0, 10, 13),
    ({"name": "dpmpp_3m", "third_order": "exact", "solver_type": "heun"}, 3, "heun", 2.0, 10, 7),
    ({"name": "dpmpp_2m"}, 2, "midpoint", 0.0, 10, 9),
    ({"name": "dpmpp_2m", "lower_order_final": "never"}, 2, "midpoint", 0.0, 0, 9),  # k-diffusion's dpmpp_2m
    ({"name": "dpmpp_3m_sde", "eta": 0.0}, 3, "heun", 1.0, 0, 9),
    ({"name": "dpmpp_3m_sde", "eta": 0.5}, 3, "heun", 1.0, 0, 9),  # k-diffusion's dpmpp_3m_sde
    ({"name": "dpmpp_3m_sde", "eta": 1.0, "third_order": "exact"}, 3, "heun", 2.0, 0, 6),
    ({"name": "dpmpp_2m_sde", "eta": 0.7, "solver_type": "heun"}, 2, "heun", 0.0, 0, 9),  # ... dpmpp_2m_sde
    ({"name": "dpmpp_2m_sde", "eta": 1.0, "lower_order_final": "always"}, 2, "midpoint", 0.0, math.inf, 7),
])
def test_dpmpp_matches_the_published_updates(spec, order, solver_type, c2, final_below, num_steps):
    sampler = Sampler(solver=spec, num_steps=num_steps)
    sigmas = sampler.plan(MIXTURE).sigma_steps.tolist()
    noise = torch.randn(num_steps, *LATENTS.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    expected = published_dpmpp_sampler(MIXTURE, LATENTS, sigmas, order, solver_type, c2, final_below,
                                       eta=spec.get("eta", 0.0), noise=noise)
    calls = iter(noise)
    got = sampler(MIXTURE, LATENTS, randn_like=lambda x: next(calls))
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-11)


# --- Correct distribution ------------------------------------------------------------------------------------

# Step counts that put each sampler's discretization bias on the variance well below the test's 5 standard errors
# (Euler ancestral is first order: about 11/num_steps relative on this problem).
DISTRIBUTION_RUNS = [
    ("euler_ancestral", 1024),
    ("dpmpp_2m_sde", 128),
    ("dpmpp_2m_sde_heun", 128),
    ("dpmpp_3m_sde", 64),
    ("restart_two_intervals", 48),
]
NUM_SAMPLES = 4000


@pytest.mark.parametrize("key,num_steps", DISTRIBUTION_RUNS)
def test_single_gaussian_has_the_right_mean_and_variance(key, num_steps, one_thread):
    """Data N(y, s^2 I): samples have mean y and variance s^2 within 5 standard errors (pixels are independent)."""
    y = torch.tensor([0.5, -1.0, 1.5, 0.0], dtype=torch.float64).reshape(1, 1, 2, 2)
    width = 0.5
    net = IdealDenoiser(y, width=width)
    latents = torch.randn(NUM_SAMPLES, 1, 2, 2, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    x = Sampler(solver=SAMPLERS[key], num_steps=num_steps)(net, latents, randn_like=seeded_noise())
    error = (x - y).flatten()
    n = error.numel()
    assert abs(float(error.mean())) < 5 * width / math.sqrt(n)
    assert abs(float(error.square().mean()) / width**2 - 1) < 5 * math.sqrt(2 / n)


@pytest.mark.parametrize("key", [key for key, _ in DISTRIBUTION_RUNS])
def test_two_point_mixture_has_equal_mode_weights(key, one_thread):
    """Two equally likely, asymmetrically placed modes are each reached by half of the samples (5 standard errors)."""
    points = torch.tensor([[1.5, 1.0, 1.5, 1.0], [-0.5, -1.0, -0.5, 0.0]], dtype=torch.float64).reshape(2, 1, 2, 2)
    net = IdealDenoiser(points, width=0.2)
    latents = torch.randn(NUM_SAMPLES, 1, 2, 2, generator=torch.Generator().manual_seed(8), dtype=torch.float64)
    x = Sampler(solver=SAMPLERS[key], num_steps=64)(net, latents, randn_like=seeded_noise(1))
    nearest = torch.cdist(x.flatten(1), points.flatten(1)).argmin(dim=1)
    assert abs(float(nearest.double().mean()) - 0.5) < 5 * 0.5 / math.sqrt(NUM_SAMPLES)


# --- Network evaluations ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("key", SAMPLERS)
@pytest.mark.parametrize("num_steps", [2, 5, 13])
def test_evaluations_are_counted_honestly(key, num_steps):
    if key == "restart_two_intervals" and num_steps == 2:
        pytest.skip("two intervals need two main-grid levels")
    sampler = Sampler(solver=SAMPLERS[key], num_steps=num_steps)
    net, reported = Counting(MIXTURE), []
    sampler(net, LATENTS, randn_like=seeded_noise(), callback=lambda info: reported.append(info.nfe))
    assert net.calls == sampler.nfe == reported[-1] and len(reported) == num_steps


@pytest.mark.parametrize("spec,num_steps,nfe", [
    ("euler_ancestral", 18, 18), ("dpmpp_3m_sde", 18, 18),
    ("restart", 18, 35 + 8),  # the paper's (3, 2, 0.06, 0.30) on 18 Heun steps: 2 restarts x 2 Heun steps
    ({"name": "restart", "intervals": [[4, 1, 19.35, 40.79], [6, 6, 0.06, 0.30]]}, 36, 71 + 6 + 60),
])
def test_evaluation_formulas(spec, num_steps, nfe):
    assert Sampler(solver=spec, num_steps=num_steps).nfe == nfe


def test_restart_renoises_to_t_max_and_solves_back_k_times():
    """Xu et al. 2023, Algorithm 1: after the main step that reaches t_min, K times: noise up to t_max, Heun back."""
    net = Counting(MIXTURE)
    sampler = Sampler(solver="restart", num_steps=18)  # linear schedule: the network sees t = sigma
    draws = []
    sampler(net, LATENTS, randn_like=lambda x: draws.append(1) or torch.zeros_like(x))
    assert len(draws) == 2  # K = 2 restarts, one noise draw each
    assert sum(math.isclose(s, 0.30, rel_tol=1e-12) for s in net.sigmas) == 2
    plan = sampler.plan(net)
    t_min = min(plan.sigma_steps[1:-1].tolist(), key=lambda s: abs(s - 0.06))
    # Every restart ends on the main-grid level t_min: Heun's corrector evaluates there once per restart pass.
    assert sum(s == t_min for s in net.sigmas) == 1 + 2 + 1  # main corrector, 2 restarts, next main step


# --- Every setting ----------------------------------------------------------------------------------------------

SETTINGS = {  # EDM Table 1 columns: discretization, schedule, scaling, the network's sigma convention
    "vp": ("vp", "vp", "vp", VPPrecond()),
    "ve": ("ve", "ve", "none", VEPrecond()),
    "iddpm": ("iddpm", "linear", "none", IDDPMPrecond()),
    "edm": ("edm", "linear", "none", None),
}


@pytest.mark.parametrize("key", SAMPLERS)
@pytest.mark.parametrize("setting", SETTINGS)
def test_runs_on_every_setting(key, setting):
    disc, schedule, scaling, precond = SETTINGS[setting]
    net = Counting(MIXTURE) if precond is None else OnGrid(MIXTURE, precond)
    sampler = Sampler(solver=SAMPLERS[key], discretization=disc, schedule=schedule, scaling=scaling, num_steps=7,
                      churn=CHURN if key in TAKE_CHURN else Churn())
    x = sampler(net, LATENTS, randn_like=seeded_noise())
    assert x.isfinite().all() and net.calls == sampler.nfe


@pytest.mark.parametrize("key", ["euler_ancestral", "dpmpp_2m_sde", "dpmpp_3m_sde"])
def test_repeated_noise_levels_are_skipped(key):
    """100 steps on iDDPM's rounded grid repeat some noise levels (zero-length steps): x stays as it is there, and
    the multistep samplers use each noise level once in their history instead of dividing by a zero step."""
    net = OnGrid(MIXTURE, IDDPMPrecond())
    sampler = Sampler(solver=SAMPLERS[key], num_steps=100)
    plan = sampler.plan(net)
    repeats = [i for i in range(1, 99) if plan.sigma_steps[i] == plan.sigma_steps[i + 1]]
    assert repeats
    states = {}
    x = sampler(net, LATENTS, randn_like=seeded_noise(), callback=lambda info: states.__setitem__(info.step, info.x))
    assert x.isfinite().all()
    for i in repeats:  # step i + 1 (1-based) goes from sigma_i to sigma_{i+1} = sigma_i
        assert torch.equal(states[i + 1], states[i])


# --- Churn and options --------------------------------------------------------------------------------------


def test_churn_compatibility_is_declared_and_enforced():
    ode = ProbabilityFlowODE(LinearSchedule(), NoScaling())
    t_next = torch.tensor([10.0, 1.0, 0.1, 0.0], dtype=torch.float64)
    t_churned = torch.tensor([80.0, 12.0, 1.0, 0.1], dtype=torch.float64)  # step 1 starts above where step 0 ended
    for key, spec in SAMPLERS.items():
        solver = SOLVERS.create(spec)
        assert solver.accepts_churn == (key in TAKE_CHURN)
        if solver.accepts_churn:
            solver.prepare(ode, t_churned, t_next, "cpu")
            continue
        with pytest.raises(ConfigError, match="churn"):
            Sampler(solver=solver, num_steps=8, churn=CHURN).plan(MIXTURE)
        with pytest.raises(ConfigError, match="cannot take EDM churn"):
            solver.prepare(ode, t_churned, t_next, "cpu")


@pytest.mark.parametrize("spec,match", [
    ({"name": "euler_ancestral", "eta": -0.1}, "eta must be a finite number >= 0"),
    ({"name": "euler_ancestral", "s_noise": math.inf}, "s_noise must be a finite number >= 0"),
    ({"name": "dpmpp_2m_sde", "eta": math.inf}, "eta must be a finite number >= 0"),
    ({"name": "dpmpp_2m_sde", "solver_type": "rk4"}, "solver_type must be 'midpoint' or 'heun'"),
    ({"name": "dpmpp_3m_sde", "s_noise": -1}, "s_noise must be a finite number >= 0"),
    ({"name": "dpmpp_3m_sde", "solver_type": "heun"}, "unknown option 'solver_type'"),
    ({"name": "dpmpp_3m_sde", "third_order": "half"}, "third_order must be 'reference' or 'exact'"),
    ({"name": "dpmpp_2m_sde", "third_order": "exact"}, "unknown option 'third_order'"),
    ({"name": "dpmpp_2m_sde", "lower_order_final": "below15"}, "lower_order_final must be 'reference', 'always'"),
    ({"name": "restart", "intervals": []}, "at least one interval"),
    ({"name": "restart", "intervals": [[3, 2, 0.06]]}, r"must be a list \(N, K, t_min, t_max\)"),
    ({"name": "restart", "intervals": [[1, 2, 0.06, 0.3]]}, "N must be an integer >= 2"),
    ({"name": "restart", "intervals": [[3, 2.5, 0.06, 0.3]]}, "K must be an integer >= 1"),
    ({"name": "restart", "intervals": [[3, 0, 0.06, 0.3]]}, "K must be an integer >= 1"),
    ({"name": "restart", "intervals": [[3, 2, 0.3, 0.06]]}, "need 0 < t_min < t_max"),
    ({"name": "restart", "intervals": [[3, 2, 0.0, 0.3]]}, "need 0 < t_min < t_max"),
    ({"name": "restart", "intervals": [[3, 2, 0.06, math.inf]]}, "need 0 < t_min < t_max"),
    ({"name": "restart", "s_noise": -0.5}, "s_noise must be a finite number >= 0"),
])
def test_bad_options_raise_config_error(spec, match):
    with pytest.raises(ConfigError, match=match):
        Sampler(solver=spec)


@pytest.mark.parametrize("intervals,match", [
    ([[3, 1, 0.05, 0.3], [3, 1, 0.07, 0.5]], "start at the same main-grid noise level"),
    ([[3, 1, 0.001, 0.0015]], "must exceed its t_min"),
])
def test_restart_intervals_checked_against_the_grid(intervals, match):
    with pytest.raises(ConfigError, match=match):
        Sampler(solver={"name": "restart", "intervals": intervals}, num_steps=18).plan(MIXTURE)


def test_registered_and_configurable_by_name():
    solver = SOLVERS.create({"name": "restart", "intervals": [[3, 2, 0.06, 0.30]], "s_noise": 1.003})
    assert solver.intervals == ((3, 2, 0.06, 0.30),) and isinstance(solver.intervals[0][0], int)
    assert SOLVERS.create("dpmpp_2m_sde").solver_type == "midpoint" and SOLVERS.create("dpmpp_3m_sde").eta == 1.0
    assert SOLVERS.create("dpmpp_3m_sde").third_order == "reference"
