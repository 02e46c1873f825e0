"""The fifteen ImageNet-C corruptions against the reference implementation (the `imagecorruptions`
package, which packages the ImageNet-C code) at fixed seeds, and the simpler ones against the
published formula written out independently here."""

import colorsys
import os
import sys
import types

import numpy as np
import pytest

from featcache.errors import FeatcacheError
from featcache.extract.corruptions import CORRUPTIONS, corrupt, sample_rng

APPENDIX_H = ("gaussian_noise", "shot_noise", "impulse_noise", "defocus_blur", "glass_blur", "motion_blur",
              "zoom_blur", "snow", "frost", "fog", "brightness", "contrast", "elastic_transform", "pixelate",
              "jpeg_compression")


def test_all_fifteen_of_nap_appendix_h_are_provided():
    assert set(CORRUPTIONS) == set(APPENDIX_H) and len(CORRUPTIONS) == 15


def image(shape, seed=0):
    """A textured test image: noise over a horizontal ramp, so blurs, shifts and zooms all show."""
    rng = np.random.default_rng(seed)
    ramp = np.linspace(0, 180, shape[1])[None, :, None] if len(shape) == 3 else np.linspace(0, 180, shape[1])[None, :]
    return np.clip(rng.integers(0, 256, shape) * 0.3 + ramp, 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def reference():
    """imagecorruptions 1.1.2's functions, with its three incompatibilities with today's libraries
    patched: pkg_resources (gone from setuptools), np.float_ (gone from numpy 2) and scikit-image's
    `multichannel` argument (now channel_axis)."""
    pytest.importorskip("cv2")
    pytest.importorskip("skimage")
    if "pkg_resources" not in sys.modules:
        try:
            import pkg_resources  # noqa: F401
        except ImportError:
            stub = types.ModuleType("pkg_resources")
            stub.resource_filename = lambda name, path: os.path.join(os.path.dirname(sys.modules[name].__file__), path)
            sys.modules["pkg_resources"] = stub
    module = pytest.importorskip("imagecorruptions.corruptions")
    from skimage.filters import gaussian

    def gaussian_multichannel(img, sigma=1, multichannel=None, **kwargs):
        return gaussian(img, sigma=sigma, channel_axis=-1 if multichannel else None, **kwargs)

    patched = {"gaussian": gaussian_multichannel}
    saved = {k: getattr(module, k) for k in patched}
    had_float_ = hasattr(np, "float_")
    if not had_float_:
        np.float_ = np.float64
    for k, v in patched.items():
        setattr(module, k, v)
    yield module
    for k, v in saved.items():
        setattr(module, k, v)
    if not had_float_:
        del np.float_


def run_reference(reference, name, img, severity, seed):
    """The reference on an (H, W, 3) uint8 image, its global generator seeded, truncated to uint8 as
    imagecorruptions.corrupt does (called directly, since corrupt() refuses images under 32x32)."""
    from PIL import Image

    np.random.seed(seed)
    return np.uint8(getattr(reference, name)(Image.fromarray(img), severity))


# frost: the texture is resized by OpenCV's bicubic, which this implementation follows in fixed
# point to within one grey level; snow: OpenCV's float32 grey conversion, summed in another order.
WITHIN_ONE = {"frost", "snow"}


@pytest.mark.parametrize("name", [c for c in APPENDIX_H if c != "impulse_noise"])
@pytest.mark.parametrize("shape", [(32, 32, 3), (40, 56, 3)])
def test_equals_the_reference_at_a_fixed_seed(reference, name, shape):
    img = image(shape)
    for severity in (1, 2, 3, 4, 5):
        for seed in (3, 11):
            ref = run_reference(reference, name, img, severity, seed)
            mine = corrupt(img, name, severity, np.random.RandomState(seed))
            assert mine.shape == ref.shape and mine.dtype == np.uint8
            diff = np.abs(mine.astype(int) - ref.astype(int))
            if name in WITHIN_ONE:
                assert diff.max() <= 1 and diff.mean() < 0.05, (name, severity, seed)
            else:
                assert diff.max() == 0, (name, severity, seed, int(diff.max()), float((diff > 0).mean()))


@pytest.mark.parametrize("name", [c for c in APPENDIX_H if c != "impulse_noise"])
def test_grey_16x16_is_the_first_channel_of_the_reference_on_three_equal_channels(reference, name):
    grey = image((16, 16), seed=1)
    rgb = np.repeat(grey[..., None], 3, axis=2)
    for severity in (1, 3, 5):
        ref = run_reference(reference, name, rgb, severity, 5)[..., 0]
        for shape in ((16, 16), (16, 16, 1)):
            mine = corrupt(grey.reshape(shape), name, severity, np.random.RandomState(5))
            assert mine.shape == shape
            assert np.abs(mine.reshape(16, 16).astype(int) - ref.astype(int)).max() <= (1 if name in WITHIN_ONE else 0)


def test_impulse_noise_flips_as_often_as_the_reference(reference):
    """Today's scikit-image draws the reference's salt and pepper from an unseeded generator, so the
    comparison is by frequency: the share of values set to 0 and to 255, over many pixels."""
    img = np.full((128, 128, 3), 128, np.uint8)
    for severity, amount in zip((1, 3, 5), (.03, .09, .27)):
        ref = run_reference(reference, "impulse_noise", img, severity, 0)
        mine = corrupt(img, "impulse_noise", severity, np.random.RandomState(0))
        for value in (0, 255):
            share_ref, share_mine = (ref == value).mean(), (mine == value).mean()
            assert abs(share_ref - amount / 2) < 0.01 and abs(share_mine - amount / 2) < 0.01
        assert set(np.unique(mine)) == {0, 128, 255}


# --- the simpler formulas, written out independently --------------------------------------------


def test_gaussian_shot_and_impulse_noise_follow_the_formula():
    img = image((24, 20, 3))
    x = img / 255.0
    for severity in range(1, 6):
        sigma = [.08, .12, .18, .26, .38][severity - 1]
        noise = np.random.RandomState(9).normal(0.0, sigma, size=x.shape)
        expected = np.floor(np.clip(x + noise, 0, 1) * 255)
        np.testing.assert_array_equal(corrupt(img, "gaussian_noise", severity, np.random.RandomState(9)), expected)

        lam = [60, 25, 12, 5, 3][severity - 1]
        counts = np.random.RandomState(9).poisson(x * lam)
        expected = np.floor(np.clip(counts / lam, 0, 1) * 255)
        np.testing.assert_array_equal(corrupt(img, "shot_noise", severity, np.random.RandomState(9)), expected)

        amount = [.03, .06, .09, .17, .27][severity - 1]
        draws = np.random.RandomState(9)
        flip, salt = draws.random_sample(x.shape) < amount, draws.random_sample(x.shape) < 0.5
        expected = np.where(flip, np.where(salt, 255, 0), img)
        np.testing.assert_array_equal(corrupt(img, "impulse_noise", severity, np.random.RandomState(9)), expected)


def test_contrast_and_brightness_follow_the_formula():
    img = image((12, 10, 3))
    x = img / 255.0
    for severity in range(1, 6):
        c = [.4, .3, .2, .1, .05][severity - 1]
        mean = x.reshape(-1, 3).mean(axis=0)
        expected = np.floor(np.clip((x - mean) * c + mean, 0, 1) * 255)
        got = corrupt(img, "contrast", severity, np.random.RandomState(0)).astype(int)
        assert np.abs(got - expected).max() <= 1 and (got == expected).mean() > 0.99

        b = [.1, .2, .3, .4, .5][severity - 1]
        expected = np.empty_like(x)
        for i, j in np.ndindex(x.shape[:2]):  # colorsys: HSV value + b, clipped to 1
            h, s, v = colorsys.rgb_to_hsv(*x[i, j])
            expected[i, j] = colorsys.hsv_to_rgb(h, s, min(v + b, 1.0))
        expected = np.floor(np.clip(expected, 0, 1) * 255)
        got = corrupt(img, "brightness", severity, np.random.RandomState(0)).astype(int)
        assert np.abs(got - expected).max() <= 1 and (got == expected).mean() > 0.99


def test_pixelate_by_a_whole_factor_is_block_means_repeated():
    img = image((32, 32, 3))
    got = corrupt(img, "pixelate", 2, np.random.RandomState(0)).astype(int)  # factor 0.5: 2x2 blocks
    blocks = img.reshape(16, 2, 16, 2, 3).mean(axis=(1, 3))
    expected = np.repeat(np.repeat(np.round(blocks), 2, axis=0), 2, axis=1)
    assert np.abs(got - expected).max() <= 1


def test_jpeg_compression_loses_more_at_higher_severity():
    img = image((32, 32, 3))
    errors = [np.abs(corrupt(img, "jpeg_compression", s, np.random.RandomState(0)).astype(int) - img).mean()
              for s in range(1, 6)]
    assert errors == sorted(errors) and errors[0] > 0


# --- any size, determinism, refusals ------------------------------------------------------------


@pytest.mark.parametrize("shape", [(16, 16), (16, 16, 1), (32, 32, 3), (7, 9, 3)])
def test_every_corruption_works_at_small_sizes_and_is_deterministic(shape):
    img = image(shape)
    for name in CORRUPTIONS:
        a = corrupt(img, name, 3, sample_rng(0, "digits/12"))
        b = corrupt(img, name, 3, sample_rng(0, "digits/12"))
        assert a.shape == img.shape and a.dtype == np.uint8
        np.testing.assert_array_equal(a, b)
        assert not np.array_equal(a, img), name


def test_sample_rng_depends_on_seed_and_id_only():
    draw = lambda seed, sid: sample_rng(seed, sid).random_sample(4)  # noqa: E731
    np.testing.assert_array_equal(draw(0, "a/1.png"), draw(0, "a/1.png"))
    assert not np.array_equal(draw(0, "a/1.png"), draw(1, "a/1.png"))
    assert not np.array_equal(draw(0, "a/1.png"), draw(0, "a/2.png"))


def test_unknown_corruptions_and_severities_are_refused_by_name():
    img = image((16, 16, 3))
    with pytest.raises(FeatcacheError, match="'spatter' is one of ImageNet-C's validation corruptions"):
        corrupt(img, "spatter", 3, np.random.RandomState(0))
    with pytest.raises(FeatcacheError, match="unknown corruption 'jpeg'; one of gaussian_noise"):
        corrupt(img, "jpeg", 3, np.random.RandomState(0))
    for severity in (0, 6, 2.5, True):
        with pytest.raises(FeatcacheError, match="severity must be an integer from 1 to 5"):
            corrupt(img, "fog", severity, np.random.RandomState(0))
