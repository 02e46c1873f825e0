"""Extraction benchmark: time per split and images per second, against a bare forward pass.

Default: the digits pipeline. Runs its extraction into a temporary cache, then, in the same run,
times the model's plain forward pass and the feature extractor on the same images.

--model NAME (a torchvision classifier, random weights): writes --images random 256x256 JPEGs,
then times, on the same files with the same DataLoader, a bare forward pass (decode, preprocess,
model) against the whole extraction (the same, plus feature extraction, checks and writing).
--device cuda times it on a GPU.

Both also time pseudo-OOD extraction, the same backbone on the same files under the fifteen
ImageNet-C corruptions (corrupting between crop and normalisation, in the loader workers): the
digits pipeline's own pseudo_ood splits, and for --model the `pseudo_ood:` shorthand over the ID
folder, as many images in all as the clean run (--images / 2 / 15 per corruption, at least 1).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch


def bench_torchvision(model_name: str, n_images: int, device: str, batch: int, workers: int, amp: str | None):
    import yaml
    from PIL import Image

    from featcache.config import load_manifest, load_pipeline
    from featcache.extract import runner
    from featcache.extract.datasets import load_dataset

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        rng = np.random.default_rng(0)
        for i in range(n_images):
            folder = tmp / "images" / ("id" if i % 2 else "ood")
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(rng.integers(0, 256, (256, 256, 3), dtype=np.uint8)).save(folder / f"{i:05d}.jpg", quality=90)
        entry = lambda role, sub: {"source": {"path": str(tmp / "images" / sub), "format": "folder"},  # noqa: E731
                                   "transform": {"preset": "imagenet"}, "role": role}
        manifest = {"datasets": {"a": entry("id_train", "id"), "b": entry("id_val", "id"), "c": entry("id_test", "id"),
                                 "d": entry("ood", "ood")}}
        (tmp / "m.yaml").write_text(yaml.safe_dump(manifest))
        (tmp / "p.yaml").write_text(yaml.safe_dump({
            "name": "bench", "manifest": str(tmp / "m.yaml"), "cache": str(tmp / "bench.h5"),
            "backbone": {"name": model_name, "checkpoint": "random"}, "splits": ["c", "d"],
            "extract": {"batch_size": batch, "workers": workers, "device": device, "amp": amp}}))
        pipeline = load_pipeline(tmp / "p.yaml")
        model, _ = runner.prepare_backbone(pipeline, load_manifest(tmp / "m.yaml"), progress=False)
        model = model.to(device)
        datasets = [load_dataset(n, load_manifest(tmp / "m.yaml"), "m") for n in ("c", "d")]

        def bare():
            t0 = time.perf_counter()
            with torch.no_grad(), torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=amp is not None):
                for data in datasets:
                    for _, _, images in runner.batches(data, 0, len(data), batch, workers, pin_memory=device != "cpu"):
                        model(images.to(device, non_blocking=True)).float().cpu()
            return time.perf_counter() - t0

        bare()  # warm-up: caches, kernels
        bare_s = bare()
        # the splits must hold id_train and id_val too for a valid cache: time only c and d
        spec = yaml.safe_load((tmp / "p.yaml").read_text())
        spec["splits"] = ["a", "b", "c", "d"]
        (tmp / "p.yaml").write_text(yaml.safe_dump(spec))
        timings: dict = {}
        runner.extract(load_pipeline(tmp / "p.yaml"), progress=False, timings=timings)
        extract_s = timings["c"]["extract_s"] + timings["d"]["extract_s"]
        n = len(datasets[0]) + len(datasets[1])
        print(f"{model_name} on {device} ({amp or 'fp32'}), {n} images 256x256 JPEG -> 224 crop, batch {batch}, "
              f"{workers} loader workers, torch {torch.__version__}")
        print(f"bare forward (decode + preprocess + model): {n / bare_s:8.1f} img/s")
        print(f"extraction (same + features, maps, checks, writing): {n / extract_s:8.1f} img/s "
              f"= {bare_s / extract_s:.2f} x bare forward (target >= 0.90)")

        # the same files again, corrupted: one pseudo-OOD split per corruption over the ID folder
        per = max(1, len(datasets[0]) // 15)
        spec["pseudo_ood"] = {"of": "b", "corruptions": "all", "severity": 3, "per_corruption": per}
        spec["cache"] = str(tmp / "bench_corrupt.h5")
        (tmp / "p.yaml").write_text(yaml.safe_dump(spec))
        timings = {}
        runner.extract(load_pipeline(tmp / "p.yaml"), progress=False, timings=timings)
        corrupted = {k: v for k, v in timings.items() if k.startswith("b_c_")}
        n_c, s_c = sum(t["n"] for t in corrupted.values()), sum(t["extract_s"] for t in corrupted.values())
        print(f"extraction under the 15 ImageNet-C corruptions (severity 3, {per} images each, same files): "
              f"{n_c / s_c:8.1f} img/s = {(n_c / s_c) / (n / extract_s):.2f} x without corruption")
        print("  per corruption, img/s: " + ", ".join(f"{k[4:]} {t['n'] / t['extract_s']:.1f}"
                                                      for k, t in corrupted.items()))


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--pipeline", default="pipelines/digits.yaml")
    parser.add_argument("--format", choices=["h5", "zarr"], default="h5")
    parser.add_argument("--model", default=None, help="a torchvision classifier to benchmark instead of the pipeline")
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--amp", choices=["bf16", "fp16"], default=None)
    args = parser.parse_args()
    if args.model:
        return bench_torchvision(args.model, args.images, args.device, args.batch_size, args.workers, args.amp)

    from featcache.config import load_pipeline
    from featcache.extract import runner
    from featcache.extract.datasets import load_dataset

    pipeline = load_pipeline(args.pipeline)
    manifest = pipeline.manifest()
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
    roles = {name: manifest[name]["role"] for name in timings}
    for label, names in (("without corruption", [k for k in timings if roles[k] != "pseudo_ood"]),
                         ("with corruption (pseudo_ood splits)", [k for k in timings if roles[k] == "pseudo_ood"])):
        if names:
            n = sum(timings[k]["n"] for k in names)
            print(f"{label:<36} {n:>7} images {n / sum(timings[k]['extract_s'] for k in names):9.0f} img/s")

    # the clean splits' images in memory, for the forward-pass comparison
    images = np.concatenate([load_dataset(n, manifest, pipeline.manifest_path).images for n in timings
                             if roles[n] != "pseudo_ood"])
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
    clean = [k for k in timings if roles[k] != "pseudo_ood"]
    clean_rate = sum(timings[k]["n"] for k in clean) / sum(timings[k]["extract_s"] for k in clean)
    print(f"extraction incl. writing {clean_rate:9.0f} img/s  = {clean_rate / bare:.2f} x bare forward (clean splits)")


if __name__ == "__main__":
    main()
