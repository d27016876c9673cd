"""Moving averages of the network weights: EDM's half-life EMA with ramp-up, and EDM2's power-function EMA with
post-hoc reconstruction of any other profile from stored snapshots.

Both averages have the same protocol: ``update(nimg, batch)`` after every optimizer step, where ``nimg`` counts
the training images including this step's ``batch``; ``modules`` are the averaged copies of the network (eval
mode, no gradients, buffers as the network's); ``state_dict`` / ``load_state_dict`` for resume.

Power-function profiles (Karras et al. 2024, "Analyzing and improving the training dynamics of diffusion
models", Sec. 3 and App. C). At training time t (in images), the average with exponent gamma weights the past
weights theta(tau) with the density p(tau) = (gamma + 1) tau^gamma / t^(gamma + 1) on [0, t]; its width relative
to t is sigma_rel = sqrt((gamma + 1) / ((gamma + 2)^2 (gamma + 3))). Tracked with one step per batch, the
update factor is beta = (1 - batch/t)^(gamma + 1). Two such profiles have the inner product (integral of the
product of their densities, derived from the density above)

    <a, b> = (gamma_a + 1)(gamma_b + 1) (t_a/t_b)^(gamma_b if t_a < t_b else -gamma_a)
             / ((gamma_a + gamma_b + 1) max(t_a, t_b)),

so the profile (t, gamma) is approximated by a combination sum_i x_i p_i of stored snapshots p_i by least
squares: x = A^-1 b with A_ij = <p_i, p_j>, b_i = <p_i, p_target>, then renormalised to sum 1 (EDM2's
reconstruction). Valid profiles have 0 < sigma_rel < 0.289 (gamma > -1 at the upper end).
"""

from __future__ import annotations

import copy
import math
from typing import Sequence

import numpy as np
import torch
from torch import nn

from ..errors import ConfigError

SIGMA_REL_MAX = 0.289  # EDM2's bound: sigma_rel -> sqrt(1/12) = 0.2887 as gamma -> 0


def check_sigma_rel(sigma_rel: float) -> float:
    sigma_rel = float(sigma_rel)
    if not 0 < sigma_rel < SIGMA_REL_MAX:
        raise ConfigError(f"sigma_rel must lie in (0, {SIGMA_REL_MAX}), got {sigma_rel} (EDM2 uses 0.05 and 0.10)")
    return sigma_rel


def sigma_rel_to_gamma(sigma_rel: float) -> float:
    """The exponent gamma of the power profile of width sigma_rel: the largest real root of
    gamma^3 + 7 gamma^2 + (16 - sigma_rel^-2) gamma + (12 - sigma_rel^-2) (EDM2 Eq. 126, Algorithm 2)."""
    t = check_sigma_rel(sigma_rel) ** -2
    roots = np.roots([1.0, 7.0, 16.0 - t, 12.0 - t])
    return float(roots[np.abs(roots.imag) < 1e-9].real.max())


def gamma_to_sigma_rel(gamma: float) -> float:
    """sigma_rel = sqrt((gamma + 1) / ((gamma + 2)^2 (gamma + 3))) (EDM2 Eq. 123)."""
    gamma = float(gamma)
    if not gamma > -1:
        raise ConfigError(f"a power profile needs gamma > -1, got {gamma}")
    return math.sqrt((gamma + 1) / ((gamma + 2) ** 2 * (gamma + 3)))


def power_ema_beta(gamma: float, nimg: int, batch: int) -> float:
    """beta = (1 - batch/nimg)^(gamma + 1) for the update that brings the count to nimg (EDM2 Eq. 127); 0 at the
    first update, so the average starts as the network itself."""
    return (1.0 - batch / nimg) ** (gamma + 1.0)


def power_profile_inner(t_a, gamma_a, t_b, gamma_b) -> np.ndarray:
    """<a, b> of two power profiles ending at times t_a, t_b (broadcasting numpy arrays; see the module text)."""
    t_a, gamma_a, t_b, gamma_b = (np.asarray(v, dtype=np.float64) for v in (t_a, gamma_a, t_b, gamma_b))
    exponent = np.where(t_a < t_b, gamma_b, -gamma_a)
    return (gamma_a + 1) * (gamma_b + 1) * (t_a / t_b) ** exponent / ((gamma_a + gamma_b + 1) * np.maximum(t_a, t_b))


