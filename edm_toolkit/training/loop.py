"""The training loop (EDM training/training_loop.py), for any loss x preconditioner x backbone, resumable exactly.

Per step: every process takes its slice of the global batch (``batch / processes`` images, in micro-batches of
``--batch-gpu`` with gradients accumulated), evaluates the loss through its own interface
(:class:`~edm_toolkit.losses.TrainingLoss`: noise levels and loss weights, then the per-element terms, e.g. EDM's
lambda(sigma) (D(y + n; sigma) - y)^2) and backpropagates ``(loss * weight).sum() * ls / (batch / processes)``;
DDP averages the gradients over processes; a stateful loss observes the step's losses. Then, as EDM: learning
rate lr min(nimg / rampup, 1) with nimg the images seen before this step, NaN -> 0 and +-inf -> +-1e5 in the
gradients, an Adam step (betas 0.9, 0.999, eps 1e-8), the half-life EMA and the power EMAs.

Once per tick (``--tick`` kimg; the first tick is the first step, as EDM's): a progress line, a line in
stats.jsonl; every ``--snap`` ticks the EMA as a network file (``edm generate --network`` reads it), the power
EMAs, optionally a sample grid and in-training metrics (``--metrics``); every ``--dump`` ticks the training
state. Only rank 0 writes. :class:`TrainingRun` holds what every training shares (also the noisy classifier's,
``classifier.py``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import secrets
import time
from pathlib import Path
from typing import Any, Callable, TextIO

import psutil
import torch
import torch.distributed as dist
from torch import nn

from ..adapters.openai_flags import parse_model_flags
from ..checkpoints import save_model
from ..distributed import ProcessGroup, init_from_env, shutdown
from ..errors import CheckpointError, ConfigError, EDMToolkitError
from ..io.formats import model_config
from ..io.outputs import remove_stale_temp_files
from ..losses import LOSSES, TrainingLoss, total_of
from ..presets import PrecondConfig, load_preset
from ..protocol import BoundInputs
from .architectures import (OPENAI_ARCHITECTURES, backbone_config, build_denoiser, build_openai_denoiser,
                            denoiser_config, discrete_loss, is_upsampler, openai_flags, parameter_count)
from .ema import HalfLifeEMA, PowerFunctionEMA
from .options import TrainingOptions, metric_images
from .phema import power_ema_name
from .routing import DenoiserCalls, RoutedDenoiser
from .run_dir import (RunLog, StatsFile, append_jsonl, create_run_dir, find_run_to_resume, format_time, next_run_dir,
                      run_description, truncate_jsonl, write_json)
from .samples import ImageSource, PositionBatches, TrainingSamples
from .state import latest_state, load_state, save_state, state_name
from .streams import TrainingStreams

AUGMENT_DIM = 9  # EDM's augment labels: xflip, yflip, scale, rotate (2), aniso (2), translate (2)


def learning_rate(lr: float, nimg: int, rampup_kimg: float) -> float:
    """EDM's schedule: lr min(nimg / (rampup_kimg 1000), 1), nimg the images seen before the step; no decay."""
    return lr * min(nimg / max(rampup_kimg * 1000, 1e-8), 1)


def clean_gradients(parameters) -> None:
    """EDM's treatment of non-finite gradients, in place: NaN -> 0, +inf -> 1e5, -inf -> -1e5."""
    for p in parameters:
        if p.grad is not None:
            torch.nan_to_num(p.grad, nan=0, posinf=1e5, neginf=-1e5, out=p.grad)


def resolve_components(options: TrainingOptions) -> tuple[PrecondConfig, TrainingLoss]:
    """The preconditioner and loss: --precond/--loss, else the --preset's sections, else edm and the loss named like
    the preconditioner (EDM's pairs vp/vp, ve/ve, edm/edm; iddpm/iddpm)."""
    preset = load_preset(options.preset) if options.preset is not None else None
    if options.precond is not None:
        precond = PrecondConfig(options.precond)
    else:
        precond = preset.preconditioning if preset is not None else PrecondConfig("edm")
    if options.loss is not None:
        loss = LOSSES.create(options.loss)
    else:
        loss = preset.training if preset is not None else LOSSES.create(precond.name)
    return precond, loss


def open_dataset(options: TrainingOptions) -> ImageSource:
    """EDM's dataset layout (zip or folder of images + dataset.json) through the dataset reader."""
    try:
        from .dataset import ImageDataset
    except ModuleNotFoundError as exc:
        raise EDMToolkitError(f"the dataset reader is missing ({exc}); reinstall edm-toolkit") from None
    try:
        return ImageDataset(options.data, use_labels=options.cond, xflip=options.xflip, cache=options.cache)
    except EDMToolkitError as exc:
        raise EDMToolkitError(f"--data {options.data}: {exc}") from None
    except OSError as exc:
        raise EDMToolkitError(f"--data {options.data}: {exc.strerror or exc}") from None


