"""edm generate: a drop-in for EDM's generate.py, on any preset, solver and network."""

from __future__ import annotations

import dataclasses

import click

from ..discretizations import DISCRETIZATIONS, MAX_STEPS
from ..inference import COMPILE_MODES
from ..errors import EDMToolkitError
from ..registry import show
from ..schedules import SCALINGS, SCHEDULES
from ..solvers import SOLVERS
from ..solvers.base import solver_options
from .files import source_options
from .common import load_network, resolve_device
from .types import Count, Interval, Number, OutputDir, Seeds


def _choice(registry):
    return click.Choice(registry.names())


@click.command(context_settings={"show_default": True})
@click.option("--network", "network_path", metavar="PATH", default=None,
              help="Model file to sample  [default: the built-in model, no download]")
@click.option("--outdir", default=None, metavar="DIR", type=OutputDir(),
              help="Where to save the output images  [required, except with --fid]")
@click.option("--seeds", type=Seeds(), default="0-63",
              help="Random seeds (e.g. 1,2,5-10), each in 0..2**32-1, at most 1,000,000")
@click.option("--subdirs", is_flag=True, help="Create a subdirectory for every 1000 seeds")
@click.option("--class", "class_idx", type=Count(min=0), default=None, metavar="INT",
              help="Class label  [default: random]")
@click.option("--batch", "max_batch_size", type=Count(min=1), default=64, metavar="INT",
              help="Maximum batch size")
@click.option("--preset", default="edm", metavar="NAME|PATH",
              help="Sampling defaults: a built-in preset (see 'edm presets'), or a preset file: a path ending in .toml "
                   "or holding a '/' (a built-in name never means a file)")
@click.option("--steps", "num_steps", type=Count(min=2, max=MAX_STEPS), default=None, metavar="INT",
              help=f"Number of sampling steps, at most {MAX_STEPS:,}  [default: the preset's, 18 for edm]")
@click.option("--sigma_min", type=Number(min=0, min_open=True), default=None, metavar="FLOAT",
              help="Lowest noise level  [default: varies with --disc]")
@click.option("--sigma_max", type=Number(min=0, min_open=True), default=None, metavar="FLOAT",
              help="Highest noise level  [default: varies with --disc]")
@click.option("--rho", type=Number(min=0, min_open=True), default=None, metavar="FLOAT",
              help="Time step exponent of --disc edm  [default: 7]")
@click.option("--S_churn", "S_churn", type=Number(min=0), default=None, metavar="FLOAT",
              help="Stochasticity strength  [default: 0]")
@click.option("--S_min", "S_min", type=Number(min=0), default=None, metavar="FLOAT",
              help="Stoch. min noise level  [default: 0]")
@click.option("--S_max", "S_max", type=Number(min=0, allow_inf=True), default=None, metavar="FLOAT",
              help="Stoch. max noise level  [default: inf]")
@click.option("--S_noise", "S_noise", type=Number(min=0), default=None, metavar="FLOAT",
              help="Stoch. noise inflation  [default: 1]")
@click.option("--solver", type=_choice(SOLVERS), default=None,
              help="Solver (see 'edm solvers'); ddpm/ddim are the original samplers on the model's own grid  "
                   "[default: the preset's]")
@click.option("--solver-opt", "solver_opts", multiple=True, metavar="KEY=VALUE",
              help="A solver option, e.g. --solver-opt order=3 (repeatable; see 'edm solvers')")
@click.option("--disc", "discretization", type=_choice(DISCRETIZATIONS), default=None,
              help="Time step discretization {t_i}  [default: the preset's]")
@click.option("--schedule", type=_choice(SCHEDULES), default=None, help="Noise schedule sigma(t)  [default: the preset's]")
@click.option("--scaling", type=_choice(SCALINGS), default=None, help="Signal scaling s(t)  [default: the preset's]")
@click.option("--guidance", type=Number(), default=None, metavar="W",
              help="Guidance weight w (1 = none): classifier-free for a conditional network, or autoguidance "
                   "with --guide-network")
@click.option("--guide-network", default=None, metavar="PATH",
              help="A weaker network guiding the main one (autoguidance, EDM2): D_guide + w (D - D_guide)")
@click.option("--classifier", "classifier_path", default=None, metavar="PATH",
              help="ADM noisy classifier (e.g. 64x64_classifier.pt) for classifier guidance")
@click.option("--classifier-scale", type=Number(), default=None, metavar="S", help="Classifier guidance scale  [default: 1]")
@click.option("--classifier-flags", default=None, metavar="FLAGS",
              help="The classifier's flags in the original syntax, where its file name does not tell")
@click.option("--guidance-interval", type=Interval(), default=None, metavar="LO,HI",
              help="Guide only where LO <= sigma <= HI (HI may be inf)")
