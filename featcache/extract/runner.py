"""Stage one: run the backbone once per split and write the cache of shared/cache-schema.md."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import torch
from torch import nn

import featcache
from featcache.cache.verify import check_logits
from featcache.cache.writer import CacheWriter
from featcache.config import Pipeline, load_manifest, manifest_entry
from featcache.errors import FeatcacheError
from featcache.extract.backbones import (
    accuracy,
    backbone_label,
    build_backbone,
    file_sha256,
    load_checkpoint,
    state_dict_sha256,
    train_classifier,
)
from featcache.extract.datasets import ImageSet, load_dataset
from featcache.extract.layers import Layers, find_layers

def prepare_backbone(pipeline: Pipeline, manifest: dict, progress: bool = True) -> tuple[nn.Module, str]:
    """The pipeline's model in eval mode with its weights, and the sha256 identifying them.

    A missing checkpoint is trained in the repo when the pipeline says how (`backbone.train`),
    then kept with a `.sha256` file beside it and reused on later runs.
    """
    spec = pipeline.backbone
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
    load_checkpoint(model, checkpoint)
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
    """(start, stop, images) for rows start..stop in blocks of `step`; file data through a DataLoader.

    An image that cannot be read stops extraction with an error naming its file.
    """
    if isinstance(data, ImageSet):
        for a in range(start, stop, step):
            yield a, min(a + step, stop), torch.from_numpy(data.images[a : min(a + step, stop)])
        return
    from torch.utils.data import DataLoader, Subset

    from featcache.extract.files import collate

    loader = DataLoader(Subset(data, range(start, stop)), batch_size=step, shuffle=False, num_workers=workers,
                        pin_memory=pin_memory, collate_fn=collate)
    a = start
    for images, readable in loader:
        if not bool(readable.all()):
            bad = a + int(np.flatnonzero(~readable.numpy())[0])
            raise FeatcacheError(f"{data.describe(bad)}: cannot be read as an image (sample {data.ids[bad]!r}); "
                                 "remove it from the data set or fix it, then run again to resume")
        yield a, a + len(images), images
        a += len(images)


def first_image(data) -> torch.Tensor:
    if isinstance(data, ImageSet):
        return torch.from_numpy(data.images[:1])
    image, readable = data[0]
    if not readable:
        raise FeatcacheError(f"{data.describe(0)}: cannot be read as an image")
    return image[None]


def validate_splits(pipeline: Pipeline, manifest: dict) -> list[dict]:
    entries = [manifest_entry(manifest, name, pipeline.manifest_path) for name in pipeline.splits]
    roles = [e["role"] for e in entries]
    for e in entries:
        if e["role"] == "train":
            raise FeatcacheError(f"{pipeline.path}: split {e['name']!r} has role 'train' (backbone training only); "
                                 "it cannot go into a cache")
    for role in ("id_train", "id_val", "id_test"):
        if roles.count(role) != 1:
            raise FeatcacheError(f"{pipeline.path}: splits need exactly one {role} dataset, found {roles.count(role)}")
    if "ood" not in roles:
        raise FeatcacheError(f"{pipeline.path}: splits need at least one ood dataset")
    return entries


def extract(pipeline: Pipeline, *, out=None, overwrite: bool = False,
            batch_size: int | None = None, progress: bool = True, timings: dict | None = None,
            shard: tuple[int, int] | None = None, device: str | None = None, amp: str | None = None) -> Path:
    """Write (or resume) the pipeline's cache; returns its path.

    With `shard` = (i, n), only the i-th of n near-equal runs of whole batches of every split is
    extracted, into a cache that `featcache merge` joins with the other shards.

    `timings`, if given, receives per split {"n", "load_s", "extract_s"}: seconds spent building the
    data set, and running the backbone and writing.
    """
    import time

    from tqdm import tqdm

    out = Path(out) if out else pipeline.cache
    manifest = load_manifest(pipeline.manifest_path)
    entries = validate_splits(pipeline, manifest)
    writer = CacheWriter(out, overwrite=overwrite)  # refuses an existing output before any work
    model, checkpoint_sha = prepare_backbone(pipeline, manifest, progress=progress)
    spec = pipeline.backbone
    layers = find_layers(model, spec.get("feature_layer"), spec.get("prepool_layer"))
    options = pipeline.extract
    device = str(device or options.get("device", "cpu"))
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise FeatcacheError(f"--device {device}: no CUDA device is available here")
    extractor = FeatureExtractor(model, layers, device=device, amp=amp if amp is not None else options.get("amp"))
    batch_size = int(batch_size or options.get("batch_size", 256))
    workers = int(options.get("workers", 0))
    preprocessing = {e["name"]: {"source": e["source"], "transform": e["transform"]} for e in entries}
    first = first_image(load_dataset(entries[0]["name"], manifest, pipeline.manifest_path))
    root_attrs = dict(
        featcache_version=featcache.__version__, torch_version=torch.__version__, backbone=backbone_label(spec),
        checkpoint_sha256=checkpoint_sha, feature_layer=layers.feature, prepool_layer=layers.prepool,
        prepool_size=prepool_size(extractor, first),
        preprocessing=json.dumps(preprocessing, sort_keys=True),
    )
    if shard is not None:
        root_attrs["shard"] = f"{shard[0]}/{shard[1]}"
    resumed = writer.open(root_attrs, extractor.weight, extractor.bias)
    if resumed and progress:
        print(f"resuming {writer.partial}")
    try:
        for entry in entries:
            name = entry["name"]
            t0 = time.perf_counter()
            data = load_dataset(name, manifest, pipeline.manifest_path)
            probe = extractor(first_image(data))  # sizes the arrays, even for a shard with no rows
            extra = {}
            if shard is not None:
                # Shard boundaries fall on whole batches, so every batch holds the same rows as in a
                # one-process run: results then agree bit for bit (kernels can depend on batch size).
                total = len(data)
                n_batches = -(-total // batch_size)
                lo = min(total, shard[0] * n_batches // shard[1] * batch_size)
                hi = min(total, (shard[0] + 1) * n_batches // shard[1] * batch_size)
                data = data.subset(lo, hi)
                extra = {"shard_index": shard[0], "shard_count": shard[1], "row_offset": lo, "total_n": total}
            t1 = time.perf_counter()
            if entry["role"] == "pseudo_ood":
                extra |= {"corruption": entry["source"].get("corruption", ""), "severity": entry["source"].get("severity", 0)}
            split = _open_split(writer, name, entry, data, probe, extractor, layers, extra, batch_size)
            if split.complete:
                continue
            bar = tqdm(total=len(data), initial=split.rows_written, desc=f"extract {name}", unit="img",
                       disable=not progress, leave=False)
            step = int(split.write_rows or batch_size)  # a resumed split keeps its chunk layout
            for start, stop, images in batches(data, split.rows_written, len(data), step, workers,
                                               pin_memory=extractor.device.type == "cuda"):
                batch = extractor(images)
                check_logits(batch["features"], batch["logits"], extractor.weight, extractor.bias,
                             f"split {name!r} rows {start}-{stop}")
                batch["labels"] = data.labels[start:stop]
                batch["ids"] = data.ids[start:stop]
                split.append(batch)
                bar.update(stop - start)
            bar.close()
            split.finish()
            if timings is not None:
                timings[name] = {"n": len(data), "load_s": t1 - t0, "extract_s": time.perf_counter() - t1}
        return writer.finish()
    finally:
        writer.close()


def _open_split(writer, name, entry, data, probe, extractor, layers, extra, batch_size):
    dims = {"D": probe["features"].shape[1], "C": probe["chan_max"].shape[1], "K": probe["logits"].shape[1]}
    if dims["D"] != extractor.weight.shape[1]:
        raise FeatcacheError(f"feature node {layers.feature!r} has width {dims['D']}, the head takes {extractor.weight.shape[1]}")
    return writer.split(name, role=entry["role"], source=name, n=len(data), dims=dims,
                        chan_mean_is_features=layers.mean_pooled, extra_attrs=extra, write_rows=batch_size)
