"""Shared by the accuracy benchmarks: samplers on the ideal denoiser of the built-in image set versus the exact
probability-flow ODE solution, error at the last non-zero noise level, median over seeds."""

from __future__ import annotations

import math

import torch

from edm_toolkit.default_model import default_model
from edm_toolkit.ideal import solve_pf_ode
from edm_toolkit.rng import SeedGenerators
from edm_toolkit.sampling import Sampler


class AccuracyProbe:
    """Median over seeds of the RMS error of x/s at sigma_{N-1} against the exact PF-ODE (scipy DOP853)."""

    def __init__(self, num_seeds: int = 32, rtol: float = 1e-10):
        self.net = default_model()
        self.latents = SeedGenerators(range(num_seeds)).randn([num_seeds, 3, 32, 32], dtype=torch.float64)
        self.rtol = rtol
        self._exact: dict[tuple[float, float], torch.Tensor] = {}

    def exact(self, sigma_start: float, sigma_end: float) -> torch.Tensor:
        key = (sigma_start, sigma_end)
        if key not in self._exact:
            self._exact[key] = solve_pf_ode(self.net, self.latents * sigma_start, sigma_start, sigma_end,
                                            rtol=self.rtol, atol=self.rtol)
        return self._exact[key]

    def error(self, sampler: Sampler) -> tuple[int, float]:
        """(network evaluations actually used, median error)."""
        plan = sampler.plan(self.net)
        n = sampler.num_steps
        states = {}
        sampler(self.net, self.latents, callback=lambda info: states.__setitem__(info.step, info), plan=plan)
        s0, s1 = float(plan.sigma_steps[0]), float(plan.sigma_steps[n - 1])
        s_end = 1 / math.sqrt(1 + s1**2) if sampler.scaling.name == "vp" else 1.0
        per_seed = ((states[n - 1].x / s_end - self.exact(s0, s1)) ** 2).flatten(1).mean(1).sqrt()
        return states[n].nfe, float(per_seed.median())