def build_augment_pipe(probability: float):
    """train.py's pipeline: every transform at probability p, xflip=1e8 (always mirrored half of the time)."""
    try:
        from .augment import AugmentPipe
    except ModuleNotFoundError as exc:
        raise EDMToolkitError(f"--augment needs the augmentation module ({exc}); use --augment 0") from None
    return AugmentPipe(probability, xflip=1e8, yflip=1, scale=1, rotate_frac=1, aniso=1, translate_frac=1)


def resolve_device(name: str | None, group: ProcessGroup | None = None) -> torch.device:
    if name is None:
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"unknown --device {name!r} (e.g. cpu, cuda, cuda:1)") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError("--device cuda but no CUDA device is available; use --device cpu")
        if device.index is None and group is not None:
            device = torch.device("cuda", group.local_rank)
    return device


def module_summary(net: nn.Module, inputs: list[Any], kwargs: dict[str, Any] | None = None, max_depth: int = 2) -> str:
    """EDM's network summary: submodules to max_depth with their parameters, buffers and output shape."""
    rows, hooks = [], []
    names = {m: n for n, m in net.named_modules()}

    def record(module, _inputs, output):
        out = output[0] if isinstance(output, (tuple, list)) else output
        shape = list(out.shape) if isinstance(out, torch.Tensor) else "-"
        rows.append((names[module] or "<top-level>", module, shape, str(getattr(out, "dtype", "-")).replace("torch.", "")))

    for name, module in net.named_modules():
        if name.count(".") < max_depth:
            hooks.append(module.register_forward_hook(record))
    try:
        with torch.no_grad():
            net(*inputs, **(kwargs or {}))
    finally:
        for hook in hooks:
            hook.remove()
    rows.sort(key=lambda r: r[0] != "<top-level>")
    table = [("Module", "Parameters", "Buffers", "Output shape", "Datatype"), ("---",) * 5]
    for name, module, shape, dtype in rows:
        params = sum(p.numel() for p in module.parameters())
        buffers = sum(b.numel() for b in module.buffers())
        table.append((name, f"{params:,}" if params else "-", f"{buffers:,}" if buffers else "-", str(shape), dtype))
    widths = [max(len(r[i]) for r in table) for i in range(5)]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in table)


class Meters:
    """Per-tick sums of reported values (EDM's training_stats): for each name the sum, the sum of squares and the
    count, float64 on the device, summed over processes at the end of a tick."""

    def __init__(self, names: list[str], device: torch.device):
        self.names = list(names)
        self.sums = torch.zeros(len(self.names), 3, dtype=torch.float64, device=device)

    def add(self, name: str, values: torch.Tensor) -> None:
        with torch.no_grad():
            values = values.detach().to(torch.float64)
            row = self.sums[self.names.index(name)]
            row[0] += values.sum()
            row[1] += values.square().sum()
            row[2] += values.numel()

    def collect(self, group: ProcessGroup) -> dict[str, dict[str, float]]:
        """{name: {num, mean, std}} of this tick over every process; the sums start again from zero."""
        if group.world_size > 1:
            dist.all_reduce(self.sums)
        result = {}
        for name, (total, squares, count) in zip(self.names, self.sums.tolist()):
            mean = total / max(count, 1)
            result[name] = {"num": count, "mean": mean,
                            "std": math.sqrt(max(squares / max(count, 1) - mean * mean, 0.0))}
        self.sums.zero_()
        return result


