"""EMAs of training: EDM's half-life EMA, EDM2's power-function EMA and its post-hoc reconstruction."""

import math

import numpy as np
import pytest
import torch
from scipy.integrate import quad
from torch import nn

from edm_toolkit.errors import ConfigError
from edm_toolkit.training.ema import (HalfLifeEMA, PowerFunctionEMA, gamma_to_sigma_rel, posthoc_coefficients,
                                      power_ema_beta, power_profile_inner, sigma_rel_to_gamma)


class Scalars(nn.Module):
    """A 'network' whose parameters are a few numbers, to follow an EMA exactly."""

    def __init__(self, n=3):
        super().__init__()
        self.w = nn.Parameter(torch.zeros(n, dtype=torch.float64))
        self.register_buffer("constant", torch.ones(1))


@pytest.mark.parametrize("sigma_rel", [0.01, 0.05, 0.1, 0.2, 0.28])
def test_sigma_rel_and_gamma_are_inverse(sigma_rel):
    gamma = sigma_rel_to_gamma(sigma_rel)
    assert gamma > 0
    assert gamma_to_sigma_rel(gamma) == pytest.approx(sigma_rel, rel=1e-12)
    # The root solves EDM2's cubic.
    t = sigma_rel**-2
    assert gamma**3 + 7 * gamma**2 + (16 - t) * gamma + (12 - t) == pytest.approx(0, abs=1e-8 * t * gamma**3)


def test_published_widths():
    # EDM2 tracks sigma_rel 0.05 and 0.10: gamma ~ 16.97 and ~ 6.94.
    assert sigma_rel_to_gamma(0.05) == pytest.approx(16.97, abs=0.01)
    assert sigma_rel_to_gamma(0.10) == pytest.approx(6.94, abs=0.01)
    # sigma_rel of the density (g+1) t^g on [0, 1] is its standard deviation (relative to t = 1).
    for gamma in (0.5, 3.0, 12.0):
        mean = quad(lambda x: x * (gamma + 1) * x**gamma, 0, 1)[0]
        var = quad(lambda x: (x - mean) ** 2 * (gamma + 1) * x**gamma, 0, 1)[0]
        assert gamma_to_sigma_rel(gamma) == pytest.approx(math.sqrt(var), rel=1e-9)


@pytest.mark.parametrize("bad", [0.0, -0.1, 0.289, 0.5, float("nan")])
def test_sigma_rel_bounds(bad):
    with pytest.raises(ConfigError, match="sigma_rel"):
        sigma_rel_to_gamma(bad)


@pytest.mark.parametrize("t_a,g_a,t_b,g_b", [(100.0, 7.0, 100.0, 17.0), (50.0, 3.0, 80.0, 10.0), (90.0, 12.0, 20.0, 1.5)])
def test_inner_product_is_the_integral_of_the_densities(t_a, g_a, t_b, g_b):
    density = lambda t, g: (lambda tau: (g + 1) * tau**g / t ** (g + 1) if tau <= t else 0.0)
    pa, pb = density(t_a, g_a), density(t_b, g_b)
    exact = quad(lambda tau: pa(tau) * pb(tau), 0, min(t_a, t_b), epsabs=0, epsrel=1e-12)[0]
    assert float(power_profile_inner(t_a, g_a, t_b, g_b)) == pytest.approx(exact, rel=1e-9)


