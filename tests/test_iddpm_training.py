"""The seed papers' own training (issue 11): improved-diffusion's discrete-time model on its own grid, trained by
`edm train --arch iddpm` with the iddpm-* losses through the loop's loss interface.

It learns (L_hybrid lowers both terms, and the learned variance lies between beta and beta-tilde and beats both
fixed choices), the trained model is a first-class checkpoint (ddpm with its learned variance, ddim, continuous
solvers, the variational bound in bits/dim), loss-second-moment resumes exactly, and bad combinations give one
line naming the fix. Tiny networks (32 channels, one level) on 8x8 grayscale discs.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from edm_toolkit.discrete import vlb_terms
from edm_toolkit.errors import ConfigError
from edm_toolkit.generate import sample_batch
from edm_toolkit.loading import load_model
from edm_toolkit.losses import LOSSES, LossSecondMomentSampler
from edm_toolkit.metrics.likelihood import variational_bound
from edm_toolkit.rng import SeedGenerators
from edm_toolkit.sampling import Sampler
from edm_toolkit.training import TrainingOptions, train
from edm_toolkit.training.architectures import build_openai_denoiser, openai_flags
from edm_toolkit.training.dataset import ImageDataset
from edm_toolkit.training.state import load_state

from test_cli_train import edm, fails_cleanly
from test_training import make_dataset, training_tensors

pytestmark = pytest.mark.usefixtures("one_thread")

T = 50
TINY_FLAGS = "--num_channels 32 --num_res_blocks 1 --channel_mult 1 --attention_resolutions 1 --num_heads 1"
HYBRID_FLAGS = TINY_FLAGS + " --learn_sigma True --rescale_learned_sigmas False"


def iddpm_options(data, outdir, steps: int, batch: int = 8, **changes) -> TrainingOptions:
    options = dict(data=str(data), outdir=str(outdir), arch="iddpm", model_flags=HYBRID_FLAGS, diffusion_steps=T,
                   noise_schedule="cosine", batch=batch, duration=steps * batch / 1e6, lr=2e-3, lr_rampup=0,
                   ema=0.0005, ema_rampup=None, tick=steps * batch / 1000 / 3, snap=3, dump=3, workers=0, seed=0,
                   nosubdir=True)
    options.update(changes)
    return TrainingOptions(**options)


def dataset_images(data) -> torch.Tensor:
    dataset = ImageDataset(data, use_labels=False)
    return torch.stack([torch.from_numpy(np.array(dataset[i][0])) for i in range(len(dataset))]).float() / 127.5 - 1


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("iddpm") / "discs", n=8)


@pytest.fixture(scope="module")
def hybrid_run(data, tmp_path_factory):
    """150 steps of L_hybrid (lambda = 1: rescale_learned_sigmas False, the MSE loss type) with batch 8 (one
    thread: module fixtures run before the function-scoped one_thread)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return train(iddpm_options(data, tmp_path_factory.mktemp("hybrid"), steps=150))
    finally:
        torch.set_num_threads(threads)


def fixed_draws(y: torch.Tensor, per_step: int = 4, seed: int = 1):
    """Every step of the grid `per_step` times, with images and noise the training never drew."""
    t = torch.arange(T).repeat_interleave(per_step)
    images = y[torch.arange(len(t)) % len(y)]
    return images, t, torch.randn(images.shape, generator=torch.Generator().manual_seed(seed))


