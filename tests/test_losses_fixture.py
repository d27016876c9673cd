"""EDMLoss / VPLoss / VELoss against NVlabs/edm's training/loss.py (fixture E17 `edm_losses`): per-element loss,
loss sum and every parameter gradient for the recorded sigma and noise, and EDM's draw order."""

from __future__ import annotations

import pytest
import torch

from edm_toolkit.losses import LOSSES
from edm_toolkit.networks.song_unet import SongUNet
from edm_toolkit.precond import build_precond

RUNS = ["edm", "vp", "ve", "edm_augment_labels"]
# The precond_kwargs of the fixture that belong to the backbone (the rest are the preconditioner's own).
SONG_UNET_KEYS = {
    "label_dim", "augment_dim", "model_channels", "channel_mult", "channel_mult_emb", "num_blocks",
    "attn_resolutions", "dropout", "label_dropout", "embedding_type", "channel_mult_noise", "encoder_type",
    "decoder_type", "resample_filter",
}
PRECOND_KEYS = {"sigma_min", "sigma_max", "sigma_data", "beta_d", "beta_min", "M", "epsilon_t"}


def _case(load_fixture, run):
    """The run's toolkit preconditioner (with EDM's weights, train mode), loss object, inputs and outputs."""
    fx = load_fixture("edm_losses")
    meta = fx.meta["runs"][run]
    spec = fx.meta["constructor_kwargs"][meta["precond"]]
    kwargs = spec["precond_kwargs"]
    model = SongUNet(img_resolution=kwargs["img_resolution"], in_channels=kwargs["img_channels"],
                     out_channels=kwargs["img_channels"], **{k: kwargs[k] for k in SONG_UNET_KEYS})
    net = build_precond({"name": meta["precond"], **{k: kwargs[k] for k in PRECOND_KEYS if k in kwargs}}, model)
    net.load_state_dict(fx.state_dict, strict=True)
    net.train()
    loss_fn = LOSSES.create({"name": meta["precond"], **spec["loss_kwargs"]})
    assert type(loss_fn).__name__ == meta["loss"]
    augment_labels = fx.inputs["augment_labels"] if meta["augment_labels_given"] else None
    return net, loss_fn, fx.inputs, fx.inputs["runs"][run], fx.outputs[run], augment_labels


@pytest.mark.parametrize("run", RUNS)
def test_loss_and_gradients_match_edm(load_fixture, one_thread, run):
    net, loss_fn, inputs, recorded, expected, augment_labels = _case(load_fixture, run)
    seen = {}
    net.model.register_forward_hook(lambda module, args, output: seen.update(x=args[0], c_noise=args[1], F=output))
    net.register_forward_hook(lambda module, args, output: seen.update(D_yn=output.detach()))
    net.zero_grad(set_to_none=True)
    loss = loss_fn.loss(net, inputs["images"], recorded["sigma"], recorded["n"], inputs["labels"], augment_labels)
    loss.sum().backward()

    sigma = recorded["sigma"]
    torch.testing.assert_close(loss_fn.weight(sigma), expected["weight"], rtol=1e-6, atol=0)
    torch.testing.assert_close(seen["x"], expected["model_input"], rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(seen["c_noise"], expected["model_noise_labels"], rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(seen["F"].detach(), expected["model_output"], rtol=1e-5, atol=2e-5)
    # D = c_skip x + c_out F carries the network's float32 rounding times c_out (sigma up to 77 in run vp).
    c_out = net.c_out(sigma).abs().clamp(min=1)
    torch.testing.assert_close(seen["D_yn"] / c_out, expected["D_yn"] / c_out, rtol=1e-5, atol=2e-5)
    torch.testing.assert_close(loss.detach(), expected["loss"], rtol=1e-5, atol=2e-5)
    torch.testing.assert_close(loss.detach().sum(), expected["loss_sum"], rtol=1e-6, atol=0)

    grads = dict(net.named_parameters())
    assert grads.keys() == expected["grads"].keys()
    atol = 1e-5 * max(float(g.abs().max()) for g in expected["grads"].values())
    for name, parameter in grads.items():
        # EDM leaves map_augment without a gradient when no augment labels are given (stored as zeros).
        actual = torch.zeros_like(parameter) if parameter.grad is None else parameter.grad
        torch.testing.assert_close(actual, expected["grads"][name], rtol=1e-4, atol=atol, msg=name)
    assert (net.model.map_augment.weight.grad is None) == (augment_labels is None)


@pytest.mark.parametrize("run", RUNS)
@pytest.mark.parametrize("rng", ["global", "generator"])
def test_call_draws_sigma_then_noise_as_edm(load_fixture, one_thread, run, rng):
    """__call__ after torch.manual_seed(call_seed) (or with a generator so seeded) hands the network EDM's exact
    sigma and y + n, and returns EDM's loss. In edm_augment_labels a stand-in pipe draws nothing."""
    net, loss_fn, inputs, recorded, expected, augment_labels = _case(load_fixture, run)
    seen = []
    net.register_forward_pre_hook(lambda module, args, kwargs: seen.append((args, kwargs)), with_kwargs=True)

    def pipe(images, generator=None):
        return images, augment_labels

    generator = None
    if rng == "global":
        torch.manual_seed(recorded["call_seed"])
    else:
        generator = torch.Generator().manual_seed(recorded["call_seed"])
    with torch.no_grad():
        loss = loss_fn(net, inputs["images"], inputs["labels"], pipe if augment_labels is not None else None,
                       generator=generator)
    (x, sigma, labels), kwargs = seen[0]
    assert torch.equal(sigma, recorded["sigma"])
    assert torch.equal(x, inputs["images"] + recorded["n"])
    assert (kwargs.get("augment_labels") is augment_labels) and labels is inputs["labels"]
    torch.testing.assert_close(loss, expected["loss"], rtol=1e-5, atol=2e-5)