def test_power_ema_tracking_weights_past_steps_as_the_telescoping_product():
    # With beta_t = (1 - 1/t)^(g+1) per unit step, the average after T steps weights theta_t by
    # (t^(g+1) - (t-1)^(g+1)) / T^(g+1) (the product of the later betas telescopes).
    net = Scalars(1)
    ema = PowerFunctionEMA(net, [0.1])
    gamma = ema.gammas[0]
    rng = np.random.RandomState(0)
    thetas = rng.randn(40)
    for t, theta in enumerate(thetas, start=1):
        net.w.data.fill_(theta)
        ema.update(t * 8, 8)  # batch 8: the same betas as unit steps
    T = len(thetas)
    t = np.arange(1, T + 1, dtype=np.float64)
    weights = (t ** (gamma + 1) - (t - 1) ** (gamma + 1)) / T ** (gamma + 1)
    assert weights.sum() == pytest.approx(1.0, rel=1e-12)
    assert float(ema.modules[0].w) == pytest.approx(float(weights @ thetas), rel=1e-10, abs=1e-12)
    assert power_ema_beta(gamma, 8, 8) == 0.0  # the first update copies the network


def test_half_life_ema_is_edms():
    net = Scalars(2)
    ema = HalfLifeEMA(net, halflife_nimg=500, rampup_ratio=0.05)
    expected = torch.zeros(2, dtype=torch.float64)
    batch = 64
    for step in range(1, 200):
        net.w.data = torch.tensor([math.sin(step), step / 10], dtype=torch.float64)
        nimg_before = (step - 1) * batch
        halflife = min(500, 0.05 * nimg_before)
        beta = 0.5 ** (batch / max(halflife, 1e-8))
        expected = net.w.detach() + beta * (expected - net.w.detach())
        ema.update(step * batch, batch)
        assert torch.allclose(ema.module.w, expected, rtol=1e-12, atol=1e-14)
    assert ema.beta(10**9, batch) == pytest.approx(0.5 ** (batch / 500))  # ramp-up over
    assert ema.module.constant.item() == 1.0 and not ema.module.w.requires_grad
    no_rampup = HalfLifeEMA(net, 500, rampup_ratio=None)
    assert no_rampup.beta(batch, batch) == pytest.approx(0.5 ** (batch / 500))


def test_state_dicts_round_trip():
    net = Scalars()
    ema = PowerFunctionEMA(net, [0.05, 0.1])
    net.w.data.fill_(2.0)
    ema.update(10, 10)
    other = PowerFunctionEMA(Scalars(), [0.05, 0.1])
    other.load_state_dict(ema.state_dict())
    assert all(torch.equal(a.w, b.w) for a, b in zip(ema.modules, other.modules))
    with pytest.raises(ConfigError, match="power EMAs"):
        PowerFunctionEMA(Scalars(), [0.05]).load_state_dict(ema.state_dict())


def test_reconstructing_a_stored_profile_selects_it():
    times, widths = [100, 100, 200, 200], [0.05, 0.1, 0.05, 0.1]
    X = posthoc_coefficients(times, widths, 200, [0.1])
    assert np.allclose(X[:, 0], [0, 0, 0, 1], atol=1e-8)


def test_posthoc_reconstruction_matches_a_directly_tracked_profile():
    """A random-walk 'training' of 4000 steps; snapshots of sigma_rel 0.05 and 0.10 every 250 steps. The
    reconstruction of sigma_rel 0.075 at the end matches the average tracked directly with that width to 0.2% of
    the distance between the two stored averages (measured: 0.04%)."""
    rng = np.random.RandomState(1)
    net = Scalars(64)
    tracked = PowerFunctionEMA(net, [0.05, 0.1, 0.075])
    snapshots = []  # (nimg, sigma_rel, weights)
    walk = torch.zeros(64, dtype=torch.float64)
    batch = 1
    for step in range(1, 4001):
        walk += torch.from_numpy(rng.randn(64)) * 0.01 + 0.001
        net.w.data.copy_(walk)
        tracked.update(step * batch, batch)
        if step % 250 == 0:
            for sigma_rel, module in zip(tracked.sigma_rels[:2], tracked.modules[:2]):
                snapshots.append((step * batch, sigma_rel, module.w.detach().clone()))
    X = posthoc_coefficients([s[0] for s in snapshots], [s[1] for s in snapshots], 4000, [0.075])
    reconstructed = sum(float(x) * s[2] for x, s in zip(X[:, 0], snapshots))
    direct = tracked.modules[2].w.detach()
    spread = (tracked.modules[0].w - tracked.modules[1].w).norm()
    assert (reconstructed - direct).norm() < 0.002 * spread


