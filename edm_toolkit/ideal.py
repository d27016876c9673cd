"""The ideal denoiser of a finite dataset, in closed form, and the exact solution of its probability-flow ODE.

For data points y_1..y_n, each optionally widened into a Gaussian N(y_i, s^2 I), the noisy data at level sigma
is the mixture sum_i w_i N(y_i, (s^2 + sigma^2) I), and the minimiser of EDM's denoising loss (Eq. 2-3) is

    D(x; sigma) = E[x_0 | x] = sum_i r_i(x) (s^2 x + sigma^2 y_i) / (s^2 + sigma^2),
    r_i(x) = softmax_i(log w_i - |x - y_i|^2 / (2 (s^2 + sigma^2))).

It needs no training, so samplers can be checked against exact answers and the CLI has a model to run.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from .protocol import DenoiserBase


class IdealDenoiser(DenoiserBase):
    """D(x; sigma) for the data ``data`` [n, C, H, W] (float64), optionally labelled for class conditioning.

    ``labels`` [n] (int) with ``label_dim`` classes makes it conditional: a one-hot ``class_labels`` row restricts
    the mixture to that class (a row of zeros, or None, keeps every point). Follows EDM's denoiser protocol:
    continuous sigma (round_sigma is the identity), sigma range [0, inf).
    """

    def __init__(self, data: torch.Tensor, labels: torch.Tensor | None = None, label_dim: int = 0, width: float = 0.0):
        super().__init__()
        if data.ndim != 4:
            raise ValueError(f"data must be [n, C, H, W], got shape {tuple(data.shape)}")
        if not width >= 0:
            raise ValueError(f"width must be >= 0, got {width}")
        if labels is not None and (labels.shape != data.shape[:1] or label_dim < 1 or int(labels.max()) >= label_dim):
            raise ValueError("labels must be [n] integers in [0, label_dim)")
        self.register_buffer("data", data.to(torch.float64))
        self.register_buffer("labels", None if labels is None else labels.to(torch.int64))
        self.label_dim = int(label_dim) if labels is not None else 0
        self.width = float(width)
        self.img_channels = data.shape[1]
        self.img_resolution = data.shape[-1]

    def config(self) -> dict:
        return {"type": "ideal", "label_dim": self.label_dim, "width": self.width,
                "shape": list(self.data.shape), "labelled": self.labels is not None}

    def log_prior(self, class_labels: torch.Tensor | None, batch: int) -> torch.Tensor:
        """log w_i per batch row: uniform, or restricted to the class(es) that ``class_labels`` selects."""
        n = self.data.shape[0]
        if class_labels is None or self.labels is None:
            return torch.zeros(1, n, dtype=torch.float64, device=self.data.device)
        weights = class_labels.to(torch.float64).reshape(-1, self.label_dim)[:, self.labels]  # [B or 1, n]
        weights = torch.where(weights.sum(dim=1, keepdim=True) > 0, weights, torch.ones_like(weights))
        return weights.log()

    def posterior(self, x: torch.Tensor, sigma, class_labels=None) -> torch.Tensor:
        """r_i(x) [B, n]: the probability that x was noised from point i."""
        x = x.to(torch.float64).flatten(1)
        var = self.width**2 + _as_column(sigma, x) ** 2
        sq_dist = torch.cdist(x, self.data.flatten(1), compute_mode="donot_use_mm_for_euclid_dist") ** 2
        return torch.softmax(self.log_prior(class_labels, len(x)) - sq_dist / (2 * var), dim=1)

    def forward(self, x, sigma, class_labels=None, **unused):
        shape = x.shape
        x = x.to(torch.float64)
        sigma = _as_column(sigma, x.flatten(1))
        r = self.posterior(x, sigma, class_labels)
        data = self.data.flatten(1)
        # sum_i r_i y_i as a batched product: unlike one [B, n] @ [n, D] matmul, every row is computed by the
        # same kernel whatever B is, so an image does not depend on the batch it was drawn in.
        mean = torch.bmm(r.unsqueeze(1), data.expand(len(r), *data.shape)).squeeze(1)
        if self.width == 0:
            return mean.reshape(shape)
        s2 = self.width**2
        return ((s2 * x.flatten(1) + sigma**2 * mean) / (s2 + sigma**2)).reshape(shape)


def _as_column(sigma, x):
    return torch.as_tensor(sigma, dtype=torch.float64, device=x.device).reshape(-1, 1)


def solve_pf_ode(
    denoiser, x: torch.Tensor, sigma_start: float, sigma_end: float, class_labels=None, rtol: float = 1e-12,
    atol: float = 1e-12,
) -> torch.Tensor:
    """The exact probability-flow ODE solution dx/dsigma = (x - D(x; sigma))/sigma from sigma_start to sigma_end.

    Solved with scipy's DOP853 in u = ln sigma (dx/du = x - D(x; e^u), smooth at every scale) to tight
    tolerances, as ground truth for solver accuracy. Any schedule and scaling give the same trajectory of x/s(t)
    (EDM Eq. 4), so this one solution serves them all.
    """
    from scipy.integrate import solve_ivp

    shape = x.shape

    def rhs(u, y):
        xt = torch.from_numpy(y).reshape(shape)
        return (xt - denoiser(xt, math.exp(u), class_labels).to(torch.float64)).flatten().numpy()

    y0 = x.to(torch.float64).flatten().numpy()
    result = solve_ivp(rhs, (math.log(sigma_start), math.log(sigma_end)), y0, method="DOP853", rtol=rtol, atol=atol)
    if not result.success:
        raise RuntimeError(f"reference ODE solve failed: {result.message}")
    return torch.from_numpy(np.ascontiguousarray(result.y[:, -1])).reshape(shape)
