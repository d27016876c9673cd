"""An independent, literal transcription of EDM's samplers (FACTS.md section 1, EDM Algorithm 2) for tests.

Deliberately naive and self-contained (no toolkit code): per-step 0-d float64 tensor arithmetic written straight
from the formulas. It is checked against the original code's outputs (fixture edm_samplers) and then serves as
the oracle for option combinations the fixture does not cover.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from edm_toolkit.protocol import DenoiserBase


def reference_sampler(
    net, latents, class_labels=None, randn_like=torch.randn_like, num_steps=18, sigma_min=None, sigma_max=None,
    rho=7.0, solver="heun", discretization="edm", schedule="linear", scaling="none", epsilon_s=1e-3, C_1=0.001,
    C_2=0.008, M=1000, alpha=1.0, S_churn=0.0, S_min=0.0, S_max=math.inf, S_noise=1.0,
):
    f64 = torch.float64

    def vp_sigma(beta_d, beta_min, t):
        t = torch.as_tensor(t, dtype=f64)
        return (math.e ** (0.5 * beta_d * t**2 + beta_min * t) - 1) ** 0.5

    defaults = {
        "vp": (float(vp_sigma(19.9, 0.1, epsilon_s)), float(vp_sigma(19.9, 0.1, 1.0))),
        "ve": (0.02, 100.0), "iddpm": (0.002, 81.0), "edm": (0.002, 80.0),
    }[discretization]
    sigma_min = defaults[0] if sigma_min is None else sigma_min
    sigma_max = defaults[1] if sigma_max is None else sigma_max
    sigma_min = max(sigma_min, net.sigma_min)
    sigma_max = min(sigma_max, net.sigma_max)

    beta_d = 2 * (np.log(sigma_min**2 + 1) / epsilon_s - np.log(sigma_max**2 + 1)) / (epsilon_s - 1)
    beta_min = np.log(sigma_max**2 + 1) - 0.5 * beta_d

    i = torch.arange(num_steps, dtype=f64)
    if discretization == "vp":
        sigma_steps = vp_sigma(beta_d, beta_min, 1 + i / (num_steps - 1) * (epsilon_s - 1))
    elif discretization == "ve":
        sigma_steps = (sigma_max**2 * (sigma_min**2 / sigma_max**2) ** (i / (num_steps - 1))).sqrt()
    elif discretization == "iddpm":
        u = torch.zeros(M + 1, dtype=f64)
        abar = lambda j: (0.5 * np.pi * torch.as_tensor(j) / M / (C_2 + 1)).sin() ** 2  # float32, as EDM
        for j in range(M, 0, -1):
            u[j - 1] = ((u[j] ** 2 + 1) / (abar(j - 1) / abar(j)).clip(min=C_1) - 1).sqrt()
        kept = u[(u >= sigma_min) & (u <= sigma_max)]
        sigma_steps = kept[((len(kept) - 1) / (num_steps - 1) * i).round().to(torch.int64)]
    else:
        sigma_steps = (sigma_max ** (1 / rho) + i / (num_steps - 1) * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho

    if schedule == "vp":
        sigma = lambda t: vp_sigma(beta_d, beta_min, t)
        sigma_d = lambda t: 0.5 * (beta_min + beta_d * t) * (sigma(t) + 1 / sigma(t))
        sigma_inv = lambda s: ((beta_min**2 + 2 * beta_d * (s**2 + 1).log()).sqrt() - beta_min) / beta_d
    elif schedule == "ve":
        sigma, sigma_d, sigma_inv = (lambda t: t.sqrt()), (lambda t: 0.5 / t.sqrt()), (lambda s: s**2)
    else:
        sigma, sigma_d, sigma_inv = (lambda t: t), (lambda t: 1), (lambda s: s)
    if scaling == "vp":
        s = lambda t: 1 / (1 + sigma(t) ** 2).sqrt()
        s_d = lambda t: -sigma(t) * sigma_d(t) * s(t) ** 3
    else:
        s, s_d = (lambda t: 1), (lambda t: 0)

    def deriv(x, t):
        D = net(x / s(t), sigma(t), class_labels).to(f64)
        return (sigma_d(t) / sigma(t) + s_d(t) / s(t)) * x - sigma_d(t) * s(t) / sigma(t) * D

    t_steps = sigma_inv(torch.as_tensor(net.round_sigma(sigma_steps), dtype=f64))
    t_steps = torch.cat([t_steps, torch.zeros_like(t_steps[:1])])
    x = latents.to(f64) * (sigma(t_steps[0]) * s(t_steps[0]))
    for n, (t_cur, t_next) in enumerate(zip(t_steps[:-1], t_steps[1:])):
        gamma = min(S_churn / num_steps, math.sqrt(2) - 1) if S_min <= sigma(t_cur) <= S_max else 0
        t_hat = sigma_inv(torch.as_tensor(net.round_sigma(sigma(t_cur) + gamma * sigma(t_cur)), dtype=f64))
        noise = randn_like(x)
        x_hat = s(t_hat) / s(t_cur) * x + (sigma(t_hat) ** 2 - sigma(t_cur) ** 2).clip(min=0).sqrt() * s(t_hat) * S_noise * noise
        h = t_next - t_hat
        d = deriv(x_hat, t_hat)
        if solver == "euler" or n == num_steps - 1:
            x = x_hat + h * d
        else:
            d2 = deriv(x_hat + alpha * h * d, t_hat + alpha * h)
            x = x_hat + h * ((1 - 1 / (2 * alpha)) * d + 1 / (2 * alpha) * d2)
    return x


class AnalyticDenoiser(DenoiserBase):
    """The fixture's float64 stand-in net: D = (s2 x + sigma^2 mu)/(s2 + sigma^2) + c sigma/(1 + sigma^2) tanh(x).

    Records the sigma of every call.
    """

    def __init__(self, mu, s2=0.25, c=0.1):
        super().__init__()
        self.mu, self.s2, self.c = mu.to(torch.float64), float(s2), float(c)
        self.img_channels, self.img_resolution = mu.shape[1], mu.shape[-1]
        self.sigmas: list[float] = []

    def forward(self, x, sigma, class_labels=None):
        x = x.to(torch.float64)
        sigma = torch.as_tensor(sigma, dtype=torch.float64).reshape(-1, 1, 1, 1)
        self.sigmas.extend(sigma.flatten().tolist())
        return (self.s2 * x + sigma**2 * self.mu) / (self.s2 + sigma**2) + self.c * sigma / (1 + sigma**2) * torch.tanh(x)


def toolkit_options(kwargs: dict) -> dict:
    """Translates ablation_sampler keyword arguments into toolkit Sampler options."""
    disc = kwargs.get("discretization", "edm")
    disc_params = {"edm": {"rho": kwargs.get("rho", 7.0)}, "vp": {"epsilon_s": kwargs.get("epsilon_s", 1e-3)},
                   "iddpm": {k: kwargs.get(k, d) for k, d in (("C_1", 0.001), ("C_2", 0.008), ("M", 1000))},
                   "ve": {}}[disc]
    solver = kwargs.get("solver", "heun")
    return dict(
        num_steps=kwargs.get("num_steps", 18),
        sigma_min=kwargs.get("sigma_min"), sigma_max=kwargs.get("sigma_max"),
        solver={"name": solver, **({"alpha": kwargs.get("alpha", 1.0)} if solver == "heun" else {})},
        discretization={"name": disc, **disc_params},
        schedule={"name": kwargs.get("schedule", "linear"),
                  **({"epsilon_s": kwargs.get("epsilon_s", 1e-3)} if kwargs.get("schedule") == "vp" else {})},
        scaling=kwargs.get("scaling", "none"),
        S_churn=kwargs.get("S_churn", 0.0), S_min=kwargs.get("S_min", 0.0),
        S_max=kwargs.get("S_max", math.inf), S_noise=kwargs.get("S_noise", 1.0),
    )
