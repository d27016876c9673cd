"""Non-leaking augmentation (edm_toolkit.training.augment) against NVlabs/edm's AugmentPipe (fixture E18)."""

from __future__ import annotations

import dataclasses
import math
import re
from pathlib import Path

import pytest
import torch

from edm_toolkit.errors import ConfigError
from edm_toolkit.training.augment import (
    AugmentDraws,
    AugmentPipe,
    AugmentTransforms,
    SYM6,
    reflect_padding,
    resample_affine,
)

RUNS = ["p1", "p0.5"]
DOCS = Path(__file__).resolve().parents[1] / "docs" / "augmentation.md"


def _images_close(actual, expected):
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)


def _run(load_fixture, run):
    fx = load_fixture("edm_augment")
    config = fx.inputs["runs"][run]
    return fx, AugmentPipe.edm_train(config["p"]), config, fx.outputs[run]


def _recorded_transforms(pipe, out) -> AugmentTransforms:
    return pipe.select(AugmentDraws(batch=out["images"].shape[0], **out["draws"]))


@pytest.mark.parametrize("run", RUNS)
def test_geometry_driven_by_recorded_pixel_matrix(load_fixture, one_thread, run):
    """The resampler alone, given EDM's own output->input matrices and flipped input, reproduces its images."""
    _, _, _, out = _run(load_fixture, run)
    assert reflect_padding(out["pixel_matrix"], 16, 16) == tuple(out["pad_lrtb"].tolist())
    _images_close(resample_affine(out["flipped_input"], out["pixel_matrix"]), out["images"])


@pytest.mark.parametrize("run", RUNS)
def test_recorded_draws_rebuild_labels_matrices_and_images(load_fixture, one_thread, run):
    fx, pipe, _, out = _run(load_fixture, run)
    transforms = _recorded_transforms(pipe, out)
    assert torch.equal(transforms.labels(), out["labels"])  # bit-exact, -0.0 included
    assert torch.equal(transforms.labels().signbit(), out["labels"].signbit())
    effective = out["effective"]
    for name in ("xflip", "yflip", "scale_w", "rotate_theta", "aniso_w", "aniso_r"):
        assert torch.equal(getattr(transforms, name), effective[name]), name
    assert torch.equal(torch.stack([transforms.translate_wx, transforms.translate_wy]), effective["translate_w"])

    matrix = pipe.pixel_matrix(transforms, 16, 16)
    torch.testing.assert_close(matrix, out["pixel_matrix"], rtol=0, atol=1e-12)
    # The matrix points into the flipped input: composing the flips gives the fixture's map into the original.
    flip_x = torch.tensor([[-1.0, 0, 15], [0, 1, 0], [0, 0, 1]], dtype=torch.float64)
    flip_y = torch.tensor([[1.0, 0, 0], [0, -1, 15], [0, 0, 1]], dtype=torch.float64)
    eye = torch.eye(3, dtype=torch.float64)
    flips = torch.stack([(flip_x if x else eye) @ (flip_y if y else eye)
                         for x, y in zip(transforms.xflip.tolist(), transforms.yflip.tolist())])
    torch.testing.assert_close(flips @ matrix, out["full_pixel_matrix"], rtol=0, atol=1e-12)

    _images_close(pipe.apply(fx.inputs["images"], transforms), out["images"])
    # Flips alone are exact pixel blits, and images without a geometric transform skip the resampler.
    zero = torch.zeros(6)
    flips_only = dataclasses.replace(transforms, scale_w=zero, rotate_theta=zero, aniso_w=zero,
                                     translate_wx=zero, translate_wy=zero)
    assert torch.equal(pipe.apply(fx.inputs["images"], flips_only), out["flipped_input"])


@pytest.mark.parametrize("run", RUNS)
def test_call_reproduces_edm_end_to_end(load_fixture, one_thread, run):
    """Same seed, same draws in the same order: EDM's images and labels from the global RNG or a generator."""
    fx, pipe, config, out = _run(load_fixture, run)
    torch.manual_seed(config["call_seed"])
    images, labels = pipe(fx.inputs["images"])
    _images_close(images, out["images"])
    assert torch.equal(labels, out["labels"])
    images, labels = pipe(fx.inputs["images"], generator=torch.Generator().manual_seed(config["call_seed"]))
    _images_close(images, out["images"])
    assert torch.equal(labels, out["labels"])
    if run == "p0.5":  # images 0 and 4 have no geometric transform: returned exactly (after the flips)
        identity = ~_recorded_transforms(pipe, out).geometric()
        assert identity.tolist() == [True, False, False, False, True, False]
        assert torch.equal(images[identity], out["flipped_input"][identity])