def test_hybrid_training_lowers_both_terms(data, hybrid_run):
    """The mse and vb terms of the original's training_losses, on fixed draws over every step, fall from those of
    the network at initialisation (built with the run's seed) to a fraction of them."""
    stats = [json.loads(line) for line in (hybrid_run / "stats.jsonl").read_text().splitlines()]
    assert {"Loss/loss", "Loss/mse", "Loss/vb"} <= set(stats[0]) and stats[0]["Loss/loss"]["num"] == 8
    options = json.loads((hybrid_run / "training_options.json").read_text())
    assert options["loss_params"] == {"name": "iddpm-hybrid", "predict_xstart": False, "rescale_learned_sigmas": False,
                                      "schedule_sampler": "uniform"}
    flags = openai_flags("iddpm", HYBRID_FLAGS, resolution=8, cond=False, diffusion_steps=T, noise_schedule="cosine")
    torch.manual_seed(0)
    initial = build_openai_denoiser("iddpm", flags, channels=1, label_dim=0)
    trained = load_model(hybrid_run / "network-snapshot-000001.pt")
    loss = LOSSES.create({"name": "iddpm-hybrid", "rescale_learned_sigmas": False})
    images, t, noise = fixed_draws(dataset_images(data))
    with torch.no_grad():
        before = {k: float(v.mean()) for k, v in loss.terms(initial, images, t, noise).items()}
        after = {k: float(v.mean()) for k, v in loss.terms(trained, images, t, noise).items()}
    # measured: mse 1.01 -> 0.14, vb 14.6 -> 1.15 (bits, lambda = 1)
    assert after["mse"] < 0.3 * before["mse"] and after["vb"] < 0.3 * before["vb"], (before, after)


def test_learned_variance_lies_between_beta_and_beta_tilde(data, hybrid_run):
    """log Sigma = frac log beta + (1 - frac) log beta_tilde with frac = (v + 1)/2 (Nichol & Dhariwal 2021, Eq.
    15) lies in the range for v in [-1, 1]; the trained variance does, and its L_{t-1} is below that of both fixed
    choices beta_tilde (small) and beta (large) with the same mean, so the vb term has trained it."""
    net = load_model(hybrid_run / "network-snapshot-000001.pt")
    grid = net.step_grid
    images, t, noise = fixed_draws(dataset_images(data))
    sigma = grid.sigmas[t].float().reshape(-1, 1, 1, 1)
    with torch.no_grad():
        D, v = net.denoise_with_variance(images + sigma * noise, sigma)
    log_variance = grid.model_log_variance(t, "learned", v).double()
    low = grid.posterior_log_variance_clipped[t].reshape(-1, 1, 1, 1)
    high = grid.betas.log()[t].reshape(-1, 1, 1, 1)
    inside = ((log_variance >= low - 1e-6) & (log_variance <= high + 1e-6)).double().mean()
    assert inside >= 0.99, float(inside)  # measured: every element
    assert float(v.abs().max()) > 0.05  # moved from the zero-initialised output layer's v = 0

    def vb(variance_v):
        terms = vlb_terms(grid, images, D, t, grid.model_log_variance(t, "learned", variance_v))
        return float(terms.flatten(1).mean(1)[t >= 1].mean())

    learned, small, large = vb(v), vb(-torch.ones_like(v)), vb(torch.ones_like(v))
    assert learned < min(small, large), (learned, small, large)  # measured 1.1073 < 1.1121, 1.1128


def test_trained_model_is_a_first_class_checkpoint(data, hybrid_run, tmp_path):
    """The snapshot samples with ddpm (its learned variance), ddim and a continuous solver through the grid, in the
    library and through edm generate, and its bits/dim by the variational bound is below the untrained network's."""
    net = load_model(hybrid_run / "network-snapshot-000001.pt")
    assert net.learned_variance and net.step_grid.num_timesteps == T and net.img_channels == 1
    for sampler in (Sampler(solver="ddpm", num_steps=T), Sampler(solver="ddim", num_steps=10),
                    Sampler(solver="heun", num_steps=8)):
        images = sample_batch(net, sampler, range(4))
        assert images.shape == (4, 1, 8, 8) and bool(images.isfinite().all()), sampler.solver.name
    result = edm("generate", "--network", hybrid_run / "network-snapshot-000001.pt", "--outdir", tmp_path / "images",
                 "--seeds", "0-1", "--solver", "ddpm", "--steps", 10)
    assert result.exit_code == 0, result.output
    assert (tmp_path / "images" / "000001.png").is_file()

    y = dataset_images(data)
    flags = openai_flags("iddpm", HYBRID_FLAGS, resolution=8, cond=False, diffusion_steps=T, noise_schedule="cosine")
    torch.manual_seed(0)
    initial = build_openai_denoiser("iddpm", flags, channels=1, label_dim=0)
    noise = SeedGenerators(range(len(y))).randn_like
    trained_bpd = variational_bound(net, y, randn_like=noise).total_bpd.mean()
    initial_bpd = variational_bound(initial, y, randn_like=SeedGenerators(range(len(y))).randn_like).total_bpd.mean()
    assert float(trained_bpd) < 0.7 * float(initial_bpd), (float(trained_bpd), float(initial_bpd))  # 4.32 vs 7.17


