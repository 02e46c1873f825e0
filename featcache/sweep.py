"""Stage two: replay every method and hyperparameter grid from a cache, through the linear head.

Reads only the cache and the pipeline's `sweep:` grid; never builds or runs a backbone.
"""

from __future__ import annotations

import csv
import itertools
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from featcache.cache.reader import Cache, Split, open_cache
from featcache.errors import FeatcacheError
from featcache.methods.base import Fit, Head, Method, SplitData, get_method
from featcache.metrics import SortedScores, accuracy, ood_metrics

COLUMNS = ("method", "params", "ood", "fpr95", "auroc", "aupr_in", "aupr_out", "id_acc")
METRICS = ("fpr95", "auroc", "aupr_in", "aupr_out")
MEAN = "mean"


@dataclass
class Replay:
    """Everything a sweep reads from one cache."""

    head: Head
    fit: Fit
    id_test: SplitData
    oods: list[SplitData]
    fingerprint: str
    id_val: SplitData | None = None
    pseudo_oods: list[SplitData] | None = None


def split_loader(cache: Cache, split: Split, read_clock: list | None = None):
    """Reads arrays of `split` on demand, refusing NaN or Inf with a count and the first sample id.

    Seconds spent reading are added to read_clock[0] when it is given.
    """
    import time

    def load(key):
        started = time.perf_counter()
        values = split.read(key)
        if read_clock is not None:
            read_clock[0] += time.perf_counter() - started
        # A NaN or Inf anywhere makes the float64 sum non-finite: one fast pass finds out, and only
        # then is the count and the first bad sample looked for.
        if values.dtype.kind == "f" and not np.isfinite(values.sum(dtype=np.float64)):
            bad = ~np.isfinite(values)
            if bad.any():
                rows = np.flatnonzero(bad.reshape(len(values), -1).any(axis=1))
                first = str(split.read("ids", slice(int(rows[0]), int(rows[0]) + 1))[0])
                raise FeatcacheError(f"{cache.path}: split {split.name!r} dataset {key!r} has {int(bad.sum())} "
                                     f"NaN or Inf values in {len(rows)} samples, first in sample {first!r}")
        return values

    return load


def split_data(cache: Cache, split: Split, width: int, read_clock: list | None = None) -> SplitData:
    if split.n == 0 or split.shape("features")[0] == 0:
        raise FeatcacheError(f"{cache.path}: split {split.name!r} is empty")
    d = split.shape("features")[1]
    if d != width:
        raise FeatcacheError(f"{cache.path}: split {split.name!r} features have width {d}, the head takes {width}")
    same = {"chan_mean": "features"} if split.attrs.get("chan_mean_is_features") else None
    return SplitData(split.name, loader=split_loader(cache, split, read_clock), same_as=same)


def load_replay(cache: Cache, *, with_selection: bool = False, read_clock: list | None = None) -> Replay:
    weight, bias = cache.head_weight, cache.head_bias
    if weight.ndim != 2 or bias.shape != (weight.shape[0],):
        raise FeatcacheError(f"{cache.path}: head weight {weight.shape} and bias {bias.shape} do not fit together")
    width = weight.shape[1]
    oods = cache.splits("ood")
    if not oods:
        raise FeatcacheError(f"{cache.path}: no split with role 'ood' to evaluate against")
    replay = Replay(
        head=Head(weight.astype(np.float32), bias.astype(np.float32)),
        fit=Fit(split_data(cache, cache.one_split("id_train"), width, read_clock)),
        id_test=split_data(cache, cache.one_split("id_test"), width, read_clock),
        oods=[split_data(cache, s, width, read_clock) for s in oods],
        fingerprint=cache.fingerprint,
    )
    if with_selection:
        replay.id_val = split_data(cache, cache.one_split("id_val"), width)
        replay.pseudo_oods = [split_data(cache, s, width) for s in cache.splits("pseudo_ood")]
    return replay