class TrainingRun:
    """What every training of the toolkit shares (EDM's training_loop.py): processes and devices, the dataset,
    the seed and per-position random streams, resume, the run directory, the step with micro-batches, gradient
    accumulation and DDP, the optimizer step, and per tick the progress line, stats.jsonl, snapshots and training
    states. A subclass says what is trained (:class:`Trainer`: a denoiser; ``classifier.ClassifierTrainer``: a
    noisy classifier) through the hooks below."""

    kind: str = "denoiser"  # the training state's kind (state.KINDS)

    def __init__(self, options, dataset: ImageSource | None = None, stream: TextIO | None = None):
        self.options = options
        self.dataset = dataset
        self.stream = stream

    # --- hooks ------------------------------------------------------------------------------------------------
    def _configure(self) -> None:
        """Resolves and checks the components (no network yet); sets ``self.description`` (the run's name)."""
        raise NotImplementedError

    def _build(self) -> None:
        """Builds ``self.net`` (the trained module, on the device) and ``self.optimizer`` (after the init seed)."""
        raise NotImplementedError

    def _model_config(self) -> dict[str, Any]:
        """Plain data that identifies the trained model's structure (matched against a resumed state)."""
        raise NotImplementedError

    def _samples(self) -> torch.utils.data.Dataset:
        """The map-style dataset of image positions -> per-sample tensors (drawn from the position's streams)."""
        raise NotImplementedError

    def _route(self, calls: Callable | None) -> None:
        """Takes the DDP and/or compiled module that the forward passes run through (None: the module itself)."""

    def _calls_module(self) -> nn.Module:
        """The module to wrap in DDP / torch.compile."""
        return self.net

    def _objective(self, batch: list[torch.Tensor], meters: Meters) -> torch.Tensor:
        """The loss tensor of one micro-batch whose sum is its part of the objective (under autocast); reports its
        statistics to ``meters``."""
        raise NotImplementedError

    def _meter_names(self) -> list[str]:
        return ["Loss/loss"]

    def _step_done(self) -> None:
        """After the micro-batches of a step, before the optimizer step."""

    def _learning_rate(self) -> float:
        raise NotImplementedError

    def _after_update(self) -> None:
        """After the optimizer step and the image count update (EMAs)."""

    def _snapshot(self, run_dir: Path) -> None:
        """Writes the snapshot files of this tick (rank 0)."""

    def _evaluate(self, run_dir: Path, total_sec: float) -> dict[str, float]:
        """Metrics at a snapshot, on every process: {name: value} for stats.jsonl (none by default)."""
        return {}

    def _state(self) -> dict[str, Any]:
        """The kind's own entries of a training state."""
        return {}

    def _restore_state(self, state: dict) -> None:
        """Restores the kind's own entries of a training state."""

    def _truncate_outputs(self, run_dir: Path, kimg: float) -> None:
        """Drops the output lines past ``kimg`` of a run that is resumed in place."""

    def _summary_lines(self) -> list[str]:
        return []

    def _no_labels(self) -> str:
        """The message for a dataset without the labels the run needs."""
        return (f"--cond 1 needs class labels, but the dataset {self.options.data!r} has none (dataset.json without "
                "'labels'); use --cond 0 or a labelled dataset")

    def _options_record(self) -> dict[str, Any]:
        return dict(self.options.to_dict(), seed=self.seed)

    # --- setup: everything that can fail on bad input happens before anything is written ---------------------
    def _setup(self) -> None:
        o = self.options
        self.group = init_from_env(resolve_device(o.device).type)  # gloo on CPU, NCCL on CUDA
        self.device = resolve_device(o.device, self.group)
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)  # NCCL collectives (the seed broadcast, DDP) use the current device
        self.print = RunLog(stream=self.stream) if self.group.rank == 0 else (lambda text="": None)
        W = self.group.world_size
        if o.batch % W:
            raise ConfigError(f"--batch {o.batch} is not divisible by the {W} processes")
        self.batch_per_rank = o.batch // W
        self.batch_gpu = min(o.batch_gpu or self.batch_per_rank, self.batch_per_rank)
        if self.batch_per_rank % self.batch_gpu:
            raise ConfigError(f"--batch {o.batch} is not divisible by processes x --batch-gpu "
                              f"({W} x {self.batch_gpu}); choose a --batch-gpu that divides {self.batch_per_rank}")
        self.rounds = self.batch_per_rank // self.batch_gpu
        if o.precision == "fp16" and self.device.type != "cuda":
            raise ConfigError("--precision fp16 (EDM's --fp16) runs the network in float16 on CUDA only; "
                              "use --precision bf16 or fp32 on the CPU")

        # Dataset.
        source = self.dataset if self.dataset is not None else open_dataset(o)
        if o.cond and not source.has_labels:
            raise ConfigError(self._no_labels())
        if len(source) < 1:
            raise ConfigError(f"the dataset {o.data!r} holds no images")
        self.source = source
        self.label_dim = int(source.label_dim) if o.cond else 0
        self._configure()

        # Resume: the state decides the seed and must describe this model.
        self.state, self.resume_dir = self._find_state()
        seed = o.seed
        if self.state is not None:
            if seed is not None and seed != self.state["seed"]:
                raise ConfigError(f"--seed {seed} differs from the resumed run's seed {self.state['seed']}; "
                                  "drop --seed to continue that run")
            seed = self.state["seed"]
        if seed is None:
            seed = self._broadcast(secrets.randbelow(1 << 31))
        self.seed = int(seed)
        self.streams = TrainingStreams(self.seed, len(source))
        if o.nosubdir and self.resume_dir is None and _holds_a_run(Path(o.outdir)):
            raise ConfigError(f"--outdir {o.outdir} already holds a training run (stats.jsonl or training states); "
                              "continue it with --resume auto, or choose another --outdir")

        torch.manual_seed(self.streams.init_seed())
        self._build()
        self.nimg, self.cur_tick, self.tick_start_nimg, self.elapsed = 0, 0, 0, 0.0
        if self.state is not None:
            self._restore(self.state)

    def _broadcast(self, value):
        if self.group.world_size == 1:
            return value
        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def _find_state(self) -> tuple[dict | None, Path | None]:
        """(state, run directory to continue in) for --resume: auto (the newest run of this description in
        --outdir, or --outdir itself with --nosubdir; a fresh start if none), a run directory or a state file."""
        o = self.options
        if o.resume is None:
            return None, None
        if o.resume == "auto":
            if o.nosubdir:
                run = Path(o.outdir) if latest_state(o.outdir) is not None else None
            else:
                run = find_run_to_resume(o.outdir, self.description)
            return (None, None) if run is None else (load_state(latest_state(run)), run)
        path = Path(o.resume)
        if path.is_dir():
            found = latest_state(path)
            if found is None:
                raise CheckpointError(f"--resume {o.resume}: no training-state-*.pt in that directory")
            path = found
        elif not path.exists():
            raise CheckpointError(f"--resume {o.resume}: no such file or directory")
        return load_state(path), None

    def _restore(self, state: dict) -> None:
        if state["kind"] != self.kind:
            raise CheckpointError(f"--resume: the training state is a {state['kind']}'s, this run trains a "
                                  f"{self.kind}; resume with the command that wrote it")
        expected = json.loads(_json(self._model_config()))
        if state[self.kind] != expected:
            raise CheckpointError(f"--resume: the training state was written for a different network "
                                  f"({_describe(state[self.kind])}; this run builds {_describe(expected)}); "
                                  "resume with the options of that run")
        try:
            self.net.load_state_dict(state["net"])
            self.optimizer.load_state_dict(state["optimizer"])
            self._restore_state(state)
        except (RuntimeError, KeyError, ValueError) as exc:
            raise CheckpointError(f"--resume: damaged training state ({str(exc).splitlines()[0][:160]})") from None
        self.nimg, self.cur_tick = state["nimg"], state["cur_tick"]
        self.tick_start_nimg, self.elapsed = state["tick_start_nimg"], state["elapsed_sec"]
        if self.nimg % self.options.batch:
            raise ConfigError(f"the resumed state is at {self.nimg} images, not a multiple of --batch {self.options.batch}")

    # --- the loop ---------------------------------------------------------------------------------------------
    def run(self) -> Path:
        """Trains; returns the run directory."""
        try:
            self._setup()
            return self._run()
        finally:
            shutdown()

    def _run(self) -> Path | None:
        o = self.options
        is_writer = self.group.rank == 0
        # Run directory (rank 0 picks it; every rank learns it).
        run_dir = None
        if is_writer:
            if self.resume_dir is not None:
                run_dir = self.resume_dir
            elif o.nosubdir:
                run_dir = Path(o.outdir)
            else:
                run_dir = next_run_dir(o.outdir, self.description)
            create_run_dir(run_dir, exist_ok=o.nosubdir or self.resume_dir is not None)
            remove_stale_temp_files(run_dir)
        run_dir = Path(self._broadcast(str(run_dir)))
        log = RunLog(run_dir, self.stream) if is_writer else (lambda text="": None)
        stats = StatsFile(run_dir) if is_writer else None
        try:
            if is_writer:
                write_json(run_dir / "training_options.json", self._options_record())
                log("Training options:")
                log(o.to_json())
                for line in self._summary_lines():
                    log(line)
                log(f"Output directory:        {run_dir}")
                if self.state is not None:
                    log(f"Resuming at {self.nimg / 1e3:.3f} kimg (tick {self.cur_tick})")
                    if self.resume_dir is not None:
                        stats.truncate_after(self.nimg / 1e3)
                        self._truncate_outputs(run_dir, self.nimg / 1e3)
            self._train(run_dir, log, stats)
        finally:
            if is_writer:
                log.close()
        return run_dir

    def _train(self, run_dir: Path, log, stats: StatsFile | None) -> None:
        o, device, group = self.options, self.device, self.group
        if device.type == "cuda":
            torch.backends.cudnn.benchmark = o.bench
            torch.backends.cudnn.allow_tf32 = False
            torch.backends.cuda.matmul.allow_tf32 = False
            torch.backends.cuda.matmul.allow_fp16_reduced_precision_reduction = False
        total_nimg = o.total_nimg
        if self.nimg >= total_nimg:
            log(f"Training is complete ({self.nimg / 1e3:.3f} of {total_nimg / 1e3:.3f} kimg).")
            return

        batches = PositionBatches(self.nimg, o.batch, self.batch_gpu, group.rank, group.world_size)
        loader = torch.utils.data.DataLoader(
            self._samples(), batch_sampler=batches, num_workers=o.workers, pin_memory=device.type == "cuda",
            prefetch_factor=2 if o.workers > 0 else None, worker_init_fn=_worker_init if o.workers > 0 else None)
        batches_iter = iter(loader)

        ddp, calls = None, None
        if group.world_size > 1:
            calls = ddp = torch.nn.parallel.DistributedDataParallel(
                self._calls_module(), device_ids=[device] if device.type == "cuda" else None)
        if o.compile:
            calls = torch.compile(calls if calls is not None else self._calls_module())
        self._route(calls)
        autocast = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if o.precision == "bf16" \
            else contextlib.nullcontext
        params = [p for p in self.net.parameters()]

        start_time = time.time()
        tick_start_time = start_time
        elapsed_at_start = self.elapsed
        maintenance = 0.0
        meters = Meters(self._meter_names(), device)
        log(f"Training for {total_nimg / 1e3:g} kimg...")
        while True:
            # Accumulate gradients over the micro-batches of this process.
            self.optimizer.zero_grad(set_to_none=True)
            for round_idx in range(self.rounds):
                batch = [t.to(device, non_blocking=True) for t in next(batches_iter)]
                first = self.nimg + group.rank * self.batch_per_rank + round_idx * self.batch_gpu
                torch.manual_seed(self.streams.dropout_seed(first))
                sync = ddp is None or round_idx == self.rounds - 1
                with (contextlib.nullcontext() if sync else ddp.no_sync()):
                    with autocast():
                        objective = self._objective(batch, meters)
                    objective.sum().mul(o.ls / self.batch_per_rank).backward()
            self._step_done()

            # Update weights (EDM: lr schedule on the images seen before this step; non-finite gradients cleaned).
            for g in self.optimizer.param_groups:
                g["lr"] = self._learning_rate()
            clean_gradients(params)
            self.optimizer.step()
            self.nimg += o.batch
            self._after_update()

            # Maintenance once per tick.
            done = self.nimg >= total_nimg
            if not done and self.cur_tick != 0 and self.nimg < self.tick_start_nimg + o.tick * 1000:
                continue
            tick_end_time = time.time()
            reported = meters.collect(group)
            mean = reported[meters.names[0]]["mean"]
            tick_sec = tick_end_time - tick_start_time
            sec_per_kimg = tick_sec / max(self.nimg - self.tick_start_nimg, 1) * 1e3
            total_sec = elapsed_at_start + tick_end_time - start_time
            eta = max(total_nimg - self.nimg, 0) / 1e3 * sec_per_kimg
            cpu_mem = psutil.Process(os.getpid()).memory_info().rss / 2**30
            gpu_mem = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else 0.0
            gpu_reserved = torch.cuda.max_memory_reserved(device) / 2**30 if device.type == "cuda" else 0.0
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            log(f"tick {self.cur_tick:<5d} kimg {self.nimg / 1e3:<9.3f} loss {mean:<8.4f} time {format_time(total_sec):<12s} "
                f"sec/tick {tick_sec:<7.1f} sec/kimg {sec_per_kimg:<7.2f} ETA {format_time(eta):<10s} "
                f"maintenance {maintenance:<6.1f} cpumem {cpu_mem:<6.2f} gpumem {gpu_mem:<6.2f} reserved {gpu_reserved:<6.2f}")

            snapshot = done or self.cur_tick % o.snap == 0
            if group.rank == 0:
                if snapshot:
                    self._snapshot(run_dir)
                if (done or self.cur_tick % o.dump == 0) and self.cur_tick != 0:
                    self.elapsed = total_sec
                    self._dump(run_dir)
            metrics = self._evaluate(run_dir, total_sec) if snapshot else {}
            if group.rank == 0:
                stats.append({
                    **reported,
                    "Progress/tick": self.cur_tick, "Progress/kimg": self.nimg / 1e3,
                    "Timing/total_sec": total_sec, "Timing/sec_per_tick": tick_sec, "Timing/sec_per_kimg": sec_per_kimg,
                    "Timing/maintenance_sec": maintenance, "Resources/cpu_mem_gb": cpu_mem,
                    "Resources/peak_gpu_mem_gb": gpu_mem, "Resources/peak_gpu_mem_reserved_gb": gpu_reserved,
                    **metrics,
                })
            self.cur_tick += 1
            self.tick_start_nimg = self.nimg
            tick_start_time = time.time()
            maintenance = tick_start_time - tick_end_time
            if done:
                break
        group.barrier()
        log("Done.")

    def _dump(self, run_dir: Path) -> None:
        save_state(run_dir / state_name(self.nimg), {
            # Counters as the next tick starts: a resumed run continues exactly where this one goes on.
            "kind": self.kind, "nimg": self.nimg, "cur_tick": self.cur_tick + 1, "tick_start_nimg": self.nimg,
            "seed": self.seed, "options": self.options.to_json(), "elapsed_sec": float(self.elapsed),
            self.kind: _json(self._model_config()),
            "net": self.net.state_dict(), "optimizer": self.optimizer.state_dict(),
            **self._state(),
        })


