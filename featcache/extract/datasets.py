"""Datasets named in data_manifest.yaml: built-in generators that download nothing, and transforms.

Every generator returns grey images as float32 in [0, 1], shape (N, H, W), with labels (-1 for
anything that is not in-distribution) and stable string ids. The entry's `transform` then resizes
and normalises them.

`generator: corrupt` (pseudo-OOD, NAP appendix H) takes any other entry, generated or read from
files, and applies one ImageNet-C corruption (featcache.extract.corruptions) to each of its images
after the resize and crop and before normalisation, as ImageNet-C does; see `CorruptedImages`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from featcache.config import LABELLED_ROLES, manifest_entry
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
    if generator in GENERATORS:
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


CHANNELS = (1, 3)


def image_channels(entry: dict, channels: int | None, where: str) -> int | None:
    """The channel count entry's images are given in: its `transform.channels`, else `channels`
    (what the backbone's first layer takes), checked against its normalisation."""
    transform = entry.get("transform") or {}
    value = transform.get("channels", channels)
    if value is not None and (isinstance(value, bool) or value not in CHANNELS):
        raise FeatcacheError(f"{where}: transform.channels must be 1 (grey) or 3 (RGB), got {value!r}")
    if "preset" in transform:
        from featcache.extract.files import resolve_transform

        transform = resolve_transform(transform, where)
    norm = transform.get("normalize")
    if value is not None and isinstance(norm, dict):
        for key in ("mean", "std"):
            length = len(norm.get(key) or [0])
            if length not in (1, value):
                what = "1 value" if value == 1 else f"1 or {value} values"
                raise FeatcacheError(f"{where}: transform.normalize.{key} has {length} values for {value}-channel "
                                     f"images; give {what} (or set transform.channels)")
    return value


def to_channels(image: np.ndarray, channels: int | None) -> np.ndarray:
    """An 8-bit (H, W) or (H, W, 3) image as grey (ITU-R 601-2 luma, as PIL's "L") or RGB."""
    if channels == 3 and image.ndim == 2:
        return np.repeat(image[..., None], 3, axis=2)
    if channels == 1 and image.ndim == 3:
        from PIL import Image

        return np.asarray(Image.fromarray(image).convert("L"))
    return image


def resolved_entry(name: str, manifest: dict, manifest_path, _seen: tuple = (), channels: int | None = None) -> dict:
    """Manifest entry `name` as extraction applies it: {role, source, transform, size} with every
    default written out (generator arguments from the generator's signature, the identity
    normalisation, transform presets, CIFAR part and list root, and the image channels when
    `channels`, the backbone's, is given), and for a corruption the resolved entry it corrupts
    (`of_entry`). Two entries that can give different images resolve differently.
    """
    import inspect

    entry = manifest_entry(manifest, name, manifest_path)
    where = f"{manifest_path}: dataset {name!r}"
    source, transform = dict(entry["source"]), dict(entry.get("transform") or {})
    chosen = image_channels(entry, channels, where)
    if chosen is not None:
        transform["channels"] = chosen
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
        source["of_entry"] = resolved_entry(source.get("of", ""), manifest, manifest_path, _seen + (name,),
                                            channels=chosen)
    elif generator in GENERATORS:
        for param in inspect.signature(GENERATORS[generator]).parameters.values():
            if param.default is not inspect.Parameter.empty:
                source.setdefault(param.name, param.default)
    transform.setdefault("normalize", {"mean": [0.0], "std": [1.0]})  # what normalise() does without one
    return {"role": entry["role"], "source": source, "transform": transform,
            "size": entry.get("size", source.get("n"))}


def load_dataset(name: str, manifest: dict, manifest_path, channels: int | None = None):
    """Manifest entry `name`, transformed, its declared size checked: an ImageSet (generated, in
    memory), a FileImages (read from files on access, see featcache.extract.files) or, for a
    corrupt source, a CorruptedImages (its base corrupted on access).

    Images come with `transform.channels` channels when the entry says, else `channels` (the
    backbone's); by default generated images are grey and files RGB.
    """
    entry = manifest_entry(manifest, name, manifest_path)
    channels = image_channels(entry, channels, f"{manifest_path}: dataset {name!r}")
    if entry["source"].get("generator") == "corrupt":
        data = load_corrupted(entry, manifest, manifest_path, channels)
        if entry.get("size") is not None and entry["size"] != len(data):
            raise FeatcacheError(f"{manifest_path}: dataset {name!r} declares size {entry['size']} but its source gives "
                                 f"{len(data)}")
        return data
    if "path" in entry["source"]:
        from featcache.extract.files import load_files

        where = f"{manifest_path}: dataset {name!r}"
        data = load_files(entry["source"], entry.get("transform", {}), entry["role"], where, channels=channels)
        if entry.get("size") is not None and entry["size"] != len(data):
            raise FeatcacheError(f"{where}: declares size {entry['size']} but {entry['source']['path']} holds {len(data)}")
        return data
    images, labels, ids = _raw_images(entry, manifest, manifest_path)
    if entry.get("size") is not None and entry["size"] != len(ids):
        raise FeatcacheError(
            f"{manifest_path}: dataset {name!r} declares size {entry['size']} but its source gives {len(ids)}"
        )
    if entry["role"] not in LABELLED_ROLES:
        labels = np.full(len(ids), -1, np.int64)
    if channels == 3:
        images = np.repeat(images[:, None], 3, axis=1)  # grey images shown to an RGB network
    return ImageSet(normalise(images, entry.get("transform", {})).astype(np.float32), labels, ids)


# --- Pseudo-OOD: any data set under an ImageNet-C corruption ---------------------------------------

CORRUPT_KEYS = ("generator", "of", "corruption", "severity", "seed", "subset")


class CorruptedImages:
    """Rows `rows` of a base data set, each corrupted on access; a torch Dataset like FileImages.

    The base is either a FileImages, whose images are read, resized and cropped (`geometry`) on
    access, or a uint8 array of generated images already resized. Each image is corrupted with its
    own generator, seeded from (seed, base sample id), then made a tensor and normalised (`tensor`).
    Nothing but the base is held: the corrupted images exist only inside a batch.
    """

    def __init__(self, base, base_ids, labels, rows, corruption: str, severity: int, seed: int, geometry, tensor,
                 where: str, channels: int | None = None):
        self.base, self.base_ids, self.rows = base, np.asarray(base_ids), np.asarray(rows, np.int64)
        self.corruption, self.severity, self.seed = corruption, int(severity), int(seed)
        self.geometry, self.tensor, self.where, self.channels = geometry, tensor, where, channels
        self.base_labels = np.asarray(labels, np.int64)
        self.labels = self.base_labels[self.rows]
        self.ids = np.array([f"{self.base_ids[r]}#{corruption}@{severity}" for r in self.rows])

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, k):
        from featcache.extract.corruptions import corrupt, sample_rng

        i = int(self.rows[k])
        try:
            if isinstance(self.base, np.ndarray):
                image = self.base[i]
            else:
                image = np.asarray(self.geometry(self.base.image(i)))
        except Exception:
            return None, False  # reported by the runner in the main process, with the file's name
        # corrupted as the network will see it: grey, or RGB (a grey base repeated)
        image = corrupt(to_channels(image, self.channels), self.corruption, self.severity, sample_rng(self.seed, str(self.base_ids[i])))
        return self.tensor(image), True

    def subset(self, lo: int, hi: int) -> "CorruptedImages":
        return CorruptedImages(self.base, self.base_ids, self.base_labels, self.rows[lo:hi], self.corruption,
                               self.severity, self.seed, self.geometry, self.tensor, self.where, self.channels)

    def describe(self, k: int) -> str:
        i = int(self.rows[k])
        return self.where if isinstance(self.base, np.ndarray) else self.base.describe(i)


