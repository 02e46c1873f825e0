"""Backbones: the embedded digits ResNet, torchvision models by name, checkpoints, and training.

Nothing here downloads weights: a backbone gets weights from a local checkpoint, from training in
the repo (the digits ResNet), or stays random (tests).
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import torch
from torch import nn

from featcache.errors import FeatcacheError


class BasicBlock(nn.Module):
    """A ResNet basic block: two 3x3 convolutions and a shortcut, ReLU after the sum."""

    def __init__(self, inp: int, out: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(inp, out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(out)
        self.conv2 = nn.Conv2d(out, out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out)
        self.relu = nn.ReLU()
        self.shortcut = nn.Identity()
        if stride != 1 or inp != out:
            self.shortcut = nn.Sequential(nn.Conv2d(inp, out, 1, stride, bias=False), nn.BatchNorm2d(out))

    def forward(self, x):
        y = self.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        return self.relu(y + self.shortcut(x))


class DigitsResNet(nn.Module):
    """A small ResNet for 16x16 grey digits: stem, three stages, global average pool, linear head.

    The pre-pool map is `layer3`'s output (post-ReLU, 4x4 for 16x16 inputs), the feature is its
    average, and `fc` is the head: the same structure as torchvision's ResNets.
    """

    def __init__(self, num_classes: int = 10, width: int = 16, in_channels: int = 1):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(in_channels, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU())
        self.layer1 = BasicBlock(width, width)
        self.layer2 = BasicBlock(width, 2 * width, stride=2)
        self.layer3 = BasicBlock(2 * width, 4 * width, stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(4 * width, num_classes)

    def forward(self, x):
        x = self.layer3(self.layer2(self.layer1(self.stem(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


BUILTIN = {"digits_resnet": DigitsResNet}


def build_backbone(spec: dict) -> nn.Module:
    """An untrained model from a pipeline's `backbone:` entry (builtin or torchvision name, or a factory)."""
    kwargs = spec.get("kwargs") or {}
    if not isinstance(kwargs, dict):
        raise FeatcacheError(f"backbone.kwargs: expected a mapping of argument to value, got {kwargs!r}")
    if "factory" in spec:
        return from_factory(spec["factory"], kwargs)
    name = spec["name"]
    if name in BUILTIN:
        return BUILTIN[name](**kwargs)
    import torchvision

    available = torchvision.models.list_models(module=torchvision.models)
    if name not in available:
        import difflib

        close = difflib.get_close_matches(name, list(BUILTIN) + available, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise FeatcacheError(f"unknown backbone {name!r}{hint}")
    return torchvision.models.get_model(name, weights=None, **kwargs)


def backbone_label(spec: dict) -> str:
    """What the cache's `backbone` attribute records: the factory string, or the model's name."""
    return str(spec["factory"]) if "factory" in spec else str(spec["name"])


def from_factory(factory, kwargs: dict) -> nn.Module:
    """`factory(**kwargs)` for `backbone.factory` = "package.module:callable" or "path/to/file.py:callable".

    A module is imported with the current directory first on sys.path (so a `models/` folder beside
    the pipeline imports as `models.densenet`); a .py file is loaded by path (relative to the current
    directory) with its own folder on sys.path while it runs, so it can import files beside it. The
    callable may be dotted (`module:Class.build`) and must return an nn.Module.
    """
    import importlib
    import sys

    from featcache.importing import exec_file_module

    where = f"backbone.factory {factory!r}"
    if not isinstance(factory, str) or factory.count(":") < 1 or not all(factory.rpartition(":")[::2]):
        raise FeatcacheError(f"{where}: expected \"package.module:callable\" or \"path/to/file.py:callable\"")
    target, _, attr = factory.rpartition(":")
    if target.endswith(".py"):
        path = Path(target)
        if not path.is_file():
            raise FeatcacheError(f"{where}: file {path} not found")
        # A name unique to the file, so two model files named alike do not share a module.
        name = f"featcache_factory_{hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:12]}"
        folder = str(path.resolve().parent)
    else:
        if not all(part.isidentifier() for part in target.split(".")):
            raise FeatcacheError(f"{where}: {target!r} is neither a module name nor a .py file")
        name, folder = target, str(Path.cwd())
    sys.path.insert(0, folder)
    try:
        if target.endswith(".py"):
            module = sys.modules.get(name) or exec_file_module(name, path)
        else:
            module = importlib.import_module(target)
    except ModuleNotFoundError as exc:
        raise FeatcacheError(f"{where}: cannot import {target} (no module named {exc.name!r})") from None
    except Exception as exc:
        raise FeatcacheError(f"{where}: importing {target} failed: {type(exc).__name__}: "
                             f"{str(exc).splitlines()[0] if str(exc) else ''}") from None
    finally:
        sys.path.remove(folder)
    obj = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            import difflib

            close = difflib.get_close_matches(part, [a for a in dir(obj) if not a.startswith("_")], n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise FeatcacheError(f"{where}: {target} has no attribute {attr!r}{hint}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise FeatcacheError(f"{where}: {attr} is not callable (it is a {type(obj).__name__})")
    try:
        model = obj(**kwargs)
    except Exception as exc:
        raise FeatcacheError(f"{where}: {attr}(**backbone.kwargs) failed: {type(exc).__name__}: "
                             f"{str(exc).splitlines()[0] if str(exc) else ''}") from None
    if not isinstance(model, nn.Module):
        raise FeatcacheError(f"{where}: {attr} returned a {type(model).__name__}, not a torch.nn.Module")
    return model


def file_sha256(path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def state_dict_sha256(model: nn.Module) -> str:
    """sha256 over a state_dict's names and bytes, for models that come with no file."""
    digest = hashlib.sha256()
    for key, value in sorted(model.state_dict().items()):
        digest.update(key.encode())
        # raw bytes, so that dtypes numpy lacks (bfloat16) hash too; float32 gives numpy's bytes
        digest.update(value.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def load_checkpoint(model: nn.Module, path, trust: bool = False) -> nn.Module:
    """Load a state_dict (or, with `trust`, a whole pickled model) into `model`, naming any missing
    or unexpected keys.

    Checkpoints are read with `torch.load(weights_only=True)`, which admits tensors and plain
    containers only. Anything else needs full unpickling, and unpickling a shared file runs whatever
    code it names; that is done only when the user opts in (`trust`).
    """
    import pickle
    import re

    path = Path(path)
    if not path.exists():
        raise FeatcacheError(f"{path}: checkpoint not found")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        # torch's "Weights only load failed" names the first global it refused; without one, the
        # file is simply not a checkpoint
        refused = re.search(r"GLOBAL ([\w.]+)", str(exc))
        if not refused:
            lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
            detail = next((line for line in lines if line.startswith("Unsupported")), lines[0] if lines else "")
            raise FeatcacheError(f"{path}: not a readable torch checkpoint ({detail})") from None
        if not trust:
            raise FeatcacheError(
                f"{path}: refused: this checkpoint is not plain weights (it names {refused.group(1)}) and would "
                "need full unpickling, which runs any code the file names; if you trust its origin, set "
                "`backbone.trust_checkpoint: true` in the pipeline or pass `featcache extract --trust-checkpoint`, "
                "or save a state_dict instead") from None
        try:
            obj = torch.load(path, map_location="cpu", weights_only=False)
        except Exception as exc2:
            raise FeatcacheError(f"{path}: not a readable torch checkpoint ({_first_line(exc2)})") from None
    except Exception as exc:
        raise FeatcacheError(f"{path}: not a readable torch checkpoint ({_first_line(exc)})") from None
    if isinstance(obj, nn.Module):
        obj = obj.state_dict()
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise FeatcacheError(f"{path}: expected a state_dict or a model, found {type(obj).__name__}")
    obj = {k.removeprefix("module."): v for k, v in obj.items()}
    own = model.state_dict()
    missing = sorted(set(own) - set(obj))
    unexpected = sorted(set(obj) - set(own))
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing keys {_few(missing)}")
        if unexpected:
            parts.append(f"unexpected keys {_few(unexpected)}")
        raise FeatcacheError(f"{path}: checkpoint does not fit {type(model).__name__}: {'; '.join(parts)}")
    wrong = [k for k in own if tuple(own[k].shape) != tuple(obj[k].shape)]
    if wrong:
        k = wrong[0]
        raise FeatcacheError(f"{path}: checkpoint does not fit {type(model).__name__}: {k} has shape "
                             f"{tuple(obj[k].shape)}, the model needs {tuple(own[k].shape)}")
    model.load_state_dict(obj)
    return model


def _first_line(exc) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__


def _few(keys, n=3):
    return ", ".join(keys[:n]) + (f" and {len(keys) - n} more" if len(keys) > n else "")


def train_classifier(model: nn.Module, images: np.ndarray, labels: np.ndarray, *, epochs: int = 30,
                     batch_size: int = 64, lr: float = 0.05, seed: int = 0, shift: int = 1,
                     progress: bool = True) -> nn.Module:
    """Train with SGD + momentum, cosine schedule and random shifts of up to `shift` pixels; seeded."""
    from tqdm import tqdm

    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    x = torch.from_numpy(images)
    y = torch.from_numpy(labels)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4, nesterov=True)
    steps = epochs * ((len(x) + batch_size - 1) // batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps)
    loss_fn = nn.CrossEntropyLoss()
    model.train()
    for _ in tqdm(range(epochs), desc="train backbone", unit="epoch", disable=not progress):
        order = torch.randperm(len(x), generator=gen)
        for start in range(0, len(x), batch_size):
            idx = order[start : start + batch_size]
            xb = x[idx]
            if shift:
                dx, dy = torch.randint(-shift, shift + 1, (2,), generator=gen).tolist()
                xb = torch.roll(xb, shifts=(dy, dx), dims=(2, 3))
            opt.zero_grad()
            loss_fn(model(xb), y[idx]).backward()
            opt.step()
            sched.step()
    model.eval()
    return model


def accuracy(model: nn.Module, images: np.ndarray, labels: np.ndarray) -> float:
    with torch.no_grad():
        pred = model(torch.from_numpy(images)).argmax(1).numpy()
    return float((pred == labels).mean())
