"""Sweep benchmark at ImageNet ResNet-50 scale, every figure measured side by side in one run.

1. Creates (or reuses) cache/bench_imagenet.h5: id_test 50,000, four ood splits of 10,000,
   id_train 10,000, id_val 5,000, D = C = 2048, K = 1000 (benchmarks/synthetic.py).
2. Times one dense float32 product of all evaluated samples (id_test and ood, 90,000) with the head.
3. Sweeps a grid of 100 configurations in a child process, timing it and reading its peak
   resident memory; each method's time per configuration comes from the sweep's own records.
4. Times a ResNet-50 forward pass on this CPU and scales it to the cache's 105,000 images: what
   re-running the backbone per configuration would cost.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from synthetic import IMAGENET_SPLITS, make_synthetic_cache  # noqa: E402

GRID = {
    "ash_p": {"p": [50, 60, 65, 70, 75, 80, 85, 90, 95, 97]},
    "ash_b": {"p": [50, 60, 65, 70, 75, 80, 85, 90, 95, 97]},
    "ash_s": {"p": [50, 60, 65, 70, 75, 80, 85, 90, 95, 97]},
    "react": {"percentile": [80, 85, 90, 95, 97, 99]},
    "scale": {"p": [50, 60, 65, 70, 75, 80, 85, 90, 95, 97]},
    "dice": {"p": [50, 60, 70, 80, 90, 95]},
    "energy": {"T": [0.5, 1, 1.5, 2, 3, 5, 10, 20]},
    "rg": {"k": [0.3, 0.5, 0.7, 1.0], "T": [1, 2, 5, 10]},
    "rg_add": {"k": [0.5, 1.0], "alpha_scale": [0.3, 0.5, 0.7, 0.9, 1.0, 1.2]},
    "nap+energy": {"w": [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.75, 0.8, 0.85, 0.9, 0.95]},
}
CHANGES_LOGITS = {"ash_p", "ash_b", "ash_s", "react", "scale", "dice"}


def reuse_or_make(path: Path) -> Path:
    import featcache
    from featcache.errors import FeatcacheError

    if path.exists():
        try:
            cache = featcache.open_cache(path)
            if all(s.complete for s in cache.splits(allow_incomplete=True)) and len(cache.split_names) == len(IMAGENET_SPLITS):
                print(f"reusing {path}")
                return path
        except FeatcacheError:
            pass
        raise SystemExit(f"{path} exists but is not a complete benchmark cache; delete it to rebuild")
    print(f"creating {path} (about 2 GB) ...", flush=True)
    t0 = time.perf_counter()
    make_synthetic_cache(path)
    print(f"  written in {time.perf_counter() - t0:.1f} s")
    return path


def time_product(path: Path) -> tuple[float, tuple]:
    import featcache

    cache = featcache.open_cache(path)
    splits = [cache.one_split("id_test")] + cache.splits("ood")
    x = np.concatenate([s["features"] for s in splits])
    w = cache.head_weight
    best = float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        x @ w.T
        best = min(best, time.perf_counter() - t0)
    return best, (x.shape[0], x.shape[1], w.shape[0])


def run_grid(path: Path) -> tuple[float, float, dict]:
    with tempfile.TemporaryDirectory() as tmp:
        pipeline = Path(tmp) / "bench.yaml"
        pipeline.write_text(yaml.safe_dump({"name": "bench", "cache": str(path), "sweep": GRID}))
        out = Path(tmp) / "sweep.csv"
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-m", "featcache.cli", "sweep", str(pipeline), "--out", str(out), "--quiet"],
                       check=True, stdout=subprocess.DEVNULL)
        wall = time.perf_counter() - t0
        peak_gb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024 / 1e9
        per_method: dict[str, list[tuple[float, float]]] = {}
        for line in out.with_name(f".{out.name}.progress.jsonl").read_text().splitlines():
            entry = json.loads(line)
            per_method.setdefault(entry["method"], []).append((entry["seconds"], entry["read_seconds"]))
    return wall, peak_gb, per_method


def time_verification(path: Path) -> tuple[float, float]:
    """Seconds to read every float array of every split once: raw (the store alone) and as every command
    reads it (hashed while it streams in and checked against its stored checksum)."""
    import featcache

    raw = verified = 0.0
    with featcache.open_cache(path) as cache:
        for split in cache.splits():
            for key in ("features", "chan_max", "chan_mean", "logits"):
                t0 = time.perf_counter()
                cache.store.read(f"{split.group}/{key}")
                t1 = time.perf_counter()
                split.read(key)
                raw, verified = raw + t1 - t0, verified + time.perf_counter() - t1
    return raw, verified


def time_resnet50(n_images: int = 256, batch: int = 32) -> float:
    import torch
    import torchvision

    model = torchvision.models.resnet50(weights=None).eval()
    x = torch.randn(batch, 3, 224, 224)
    with torch.no_grad():
        model(x)  # warm-up
        t0 = time.perf_counter()
        for _ in range(n_images // batch):
            model(x)
    return (n_images // batch) * batch / (time.perf_counter() - t0)


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--cache", default="cache/bench_imagenet.h5")
    parser.add_argument("--skip-resnet", action="store_true", help="Do not time the ResNet-50 forward pass.")
    args = parser.parse_args()
    path = reuse_or_make(Path(args.cache))

    product, shape = time_product(path)
    print(f"\nCPU cores: {os.cpu_count()}; one float32 product {shape[0]}x{shape[1]} @ {shape[1]}x{shape[2]}: "
          f"{product:.3f} s  (= 1 product)")

    wall, peak_gb, per_method = run_grid(path)
    n = sum(len(v) for v in per_method.values())
    print("\nper configuration, in products: compute alone (reading the cache excluded), and with the")
    print("batch's reading of the cache shared out over its configurations")
    print(f"{'method':<12} {'configs':>7} {'compute':>9} {'target':>8} {'':>4} {'with reading':>13}")
    for method, timings in per_method.items():
        total = float(np.mean([t for t, _ in timings]))
        compute = float(np.mean([t - r for t, r in timings]))
        target = 1.5 if method in CHANGES_LOGITS else 0.1
        flag = "ok" if compute / product <= target else "OVER"
        print(f"{method:<12} {len(timings):>7} {compute / product:9.2f} {'<= ' + str(target):>8} {flag:>4} "
              f"{total / product:13.2f}")
    print(f"\nwhole grid: {n} configurations in {wall:.1f} s = {wall / product:.1f} products "
          f"(target <= 150), {wall / n:.2f} s per configuration on average (process start and cache opening included)")
    print(f"peak resident memory of the sweep process: {peak_gb:.2f} GB (target <= 4)")

    raw, verified = time_verification(path)
    share = max(verified - raw, 0.0) / verified  # the part of a verified read that is checking
    reading = sum(r for timings in per_method.values() for _, r in timings)
    print(f"\nchecksum verification: reading every array once takes {raw:.1f} s raw, {verified:.1f} s verified; "
          f"the sweep read for {reading:.1f} s, of which about {share * reading:.1f} s checking = "
          f"{100 * share * reading / wall:.1f}% of the sweep (target < 10%)")

    if not args.skip_resnet:
        ips = time_resnet50()
        n_images = sum(n for _, n in IMAGENET_SPLITS.values())
        per_config = n_images / ips
        print(f"\nResNet-50 forward on this CPU: {ips:.1f} images/s -> {per_config / 3600:.2f} h to re-run "
              f"{n_images:,} images per configuration")
        print(f"re-inference for the grid: {n * per_config / 3600:.1f} h; featcache: {wall:.0f} s; "
              f"speedup {n * per_config / wall:,.0f}x")


if __name__ == "__main__":
    main()
