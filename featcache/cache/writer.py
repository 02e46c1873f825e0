"""Writing a cache so that a partial one is never taken for a complete one.

Everything is written to `<path>.partial` first; each split carries `rows_written` (advanced only
after its rows are flushed) and `complete` (set only after every row is written and checked).
`finish` stamps the content fingerprint, computed from the stored checksums, and renames the partial
into place, atomically. Running the same extraction again finds the partial and resumes it from the
last flushed chunk.
"""

from __future__ import annotations

import json
import os
import shutil
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from featcache.cache.integrity import array_checksum, checksum_attr, content_fingerprint
from featcache.cache.schema import HEAD_ARRAYS, ROLES, SCHEMA, SPLIT_ARRAYS, format_of
from featcache.cache.store import Store, open_store
from featcache.errors import FeatcacheError


def partial_path(path) -> Path:
    path = Path(path)
    return path.with_name(path.name + ".partial")


class SplitWriter:
    """Appends whole rows to one split; resumable from `rows_written`."""

    def __init__(self, store: Store, name: str):
        self.store, self.name = store, name
        self.group = f"/splits/{name}"
        attrs = store.attrs(self.group)
        self.n = int(attrs["n"])
        self.rows_written = int(attrs.get("rows_written", 0))
        self.write_rows = attrs.get("write_rows")  # rows per append the chunks were laid out for
        self.complete = bool(attrs.get("complete", False))
        # HDF5 stores chan_mean as a hard link to features when they are equal; Zarr stores it again.
        self.chan_mean_linked = bool(attrs.get("chan_mean_is_features", False)) and store.fmt == "h5"

    def append(self, batch: dict) -> None:
        rows = len(batch["features"])
        if self.rows_written + rows > self.n:
            raise FeatcacheError(f"split {self.name!r}: more than the declared {self.n} rows")
        for key, values in batch.items():
            if key == "chan_mean" and self.chan_mean_linked:
                continue
            self.store.write(f"{self.group}/{key}", self.rows_written, values)
        self.store.flush()
        # Only after the rows are on disk does the counter move, so a kill never skips rows.
        self.rows_written += rows
        self.store.set_attrs(self.group, rows_written=self.rows_written)
        self.store.flush()

    def finish(self) -> None:
        if self.rows_written != self.n:
            raise FeatcacheError(f"split {self.name!r}: {self.rows_written} rows written, {self.n} declared")
        checksums = {key: array_checksum(self.store.read(f"{self.group}/{key}")) for key in SPLIT_ARRAYS}
        self.store.set_attrs(self.group, checksums=json.dumps(checksums, sort_keys=True), complete=True)
        self.store.flush()
        self.complete = True


