"""Datasets named in data_manifest.yaml: built-in generators that download nothing, and transforms.

Every generator returns grey images as float32 in [0, 1], shape (N, H, W), with labels (-1 for
anything that is not in-distribution) and stable string ids. The entry's `transform` then resizes
and normalises them; corruptions for pseudo-OOD splits act on the resized [0, 1] images, before
normalisation, as in ImageNet-C.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np

from featcache.config import manifest_entry
from featcache.errors import FeatcacheError


@dataclass
class ImageSet:
    """A generated data set, held in memory already transformed."""

    images: np.ndarray  # float32 (N, C, H, W), already transformed
    labels: np.ndarray  # int64 (N,)
    ids: np.ndarray  # str (N,)

    def __len__(self):
        return len(self.labels)

    def subset(self, lo: int, hi: int) -> "ImageSet":
        return ImageSet(self.images[lo:hi], self.labels[lo:hi], self.ids[lo:hi])


# --- ID data: scikit-learn's bundled digits -------------------------------------------------------

DIGITS_PARTS = ("train", "id_train", "val", "test")


def digits_indices(part: str, seed: int = 0, id_train_size: int = 600) -> np.ndarray:
    """Deterministic stratified split of the 1,797 digits: 60% train, 15% val, 25% test.

    id_train is a stratified subset of train (the statistics methods fit on ID data).
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    target = load_digits().target
    index = np.arange(len(target))
    rest, test = train_test_split(index, test_size=0.25, stratify=target, random_state=seed)
    train, val = train_test_split(rest, test_size=0.2, stratify=target[rest], random_state=seed)
    if part == "id_train":
        train, _ = train_test_split(train, train_size=id_train_size, stratify=target[train], random_state=seed)
    return np.sort({"train": train, "id_train": train, "val": val, "test": test}[part])


def gen_digits(part: str = "train", seed: int = 0, id_train_size: int = 600, **_):
    from sklearn.datasets import load_digits

    if part not in DIGITS_PARTS:
        raise FeatcacheError(f"digits generator: part must be one of {', '.join(DIGITS_PARTS)}, got {part!r}")
    digits = load_digits()
    index = digits_indices(part, seed, id_train_size)
    images = digits.images[index].astype(np.float32) / 16.0
    ids = np.array([f"digits/{i}" for i in index])
    return images, digits.target[index].astype(np.int64), ids


# --- OOD generators -------------------------------------------------------------------------------

# Letters whose glyphs look like digits (O, I, l, S, Z, B, G, q, g, b) would be label noise, not OOD.
LETTERS = "ACDEFHJKLMNPRTUVWXYacdefhkmnprtuvwxy"


def gen_letters(n: int, seed: int = 0, canvas: int = 32, **_):
    """Near OOD: letters drawn with PIL's default font, randomly scaled, shifted and rotated."""
    from PIL import Image, ImageDraw, ImageFont

    rng = np.random.default_rng(seed)
    images, ids = [], []
    for i in range(n):
        char = LETTERS[rng.integers(len(LETTERS))]
        size = int(rng.integers(18, 28))
        try:
            font = ImageFont.load_default(size=size)
        except TypeError:  # Pillow < 10.1 has one bitmap size only
            font = ImageFont.load_default()
        img = Image.new("L", (canvas, canvas), 0)
        draw = ImageDraw.Draw(img)
        left, top, right, bottom = draw.textbbox((0, 0), char, font=font)
        x = (canvas - (right - left)) / 2 - left + rng.uniform(-2, 2)
        y = (canvas - (bottom - top)) / 2 - top + rng.uniform(-2, 2)
        draw.text((x, y), char, fill=255, font=font)
        img = img.rotate(float(rng.uniform(-15, 15)), resample=Image.BILINEAR)
        images.append(np.asarray(img, dtype=np.float32) / 255.0)
        ids.append(f"letters/{i:05d}_{char}")
    return np.stack(images), np.full(n, -1, np.int64), np.array(ids)


def gen_photos(n: int, seed: int = 0, canvas: int = 32, **_):
    """Far OOD: grey patches of scikit-learn's bundled sample photographs, at random scales."""
    from PIL import Image
    from sklearn.datasets import load_sample_images

    photos = [np.asarray(Image.fromarray(img).convert("L")) for img in load_sample_images().images]
    rng = np.random.default_rng(seed)
    images, ids = [], []
    for i in range(n):
        which = int(rng.integers(len(photos)))
        photo = photos[which]
        side = int(rng.integers(24, 129))
        top = int(rng.integers(photo.shape[0] - side + 1))
        left = int(rng.integers(photo.shape[1] - side + 1))
        patch = Image.fromarray(photo[top : top + side, left : left + side]).resize((canvas, canvas), Image.BILINEAR)
        images.append(np.asarray(patch, dtype=np.float32) / 255.0)
        ids.append(f"photos/{which}_{top}_{left}_{side}")
    return np.stack(images), np.full(n, -1, np.int64), np.array(ids)


