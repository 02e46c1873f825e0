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
from featcache.metrics import accuracy, ood_metrics

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


def split_loader(cache: Cache, split: Split):
    """Reads arrays of `split` on demand, refusing NaN or Inf with a count and the first sample id."""

    def load(key):
        values = split.read(key)
        if values.dtype.kind == "f":
            bad = ~np.isfinite(values)
            if bad.any():
                rows = np.flatnonzero(bad.reshape(len(values), -1).any(axis=1))
                first = split.read("ids", slice(int(rows[0]), int(rows[0]) + 1))[0]
                raise FeatcacheError(f"{cache.path}: split {split.name!r} dataset {key!r} has {int(bad.sum())} "
                                     f"NaN or Inf values in {len(rows)} samples, first in sample {first!r}")
        return values

    return load


def split_data(cache: Cache, split: Split, width: int) -> SplitData:
    if split.n == 0 or split.shape("features")[0] == 0:
        raise FeatcacheError(f"{cache.path}: split {split.name!r} is empty")
    d = split.shape("features")[1]
    if d != width:
        raise FeatcacheError(f"{cache.path}: split {split.name!r} features have width {d}, the head takes {width}")
    same = {"chan_mean": "features"} if split.attrs.get("chan_mean_is_features") else None
    return SplitData(split.name, loader=split_loader(cache, split), same_as=same)


def load_replay(cache: Cache, *, with_selection: bool = False) -> Replay:
    weight, bias = cache.head_weight, cache.head_bias
    if weight.ndim != 2 or bias.shape != (weight.shape[0],):
        raise FeatcacheError(f"{cache.path}: head weight {weight.shape} and bias {bias.shape} do not fit together")
    width = weight.shape[1]
    oods = cache.splits("ood")
    if not oods:
        raise FeatcacheError(f"{cache.path}: no split with role 'ood' to evaluate against")
    replay = Replay(
        head=Head(weight.astype(np.float32), bias.astype(np.float32)),
        fit=Fit(split_data(cache, cache.one_split("id_train"), width)),
        id_test=split_data(cache, cache.one_split("id_test"), width),
        oods=[split_data(cache, s, width) for s in oods],
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


def evaluate(method: Method, params: dict, replay: Replay, id_split: SplitData | None = None,
             ood_splits: list[SplitData] | None = None) -> list[dict]:
    """Metric rows for one configuration: one per ood split, then their mean."""
    id_split = id_split or replay.id_test
    ood_splits = replay.oods if ood_splits is None else ood_splits
    out_id = method(id_split, replay.head, replay.fit, **params)
    id_acc = accuracy(out_id.predictions, id_split.labels)
    rows = []
    for ood in ood_splits:
        scores = method(ood, replay.head, replay.fit, **params).scores
        try:
            metrics = ood_metrics(out_id.scores, scores)
        except FeatcacheError as exc:
            raise FeatcacheError(f"{method.name} {params_key(params)} on {ood.name}: {exc}") from None
        rows.append({"method": method.name, "params": params_key(params), "ood": ood.name, **metrics, "id_acc": id_acc})
    mean = {m: float(np.mean([r[m] for r in rows])) for m in METRICS}
    rows.append({"method": method.name, "params": params_key(params), "ood": MEAN, **mean, "id_acc": id_acc})
    return rows


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


def run_sweep(grid: dict, cache_path, out_path, *, progress: bool = True) -> list[dict]:
    """Evaluate every configuration of `grid` on the cache and write the results CSV."""
    from tqdm import tqdm

    configs = expand_grid(grid)  # bad names and values fail before any data is read
    with open_cache(cache_path) as cache:
        replay = load_replay(cache)
        rows = []
        for method, params in tqdm(configs, desc="sweep", unit="config", disable=not progress):
            rows.extend(evaluate(method, params, replay))
    write_csv(rows, Path(out_path))
    return rows
