"""Data sets read from files: image folder trees, list files, CIFAR-10/100 batches, SVHN .mat.

Each is a torch Dataset of (image tensor, readable flag) with `labels` and `ids` known up front, so
a DataLoader with workers can stream it and the runner can write rows in order. An image that
cannot be read is refused: extraction stops with an error naming its file (a cache never silently
lacks a sample, and row order stays that of the listing).

Preprocessing (`transform:` in the manifest):
- preset: imagenet  -> Resize(256), CenterCrop(224), ImageNet mean/std (torchvision's ResNet, VGG,
  DenseNet and MobileNet weights all expect this);
- preset: cifar     -> 32x32 as stored, CIFAR-10 mean/std;
- or explicit: resize (shorter side), crop (centre, square), normalize {mean, std}.
"""

from __future__ import annotations

import pickle
from pathlib import Path, PurePosixPath

import numpy as np

from featcache.config import LABELLED_ROLES
from featcache.errors import FeatcacheError

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"}
PRESETS = {
    "imagenet": {"resize": 256, "crop": 224, "normalize": {"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}},
    "cifar": {"normalize": {"mean": [0.4914, 0.4822, 0.4465], "std": [0.2470, 0.2435, 0.2616]}},
}


def resolve_transform(spec: dict, where: str) -> dict:
    """A manifest `transform:` entry with its preset expanded (explicit keys win over the preset's)."""
    spec = dict(spec or {})
    if "preset" in spec:
        preset = spec.pop("preset")
        if preset not in PRESETS:
            raise FeatcacheError(f"{where}: unknown transform preset {preset!r}; one of {', '.join(PRESETS)}")
        spec = {**PRESETS[preset], **spec}
    return spec


def resolve_source(source: dict) -> dict:
    """A file `source:` with the defaults load_files applies written out (CIFAR part, list root)."""
    source = dict(source)
    if source.get("format") in ("cifar10", "cifar100"):
        source.setdefault("part", "test")
    if source.get("format") == "list":
        source.setdefault("root", str(Path(source["path"]).parent))
    return source


class CifarUnpickler(pickle.Unpickler):
    """Unpickles a CIFAR python batch and nothing else: a pickle can name any callable, and loading
    it calls that callable, so only what the batches hold is admitted (dicts, lists, strings,
    numbers, and numpy arrays rebuilt by numpy's own reconstructors)."""

    ALLOWED = {
        ("numpy", "ndarray"), ("numpy", "dtype"),
        ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer"),
        ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),  # numpy integers as labels
        ("_codecs", "encode"),  # how Python 3 writes bytes at pickle protocol 2
    }

    def find_class(self, module, name):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"refused global {module}.{name}")
        if module.startswith("numpy.core."):  # numpy 2 moved numpy.core to numpy._core
            module = "numpy._core." + module.removeprefix("numpy.core.")
        return super().find_class(module, name)


def load_cifar_batch(batch_file: Path, where: str) -> dict:
    """One CIFAR python batch (a pickled dict with 'data' and 'labels' or 'fine_labels'), read with
    CifarUnpickler."""
    try:
        with open(batch_file, "rb") as fh:
            batch = CifarUnpickler(fh, encoding="latin1").load()
    except pickle.UnpicklingError as exc:
        raise FeatcacheError(f"{where}: {batch_file} is not a CIFAR python batch ({exc}); refused, because "
                             "unpickling it could run code") from None
    except Exception as exc:  # truncated or not a pickle at all
        raise FeatcacheError(f"{where}: {batch_file} is not a readable CIFAR python batch "
                             f"({type(exc).__name__}: {exc})") from None
    if not isinstance(batch, dict) or "data" not in batch or not ("labels" in batch or "fine_labels" in batch):
        raise FeatcacheError(f"{where}: {batch_file} is not a CIFAR python batch (expected a dict with 'data' "
                             "and 'labels' or 'fine_labels')")
    return batch


def build_transform(spec: dict, where: str):
    """A torchvision transform from a manifest `transform:` entry."""
    from torchvision import transforms as T

    geometry, tensor = transform_parts(spec, where)
    return T.Compose(geometry.transforms + tensor.transforms)


def transform_parts(spec: dict, where: str):
    """The entry's transform in two: resize and crop (PIL to PIL), then ToTensor and Normalize.

    ImageNet-C corrupts images between the two (see featcache.extract.corruptions).
    """
    from torchvision import transforms as T

    spec = resolve_transform(spec, where)
    geometry = []
    if spec.get("resize"):
        geometry.append(T.Resize(int(spec["resize"]), interpolation=T.InterpolationMode.BILINEAR, antialias=True))
    if spec.get("crop"):
        geometry.append(T.CenterCrop(int(spec["crop"])))
    tensor = [T.ToTensor()]
    if spec.get("normalize"):
        tensor.append(T.Normalize(spec["normalize"]["mean"], spec["normalize"]["std"]))
    return T.Compose(geometry), T.Compose(tensor)


