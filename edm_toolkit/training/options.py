"""Training options: EDM train.py's names and defaults, plus the toolkit's additions, validated once.

Units as in train.py: --duration and --ema in Mimg, --tick in kimg, --snap and --dump in ticks. Additions:
--preset/--loss (any registered loss with any preconditioner), --precision, --compile, --cond-drop, --phema
(power EMAs to track), --lr-rampup (kimg; EDM's is fixed at 10000), --ema-rampup, --net-opt, --grid-seeds,
--device, --resume DIR|auto; the discrete-time models of improved-/guided-diffusion (--arch iddpm|guided with
--model-flags, --noise-schedule, --diffusion-steps, --schedule-sampler); in-training FID (--metrics, --ref,
--detector).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
from dataclasses import dataclass, field
from typing import Any

from ..errors import CheckpointError, ConfigError
from ..losses import LOSSES, STEP_SAMPLERS
from ..precond import PRECONDITIONERS
from ..registry import show
from .ema import check_sigma_rel

PRECISIONS = ("fp32", "bf16", "fp16")
EDM_DROPOUT, EDM_AUGMENT = 0.13, 0.12  # train.py's defaults for its architectures
_METRIC = re.compile(r"fid([0-9]{1,7})(k?)")
MAX_METRIC_IMAGES = 1_000_000  # generated images of one metric (edm generate's limit on seeds)


def metric_images(name: str) -> int:
    """The number of generated images of an in-training metric: fid50k -> 50000, fid10k -> 10000, fid64 -> 64
    (FID against --ref of that many images, EDM's fid.py protocol), 2 to MAX_METRIC_IMAGES."""
    match = _METRIC.fullmatch(name)
    count = int(match.group(1)) * (1000 if match.group(2) else 1) if match else 0
    if not 2 <= count <= MAX_METRIC_IMAGES:
        raise ConfigError(f"unknown --metrics {show(name, 40)}; choose fid50k, fid10k (or fidN / fidNk: FID of N or N "
                          f"thousand generated images, 2 <= N images <= {MAX_METRIC_IMAGES:,})")
    return count


class OptionsRecord:
    """What every training's options have besides their fields: the image count, replace, plain data and JSON."""

    duration: float  # Mimg

    @property
    def total_nimg(self) -> int:
        return max(int(round(self.duration * 1e6)), 1)

    def replace(self, **changes):
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return {key: list(value) if isinstance(value, tuple) else value
                for key, value in dataclasses.asdict(self).items()}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    def check_run(self) -> None:
        """Validates the fields every training run has (train.py's units: --duration in Mimg, --tick in kimg,
        --snap/--dump in ticks)."""
        checks = (
            (is_finite_number(self.duration) and self.duration > 0, f"--duration must be > 0 Mimg, got {self.duration}"),
            (self.batch >= 1, f"--batch must be >= 1, got {self.batch}"),
            (self.batch_gpu is None or self.batch_gpu >= 1, f"--batch-gpu must be >= 1, got {self.batch_gpu}"),
            (is_finite_number(self.lr) and self.lr > 0, f"--lr must be > 0, got {self.lr}"),
            (is_finite_number(self.ls) and self.ls > 0, f"--ls must be > 0, got {self.ls}"),
            (self.workers >= 0, f"--workers must be >= 0, got {self.workers}"),
            (is_finite_number(self.tick) and self.tick > 0, f"--tick must be > 0 kimg, got {self.tick}"),
            (self.snap >= 1 and self.dump >= 1, "--snap and --dump must be >= 1 tick"),
            (self.seed is None or 0 <= self.seed < 1 << 63, f"--seed must be a non-negative integer, got {self.seed}"),
            (self.diffusion_steps is None or self.diffusion_steps >= 1,
             f"--diffusion-steps must be >= 1, got {self.diffusion_steps}"),
        )
        for holds, message in checks:
            if not holds:
                raise ConfigError(message)
        check_desc(self.desc)


@dataclass(frozen=True)
class TrainingOptions(OptionsRecord):
    """One training run. Defaults are EDM train.py's (CIFAR-10 DDPM++ with EDM preconditioning and loss)."""

    data: str
    outdir: str
    cond: bool = False
    arch: str = "ddpmpp"
    model_flags: str | None = None  # --arch iddpm|guided: the original flags (e.g. "--learn_sigma True")
    noise_schedule: str | None = None  # --arch iddpm|guided: the model's own beta schedule (linear, cosine)
    diffusion_steps: int | None = None  # --arch iddpm|guided: T, the length of the model's grid
    schedule_sampler: str | None = None  # iddpm-* losses: uniform (default) or loss-second-moment
    precond: str | None = None  # default: the preset's preconditioner, else edm
    loss: str | None = None  # default: the preset's loss, else the one named like the preconditioner
    preset: str | None = None
    duration: float = 200.0  # Mimg
    batch: int = 512
    batch_gpu: int | None = None
    cbase: int | None = None
    cres: tuple[int, ...] | None = None
    lr: float = 10e-4
    lr_rampup: float = 10000.0  # kimg
    ema: float = 0.5  # Mimg half-life
    ema_rampup: float | None = 0.05
    phema: tuple[float, ...] = ()  # sigma_rel of the power EMAs to track (EDM2: 0.05, 0.10)
    dropout: float | None = None  # default: 0.13 for train.py's architectures; --arch iddpm|guided: the flags'
    augment: float | None = None  # default: 0.12 for train.py's architectures; none for --arch iddpm|guided
    xflip: bool = False
    precision: str = "fp32"
    ls: float = 1.0
    bench: bool = True
    cache: bool = True
    workers: int = 1
    desc: str | None = None
    nosubdir: bool = False
    tick: float = 50.0  # kimg
    snap: int = 50  # ticks
    dump: int = 500  # ticks
    seed: int | None = None
    transfer: str | None = None
    resume: str | None = None
    cond_drop: float = 0.0
    compile: bool = False
    net_opts: dict[str, Any] = field(default_factory=dict)
    grid_seeds: tuple[int, ...] | None = None
    device: str | None = None
    metrics: tuple[str, ...] = ()  # in-training metrics per snapshot: fid50k, fid10k
    ref: str | None = None  # reference statistics (.npz, edm fid ref) of --metrics
    detector: str | None = None  # FID Inception weights (default: $EDM_TOOLKIT_FID_DETECTOR or the fid extra)

    def __post_init__(self):
        def need(condition, message):
            if not condition:
                raise ConfigError(message)

        need(self.arch_known(), f"unknown --arch {self.arch!r}; choose one of: {', '.join(_architectures())}")
        if self.precond is not None:
            PRECONDITIONERS.get(self.precond)
        if self.loss is not None:
            LOSSES.get(self.loss)
        if self.schedule_sampler is not None:
            STEP_SAMPLERS.get(self.schedule_sampler)
        if self.discrete_model:
            for option, value in (("--precond", self.precond), ("--preset", self.preset), ("--cbase", self.cbase),
                                  ("--cres", self.cres), ("--net-opt", self.net_opts or None)):
                need(value is None, f"{option} configures EDM's architectures and preconditioning; --arch "
                                    f"{self.arch} takes the original flags instead (--model-flags '...')")
            need(not self.augment, f"--augment conditions EDM's networks on augment labels, which --arch {self.arch} "
                                   "does not have; use --augment 0 (and --xflip 1 for guided-diffusion's random flip)")
            need(self.cond_drop == 0, f"--cond-drop needs a null label, which --arch {self.arch}'s class embedding "
                                      "does not have; train an unconditional model, or use EDM's architectures")
            need(self.precision != "fp16", f"--precision fp16 is EDM's float16 network; --arch {self.arch} trains in "
                                           "fp32 or bf16 (--precision bf16)")
        else:
            for option, value in (("--model-flags", self.model_flags), ("--noise-schedule", self.noise_schedule),
                                  ("--diffusion-steps", self.diffusion_steps)):
                need(value is None, f"{option} describes improved-/guided-diffusion's models: use it with --arch "
                                    "iddpm or --arch guided")
            object.__setattr__(self, "dropout", EDM_DROPOUT if self.dropout is None else self.dropout)
            object.__setattr__(self, "augment", EDM_AUGMENT if self.augment is None else self.augment)
        for name in self.metrics:
            metric_images(name)
        need(len(set(self.metrics)) == len(self.metrics), f"--metrics lists a metric twice: {list(self.metrics)}")
        need(bool(self.metrics) == (self.ref is not None),
             "--metrics needs --ref REF.npz (reference statistics: edm fid ref)" if self.metrics
             else "--ref is the reference of --metrics: add --metrics fid50k (or fid10k)")
        need(self.precision in PRECISIONS, f"unknown --precision {self.precision!r}; choose one of: {', '.join(PRECISIONS)}")
        need(self.cbase is None or self.cbase >= 1, f"--cbase must be >= 1, got {self.cbase}")
        need(self.cres is None or (len(self.cres) > 0 and all(c >= 1 for c in self.cres)),
             f"--cres must be a list of positive integers, got {self.cres}")
        need(is_finite_number(self.lr_rampup) and self.lr_rampup >= 0, f"--lr-rampup must be >= 0 kimg, got {self.lr_rampup}")
        need(is_finite_number(self.ema) and self.ema >= 0, f"--ema must be >= 0 Mimg, got {self.ema}")
        need(self.ema_rampup is None or (is_finite_number(self.ema_rampup) and self.ema_rampup > 0),
             f"--ema-rampup must be > 0, got {self.ema_rampup}")
        for sigma_rel in self.phema:
            check_sigma_rel(sigma_rel)
        need(len(set(self.phema)) == len(self.phema), f"--phema lists a width twice: {list(self.phema)}")
        need(self.dropout is None or 0 <= self.dropout <= 1, f"--dropout must lie in [0, 1], got {self.dropout}")
        need(self.augment is None or 0 <= self.augment <= 1, f"--augment must lie in [0, 1], got {self.augment}")
        need(0 <= self.cond_drop <= 1, f"--cond-drop must lie in [0, 1], got {self.cond_drop}")
        need(self.cond or self.cond_drop == 0, "--cond-drop needs a conditional model: add --cond 1")
        need(self.transfer is None or self.resume is None, "--transfer and --resume cannot be given together")
        need(self.grid_seeds is None or len(self.grid_seeds) > 0, "--grid-seeds is empty")
        need(isinstance(self.net_opts, dict), "net_opts must be a dict")
        check_net_opts(self.net_opts, self.arch)
        self.check_run()

    def arch_known(self) -> bool:
        return self.arch in _architectures()

    @property
    def discrete_model(self) -> bool:
        """--arch iddpm|guided: improved-/guided-diffusion's model on its own grid (no EDM preconditioner)."""
        from .architectures import OPENAI_ARCHITECTURES

        return self.arch in OPENAI_ARCHITECTURES


def is_finite_number(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


MAX_DESC = 100  # bytes of --desc: the run directory's name holds it and must stay a valid file name


def check_desc(desc: str | None) -> None:
    """--desc becomes part of the run directory's name: a non-empty name without '/' or surrounding spaces, of at
    most MAX_DESC bytes."""
    if desc is None:
        return
    if not desc or "/" in desc or desc.strip() != desc or "\0" in desc:
        raise ConfigError(f"--desc must be a non-empty name without '/', got {show(desc)}")
    if len(os.fsencode(desc)) > MAX_DESC:
        raise ConfigError(f"--desc {show(desc, 24)} is longer than {MAX_DESC} bytes; it becomes part of the run "
                          "directory's name")


RUN_ARGUMENTS = ("img_resolution", "in_channels", "out_channels", "label_dim", "augment_dim")  # set by the run


def check_net_opts(net_opts: dict[str, Any], arch: str) -> None:
    """--net-opt KEY=VALUE: bounded plain data (a model file's limits on constructor arguments), each KEY an
    argument of the backbone of ``arch`` that the run does not set, each VALUE of the argument's annotated type:
    an integer (not negative, unless the constructor's default is), a finite non-negative number, a string, or a
    list of these. Whether the backbone can be built with them is checked when it is built."""
    from ..io.formats import check_arguments

    try:
        check_arguments(net_opts, "--net-opt")
    except CheckpointError as exc:
        raise ConfigError(str(exc)) from None
    if not net_opts or arch not in _edm_architectures():
        return  # --arch iddpm|guided refuses --net-opt itself
    network, hints, defaults = _constructor(arch)
    for key, value in net_opts.items():
        if key in RUN_ARGUMENTS:
            raise ConfigError(f"--net-opt {key} is set by the run (the dataset, --cond and --augment); drop it")
        if key not in hints:
            raise ConfigError(f"--net-opt {show(key, 40)}: the {network} backbone has no such argument; it takes "
                              f"{', '.join(k for k in hints if k not in RUN_ARGUMENTS)}")
        problem = _type_problem(value, hints[key], defaults.get(key))
        if problem:
            raise ConfigError(f"--net-opt {key}={show(value)}: {problem}")


def _edm_architectures():
    from .architectures import ARCHITECTURES

    return ARCHITECTURES


def _constructor(arch: str) -> tuple[str, dict[str, Any], dict[str, Any]]:
    """(network name, {argument: type hint}, {argument: default}) of the backbone constructor of ``arch``."""
    import inspect
    import typing

    from ..networks import NETWORKS, load_all

    load_all()
    network = _edm_architectures()[arch].network
    init = inspect.unwrap(NETWORKS[network].__init__)
    hints = {k: v for k, v in typing.get_type_hints(init).items() if k != "return"}
    defaults = {k: p.default for k, p in inspect.signature(init).parameters.items()
                if p.default is not inspect.Parameter.empty}
    return network, hints, defaults


def _type_problem(value: Any, hint: Any, default: Any) -> str | None:
    """Why ``value`` is not of the constructor argument's annotated type ``hint`` (see check_net_opts), or None."""
    import typing

    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is not None and origin is not typing.Union and args:  # Sequence[int], list[float], ...
        if not isinstance(value, list):
            return "a list is expected, e.g. [16]"
        for item in value:
            problem = _type_problem(item, args[0], None)
            if problem:
                return f"item {show(item)}: {problem}"
        return None
    if hint is bool:
        return None if isinstance(value, bool) else "true or false is expected"
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            return "an integer is expected"
        negative_ok = isinstance(default, int) and default < 0
        return None if value >= 0 or negative_ok else "must not be negative"
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return "a number is expected"
        return None if math.isfinite(value) and value >= 0 else "must be a finite number >= 0"
    if hint is str:
        return None if isinstance(value, str) else "a string is expected"
    return None


def _architectures():
    from .architectures import architecture_names

    return architecture_names()
