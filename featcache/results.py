"""Results files: the sweep and selection CSVs and the meta file beside them."""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

from featcache.errors import FeatcacheError, NextStep


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


def made_by(path) -> str:
    """The command that writes a results file: `featcache select` for selection*.csv, else sweep."""
    return "featcache select PIPELINE" if Path(path).name.startswith("selection") else "featcache sweep PIPELINE"


def read_csv(path) -> list[dict]:
    """Rows of a results CSV with the metric columns as floats. A missing file: NextStep naming the
    command that writes it (`made_by`)."""
    try:
        with open(path, newline="") as fh:
            rows = list(csv.DictReader(fh))
    except FileNotFoundError:
        raise NextStep(f"{path}: no such results file", made_by(path)) from None
    for row in rows:
        for key in METRICS + ("id_acc",):
            try:
                row[key] = float(row[key])
            except (KeyError, TypeError, ValueError):
                raise FeatcacheError(f"{path}: column {key!r} missing or not a number") from None
    return rows


def write_meta(results_csv: Path, *, meta_file: Path | None = None, **meta) -> Path:
    """`<results>.meta.json` (or `meta_file`): where every row of the results came from. Callers give
    the cache's `fingerprint` (and `cache_provenance` of it), the `pipeline` name where there is one,
    and their own details; the featcache version and the UTC date are added here."""
    from datetime import datetime, timezone

    import featcache

    path = Path(meta_file) if meta_file is not None else meta_path(results_csv)
    meta = {**meta, "featcache_version": featcache.__version__,
            "written_utc": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)
    return path


def meta_path(results_csv) -> Path:
    results_csv = Path(results_csv)
    return results_csv.with_name(results_csv.stem + ".meta.json")


def cache_provenance(cache) -> dict:
    """What a results meta file records of the cache beside its fingerprint: the backbone and the
    checkpoint's sha256, from the cache's root attributes (None where the cache has none)."""
    return {"fingerprint": cache.fingerprint, "backbone": cache.attrs.get("backbone"),
            "checkpoint_sha256": cache.attrs.get("checkpoint_sha256")}


def read_meta(results_csv) -> dict | None:
    """The meta file beside `results_csv`, or None when there is none (results of an older featcache)."""
    path = meta_path(results_csv)
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError, ValueError):
        raise FeatcacheError(f"{path}: not a readable results meta file") from None
    if not isinstance(meta, dict):
        raise FeatcacheError(f"{path}: not a readable results meta file")
    return meta


SHORT = 12  # hex digits of a fingerprint or checksum shown to a person; the meta file keeps them whole


def provenance_fields(meta: dict) -> list[tuple[str, str]]:
    """(label, value) pairs of a meta file: pipeline, cache fingerprint and checkpoint sha256 (both
    short), backbone, featcache version, date. A field the meta file lacks (written by an older
    featcache, or by the Python API without a pipeline) is "not recorded", never guessed."""
    def value(key, short=False):
        v = meta.get(key)
        if v in (None, ""):
            return "not recorded"
        return str(v)[:SHORT] if short else str(v)

    return [("pipeline", value("pipeline")), ("cache fingerprint", value("fingerprint", True)),
            ("backbone", value("backbone")), ("checkpoint sha256", value("checkpoint_sha256", True)),
            ("featcache", value("featcache_version")), ("date (UTC)", value("written_utc"))]


def provenance_line(results_csv) -> str:
    """One line of where the results in `results_csv` came from, from its meta file; says so when
    there is no meta file rather than inventing values."""
    results_csv = Path(results_csv)
    meta = read_meta(results_csv)
    if meta is None:
        return (f"{results_csv.name}: provenance unknown: no {meta_path(results_csv).name} beside it "
                "(results written by an older featcache)")
    return f"{results_csv.name}: " + "; ".join(f"{k} {v}" for k, v in provenance_fields(meta))


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