def test_edm_phema_on_a_training_run_matches_the_directly_tracked_profile(tmp_path, one_thread):
    """edm train --phema 0.05,0.1,0.07 (40 steps, snapshots every 4), then edm phema rebuilds sigma_rel 0.07 from
    the 0.05 and 0.1 snapshots alone: within 0.5% of the distance between the two stored averages of the directly
    tracked 0.07 average (measured 0.15%)."""
    from click.testing import CliRunner

    from edm_toolkit.loading import load_model
    from edm_toolkit.cli import main
    from test_training import TINY_ARGS, make_dataset

    def edm(*args):
        result = CliRunner().invoke(main, list(map(str, args)), catch_exceptions=False)
        assert result.exit_code == 0, result.output
        return result

    data = make_dataset(tmp_path / "data")
    edm("train", "--outdir", tmp_path / "run", "--data", data, *TINY_ARGS, "--batch", 4, "--duration", "0.00016",
        "--tick", 0.004, "--snap", 4, "--dump", 1000, "--seed", 0, "--workers", 0, "--dropout", 0, "--lr-rampup", 0.02,
        "--phema", "0.05,0.1,0.07", "--nosubdir")
    result = edm("phema", "--indir", tmp_path / "run", "--instd", "0.05,0.1", "--outstd", "0.07", "--outdir",
                 tmp_path / "out")
    assert "phema-000000-0.07.pt" in result.output
    reconstructed = load_model(tmp_path / "out" / "phema-000000-0.07.pt").state_dict()
    tracked = {s: load_model(tmp_path / "run" / f"power-ema-{160:012d}-{s}.pt").state_dict() for s in (0.05, 0.1, 0.07)}
    squared = lambda a, b: sum(float((a[k].double() - b[k].double()).square().sum()) for k in a)
    assert squared(reconstructed, tracked[0.07]) ** 0.5 < 0.005 * squared(tracked[0.05], tracked[0.1]) ** 0.5
    # Reconstructing a stored width gives that snapshot back.
    edm("phema", "--indir", tmp_path / "run", "--outstd", "0.1", "--outdir", tmp_path / "same", "--outkimg", 0)
    same = load_model(tmp_path / "same" / "phema-000000-0.1.pt").state_dict()
    assert squared(same, tracked[0.1]) ** 0.5 < 1e-5 * sum(float(v.double().square().sum()) for v in same.values()) ** 0.5


def test_edm_phema_errors(tmp_path):
    from click.testing import CliRunner

    from edm_toolkit.cli import main

    def error(*args):
        result = CliRunner().invoke(main, list(map(str, args)))
        assert result.exit_code != 0 and result.stderr.startswith("Error: ") and result.stderr.count("\n") == 1
        return result.stderr

    assert "no power-EMA snapshots" in error("phema", "--indir", tmp_path, "--outdir", tmp_path / "o", "--outstd", "0.1")
    assert "not a directory" in error("phema", "--indir", tmp_path / "x", "--outdir", tmp_path / "o", "--outstd", "0.1")
    assert "'...'" in error("phema", "--indir", tmp_path, "--outdir", tmp_path / "o", "--outstd", "0.1,...")
    assert "sigma_rel" in error("phema", "--indir", tmp_path, "--outdir", tmp_path / "o", "--outstd", "0.3")
    assert not (tmp_path / "o").exists()


def test_sigma_rel_list_syntax():
    from edm_toolkit.cli.phema import parse_sigma_rels

    assert parse_sigma_rels("0.05,0.06,...,0.1") == pytest.approx([0.05, 0.06, 0.07, 0.08, 0.09, 0.1])
    assert parse_sigma_rels("0.1, 0.05") == [0.05, 0.1]
