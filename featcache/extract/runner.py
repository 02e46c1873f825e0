"""Stage one: run the backbone once per split and write the cache of shared/cache-schema.md."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn

import featcache
from featcache.cache.schema import ROLES
from featcache.cache.verify import check_logits
from featcache.cache.writer import CacheWriter, is_disk_full
from featcache.config import LABELLED_ROLES, Pipeline, manifest_entry
from featcache.errors import DiskFull, FeatcacheError
from featcache.extract.backbones import (
    accuracy,
    backbone_label,
    build_backbone,
    file_sha256,
    load_checkpoint,
    state_dict_sha256,
    train_classifier,
)
from featcache.extract.datasets import ImageSet, load_dataset, resolved_entry
from featcache.extract.layers import Layers, find_layers
from featcache.extract.torchdata import TorchSplit

def prepare_backbone(pipeline: Pipeline, manifest: dict, progress: bool = True,
                     trust: bool = False) -> tuple[nn.Module, str]:
    """The pipeline's model in eval mode with its weights, and the sha256 identifying them.

    A missing checkpoint is trained in the repo when the pipeline says how (`backbone.train`),
    then kept with a `.sha256` file beside it and reused on later runs. A checkpoint that needs full
    unpickling is loaded only with `trust` or `backbone.trust_checkpoint: true` (see load_checkpoint).
    """
    spec = pipeline.backbone
    trusted = spec.get("trust_checkpoint", False)
    if not isinstance(trusted, bool):
        raise FeatcacheError(f"{pipeline.path}: field 'backbone.trust_checkpoint' must be true or false, got {trusted!r}")
    # Seeded before construction: initial weights decide both random backbones and trained ones.
    torch.manual_seed(int(spec.get("seed", (spec.get("train") or {}).get("seed", 0))))
    model = build_backbone(spec)
    checkpoint = spec.get("checkpoint")
    if checkpoint in (None, "random"):
        return model.eval(), state_dict_sha256(model)
    checkpoint = Path(checkpoint)
    sidecar = checkpoint.with_name(checkpoint.name + ".sha256")
    if not checkpoint.exists():
        train = spec.get("train")
        if not train:
            raise FeatcacheError(f"{checkpoint}: checkpoint not found (and the pipeline gives no backbone.train)")
        train = dict(train)
        data = load_dataset(train.pop("dataset"), manifest, pipeline.manifest_path)
        evaluate = train.pop("evaluate", None)
        min_accuracy = train.pop("min_accuracy", None)
        train_classifier(model, data.images, data.labels, progress=progress, **train)
        if evaluate:
            test = load_dataset(evaluate, manifest, pipeline.manifest_path)
            acc = accuracy(model, test.images, test.labels)
            print(f"trained {backbone_label(spec)}: {evaluate} accuracy {100 * acc:.2f}%")
            if min_accuracy is not None and acc < min_accuracy:
                raise FeatcacheError(f"{backbone_label(spec)}: {evaluate} accuracy {acc:.4f} is below min_accuracy {min_accuracy}")
        checkpoint.parent.mkdir(parents=True, exist_ok=True)
        tmp = checkpoint.with_name(checkpoint.name + ".tmp")
        torch.save(model.state_dict(), tmp)
        os.replace(tmp, checkpoint)
        sidecar.write_text(file_sha256(checkpoint) + "\n")
    sha = file_sha256(checkpoint)
    if sidecar.exists() and sidecar.read_text().split()[0] != sha:
        raise FeatcacheError(f"{checkpoint}: sha256 does not match {sidecar.name}; the checkpoint changed "
                             "(delete both to retrain)")
    load_checkpoint(model, checkpoint, trust=trust or trusted)
    return model.eval(), sha


AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


class FeatureExtractor:
    """Pooled feature, pre-pool channel statistics and logits of a batch, in one forward pass.

    With `amp` ("bf16" or "fp16") the backbone runs under autocast; outputs are stored as float32,
    and the logits are then those of the head applied in float32 to the float32 features, so that
    they equal features @ W.T + b as the contract requires.
    """

    def __init__(self, model: nn.Module, layers: Layers, device: str = "cpu", amp: str | None = None):
        from torchvision.models.feature_extraction import create_feature_extractor

        if amp not in (None, *AMP_DTYPES):
            raise FeatcacheError(f"extract.amp must be one of {', '.join(AMP_DTYPES)} or empty, got {amp!r}")
        self.layers, self.device, self.amp = layers, torch.device(device), amp
        self.channels = input_channels(model)  # what each split's images are checked against
        self.precision = amp or "float32"
        self.head = dict(model.named_modules())[layers.head]
        self.weight = self.head.weight.detach().cpu().numpy().astype(np.float32)
        self.bias = (self.head.bias.detach().cpu().numpy() if self.head.bias is not None
                     else np.zeros(self.head.out_features)).astype(np.float32)
        nodes = {layers.prepool: "prepool", layers.feature: "features", layers.head: "logits"}
        self.net = create_feature_extractor(model, return_nodes=nodes).eval().to(self.device)
        self.head = self.head.to(self.device)

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> dict:
        images = images.to(self.device, non_blocking=True)
        with torch.autocast(self.device.type, dtype=AMP_DTYPES.get(self.amp, torch.bfloat16), enabled=self.amp is not None):
            out = self.net(images)
        prepool = out["prepool"].float()
        if prepool.ndim != 4:
            raise FeatcacheError(f"pre-pool node {self.layers.prepool!r} gives shape {tuple(prepool.shape)}, not (N, C, H, W)")
        features = out["features"].flatten(1).float()
        logits = self.head(features) if self.amp else out["logits"]
        return {
            "features": features.cpu().numpy(),
            "chan_max": prepool.amax(dim=(2, 3)).cpu().numpy(),
            "chan_mean": prepool.mean(dim=(2, 3)).cpu().numpy(),
            "logits": logits.float().cpu().numpy(),
        }


def prepool_size(extractor: FeatureExtractor, image: torch.Tensor) -> str:
    """The pre-pool map's spatial size, "HxW", for one input (the `prepool_size` root attribute)."""
    with torch.no_grad():
        shape = tuple(extractor.net(image.to(extractor.device))["prepool"].shape)
    if len(shape) != 4:
        raise FeatcacheError(f"pre-pool node {extractor.layers.prepool!r} gives shape {shape}, not (N, C, H, W)")
    return f"{shape[2]}x{shape[3]}"