def test_labels_alone_do_not_determine_the_stretch(load_fixture):
    """(w_a, r) and (-w_a, r + pi) give the same labels but inverse stretches (fixture p1, images 2 and 3)."""
    _, pipe, _, out = _run(load_fixture, "p1")
    transforms = _recorded_transforms(pipe, out)
    other = dataclasses.replace(transforms, aniso_w=-transforms.aniso_w, aniso_r=transforms.aniso_r + math.pi)
    torch.testing.assert_close(other.labels(), transforms.labels(), rtol=0, atol=1e-6)
    rotated = transforms.aniso_r != 0
    assert rotated.tolist() == [False, False, True, True, False, False]
    true, alternative = pipe.pixel_matrix(transforms, 16, 16), pipe.pixel_matrix(other, 16, 16)
    torch.testing.assert_close(alternative[rotated], out["pixel_matrix_from_labels_canonical"][rotated],
                               rtol=0, atol=1e-5)
    assert float((alternative[rotated] - true[rotated]).abs().amax()) > 0.1


def _blob(size=32, x=0.0, y=0.0, width=1.0):
    """A Gaussian blob centred (x, y) pixels from the image centre, on a zero background, [1, 1, size, size]."""
    grid = torch.arange(size, dtype=torch.float32) - (size - 1) / 2
    return torch.exp(-((grid[None, :] - x) ** 2 + (grid[:, None] - y) ** 2) / (2 * width**2))[None, None]


def _centroid(image):
    grid = torch.arange(image.shape[-1], dtype=torch.float64) - (image.shape[-1] - 1) / 2
    weight = image[0, 0].double()
    return float((weight * grid[None, :]).sum() / weight.sum()), float((weight * grid[:, None]).sum() / weight.sum())


def _transform(batch=1, **values):
    """The same transform for every image of a batch."""
    base = dict(xflip=0, yflip=0, scale_w=0.0, rotate_theta=0.0, aniso_w=0.0, aniso_r=0.0,
                translate_wx=0.0, translate_wy=0.0)
    base.update(values)
    return AugmentTransforms(**{k: torch.tensor([v] * batch) for k, v in base.items()})


def _content_map(scale_w=0.0, rotate_theta=0.0, aniso_w=0.0, aniso_r=0.0, translate_wx=0.0, translate_wy=0.0,
                 size=32):
    """Where the transform moves content at offset v from the centre: M v + t, from the label layout of FACTS.md
    section 8 / fixture E18 (y points down), in this order: magnified by 2^(0.2 w_s), turned counter-clockwise on
    screen by theta, stretched by a = 2^(0.2 w_a) along d = (cos r, -sin r) and by 1/a across it, shifted by
    w W 0.125 px."""
    def matrix(rows):
        return torch.tensor(rows, dtype=torch.float64)

    c, s = math.cos(rotate_theta), math.sin(rotate_theta)
    d = matrix([[math.cos(aniso_r)], [-math.sin(aniso_r)]])
    a = 2 ** (0.2 * aniso_w)
    stretch = a * d @ d.T + (torch.eye(2, dtype=torch.float64) - d @ d.T) / a
    M = 2 ** (0.2 * scale_w) * stretch @ matrix([[c, s], [-s, c]])  # EDM's order: scale, rotate, stretch
    return M, matrix([translate_wx * size * 0.125, translate_wy * size * 0.125])


# sym6 is not linear-phase: the upsampling moves content by delta = (centre of mass - 5)/2 input pixels along x
# and y, the decimation by -delta output pixels. The two cancel only where the transform leaves (1, 1) alone.
SYM6_DELTA = (sum(k * h for k, h in enumerate(SYM6)) / sum(SYM6) - 5) / 2
SEMANTICS = {  # transform, blob offset from the centre before
    "translate": (dict(translate_wx=1.0, translate_wy=-0.5), (1.0, 2.0)),
    "scale": (dict(scale_w=5.0), (3.0, -2.0)),
    "rotate": (dict(rotate_theta=math.pi / 2), (4.0, 0.0)),
    "rotate_small": (dict(rotate_theta=-0.3), (3.0, 2.0)),
    "aniso_along": (dict(aniso_w=2.5, aniso_r=math.pi / 2), (0.0, -3.0)),
    "aniso_across": (dict(aniso_w=2.5, aniso_r=math.pi / 2), (4.0, 0.0)),
    "aniso_oblique": (dict(aniso_w=-3.0, aniso_r=0.7), (2.0, 3.0)),
    "combined": (dict(scale_w=-1.0, rotate_theta=2.0, aniso_w=1.0, aniso_r=-1.0, translate_wx=0.2), (2.0, -1.0)),
}


@pytest.mark.parametrize("case", sorted(SEMANTICS))
def test_transform_semantics_move_content_as_labelled(one_thread, case):
    """The centroid of a small blob lands where the labels say (plus sym6's known sub-pixel offset)."""
    values, before = SEMANTICS[case]
    moved = AugmentPipe().apply(_blob(x=before[0], y=before[1]), _transform(**values))
    M, t = _content_map(**values)
    delta = torch.full([2], SYM6_DELTA, dtype=torch.float64)
    expected = M @ (torch.tensor(before, dtype=torch.float64) + delta) + t - delta
    # Measured within 0.014 (shrinking resamples a blob of width 1 px at its limit); sym6's offset is 0.1 here.
    assert _centroid(moved) == pytest.approx(expected.tolist(), abs=0.02)