def expand_grid(grid: dict) -> list[tuple[Method, dict]]:
    """(method, resolved parameters) for every point of every method's grid, all checked up front."""
    configs = []
    for name, space in grid.items():
        method = get_method(str(name))
        space = space or {}
        if not isinstance(space, dict):
            raise FeatcacheError(f"sweep.{name}: expected a mapping of parameter to values, got {space!r}")
        keys = list(space)
        values = [v if isinstance(v, list) else [v] for v in space.values()]
        for key, vals in zip(keys, values):
            if not vals:
                raise FeatcacheError(f"sweep.{name}.{key}: empty list of values")
        seen = set()
        for combo in itertools.product(*values):
            params = method.resolve(dict(zip(keys, combo)))
            key = params_key(params)
            if key not in seen:
                seen.add(key)
                configs.append((method, params))
    return configs


def params_key(params: dict) -> str:
    """The `params` column: a JSON object with sorted keys."""
    return json.dumps(params, sort_keys=True)


def metric_rows(method_name: str, params: dict, id_scores, id_acc: float, ood_scores: dict) -> list[dict]:
    """One row per ood split (ID scores against that split's), then their mean."""
    rows = []
    try:
        id_sorted = SortedScores(id_scores)  # sorted once for every ood split
    except FeatcacheError as exc:
        raise FeatcacheError(f"{method_name} {params_key(params)} on the ID split: {exc}") from None
    for ood, scores in ood_scores.items():
        try:
            metrics = ood_metrics(id_sorted, scores)
        except FeatcacheError as exc:
            raise FeatcacheError(f"{method_name} {params_key(params)} on {ood}: {exc}") from None
        rows.append({"method": method_name, "params": params_key(params), "ood": ood, **metrics, "id_acc": id_acc})
    mean = {m: float(np.mean([r[m] for r in rows])) for m in METRICS}
    rows.append({"method": method_name, "params": params_key(params), "ood": MEAN, **mean, "id_acc": id_acc})
    return rows


def evaluate(method: Method, params: dict, replay: Replay, id_split: SplitData | None = None,
             ood_splits: list[SplitData] | None = None) -> list[dict]:
    """Metric rows for one configuration on already loaded splits (by default id_test and the oods)."""
    id_split = id_split or replay.id_test
    ood_splits = replay.oods if ood_splits is None else ood_splits
    out_id = method(id_split, replay.head, replay.fit, **params)
    ood_scores = {ood.name: method(ood, replay.head, replay.fit, **params).scores for ood in ood_splits}
    return metric_rows(method.name, params, out_id.scores, accuracy(out_id.predictions, id_split.labels), ood_scores)


def sweep_batch(cache_path, configs: list[tuple[str, dict]], storage_options: dict | None = None
                ) -> tuple[list[dict], dict]:
    """Metric rows of `configs` (method name, parameters), computed one split at a time.

    Each split's arrays and its memo of shared work are held only while every configuration of
    the batch is scored on it, so memory stays at about one split whatever the grid. A module-level
    function of plain arguments, so joblib can run batches in other processes. Returns the rows
    and timings: the batch's seconds in all, and those spent reading the cache.
    """
    import time

    started, read_clock = time.perf_counter(), [0.0]
    with open_cache(cache_path, storage_options=storage_options) as cache:
        replay = load_replay(cache, read_clock=read_clock)
        methods = [(get_method(name), params) for name, params in configs]
        outputs = [method(replay.id_test, replay.head, replay.fit, **params) for method, params in methods]
        id_scores = [out.scores for out in outputs]
        id_acc = [accuracy(out.predictions, replay.id_test.labels) for out in outputs]
        replay.id_test = None
        ood_scores: list[dict] = [{} for _ in methods]
        for i, ood in enumerate(replay.oods):
            for scores, (method, params) in zip(ood_scores, methods):
                scores[ood.name] = method(ood, replay.head, replay.fit, **params).scores
            replay.oods[i] = None  # release the split and its memo before the next one is read
    rows = []
    for (method, params), ids, acc, oods in zip(methods, id_scores, id_acc, ood_scores):
        rows.extend(metric_rows(method.name, params, ids, acc, oods))
    return rows, {"seconds": time.perf_counter() - started, "read_seconds": read_clock[0]}


