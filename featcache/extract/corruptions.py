"""The fifteen ImageNet-C corruptions (Hendrycks & Dietterich 2019), for pseudo-OOD data (NAP appendix H).

The formulas and severity parameters are those of the `imagecorruptions` package (1.1.2), which
packages the ImageNet-C code for images of any size. That package is not used at run time: on
current numpy, scikit-image and setuptools three of its fifteen corruptions fail (`fog` uses
`np.float_`, `glass_blur` scikit-image's removed `multichannel`, and importing it needs the removed
`pkg_resources`), it refuses images under 32x32 and it needs OpenCV. This module reimplements the
same formulas on numpy, scipy and Pillow; tests/test_corruptions.py checks each one against the
package itself (with those three incompatibilities patched in the test) at fixed seeds.

Inputs and outputs are uint8 images, (H, W, 3) RGB or (H, W) / (H, W, 1) grey, as ImageNet-C: the
image is corrupted after resizing and cropping, before normalisation, and the float result is
truncated to uint8 as `imagecorruptions.corrupt` does. A grey image is corrupted as the RGB image
with three equal channels (which is what `imagecorruptions.corrupt` does with one) and its first
channel is kept: for these per-channel formulas that channel is an exact draw of the grey formula
(a channel mean would shrink the noise by sqrt(3)).

Randomness: each image gets its own `numpy.random.RandomState`, seeded from a hash of (seed, sample
id), and draws from it exactly the numbers, in the same order, that the reference draws from numpy's
global legacy generator. So results do not depend on batch order or DataLoader workers, and the
tests can compare with the reference by seeding the global generator with the same number.
`impulse_noise` draws its salt-and-pepper masks from that stream as scikit-image did when ImageNet-C
was made (`np.random.choice`, i.e. uniform draws below the probability); today's scikit-image uses
an unseeded generator of its own there.

Where the reference depends on OpenCV: `defocus_blur`'s disk kernel (cv2.GaussianBlur) and filter
(cv2.filter2D, reflect-101 borders) are scipy correlations with mirror borders; `frost`'s texture
resize (cv2.resize, INTER_CUBIC) is Keys' cubic with a = -0.75 in OpenCV's fixed point; `snow`'s
grey conversion (cv2.cvtColor) is 0.299 R + 0.587 G + 0.114 B in float32. These agree with OpenCV
to within one grey level after truncation to uint8.

Frost textures: frost1-5 of ImageNet-C (the reference draws one of the first five), shipped in
featcache/extract/frost/ (Apache License 2.0, see NOTICE there).
"""

from __future__ import annotations

import hashlib
import io
import math
from functools import lru_cache
from pathlib import Path

import numpy as np

from featcache.errors import FeatcacheError

# The order of ImageNet-C and of NAP appendix H: noise, blur, weather, digital.
CORRUPTIONS = (
    "gaussian_noise", "shot_noise", "impulse_noise",
    "defocus_blur", "glass_blur", "motion_blur", "zoom_blur",
    "snow", "frost", "fog",
    "brightness", "contrast", "elastic_transform", "pixelate", "jpeg_compression",
)
# ImageNet-C's four held-out validation corruptions: not provided (spatter needs OpenCV's Canny and
# distance transform, and none of them is part of NAP's pseudo-OOD set).
VALIDATION_CORRUPTIONS = ("speckle_noise", "gaussian_blur", "spatter", "saturate")

FROST_DIR = Path(__file__).with_name("frost")
FROST_FILES = ("frost1.png", "frost2.png", "frost3.png", "frost4.jpg", "frost5.jpg")


def check_corruption(name, severity, where: str) -> None:
    """Refuse, naming it, a corruption this module does not provide or a severity outside 1..5."""
    if name not in CORRUPTIONS:
        if name in VALIDATION_CORRUPTIONS:
            raise FeatcacheError(f"{where}: corruption {name!r} is one of ImageNet-C's validation corruptions, which "
                                 f"featcache does not provide; one of {', '.join(CORRUPTIONS)}")
        raise FeatcacheError(f"{where}: unknown corruption {name!r}; one of {', '.join(CORRUPTIONS)}")
    if isinstance(severity, bool) or severity not in (1, 2, 3, 4, 5):
        raise FeatcacheError(f"{where}: corruption severity must be an integer from 1 to 5, got {severity!r}")