class Trainer(TrainingRun):
    """One training of a denoiser: ``Trainer(options).run()`` (or ``train(options)``). ``dataset`` replaces
    ``--data`` by any object of the ImageSource protocol (e.g. an in-memory dataset); ``stream`` receives the
    progress text.

    Per micro-batch the loss draws and evaluates everything through its own interface
    (:class:`~edm_toolkit.losses.TrainingLoss`): the per-sample variates come from each image's generator, the
    loss's ``noise_levels`` turn them into sigma and loss weights with its state at that step, ``element_terms``
    gives the per-element terms of D(y + sigma n; sigma), and after the step ``observe`` feeds the unweighted
    losses of the whole step (every process's, in image order) to a stateful loss (the loss-second-moment
    schedule sampler). The loss sees the denoiser's protocol; under DDP its calls run through the DDP module
    (:class:`~edm_toolkit.training.routing.RoutedDenoiser`).
    """


    # --- configuration and model ------------------------------------------------------------------------------
    def _configure(self) -> None:
        o = self.options
        resolution = int(self.source.resolution)
        self.low_res_size = None
        if o.discrete_model:
            self.precond = None
            self.flags = openai_flags(o.arch, o.model_flags, resolution=resolution, cond=o.cond, dropout=o.dropout,
                                      noise_schedule=o.noise_schedule, diffusion_steps=o.diffusion_steps)
            given = parse_model_flags(o.model_flags or "")
            self.loss = discrete_loss(self.flags, given, o.loss, o.schedule_sampler or "uniform")
            if is_upsampler(self.flags):
                self.low_res_size = int(self.flags["small_size"])
                for option, value in (("--grid-seeds", o.grid_seeds), ("--metrics", o.metrics or None)):
                    if value is not None:
                        raise ConfigError(f"{option} samples the model unconditionally, but an upsampler needs "
                                          "low-resolution inputs; drop it (run a cascade with edm generate)")
            part = self.loss.name
        else:
            self.flags = None
            self.precond, self.loss = resolve_components(o)
            if o.schedule_sampler is not None and not self.loss.draws_on_model_grid:
                raise ConfigError(f"--schedule-sampler draws the steps of the iddpm-* losses; loss {self.loss.name!r} "
                                  "has its own p_train: drop --schedule-sampler")
            part = self.precond.name
        self.description = run_description(self.source.name, o.cond, o.arch, part, self.group.world_size, o.batch,
                                           o.precision, o.desc)
        self.detector = self.reference = None
        if o.metrics:
            from ..metrics.detector_files import load_detector
            from ..metrics.statistics import FIDStatistics

            self.reference = FIDStatistics.load(o.ref)
            self.detector = load_detector(o.detector, device=self.device)

    def _build(self) -> None:
        o = self.options
        resolution, channels = int(self.source.resolution), int(self.source.num_channels)
        if self.flags is not None:
            self.backbone = {"type": "openai", "flags": self.flags}
            net = build_openai_denoiser(o.arch, self.flags, channels=channels, label_dim=self.label_dim)
        else:
            augment_dim = AUGMENT_DIM if o.augment > 0 else 0
            self.backbone = backbone_config(o.arch, resolution=resolution, channels=channels, label_dim=self.label_dim,
                                            augment_dim=augment_dim, dropout=o.dropout, cbase=o.cbase,
                                            cres=list(o.cres) if o.cres else None, overrides=o.net_opts)
            net = build_denoiser(self.backbone, self.precond, use_fp16=o.precision == "fp16")
        self.net = net.train().requires_grad_(True).to(self.device)
        self.loss.check_model(self.net)
        self.view = self.net  # the protocol view the loss calls (routed through DDP / compile in _route)
        self.augment_pipe = build_augment_pipe(o.augment) if o.augment else None
        self._check_forward()
        self.optimizer = torch.optim.Adam(self.net.parameters(), lr=o.lr, betas=(0.9, 0.999), eps=1e-8)
        if o.transfer is not None:
            self._transfer(o.transfer)
        rampup = None if o.transfer is not None else o.ema_rampup
        self.ema = HalfLifeEMA(self.net, o.ema * 1e6, rampup)
        self.power_ema = PowerFunctionEMA(self.net, o.phema) if o.phema else None
        self.term_names = [name for name in self.loss.term_names if name != "loss"]  # reported beside Loss/loss

    def _model_config(self) -> dict[str, Any]:
        return model_config(self.net) if self.flags is not None else denoiser_config(self.net)

    def _bound(self, net, y: torch.Tensor):
        """The denoiser the loss sees for clean images y: an upsampler gets their area-downsampled version bound as
        its low_res input (the original's super_res_train.py: ``F.interpolate(large, small, mode="area")``, no
        noise augmentation)."""
        if self.low_res_size is None:
            return net
        size = (self.low_res_size, self.low_res_size)
        return BoundInputs(net, low_res=torch.nn.functional.interpolate(y, size, mode="area"))

    def _summary_inputs(self) -> tuple[list[torch.Tensor], dict[str, torch.Tensor]]:
        """One zero image at sigma 1 with zero labels (and zero augment labels or low-resolution input): the
        network's call signature."""
        C, R = self.net.img_channels, self.net.img_resolution
        inputs = [torch.zeros([1, C, R, R], device=self.device), torch.ones([1], device=self.device),
                  torch.zeros([1, self.label_dim], device=self.device)]
        extra = {}
        if self.augment_pipe is not None:
            extra["augment_labels"] = torch.zeros([1, AUGMENT_DIM], device=self.device)
        if self.low_res_size is not None:
            extra["low_res"] = torch.zeros([1, C, self.low_res_size, self.low_res_size], device=self.device)
        return inputs, extra

    def _check_forward(self) -> None:
        """Runs the network once on one image, so that an architecture that does not fit the data fails now, in
        one line, and not in the first training step."""
        inputs, extra = self._summary_inputs()
        self.net.eval()
        fix = "check --model-flags" if self.flags is not None else "check --cres and --net-opt"
        try:
            with torch.no_grad():
                output = self.net(*inputs, **extra)
        except (RuntimeError, ValueError) as exc:
            raise ConfigError(f"the {self.options.arch} network does not run on {self.net.img_channels}x"
                              f"{self.net.img_resolution}x{self.net.img_resolution} images "
                              f"({str(exc).splitlines()[0][:200]}); {fix}") from None
        finally:
            self.net.train()
        if output.shape != inputs[0].shape:
            raise ConfigError(f"the {self.options.arch} network maps {list(inputs[0].shape)} images to "
                              f"{list(output.shape)}; {fix}")

    def _transfer(self, path: str) -> None:
        """EDM's --transfer: initialise from another network's weights (matching names), EMA without ramp-up."""
        from ..loading import load_denoiser

        source = load_denoiser(path).state_dict()
        target = self.net.state_dict()
        matched = 0
        for name, tensor in source.items():
            if name in target:
                if target[name].shape != tensor.shape:
                    raise CheckpointError(f"--transfer {path}: {name} has shape {list(tensor.shape)}, this network "
                                          f"{list(target[name].shape)}; transfer needs the same architecture")
                with torch.no_grad():
                    target[name].copy_(tensor)
                matched += 1
        if matched == 0:
            raise CheckpointError(f"--transfer {path}: no weight of that network matches this one")

    def dry_run(self) -> None:
        """Checks every option, then prints the options and the network summary; writes nothing."""
        try:
            self._setup()
            if self.group.rank == 0:
                self.print("Training options:")
                self.print(self.options.to_json())
                for line in self._summary_lines():
                    self.print(line)
                inputs, extra = self._summary_inputs()
                self.print(module_summary(self.net, inputs, extra))
                self.print("Dry run; exiting.")
        finally:
            shutdown()

    def _summary_lines(self) -> list[str]:
        o, R = self.options, self.source.resolution
        if self.flags is not None:
            kind = "upsampler" if self.low_res_size is not None else "model"
            network = f"{o.arch} ({type(self.net.model).__name__}, {kind} of {OPENAI_ARCHITECTURES[o.arch]}-diffusion)"
            design = (f"Diffusion, loss:         {self.flags['noise_schedule']} schedule, T = "
                      f"{self.flags['diffusion_steps']}, variance {self.net.step_grid.variance}; {self.loss.name} "
                      f"({self.loss.schedule_sampler} steps)")
        else:
            network = f"{o.arch} ({self.backbone['type']})"
            design = f"Preconditioning, loss:   {self.precond.name}, {self.loss.name}"
        return [
            f"Dataset:                 {o.data if self.dataset is None else self.source.name} "
            f"({len(self.source)} images, {self.source.num_channels}x{R}x{R})",
            f"Class-conditional:       {o.cond} (label_dim {self.label_dim}, label dropout {o.cond_drop})",
            f"Network:                 {network}, {parameter_count(self.net):,} parameters",
            design,
            f"Processes, batch:        {self.group.world_size}, {o.batch} ({self.batch_gpu} per micro-batch, "
            f"{self.rounds} accumulation rounds)",
            f"Precision, device:       {o.precision}{' compiled' if o.compile else ''}, {self.device}",
            f"Seed:                    {self.seed}",
        ]

    def _options_record(self) -> dict[str, Any]:
        record = dict(self.options.to_dict(), seed=self.seed, loss_params=_loss_params(self.loss),
                      backbone=self.backbone)
        if self.precond is not None:
            record["precond_params"] = self.precond.params
        return record

    # --- the step -----------------------------------------------------------------------------------------------
    def _samples(self):
        return TrainingSamples(self.source, self.streams, self.loss, self.label_dim > 0, self.options.cond_drop,
                               self.augment_pipe)

    def _calls_module(self) -> nn.Module:
        return DenoiserCalls(self.net)

    def _route(self, calls: Callable | None) -> None:
        self.view = self.net if calls is None else RoutedDenoiser(self.net, calls)
        self._observed: list[tuple[torch.Tensor, torch.Tensor]] = []

    def _meter_names(self) -> list[str]:
        return ["Loss/loss", *(f"Loss/{name}" for name in self.term_names)]

    def _objective(self, batch, meters: Meters) -> torch.Tensor:
        y, labels, variates, noise, augment_labels = batch
        sigma, weight = self.loss.noise_levels(self.view, variates)
        terms = self.loss.element_terms(self._bound(self.view, y), y, sigma, noise * sigma, labels,
                                        augment_labels if self.augment_pipe is not None else None)
        losses = total_of(terms)
        loss = losses * weight
        meters.add("Loss/loss", loss.detach().flatten(1).sum(dim=1) if self.loss.reports_per_sample else loss)
        for name in self.term_names:  # per sample, weighted, as the original logs its terms
            meters.add(f"Loss/{name}", (terms[name].detach() * weight).flatten(1).sum(dim=1))
        self._observed.append((sigma.detach(), losses.detach().flatten(1).sum(dim=1)))
        return loss

    def _step_done(self) -> None:
        # The unweighted losses of the whole step, in image order on every process (gathered in rank order).
        sigma = torch.cat([s for s, _ in self._observed])
        losses = torch.cat([v for _, v in self._observed])
        self._observed.clear()
        self.loss.observe(self.view, sigma, losses[:, None])

    def _learning_rate(self) -> float:
        return learning_rate(self.options.lr, self.nimg, self.options.lr_rampup)

    def _after_update(self) -> None:
        self.ema.update(self.nimg, self.options.batch)
        if self.power_ema is not None:
            self.power_ema.update(self.nimg, self.options.batch)

    # --- outputs ------------------------------------------------------------------------------------------------
    def _snapshot(self, run_dir: Path) -> None:
        kimg = self.nimg // 1000
        save_model(self.ema.module, run_dir / f"network-snapshot-{kimg:06d}.pt")
        if self.power_ema is not None:
            for sigma_rel, module in zip(self.power_ema.sigma_rels, self.power_ema.modules):
                save_model(module, run_dir / power_ema_name(self.nimg, sigma_rel))
        if self.options.grid_seeds is not None:
            self._grid(run_dir / f"grid-{kimg:06d}.png")

    def _sampler(self):
        return load_preset(self.options.preset if self.options.preset is not None else "edm").sampling

    def _grid(self, path: Path) -> None:
        from ..generate import sample_batch
        from ..io.images import make_grid, save_png, to_uint8

        images = sample_batch(self.ema.module, self._sampler(), list(self.options.grid_seeds), self.device)
        save_png(make_grid(list(to_uint8(images))), path)

    def _evaluate(self, run_dir: Path, total_sec: float) -> dict[str, float]:
        """--metrics: FID of the EMA's images (the grid's sampler, seeds 0..N-1) against --ref, on every process;
        rank 0 appends each to metric-{name}.jsonl (StyleGAN's and EDM2's layout) and to this tick's
        stats.jsonl line as Metrics/{name}."""
        from ..metrics.generated import generated_statistics

        results = {}
        for name in self.options.metrics:
            start = time.time()
            statistics = generated_statistics(self.ema.module, self._sampler(), range(metric_images(name)),
                                              self.detector, batch_size=self.batch_gpu, device=self.device,
                                              group=self.group)
            value = float(statistics.frechet_distance(self.reference))
            results[f"Metrics/{name}"] = value
            if self.group.rank == 0:
                seconds = time.time() - start
                append_jsonl(run_dir / f"metric-{name}.jsonl", {
                    "results": {name: value}, "metric": name, "total_time": seconds,
                    "total_time_str": format_time(seconds), "num_gpus": self.group.world_size,
                    "snapshot_pkl": f"network-snapshot-{self.nimg // 1000:06d}.pt", "kimg": self.nimg / 1e3,
                    "timestamp": time.time()})
        return results

    def _truncate_outputs(self, run_dir: Path, kimg: float) -> None:
        for name in self.options.metrics:
            truncate_jsonl(run_dir / f"metric-{name}.jsonl", kimg, lambda record: record["kimg"])

    def _state(self) -> dict[str, Any]:
        return {
            "ema": self.ema.state_dict(),
            "power_ema": self.power_ema.state_dict() if self.power_ema is not None else {"sigma_rels": [], "emas": []},
            "loss": self.loss.state_dict(),
        }

    def _restore_state(self, state: dict) -> None:
        self.ema.load_state_dict(state["ema"])
        power = state["power_ema"]
        tracked = [float(s) for s in power.get("sigma_rels", [])]
        if tracked != list(self.options.phema):
            raise ConfigError(f"--phema {','.join(map(str, self.options.phema)) or '(none)'} differs from the resumed "
                              f"run's {','.join(map(str, tracked)) or '(none)'}; give the same --phema")
        if self.power_ema is not None:
            self.power_ema.load_state_dict(power)
        self.loss.load_state_dict(state.get("loss", {}))