class ProgressStore:
    """Finished configurations of a sweep, one JSON line each, keyed by cache fingerprint.

    Lets an interrupted or extended sweep compute only what is missing. Lines written for another
    fingerprint are never used: a store made for another cache is started afresh.
    """

    def __init__(self, results_csv: Path, fingerprint: str):
        self.path = results_csv.with_name(f".{results_csv.name}.progress.jsonl")
        self.fingerprint = fingerprint
        self.done: dict[tuple[str, str], list[dict]] = {}
        if self.path.exists():
            for line in self.path.read_text().splitlines():
                try:
                    entry = json.loads(line)
                except json.JSONDecodeError:
                    continue  # a line cut short by a kill: that configuration is simply redone
                if entry.get("fingerprint") == fingerprint:
                    self.done[(entry["method"], entry["params"])] = entry["rows"]

    def add(self, rows: list[dict], timings: dict | None = None) -> None:
        """Record finished configurations; their batch's `timings` are shared out equally."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        by_config: dict[tuple[str, str], list[dict]] = {}
        for row in rows:
            by_config.setdefault((row["method"], row["params"]), []).append(row)
        each = {k: v / max(len(by_config), 1) for k, v in (timings or {}).items()}
        with open(self.path, "a") as fh:
            for (method, params), config_rows in by_config.items():
                fh.write(json.dumps({"fingerprint": self.fingerprint, "method": method, "params": params,
                                     **each, "rows": config_rows}) + "\n")
                self.done[(method, params)] = config_rows
            fh.flush()
            os.fsync(fh.fileno())


def batches_by_method(configs: list[tuple[Method, dict]]) -> list[list[tuple[str, dict]]]:
    """Configurations grouped by method: the work they share (sorts, energies) is memoised per batch."""
    groups: dict[str, list] = {}
    for method, params in configs:
        groups.setdefault(method.name, []).append((method.name, params))
    return list(groups.values())


def write_csv(rows: list[dict], path: Path, columns=COLUMNS) -> Path:
    """Write atomically: a reader never sees half a results file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=columns)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: (repr(row[k]) if isinstance(row[k], float) else row[k]) for k in columns})
    os.replace(tmp, path)
    return path


def read_csv(path) -> list[dict]:
    """Rows of a results CSV with the metric columns as floats."""
    try:
        with open(path, newline="") as fh:
            rows = list(csv.DictReader(fh))
    except FileNotFoundError:
        raise FeatcacheError(f"{path}: no such results file") from None
    for row in rows:
        for key in METRICS + ("id_acc",):
            try:
                row[key] = float(row[key])
            except (KeyError, TypeError, ValueError):
                raise FeatcacheError(f"{path}: column {key!r} missing or not a number") from None
    return rows


def best_per_method(rows: list[dict]) -> list[dict]:
    """Per method, the mean row of its configuration with the lowest mean FPR95 (ties: higher AUROC).

    This is chosen on the test OOD data: an oracle, for reading a sweep, not for deployment.
    """
    best: dict[str, dict] = {}
    for row in rows:
        if row["ood"] != MEAN:
            continue
        current = best.get(row["method"])
        if current is None or (row["fpr95"], -row["auroc"]) < (current["fpr95"], -current["auroc"]):
            best[row["method"]] = row
    return list(best.values())


