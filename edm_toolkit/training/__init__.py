"""Training: any loss x preconditioner x backbone on EDM-layout datasets, with EMA, augmentation, resume and DDP.

Data flow: dataset (EDM's zip/folder layout, sharded per rank) -> augmentation (non-leaking, augment labels) ->
loss (p_train(sigma), lambda(sigma)) -> preconditioned network -> optimizer -> EMA -> snapshots in the toolkit's
own model format, which ``edm generate --network`` reads.

    from edm_toolkit.training import TrainingOptions, train
    run_dir = train(TrainingOptions(data="data.zip", outdir="runs", batch=64, duration=0.1))
"""

from .augment import AugmentPipe
from .dataset import ImageDataset
from .dataset_tool import convert_dataset
from .ema import (HalfLifeEMA, PowerFunctionEMA, gamma_to_sigma_rel, posthoc_coefficients, power_ema_beta,
                  power_profile_inner, sigma_rel_to_gamma)
from .loop import Trainer, TrainingRun, train
from .options import TrainingOptions
from .phema import list_power_snapshots, reconstruct_power_ema, write_power_ema
from .streams import TrainingStreams

__all__ = [
    "AugmentPipe", "HalfLifeEMA", "ImageDataset", "convert_dataset", "PowerFunctionEMA", "Trainer", "TrainingOptions", "TrainingRun", "TrainingStreams",
    "gamma_to_sigma_rel", "list_power_snapshots", "posthoc_coefficients", "power_ema_beta", "power_profile_inner",
    "reconstruct_power_ema", "sigma_rel_to_gamma", "train", "write_power_ema",
]
