"""The progress store: finished configurations of a sweep, so an interrupted sweep resumes."""

from __future__ import annotations

import json
import os
from pathlib import Path

from featcache.metrics import DEFINITIONS


class ProgressStore:
    """Finished configurations of a sweep, one JSON line each, keyed by cache fingerprint.

    Lets an interrupted or extended sweep compute only what is missing. Lines written for another
    fingerprint, or with other metric definitions (featcache.metrics.DEFINITIONS), are never used: a
    store made for another cache, or by an older featcache, is started afresh.
    """

    def __init__(self, results_csv: Path, fingerprint: str):
        self.path = results_csv.with_name(f".{results_csv.name}.progress.jsonl")
        self.fingerprint = fingerprint
        self.done: dict[tuple[str, str], list[dict]] = {}
        self.nonpositive: dict[tuple[str, str], dict] = {}  # nap+X: samples with S_X <= 0 per split
        if self.path.exists():
            for line in self.path.read_text().splitlines():
                try:
                    entry = json.loads(line)
                except json.JSONDecodeError:
                    continue  # a line cut short by a kill: that configuration is simply redone
                if entry.get("fingerprint") == fingerprint and entry.get("metrics") == DEFINITIONS:
                    self.done[(entry["method"], entry["params"])] = entry["rows"]
                    if entry.get("nonpositive") is not None:
                        self.nonpositive[(entry["method"], entry["params"])] = entry["nonpositive"]

    def add(self, rows: list[dict], timings: dict | None = None, nonpositive: list[dict] | None = None) -> None:
        """Record finished configurations; their batch's `timings` are shared out equally.

        `nonpositive`: sweep_batch's counts of samples with S_X <= 0, kept with their configuration.
        """
        counts = {(n["method"], n["params"]): n["nonpositive"] for n in nonpositive or []}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        by_config: dict[tuple[str, str], list[dict]] = {}
        for row in rows:
            by_config.setdefault((row["method"], row["params"]), []).append(row)
        each = {k: v / max(len(by_config), 1) for k, v in (timings or {}).items()}
        with open(self.path, "a") as fh:
            for (method, params), config_rows in by_config.items():
                extra = {"nonpositive": counts[(method, params)]} if (method, params) in counts else {}
                fh.write(json.dumps({"fingerprint": self.fingerprint, "metrics": DEFINITIONS, "method": method, "params": params,
                                     **each, **extra, "rows": config_rows}) + "\n")
                self.done[(method, params)] = config_rows
                if extra:
                    self.nonpositive[(method, params)] = extra["nonpositive"]
            fh.flush()
            os.fsync(fh.fileno())