def subset_rows(n: int, size, seed: int, corruption: str, where: str) -> np.ndarray:
    """All of 0..n-1, or `size` of them drawn without replacement (sorted), from a generator seeded
    by sha256 of "<seed>/subset/<corruption>": each corruption sees other images of the base."""
    import hashlib

    if size is None or size >= n:
        return np.arange(n)
    if isinstance(size, bool) or not isinstance(size, int) or size <= 0:
        raise FeatcacheError(f"{where}: source.subset must be a positive integer, got {size!r}")
    digest = hashlib.sha256(f"{int(seed)}/subset/{corruption}".encode()).digest()
    rng = np.random.default_rng(int.from_bytes(digest[:8], "little"))
    return np.sort(rng.choice(n, size=size, replace=False))


def load_corrupted(entry: dict, manifest: dict, manifest_path, channels: int | None = None) -> CorruptedImages:
    """`source: {generator: corrupt, of: <dataset>, corruption, severity (1-5, default 3), seed
    (default 0), subset (optional: that many images of the base)}`. The entry's transform (by
    default the base's) resizes and crops, then the corruption, then ToTensor and Normalize."""
    from featcache.extract.corruptions import check_corruption
    from featcache.extract.files import load_files, transform_parts

    source = entry["source"]
    where = f"{manifest_path}: dataset {entry['name']!r}"
    unknown = sorted(set(source) - set(CORRUPT_KEYS))
    if unknown:
        raise FeatcacheError(f"{where}: unknown field source.{unknown[0]} of a corrupt source; fields: "
                             f"{', '.join(CORRUPT_KEYS)}")
    of = source.get("of")
    if not isinstance(of, str) or not of:
        raise FeatcacheError(f"{where}: a corrupt source needs 'of', the manifest dataset whose images it corrupts")
    base = manifest_entry(manifest, of, manifest_path)
    if base["source"].get("generator") == "corrupt":
        raise FeatcacheError(f"{where}: source.of names {of!r}, itself a corrupt source; name the clean data set")
    corruption, severity = source.get("corruption"), source.get("severity", 3)
    check_corruption(corruption, severity, where)
    seed = source.get("seed", 0)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise FeatcacheError(f"{where}: source.seed must be an integer, got {seed!r}")
    transform = entry.get("transform") or base.get("transform") or {}
    geometry, tensor = transform_parts(transform, where)
    if "path" in base["source"]:
        files = load_files(base["source"], transform, base["role"], f"{manifest_path}: dataset {of!r}",
                           channels=channels)
        base_data, ids, labels = files, files.ids, files.labels
    else:
        images, labels, ids = _raw_images({**base, "transform": transform}, manifest, manifest_path)
        # the generators give floats in [0, 1]; ImageNet-C corrupts 8-bit images
        base_data = np.round(np.clip(images, 0, 1) * 255).astype(np.uint8)
    if entry["role"] not in LABELLED_ROLES:
        labels = np.full(len(ids), -1, np.int64)
    rows = subset_rows(len(ids), source.get("subset"), seed, corruption, where)
    return CorruptedImages(base_data, ids, labels, rows, corruption, severity, seed, geometry, tensor, where, channels)