@click.option("--upsample-from", "upsample_from", default=None, metavar="DIR", type=click.Path(file_okay=False),
              help="Cascade: --network is an upsampler conditioned on the PNG of each seed in DIR (a base model's "
                   "output)")
@click.option("--fid", "fid_ref", default=None, metavar="REF.npz",
              help="Compute FID against these reference statistics (EDM's fid.py format) on the images as they are "
                   "generated, writing no PNG")
@click.option("--num", type=Count(min=2, max=1_000_000), default=None, metavar="INT",
              help="With --fid: the number of images, seeds 0..INT-1  [default: --seeds]")
@click.option("--detector", "detector_path", default=None, metavar="PATH",
              help="With --fid: the Inception weights (see 'edm fid --help' for where they are found)")
@click.option("--grid", is_flag=True, help="Also write all images as one PNG grid, DIR/grid.png")
@click.option("--skip-existing", is_flag=True,
              help="Leave out seeds whose PNG already exists: continue an interrupted run where it stopped")
@click.option("--device", default=None, metavar="DEVICE", help="Torch device  [default: cuda if available, else cpu]")
@source_options
@click.option("--weights", type=click.Choice(["ema", "raw"]), default="ema", help="score_sde checkpoints: EMA or raw weights")
@click.option("--precision", type=click.Choice(["fp32", "bf16", "fp16"]), default="fp32",
              help="Network precision (autocast); fp32 is the faithful path")
@click.option("--channels-last", is_flag=True, help="Run the network in channels_last memory format")
@click.option("--compile", "compile_net", is_flag=True, help="torch.compile the network (slow start, faster steps)")
@click.option("--compile-mode", type=click.Choice(COMPILE_MODES), default="default",
              help="With --compile: torch.compile's mode ('reduce-overhead' records CUDA graphs)")
@click.option("--compile-cache", default=None, metavar="DIR", type=click.Path(file_okay=False),
              help="With --compile: keep the compiler's caches here, so the next run does not compile again")
def generate(network_path, outdir, seeds, subdirs, class_idx, max_batch_size, preset, grid, skip_existing, device,
             model_flags, model_config, weights, precision, channels_last, compile_net, solver_opts, guidance,
             guide_network, classifier_path, classifier_scale, classifier_flags, guidance_interval, upsample_from,
             fid_ref, num, detector_path, compile_mode, compile_cache, **options):
    """Generate images with any sampler of the design space (EDM's generate.py options).

    \b
    Examples:
      edm generate --outdir out --seeds 0-15 --grid            # built-in model, EDM sampler
      edm generate --solver heun --steps 35 --outdir out
      edm generate --preset vp --network model.pt --outdir out --disc edm --schedule linear --scaling none
      edm generate --outdir out --seeds 0-49999 --skip-existing  # continue an interrupted run
      edm generate --network model.pt --fid cifar10-32x32.npz --num 50000  # FID, no PNG written
      edm generate --network sr.pt --upsample-from low --outdir high --solver ddpm --steps 250
      torchrun --standalone --nproc_per_node=2 -m edm_toolkit generate --outdir out --seeds 0-999
    """
    import torch

    from ..distributed import init_from_env, shutdown
    from ..generate import check_class, check_outputs, generate_images, write_grid
    from ..inference import InferenceOptions, optimize

    if fid_ref is not None:
        _check_fid_options(outdir, grid, subdirs, skip_existing, upsample_from)
        if num is not None:
            if click.get_current_context().get_parameter_source("seeds") is not click.core.ParameterSource.DEFAULT:
                raise click.UsageError("give the images either as --seeds or as --num, not both")
            seeds = list(range(num))
    elif outdir is None:
        raise click.UsageError("Missing option '--outdir' (or --fid REF.npz to measure without writing images)")
    elif num is not None or detector_path is not None:
        raise click.UsageError(f"{'--num' if num is not None else '--detector'} applies to --fid; add --fid REF.npz "
                               "or drop it")
    if not seeds:
        raise click.BadParameter("no seeds given", param_hint="'--seeds'")
    for flag, value in (("--model-flags", model_flags), ("--model-config", model_config)):
        if value is not None and network_path is None:
            raise click.UsageError(f"{flag} describes a --network file; give --network PATH or drop {flag}")
    _check_guidance_options(guidance, guide_network, classifier_path, classifier_scale, classifier_flags,
                            guidance_interval)
    device = resolve_device(device)
    inference = InferenceOptions(precision, channels_last, compile_net, compile_mode, compile_cache)
    sampler = _sampler_from_options(preset, options, solver_opts)
    if outdir is not None:
        check_outputs(outdir, seeds, subdirs, extra=["grid.png"] if grid else [])  # nothing in the way, before any work
    reference = _fid_reference(fid_ref) if fid_ref is not None else None
    group = init_from_env(device.type)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", group.local_rank)
    try:
        net = load_network(network_path, device, echo=group.rank == 0, model_flags=model_flags,
                            config=model_config, use_ema=weights == "ema")
        net = optimize(net, inference)
        net, sampler = _with_guidance(net, sampler, device, guidance, guide_network, classifier_path,
                                      1.0 if classifier_scale is None else classifier_scale, classifier_flags,
                                      guidance_interval)
        check_class(net, class_idx)
        plan = sampler.plan(net, device)  # fail now on an impossible combination, not after loading every rank
        if group.rank == 0:
            at_least = "" if sampler.solver.fixed_cost else "at least "
            where = f"for FID against {fid_ref}" if reference is not None else f"to {str(outdir)!r}"
            click.echo(f"Generating {len(seeds)} images {where} ({_describe(sampler, plan)}, "
                       f"{at_least}{plan.nfe} denoiser calls per image, {device})", err=True)
        if reference is not None:
            value = _generated_fid(net, sampler, seeds, reference, detector_path, max_batch_size, device, group,
                                   class_idx, plan)
            if group.rank == 0:
                click.echo(f"{value:g}")
            return
        generate_images(net, sampler, seeds, outdir, max_batch_size=max_batch_size, class_idx=class_idx,
                        subdirs=subdirs, device=device, group=group, plan=plan, skip_existing=skip_existing,
                        upsample_from=upsample_from, fixed_batch=compile_net)
        group.barrier()
        if group.rank == 0:
            if grid:
                click.echo(f"Wrote grid {write_grid(seeds, outdir, subdirs)}", err=True)
            click.echo("Done.", err=True)
    finally:
        shutdown()


