"""The progress store: work a sweep has finished, kept so an interrupted sweep resumes.

It can only save work, never change a result. Two kinds of records sit beside the results CSV:

- `.<results>.progress.jsonl`: one JSON line per finished configuration, with its metric rows;
- `.<results>.scores/`: the scores of one configuration on one split, written as soon as they are
  computed, so that a kill loses only the (configuration, split) pairs in flight, although a batch
  scores its configurations split by split.

Every record carries the cache fingerprint, the featcache version, the version of the method's
code, the metric definitions (`featcache.metrics.DEFINITIONS`) and a sha256 digest of its own content. A record that fails any of these, or is malformed in
any way (not a JSON object, a missing key, a wrong type, rows that are not one per ood split plus
the mean, a metric outside [0, 1]), is ignored and its work is done again.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import threading
from collections import deque
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from featcache.metrics import DEFINITIONS
from featcache.results import COLUMNS, MEAN, METRICS

ENTRY_TYPES = {"fingerprint": str, "featcache_version": str, "method_version": str, "metrics": str, "method": str,
               "params": str, "rows": list, "digest": str}


def content_digest(record: dict) -> str:
    """sha256 of the canonical JSON of `record` without its own `digest`."""
    body = {k: v for k, v in record.items() if k != "digest"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def _featcache_version() -> str:
    import featcache

    return featcache.__version__


def _is_fraction(value) -> bool:
    return isinstance(value, float) and math.isfinite(value) and 0.0 <= value <= 1.0


class ProgressStore:
    """Finished configurations of one sweep over one cache.

    `versions` maps each method name of the grid to the version of its code; `ood_names` are the
    cache's ood splits in the order the rows list them, `id_name` its id_test split.
    """

    def __init__(self, results_csv: Path, fingerprint: str, versions: dict[str, str], ood_names: list[str],
                 id_name: str):
        results_csv = Path(results_csv)
        self.path = results_csv.with_name(f".{results_csv.name}.progress.jsonl")
        self.scores = ScoreScratch(results_csv.with_name(f".{results_csv.name}.scores"), fingerprint, versions)
        self.fingerprint = fingerprint
        self.versions = versions
        self.oods = list(ood_names) + [MEAN]
        self.splits = [id_name, *ood_names]
        self.done: dict[tuple[str, str], list[dict]] = {}
        self.nonpositive: dict[tuple[str, str], dict] = {}  # nap+X: samples with S_X <= 0 per split
        if self.path.exists():
            with open(self.path, "rb") as fh:
                for line in fh:
                    entry = self._trusted(line)
                    if entry is not None:
                        key = (entry["method"], entry["params"])
                        self.done[key] = entry["rows"]
                        if entry.get("nonpositive"):
                            self.nonpositive[key] = entry["nonpositive"]

    def _trusted(self, line: bytes) -> dict | None:
        """One saved line, or None when anything about it is not as this sweep writes it."""
        try:
            entry = json.loads(line)
        except (ValueError, UnicodeDecodeError):
            return None  # a line cut short by a kill, or not JSON at all
        if not isinstance(entry, dict) or any(not isinstance(entry.get(k), t) for k, t in ENTRY_TYPES.items()):
            return None
        if (entry["fingerprint"] != self.fingerprint or entry["featcache_version"] != _featcache_version()
                or entry["method_version"] != self.versions.get(entry["method"])
                or entry["metrics"] != DEFINITIONS or entry["digest"] != content_digest(entry)):
            return None
        counts = entry.get("nonpositive", {})
        if not isinstance(counts, dict) or not all(isinstance(v, int) and v >= 0 for v in counts.values()):
            return None
        rows = entry["rows"]
        if len(rows) != len(self.oods):
            return None
        for row, ood in zip(rows, self.oods):
            if not isinstance(row, dict) or set(row) != set(COLUMNS) or row["ood"] != ood:
                return None
            if row["method"] != entry["method"] or row["params"] != entry["params"]:
                return None
            if not all(_is_fraction(row[m]) for m in METRICS + ("id_acc",)):
                return None
        return entry

    def add(self, rows: list[dict], timings: dict | None = None, nonpositive: list[dict] | None = None) -> None:
        """Record finished configurations; their batch's numeric `timings` are shared out equally.

        `nonpositive`: sweep_batch's counts of samples with S_X <= 0, kept with their configuration.
        """
        counts = {(n["method"], n["params"]): n["nonpositive"] for n in nonpositive or []}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        by_config: dict[tuple[str, str], list[dict]] = {}
        for row in rows:
            by_config.setdefault((row["method"], row["params"]), []).append(row)
        each = {k: v / max(len(by_config), 1) for k, v in (timings or {}).items() if isinstance(v, (int, float))}
        with open(self.path, "a") as fh:
            for (method, params), config_rows in by_config.items():
                entry = {"fingerprint": self.fingerprint, "featcache_version": _featcache_version(),
                         "method_version": self.versions[method], "metrics": DEFINITIONS, "method": method,
                         "params": params, **each, "rows": config_rows}
                if (method, params) in counts:
                    entry["nonpositive"] = counts[(method, params)]
                    self.nonpositive[(method, params)] = counts[(method, params)]
                entry["digest"] = content_digest(entry)
                fh.write(json.dumps(entry) + "\n")
                self.done[(method, params)] = config_rows
            fh.flush()
            os.fsync(fh.fileno())
        for method, params in by_config:
            self.scores.discard(method, params, self.splits)


class ScoreScratch:
    """Scores of single (configuration, split) pairs, one .npz file each, written atomically."""

    def __init__(self, directory: Path, fingerprint: str, versions: dict[str, str]):
        self.directory = Path(directory)
        self.fingerprint = fingerprint
        self.versions = versions

    def _file(self, method: str, params: str, split: str) -> Path:
        name = hashlib.sha256(f"{method}\n{params}\n{split}".encode()).hexdigest()[:40]
        return self.directory / f"{name}.npz"

    def _meta(self, method: str, params: str, split: str, scores: np.ndarray, id_acc, nonpositive) -> dict:
        return {"fingerprint": self.fingerprint, "featcache_version": _featcache_version(),
                "method_version": self.versions.get(method), "method": method, "params": params, "split": split,
                "n": int(len(scores)), "id_acc": id_acc, "nonpositive": nonpositive,
                "scores_sha256": hashlib.sha256(np.ascontiguousarray(scores, dtype="<f8").tobytes()).hexdigest()}

    def save(self, method: str, params: str, split: str, scores: np.ndarray, id_acc: float | None = None,
             nonpositive: int | None = None) -> None:
        scores = np.asarray(scores, dtype=np.float64)
        meta = self._meta(method, params, split, scores, id_acc, None if nonpositive is None else int(nonpositive))
        meta["digest"] = content_digest(meta)
        self.directory.mkdir(parents=True, exist_ok=True)
        path = self._file(method, params, split)
        # a name of this process and thread: two sweeps of one program writing the same pair do not collide
        tmp = path.with_name(f"{path.stem}.{os.getpid()}.{threading.get_ident()}.tmp.npz")
        np.savez(tmp, scores=scores, meta=np.array(json.dumps(meta)))
        os.replace(tmp, path)

    def load(self, method: str, params: str, split: str, n: int) -> tuple[np.ndarray, float | None, int | None] | None:
        """(scores, id_acc, nonpositive) saved for this pair on this cache by this code, or None."""
        path = self._file(method, params, split)
        if not path.exists():
            return None
        try:
            with np.load(path, allow_pickle=False) as saved:
                scores = np.asarray(saved["scores"])
                meta = json.loads(str(saved["meta"]))
        except Exception:  # any damage at all: the pair is simply scored again
            return None
        if not isinstance(meta, dict) or scores.dtype != np.float64 or scores.shape != (n,):
            return None
        expected = self._meta(method, params, split, scores, meta.get("id_acc"), meta.get("nonpositive"))
        if meta.get("digest") != content_digest(meta) or {k: meta.get(k) for k in expected} != expected:
            return None
        id_acc, nonpositive = meta["id_acc"], meta["nonpositive"]
        if id_acc is not None and not _is_fraction(id_acc):
            return None
        if nonpositive is not None and not (isinstance(nonpositive, int) and 0 <= nonpositive <= n):
            return None
        return scores, id_acc, nonpositive

    def discard(self, method: str, params: str, splits: list[str]) -> None:
        """Forget a configuration's scores once its rows are saved."""
        for split in splits:
            self._file(method, params, split).unlink(missing_ok=True)

    def remove_if_empty(self) -> None:
        try:
            self.directory.rmdir()
        except OSError:
            pass  # absent, or holding scores of configurations not finished yet


@contextmanager
def saving_in_background(save):
    """`save` (a `ScoreScratch.save`) as a function whose calls run in one background thread, in
    order, while the caller goes on: a sweep's cores stay busy scoring instead of waiting on the
    disk. The scores handed to it must not change afterwards. Every write has ended when the block
    does; a failed one raises, at a later call or at the end of the block. An error in the block
    itself (Ctrl-C too) wins, and the writes not yet begun are dropped."""
    from concurrent.futures import ThreadPoolExecutor

    pool = ThreadPoolExecutor(1, thread_name_prefix="featcache-scratch")
    pending: deque = deque()

    def raise_failed(wait: bool) -> None:
        while pending and (wait or pending[0].done()):
            pending.popleft().result()

    def save_later(*args) -> None:
        raise_failed(wait=False)
        pending.append(pool.submit(save, *args))

    try:
        yield save_later
        raise_failed(wait=True)
    except BaseException:
        # an error or Ctrl-C: the write under way ends, those still queued are dropped (their
        # configurations are scored again on resume) instead of holding the exit up
        pool.shutdown(wait=True, cancel_futures=True)
        raise
    pool.shutdown(wait=True)
