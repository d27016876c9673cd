"""Training losses: EDM's p_train(sigma) and lambda(sigma) (EDM Table 1, "Training"), and the discrete-time
Gaussian diffusion objectives of iDDPM on a model's own step grid.

The per-element loss of a denoiser D on clean images y is (EDM Eq. 8)

    lambda(sigma) (D(y + n; sigma) - y)^2,   n ~ N(0, sigma^2 I),   sigma ~ p_train.

Each such loss is a small class with the closed forms ``sample_sigma`` and ``weight``; calling it returns the
per-element loss of any denoiser on a batch, so any backbone can be trained in a user's own loop, and ``loss``
evaluates it for given sigma and noise.

The iddpm-* losses (:class:`DiscreteDiffusionLoss`; Nichol & Dhariwal 2021) draw a step t of the denoiser's own
:class:`~edm_toolkit.discrete.StepGrid` (``step_grid``) from a schedule sampler (uniform, or importance sampling
by the loss's second moment, :data:`STEP_SAMPLERS`), and add to L_simple the variational bound term L_{t-1} of
:func:`~edm_toolkit.discrete.vlb_terms`. Every loss returns per-element values whose sum over a sample's elements
is its per-sample loss, so a loop's ``loss.sum() / batch`` is the original objective.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from .discrete import StepGrid, vlb_terms
from .discretizations import iddpm_sigma_table
from .errors import ConfigError
from .registry import Registry
from .schedules import vp_sigma

__all__ = ["LOSSES", "STEP_SAMPLERS", "DenoisingLoss", "DiscreteDiffusionLoss", "EDMLoss", "IDDPMHybridLoss",
           "IDDPMKLLoss", "IDDPMLoss", "IDDPMSimpleLoss", "LossSecondMomentSampler", "StepSampler", "TrainingLoss",
           "UniformStepSampler", "VELoss", "VPLoss", "total_of"]

LOSSES: Registry["TrainingLoss"] = Registry("loss")


class TrainingLoss:
    """What a training loop sees of a loss: one interface for every registered loss.

    A draw of noise levels is split in two, so that a loop can make the random part per sample in its data
    workers (from each image's own generator, before any other draw of that image) and the state-dependent part
    at step time:

    * :meth:`draw_variates` ``(batch, generator, device) -> variates [batch, 1, 1, 1]``: the random numbers, a
      function of the generator only;
    * :meth:`noise_levels` ``(net, variates) -> (sigma, weight)``: the noise levels sigma [batch, 1, 1, 1] and
      the loss weights [batch, 1, 1, 1] they get (importance weights 1/(T p_t) of a schedule sampler; 1 for a
      loss that draws sigma from a fixed p_train), from the loss's current state;
    * :meth:`draw` is both at once.

    :meth:`element_terms` evaluates the loss's named terms per element for given clean images y, levels sigma
    and noise n (standard deviation sigma); :meth:`loss` is their sum, whose sum over a sample's elements is its
    loss (the objective is ``(loss * weight).sum() / batch``). :meth:`observe` feeds the unweighted losses of a
    step back to a stateful loss (every process's, gathered); :meth:`state_dict` / :meth:`load_state_dict` save
    and restore that state exactly for resume. ``loss_fn(net, images, labels, augment_pipe, generator)`` does a
    whole draw, evaluation and observation on a batch. ``draws_on_model_grid`` declares a loss that draws its
    levels on the denoiser's own step grid; ``reports_per_sample`` one whose values are reported per sample (the
    sum over a sample's elements, as its original reports them) rather than per element (EDM's Loss/loss);
    ``term_names`` the keys of :meth:`element_terms`.
    """

    name: ClassVar[str]
    draws_on_model_grid: ClassVar[bool] = False
    reports_per_sample: ClassVar[bool] = False
    term_names: ClassVar[tuple[str, ...]] = ("loss",)

    def draw_variates(self, batch: int, generator: torch.Generator | None = None, device="cpu") -> torch.Tensor:
        raise NotImplementedError

    def noise_levels(self, net, variates: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def draw(self, net, batch: int, generator: torch.Generator | None = None, device="cpu"):
        """(sigma [batch, 1, 1, 1] float32, weight [batch, 1, 1, 1] float32) of a fresh draw."""
        return self.noise_levels(net, self.draw_variates(batch, generator, device))

    def check_model(self, net) -> None:
        """Refuses, with the fix, a denoiser that this loss cannot train (nothing by default)."""

    def element_terms(self, net, y, sigma, n, labels=None, augment_labels=None) -> dict[str, torch.Tensor]:
        """The loss's named terms per element [N, C, H, W] (before the loss weights)."""
        raise NotImplementedError

    def loss(self, net, y, sigma, n, labels=None, augment_labels=None) -> torch.Tensor:
        """The per-element loss (before the loss weights): the sum of :meth:`element_terms`."""
        return total_of(self.element_terms(net, y, sigma, n, labels, augment_labels))

    def observe(self, net, sigma: torch.Tensor, losses: torch.Tensor) -> None:
        """Feeds the per-element losses [N, ...] (unweighted) of levels sigma to a stateful loss (a no-op here)."""

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The loss's state between steps (plain tensors; empty for a stateless loss)."""
        return {}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Restores :meth:`state_dict`; a stateless loss takes only an empty state."""
        if state:
            raise ConfigError(f"loss {self.name!r} keeps no state, but the saved state holds {sorted(state)[:3]}; "
                              "resume with the loss it was saved with")

    def __call__(self, net, images, labels=None, augment_pipe=None, generator: torch.Generator | None = None):
        """Per-element loss [N, C, H, W] of a fresh draw, weighted, in the draw order: the noise levels, then the
        augmentation ``augment_pipe(images, generator=generator) -> (y, augment_labels)`` (e.g.
        ``edm_toolkit.training.augment.AugmentPipe``), then the noise n; from ``generator``, or the global RNG when
        None (then ``torch.manual_seed(s)`` reproduces EDM's loss call). The unweighted losses are observed."""
        sigma, weight = self.draw(net, images.shape[0], generator, images.device)
        y, augment_labels = (images, None) if augment_pipe is None else augment_pipe(images, generator=generator)
        n = torch.randn(y.shape, generator=generator, device=y.device, dtype=y.dtype) * sigma
        losses = self.loss(net, y, sigma, n, labels, augment_labels)
        self.observe(net, sigma, losses)
        return losses * weight


def total_of(terms: dict[str, torch.Tensor]) -> torch.Tensor:
    """The sum of a loss's terms (a single term is returned as it is)."""
    values = list(terms.values())
    total = values[0]
    for value in values[1:]:
        total = total + value
    return total


class DenoisingLoss(TrainingLoss):
    """lambda(sigma) (D(y + n; sigma) - y)^2 with sigma ~ p_train: the variates are sigma itself, every weight 1."""

    def sample_sigma(self, batch: int, generator: torch.Generator | None = None, device="cpu") -> torch.Tensor:
        """Draws sigma ~ p_train, shaped [batch, 1, 1, 1] (float32, as EDM)."""
        raise NotImplementedError

    def weight(self, sigma: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def draw_variates(self, batch, generator=None, device="cpu"):
        return self.sample_sigma(batch, generator, device)

    def noise_levels(self, net, variates):
        return variates, torch.ones_like(variates)

    def element_terms(self, net, y, sigma, n, labels=None, augment_labels=None):
        """{'loss': lambda(sigma) (D(y + n; sigma) - y)^2} per element for given clean images y, noise levels sigma
        [N, 1, 1, 1] and noise n (standard deviation sigma); augment labels, when given, go to the network."""
        extra = {} if augment_labels is None else {"augment_labels": augment_labels}
        D_yn = net(y + n, sigma, labels, **extra)
        return {"loss": self.weight(sigma) * (D_yn - y) ** 2}


def _uniform(batch, generator, device):
    return torch.rand([batch, 1, 1, 1], generator=generator, device=device)


@LOSSES.register
@dataclass(frozen=True)
class EDMLoss(DenoisingLoss):
    """ln sigma ~ N(P_mean, P_std^2), lambda = (sigma^2 + sigma_data^2)/(sigma sigma_data)^2 (EDM Sec. 5)."""

    name: ClassVar[str] = "edm"
    P_mean: float = -1.2
    P_std: float = 1.2
    sigma_data: float = 0.5

    def __post_init__(self):
        if not (self.P_std > 0 and self.sigma_data > 0):
            raise ConfigError(f"edm loss needs P_std > 0 and sigma_data > 0, got {self.P_std}, {self.sigma_data}")

    def sample_sigma(self, batch, generator=None, device="cpu"):
        return (torch.randn([batch, 1, 1, 1], generator=generator, device=device) * self.P_std + self.P_mean).exp()

    def weight(self, sigma):
        return (sigma**2 + self.sigma_data**2) / (sigma * self.sigma_data) ** 2


@LOSSES.register
@dataclass(frozen=True)
class VPLoss(DenoisingLoss):
    """sigma = sigma_vp(t), t ~ U(epsilon_t, 1), lambda = 1/sigma^2 (DDPM++ cont., Song et al. 2021)."""

    name: ClassVar[str] = "vp"
    beta_d: float = 19.9
    beta_min: float = 0.1
    epsilon_t: float = 1e-5

    def __post_init__(self):
        if not (self.beta_d > 0 and 0 < self.epsilon_t < 1):
            raise ConfigError(f"vp loss needs beta_d > 0 and 0 < epsilon_t < 1, got {self.beta_d}, {self.epsilon_t}")

    def sigma(self, t):
        return vp_sigma(t, self.beta_d, self.beta_min)

    def sample_sigma(self, batch, generator=None, device="cpu"):
        return self.sigma(1 + _uniform(batch, generator, device) * (self.epsilon_t - 1))

    def weight(self, sigma):
        return 1 / sigma**2


@LOSSES.register
@dataclass(frozen=True)
class VELoss(DenoisingLoss):
    """sigma = sigma_min (sigma_max/sigma_min)^U, U ~ U(0, 1) (log-uniform), lambda = 1/sigma^2 (NCSN++ cont.)."""

    name: ClassVar[str] = "ve"
    sigma_min: float = 0.02
    sigma_max: float = 100.0

    def __post_init__(self):
        if not 0 < self.sigma_min < self.sigma_max:
            raise ConfigError(f"ve loss needs 0 < sigma_min < sigma_max, got {self.sigma_min}, {self.sigma_max}")

    def sample_sigma(self, batch, generator=None, device="cpu"):
        return self.sigma_min * ((self.sigma_max / self.sigma_min) ** _uniform(batch, generator, device))

    def weight(self, sigma):
        return 1 / sigma**2


@LOSSES.register
@dataclass(frozen=True)
class IDDPMLoss(DenoisingLoss):
    """sigma = u_j, j ~ U{0, ..., M-1}, lambda = 1/sigma^2 (EDM Table 1, column iDDPM: L_simple only; iDDPM's
    additional L_vlb term for the learned variances is iddpm-hybrid, on the model's own grid)."""

    name: ClassVar[str] = "iddpm"
    C_1: float = 0.001
    C_2: float = 0.008
    M: int = 1000

    def sample_sigma(self, batch, generator=None, device="cpu"):
        u = iddpm_sigma_table(self.C_1, self.C_2, self.M, dtype=torch.float32).to(device)
        j = torch.randint(self.M, [batch], generator=generator, device=device)
        return u[j].reshape(batch, 1, 1, 1)

    def weight(self, sigma):
        return 1 / sigma**2


# ----------------------------------------------------------------------------------------------------------
# Discrete-time Gaussian diffusion (iDDPM): schedule samplers and losses on the model's own grid

STEP_SAMPLERS: Registry["StepSampler"] = Registry("schedule sampler")


class StepSampler:
    """A distribution p_t over the T steps of a grid, and the loss weights 1/(T p_t) that keep the objective
    unbiased (improved-diffusion's ScheduleSampler). Its state (:meth:`state_dict`) is plain tensors, restored
    exactly by :meth:`load_state_dict` for resume.
    """

    name: ClassVar[str]

    def __init__(self, num_timesteps: int):
        self.num_timesteps = int(num_timesteps)

    def weights(self) -> torch.Tensor:
        """Unnormalised p_t (float64 [T])."""
        return torch.ones(self.num_timesteps, dtype=torch.float64)

    def probabilities(self) -> torch.Tensor:
        """p_t (float64 [T]): the weights normalised to sum 1."""
        w = self.weights()
        return w / w.sum()

    def loss_weights(self, t: torch.Tensor) -> torch.Tensor:
        """1/(T p_t) for steps t (float32, like the original's), on t's device."""
        p = self.probabilities().to(t.device)
        return (1 / (self.num_timesteps * p[t])).to(torch.float32)

    def steps_of(self, u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(t, 1/(T p_t)) for uniform draws u in [0, 1): t is the inverse CDF of p at u, found as numpy's
        ``RandomState.choice(T, p=p)`` finds it (cumulative sum normalised to 1, right-side search)."""
        cdf = self.probabilities().cumsum(0)
        t = torch.searchsorted((cdf / cdf[-1]).to(u.device), u.to(torch.float64), right=True)
        return t, self.loss_weights(t)

    def sample(self, batch: int, generator: torch.Generator | None = None, device="cpu"):
        """(t int64 [batch], weights float32 [batch]) from ``generator`` (the global RNG when None)."""
        return self.steps_of(torch.rand([batch], generator=generator, device=device, dtype=torch.float64))

    def update(self, t: torch.Tensor, losses: torch.Tensor) -> None:
        """Records the per-sample losses of steps t (every process's, gathered, when torch.distributed runs)."""

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"num_timesteps": torch.tensor(self.num_timesteps)}

    def state_layout(self, num_timesteps: int) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        """The keys of :meth:`state_dict` with their shapes and dtypes, for a grid of ``num_timesteps`` steps."""
        return {"num_timesteps": ((), torch.int64)}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Restores :meth:`state_dict`; a state of another sampler or grid size is refused."""
        steps = _check_state(state, {"num_timesteps": ((), torch.int64)}, self.name, exact=False)["num_timesteps"]
        _check_state(state, self.state_layout(int(steps)), self.name)
        self.num_timesteps = int(steps)
        self._load(state)

    def _load(self, state: dict[str, torch.Tensor]) -> None:
        """Takes the checked state's tensors."""


@STEP_SAMPLERS.register
class UniformStepSampler(StepSampler):
    """p_t = 1/T: every weight is 1 (the original's "uniform")."""

    name: ClassVar[str] = "uniform"


@STEP_SAMPLERS.register
class LossSecondMomentSampler(StepSampler):
    """Importance sampling of t by the loss's second moment (Nichol & Dhariwal 2021, Eq. 18; the original's
    "loss-second-moment"): uniform until every step holds ``history_per_term`` losses, then
    p_t proportional to sqrt(E[L_t^2]) over each step's last ``history_per_term`` losses, mixed with
    ``uniform_prob`` of the uniform distribution.
    """

    name: ClassVar[str] = "loss-second-moment"
    history_per_term: ClassVar[int] = 10
    uniform_prob: ClassVar[float] = 0.001

    def __init__(self, num_timesteps: int):
        super().__init__(num_timesteps)
        self.loss_history = torch.zeros([self.num_timesteps, self.history_per_term], dtype=torch.float64)
        self.loss_counts = torch.zeros([self.num_timesteps], dtype=torch.int64)

    @property
    def warmed_up(self) -> bool:
        return bool((self.loss_counts == self.history_per_term).all())

    def weights(self):
        if not self.warmed_up:
            return super().weights()
        weights = self.loss_history.square().mean(dim=-1).sqrt()
        weights = weights / weights.sum() * (1 - self.uniform_prob)
        return weights + self.uniform_prob / len(weights)

    def update(self, t, losses):
        t, losses = _gather_across_processes(t.reshape(-1), losses.detach().reshape(-1))
        history, counts = self.loss_history.numpy(), self.loss_counts.numpy()  # views: one loop, in order
        for step, loss in zip(t.tolist(), losses.tolist()):
            if counts[step] == self.history_per_term:  # full: drop the oldest
                history[step, :-1] = history[step, 1:].copy()
                history[step, -1] = loss
            else:
                history[step, counts[step]] = loss
                counts[step] += 1

    def state_dict(self):
        return {**super().state_dict(), "loss_history": self.loss_history.clone(),
                "loss_counts": self.loss_counts.clone()}

    def state_layout(self, num_timesteps):
        return {**super().state_layout(num_timesteps),
                "loss_history": ((num_timesteps, self.history_per_term), torch.float64),
                "loss_counts": ((num_timesteps,), torch.int64)}

    def _load(self, state):
        self.loss_history = state["loss_history"].detach().to("cpu").clone()
        self.loss_counts = state["loss_counts"].detach().to("cpu").clone()


def _check_state(state, expected: dict, what: str, exact: bool = True) -> dict:
    """``state`` if it holds the expected tensors (and, with ``exact``, nothing else), else a ConfigError."""
    if not isinstance(state, dict):
        raise ConfigError(f"a {what} schedule sampler state is a dict of tensors, got {type(state).__name__}")
    extra = sorted(set(state) - set(expected)) if exact else []
    for key, (shape, dtype) in expected.items():
        value = state.get(key)
        if not isinstance(value, torch.Tensor) or tuple(value.shape) != shape or value.dtype != dtype:
            raise ConfigError(f"the saved {what} schedule sampler state lacks a {dtype} tensor {key!r} of shape "
                              f"{list(shape)}; resume with the schedule sampler and model it was saved with")
    if extra:
        raise ConfigError(f"the saved schedule sampler state holds {extra[0]!r}, which the {what} sampler does not "
                          "keep; resume with the schedule sampler it was saved with")
    return state


def _gather_across_processes(t: torch.Tensor, losses: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Every process's (t, loss) rows in rank order, so that every process keeps the same sampler state (the
    original's update_with_local_losses); this process's own rows when torch.distributed is not running."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return t.cpu(), losses.to("cpu", torch.float64)
    world = dist.get_world_size()
    sizes = [torch.zeros(1, dtype=torch.int64, device=t.device) for _ in range(world)]
    dist.all_gather(sizes, torch.tensor([len(t)], dtype=torch.int64, device=t.device))
    sizes = [int(s) for s in sizes]
    rows = torch.stack([t.to(losses.dtype), losses])
    padded = torch.zeros(2, max(sizes), dtype=losses.dtype, device=t.device)
    padded[:, : len(t)] = rows
    gathered = [torch.zeros_like(padded) for _ in range(world)]
    dist.all_gather(gathered, padded)
    rows = torch.cat([g[:, :n] for g, n in zip(gathered, sizes)], dim=1).cpu()
    return rows[0].round().to(torch.int64), rows[1].to(torch.float64)


class DiscreteDiffusionLoss(TrainingLoss):
    """Base of the iddpm-* losses: improved-diffusion's ``training_losses`` through the denoiser protocol.

    A step t is drawn on the denoiser's own ``step_grid`` by the schedule sampler (``schedule_sampler``: 'uniform'
    or 'loss-second-moment'), the image is noised to x = y + sigma_t eps (the original's x_t = sqrt(abar_t) y +
    sqrt(1 - abar_t) eps, unscaled) and the denoiser's D(x; sigma_t) (with its variance output v where it has a
    learned variance) gives the terms, per sample as the original reports them:

    * mse: L_simple, the mean over elements of (eps - eps_theta)^2 = (D - y)^2/sigma_t^2, or of (D - y)^2 with
      ``predict_xstart`` (the original's target x_0);
    * vb: L_{t-1} in bits, the mean over elements of :func:`~edm_toolkit.discrete.vlb_terms` (the decoder NLL at
      t = 0);
    * loss: the objective, weighted by 1/(T p_t) of the schedule sampler in ``__call__``.

    The per-element losses returned are each term's element values divided by the number of elements, so that
    their sum over a sample is its loss.
    """

    draws_on_model_grid: ClassVar[bool] = True
    reports_per_sample: ClassVar[bool] = True  # the original's terms are per-sample means over the elements
    needs_learned_variance: ClassVar[bool | None]  # True: required; False: refused; None: either

    schedule_sampler: str

    def __post_init__(self):
        STEP_SAMPLERS.get(self.schedule_sampler)  # validates the name
        object.__setattr__(self, "_sampler", None)  # the schedule sampler's state: not a parameter of the loss

    # --- the schedule sampler

    def step_sampler(self, grid: StepGrid) -> StepSampler:
        """This loss's schedule sampler for ``grid`` (created on first use; its state persists across calls)."""
        sampler = self._sampler
        if sampler is None:
            sampler = STEP_SAMPLERS.get(self.schedule_sampler)(grid.num_timesteps)
            object.__setattr__(self, "_sampler", sampler)
        elif sampler.num_timesteps != grid.num_timesteps:
            raise ConfigError(f"the {self.schedule_sampler} schedule sampler of loss {self.name!r} holds "
                              f"{sampler.num_timesteps} steps but the model's grid has {grid.num_timesteps}; use "
                              "one loss per model")
        return sampler

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The schedule sampler's state (plain tensors; empty before the first draw), for a training state."""
        return {} if self._sampler is None else self._sampler.state_dict()

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Restores :meth:`state_dict` exactly (an empty state resets the sampler)."""
        if not state:
            object.__setattr__(self, "_sampler", None)
            return
        T = _check_state(state, {"num_timesteps": ((), torch.int64)}, self.schedule_sampler,
                         exact=False)["num_timesteps"]
        sampler = STEP_SAMPLERS.get(self.schedule_sampler)(int(T))
        sampler.load_state_dict(state)
        object.__setattr__(self, "_sampler", sampler)

    # --- the loss

    def grid_of(self, net) -> StepGrid:
        """The denoiser's step grid, after checking that it has what this loss needs."""
        grid = net.step_grid
        if grid is None:
            raise ConfigError(f"loss {self.name!r} trains on a model's own discrete step grid and "
                              f"{type(net).__name__} has none (continuous noise levels); use a discrete model "
                              "(improved-/guided-diffusion's, edm train --arch iddpm|guided) or a continuous loss "
                              "(edm, vp, ve, iddpm)")
        if self.needs_learned_variance and not net.learned_variance:
            raise ConfigError(f"loss {self.name!r} trains a learned variance but the model predicts none; use a "
                              "backbone with learned variance (the flag --learn_sigma True of "
                              "improved-/guided-diffusion) or loss iddpm-simple")
        if self.needs_learned_variance is False and net.learned_variance:
            raise ConfigError(f"loss {self.name!r} would leave the model's learned variance untrained; use loss "
                              "iddpm-hybrid (or iddpm-kl), or a backbone without learned variance (learn_sigma "
                              "False)")
        return grid

    def check_model(self, net) -> None:
        self.grid_of(net)

    def draw_variates(self, batch, generator=None, device="cpu"):
        """Uniform draws u in [0, 1) (float64 [batch, 1, 1, 1]); :meth:`noise_levels` turns them into steps by the
        schedule sampler's distribution at that time (the numbers ``StepSampler.sample`` draws)."""
        return torch.rand([batch, 1, 1, 1], generator=generator, device=device, dtype=torch.float64)

    def noise_levels(self, net, variates):
        """(sigma [batch, 1, 1, 1] float32, weight [batch, 1, 1, 1] float32): grid levels sigma_t with t the inverse
        CDF of the schedule sampler's p_t at the variates, and their loss weights 1/(T p_t)."""
        grid = self.grid_of(net)
        t, weight = self.step_sampler(grid).steps_of(variates.reshape(-1))
        sigma = grid.sigmas.to(variates.device)[t].to(torch.float32)
        return sigma.reshape(-1, 1, 1, 1), weight.reshape(-1, 1, 1, 1)

    def observe(self, net, sigma: torch.Tensor, losses: torch.Tensor) -> None:
        """Feeds the per-element losses [N, ...] (unweighted) of levels sigma to the schedule sampler (gathered
        across processes when torch.distributed runs: call it on every process)."""
        grid = self.grid_of(net)
        t = grid.index(sigma.detach().reshape(-1).to("cpu", torch.float64))
        self.step_sampler(grid).update(t.to(losses.device), losses.detach().flatten(1).sum(dim=1))

    def terms(self, net, y, t, noise, labels=None, augment_labels=None) -> dict[str, torch.Tensor]:
        """The original's ``training_losses`` terms per sample ([N] each: 'loss', and 'mse' and/or 'vb' as the
        original reports them) for steps t [N] and standard normal noise (the original's ``noise=``)."""
        sigma = self.grid_of(net).sigmas[torch.as_tensor(t).cpu()].to(y.device, torch.float32).reshape(-1, 1, 1, 1)
        parts = self.element_terms(net, y, sigma, noise * sigma, labels, augment_labels)
        terms = {name: part.flatten(1).sum(dim=1) for name, part in parts.items()}
        total = sum(terms.values())
        terms.setdefault("loss", total)  # iddpm-kl's one term is the loss itself
        return terms

    def element_terms(self, net, y, sigma, n, labels=None, augment_labels=None) -> dict[str, torch.Tensor]:
        """Each term's per-element values over the number of elements, named as the original's terms: 'mse' and
        'vb' (iddpm-simple: 'mse' only; iddpm-kl: 'loss' only)."""
        raise NotImplementedError

    def _evaluate(self, net, grid, y, sigma, n, labels, augment_labels, detach_mean: bool):
        """(t, D, per-element mse over elements, per-element L_{t-1} in bits over elements)."""
        extra = {} if augment_labels is None else {"augment_labels": augment_labels}
        if net.learned_variance:
            D, v = net.denoise_with_variance(y + n, sigma, labels, **extra)
        else:
            D, v = net(y + n, sigma, labels, **extra), None
        t = grid.index(sigma.detach().reshape(-1).to("cpu", torch.float64))
        elements = y[0].numel()
        log_variance = grid.model_log_variance(t, grid.variance, v, like=D)
        vb = vlb_terms(grid, y.to(D.dtype), D.detach() if detach_mean else D, t, log_variance) / elements
        return t, D, vb, elements

    def _mse(self, grid, t, D, y, elements) -> torch.Tensor:
        if self.predict_xstart:
            return (D - y) ** 2 / elements
        sigma = grid.sigmas[t].to(D.device, D.dtype).reshape(-1, *[1] * (D.ndim - 1))
        return ((D - y) / sigma) ** 2 / elements


@LOSSES.register
@dataclass(frozen=True)
class IDDPMSimpleLoss(DiscreteDiffusionLoss):
    """L_simple (Ho et al. 2020, Eq. 14) on the model's own grid, for a model with a fixed variance: the
    original's MSE losses without learned sigmas (loss = mse; the variance is the grid's 'small' or 'large')."""

    name: ClassVar[str] = "iddpm-simple"
    term_names: ClassVar[tuple[str, ...]] = ("mse",)
    needs_learned_variance: ClassVar[bool | None] = False
    predict_xstart: bool = False
    schedule_sampler: str = "uniform"

    def element_terms(self, net, y, sigma, n, labels=None, augment_labels=None):
        grid = self.grid_of(net)
        extra = {} if augment_labels is None else {"augment_labels": augment_labels}
        D = net(y + n, sigma, labels, **extra)
        t = grid.index(sigma.detach().reshape(-1).to("cpu", torch.float64))
        return {"mse": self._mse(grid, t, D, y, y[0].numel())}


@LOSSES.register
@dataclass(frozen=True)
class IDDPMHybridLoss(DiscreteDiffusionLoss):
    """L_hybrid = L_simple + lambda L_vlb (Nichol & Dhariwal 2021, Eq. 16) for a model with a learned variance:
    the vb term sees D with its gradient stopped, so that it trains the variance only and L_simple the mean.
    lambda = T/1000 with ``rescale_learned_sigmas`` (the original's RESCALED_MSE, improved-diffusion's default;
    0.001 for T = 1000), else 1 (MSE)."""

    name: ClassVar[str] = "iddpm-hybrid"
    term_names: ClassVar[tuple[str, ...]] = ("mse", "vb")
    needs_learned_variance: ClassVar[bool | None] = True
    predict_xstart: bool = False
    rescale_learned_sigmas: bool = True
    schedule_sampler: str = "uniform"

    def element_terms(self, net, y, sigma, n, labels=None, augment_labels=None):
        grid = self.grid_of(net)
        t, D, vb, elements = self._evaluate(net, grid, y, sigma, n, labels, augment_labels, detach_mean=True)
        scale = grid.num_timesteps / 1000.0 if self.rescale_learned_sigmas else 1.0
        return {"mse": self._mse(grid, t, D, y, elements), "vb": vb * scale}


@LOSSES.register
@dataclass(frozen=True)
class IDDPMKLLoss(DiscreteDiffusionLoss):
    """The variational bound itself, loss = T L_{t-1} in bits (the original's use_kl, RESCALED_KL: an unbiased
    estimate of the whole bound but L_T), with the model's learned or fixed variance."""

    name: ClassVar[str] = "iddpm-kl"
    needs_learned_variance: ClassVar[bool | None] = None
    schedule_sampler: str = "uniform"

    def element_terms(self, net, y, sigma, n, labels=None, augment_labels=None):
        grid = self.grid_of(net)
        _, _, vb, _ = self._evaluate(net, grid, y, sigma, n, labels, augment_labels, detach_mean=False)
        return {"loss": vb * grid.num_timesteps}