def gen_noise(n: int, seed: int = 0, canvas: int = 16, kind: str = "uniform", **_):
    """Synthetic OOD: i.i.d. uniform pixels, or Gaussian noise smoothed into blobs."""
    rng = np.random.default_rng(seed)
    if kind == "uniform":
        images = rng.uniform(0, 1, size=(n, canvas, canvas))
    elif kind == "blobs":
        from scipy.ndimage import gaussian_filter

        raw = rng.normal(size=(n, canvas, canvas))
        images = np.stack([gaussian_filter(r, 1.5) for r in raw])
        images = (images - images.min(axis=(1, 2), keepdims=True)) / np.ptp(images, axis=(1, 2), keepdims=True)
    else:
        raise FeatcacheError(f"noise generator: kind must be 'uniform' or 'blobs', got {kind!r}")
    ids = np.array([f"noise/{kind}/{i:05d}" for i in range(n)])
    return images.astype(np.float32), np.full(n, -1, np.int64), ids


# --- Corruptions for pseudo-OOD (after Hendrycks & Dietterich 2019; NAP appendix H) ---------------


def _gaussian_noise(x, s, rng):
    return x + rng.normal(scale=[0.08, 0.12, 0.18, 0.26, 0.38][s - 1], size=x.shape)


def _shot_noise(x, s, rng):
    lam = [60, 25, 12, 5, 3][s - 1]
    return rng.poisson(np.clip(x, 0, 1) * lam) / lam


def _impulse_noise(x, s, rng):
    amount = [0.03, 0.06, 0.09, 0.17, 0.27][s - 1]
    out = x.copy()
    mask = rng.uniform(size=x.shape)
    out[mask < amount / 2] = 0.0
    out[mask > 1 - amount / 2] = 1.0
    return out


def _gaussian_blur(x, s, rng):
    from scipy.ndimage import gaussian_filter

    sigma = [0.5, 0.8, 1.1, 1.5, 2.0][s - 1]
    return np.stack([gaussian_filter(img, sigma) for img in x])


def _contrast(x, s, rng):
    c = [0.4, 0.3, 0.2, 0.1, 0.05][s - 1]
    mean = x.mean(axis=(1, 2), keepdims=True)
    return (x - mean) * c + mean


def _pixelate(x, s, rng):
    from PIL import Image

    factor = [0.6, 0.5, 0.4, 0.3, 0.25][s - 1]
    h, w = x.shape[1:]
    small = (max(1, int(w * factor)), max(1, int(h * factor)))
    out = []
    for img in x:
        pil = Image.fromarray(img.astype(np.float32), mode="F")
        out.append(np.asarray(pil.resize(small, Image.BOX).resize((w, h), Image.NEAREST)))
    return np.stack(out)


def _jpeg(x, s, rng):
    from PIL import Image

    quality = [25, 18, 15, 10, 7][s - 1]
    out = []
    for img in x:
        buf = io.BytesIO()
        Image.fromarray((np.clip(img, 0, 1) * 255).round().astype(np.uint8), mode="L").save(buf, "JPEG", quality=quality)
        out.append(np.asarray(Image.open(io.BytesIO(buf.getvalue())), dtype=np.float32) / 255.0)
    return np.stack(out)


CORRUPTIONS = {
    "gaussian_noise": _gaussian_noise,
    "shot_noise": _shot_noise,
    "impulse_noise": _impulse_noise,
    "gaussian_blur": _gaussian_blur,
    "contrast": _contrast,
    "pixelate": _pixelate,
    "jpeg": _jpeg,
}


def corrupt(images: np.ndarray, corruption: str, severity: int, seed: int = 0) -> np.ndarray:
    """Apply one corruption at severity 1..5 to grey images in [0, 1]; the result is clipped to [0, 1]."""
    if corruption not in CORRUPTIONS:
        raise FeatcacheError(f"unknown corruption {corruption!r}; one of {', '.join(CORRUPTIONS)}")
    if severity not in (1, 2, 3, 4, 5):
        raise FeatcacheError(f"corruption severity must be 1 to 5, got {severity!r}")
    rng = np.random.default_rng(seed)
    return np.clip(CORRUPTIONS[corruption](images.astype(np.float64), severity, rng), 0, 1).astype(np.float32)


GENERATORS = {"digits": gen_digits, "letters": gen_letters, "photos": gen_photos, "noise": gen_noise}


# --- Transforms -----------------------------------------------------------------------------------


