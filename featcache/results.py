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

    path = meta_path(results_csv)
    meta = {**meta, "featcache_version": featcache.__version__,
            "written_utc": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)
    return path


def meta_path(results_csv) -> Path:
    results_csv = Path(results_csv)
    return results_csv.with_name(results_csv.stem + ".meta.json")


def _header(path: Path) -> list[str] | None:
    try:
        with open(path, newline="", encoding="utf-8") as fh:
            return next(csv.reader([fh.readline(1 << 16)]), None)
    except (OSError, UnicodeDecodeError, csv.Error):
        return None


def _is_meta(path: Path, command: str) -> bool:
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return False
    # meta files from before "command" was recorded carry the fingerprint alone
    return isinstance(meta, dict) and "fingerprint" in meta and meta.get("command", command) == command


def guard_output(path, command: str, overwrite: bool = False, columns=COLUMNS) -> Path:
    """Refuse an output path that holds something other than `command`'s results, unless `overwrite`.

    A results file is recognised by its header (exactly `columns`); the meta file beside it must be
    one of `command`'s too. A cache, a pipeline or any other file is never replaced by accident.
    """
    path = Path(path)
    if path.is_dir():
        raise FeatcacheError(f"{path}: is a directory; --out takes a file name")
    if overwrite:
        return path
    if path.exists() and _header(path) != list(columns):
        raise FeatcacheError(f"{path}: exists and is not a {command} results file; not replacing it "
                             "(choose another --out, or pass --overwrite)")
    meta = meta_path(path)
    if meta.exists() and not _is_meta(meta, command):
        raise FeatcacheError(f"{meta}: exists and is not the meta file of {command} results; not replacing it "
                             "(choose another --out, or pass --overwrite)")
    return path