def test_loss_second_moment_resumes_exactly(data, tmp_path):
    """T = 8 steps: after 16 steps of 8 images every step holds its 10 losses (importance sampling is on); a run
    stopped there and resumed to 24 steps ends bit-identical to an uninterrupted one, schedule sampler included."""
    common = dict(model_flags=TINY_FLAGS, diffusion_steps=8, noise_schedule="cosine",
                  schedule_sampler="loss-second-moment", tick=0.008, snap=100, dump=1, dropout=0.0, seed=3)
    reference = train(iddpm_options(data, tmp_path / "reference", steps=24, **common))
    train(iddpm_options(data, tmp_path / "resumed", steps=16, **common))
    middle = load_state(tmp_path / "resumed" / "training-state-000000.pt")
    sampler = LossSecondMomentSampler(8)
    sampler.load_state_dict(middle["loss"])
    # the second half draws by sqrt(E[L_t^2])
    assert middle["nimg"] == 128 and sampler.warmed_up, middle["loss"]["loss_counts"]
    assert float(sampler.probabilities().max() / sampler.probabilities().min()) > 1.5
    train(iddpm_options(data, tmp_path / "resumed", steps=24, resume="auto", **common))
    expected = load_state(reference / "training-state-000000.pt")
    actual = load_state(tmp_path / "resumed" / "training-state-000000.pt")
    assert actual["nimg"] == expected["nimg"] == 192
    for key in ("loss_history", "loss_counts"):
        assert torch.equal(actual["loss"][key], expected["loss"][key]), key
    a, b = training_tensors(expected), training_tensors(actual)
    assert a.keys() == b.keys() and not [k for k in a if not torch.equal(a[k], b[k])]


def test_flag_semantics_choose_the_loss(data, tmp_path):
    """improved-diffusion's flags decide the loss as create_gaussian_diffusion does: use_kl -> iddpm-kl,
    learn_sigma -> iddpm-hybrid (rescaled by default in improved-diffusion), else iddpm-simple; predict_xstart
    sets the target of the mse and the denoiser's prediction."""
    cases = {"": ("iddpm-simple", {"predict_xstart": False}),
             " --learn_sigma True": ("iddpm-hybrid", {"rescale_learned_sigmas": True}),
             " --learn_sigma True --use_kl True": ("iddpm-kl", {}),
             " --predict_xstart True": ("iddpm-simple", {"predict_xstart": True})}
    for i, (extra, (name, params)) in enumerate(cases.items()):
        outdir = tmp_path / f"run{i}"
        result = edm("train", "--outdir", outdir, "--data", data, "--arch", "iddpm", "--model-flags",
                     TINY_FLAGS + extra, "--diffusion-steps", 10, "--noise-schedule", "cosine", "--batch", 4,
                     "--duration", 4e-6, "--tick", 0.004, "--workers", 0,
                     "--seed", 1, "--nosubdir", "--schedule-sampler", "loss-second-moment", "--ema-rampup", 0)
        assert result.exit_code == 0, result.output
        options = json.loads((outdir / "training_options.json").read_text())
        assert options["ema_rampup"] is None and options["dropout"] is None and options["augment"] is None
        loss = options["loss_params"]
        assert loss["name"] == name and loss["schedule_sampler"] == "loss-second-moment", loss
        assert params.items() <= loss.items(), loss
        net = load_model(outdir / "network-snapshot-000000.pt")
        assert net.diffusion.predict_xstart == ("predict_xstart" in extra)


