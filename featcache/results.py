"""Results files: the sweep and selection CSVs and the meta file beside them."""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

from featcache.errors import FeatcacheError


COLUMNS = ("method", "params", "ood", "fpr95", "auroc", "aupr_in", "aupr_out", "id_acc")


METRICS = ("fpr95", "auroc", "aupr_in", "aupr_out")


MEAN = "mean"

# Rows of a group of ood splits (OpenOOD v1.5's near- and far-OOD): ood = "group:<label>"
GROUP_PREFIX = "group:"


def with_group_rows(rows: list[dict], groups: dict[str, str]) -> list[dict]:
    """`rows` (per configuration: a row per ood split, then its `mean` row) with, before each mean
    row, one row per group of splits: ood = "group:<label>", each metric the mean over the group's
    splits (other columns as in the mean row). Groups in the order their first split appears."""
    if not groups:
        return rows
    out, pending = [], []
    for row in rows:
        if row["ood"] != MEAN:
            pending.append(row)
            out.append(row)
            continue
        labels = list(dict.fromkeys(groups[r["ood"]] for r in pending if r["ood"] in groups))
        for label in labels:
            members = [r for r in pending if groups.get(r["ood"]) == label]
            out.append({**row, "ood": GROUP_PREFIX + label,
                        **{m: float(sum(r[m] for r in members) / len(members)) for m in METRICS}})
        out.append(row)
        pending = []
    return out


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