def format_table(rows: list[dict]) -> str:
    """Paper-style table (percent) of the best configuration per method, averaged over ood splits."""
    head = f"{'method':<14} {'params':<44} {'FPR95':>7} {'AUROC':>7} {'AUPR-In':>8} {'AUPR-Out':>8} {'ID acc':>7}"
    lines = [head, "-" * len(head)]
    for r in sorted(best_per_method(rows), key=lambda r: (r["fpr95"], -r["auroc"])):
        lines.append(f"{r['method']:<14} {r['params']:<44} {100 * r['fpr95']:7.2f} {100 * r['auroc']:7.2f} "
                     f"{100 * r['aupr_in']:8.2f} {100 * r['aupr_out']:8.2f} {100 * r['id_acc']:7.2f}")
    return "\n".join(lines)


def run_sweep(grid: dict, cache_path, out_path, *, jobs: int = 1, progress: bool = True,
              storage_options: dict | None = None, backend: str = "loky", scheduler: str | None = None) -> list[dict]:
    """Evaluate every configuration of `grid` on the cache and write the results CSV.

    Configurations already in the progress store for this cache's fingerprint are not computed
    again; with `jobs` > 1, batches of configurations run in parallel joblib workers, each reading
    the cache itself, with the same results as a serial run. With backend "dask" the batches go to
    the dask cluster at `scheduler` (or to a local one with `jobs` workers); its workers must be able
    to read `cache_path` (a shared file system, or a Zarr URL on an object store).
    """
    from contextlib import nullcontext

    from joblib import Parallel, delayed, parallel_config
    from tqdm import tqdm

    out_path = Path(out_path)
    configs = expand_grid(grid)  # bad names and values fail before any data is read
    with open_cache(cache_path, storage_options=storage_options) as cache:
        load_replay(cache)  # refuses a cache that cannot be swept before any work starts
        fingerprint = cache.fingerprint
    store = ProgressStore(out_path, fingerprint)
    todo = [(m, p) for m, p in configs if (m.name, params_key(p)) not in store.done]
    bar = tqdm(total=len(configs), initial=len(configs) - len(todo), desc="sweep", unit="config", disable=not progress)
    batches = batches_by_method(todo)
    client = dask_client(scheduler, jobs) if backend == "dask" else None
    try:
        with parallel_config(backend="dask") if client else nullcontext():
            if jobs == 1 and client is None:
                finished = (sweep_batch(cache_path, batch, storage_options) for batch in batches)
            else:
                finished = Parallel(n_jobs=-1 if client else jobs, return_as="generator")(
                    delayed(sweep_batch)(str(cache_path), batch, storage_options) for batch in batches)
            for rows, timings in finished:
                store.add(rows, timings)
                bar.update(len({(r["method"], r["params"]) for r in rows}))
    finally:
        if client is not None:
            client.close()
    bar.close()
    rows = [row for m, p in configs for row in store.done[(m.name, params_key(p))]]
    write_csv(rows, out_path)
    write_meta(out_path, fingerprint=fingerprint, cache=str(cache_path), configurations=len(configs))
    return rows


def dask_client(scheduler: str | None, jobs: int):
    """A dask.distributed client: to the scheduler at `scheduler`, or to a new local cluster."""
    try:
        from dask.distributed import Client, LocalCluster
    except ImportError:
        raise FeatcacheError("--backend dask needs dask.distributed: pip install 'featcache[dask]'") from None
    if scheduler:
        try:
            return Client(scheduler, timeout=30)
        except OSError as exc:
            raise FeatcacheError(f"--scheduler {scheduler}: cannot connect ({exc})") from None
    return Client(LocalCluster(n_workers=jobs, threads_per_worker=1, processes=True, dashboard_address=None))


def write_meta(results_csv: Path, **meta) -> Path:
    """`<results>.meta.json`: the fingerprint of the cache every row of the results came from."""
    from datetime import datetime, timezone

    import featcache

    path = results_csv.with_name(results_csv.stem + ".meta.json")
    meta = {**meta, "featcache_version": featcache.__version__,
            "written_utc": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)
    return path