def resize(images: np.ndarray, size: int) -> np.ndarray:
    """Bilinear resize of (N, H, W) images to (N, size, size), antialiased when shrinking."""
    import torch
    import torch.nn.functional as F

    if images.shape[1:] == (size, size):
        return images
    tensor = torch.from_numpy(np.ascontiguousarray(images))[:, None]
    out = F.interpolate(tensor, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    return out[:, 0].numpy().clip(0, 1)


def normalise(images: np.ndarray, transform: dict) -> np.ndarray:
    norm = transform.get("normalize") or {"mean": [0.0], "std": [1.0]}
    mean = np.asarray(norm["mean"], np.float32).reshape(1, -1, 1, 1)
    std = np.asarray(norm["std"], np.float32).reshape(1, -1, 1, 1)
    return ((images[:, None] if images.ndim == 3 else images) - mean) / std


def _raw_images(entry: dict, manifest: dict, manifest_path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(images in [0, 1] after the entry's resize, labels, ids), before normalisation."""
    source = dict(entry["source"])
    where = f"{manifest_path}: dataset {entry['name']!r}"
    generator = source.pop("generator")
    size = entry.get("transform", {}).get("resize")
    if generator == "corrupt":
        base = manifest_entry(manifest, source.get("of", ""), manifest_path)
        images, labels, ids = _raw_images(base, manifest, manifest_path)
        corruption, severity = source.get("corruption"), source.get("severity", 3)
        images = corrupt(images, corruption, severity, seed=source.get("seed", 0))
        ids = np.array([f"{i}#{corruption}@{severity}" for i in ids])
        labels = np.full(len(ids), -1, np.int64)
    elif generator in GENERATORS:
        try:
            if generator == "digits":
                images, labels, ids = GENERATORS[generator](**source)
            else:
                images, labels, ids = GENERATORS[generator](n=entry.get("size") or source.pop("n"), **source)
        except KeyError:
            raise FeatcacheError(f"{where}: generator {generator!r} needs a 'size'") from None
    else:
        known = ", ".join(list(GENERATORS) + ["corrupt"])
        raise FeatcacheError(f"{where}: unknown generator {generator!r}; one of {known}")
    if size:
        images = resize(images, int(size))
    return images, labels, ids


def resolved_entry(name: str, manifest: dict, manifest_path, _seen: tuple = ()) -> dict:
    """Manifest entry `name` as extraction applies it: {role, source, transform, size} with every
    default written out (generator arguments from the generator's signature, the identity
    normalisation, transform presets, CIFAR part and list root), and for a corruption the resolved
    entry it corrupts (`of_entry`). Two entries that can give different images resolve differently.
    """
    import inspect

    entry = manifest_entry(manifest, name, manifest_path)
    where = f"{manifest_path}: dataset {name!r}"
    source, transform = dict(entry["source"]), dict(entry.get("transform") or {})
    if "path" in source:
        from featcache.extract.files import resolve_source, resolve_transform

        return {"role": entry["role"], "source": resolve_source(source),
                "transform": resolve_transform(transform, where), "size": entry.get("size")}
    generator = source.get("generator")
    if generator == "corrupt":
        if name in _seen:
            raise FeatcacheError(f"{where}: corrupts itself (through {' -> '.join(_seen + (name,))})")
        source.setdefault("severity", 3)
        source.setdefault("seed", 0)
        source["of_entry"] = resolved_entry(source.get("of", ""), manifest, manifest_path, _seen + (name,))
    elif generator in GENERATORS:
        for param in inspect.signature(GENERATORS[generator]).parameters.values():
            if param.default is not inspect.Parameter.empty:
                source.setdefault(param.name, param.default)
    transform.setdefault("normalize", {"mean": [0.0], "std": [1.0]})  # what normalise() does without one
    return {"role": entry["role"], "source": source, "transform": transform,
            "size": entry.get("size", source.get("n"))}


def load_dataset(name: str, manifest: dict, manifest_path):
    """Manifest entry `name`, transformed, its declared size checked: an ImageSet (generated, in
    memory) or a FileImages (read from files on access, see featcache.extract.files)."""
    entry = manifest_entry(manifest, name, manifest_path)
    if "path" in entry["source"]:
        from featcache.extract.files import load_files

        where = f"{manifest_path}: dataset {name!r}"
        data = load_files(entry["source"], entry.get("transform", {}), entry["role"], where)
        if entry.get("size") is not None and entry["size"] != len(data):
            raise FeatcacheError(f"{where}: declares size {entry['size']} but {entry['source']['path']} holds {len(data)}")
        return data
    images, labels, ids = _raw_images(entry, manifest, manifest_path)
    if entry.get("size") is not None and entry["size"] != len(ids):
        raise FeatcacheError(
            f"{manifest_path}: dataset {name!r} declares size {entry['size']} but its source gives {len(ids)}"
        )
    if entry["role"] not in ("train", "id_train", "id_val", "id_test"):
        labels = np.full(len(ids), -1, np.int64)
    return ImageSet(normalise(images, entry.get("transform", {})).astype(np.float32), labels, ids)