def _check_fid_options(outdir, grid, subdirs, skip_existing, upsample_from):
    given = [flag for flag, value in (("--outdir", outdir), ("--grid", grid), ("--subdirs", subdirs),
                                      ("--skip-existing", skip_existing), ("--upsample-from", upsample_from)) if value]
    if given:
        raise click.UsageError(f"--fid measures the images without writing them; drop {given[0]} (or write PNGs "
                               "and run 'edm fid calc' on them)")


def _fid_reference(path):
    """The reference statistics, read (and checked) before any work."""
    from ..metrics import FIDStatistics
    from ..metrics.inception import FEATURE_DIM

    reference = FIDStatistics.load(path)
    if reference.mu.shape[0] != FEATURE_DIM:
        raise click.BadParameter(f"{path} holds {reference.mu.shape[0]}-dimensional statistics, not the Inception "
                                 f"pool features' {FEATURE_DIM}; make it with 'edm fid ref'", param_hint="'--fid'")
    return reference


def _generated_fid(net, sampler, seeds, reference, detector_path, batch, device, group, class_idx, plan) -> float:
    """FID of the generated images against ``reference``: the detector's statistics accumulated batch by batch
    (edm_toolkit.metrics.generated), the sums added across torchrun ranks."""
    from ..generate import Progress
    from ..metrics import load_detector
    from ..metrics.generated import generated_statistics

    detector = load_detector(detector_path, device)
    meter = Progress(len(seeds), plan.nfe, enabled=group.rank == 0)
    try:
        stats = generated_statistics(net, sampler, seeds, detector, batch_size=batch, device=device, group=group,
                                     class_idx=class_idx, progress=meter.batch_done)
    finally:
        meter.close()
    return stats.frechet_distance(reference)


def _check_guidance_options(guidance, guide_network, classifier_path, classifier_scale, classifier_flags, interval):
    if guide_network is not None and guidance is None:
        raise click.UsageError("--guide-network needs a weight: add --guidance W (e.g. 2.0)")
    if classifier_path is None and (classifier_scale is not None or classifier_flags is not None):
        raise click.UsageError("--classifier-scale/--classifier-flags describe a classifier: add --classifier PATH")
    if guidance is not None and classifier_path is not None:
        raise click.UsageError("choose one kind of guidance: --guidance or --classifier, not both")
    if interval is not None and guidance is None and classifier_path is None:
        raise click.UsageError("--guidance-interval needs --guidance or --classifier")


