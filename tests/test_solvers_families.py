"""Every solver on a network of every adapter family: EDM pickle, guided-diffusion, score_sde."""

import pytest
import torch

from edm_toolkit.generate import sample_batch
from edm_toolkit.sampling import Sampler
from edm_toolkit.solvers import SOLVERS


@pytest.fixture(scope="module")
def family_net(load_fixture, tmp_path_factory):
    """One tiny network per adapter family, loaded through the public adapter API (cached)."""
    cache = {}

    def get(family):
        if family in cache:
            return cache[family]
        if family == "edm-pickle":
            from test_edm_pickle import snapshot, toolkit_network, write_pickle

            from edm_toolkit.loading import load_denoiser

            path = tmp_path_factory.mktemp("pickle") / "network-snapshot.pkl"
            write_pickle(path, snapshot(toolkit_network(load_fixture("edm_precond_vp"), "vp")))
            cache[family] = load_denoiser(path)
        elif family == "guided-diffusion":
            from edm_toolkit.adapters.openai import load_openai_checkpoint

            fx = load_fixture("gd_unet_legacy")
            flags = {k: v for k, v in fx.meta["create_model_args"].items() if not k.startswith("__")}
            cache[family] = load_openai_checkpoint(dict(fx.state_dict), model_flags={
                **flags, "noise_schedule": "cosine", "diffusion_steps": 1000})
        else:
            from edm_toolkit.adapters.score_sde import load_score_sde_denoiser

            fx = load_fixture("sde_ncsnpp_ve")
            cache[family] = load_score_sde_denoiser(fx.state_dict, config=fx.meta["config"])
        return cache[family]

    return get


FAMILIES = ["edm-pickle", "guided-diffusion", "score_sde"]


@pytest.mark.parametrize("family", FAMILIES)
def test_every_solver_runs_on_every_family(family, family_net, one_thread):
    net = family_net(family)
    seeds = [0, 1]
    for name in SOLVERS.names():
        if SOLVERS.get(name).runs_on_model_grid and net.step_grid is None:
            continue  # ddpm/ddim run on a model's own step grid; checked below where there is one
        options = {"name": name}
        if name == "restart":
            options["intervals"] = [[3, 1, 0.5, 2.0]]
        if name == "adaptive":
            options.update(rtol=1e-2, atol=1e-2)
        sampler = Sampler(solver=options, num_steps=4)
        images = sample_batch(net, sampler, seeds, "cpu", class_idx=1 if net.label_dim else None)
        assert images.shape == (2, 3, 16, 16) and bool(torch.isfinite(images).all()), (family, name)
    if family == "guided-diffusion":  # and the original samplers on the model's own grid
        for sampler in (Sampler(solver={"name": "ddim", "respacing": "ddim4"}), Sampler(solver="ddpm", num_steps=4)):
            images = sample_batch(net, sampler, seeds, "cpu", class_idx=1)
            assert bool(torch.isfinite(images).all()) and float(images.abs().max()) <= 1 + 1e-6