def batches(data, start: int, stop: int, step: int, workers: int = 0, pin_memory: bool = False):
    """(start, stop, images, labels) for rows start..stop in blocks of `step`.

    Generated data comes from memory; file data streams through a DataLoader, and an image that
    cannot be read stops extraction with an error naming its file; a user's torch data set (the
    Python API) streams through its own loader settings (see featcache.extract.torchdata).
    """
    if isinstance(data, ImageSet):
        for a in range(start, stop, step):
            b = min(a + step, stop)
            yield a, b, torch.from_numpy(data.images[a:b]), data.labels[a:b]
        return
    if isinstance(data, TorchSplit):
        yield from data.batches(start, stop, step, pin_memory=pin_memory)
        return
    from torch.utils.data import DataLoader, Subset

    from featcache.extract.files import collate

    loader = DataLoader(Subset(data, range(start, stop)), batch_size=step, shuffle=False, num_workers=workers,
                        pin_memory=pin_memory, collate_fn=collate)
    a = start
    for images, readable in _first_line_errors(loader, getattr(data, "where", "")):
        if not bool(readable.all()):
            bad = a + int(np.flatnonzero(~readable.numpy())[0])
            raise FeatcacheError(f"{data.describe(bad)}: cannot be read as an image (sample {data.ids[bad]!r}); "
                                 "remove it from the data set or fix it, then run again to resume")
        yield a, a + len(images), images, data.labels[a : a + len(images)]
        a += len(images)


def _first_line_errors(loader, where: str):
    """The loader's batches; a FeatcacheError raised in a worker process comes back with the worker's
    traceback in its message, and is given its own line again."""
    try:
        yield from loader
    except FeatcacheError as exc:
        lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
        message = next((line.split("FeatcacheError: ", 1)[1] for line in reversed(lines) if "FeatcacheError: " in line),
                       lines[0] if lines else "")
        raise FeatcacheError(f"{where}: {message}" if where else message) from None