def train(options: TrainingOptions, dataset: ImageSource | None = None, stream: TextIO | None = None) -> Path:
    """Runs a training; returns the run directory."""
    return Trainer(options, dataset, stream).run()


def _worker_init(_worker_id: int) -> None:
    torch.set_num_threads(1)  # per-sample work on small tensors: threads only contend


def _json(data) -> str:
    return json.dumps(data, sort_keys=True)


def _holds_a_run(directory: Path) -> bool:
    return (directory / "stats.jsonl").is_file() or latest_state(directory) is not None


def _describe(config: dict) -> str:
    """A short description of a model config (the network type, resolution, width, classes, parameterisation)."""
    config = config if isinstance(config, dict) else {}
    network = config.get("network") if isinstance(config.get("network"), dict) else {}
    kwargs = network.get("kwargs") if isinstance(network.get("kwargs"), dict) else {}
    resolution = kwargs.get("img_resolution", kwargs.get("image_size"))
    classes = kwargs.get("label_dim", kwargs.get("num_classes"))
    precond = config.get("precond") if isinstance(config.get("precond"), dict) else None
    diffusion = config.get("diffusion") if isinstance(config.get("diffusion"), dict) else None
    kind = (f"precond {precond.get('name')}" if precond is not None else
            f"{diffusion.get('noise_schedule')} schedule, T = {diffusion.get('diffusion_steps')}" if diffusion
            else config.get("type"))
    return (f"{network.get('type')} {resolution}x{resolution}, {kwargs.get('model_channels')} channels, "
            f"classes {classes}, {kind}")


def _loss_params(loss) -> dict[str, Any]:
    return {"name": loss.name, **dataclasses.asdict(loss)}