def posthoc_coefficients(times: Sequence[float], sigma_rels: Sequence[float], target_time: float,
                         target_sigma_rels: Sequence[float]) -> np.ndarray:
    """Weights X [len(times), len(target_sigma_rels)] with which the stored profiles (times, sigma_rels) combine
    into the target profiles at target_time: least squares in the profiles' inner product, columns summing to 1."""
    times = np.asarray(times, dtype=np.float64).reshape(-1, 1)
    gammas = np.asarray([sigma_rel_to_gamma(s) for s in sigma_rels]).reshape(-1, 1)
    targets = np.asarray([sigma_rel_to_gamma(s) for s in target_sigma_rels]).reshape(1, -1)
    if times.size == 0 or not np.all(times > 0):
        raise ConfigError("post-hoc EMA needs snapshots at times > 0")
    A = power_profile_inner(times, gammas, times.T, gammas.T)
    b = power_profile_inner(times, gammas, float(target_time), targets)
    try:
        X = np.linalg.solve(A, b)
    except np.linalg.LinAlgError:
        raise ConfigError("the snapshots' profiles are linearly dependent (a snapshot stored twice?)") from None
    return X / X.sum(axis=0, keepdims=True)


def _averaged_copy(net: nn.Module) -> nn.Module:
    return copy.deepcopy(net).eval().requires_grad_(False)


def _parameters(module: nn.Module) -> list[torch.Tensor]:
    """The parameter objects (updated in place by the optimizer and load_state_dict), listed once."""
    return list(module.parameters())


class HalfLifeEMA:
    """EDM's EMA (training_loop.py): half-life h = halflife_nimg images, ramped up as h = min(h, rampup_ratio
    nimg_before) with nimg_before the image count before this step; beta = 0.5^(batch / max(h, 1e-8));
    ema = net + beta (ema - net), parameters only. ``rampup_ratio=None`` turns the ramp-up off (--transfer)."""

    def __init__(self, net: nn.Module, halflife_nimg: float, rampup_ratio: float | None = 0.05):
        if not halflife_nimg >= 0 or (rampup_ratio is not None and not rampup_ratio > 0):
            raise ConfigError(f"EMA needs halflife >= 0 and rampup_ratio > 0, got {halflife_nimg}, {rampup_ratio}")
        self.net = net
        self.halflife_nimg = float(halflife_nimg)
        self.rampup_ratio = rampup_ratio
        self.module = _averaged_copy(net)
        self._pairs = (_parameters(self.module), _parameters(net))

    @property
    def modules(self) -> list[nn.Module]:
        return [self.module]

    def beta(self, nimg: int, batch: int) -> float:
        halflife = self.halflife_nimg
        if self.rampup_ratio is not None:
            halflife = min(halflife, (nimg - batch) * self.rampup_ratio)
        return 0.5 ** (batch / max(halflife, 1e-8))

    @torch.no_grad()
    def update(self, nimg: int, batch: int) -> None:
        beta = self.beta(nimg, batch)
        torch._foreach_lerp_(*self._pairs, 1.0 - beta)

    def state_dict(self) -> dict:
        return {"ema": self.module.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.module.load_state_dict(state["ema"])


class PowerFunctionEMA:
    """EDM2's power-function EMAs, one copy of the network per sigma_rel (EDM2 tracks 0.05 and 0.10).

    After the update that brings the image count to nimg, copy k is the average of the network's past weights
    with the density (gamma_k + 1) tau^gamma_k / nimg^(gamma_k + 1); snapshots of these at several times let
    ``posthoc_coefficients`` reconstruct any other profile afterwards (``edm phema``).
    """

    def __init__(self, net: nn.Module, sigma_rels: Sequence[float] = (0.05, 0.10)):
        self.net = net
        self.sigma_rels = tuple(check_sigma_rel(s) for s in sigma_rels)
        if len(set(self.sigma_rels)) != len(self.sigma_rels):
            raise ConfigError(f"power EMA widths must be distinct, got {list(self.sigma_rels)}")
        self.gammas = tuple(sigma_rel_to_gamma(s) for s in self.sigma_rels)
        self.modules = [_averaged_copy(net) for _ in self.sigma_rels]
        self._net_params = _parameters(net)
        self._ema_params = [_parameters(m) for m in self.modules]

    @torch.no_grad()
    def update(self, nimg: int, batch: int) -> None:
        for gamma, params in zip(self.gammas, self._ema_params):
            torch._foreach_lerp_(params, self._net_params, 1.0 - power_ema_beta(gamma, nimg, batch))

    def state_dict(self) -> dict:
        return {"sigma_rels": list(self.sigma_rels), "emas": [m.state_dict() for m in self.modules]}

    def load_state_dict(self, state: dict) -> None:
        if [float(s) for s in state["sigma_rels"]] != list(self.sigma_rels):
            raise ConfigError(f"the state tracks power EMAs {state['sigma_rels']}, this run {list(self.sigma_rels)}")
        for module, module_state in zip(self.modules, state["emas"]):
            module.load_state_dict(module_state)
