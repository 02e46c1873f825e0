"""A synthetic cache with ImageNet ResNet-50 shapes, written through the normal cache writer.

Features imitate pooled post-ReLU activations: non-negative, about 40% exact zeros, heavy-tailed
per channel, with OOD samples a little weaker on average. Logits are features @ W.T + b exactly
as the contract requires. The numbers mean nothing; only shapes, sparsity and skew matter here.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from featcache.cache.writer import CacheWriter

IMAGENET_SPLITS = {  # name: (role, n)
    "id_train": ("id_train", 10_000),
    "id_val": ("id_val", 5_000),
    "id_test": ("id_test", 50_000),
    "inaturalist": ("ood", 10_000),
    "sun": ("ood", 10_000),
    "places": ("ood", 10_000),
    "textures": ("ood", 10_000),
}


def synthetic_features(rng, n, channel_scale, shift):
    z = rng.standard_normal((n, len(channel_scale)), dtype=np.float32) + np.float32(shift)
    return (channel_scale * np.maximum(z, 0) ** 1.5).astype(np.float32)


def make_synthetic_cache(path, splits=None, d: int = 2048, k: int = 1000, seed: int = 0, chunk: int = 5000,
                         overwrite: bool = False) -> Path:
    splits = splits or IMAGENET_SPLITS
    rng = np.random.default_rng(seed)
    weight = (rng.standard_normal((k, d), dtype=np.float32) * 0.02).astype(np.float32)
    bias = (rng.standard_normal(k, dtype=np.float32) * 0.01).astype(np.float32)
    channel_scale = rng.lognormal(0.0, 0.5, size=d).astype(np.float32)
    writer = CacheWriter(path, overwrite=overwrite)
    writer.open(dict(featcache_version="synthetic", torch_version="none", backbone="synthetic-resnet50",
                     checkpoint_sha256="0" * 64, feature_layer="flatten", prepool_layer="layer4", prepool_size="7x7",
                     precision="float32", device="none (synthetic)", preprocessing=json.dumps({"synthetic": seed})),
                weight, bias)
    for name, (role, n) in splits.items():
        split = writer.split(name, role=role, source=f"synthetic:{name}", n=n, dims={"D": d, "C": d, "K": k},
                             chan_mean_is_features=True)
        shift = -0.25 if role.startswith("id") else -0.45
        for start in range(split.rows_written, n, chunk):
            rows = min(chunk, n - start)
            x = synthetic_features(rng, rows, channel_scale, shift)
            chan_max = x * (1 + rng.exponential(1.0, size=x.shape).astype(np.float32))
            labels = rng.integers(0, k, rows) if role.startswith("id") else np.full(rows, -1)
            split.append({"features": x, "chan_max": chan_max, "chan_mean": x, "logits": x @ weight.T + bias,
                          "labels": labels.astype(np.int64), "ids": np.array([f"{name}/{i}" for i in range(start, start + rows)])})
        split.finish()
    return writer.finish()
