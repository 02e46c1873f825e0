"""Sweep benchmark at ImageNet ResNet-50 scale, every figure measured side by side in one run.

1. Creates (or reuses) cache/bench_imagenet.h5: id_test 50,000, four ood splits of 10,000,
   id_train 10,000, id_val 5,000, D = C = 2048, K = 1000 (benchmarks/synthetic.py).
2. Times one dense float32 product of all evaluated samples (id_test and ood, 90,000) with the head:
   the unit of every figure, timed again after each grid; a grid counts in the mean of the units
   timed just before and just after it (the machine's speed drifts by several % over minutes: one
   unit timed at the start differed from the next runs' by 8% while the grids' seconds did not).
3. For each of three grids (the benchmark's 100 configurations, another mix, and 100 configurations
   shaped as the issue's own check describes its grid): counts its floor,
   the distinct dense products its configurations need (featcache.grid.floor_products), times one
   verified read of the arrays it reads, then sweeps it in a fresh process with an empty progress
   store, timing it and reading the process's own peak resident memory.
4. Times what one more configuration costs once the shared work is done (energy at a new T, a w of
   nap+energy, a k of RG, an alpha of rg_add): five new values of each, each the fastest of three
   repeats; the slowest of the five is what the target is held to.
5. Times checksum verification, and a ResNet-50 forward pass on this CPU scaled to the cache's
   105,000 images: what re-running the backbone per configuration would cost.
"""

from __future__ import annotations

import argparse
import os
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
# A second mix (issue 16, item 3): ReAct + ASH combinations, GradNorm, DICE with nap, many ASH-B values.
GRID2 = {
    "ash_b": {"p": [40, 50, 55, 60, 65, 70, 75, 80, 85, 88, 90, 92, 95, 97]},
    "react+ash_s": {"clip": [0.5, 1.0, 1.5], "p": [85, 90, 95]},
    "react+ash_p": {"clip": [1.0], "p": [85, 90, 95]},
    "react+ash_b": {"clip": [1.0], "p": [65, 90]},
    "react": {"percentile": [85, 90, 95]},
    "nap+react": {"percentile": [90], "w": [0.4, 0.6, 0.8]},
    "dice": {"p": [60, 70, 80, 90]},
    "nap+dice": {"p": [70], "w": [0.3, 0.5, 0.7]},
    "ash_s": {"p": [85, 90, 95]},
    "nap+ash_s": {"p": [90], "w": [0.5, 0.8]},
    "gradnorm": {"T": [0.5, 1, 2, 5]},
    "scale": {"p": [80, 85, 90]},
    "msp": {}, "maxlogit": {}, "energy": {"T": [1]},
}
# A third, shaped as the issue describes its own check's grid (its values are ours): ASH-P/B/S ten p each,
# ReAct eight percentiles, react+ash_s six, DICE eight, SCALE eight, energy five T, GradNorm three T,
# RG twelve, RG-add eight, nap+energy nine w, NAP, MSP, MaxLogit.
GRID3 = {
    "ash_p": {"p": [40, 50, 60, 65, 70, 75, 80, 85, 90, 95]},
    "ash_b": {"p": [40, 50, 60, 65, 70, 75, 80, 85, 90, 95]},
    "ash_s": {"p": [40, 50, 60, 65, 70, 75, 80, 85, 90, 95]},
    "react": {"percentile": [70, 75, 80, 85, 90, 95, 97, 99]},
    "react+ash_s": {"clip": [1.0, 1.5], "p": [85, 90, 95]},
    "dice": {"p": [30, 40, 50, 60, 70, 80, 90, 95]},
    "scale": {"p": [60, 65, 70, 75, 80, 85, 90, 95]},
    "energy": {"T": [0.5, 1, 2, 5, 10]},
    "gradnorm": {"T": [0.5, 1, 2]},
    "rg": {"k": [0.5, 1.0, 2.0], "T": [0.5, 1, 2, 5]},
    "rg_add": {"k": [0.5, 1.0], "alpha_scale": [0.5, 0.8, 1.0, 1.2]},
    "nap+energy": {"w": [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9]},
    "nap": {}, "msp": {}, "maxlogit": {},
}
GRIDS = {"grid 1 (the benchmark's)": (GRID, "<= 40 products"), "grid 2 (another mix)": (GRID2, "<= floor + 25%"),
         "grid 3 (shaped as the issue's check)": (GRID3, "<= floor + 25%")}


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