def _with_guidance(net, sampler, device, guidance, guide_network, classifier_path, classifier_scale,
                   classifier_flags, interval):
    """The denoiser (and sampler) with the requested guidance.

    A classifier goes to a solver that takes one as an option (ddpm/ddim: the original guided forms), and
    otherwise wraps the denoiser (the sigma form, for every other solver).
    """
    from ..guidance import AutoGuidance, ClassifierFreeGuidance, ClassifierGuidance

    if guidance is not None:
        if guide_network is not None:
            from ..loading import load_denoiser

            return AutoGuidance(net, load_denoiser(guide_network, device=device), guidance, interval), sampler
        return ClassifierFreeGuidance(net, guidance, interval), sampler
    if classifier_path is None:
        return net, sampler
    from ..adapters.openai import load_openai_classifier

    classifier = load_openai_classifier(classifier_path, model_flags=classifier_flags).to(device)
    if "classifier" in _option_names(sampler.solver):
        if interval is not None:
            raise click.UsageError(f"--guidance-interval applies to the continuous solvers, not to --solver "
                                   f"{sampler.solver.name}")
        return net, sampler.replace(solver=dataclasses.replace(sampler.solver, classifier=classifier,
                                                               classifier_scale=classifier_scale))
    return ClassifierGuidance(net, classifier, classifier_scale, interval), sampler


def _option_names(solver) -> set[str]:
    return {f.name for f in dataclasses.fields(solver) if f.init}


def _describe(sampler, plan) -> str:
    solver = sampler.solver
    if solver.runs_on_model_grid:
        return f"{solver.name}, {len(plan.steps)} steps on the model's own grid"
    return (f"{len(plan.steps)} steps, {solver.name}/{sampler.discretization.name}/"
            f"{sampler.schedule.name}/{sampler.scaling.name}")


def parse_option_value(text: str):
    """A --solver-opt value as TOML would read it: integer, float, true/false, a [list], else a string.

    Read through the bounded TOML reader: a value too deep, too long or not UTF-8 is an error, not a string."""
    from ..presets import TOMLSyntaxError, read_toml

    try:
        return read_toml(f"v = {text}", "--solver-opt value")["v"]
    except TOMLSyntaxError:
        return text


def _solver_options(pairs) -> dict:
    options = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        key = key.strip()
        if not sep or not key:
            raise click.BadParameter(f"{show(pair)} is not KEY=VALUE", param_hint="'--solver-opt'")
        if key == "name":
            raise click.BadParameter("the solver is chosen with --solver NAME, not --solver-opt name=...",
                                     param_hint="'--solver-opt'")
        if key == "classifier_scale":
            raise click.BadParameter("set the classifier guidance scale with --classifier-scale S (with --classifier "
                                     "PATH), not --solver-opt", param_hint="'--solver-opt'")
        options[key] = parse_option_value(value.strip())
    return options


def _sampler_from_options(preset_name, options, solver_opts=()):
    """The preset's sampler with the given command-line options replacing its values."""
    from ..presets import load_preset

    sampler = load_preset(preset_name).sampling
    given = {k: v for k, v in options.items() if v is not None}
    changes = {k: given[k] for k in ("num_steps", "sigma_min", "sigma_max") if k in given}
    solver = SOLVERS.create(given.get("solver", sampler.solver))
    if solver.runs_on_model_grid:
        misplaced = [k for k in ("discretization", "sigma_min", "sigma_max", "rho") if k in given]
        if misplaced:
            flag = "--" + {"discretization": "disc"}.get(misplaced[0], misplaced[0])
            raise click.UsageError(f"{flag} does not apply to --solver {solver.name}, which runs on the model's own "
                                   "grid; drop it, or set the grid with --steps or --solver-opt respacing=...")
        changes.update(discretization=None, sigma_min=None, sigma_max=None)  # the preset's do not apply either
    for key in ("solver", "discretization", "schedule", "scaling"):
        current = getattr(sampler, key)
        if key in given and (current is None or given[key] != current.name):
            changes[key] = given[key]  # a new component with its default parameters
    churn = {k: given[k] for k in ("S_churn", "S_min", "S_max", "S_noise") if k in given}
    if churn:
        changes["churn"] = sampler.churn.__class__(**{**sampler.churn.__dict__, **churn})
    sampler = sampler.replace(**changes)
    extra = _solver_options(solver_opts)
    if extra:
        allowed = solver_options(sampler.solver)
        unknown = [k for k in extra if k not in allowed]
        if unknown:
            raise click.BadParameter(f"{show(unknown[0])} is not an option of solver {sampler.solver.name!r}; its "
                                     f"options: {', '.join(allowed) or '(none)'}", param_hint="'--solver-opt'")
        # The preset's other options of this solver stay; the given ones go through the registry's validation.
        current = {k: getattr(sampler.solver, k) for k in allowed}
        sampler = sampler.replace(solver=SOLVERS.create({"name": sampler.solver.name, **current, **extra}))
    if "rho" in given:
        if sampler.discretization.name != "edm":
            raise EDMToolkitError(f"--rho applies to --disc edm only, but the discretization is "
                                  f"{sampler.discretization.name!r}; drop --rho or add --disc edm")
        sampler = sampler.replace(discretization={"name": "edm", "rho": given["rho"]})
    return sampler