def sample_rng(seed: int, sample_id: str) -> np.random.RandomState:
    """The generator of one image: seeded from sha256 of "<seed>/<sample id>" (first four bytes)."""
    digest = hashlib.sha256(f"{int(seed)}/{sample_id}".encode("utf-8")).digest()
    return np.random.RandomState(int.from_bytes(digest[:4], "little"))


def corrupt(image: np.ndarray, name: str, severity: int, rng: np.random.RandomState) -> np.ndarray:
    """`image` (uint8, RGB or grey) under corruption `name` at `severity` 1..5, as uint8 of the same shape."""
    check_corruption(name, severity, "corrupt")
    image = np.asarray(image)
    if image.dtype != np.uint8:
        raise FeatcacheError(f"corrupt: expected a uint8 image, got {image.dtype}")
    grey = image.ndim == 2 or image.shape[2] == 1
    rgb = np.repeat(image.reshape(image.shape[0], image.shape[1], 1), 3, axis=2) if grey else image
    if rgb.ndim != 3 or rgb.shape[2] != 3:
        raise FeatcacheError(f"corrupt: expected an (H, W), (H, W, 1) or (H, W, 3) image, got shape {image.shape}")
    # floats truncated towards zero, as imagecorruptions.corrupt's np.uint8(); astype copies, so the
    # result is writable even where Pillow gave a read-only array
    out = np.asarray(_FUNCTIONS[name](rgb, severity, rng)).astype(np.uint8)
    return out[..., :1].reshape(image.shape) if grey else out


# --- helpers (imagecorruptions' own, with the global generator replaced by `rng`) -----------------


def _gaussian(image, sigma, *, mode="nearest", truncate=4.0, channel_axis=None):
    """skimage.filters.gaussian on a float image: scipy's Gaussian filter, channels not mixed."""
    from scipy.ndimage import gaussian_filter

    if channel_axis is not None:
        sigma = [sigma] * (image.ndim - 1)
        sigma.insert(channel_axis % image.ndim, 0)
    return gaussian_filter(image, sigma, mode=mode, truncate=truncate)


def _gaussian_kernel(size: int, sigma: float) -> np.ndarray:
    """cv2.getGaussianKernel(size, sigma) as float32: exp(-x^2 / (2 sigma^2)) normalised, x centred."""
    x = np.arange(size) - (size - 1) * 0.5
    k = np.exp(-0.5 / (sigma * sigma) * x * x)
    return (k / k.sum()).astype(np.float32)


@lru_cache(maxsize=None)
def _disk(radius, alias_blur=0.1):
    """ImageNet-C's anti-aliased disk kernel for defocus blur (float32)."""
    from scipy.ndimage import correlate1d

    if radius <= 8:
        L, ksize = np.arange(-8, 8 + 1), 3
    else:
        L, ksize = np.arange(-radius, radius + 1), 5
    X, Y = np.meshgrid(L, L)
    aliased_disk = np.array((X ** 2 + Y ** 2) <= radius ** 2, dtype=np.float32)
    aliased_disk /= np.sum(aliased_disk)
    # supersample the disk to antialias: cv2.GaussianBlur, whose borders are reflect-101 ("mirror")
    k = _gaussian_kernel(ksize, alias_blur)
    out = correlate1d(aliased_disk, k, axis=1, mode="mirror")
    return correlate1d(out, k, axis=0, mode="mirror")