class FileImages:
    """Images from files (or from an in-memory uint8 array), transformed on access."""

    def __init__(self, items, labels, ids, transform, where: str, arrays: np.ndarray | None = None,
                 channels: int | None = None):
        self.items, self.labels, self.ids = list(items), np.asarray(labels, np.int64), np.asarray(ids)
        self.transform, self.where, self.arrays, self.channels = transform, where, arrays, channels
        self.mode = "L" if channels == 1 else "RGB"

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        try:
            return self.transform(self.image(i)), True
        except Exception:
            # reported by the runner in the main process, with the file's name
            return None, False

    def image(self, i):
        """Sample i as a PIL image, grey for a 1-channel network and RGB otherwise, before any transform."""
        from PIL import Image

        if self.arrays is not None:
            return Image.fromarray(self.arrays[i]).convert(self.mode)
        with Image.open(self.items[i]) as img:
            if img.mode.startswith("I;16") or img.mode == "I":
                # 16- and 32-bit grey: PIL's convert clips to 255; scaled to 8 bits instead
                top = 65535.0 if img.mode.startswith("I;16") else float(max(np.asarray(img).max(), 1))
                img = Image.fromarray(np.round(np.asarray(img, np.float64) / top * 255).clip(0, 255).astype(np.uint8))
            return img.convert(self.mode)

    def subset(self, lo: int, hi: int) -> "FileImages":
        items = self.items[lo:hi] if self.arrays is None else self.items
        arrays = None if self.arrays is None else self.arrays[lo:hi]
        return FileImages(items, self.labels[lo:hi], self.ids[lo:hi], self.transform, self.where, arrays, self.channels)

    def describe(self, i: int) -> str:
        return str(self.items[i]) if self.arrays is None else f"{self.where} sample {self.ids[i]}"


def collate(items):
    """Stack a batch; unreadable samples (None) become zeros, flagged False for the runner to report."""
    import torch

    readable = torch.tensor([ok for _, ok in items])
    shape = next((img.shape for img, ok in items if ok), (1,))
    sizes = sorted({tuple(img.shape) for img, ok in items if ok})
    if len(sizes) > 1:
        raise FeatcacheError(f"images of different sizes in one batch ({' and '.join(map(str, sizes[:2]))}); give the "
                             "data set a transform with resize and crop")
    images = torch.stack([img if ok else torch.zeros(shape) for img, ok in items])
    return images, readable


def _images_under(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())


def load_files(source: dict, transform_spec: dict, role: str, where: str, channels: int | None = None) -> FileImages:
    """The data set a manifest `source: {path, format}` names, its images grey when `channels` is 1."""
    path = Path(source["path"])
    fmt = source["format"]
    if not path.exists():
        raise FeatcacheError(f"{where}: source path {path} does not exist")
    transform = build_transform(transform_spec, where)
    labelled = role in LABELLED_ROLES
    if fmt == "imagefolder":  # root/<class>/<image>: classes sorted, as torchvision's ImageFolder
        classes = source.get("classes") or sorted(p.name for p in path.iterdir() if p.is_dir())
        items, labels = [], []
        for index, name in enumerate(classes):
            for image in _images_under(path / name):
                items.append(image)
                labels.append(index if labelled else -1)
        ids = [str(p.relative_to(path)) for p in items]
    elif fmt == "folder":  # every image under root, unlabelled (OOD sets)
        items = _images_under(path)
        labels, ids = [-1] * len(items), [str(p.relative_to(path)) for p in items]
    elif fmt == "list":  # a text file of "relative/path label" lines; images under `root`
        root = Path(source.get("root", path.parent))
        items, labels, ids = [], [], []
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if not line.strip():
                continue
            parts = line.rsplit(maxsplit=1)
            try:
                rel, label = (parts[0], int(parts[1])) if len(parts) == 2 else (parts[0], -1)
            except ValueError:
                raise FeatcacheError(f"{path}:{number}: expected 'path label', got {line!r}") from None
            if PurePosixPath(rel).is_absolute() or ".." in PurePosixPath(rel).parts:
                # the path is also the sample's id: it must name a file under root, nowhere else
                raise FeatcacheError(f"{path}:{number}: image path {rel!r} must be relative to {root} and "
                                     "stay under it (not absolute, no '..')")
            items.append(root / rel)
            labels.append(label if labelled else -1)
            ids.append(rel)
    elif fmt in ("cifar10", "cifar100"):  # the python batches, e.g. cifar-10-batches-py/
        part = source.get("part", "test")
        names = ({"train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"]} if fmt == "cifar10"
                 else {"train": ["train"], "test": ["test"]})[part]
        arrays, labels = [], []
        for name in names:
            batch_file = path / name
            if not batch_file.exists():
                raise FeatcacheError(f"{where}: {batch_file} not found (expected the CIFAR python batches)")
            batch = load_cifar_batch(batch_file, where)
            arrays.append(np.asarray(batch["data"], np.uint8).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
            labels.extend(batch["labels"] if "labels" in batch else batch["fine_labels"])
        arrays = np.concatenate(arrays)
        ids = [f"{fmt}/{part}/{i}" for i in range(len(arrays))]
        return FileImages(ids, labels if labelled else [-1] * len(ids), ids, transform, where, arrays, channels)
    elif fmt == "svhn":  # train_32x32.mat / test_32x32.mat
        from scipy.io import loadmat

        mat = loadmat(path)
        arrays = np.ascontiguousarray(np.asarray(mat["X"], np.uint8).transpose(3, 0, 1, 2))
        labels = np.asarray(mat["y"]).ravel() % 10  # SVHN stores the digit 0 as 10
        ids = [f"svhn/{path.stem}/{i}" for i in range(len(arrays))]
        return FileImages(ids, labels if labelled else [-1] * len(ids), ids, transform, where, arrays, channels)
    else:
        raise FeatcacheError(f"{where}: unknown source format {fmt!r}; one of imagefolder, folder, list, "
                             "cifar10, cifar100, svhn")
    if not items:
        raise FeatcacheError(f"{where}: no images found under {path}")
    return FileImages(items, labels, ids, transform, where, channels=channels)