@pytest.mark.parametrize("args,fragment", [
    (["--model-flags", TINY_FLAGS, "--loss", "iddpm-hybrid"], "--learn_sigma True"),
    (["--model-flags", HYBRID_FLAGS, "--loss", "iddpm-simple"], "untrained"),
    (["--model-flags", TINY_FLAGS, "--loss", "edm"], "--loss iddpm-simple|iddpm-hybrid|iddpm-kl"),
    (["--model-flags", TINY_FLAGS, "--precond", "edm"], "--model-flags"),
    (["--model-flags", TINY_FLAGS, "--augment", "0.1"], "--augment 0"),
    (["--model-flags", TINY_FLAGS + " --image_size 64"], "8x8"),
    (["--model-flags", TINY_FLAGS + " --warp_drive 1"], "unknown flag --warp_drive"),
    (["--model-flags", TINY_FLAGS + " --class_cond True"], "contradicts --cond 0"),
    (["--model-flags", TINY_FLAGS + " --diffusion_steps 20", "--diffusion-steps", "50"], "contradicts"),
    (["--model-flags", TINY_FLAGS + " --large_size 8"], "--small_size"),
    (["--model-flags", TINY_FLAGS, "--diffusion-steps", "10"], "T > 20"),
    (["--model-flags", TINY_FLAGS + " --batch_size 128"], "use --batch"),
])
def test_bad_combinations_are_one_line_errors(data, tmp_path, args, fragment):
    result = edm("train", "--outdir", tmp_path / "runs", "--data", data, "--arch", "iddpm", "--batch", 4,
                 "--duration", 4e-6, "--workers", 0, *args)
    fails_cleanly(result, fragment)
    assert not (tmp_path / "runs").exists()


def test_continuous_architectures_refuse_grid_options(data, tmp_path):
    for args, fragment in ((["--arch", "adm", "--loss", "iddpm-hybrid"], "--arch iddpm|guided"),
                           (["--schedule-sampler", "loss-second-moment"], "drop --schedule-sampler"),
                           (["--model-flags", "--learn_sigma True"], "--arch iddpm")):
        result = edm("train", "--outdir", tmp_path / "runs", "--data", data, "--batch", 4, "--duration", 4e-6,
                     "--workers", 0, "--cbase", 16, "--cres", "1", *args)
        fails_cleanly(result, fragment)
    with pytest.raises(ConfigError, match="--model-flags"):
        TrainingOptions(data="d", outdir="o", arch="guided", cbase=32)


@pytest.mark.slow
def test_torchrun_matches_one_process_with_loss_second_moment(data, tmp_path):
    """Two gloo processes (2 micro-batches of 2 each) and one process draw the same steps: the schedule sampler
    observes every process's losses of a step in image order, so its counts agree exactly and its history to
    float rounding of the losses."""
    import subprocess
    import sys

    from test_training import REPO, single_thread_env

    common = ["--data", data, "--arch", "iddpm", "--model-flags", HYBRID_FLAGS, "--diffusion-steps", 8,
              "--noise-schedule", "cosine", "--schedule-sampler", "loss-second-moment", "--batch", 8,
              "--duration", 0.00016, "--tick", 0.008, "--dump", 1, "--snap", 100, "--seed", 3, "--workers", 0,
              "--lr", "1e-3", "--lr-rampup", 0, "--nosubdir"]
    one = edm("train", "--outdir", tmp_path / "one", *common)
    assert one.exit_code == 0, one.output
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m",
                          "edm_toolkit", "train", "--outdir", str(tmp_path / "two"), *map(str, common), "--batch-gpu",
                          "2"], env=single_thread_env(), capture_output=True, text=True, cwd=REPO, timeout=600)
    assert two.returncode == 0, two.stderr[-3000:]
    a = load_state(tmp_path / "one" / "training-state-000000.pt")
    b = load_state(tmp_path / "two" / "training-state-000000.pt")
    assert torch.equal(a["loss"]["loss_counts"], b["loss"]["loss_counts"]) and a["nimg"] == b["nimg"] == 160
    torch.testing.assert_close(a["loss"]["loss_history"], b["loss"]["loss_history"], rtol=1e-4, atol=1e-5)
    # Adam turns rounding noise into steps of up to lr: compared as a whole (relative L2; measured 2e-8)
    weights = [k for k in a["net"]]
    squared = lambda t: float(t.double().square().sum())  # noqa: E731
    difference = sum(squared(a["net"][k] - b["net"][k]) for k in weights)
    assert difference <= 1e-5 * sum(squared(a["net"][k]) for k in weights), difference
