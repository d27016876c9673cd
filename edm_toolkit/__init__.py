"""edm-toolkit: the EDM design space (Karras et al. 2022) as interchangeable components.

    import edm_toolkit as edm
    net = edm.default_model()                                   # or edm.load_model("model.pt")
    sampler = edm.load_preset("edm").sampling.replace(num_steps=35)
    images = edm.sample_batch(net, sampler, seeds=range(8), device="cpu")

See docs/api.md for the whole public API.
"""

__version__ = "0.1.0"

from .checkpoints import save_model
from .loading import load_model
from .default_model import default_model, ideal_model
from .discrete import StepGrid
from .discretizations import (
    DISCRETIZATIONS, EDMDiscretization, ExplicitDiscretization, IDDPMDiscretization, LogSNRDiscretization,
    VEDiscretization, VPDiscretization, iddpm_sigma_table,
)
from .errors import CheckpointError, ConfigError, EDMToolkitError
from .generate import generate_images, sample_batch
from .ideal import IdealDenoiser, solve_pf_ode
from .losses import LOSSES, EDMLoss, IDDPMLoss, VELoss, VPLoss
from .protocol import BoundInputs, Denoiser, DenoiserBase, DenoiserWrapper
from .precond import PRECONDITIONERS, EDMPrecond, IDDPMPrecond, Preconditioner, VEPrecond, VPPrecond, build_precond
from .presets import PrecondConfig, Preset, builtin_presets, load_preset
from .rng import SeedGenerators
from .sampling import Churn, Sampler, StepInfo, sample
from .schedules import SCALINGS, SCHEDULES, LinearSchedule, NoScaling, VESchedule, VPScaling, VPSchedule
from .solvers import SOLVERS, Euler, Heun

__all__ = [
    "BoundInputs", "Churn", "CheckpointError", "ConfigError", "DISCRETIZATIONS", "Denoiser", "DenoiserBase", "DenoiserWrapper", "EDMDiscretization", "EDMLoss", "EDMPrecond",
    "EDMToolkitError", "Euler", "ExplicitDiscretization", "Heun", "IDDPMDiscretization", "IDDPMLoss", "IDDPMPrecond",
    "IdealDenoiser", "LOSSES", "LinearSchedule", "LogSNRDiscretization", "NoScaling", "PRECONDITIONERS",
    "PrecondConfig", "Preconditioner", "Preset", "SCALINGS", "SCHEDULES", "SOLVERS", "Sampler", "SeedGenerators", "StepGrid",
    "StepInfo", "VEDiscretization", "VELoss", "VEPrecond", "VESchedule", "VPDiscretization", "VPLoss", "VPPrecond",
    "VPScaling", "VPSchedule", "build_precond", "builtin_presets", "default_model", "ideal_model", "generate_images",
    "iddpm_sigma_table", "load_model", "load_preset", "sample", "sample_batch", "save_model", "solve_pf_ode",
]