def product_inputs(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """The evaluated samples' features (id_test and the ood splits, stacked) and the head's weight."""
    import featcache

    cache = featcache.open_cache(path)
    splits = [cache.one_split("id_test")] + cache.splits("ood")
    return np.concatenate([s["features"] for s in splits]), cache.head_weight


def time_product(x: np.ndarray, w: np.ndarray) -> tuple[float, float]:
    """(seconds, CPU seconds) of the fastest of three dense float32 products of the evaluated
    samples with the head. CPU seconds (all threads) are the steadier unit on a machine shared with
    other work: a wait for a core counts in seconds, not in CPU seconds."""
    best, best_cpu = float("inf"), float("inf")
    for _ in range(3):
        t0, c0 = time.perf_counter(), time.process_time()
        x @ w.T
        best, best_cpu = min(best, time.perf_counter() - t0), min(best_cpu, time.process_time() - c0)
    return best, best_cpu


CHILD = """
import resource, sys
from featcache.cli import main


def own_peak_bytes():
    # Linux's ru_maxrss starts from the parent's resident size at the fork (it survives the exec), so
    # a benchmark holding a cache's worth of memory would be read as the sweep's peak; VmHWM is this
    # process's own high-water mark
    try:
        with open("/proc/self/status") as status:
            return next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmHWM:"))
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


try:
    main(sys.argv[1:])
finally:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    print(usage.ru_utime + usage.ru_stime, own_peak_bytes(), file=sys.stderr)
"""


def run_grid(path: Path, grid: dict) -> tuple[float, float, float]:
    """(seconds, CPU seconds, peak resident GB) of a sweep of `grid` in a fresh process with an empty
    progress store."""
    with tempfile.TemporaryDirectory() as tmp:
        pipeline = Path(tmp) / "bench.yaml"
        pipeline.write_text(yaml.safe_dump({"name": "bench", "cache": str(path), "sweep": grid}))
        out = Path(tmp) / "sweep.csv"
        t0 = time.perf_counter()
        done = subprocess.run([sys.executable, "-c", CHILD, "sweep", str(pipeline), "--out", str(out), "--quiet"],
                              check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        wall = time.perf_counter() - t0
    cpu, peak = done.stderr.strip().splitlines()[-1].split()
    return wall, float(cpu), int(peak) / 1e9


def arrays_read(grid: dict) -> set[str]:
    """The float arrays a sweep of `grid` reads (chan_mean is the features in this cache)."""
    names = set(grid)
    keys = {"features", "logits"}
    if any(n == "nap" or n.startswith("nap+") for n in names):
        keys.add("chan_max")
    return keys


def time_read_once(path: Path, keys: set[str]) -> float:
    """Seconds to read, verified as every command reads, the arrays `keys` of every split but id_val once."""
    import featcache

    total = 0.0
    with featcache.open_cache(path) as cache:
        for split in cache.splits():
            if split.role == "id_val":
                continue
            for key in sorted(keys):
                t0 = time.perf_counter()
                split.read(key)
                total += time.perf_counter() - t0
    return total


def time_marginal(path: Path, repeats: int = 3) -> dict[str, list[float]]:
    """Seconds one more configuration costs once its neighbours' shared work is done (issue 16, item
    4), for five new values of each: energy at a new T, nap+energy at a new w, RG at a new k, rg_add at
    a new alpha; each evaluated on id_test and the ood splits with its metrics, as a sweep does. Each
    configuration is timed `repeats` times, what it memoised forgotten in between, and its fastest
    kept: the unit product too is the fastest of three repeats. The repeats take turns over the
    values, so that a value's repeats are spread out in time, as the unit's are."""
    import featcache
    from featcache.methods.registry import get_method
    from featcache.replay import evaluate, load_replay

    out = {}
    with featcache.open_cache(path) as cache:
        replay = load_replay(cache)
        warm = [("energy", {"T": 1.0}), ("nap+energy", {"w": 0.5}), ("rg", {"k": 1.0, "T": 1.0}),
                ("rg_add", {"k": 1.0, "alpha_scale": 1.0})]
        for name, params in warm:  # reads the arrays and does the shared work (nap score, clipped sums)
            method = get_method(name)
            evaluate(method, method.resolve(params), replay)
        holders = [replay.id_test, *replay.oods, replay.fit.data]  # every split that memoises (the fit its id_train)
        new = {"energy, a new T": ("energy", [{"T": T} for T in (7.0, 7.5, 8.0, 8.5, 9.0)]),
               "nap+energy, a new w": ("nap+energy", [{"w": w} for w in (0.33, 0.37, 0.41, 0.45, 0.49)]),
               "rg, a new k": ("rg", [{"k": k, "T": 1.0} for k in (0.6, 0.65, 0.7, 0.75, 0.8)]),
               "rg_add, a new alpha": ("rg_add", [{"k": 1.0, "alpha_scale": a}
                                                   for a in (0.45, 0.55, 0.65, 0.75, 0.85)])}
        for label, (name, values) in new.items():
            method = get_method(name)
            seconds = [[] for _ in values]
            # the repeats go round the five values, so that a few tenths of a second of noise from
            # elsewhere on the machine meet one repeat of a value, as they meet one of the unit's
            for _ in range(repeats):
                for params, times in zip(values, seconds):
                    params = method.resolve(params)
                    known = [set(holder._memo) for holder in holders]
                    t0 = time.perf_counter()
                    evaluate(method, params, replay)
                    times.append(time.perf_counter() - t0)
                    for holder, keys in zip(holders, known):  # the next repeat is a new configuration again
                        for key in set(holder._memo) - keys:
                            del holder._memo[key]
            out[label] = [min(times) for times in seconds]
    return out


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
    from featcache.grid import expand_grid, floor_products

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--cache", default="cache/bench_imagenet.h5")
    parser.add_argument("--skip-resnet", action="store_true", help="Do not time the ResNet-50 forward pass.")
    args = parser.parse_args()
    path = reuse_or_make(Path(args.cache))
    # every figure under the memory setting `featcache sweep` runs with (the grids' own processes set it)
    from featcache.allocator import keep_freed_memory

    keep_freed_memory()

    x, w = product_inputs(path)
    before = time_product(x, w)
    print(f"\nCPU cores: {os.cpu_count()}; one float32 product {x.shape[0]}x{x.shape[1]} @ {x.shape[1]}x{w.shape[0]}: "
          f"{before[0]:.3f} s, {before[1]:.3f} CPU s  (= 1 product; timed again after each grid, and each grid "
          "counted in the mean of the products timed just before and just after it: the machine's speed drifts "
          "by several % over minutes, the unit with it)")

    walls = {}
    for label, (grid, target) in GRIDS.items():
        configs = expand_grid(grid)
        floor = floor_products(configs)
        read_seconds = time_read_once(path, arrays_read(grid))
        wall, cpu, peak_gb = run_grid(path, grid)
        after = time_product(x, w)
        product, product_cpu = (before[0] + after[0]) / 2, (before[1] + after[1]) / 2
        read = read_seconds / product
        walls[label] = (wall, len(configs))
        measured = wall / product
        print(f"\n{label}: {len(configs)} configurations in {wall:.1f} s = {measured:.1f} products (target {target}; "
              f"fresh process, empty progress store, cache reads verified); in CPU time {cpu:.1f} s = "
              f"{cpu / product_cpu:.1f} products")
        print(f"  one product timed just before and just after it: {before[0]:.3f} and {after[0]:.3f} s "
              f"({wall / before[0]:.1f} and {wall / after[0]:.1f} products against each)")
        print(f"  floor: {floor} distinct dense products; reading the cache once: {read:.1f} products; "
              f"floor + one read = {floor + read:.1f}")
        print(f"  measured / floor = {measured / floor:.2f} ({100 * (measured / floor - 1):+.0f}%); "
              f"measured / (floor + one read) = {measured / (floor + read):.2f} "
              f"({100 * (measured / (floor + read) - 1):+.0f}%)")
        print(f"  peak resident memory of the sweep process: {peak_gb:.2f} GB (target <= 2)")
        before = after
    product = before[0]  # the unit timed after the last grid, next to what follows

    print("\none more configuration, its neighbours' shared work done (target <= 0.05 products each): the "
          "slowest of five new values, each the fastest of three repeats as the unit is, and their median")
    for label, seconds in time_marginal(path).items():
        ratios = np.array(seconds) / product
        print(f"  {label:<22} {ratios.max():.3f} products (median {np.median(ratios):.3f}, fastest {ratios.min():.3f})")

    raw, verified = time_verification(path)
    share = max(verified - raw, 0.0) / verified  # the part of a verified read that is checking
    print(f"\nchecksum verification: reading every array once takes {raw:.1f} s raw, {verified:.1f} s verified "
          f"(checking {100 * share:.0f}% of a verified read)")

    if not args.skip_resnet:
        ips = time_resnet50()
        n_images = sum(n for _, n in IMAGENET_SPLITS.values())
        per_config = n_images / ips
        wall, n = walls["grid 1 (the benchmark's)"]
        print(f"\nResNet-50 forward on this CPU: {ips:.1f} images/s -> {per_config / 3600:.2f} h to re-run "
              f"{n_images:,} images per configuration")
        print(f"re-inference for grid 1: {n * per_config / 3600:.1f} h; featcache: {wall:.0f} s; "
              f"speedup {n * per_config / wall:,.0f}x")


if __name__ == "__main__":
    main()
