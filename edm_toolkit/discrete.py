"""Discrete-time Gaussian diffusion (DDPM, iDDPM, ADM): a model's own step grid, its beta schedules, respacing.

A model trained on T steps has abar_t = prod_{s<=t} (1 - beta_s), t = 0..T-1; in EDM's terms (Karras et al.
2022, Table 1, VP scaling) step t is the noise level sigma_t = sqrt((1 - abar_t)/abar_t), and its input
x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps is EDM's x = x_0 + sigma_t eps scaled by s = 1/sqrt(1 + sigma_t^2).
:class:`StepGrid` is that grid as a capability of the denoiser protocol (:mod:`edm_toolkit.protocol`): what the
original samplers (``ddpm``, ``ddim`` in :mod:`edm_toolkit.solvers.discrete`) and classifier guidance need.
Respacing (Nichol & Dhariwal 2021, Sec. 4) keeps a subset of the steps (:func:`space_timesteps`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property
from typing import Sequence

import torch

from .errors import ConfigError

__all__ = ["MAX_TIMESTEPS", "NOISE_SCHEDULES", "VARIANCES", "StepGrid", "named_beta_schedule", "nearest_index",
           "respaced_count", "space_timesteps"]

NOISE_SCHEDULES = ("linear", "cosine")
VARIANCES = ("learned", "small", "large")
MAX_TIMESTEPS = 100_000  # tables are built step by step: bound the work a file or flag can ask for


def nearest_index(sigma: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
    """Index of the level nearest to each sigma (int64, sigma's shape), compared in the levels' dtype.

    The dtype matters for parity: EDM's iDDPM preconditioner compares in float32 against its float32 table,
    guided-diffusion grids are float64.
    """
    sigma = torch.as_tensor(sigma)
    distance = (sigma.to(levels.device, levels.dtype).reshape(-1, 1) - levels.reshape(1, -1)).abs()
    return distance.argmin(dim=1).reshape(sigma.shape).to(sigma.device)


@dataclass(frozen=True, eq=False)
class StepGrid:
    """A model's discrete step grid: ``alphas_cumprod`` abar_t, t = 0..T-1 (float64, decreasing).

    ``variance`` is the model's own reverse-process variance as the original's ``create_gaussian_diffusion``
    chose it: 'learned' (learn_sigma: the network also outputs the interpolation v of Nichol & Dhariwal 2021,
    Eq. 15), 'small' (beta_tilde) or 'large' (beta).
    """

    alphas_cumprod: torch.Tensor
    variance: str = "small"

    def __post_init__(self):
        abar = torch.as_tensor(self.alphas_cumprod).detach().to("cpu", torch.float64)
        if abar.ndim != 1 or not 1 <= len(abar) <= MAX_TIMESTEPS:
            raise ConfigError(f"a step grid needs 1 to {MAX_TIMESTEPS} steps, got shape {tuple(abar.shape)}")
        if not bool(((abar > 0) & (abar <= 1)).all()) or not bool((abar.diff() < 0).all()):
            raise ConfigError("a step grid needs decreasing alphas_cumprod in (0, 1]")
        if self.variance not in VARIANCES:
            raise ConfigError(f"unknown variance {self.variance!r}; choose one of: {', '.join(VARIANCES)}")
        object.__setattr__(self, "alphas_cumprod", abar)

    @classmethod
    def from_betas(cls, betas: torch.Tensor, variance: str = "small") -> "StepGrid":
        return cls(torch.cumprod(1 - torch.as_tensor(betas, dtype=torch.float64), dim=0), variance)

    @classmethod
    def from_sigmas(cls, sigmas: torch.Tensor, variance: str = "small") -> "StepGrid":
        """The grid of increasing noise levels sigma_t: abar_t = 1/(1 + sigma_t^2)."""
        return cls(1 / (1 + torch.as_tensor(sigmas).detach().to("cpu", torch.float64) ** 2), variance)

    @property
    def num_timesteps(self) -> int:
        return len(self.alphas_cumprod)

    @cached_property
    def sigmas(self) -> torch.Tensor:
        """sigma_t = sqrt((1 - abar_t)/abar_t), increasing (float64)."""
        return ((1 - self.alphas_cumprod) / self.alphas_cumprod).sqrt()

    def index(self, sigma: torch.Tensor) -> torch.Tensor:
        """The step t whose level is nearest to each sigma (int64)."""
        return nearest_index(sigma, self.sigmas)


def named_beta_schedule(name: str, num_timesteps: int) -> torch.Tensor:
    """float64 betas of the original ``get_named_beta_schedule``, value for value.

    linear (Ho et al. 2020, stretched to any T): ``linspace(s * 1e-4, s * 0.02, T)`` with s = 1000/T, evaluated
    as numpy does (start + i * step, last value exactly the end). cosine (Nichol & Dhariwal 2021, Eq. 17):
    ``beta_i = min(1 - abar((i+1)/T) / abar(i/T), 0.999)`` with ``abar(t) = cos^2((t + 0.008)/1.008 * pi/2)``.
    """
    check_schedule(name, num_timesteps)
    if name == "linear":
        scale = 1000 / num_timesteps
        start, end = scale * 0.0001, scale * 0.02
        if num_timesteps == 1:
            return torch.tensor([start], dtype=torch.float64, device="cpu")
        step = (end - start) / (num_timesteps - 1)
        betas = torch.arange(num_timesteps, dtype=torch.float64, device="cpu") * step + start
        betas[-1] = end
        return betas

    def alpha_bar(t: float) -> float:
        return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

    T = num_timesteps
    return torch.tensor(
        [min(1 - alpha_bar((i + 1) / T) / alpha_bar(i / T), 0.999) for i in range(T)],
        dtype=torch.float64,
        device="cpu",
    )


def check_schedule(name: str, num_timesteps: int) -> None:
    """A named beta schedule and its length T, validated (1 <= T <= MAX_TIMESTEPS)."""
    if name not in NOISE_SCHEDULES:
        raise ConfigError(f"unknown noise schedule {name!r}; choose one of: {', '.join(NOISE_SCHEDULES)}")
    if isinstance(num_timesteps, bool) or not isinstance(num_timesteps, int) or not 1 <= num_timesteps <= MAX_TIMESTEPS:
        raise ConfigError(f"diffusion_steps must be a positive integer of at most {MAX_TIMESTEPS}, got {num_timesteps!r}")


# ----------------------------------------------------------------------------------------------------------
# Respacing


def _section_counts(section_counts: str | Sequence[int]) -> tuple[str, int] | tuple[int, ...]:
    """("ddim", N) for "ddimN", else the section counts; () for "" (every step)."""
    if isinstance(section_counts, str):
        text = section_counts.strip()
        try:
            if text.startswith("ddim"):
                count = int(text[4:])
                if count < 1:
                    raise ValueError
                return ("ddim", count)
            counts = tuple(int(c) for c in text.split(",")) if text else ()
        except ValueError:
            raise ConfigError(f"bad respacing {section_counts!r}: use 'ddimN' or section counts like "
                              "'10,15,20'") from None
    else:
        counts = tuple(section_counts)
        if any(isinstance(c, bool) or not isinstance(c, int) for c in counts):
            raise ConfigError(f"section counts must be integers, got {section_counts!r}")
    if any(c < 0 for c in counts) or (counts and sum(counts) == 0):
        raise ConfigError(f"section counts must be >= 0 and keep at least one step, got {section_counts!r}")
    return counts


def respaced_count(section_counts: str | Sequence[int]) -> int | None:
    """How many steps a respacing keeps: N for "ddimN", the sum of the section counts, None for "" (every step)."""
    counts = _section_counts(section_counts)
    if not counts:
        return None
    return counts[1] if counts[0] == "ddim" else sum(counts)


def space_timesteps(num_timesteps: int, section_counts: str | Sequence[int]) -> list[int]:
    """The original step indices kept by a respacing, sorted (improved-diffusion's ``space_timesteps``).

    ``"ddimN"``: ``range(0, T, stride)`` for the smallest stride giving exactly N steps (DDIM's striding).
    Section counts (``"10,15,20"`` or a list): T is cut into len(counts) near-equal sections (the first T mod n
    one step longer) and section i keeps counts[i] steps at ``round(j * stride)``, stride = (size-1)/(count-1),
    accumulated by repeated addition and rounded half to even exactly as the original. ``""`` keeps every step.
    """
    if isinstance(num_timesteps, bool) or not isinstance(num_timesteps, int) or not 1 <= num_timesteps <= MAX_TIMESTEPS:
        raise ConfigError(f"num_timesteps must be a positive integer of at most {MAX_TIMESTEPS}, got {num_timesteps!r}")
    counts = _section_counts(section_counts)
    if not counts:
        return list(range(num_timesteps))
    if counts[0] == "ddim":
        for stride in range(1, num_timesteps):
            if len(range(0, num_timesteps, stride)) == counts[1]:
                return list(range(0, num_timesteps, stride))
        raise ConfigError(f"cannot take exactly {counts[1]} of {num_timesteps} steps with an integer stride "
                          f"(ddimN); use section counts like '{counts[1]}' instead")
    size_per, extra = divmod(num_timesteps, len(counts))
    kept, start = [], 0
    for i, count in enumerate(counts):
        size = size_per + (1 if i < extra else 0)
        if size < count:
            raise ConfigError(f"cannot take {count} steps from a section of {size} (T = {num_timesteps}, "
                              f"{len(counts)} sections)")
        stride = (size - 1) / (count - 1) if count > 1 else 1
        position = 0.0
        for _ in range(count):
            kept.append(start + round(position))
            position += stride
        start += size
    return sorted(set(kept))