def _plasma_fractal(rng, mapsize=256, wibbledecay=3):
    """Diamond-square height map in [0, 1], side `mapsize` (a power of two)."""
    assert mapsize & (mapsize - 1) == 0
    maparray = np.empty((mapsize, mapsize), dtype=np.float64)
    maparray[0, 0] = 0
    stepsize = mapsize
    wibble = 100

    def wibbledmean(array):
        return array / 4 + wibble * rng.uniform(-wibble, wibble, array.shape)

    def fillsquares():
        cornerref = maparray[0:mapsize:stepsize, 0:mapsize:stepsize]
        squareaccum = cornerref + np.roll(cornerref, shift=-1, axis=0)
        squareaccum += np.roll(squareaccum, shift=-1, axis=1)
        maparray[stepsize // 2:mapsize:stepsize, stepsize // 2:mapsize:stepsize] = wibbledmean(squareaccum)

    def filldiamonds():
        size = maparray.shape[0]
        drgrid = maparray[stepsize // 2:size:stepsize, stepsize // 2:size:stepsize]
        ulgrid = maparray[0:size:stepsize, 0:size:stepsize]
        ltsum = drgrid + np.roll(drgrid, 1, axis=0) + (ulgrid + np.roll(ulgrid, -1, axis=1))
        maparray[0:size:stepsize, stepsize // 2:size:stepsize] = wibbledmean(ltsum)
        ttsum = drgrid + np.roll(drgrid, 1, axis=1) + (ulgrid + np.roll(ulgrid, -1, axis=0))
        maparray[stepsize // 2:size:stepsize, 0:size:stepsize] = wibbledmean(ttsum)

    while stepsize >= 2:
        fillsquares()
        filldiamonds()
        stepsize //= 2
        wibble /= wibbledecay

    maparray -= maparray.min()
    return maparray / maparray.max()


def _clipped_zoom(img, zoom_factor):
    """Zoom into the centre of an (H, W, C) image by `zoom_factor` (linear), at least H x W out."""
    from scipy.ndimage import zoom

    ch0 = int(np.ceil(img.shape[0] / float(zoom_factor)))
    top0 = (img.shape[0] - ch0) // 2
    ch1 = int(np.ceil(img.shape[1] / float(zoom_factor)))
    top1 = (img.shape[1] - ch1) // 2
    return zoom(img[top0:top0 + ch0, top1:top1 + ch1], (zoom_factor, zoom_factor, 1), order=1)


def _shift(image, dx, dy):
    """Shift by (dx, dy) pixels, repeating the edge row or column into the space left behind."""
    if dx < 0:
        shifted = np.roll(image, shift=image.shape[1] + dx, axis=1)
        shifted[:, dx:] = shifted[:, dx - 1:dx]
    elif dx > 0:
        shifted = np.roll(image, shift=dx, axis=1)
        shifted[:, :dx] = shifted[:, dx:dx + 1]
    else:
        shifted = image
    if dy < 0:
        shifted = np.roll(shifted, shift=image.shape[0] + dy, axis=0)
        shifted[dy:, :] = shifted[dy - 1:dy, :]
    elif dy > 0:
        shifted = np.roll(shifted, shift=dy, axis=0)
        shifted[:dy, :] = shifted[dy:dy + 1, :]
    return shifted


def _motion_blur(x, radius, sigma, angle):
    """Sum of copies shifted along `angle`, weighted by a one-sided Gaussian of width 2 radius + 1.

    The Wand/ImageMagick motion blur of the original ImageNet-C code, as imagecorruptions redid it.
    """
    width = radius * 2 + 1
    k = np.exp(-np.arange(width) ** 2 / (2 * sigma ** 2)) / (np.sqrt(2 * np.pi) * sigma)
    kernel = k / np.sum(k)
    point = (width * np.sin(np.deg2rad(angle)), width * np.cos(np.deg2rad(angle)))
    hypot = math.hypot(point[0], point[1])
    blurred = np.zeros_like(x, dtype=np.float32)
    for i in range(width):
        dy = -math.ceil(((i * point[0]) / hypot) - 0.5)
        dx = -math.ceil(((i * point[1]) / hypot) - 0.5)
        if np.abs(dy) >= x.shape[0] or np.abs(dx) >= x.shape[1]:
            break  # the simulated motion left the image
        blurred = blurred + kernel[i] * _shift(x, dx, dy)
    return blurred


def _rgb2hsv(arr):
    """skimage.color.rgb2hsv of a float RGB image."""
    out = np.empty_like(arr)
    out_v = arr.max(-1)
    delta = np.ptp(arr, axis=-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        out_s = delta / out_v
        out_s[delta == 0.0] = 0.0
        idx = arr[..., 0] == out_v  # red is max
        out[idx, 0] = (arr[idx, 1] - arr[idx, 2]) / delta[idx]
        idx = arr[..., 1] == out_v  # green is max
        out[idx, 0] = 2.0 + (arr[idx, 2] - arr[idx, 0]) / delta[idx]
        idx = arr[..., 2] == out_v  # blue is max
        out[idx, 0] = 4.0 + (arr[idx, 0] - arr[idx, 1]) / delta[idx]
        out_h = (out[..., 0] / 6.0) % 1.0
    out_h[delta == 0.0] = 0.0
    out[..., 0], out[..., 1], out[..., 2] = out_h, out_s, out_v
    out[np.isnan(out)] = 0
    return out


def _hsv2rgb(arr):
    """skimage.color.hsv2rgb of a float HSV image."""
    hi = np.floor(arr[..., 0] * 6)
    f = arr[..., 0] * 6 - hi
    p = arr[..., 2] * (1 - arr[..., 1])
    q = arr[..., 2] * (1 - f * arr[..., 1])
    t = arr[..., 2] * (1 - (1 - f) * arr[..., 1])
    v = arr[..., 2]
    hi = np.stack([hi, hi, hi], axis=-1).astype(np.uint8) % 6
    return np.choose(hi, np.stack([np.stack((v, t, p), axis=-1), np.stack((q, v, p), axis=-1),
                                   np.stack((p, v, t), axis=-1), np.stack((p, q, v), axis=-1),
                                   np.stack((t, p, v), axis=-1), np.stack((v, p, q), axis=-1)]))


def _cubic_resize(image: np.ndarray, width: int, height: int) -> np.ndarray:
    """cv2.resize(image, (width, height), interpolation=cv2.INTER_CUBIC) of a uint8 (H, W, C) image.

    Keys' cubic convolution with a = -0.75, source position (d + 0.5) * (in / out) - 0.5, edge pixels
    repeated; OpenCV's fixed point: coefficients rounded to multiples of 1/2048, rows summed as
    integers, the result rounded to the nearest integer and clipped to 0..255.
    """
    def taps(n_in, n_out):
        pos = ((np.arange(n_out) + 0.5) * (n_in / n_out) - 0.5).astype(np.float32)
        start = np.floor(pos).astype(np.int64)
        t = (pos - start).astype(np.float32)
        a = np.float32(-0.75)
        c0 = ((a * (t + 1) - 5 * a) * (t + 1) + 8 * a) * (t + 1) - 4 * a
        c1 = ((a + 2) * t - (a + 3)) * t * t + 1
        c2 = ((a + 2) * (1 - t) - (a + 3)) * (1 - t) * (1 - t) + 1
        c3 = 1 - c0 - c1 - c2
        coef = np.rint(np.stack([c0, c1, c2, c3], axis=1) * 2048).astype(np.int64)
        return np.clip(start[:, None] + np.arange(-1, 3), 0, n_in - 1), coef

    rows, row_coef = taps(image.shape[0], height)
    cols, col_coef = taps(image.shape[1], width)
    # integer sums held in float64, which is exact below 2^53 (these stay under 2^32)
    src = image.astype(np.float64)
    horizontal = sum(src[:, cols[:, k]] * col_coef[None, :, k, None] for k in range(4))  # (H_in, width, C)
    total = sum(horizontal[rows[:, k]] * row_coef[:, k, None, None] for k in range(4)).astype(np.int64)
    return np.clip((total + (1 << 21)) >> 22, 0, 255).astype(np.uint8)


@lru_cache(maxsize=None)
def _frost_texture(index: int) -> np.ndarray:
    from PIL import Image

    with Image.open(FROST_DIR / FROST_FILES[index]) as img:
        return np.asarray(img.convert("RGB"))


@lru_cache(maxsize=32)
def _frost_rescaled(index: int, height: int, width: int) -> np.ndarray:
    """Frost texture `index` scaled to cover an image of height x width, and 1.1 times more."""
    frost = _frost_texture(index)
    fh, fw = frost.shape[:2]
    scaling_factor = 1
    if fh >= height and fw >= width:
        scaling_factor = 1
    elif fh < height and fw >= width:
        scaling_factor = height / fh
    elif fh >= height and fw < width:
        scaling_factor = width / fw
    else:  # both too small: the larger factor
        scaling_factor = np.maximum(height / fh, width / fw)
    scaling_factor *= 1.1
    return _cubic_resize(frost, int(np.ceil(fw * scaling_factor)), int(np.ceil(fh * scaling_factor)))


# --- the fifteen corruptions: x is uint8 (H, W, 3); each returns floats in [0, 255] ----------------


def gaussian_noise(x, severity, rng):
    """x + N(0, c^2) per pixel and channel, x in [0, 1]; c = .08, .12, .18, .26, .38."""
    c = [.08, .12, 0.18, 0.26, 0.38][severity - 1]
    x = np.array(x) / 255.
    return np.clip(x + rng.normal(size=x.shape, scale=c), 0, 1) * 255


def shot_noise(x, severity, rng):
    """Poisson(c x) / c per pixel and channel, x in [0, 1]; c = 60, 25, 12, 5, 3."""
    c = [60, 25, 12, 5, 3][severity - 1]
    x = np.array(x) / 255.
    return np.clip(rng.poisson(x * c) / float(c), 0, 1) * 255


def impulse_noise(x, severity, rng):
    """Salt and pepper: each value flipped with probability c (= .03, .06, .09, .17, .27), to 1 or 0
    with probability 1/2 each (scikit-image's random_noise, mode 's&p')."""
    c = [.03, .06, .09, 0.17, 0.27][severity - 1]
    out = np.array(x) / 255.
    flipped = rng.random_sample(out.shape) < c
    salted = rng.random_sample(out.shape) < 0.5
    out[flipped & salted] = 1
    out[flipped & ~salted] = 0
    return np.clip(out, 0, 1) * 255


def defocus_blur(x, severity, rng):
    """Each channel correlated with an anti-aliased disk of radius r (= 3, 4, 6, 8, 10; alias blur
    0.1, 0.5, 0.5, 0.5, 0.5), mirrored borders."""
    from scipy.ndimage import correlate

    c = [(3, 0.1), (4, 0.5), (6, 0.5), (8, 0.5), (10, 0.5)][severity - 1]
    x = np.array(x) / 255.
    kernel = _disk(radius=c[0], alias_blur=c[1]).astype(np.float64)
    channels = np.stack([correlate(x[:, :, d], kernel, mode="mirror") for d in range(3)], axis=2)
    return np.clip(channels, 0, 1) * 255


def glass_blur(x, severity, rng):
    """Gaussian blur (sigma), then `iterations` passes of local pixel moves by up to `delta`, then the
    blur again; (sigma, delta, iterations) = (.7, 1, 2), (.9, 2, 1), (1, 2, 3), (1.1, 3, 2), (1.5, 4, 2).

    Each move is the reference's `x[h, w], x[h', w'] = x[h', w'], x[h, w]` on an (H, W, 3) array:
    the right side holds views, so pixel (h, w) takes the value of (h', w') and (h', w') keeps its
    own. That is what made ImageNet-C, so it is reproduced here, on pixel indices.
    """
    c = [(0.7, 1, 2), (0.9, 2, 1), (1, 2, 3), (1.1, 3, 2), (1.5, 4, 2)][severity - 1]
    x = np.uint8(_gaussian(np.array(x) / 255., c[0], channel_axis=-1) * 255)
    height, width = x.shape[:2]
    hs = range(height - c[1], c[1], -1)
    ws = range(width - c[1], c[1], -1)
    # one draw of the whole stream gives the same numbers as the reference's two per pixel
    moves = rng.randint(-c[1], c[1], size=(c[2] * len(hs) * len(ws), 2)).tolist()
    source = list(range(height * width))  # pixel p now holds the value of pixel source[p]
    n = 0
    for _ in range(c[2]):
        for h in hs:
            for w in ws:
                dx, dy = moves[n]
                n += 1
                source[h * width + w] = source[(h + dy) * width + (w + dx)]
    x = x.reshape(-1, 3)[np.asarray(source)].reshape(height, width, 3)
    return np.clip(_gaussian(x / 255., c[0], channel_axis=-1), 0, 1) * 255


def motion_blur(x, severity, rng):
    """Motion blur of (radius, sigma) = (10, 3), (15, 5), (15, 8), (15, 12), (20, 15) along an angle
    drawn uniformly from [-45, 45) degrees."""
    c = [(10, 3), (15, 5), (15, 8), (15, 12), (20, 15)][severity - 1]
    angle = rng.uniform(-45, 45)
    x = _motion_blur(np.array(x), radius=c[0], sigma=c[1], angle=angle)
    return np.clip(x, 0, 255)


def zoom_blur(x, severity, rng):
    """Mean of the image and its centre zooms by 1, 1 + s, ... up to 1.11, 1.16, 1.21, 1.26, 1.31
    (steps s = .01, .01, .02, .02, .03)."""
    c = [np.arange(1, 1.11, 0.01), np.arange(1, 1.16, 0.01), np.arange(1, 1.21, 0.02),
         np.arange(1, 1.26, 0.02), np.arange(1, 1.31, 0.03)][severity - 1]
    x = (np.array(x) / 255.).astype(np.float32)
    out = np.zeros_like(x)
    for zoom_factor in c:
        out += _clipped_zoom(x, zoom_factor)[:x.shape[0], :x.shape[1], :]
    x = (x + out) / (len(c) + 1)
    return np.clip(x, 0, 1) * 255


def snow(x, severity, rng):
    """A snow layer (Gaussian noise zoomed, thresholded, motion-blurred), added with its 180-degree
    rotation to the image brightened towards 1.5 grey + 0.5; parameters as ImageNet-C."""
    c = [(0.1, 0.3, 3, 0.5, 10, 4, 0.8), (0.2, 0.3, 2, 0.5, 12, 4, 0.7), (0.55, 0.3, 4, 0.9, 12, 8, 0.7),
         (0.55, 0.3, 4.5, 0.85, 12, 8, 0.65), (0.55, 0.3, 2.5, 0.85, 12, 12, 0.55)][severity - 1]
    x = np.array(x, dtype=np.float32) / 255.
    snow_layer = rng.normal(size=x.shape[:2], loc=c[0], scale=c[1])
    snow_layer = _clipped_zoom(snow_layer[..., np.newaxis], c[2])
    snow_layer[snow_layer < c[3]] = 0
    snow_layer = np.clip(snow_layer.squeeze(), 0, 1)
    snow_layer = _motion_blur(snow_layer, radius=c[4], sigma=c[5], angle=rng.uniform(-135, -45))
    # rounded to 8 bits and cropped to the image
    snow_layer = np.round(snow_layer * 255).astype(np.uint8) / 255.
    snow_layer = snow_layer[..., np.newaxis][:x.shape[0], :x.shape[1], :]
    grey = (x[..., 0] * np.float32(0.299) + x[..., 1] * np.float32(0.587) + x[..., 2] * np.float32(0.114))
    x = c[6] * x + (1 - c[6]) * np.maximum(x, grey.reshape(x.shape[0], x.shape[1], 1) * 1.5 + 0.5)
    return np.clip(x + snow_layer + np.rot90(snow_layer, k=2), 0, 1) * 255


def frost(x, severity, rng):
    """a x + b F, F a random crop of one of five frost textures scaled to cover the image;
    (a, b) = (1, .4), (.8, .6), (.7, .7), (.65, .7), (.6, .75)."""
    c = [(1, 0.4), (0.8, 0.6), (0.7, 0.7), (0.65, 0.7), (0.6, 0.75)][severity - 1]
    idx = rng.randint(5)
    height, width = x.shape[:2]
    texture = _frost_rescaled(idx, height, width)
    x_start, y_start = rng.randint(0, texture.shape[0] - height), rng.randint(0, texture.shape[1] - width)
    texture = texture[x_start:x_start + height, y_start:y_start + width]
    return np.clip(c[0] * np.array(x) + c[1] * texture, 0, 255)


def fog(x, severity, rng):
    """(x + a P) max(x) / (max(x) + a), P a plasma fractal of decay d; (a, d) = (1.5, 2), (2, 2),
    (2.5, 1.7), (2.5, 1.5), (3, 1.4)."""
    c = [(1.5, 2), (2., 2), (2.5, 1.7), (2.5, 1.5), (3., 1.4)][severity - 1]
    shape = np.array(x).shape
    map_size = 1 << (int(np.max(shape)) - 1).bit_length()  # the next power of two
    x = np.array(x) / 255.
    max_val = x.max()
    x += c[0] * _plasma_fractal(rng, mapsize=map_size, wibbledecay=c[1])[:shape[0], :shape[1]][..., np.newaxis]
    return np.clip(x * max_val / (max_val + c[0]), 0, 1) * 255


def brightness(x, severity, rng):
    """HSV value + c (= .1, .2, .3, .4, .5), clipped to [0, 1]."""
    c = [.1, .2, .3, .4, .5][severity - 1]
    x = _rgb2hsv(np.array(x) / 255.)
    x[:, :, 2] = np.clip(x[:, :, 2] + c, 0, 1)
    return np.clip(_hsv2rgb(x), 0, 1) * 255


def contrast(x, severity, rng):
    """(x - m) c + m, m the mean of each channel; c = .4, .3, .2, .1, .05."""
    c = [0.4, .3, .2, .1, .05][severity - 1]
    x = np.array(x) / 255.
    means = np.mean(x, axis=(0, 1), keepdims=True)
    return np.clip((x - means) * c + means, 0, 1) * 255


def elastic_transform(x, severity, rng):
    """Resampling (linear, reflected borders) at positions displaced by alpha (= 12.5, 16.25, 21.25,
    25, 30) times uniform noise in +-0.005 H, Gaussian-smoothed with sigma 0.01 of the image size."""
    image = np.array(x, dtype=np.float32) / 255.
    shape = image.shape
    sigma = np.array(shape[:2]) * 0.01
    alpha = [250 * 0.05, 250 * 0.065, 250 * 0.085, 250 * 0.1, 250 * 0.12][severity - 1]
    max_dx = shape[0] * 0.005
    max_dy = shape[0] * 0.005
    dx = (_gaussian(rng.uniform(-max_dx, max_dx, size=shape[:2]), sigma, mode="reflect", truncate=3)
          * alpha).astype(np.float32)
    dy = (_gaussian(rng.uniform(-max_dy, max_dy, size=shape[:2]), sigma, mode="reflect", truncate=3)
          * alpha).astype(np.float32)
    from scipy.ndimage import map_coordinates

    dx, dy = dx[..., np.newaxis], dy[..., np.newaxis]
    xs, ys, zs = np.meshgrid(np.arange(shape[1]), np.arange(shape[0]), np.arange(shape[2]))
    indices = np.reshape(ys + dy, (-1, 1)), np.reshape(xs + dx, (-1, 1)), np.reshape(zs, (-1, 1))
    return np.clip(map_coordinates(image, indices, order=1, mode="reflect").reshape(shape), 0, 1) * 255


def pixelate(x, severity, rng):
    """Box-downsampled by c (= .6, .5, .4, .3, .25), then upsampled back with nearest neighbours."""
    from PIL import Image

    c = [0.6, 0.5, 0.4, 0.3, 0.25][severity - 1]
    height, width = x.shape[:2]
    small = (max(1, int(width * c)), max(1, int(height * c)))  # max: images under 4 pixels
    return np.asarray(Image.fromarray(x).resize(small, Image.BOX).resize((width, height), Image.NEAREST))


def jpeg_compression(x, severity, rng):
    """Saved as JPEG (Pillow) at quality 25, 18, 15, 10, 7 and decoded again."""
    from PIL import Image

    c = [25, 18, 15, 10, 7][severity - 1]
    output = io.BytesIO()
    Image.fromarray(x).save(output, "JPEG", quality=c)
    with Image.open(output) as img:
        return np.asarray(img)


_FUNCTIONS = {name: globals()[name] for name in CORRUPTIONS}