class CacheWriter:
    """Creates or resumes `<path>.partial`, and finally renames it to `path`."""

    def __init__(self, path, *, overwrite: bool = False):
        self.path = Path(path)
        self.fmt = format_of(self.path)
        self.partial = partial_path(self.path)
        if self.path.exists() and not overwrite:
            raise FeatcacheError(f"{self.path}: already exists; pass --overwrite to replace it")
        parent = self.path.parent
        try:
            parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise FeatcacheError(f"{parent}: cannot create the output directory ({exc.strerror})") from None
        if not os.access(parent, os.W_OK):
            raise FeatcacheError(f"{parent}: output directory is not writable")
        self.store: Store | None = None

    def open(self, root_attrs: dict, weight: np.ndarray, bias: np.ndarray) -> bool:
        """Open the partial, resuming it when it was started with the same head; True if resumed."""
        if self.partial.exists():
            try:
                store = open_store(self.partial, "r+", fmt=self.fmt)
                same = store.attrs("/").get("schema") == SCHEMA and store.has("/head/weight") \
                    and np.array_equal(store.read("/head/weight"), weight) \
                    and np.array_equal(store.read("/head/bias"), bias) \
                    and store.attrs("/").get("checkpoint_sha256") == root_attrs.get("checkpoint_sha256")
                if same:
                    self.store = store
                    return True
                store.close()
            except FeatcacheError:
                pass  # an unreadable leftover (killed while creating it): start again
            _remove(self.partial)
        self.store = open_store(self.partial, "w", fmt=self.fmt)
        created = datetime.now(timezone.utc).isoformat(timespec="seconds")
        self.store.set_attrs("/", **{"created_utc": created, **root_attrs, "schema": SCHEMA, "fingerprint": ""})
        self.store.create_group("/head")
        head = {"weight": np.asarray(weight, np.float32), "bias": np.asarray(bias, np.float32)}
        for name, values in head.items():
            self.store.create_array(f"/head/{name}", values.shape, "float32")
            self.store.write(f"/head/{name}", 0, values)
        self.store.set_attrs("/head", checksums=json.dumps({k: array_checksum(v) for k, v in head.items()}, sort_keys=True))
        self.store.create_group("/splits")
        self.store.flush()
        return False

    def split(self, name: str, *, role: str, source: str, n: int, dims: dict, chan_mean_is_features: bool,
              extra_attrs: dict | None = None, write_rows: int | None = None) -> SplitWriter:
        """A writer for split `name`: an existing one of the same declaration is resumed.

        `write_rows` is how many rows each append brings (the last may bring fewer): chunks are
        made a whole multiple of it, so an append killed half way cannot touch earlier rows.
        """
        if role not in ROLES:
            raise FeatcacheError(f"split {name!r}: unknown role {role!r}; one of {', '.join(ROLES)}")
        group = f"/splits/{name}"
        declared = dict(role=role, source=source, n=int(n), chan_mean_is_features=chan_mean_is_features,
                        **(extra_attrs or {}))
        if self.store.has(group):
            attrs = self.store.attrs(group)
            whole = all(self.store.has(f"{group}/{key}") for key in SPLIT_ARRAYS)
            if whole and all(attrs.get(k) == v for k, v in declared.items()):
                return SplitWriter(self.store, name)
            self.store.delete(group)  # declared otherwise, or killed while being laid out: start it again
        self.store.create_group(group)
        self.store.set_attrs(group, complete=False, rows_written=0, **declared)
        if write_rows:
            self.store.set_attrs(group, write_rows=int(write_rows))
        link = chan_mean_is_features and self.store.fmt == "h5"
        for key, (dtype, dim) in SPLIT_ARRAYS.items():
            if key == "chan_mean" and link:
                self.store.link(f"{group}/features", f"{group}/chan_mean")
                continue
            shape = (n,) if dim is None else (n, dims[dim])
            self.store.create_array(f"{group}/{key}", shape, dtype, write_rows=write_rows)
        self.store.flush()
        return SplitWriter(self.store, name)

    def finish(self) -> Path:
        """Stamp the content fingerprint of the stored checksums (integrity.content_fingerprint) and
        move the finished cache into place in one rename. Every split must be finished."""
        splits = {}
        for name in self.store.groups("/splits"):
            attrs = self.store.attrs(f"/splits/{name}")
            if attrs.get("complete") is not True:
                raise FeatcacheError(f"{self.partial}: split {name!r} is not finished; the cache cannot be finished")
            splits[name] = (attrs["role"], checksum_attr(attrs.get("checksums"), SPLIT_ARRAYS, f"split {name!r}"))
        head = checksum_attr(self.store.attrs("/head").get("checksums"), HEAD_ARRAYS, f"{self.partial}: /head")
        self.store.set_attrs("/", fingerprint=content_fingerprint(head, splits))
        self.store.close()
        if self.path.exists():
            old = self.path.with_name(self.path.name + ".old")
            _remove(old)
            os.replace(self.path, old)
            os.replace(self.partial, self.path)
            _remove(old)
        else:
            os.replace(self.partial, self.path)
        return self.path

    def close(self):
        if self.store is not None:
            self.store.close()


def _remove(path: Path):
    if path.is_dir():
        shutil.rmtree(path)
    elif path.exists():
        path.unlink()