def test_integer_translation_shifts_pixels(one_thread):
    """A 2-pixel shift samples at integer positions: the interior equals the shifted image (orthogonal sym6)."""
    images = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
    shifted = AugmentPipe().apply(images, _transform(batch=2, translate_wx=1.0))
    torch.testing.assert_close(shifted[..., 2:], images[..., :-2], rtol=0, atol=1e-5)


def test_nothing_applied_returns_the_input_exactly(one_thread):
    """p = 0, xflip = 0: every gate fails, labels are zero, and the images come back bit-exactly (the
    resampler is skipped for images without a geometric transform). The draws still happen, as in EDM."""
    images = torch.rand(8, 3, 16, 16) * 2 - 1
    pipe = dataclasses.replace(AugmentPipe.edm_train(0.0), xflip=0)
    generator = torch.Generator().manual_seed(1)
    out, labels = pipe(images, generator)
    assert torch.equal(out, images)
    assert labels.shape == (8, 9) and not bool(labels.any())
    # The random stream does not depend on p: p = 0 and p = 1 consume the same draws.
    other = torch.Generator().manual_seed(1)
    dataclasses.replace(pipe, p=1.0)(images, other)
    assert torch.equal(generator.get_state(), other.get_state())


@pytest.mark.parametrize("p", [1e-6, 0.12, 1.0])
def test_xflip_1e8_mirrors_half_the_images_at_any_p(one_thread, p):
    images = torch.rand(2000, 1, 2, 2)
    out, labels = AugmentPipe(p=p, xflip=1e8)(images, torch.Generator().manual_seed(2))
    flipped = labels[:, 0] == 1
    assert abs(float(flipped.double().mean()) - 0.5) < 0.04  # binomial std 0.011
    assert torch.equal(out[flipped], images[flipped].flip(3)) and torch.equal(out[~flipped], images[~flipped])
    assert not bool(labels[:, 1:].any())  # disabled transforms keep their columns at zero


def test_gates_fire_with_probability_p():
    """Each transform with probability multiplier * p; the stretch axis rotates with probability 1/2 of those."""
    pipe = AugmentPipe.edm_train(0.3)
    transforms = pipe.select(pipe.draw(40_000, torch.Generator().manual_seed(3)))
    fractions = {name: float((getattr(transforms, name) != 0).double().mean())
                 for name in ("yflip", "scale_w", "rotate_theta", "aniso_w", "translate_wx")}
    expected = {"yflip": 0.15, "scale_w": 0.3, "rotate_theta": 0.3, "aniso_w": 0.3, "translate_wx": 0.3}
    assert fractions == pytest.approx(expected, abs=0.015)
    assert float((transforms.labels()[:, 6] != 0).double().mean()) == pytest.approx(0.15, abs=0.015)
    assert float((transforms.aniso_r != 0).double().mean()) == pytest.approx(0.5, abs=0.015)  # independent of p


def test_disabled_transforms_draw_nothing():
    """As EDM: a transform with multiplier 0 draws no numbers; scale alone draws randn(N) then rand(N)."""
    generator = torch.Generator().manual_seed(4)
    draws = AugmentPipe(p=1, scale=1).draw(5, generator)
    reference = torch.Generator().manual_seed(4)
    assert torch.equal(draws.scale_w, torch.randn(5, generator=reference))
    assert torch.equal(draws.scale_gate_u, torch.rand(5, generator=reference))
    assert torch.equal(generator.get_state(), reference.get_state()) and draws.xflip_w is None


def test_deterministic_per_generator_and_global_rng_untouched(one_thread):
    images = torch.rand(6, 3, 8, 8) * 2 - 1
    pipe = AugmentPipe.edm_train(0.5)
    state = torch.get_rng_state()
    a = pipe(images, torch.Generator().manual_seed(5))
    b = pipe(images, torch.Generator().manual_seed(5))
    c = pipe(images, torch.Generator().manual_seed(6))
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[1], c[1])


@pytest.mark.parametrize("kwargs", [dict(p=1.5), dict(scale=-1), dict(aniso_std=math.nan), dict(xflip=True),
                                    dict(aniso_rotate_prob=2)])
def test_bad_configuration_is_rejected(kwargs):
    with pytest.raises(ConfigError):
        AugmentPipe(**kwargs)


def test_bad_images_are_rejected():
    with pytest.raises(ConfigError, match="float images"):
        AugmentPipe.edm_train()(torch.zeros(2, 3, 8, 8, dtype=torch.uint8))


def test_documented_example_runs(one_thread):
    code = re.findall(r"```python\n(.*?)```", DOCS.read_text(), flags=re.S)
    assert code, f"no python example in {DOCS}"
    for block in code:
        exec(compile(block, str(DOCS), "exec"), {})