def first_image(data) -> torch.Tensor:
    if isinstance(data, ImageSet):
        return torch.from_numpy(data.images[:1])
    if isinstance(data, TorchSplit):
        return data.first()
    image, readable = data[0]
    if not readable:
        raise FeatcacheError(f"{data.describe(0)}: cannot be read as an image")
    return image[None]


def probe(extractor: "FeatureExtractor", data, where: str) -> dict:
    """The outputs for the data's first image: they size the arrays (even for a shard with no rows).

    Images the backbone cannot take (a channel count or size it does not accept) are refused here
    in one line naming the data set, not deep inside the network.
    """
    image = first_image(data)
    hint = ("convert them in the data set's transform" if isinstance(data, TorchSplit)
            else f"set transform: {{channels: {extractor.channels}}} on it")
    refuse_channels(image, extractor.channels, where, hint)
    try:
        return extractor(image)
    except (RuntimeError, ValueError, TypeError) as exc:
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise FeatcacheError(f"{where}: the backbone cannot take its images (shape {tuple(image.shape)}): "
                             f"{first_line}") from None


def refuse_channels(image: torch.Tensor, expected: int | None, where: str, hint: str) -> None:
    """One line naming the data set when its images (a batch) have other channels than the
    backbone's first convolution takes (`expected`, None: not known)."""
    if expected is not None and image.ndim == 4 and image.shape[1] != expected:
        raise FeatcacheError(f"{where}: its images have {image.shape[1]} channels, the backbone's first layer "
                             f"takes {expected}; {hint}")


def input_channels(model: nn.Module) -> int | None:
    """The channel count of the first convolution the forward pass runs (not the first declared),
    or None without one."""
    from featcache.extract.layers import trace

    modules = dict(model.named_modules())
    try:
        graph, _ = trace(model)
        order = [modules.get(n.target) for n in graph.nodes if n.op == "call_module"]
    except FeatcacheError:  # not traceable: find_layers will say so; declaration order meanwhile
        order = list(model.modules())
    for module in order:
        # a traced leaf may be a block (torchvision's Conv2dNormActivation): its first convolution
        for inner in module.modules() if module is not None else ():
            if isinstance(inner, nn.Conv2d):
                return int(inner.in_channels)
    return None


@dataclass
class SplitSource:
    """One split to extract, however its data is given (a pipeline's manifest or the Python API).

    `load()` returns the data: an ImageSet, a files data set (FileImages, CorruptedImages) or a
    TorchSplit. `entry` is what the root attribute `preprocessing` records for the split, `resume`
    what identifies its samples in the resume key, `attrs` extra split attributes (corruption,
    severity, group), `where` names it in errors.
    """

    name: str
    role: str
    load: Callable[[], object]
    entry: dict
    resume: dict
    attrs: dict = field(default_factory=dict)
    where: str = ""
    # whether an id split's every sample must have a class (the API's data); a manifest's entry may
    # say -1, unknown, as its `folder` format and generated noise do
    labels_required: bool = False


def check_roles(roles: list[tuple[str, str]], where: str) -> None:
    """(split name, role) pairs: a cache needs exactly one id_train, id_val and id_test split and at
    least one ood split, and no other role."""
    for name, role in roles:
        if role == "train":
            raise FeatcacheError(f"{where}: split {name!r} has role 'train' (backbone training only); "
                                 "it cannot go into a cache")
        if role not in ROLES:
            raise FeatcacheError(f"{where}: split {name!r} has role {role!r}; one of {', '.join(ROLES)}")
    counts = [role for _, role in roles]
    for role in ("id_train", "id_val", "id_test"):
        if counts.count(role) != 1:
            raise FeatcacheError(f"{where}: splits need exactly one {role} dataset, found {counts.count(role)}")
    if "ood" not in counts:
        raise FeatcacheError(f"{where}: splits need at least one ood dataset")


