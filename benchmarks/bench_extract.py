"""Extraction benchmark: time per split and images per second, against a bare forward pass.

Runs the pipeline's extraction into a temporary cache, then, in the same run, times the model's
plain forward pass and the feature extractor on the same images, so the ratios are side by side.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--pipeline", default="pipelines/digits.yaml")
    parser.add_argument("--format", choices=["h5", "zarr"], default="h5")
    args = parser.parse_args()

    from featcache.config import load_manifest, load_pipeline
    from featcache.extract import runner
    from featcache.extract.datasets import load_dataset

    pipeline = load_pipeline(args.pipeline)
    manifest = load_manifest(pipeline.manifest_path)
    model, _ = runner.prepare_backbone(pipeline, manifest, progress=False)
    timings: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        runner.extract(pipeline, out=Path(tmp) / f"bench.{args.format}", progress=False, timings=timings)
        total = time.perf_counter() - start

    print(f"extraction of {pipeline.name} ({args.format}), torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"{'split':<28} {'images':>7} {'data s':>8} {'extract s':>9} {'img/s':>9}")
    for name, t in timings.items():
        print(f"{name:<28} {t['n']:>7} {t['load_s']:8.3f} {t['extract_s']:9.3f} {t['n'] / t['extract_s']:9.0f}")
    n_all = sum(t["n"] for t in timings.values())
    extract_s = sum(t["extract_s"] for t in timings.values())
    print(f"{'all':<28} {n_all:>7} {sum(t['load_s'] for t in timings.values()):8.3f} {extract_s:9.3f} "
          f"{n_all / extract_s:9.0f}   (whole command {total:.2f} s)")

    images = np.concatenate([load_dataset(n, manifest, pipeline.manifest_path).images for n in timings])
    batch = int(pipeline.extract.get("batch_size", 256))
    extractor = runner.FeatureExtractor(model, runner.find_layers(model))

    def throughput(fn):
        best = float("inf")
        for _ in range(3):
            t0 = time.perf_counter()
            with torch.no_grad():
                for i in range(0, len(images), batch):
                    fn(torch.from_numpy(images[i : i + batch]))
            best = min(best, time.perf_counter() - t0)
        return len(images) / best

    bare = throughput(model)
    feat = throughput(extractor)
    print(f"bare forward pass        {bare:9.0f} img/s")
    print(f"feature extractor        {feat:9.0f} img/s  = {feat / bare:.2f} x bare forward")
    print(f"extraction incl. writing {n_all / extract_s:9.0f} img/s  = {n_all / extract_s / bare:.2f} x bare forward")


if __name__ == "__main__":
    main()
