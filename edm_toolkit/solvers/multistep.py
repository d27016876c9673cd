"""Multistep solvers: DPM-Solver++ (2M/3M, and the SDE variants' coefficients), UniPC, iPNDM, LMS and DEIS (tAB).

Every solver here is a linear multistep method on y = x/s(t), the state EDM's Eq. 4 writes as
dy/dsigma = (y - D(y; sigma))/sigma for every schedule and scaling, so one set of coefficients, computed from the
noise levels alone, serves them all. A step from the evaluation point t_hat_i to t_{i+1} is

    y_{i+1} = carry_i y_i + sum_j w_ij F_{i-j} (+ noise_i eps),        x_{i+1} = s(t_{i+1}) y_{i+1},

with F the data prediction D (exponential integrators in lambda = -log sigma: DPM-Solver++, UniPC) or the noise
prediction eps = (y - D)/sigma = dy/dsigma (sigma-space Adams-Bashforth methods: iPNDM, LMS, DEIS). ``prepare``
computes carry and w for every step as Python floats; ``step`` evaluates the network once and combines tensors.
Every step costs exactly one network evaluation, so N steps cost N NFE, the final step to sigma = 0 included.
(The noise term is used only by the DPM-Solver++ SDE samplers of stochastic.py, built on the same coefficients.)

History and warm-up. The history holds F at the previous evaluation points; step i uses at most i + 1 of them, so
the first steps are lower order, as every one of these papers prescribes. Churn voids the history: the fresh noise
moves x off the trajectory the old values describe (extrapolating them diverges), so the step after churn starts
a new warm-up; with churn on every step these solvers are first order there (DDIM / Euler in sigma). Points with
equal noise levels (a rounded grid can repeat a level) are used once.

Lower-order final steps (``lower_order_final``, exponential integrators only). The reference codes lower the order
of the last steps to sigma_min, the last one first order, the one before second order (DPM-Solver's and UniPC's
step_order = min(order, steps + 1 - step)), each under its own rule: see ``step_orders`` and the solvers.

The final step to sigma = 0. lambda is infinite there, so the exponential integrators take a first-order step,
which returns the denoised value y_N = D(y_{N-1}; sigma_{N-1}) (the "denoise to zero" of DPM-Solver and UniPC, and
what EDM's Euler step to 0 computes). The sigma-space methods integrate their polynomial in sigma down to 0 at their
current order (as k-diffusion's lms does); eps is smooth there.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, ClassVar, Sequence

import numpy as np
import torch

from ..errors import ConfigError
from ..schedules import VPSchedule
from .base import SOLVERS, ODEPoint, Solver

_GAUSS_NODES, _GAUSS_WEIGHTS = np.polynomial.legendre.leggauss(32)

LOWER_ORDER_FINAL = ("reference", "always", "never")  # the values of the ``lower_order_final`` option


# ---------------------------------------------------------------------------------------------------------------
# Coefficients: Lagrange polynomials through the history, integrated over the step.


def lagrange_basis(nodes: Sequence[float], at: np.ndarray) -> np.ndarray:
    """[len(nodes), len(at)]: the Lagrange basis polynomials L_j on ``nodes`` (L_j(nodes[m]) = [j == m]) at ``at``."""
    at = np.asarray(at, dtype=np.float64)
    basis = np.ones((len(nodes), at.size))
    for j, node_j in enumerate(nodes):
        for m, node_m in enumerate(nodes):
            if m != j:
                basis[j] *= (at - node_m) / (node_j - node_m)
    return basis


def lagrange_coefficients(nodes: Sequence[float]) -> np.ndarray:
    """[len(nodes), len(nodes)]: the Lagrange basis polynomials on ``nodes`` in the power basis, c[j, k] the
    coefficient of v^k in L_j(v)."""
    out = np.zeros((len(nodes), len(nodes)))
    for j, node_j in enumerate(nodes):
        others = [node for m, node in enumerate(nodes) if m != j]
        out[j] = np.polynomial.polynomial.polyfromroots(others) / np.prod([node_j - node for node in others])
    return out


def integrate_basis(
    nodes: Sequence[float], a: float, b: float, kernel: Callable[[np.ndarray], np.ndarray] | None = None,
    variable: Callable[[np.ndarray], np.ndarray] | None = None,
) -> tuple[float, ...]:
    """int_a^b kernel(v) L_j(variable(v)) dv for each basis polynomial L_j on ``nodes`` (kernel and variable default
    to 1 and the identity), by 32-point Gauss-Legendre quadrature: exact for the polynomials here (degree <= 3) and
    exact to round-off for the smooth kernels and changes of variable used below."""
    v = 0.5 * (a + b) + 0.5 * (b - a) * _GAUSS_NODES
    weights = 0.5 * (b - a) * _GAUSS_WEIGHTS
    if kernel is not None:
        weights = weights * kernel(v)
    return tuple((lagrange_basis(nodes, v if variable is None else variable(v)) @ weights).tolist())


def exponential_weights(nodes: Sequence[float], h: float, b_h: float) -> tuple[float, ...]:
    """Weights w_j of the data-prediction exponential integrator y(lambda_s + h) = e^-h y + sum_j w_j D(u_j).

    ``nodes`` are u_j = lambda_j - lambda_s with nodes[0] = 0 (the step's start). The exact solution of the ODE
    in lambda = -log sigma, dy/dlambda = D - y, is y = e^-h y_s + int_0^h e^(u - h) D(lambda_s + u) du (DPM-Solver++'s
    data-prediction form x_t = (sigma_t/sigma_s) x_s + sigma_t int e^lambda x_theta dlambda with alpha = 1).
    With three or more nodes D is replaced by its interpolating polynomial and integrated exactly: this is
    UniPC's UniP-p/UniC-p with the linear system R_p a = g_p(h)/B(h) for its coefficients solved exactly (B(h) then
    cancels), and DPM-Solver++(3M) with ``third_order="exact"`` (``dpmpp_weights``). With two nodes UniPC sets
    a_1 = 1/2 instead (its UniP-2 and UniC-1): w = (1 - e^-h) [j = 0] + B(h)/2 (L_j(h) - [j = 0]), which for
    B(h) = 1 - e^-h (bh2) is DPM-Solver++(2M) (Lu et al. 2022, Algorithm 2: y_{i+1} = e^-h y_i
    + (1 - e^-h) (D_i + (D_i - D_{i-1})/(2 r_i)), r_i = h_{i-1}/h_i). One node is DDIM: w = 1 - e^-h.
    """
    if len(nodes) == 1:
        return (-math.expm1(-h),)
    if len(nodes) == 2:
        at_end = lagrange_basis(nodes, [h])[:, 0]
        return (-math.expm1(-h) + 0.5 * b_h * float(at_end[0] - 1), 0.5 * b_h * float(at_end[1]))
    edges = np.linspace(0.0, h, max(1, math.ceil(h / 4)) + 1)  # panels <= 4 long: exact quadrature for any h
    panels = [integrate_basis(nodes, a, b, kernel=lambda u: np.exp(u - h)) for a, b in zip(edges[:-1], edges[1:])]
    return tuple(np.sum(panels, axis=0).tolist())


def phi_functions(z: float) -> tuple[float, float, float]:
    """(phi_1, phi_2, phi_3) of the data-prediction exponential integrator over a step of z in lambda:
    phi_1 = 1 - e^-z, phi_2 = 1 - phi_1/z, phi_3 = phi_2/z - 1/2 (DPM-Solver++'s -phi_1, phi_2, phi_3, k-diffusion's
    phi_2 and phi_3), so that int_0^z e^(v - z) (v/z)^k dv = phi_1, phi_2, -2 phi_3 for k = 0, 1, 2.

    Below z = 1 from their series, phi_k = (+-) z sum_n (-z)^n/(n + k)!, which the closed forms would lose to
    cancellation for the small steps of long runs.
    """
    if z >= 1:
        phi_1 = -math.expm1(-z)
        phi_2 = 1 - phi_1 / z
        return phi_1, phi_2, phi_2 / z - 0.5
    sums = [sum((-z) ** n / math.factorial(n + k) for n in range(20)) for k in (1, 2, 3)]
    return z * sums[0], z * sums[1], -z * sums[2]


DPMPP_SOLVER_TYPES = ("midpoint", "heun")  # the weight of D1 in the two-point (2M) step
DPMPP_THIRD_ORDER = ("reference", "exact")  # the weight of D2 in the three-point (3M) step


def dpmpp_weights(nodes: Sequence[float], h: float, eta: float = 0.0, solver_type: str = "midpoint",
                  third_order: str = "reference") -> tuple[float, ...]:
    """Weights w_j on the denoised history of a DPM-Solver++ step (Lu et al. 2022) of h in lambda = -log sigma:
    y_next = (sigma_next/sigma) e^(-eta h) y + sum_j w_j D_j (+ sigma_next sqrt(1 - e^(-2 eta h)) eps for eta > 0).

    ``nodes`` are u_j = lambda_{i-j} - lambda_i (nodes[0] = 0, newest first). With p the polynomial through them,
    D1 = h p'(0) and D2 = h^2 p''(0)/2 (DPM-Solver's divided differences D1 = D1_0 + r0 (D1_0 - D1_1)/(r0 + r1),
    D2 = (D1_0 - D1_1)/(r0 + r1) with D1_0 = (D_0 - D_1)/r0, D1_1 = (D_1 - D_2)/r1, r_k = h_{i-1-k}/h), and the
    phi functions (``phi_functions``) of z = (1 + eta) h (the SDE's faster decay; eta = 0 is the ODE):

        one node (DDIM):   phi_1 D_0
        two nodes (2M):    phi_1 D_0 + c1 D1,            c1 = phi_1/2 ("midpoint") or phi_2 ("heun")
        three nodes (3M):  phi_1 D_0 + phi_2 D1 - c2 phi_3 D2,   c2 = 1 ("reference") or 2 ("exact")

    The exact integral int_0^z e^(v - z) p(v/(1 + eta)) dv of the interpolating polynomial is phi_1 D_0 + phi_2 D1
    - 2 phi_3 D2 ("heun" and "exact"). "midpoint" (DPM-Solver++ Algorithm 2; the default of DPM-Solver's code,
    k-diffusion's dpmpp_2m and diffusers) agrees with it to O(h^3) and keeps second order. "reference" is the 3M
    update of DPM-Solver's code (multistep_dpm_solver_third_update), k-diffusion's dpmpp_3m_sde and diffusers: it
    weights D2 by half the exact value, which leaves a local error of h^3 D''/12 (D'' = d^2 D/d lambda^2), so the
    method is globally second order (measured in the tests); "exact" is third order.
    """
    if h == 0:
        return (0.0,) * len(nodes)
    phi_1, phi_2, phi_3 = phi_functions((1 + eta) * h)
    terms = [phi_1]  # the weights of D_0, D1, D2
    if len(nodes) == 2:
        terms.append(0.5 * phi_1 if solver_type == "midpoint" else phi_2)
    elif len(nodes) == 3:
        terms += [phi_2, -(1.0 if third_order == "reference" else 2.0) * phi_3]
    # p(v h) = sum_j D_j L_j(v) on the nodes in units of h: D1 and D2 are the coefficients of v and v^2.
    return tuple((lagrange_coefficients([u / h for u in nodes]) @ np.array(terms)).tolist())


def distinct_offsets(values: Sequence[float], i: int, count: int, first: int) -> list[int]:
    """Offsets j >= 0 (newest first) of up to ``count`` history points i - j >= ``first`` whose ``values`` are all
    different."""
    offsets, seen = [], []
    for j in range(i - first + 1):
        if values[i - j] not in seen:
            offsets.append(j)
            seen.append(values[i - j])
            if len(offsets) == count:
                break
    return offsets


def spread(weights: Sequence[float], offsets: Sequence[int]) -> tuple[float, ...]:
    """Weights per history position 0..max(offsets) (zero for positions not used)."""
    out = [0.0] * (max(offsets) + 1)
    for w, j in zip(weights, offsets):
        out[j] = w
    return tuple(out)


def check_order(solver: str, order, highest: int) -> None:
    if isinstance(order, bool) or not isinstance(order, int) or not 1 <= order <= highest:
        raise ConfigError(f"{solver} order must be an integer from 1 to {highest}, got {order!r}")


def check_choice(solver: str, option: str, value, choices: Sequence[str]) -> None:
    if value not in choices:
        listed = ", ".join(repr(c) for c in choices[:-1]) + f" or {choices[-1]!r}"
        raise ConfigError(f"{solver} {option} must be {listed}, got {value!r}")


# ---------------------------------------------------------------------------------------------------------------
# The shared step.


@dataclass(frozen=True, slots=True)
class Update:
    """y_new = carry y + sum_j weights[j] history[j] (history newest first), plus fresh noise of std ``noise``
    (added by the step; only the DPM-Solver++ SDE samplers have any)."""

    carry: float
    weights: tuple[float, ...]
    noise: float = 0.0

    def apply(self, y: torch.Tensor, history: Sequence[torch.Tensor]) -> torch.Tensor:
        out = torch.mul(y, self.carry)
        for w, f in zip(self.weights, history):
            if w != 0.0:
                out.add_(f, alpha=w)
        return out


@dataclass(frozen=True, slots=True)
class MultistepRecord:
    point: ODEPoint  # where the network is evaluated (t_hat)
    s_next: float  # s(t_{i+1})
    predictor: Update
    corrector: Update | None  # UniC: replaces the step's starting y (no evaluation of its own)
    keep: int  # history length any step needs


class LinearMultistep(Solver):
    """Base of the solvers in this module: one evaluation per step, coefficients from ``updates``."""

    predicts: ClassVar[str]  # "data": history of D; "eps": history of (y - D)/sigma

    def evaluations(self, num_steps):
        return num_steps

    def final_steps(self) -> str:
        """When the last steps to sigma_min use lower orders (for ``edm solvers``): here never, only warm-up."""
        return "never"

    def updates(self, sigma_hat: list[float], sigma_next: list[float], starts: list[int]
                ) -> list[tuple[Update, Update | None]]:
        """(predictor, corrector) per step; step i may use the history back to step ``starts[i]``."""
        raise NotImplementedError

    def prepare(self, ode, t_hat, t_next, device):
        sigma_hat, sigma_next = ode.sigma(t_hat).tolist(), ode.sigma(t_next).tolist()
        starts = [0]
        for i, continues in enumerate((t_hat[1:] == t_next[:-1]).tolist(), start=1):
            starts.append(starts[-1] if continues else i)  # churn moved the start: the history is void
        updates = self.updates(sigma_hat, sigma_next, starts)
        keep = max(len(u.weights) for pair in updates for u in pair if u is not None)
        return [
            MultistepRecord(point, s, predictor, corrector, keep)
            for point, s, (predictor, corrector) in zip(ode.points(t_hat, device), ode.s(t_next).tolist(), updates)
        ]

    def step(self, x_hat, record, ctx):
        point = record.point
        y = x_hat if point.inv_s == 1.0 else x_hat * point.inv_s
        denoised = ctx.denoise(x_hat, point)
        history = ctx.state.setdefault("history", [])
        history.insert(0, denoised if self.predicts == "data" else torch.sub(y, denoised).div_(point.sigma))
        del history[record.keep:]
        if record.corrector is not None:
            y = record.corrector.apply(ctx.state["y"], history)
        ctx.state["y"] = y
        y_next = record.predictor.apply(y, history)
        if record.predictor.noise:
            y_next.add_(ctx.randn_like(y_next), alpha=record.predictor.noise)
        return y_next.mul_(record.s_next)


# ---------------------------------------------------------------------------------------------------------------
# Exponential integrators in lambda = -log sigma with data prediction.


def step_orders(starts: Sequence[int], order: int, final_below: float = 0) -> list[int]:
    """Order of each step. Warm-up: min(order, number of history points available). Lower-order final steps: with
    fewer than ``final_below`` steps to sigma_min (N - 1 of the N steps), step i < N - 1 uses order <= N - 1 - i, so
    the last step to sigma_min is first order and the one before second order (DPM-Solver's and UniPC's
    step_order = min(order, steps + 1 - step)). The final step to sigma = 0 is the solver's own business."""
    orders = [min(order, i - start + 1) for i, start in enumerate(starts)]
    to_min = len(starts) - 1
    if to_min < final_below:
        orders = [min(k, to_min - i) if i < to_min else k for i, k in enumerate(orders)]
    return orders


class ExponentialMultistep(LinearMultistep):
    """DPM-Solver++ and UniPC: data prediction, exponential integrators in lambda.

    ``lower_order_final``: "reference" follows the rule of the method's reference code, ``reference_rule``
    (lower the last steps to sigma_min when there are fewer than that many of them: 0 never, inf always),
    "always" and "never" override it.
    """

    predicts: ClassVar[str] = "data"
    corrects: ClassVar[bool] = False
    reference_rule: ClassVar[tuple[float, str]]  # (steps to sigma_min below which to lower, whose rule)
    order: int
    lower_order_final: str

    def __post_init__(self):
        check_order(self.name, self.order, 3)
        check_choice(self.name, "lower_order_final", self.lower_order_final, LOWER_ORDER_FINAL)

    def final_below(self) -> float:
        """Lower the final orders when there are fewer steps to sigma_min than this."""
        return {"reference": self.reference_rule[0], "always": math.inf, "never": 0}[self.lower_order_final]

    def final_steps(self):
        below = self.final_below()
        rule = "never" if below == 0 else "always" if below == math.inf else f"N <= {below:g}"
        return f"{rule} ({self.reference_rule[1]})" if self.lower_order_final == "reference" else rule

    def predictor(self, nodes: list[float], h: float, sigma: float, sigma_to: float) -> Update:
        """The update of a step of h = log(sigma/sigma_to) > 0 from the history at ``nodes`` (lambda offsets)."""
        raise NotImplementedError

    def updates(self, sigma_hat, sigma_next, starts):
        lam = [-math.log(s) for s in sigma_hat]
        orders = step_orders(starts, self.order, self.final_below())
        out, previous = [], None
        for i, (order, sigma, sigma_to) in enumerate(zip(orders, sigma_hat, sigma_next)):
            corrector = None
            if self.corrects and previous is not None and starts[i] < i and sigma_to != 0:
                offsets, nodes, h = previous  # UniC: the previous step's nodes plus its end point, u = h
                w = exponential_weights(nodes + [h], h, self.b(h))
                corrector = Update(sigma / sigma_hat[i - 1], spread((w[-1],) + w[:-1], [0] + [j + 1 for j in offsets]))
            if sigma_to == 0:
                predictor, previous = Update(0.0, (1.0,)), None
            else:
                offsets = distinct_offsets(lam, i, order, starts[i])
                nodes, h = [lam[i - j] - lam[i] for j in offsets], math.log(sigma / sigma_to)
                update = self.predictor(nodes, h, sigma, sigma_to)
                predictor = Update(update.carry, spread(update.weights, offsets), update.noise)
                previous = (offsets, nodes, h) if h > 0 else None  # nothing to correct after a zero-length step
            out.append((predictor, corrector))
        return out


class DPMSolverPPFamily(ExponentialMultistep):
    """DPM-Solver++(kM) (Lu et al. 2022, "DPM-Solver++": Algorithm 2 and the third-order multistep update of its
    reference code), multistep in lambda with data prediction; each step's weights are ``dpmpp_weights``.

    One implementation for the ODE solvers here (dpmpp, dpmpp_2m, dpmpp_3m) and the SDE samplers (dpmpp_2m_sde,
    dpmpp_3m_sde in stochastic.py): with eta = 0 they are the same method. Options a member does not expose are
    fixed by these class defaults: midpoint 2M steps, the reference 3M weighting, eta = 0 (no noise).
    Lower-order final steps by DPM-Solver's reference code (dpm_solver_pytorch.py): when there are fewer than 10
    steps to sigma_min, i.e. N <= 10 (its first release, and diffusers' DPMSolverMultistepScheduler, use 15).
    """

    reference_rule: ClassVar[tuple[float, str]] = (10, "DPM-Solver")
    solver_type: ClassVar[str] = "midpoint"
    third_order: ClassVar[str] = "reference"
    eta: ClassVar[float] = 0.0
    s_noise: ClassVar[float] = 1.0

    def __post_init__(self):
        super().__post_init__()
        check_choice(self.name, "solver_type", self.solver_type, DPMPP_SOLVER_TYPES)
        check_choice(self.name, "third_order", self.third_order, DPMPP_THIRD_ORDER)

    def predictor(self, nodes, h, sigma, sigma_to):
        weights = dpmpp_weights(nodes, h, self.eta, self.solver_type, self.third_order)
        noise = sigma_to * math.sqrt(-math.expm1(-2 * self.eta * h)) * self.s_noise
        return Update(sigma_to / sigma * math.exp(-self.eta * h), weights, noise)


@SOLVERS.register
@dataclass(frozen=True)
class DPMSolverPP(DPMSolverPPFamily):
    """DPM-Solver++(kM) of order k (1 DDIM, 2 dpmpp_2m, 3 dpmpp_3m).

    See dpmpp_2m and dpmpp_3m for the options. Warm-up with lower orders; N steps, N NFE, the final step to 0
    returns D.
    """

    name: ClassVar[str] = "dpmpp"
    order: int = 3
    solver_type: str = "midpoint"
    third_order: str = "reference"
    lower_order_final: str = "reference"


@SOLVERS.register
@dataclass(frozen=True)
class DPMSolverPP2M(DPMSolverPPFamily):
    """DPM-Solver++(2M) (Lu et al. 2022, Algorithm 2; k-diffusion's dpmpp_2m): second order, one evaluation per step.

    y_{i+1} = (sigma_{i+1}/sigma_i) y_i + phi_1 D_i + c1 (D_i - D_{i-1})/r_i, r_i = h_{i-1}/h_i, phi_1 = 1 - e^-h,
    c1 = phi_1/2 (``solver_type`` "midpoint", Algorithm 2) or phi_2 = 1 - phi_1/h ("heun": the exact integral of
    the line through D_{i-1}, D_i). The first step is DDIM. ``lower_order_final`` "reference": DPM-Solver's rule,
    the last step to sigma_min first order when N <= 10 (k-diffusion's dpmpp_2m never lowers: "never").
    N steps, N NFE; the final step to 0 returns D.
    """

    name: ClassVar[str] = "dpmpp_2m"
    order: ClassVar[int] = 2
    solver_type: str = "midpoint"
    lower_order_final: str = "reference"


@SOLVERS.register
@dataclass(frozen=True)
class DPMSolverPP3M(DPMSolverPPFamily):
    """DPM-Solver++(3M), the third-order multistep update of DPM-Solver's code and diffusers' scheduler.

    y_{i+1} = (sigma_{i+1}/sigma_i) y_i + phi_1 D_i + phi_2 D1 - c2 phi_3 D2 (see ``dpmpp_weights``).

    ``third_order`` "reference" (c2 = 1, as DPM-Solver, k-diffusion and diffusers) is globally second order: it
    weights D2 by half its exact value (measured order 2.0; at few steps it is the more accurate one), "exact"
    (c2 = 2, the quadratic through D_i, D_{i-1}, D_{i-2} integrated exactly) is third order (measured 3.0).
    Warm-up: DDIM, then a 2M step of ``solver_type`` (DPM-Solver's default "midpoint"; k-diffusion's
    dpmpp_3m_sde uses "heun"). ``lower_order_final`` "reference": DPM-Solver's rule (N <= 10).
    N steps, N NFE; the final step to 0 returns D.
    """

    name: ClassVar[str] = "dpmpp_3m"
    order: ClassVar[int] = 3
    solver_type: str = "midpoint"
    third_order: str = "reference"
    lower_order_final: str = "reference"


@SOLVERS.register
@dataclass(frozen=True)
class UniPC(ExponentialMultistep):
    """UniPC-p (Zhao et al. 2023), data prediction: the predictor UniP-p and the corrector UniC-p, which refits
    the step just taken with the network value at its end, the very value the next step needs anyway, so it costs
    no evaluation. UniC-p raises the order of accuracy by one: global order p + 1 (checked in the tests).

    ``variant`` picks B(h) for the two-node rules (UniP-2, UniC-1): "bh1" B(h) = h, "bh2" B(h) = e^h - 1 (in the
    data-prediction sign convention 1 - e^-h); with more nodes the coefficients are solved exactly and B(h) cancels.
    The corrector is skipped after churn (the step no longer starts where the previous one ended) and on the final
    step, whose output D(y_{N-1}) does not depend on y_{N-1}'s correction. ``lower_order_final`` "reference":
    UniPC's reference code (uni_pc.py) and diffusers' UniPCMultistepScheduler lower the last steps at every N.
    One evaluation per step: N steps, N NFE.
    """

    name: ClassVar[str] = "unipc"
    corrects: ClassVar[bool] = True
    reference_rule: ClassVar[tuple[float, str]] = (math.inf, "UniPC")
    order: int = 3
    variant: str = "bh2"
    lower_order_final: str = "reference"

    def __post_init__(self):
        super().__post_init__()
        if self.variant not in ("bh1", "bh2"):
            raise ConfigError(f"unipc variant must be 'bh1' or 'bh2', got {self.variant!r}")

    def b(self, h):
        """UniPC's B(h) for the two-node rules."""
        return h if self.variant == "bh1" else -math.expm1(-h)

    def predictor(self, nodes, h, sigma, sigma_to):
        return Update(sigma_to / sigma, exponential_weights(nodes, h, self.b(h)))


# ---------------------------------------------------------------------------------------------------------------
# Adams-Bashforth in sigma on eps = dy/dsigma.


class SigmaMultistep(LinearMultistep):
    """y_{i+1} = y_i + sum_j w_ij eps_{i-j}: eps extrapolated by a polynomial through the history, of degree
    min(order, i + 1) - 1 in ``variable`` (sigma if None), and integrated over [sigma_i, sigma_{i+1}] (to sigma = 0 on
    the final step): w_ij = int_{sigma_i}^{sigma_{i+1}} L_j(variable(sigma)) dsigma."""

    predicts: ClassVar[str] = "eps"
    variable: ClassVar[Callable[[np.ndarray], np.ndarray] | None] = None
    order: int

    def weights(self, nodes: list[float], sigma: float, sigma_next: float) -> tuple[float, ...]:
        """Weights on eps at ``nodes`` (values of ``variable``, newest first) for the step sigma -> sigma_next."""
        return integrate_basis(nodes, sigma, sigma_next, variable=self.variable)

    def updates(self, sigma_hat, sigma_next, starts):
        values = sigma_hat if self.variable is None else self.variable(np.array(sigma_hat)).tolist()
        out = []
        for i, order in enumerate(step_orders(starts, self.order)):
            offsets = distinct_offsets(values, i, order, starts[i])
            weights = self.weights([values[i - j] for j in offsets], sigma_hat[i], sigma_next[i])
            out.append((Update(1.0, spread(weights, offsets)), None))
        return out


@SOLVERS.register
@dataclass(frozen=True)
class LMS(SigmaMultistep):
    """Linear multistep in sigma (k-diffusion's lms): w_ij = int_{sigma_i}^{sigma_{i+1}} L_j(sigma) dsigma for the
    Lagrange basis on the previous noise levels: variable-step Adams-Bashforth, global order ``order``.
    Equals iPNDM with variable-step coefficients ("iPNDM_v"). N steps, N NFE."""

    name: ClassVar[str] = "lms"
    order: int = 4

    def __post_init__(self):
        check_order(self.name, self.order, 4)


@SOLVERS.register
@dataclass(frozen=True)
class IPNDM(SigmaMultistep):
    """iPNDM (Zhang & Chen 2023, the DEIS paper's improved PNDM): Adams-Bashforth in sigma on the EDM ODE derivative
    with the fixed, equal-step coefficients (1; 3/2, -1/2; 23/12, -16/12, 5/12; 55/24, -59/24, 37/24, -9/24),
    warmed up with the lower-order ones instead of PNDM's Runge-Kutta steps:
    y_{i+1} = y_i + (sigma_{i+1} - sigma_i) sum_j b_j eps_{i-j}.

    On a grid uniform in sigma its order is ``order``; on the usual non-uniform grids the fixed coefficients leave a
    local error of O(h^3) (the grid's curvature), so the global order is min(order, 2), with a small constant.
    For variable-step coefficients use ``lms``. N steps, N NFE.
    """

    name: ClassVar[str] = "ipndm"
    order: int = 4

    def __post_init__(self):
        check_order(self.name, self.order, 4)

    def weights(self, nodes, sigma, sigma_next):
        return tuple((sigma_next - sigma) * b for b in integrate_basis(range(0, -len(nodes), -1), 0.0, 1.0))


def vp_time(sigma: np.ndarray) -> np.ndarray:
    """t(sigma) of the VP SDE with the standard linear beta from 0.1 to 20 (Song et al. 2021)."""
    return _STANDARD_VP.sigma_inv(torch.from_numpy(np.asarray(sigma, dtype=np.float64))).numpy()


_STANDARD_VP = VPSchedule(fit_to_range=False)


@SOLVERS.register
@dataclass(frozen=True)
class DEIS(SigmaMultistep):
    """DEIS-tAB (Zhang & Chen 2023): the exponential integrator with eps parameterization, which in
    EDM's variables is y_{i+1} = y_i + int eps dsigma, with eps extrapolated by a polynomial in the VP time t
    through the previous points (Adams-Bashforth in t, 'tAB'):
    w_ij = int_{sigma_i}^{sigma_{i+1}} L_j(t(sigma)) dsigma, with L_j the Lagrange basis on t(sigma_{i-j}).

    t(sigma) is the VP SDE's time for the standard linear beta from 0.1 to 20 (beta_d = 19.9, beta_min = 0.1), the
    schedule DEIS is formulated on, whatever schedule the sampler uses and whatever the sampled range (diff-sampler
    refits beta to the range instead); t(sigma) is smooth for sigma >= 0. (With polynomials in sigma, DEIS's rhoAB,
    this is ``lms``.) Global order ``order``. N steps, N NFE.
    """

    name: ClassVar[str] = "deis"
    order: int = 3
    variable = staticmethod(vp_time)

    def __post_init__(self):
        check_order(self.name, self.order, 3)