def validate_splits(pipeline: Pipeline, manifest: dict) -> None:
    """The pipeline's splits exist in its manifest and have the roles a cache needs (check_roles)."""
    check_roles([(name, manifest_entry(manifest, name, pipeline.manifest_path)["role"]) for name in pipeline.splits],
                str(pipeline.path))


def pipeline_sources(pipeline: Pipeline, manifest: dict, channels: int | None) -> list[SplitSource]:
    """The pipeline's splits, read from its manifest, with images of `channels` channels unless an
    entry's transform says otherwise."""
    sources = []
    for name in pipeline.splits:
        entry = manifest_entry(manifest, name, pipeline.manifest_path)
        resolved = resolved_entry(name, manifest, pipeline.manifest_path, channels=channels)
        chosen = resolved["transform"].get("channels")
        if channels is not None and chosen != channels:  # refused before any split is written
            raise FeatcacheError(f"{pipeline.manifest_path}: dataset {name!r}: transform.channels is {chosen}, the "
                                 f"backbone's first layer takes {channels}; set transform.channels to {channels} "
                                 "or remove it")
        attrs = {}
        if entry["role"] == "pseudo_ood":
            attrs |= {"corruption": entry["source"].get("corruption", ""),
                      "severity": entry["source"].get("severity", 0), "of": entry["source"].get("of", "")}
        if entry.get("group"):
            attrs["group"] = entry["group"]
        sources.append(SplitSource(
            name=name, role=entry["role"],
            load=partial(load_dataset, name, manifest, pipeline.manifest_path, channels=channels),
            entry={k: v for k, v in resolved.items() if k != "role"}, resume=_with_locations(resolved),
            attrs=attrs, where=f"{pipeline.manifest_path}: dataset {name!r}"))
    return sources


def extract(pipeline: Pipeline, *, out=None, overwrite: bool = False,
            batch_size: int | None = None, progress: bool = True, timings: dict | None = None,
            shard: tuple[int, int] | None = None, device: str | None = None, amp: str | None = None,
            trust_checkpoint: bool = False) -> Path:
    """Write (or resume) the pipeline's cache; returns its path.

    A `<cache>.partial` left by an interrupted run is resumed only when its resume key, everything
    that shapes the numbers (each split's resolved manifest entry, checkpoint digest, layers, batch
    size, precision, device, featcache and torch versions, shard), equals this run's; otherwise it
    is discarded with a message naming what changed. `overwrite` always starts afresh.

    With `shard` = (i, n), only the i-th of n near-equal runs of whole batches of every split is
    extracted, into a cache that `featcache merge` joins with the other shards.

    `timings`, if given, receives per split {"n", "load_s", "extract_s"}: seconds spent building the
    data set, and running the backbone and writing.
    """
    out = Path(out) if out else pipeline.cache
    manifest = pipeline.manifest()
    validate_splits(pipeline, manifest)
    # refuses an existing output, or one another extraction is writing, before any work
    writer = CacheWriter(out, overwrite=overwrite)
    try:
        model, checkpoint_sha = prepare_backbone(pipeline, manifest, progress=progress, trust=trust_checkpoint)
        spec, options = pipeline.backbone, pipeline.extract
        sources = pipeline_sources(pipeline, manifest, input_channels(model))
        return write_cache(model, sources, writer, backbone=backbone_label(spec), checkpoint_sha256=checkpoint_sha,
                           feature_layer=spec.get("feature_layer"), prepool_layer=spec.get("prepool_layer"),
                           batch_size=int(batch_size or options.get("batch_size", 256)),
                           device=str(device or options.get("device", "cpu")),
                           amp=amp if amp is not None else options.get("amp"),
                           workers=int(options.get("workers", 0)), progress=progress, timings=timings, shard=shard)
    finally:
        writer.close()


def write_cache(model: nn.Module, sources: list[SplitSource], writer: CacheWriter, *, backbone: str,
                checkpoint_sha256: str, feature_layer: str | None = None, prepool_layer: str | None = None,
                batch_size: int = 256, device: str = "cpu", amp: str | None = None, workers: int = 0,
                progress: bool = True, timings: dict | None = None, shard: tuple[int, int] | None = None) -> Path:
    """Run `model` (in eval mode) over every split of `sources` into the cache `writer` opens.

    The one extraction path, of `featcache extract` and of `featcache.extract`: head, feature and
    pre-pool layers found in the model (or named), the resume key, every batch's logits checked
    against features and head, free space checked before each write.
    """
    import time

    from tqdm import tqdm

    layers = find_layers(model, feature_layer, prepool_layer)
    try:
        torch.device(device)
    except (RuntimeError, TypeError):
        raise FeatcacheError(f"device {device!r}: expected cpu, cuda or cuda:N") from None
    if batch_size < 1:
        raise FeatcacheError(f"batch size must be a positive integer, got {batch_size!r}")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise FeatcacheError(f"--device {device}: no CUDA device is available here")
    extractor = FeatureExtractor(model, layers, device=device, amp=amp)
    first_data = sources[0].load()
    probe_image = first_image(first_data)
    probe(extractor, first_data, sources[0].where)  # a clear error for images the backbone cannot take
    del first_data
    root_attrs = dict(
        featcache_version=featcache.__version__, torch_version=torch.__version__, backbone=backbone,
        checkpoint_sha256=checkpoint_sha256, feature_layer=layers.feature, prepool_layer=layers.prepool,
        prepool_size=prepool_size(extractor, probe_image), precision=extractor.precision,
        device=device_description(extractor.device),
        preprocessing=json.dumps({s.name: s.entry for s in sources}, sort_keys=True),
    )
    if shard is not None:
        root_attrs["shard"] = f"{shard[0]}/{shard[1]}"
    resume_key = {key: root_attrs[key] for key in (
        "featcache_version", "torch_version", "backbone", "checkpoint_sha256", "feature_layer", "prepool_layer",
        "precision", "device")}
    resume_key |= {"batch_size": batch_size, "shard": root_attrs.get("shard"),
                   "splits": {s.name: {"role": s.role, **s.resume} for s in sources},
                   # the forward code up to the head: same weights under other code give other numbers
                   "graph_sha256": hashlib.sha256(extractor.net.code.encode()).hexdigest()}
    room = Room(writer, sources, extractor, batch_size)
    try:
        room.check(room.head_bytes)
        resumed = writer.open(root_attrs, extractor.weight, extractor.bias, resume_key=resume_key)
        if writer.restart_reason:
            print(f"not resuming {writer.partial}: {writer.restart_reason}; starting afresh")
        if resumed and progress:
            print(f"resuming {writer.partial}")
        for source in sources:
            name = source.name
            t0 = time.perf_counter()
            data = source.load()
            check_ids(data.ids, source.where)
            first = probe(extractor, data, source.where)
            extra = dict(source.attrs)
            if shard is not None:
                # Shard boundaries fall on whole batches, so every batch holds the same rows as in a
                # one-process run: results then agree bit for bit (kernels can depend on batch size).
                total = len(data)
                n_batches = -(-total // batch_size)
                lo = min(total, shard[0] * n_batches // shard[1] * batch_size)
                hi = min(total, (shard[0] + 1) * n_batches // shard[1] * batch_size)
                data = data.subset(lo, hi)
                extra |= {"shard_index": shard[0], "shard_count": shard[1], "row_offset": lo, "total_n": total}
            t1 = time.perf_counter()
            split = _open_split(writer, source, data, first, extractor, layers, extra, batch_size)
            if not _same_ids(writer, split, data) or not _same_rows(writer, split, data, extractor, source):
                # the partial's rows of this split came from other samples (files added, removed or
                # renamed since): they are extracted again
                writer.store.delete(split.group)
                split = _open_split(writer, source, data, first, extractor, layers, extra, batch_size)
            room.plan(split, data.ids, first)
            if split.complete:
                continue
            bar = tqdm(total=len(data), initial=split.rows_written, desc=f"extract {name}", unit="img",
                       disable=not progress, leave=False)
            step = int(split.write_rows or batch_size)  # a resumed split keeps its chunk layout
            for start, stop, images, labels in batches(data, split.rows_written, len(data), step, workers,
                                                       pin_memory=extractor.device.type == "cuda"):
                batch = extractor(images)
                check_logits(batch["features"], batch["logits"], extractor.weight, extractor.bias,
                             f"split {name!r} rows {start}-{stop}")
                batch["labels"] = split_labels(labels, source, start, extractor.weight.shape[0])
                batch["ids"] = data.ids[start:stop]
                # chunks are whole multiples of an append, so an append begins at most one new chunk
                # of every array: allocated whole (HDF5), or written anew before the old one goes (Zarr)
                room.check(room.chunk_bytes)
                split.append(batch)
                room.wrote(name, stop - start)
                bar.update(stop - start)
            bar.close()
            room.check(0)
            split.finish()
            if timings is not None:
                timings[name] = {"n": len(data), "load_s": t1 - t0, "extract_s": time.perf_counter() - t1}
        room.check(0)
        return writer.finish()
    except Exception as exc:
        if not is_disk_full(exc):
            raise
        raise room.full(exc) from None


def split_labels(labels, source: SplitSource, start: int, classes: int) -> np.ndarray:
    """The labels stored for a batch: the classes of an id split (each one of the head's 0..K-1,
    or ID accuracy would silently be wrong; -1, unknown, where the source allows it), -1 for every
    other role."""
    labels = np.asarray(labels, np.int64)
    if source.role not in LABELLED_ROLES:
        return np.full(len(labels), -1, np.int64)
    lowest = 0 if source.labels_required else -1
    bad = np.flatnonzero((labels < lowest) | (labels >= classes))
    if len(bad):
        unknown = "" if source.labels_required else " or -1 (unknown)"
        raise FeatcacheError(f"{source.where}: sample {start + int(bad[0])} has label {int(labels[bad[0]])}, not a class "
                             f"of the head (0..{classes - 1}){unknown}; an {source.role} split needs every sample's class")
    return labels


SPOT_ROWS = 8  # rows per spot-checked run when resuming
SPOT_RUNS = 4


def _same_rows(writer: CacheWriter, split, data, extractor: FeatureExtractor, source: SplitSource) -> bool:
    """Whether rows the partial already holds are what this run computes: a few short runs spread over
    them are extracted again and compared (labels exactly, arrays to float tolerance, since batch
    composition may change the last bits). In-memory data has no file names to tell a changed sample
    by; this catches a changed model, transform, collate function or labels in most cases."""
    done = split.n if split.complete else split.rows_written
    if not done:
        return True
    starts = sorted({int(a) for a in np.linspace(0, max(done - SPOT_ROWS, 0), SPOT_RUNS)})
    tolerance = 1e-4 if extractor.amp is None else 5e-2
    for a in starts:
        b = min(a + SPOT_ROWS, done)
        for start, stop, images, labels in batches(data, a, b, SPOT_ROWS):
            fresh = extractor(images)
            fresh["labels"] = split_labels(labels, source, start, extractor.weight.shape[0])
            for key in ("features", "chan_max", "logits", "labels"):
                stored = writer.store.read(f"{split.group}/{key}", slice(start, stop))
                scale = float(np.max(np.abs(stored))) if stored.size else 0.0
                if stored.shape != fresh[key].shape or not np.allclose(fresh[key], stored, rtol=tolerance,
                                                                      atol=tolerance * max(scale, 1e-6)):
                    print(f"{writer.partial}: split {split.name!r} rows {start}-{stop} hold other {key} than this "
                          "run computes (the data, labels or model changed); extracting this split again")
                    return False
    return True


def device_description(device: torch.device) -> str:
    """'cpu', or 'cuda (<device name>)': what the numbers were computed on (the index does not matter)."""
    if device.type == "cuda":
        return f"cuda ({torch.cuda.get_device_name(device)})"
    return device.type


def _with_locations(entry: dict) -> dict:
    """A resolved entry with its file locations made absolute, for the resume key: the same relative
    path run from another directory names other files."""
    source = entry["source"]
    if "path" in source:
        source = {**source, "abspath": os.path.abspath(source["path"])}
        if "root" in source:
            source["absroot"] = os.path.abspath(source["root"])
    if "of_entry" in source:
        source = {**source, "of_entry": _with_locations(source["of_entry"])}
    return {**entry, "source": source}


# A sample id is kept as given (relative file paths contain '/'), but it is never a way out: no
# control character (ids are hashed joined by newlines), not empty, not absolute, no '.' or '..' part.
_BAD_ID = re.compile(r"[\x00-\x09\x0b-\x1f\x7f-\x9f]|^$|^/|(?:^|/)\.\.?(?:/|$)", re.MULTILINE)


def check_ids(ids, where: str) -> None:
    """Refuse sample ids that are not plain relative names (see _BAD_ID), naming the first one."""
    if len(ids) == 0:
        return
    text = "\n".join(map(str, ids))
    if text.count("\n") == len(ids) - 1 and not _BAD_ID.search(text):
        return  # the fast path: one scan over all ids
    for i, value in enumerate(map(str, ids)):
        if "\n" in value or _BAD_ID.search(value):
            raise FeatcacheError(f"{where}: sample {i} has id {value!r}; a sample id must be a relative name "
                                 "without control characters, '.' or '..' parts, and not absolute")


def _same_ids(writer: CacheWriter, split, data) -> bool:
    """Whether the rows a resumed split already holds came from the samples now in `data`."""
    done = split.n if split.complete else split.rows_written
    if not done:
        return True
    stored = writer.store.read(f"{split.group}/ids", slice(0, done))
    if np.array_equal(stored, np.asarray(data.ids[:done], dtype=str)):
        return True
    row = int(np.flatnonzero(stored != np.asarray(data.ids[:done], dtype=str))[0])
    print(f"{writer.partial}: split {split.name!r} row {row} holds sample {str(stored[row])!r}, the data set now "
          f"has {str(data.ids[row])!r}; extracting this split again")
    return False


def _size(path: Path) -> int:
    if path.is_dir():
        return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    return path.stat().st_size if path.exists() else 0


def _mib(nbytes: float) -> str:
    return f"{nbytes / 2**20:,.1f} MiB"


class Room:
    """Free space for the cache, checked before every write, and what the rest of it needs.

    Stopping before the disk is full leaves a partial that closes cleanly and resumes; a write that
    fails for want of space anyway (another process filled the disk) is reported by `full`. The
    estimate counts, per split, whole chunks (the last one is allocated whole too) of float32
    features, chan_max, chan_mean (not on disk twice when HDF5 links it to features), logits, int64
    labels, and ids (a 16-byte reference plus the string and its 16-byte heap header).
    """

    SLACK = 1 << 20  # metadata written when splits are finished and the file is closed

    def __init__(self, writer: CacheWriter, sources: list, extractor, batch_size: int):
        self.writer, self.batch_size = writer, batch_size
        # HDF5 stores chunks as they are (edge chunks whole); Zarr compresses them, so takes less
        self.about = "about" if writer.fmt == "h5" else "up to"
        k, d = extractor.weight.shape
        self.head_bytes = 4 * k * (d + 1)
        # array -> (row width the chunk layout is computed from, bytes per row on disk); until a
        # probe gives the channel count C, ResNets' C = D stands in
        self.widths = self._widths(d, d, k, linked=False, id_chars=32)
        self.chunk_bytes = 0
        self.declared = {s.name: s.entry.get("size") for s in sources}
        self.splits: dict[str, list[int]] = {}  # name -> [n, rows written]

    @staticmethod
    def _widths(d, c, k, linked, id_chars) -> dict:
        return {"features": (4 * d, 4 * d), "chan_max": (4 * c, 4 * c), "chan_mean": (4 * c, 0 if linked else 4 * c),
                "logits": (4 * k, 4 * k), "labels": (8, 8), "ids": (64, 32 + id_chars)}

    def _chunks(self, n: int) -> dict:
        """array -> rows per chunk, as CacheWriter.split lays them out for a split of n rows."""
        from featcache.cache.store import row_chunks

        return {key: row_chunks((max(n, 1),), basis, multiple_of=self.batch_size)[0]
                for key, (basis, _) in self.widths.items()}

    def _bytes(self, n: int, written: int) -> int:
        """Bytes a split of n rows with `written` rows on disk still takes: the chunks not yet begun."""
        total = 0
        for key, rows in self._chunks(n).items():
            total += (-(-n // rows) - -(-written // rows)) * rows * self.widths[key][1]
        return total

    def plan(self, split, ids, probe) -> None:
        """Split `split` is about to be written: its row widths, chunk sizes and rows written."""
        c, d, k = probe["chan_max"].shape[1], probe["features"].shape[1], probe["logits"].shape[1]
        id_chars = max((len(str(i).encode()) for i in ids), default=0)
        self.widths = self._widths(d, c, k, split.chan_mean_linked, id_chars)
        self.chunk_bytes = sum(rows * self.widths[key][1] for key, rows in self._chunks(split.n).items())  # one of each
        self.splits[split.name] = [split.n, split.n if split.complete else split.rows_written]

    def wrote(self, name: str, rows: int) -> None:
        self.splits[name][1] += rows

    def needed(self) -> tuple[int, bool]:
        """(bytes still to write, whether some split's size is unknown so it is more)."""
        total, unknown = sum(self._bytes(n, written) for n, written in self.splits.values()), False
        for name, size in self.declared.items():
            if name not in self.splits:
                if size is None:
                    unknown = True
                else:
                    total += self._bytes(size, 0)
        extra = self.head_bytes if self.writer.store is None else 0
        return total + extra + self.SLACK, unknown

    def free(self) -> int | None:
        try:
            usage = shutil.disk_usage(self.writer.path.parent)
        except OSError:
            return None
        return usage.free if usage.total > 0 else None  # some virtual file systems report nothing

    def check(self, nbytes: int) -> None:
        """Stop, cleanly and resumably, when the next write of `nbytes` might not fit (slack for
        metadata included) and neither would the rest of the cache."""
        free = self.free()
        if free is None:
            return
        need, unknown = self.needed()
        if free >= min(nbytes + self.SLACK, need):
            return
        raise FeatcacheError(f"{self.writer.partial}: the disk is nearly full ({_mib(free)} free); {self.about} "
                             f"{_mib(need)}{' or more' if unknown else ''} are needed for the rest of the cache; "
                             "free some space and run the same command again to resume")

    def full(self, exc: BaseException) -> FeatcacheError:
        """The one-line error for a write that failed for want of space."""
        need, unknown = self.needed()
        more = " or more" if unknown else ""
        if self.writer.fmt == "h5":
            # HDF5 may have left the file's metadata half written: the partial cannot be trusted. Its
            # space comes back when this process ends (HDF5 keeps the file open, see abandon).
            size = _size(self.writer.partial)
            self.writer.abandon()
            free = (self.free() or 0) + size
            return DiskFull(f"{self.writer.partial}: the disk filled up while writing it (No space left on "
                            f"device); the partial was removed, because a failed HDF5 write can damage it; about "
                            f"{_mib(need + self._written())}{more} are needed for the whole cache, "
                            f"{_mib(free)} are free without the partial; free some space and run the same "
                            "command again", abandoned=True)
        free = self.free()
        return DiskFull(f"{self.writer.partial}: the disk filled up while writing it (No space left on device); "
                        f"{self.about} {_mib(need)}{more} more are needed ({_mib(free or 0)} free now); free some space "
                        "and run the same command again to resume")

    def _written(self) -> int:
        """Bytes of the rows already written, which a restart writes again."""
        return sum(self._bytes(n, 0) - self._bytes(n, written) for n, written in self.splits.values())


def _open_split(writer, source: SplitSource, data, probe, extractor, layers, extra, batch_size):
    dims = {"D": probe["features"].shape[1], "C": probe["chan_max"].shape[1], "K": probe["logits"].shape[1]}
    if dims["D"] != extractor.weight.shape[1]:
        raise FeatcacheError(f"feature node {layers.feature!r} has width {dims['D']}, the head takes {extractor.weight.shape[1]}")
    return writer.split(source.name, role=source.role, source=source.name, n=len(data), dims=dims,
                        chan_mean_is_features=layers.mean_pooled and extractor.amp is None, extra_attrs=extra, write_rows=batch_size)
