"""Writing a cache so that a partial one is never taken for a complete one.

Everything is written to `<path>.partial` first; each split carries `rows_written` (advanced only
after its rows are flushed) and `complete` (set only after every row is written and checked).
`finish` stamps the content fingerprint, computed from the stored checksums, and renames the partial
into place, atomically. Running the same extraction again finds the partial and resumes it from the
last flushed chunk, when the partial's resume key (everything that shapes its numbers) equals the
new run's; otherwise it starts afresh.

While a writer is open it holds an exclusive lock on `<path>.lock`, so a second writer to the same
output is refused instead of deleting or mixing into the first one's partial.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
import shutil
import socket
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


def is_disk_full(exc: BaseException) -> bool:
    """Whether `exc` is a write that failed for want of space (or quota). h5py reports HDF5's failed
    writes as RuntimeError or OSError whose text carries the C errno; Python's own as OSError."""
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    if isinstance(exc, (OSError, RuntimeError)):
        text = str(exc)
        return any(f"errno = {code}," in text for code in (errno.ENOSPC, errno.EDQUOT)) \
            or "No space left on device" in text or "Disk quota exceeded" in text
    return False


def lock_path(path) -> Path:
    path = Path(path)
    return path.with_name(path.name + ".lock")


class OutputLock:
    """An exclusive `flock` on `<output>.lock`, which holds a line naming its holder.

    The kernel drops a flock when its holder exits, however it exits, so a killed writer never
    leaves the output locked. The holder removes the file before letting go; an opener that locked
    a file removed meanwhile finds that the path no longer leads to its inode, and tries again.
    """

    def __init__(self, output: Path):
        self.output, self.path, self.fd = output, lock_path(output), None

    def acquire(self) -> None:
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.pread(fd, 512, 0).decode("utf-8", "replace").strip() or "a process that is starting"
                os.close(fd)
                raise FeatcacheError(f"{self.output}: in use by another featcache process writing it ({holder}; "
                                     f"lock {self.path}); wait for it to finish or stop it, then run again") from None
            except OSError:  # a file system without flock (some network mounts): go on unlocked
                self.fd = fd
                return
            try:
                same = os.stat(self.path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if not same:
                os.close(fd)
                continue
            since = datetime.now(timezone.utc).isoformat(timespec="seconds")
            try:
                os.ftruncate(fd, 0)
                os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}, since {since}\n".encode(), 0)
            except OSError:
                pass  # a full disk: the lock itself still holds
            self.fd = fd
            return

    def release(self) -> None:
        if self.fd is None:
            return
        try:
            os.unlink(self.path)  # while still held, so no one locks this inode after us
        except FileNotFoundError:
            pass
        os.close(self.fd)
        self.fd = None


# HDF5 stores whose write failed, kept referenced so they are never closed: closing (or garbage
# collecting) an HDF5 file after a failed write crashes the interpreter; the CLI ends with os._exit.
_ABANDONED: list = []


def _difference(old, new, where: str = "") -> str | None:
    """The first place where two JSON values differ, as 'where: was X, now Y'; None if equal."""
    if isinstance(old, dict) and isinstance(new, dict):
        for key in sorted(set(old) | set(new), key=str):
            inner = f"{where}.{key}" if where else str(key)
            if key not in old or key not in new:
                return f"{inner}: was {json.dumps(old.get(key))}, now {json.dumps(new.get(key))}"
            found = _difference(old[key], new[key], inner)
            if found:
                return found
        return None
    if old != new:
        return f"{where}: was {json.dumps(old)}, now {json.dumps(new)}"
    return None


class CacheWriter:
    """Creates or resumes `<path>.partial`, and finally renames it to `path`.

    Holds the output's lock (OutputLock) from construction until `close`.
    """

    def __init__(self, path, *, overwrite: bool = False):
        self.path = Path(path)
        self.fmt = format_of(self.path)
        self.partial = partial_path(self.path)
        self.overwrite = overwrite
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
        self.restart_reason: str | None = None
        self.lock = OutputLock(self.path)
        self.lock.acquire()  # last: nothing above can fail while holding it

    def open(self, root_attrs: dict, weight: np.ndarray, bias: np.ndarray, resume_key: dict | None = None) -> bool:
        """Open the partial, resuming it when it was begun under the same `resume_key` (and head);
        True if resumed. When a partial is discarded instead, `restart_reason` says why.

        `resume_key` is a JSON-able dict of everything that shapes the numbers; it is stored in
        the partial's root attribute `resume_key`.
        """
        self.restart_reason = None
        if self.partial.exists():
            store, reason = None, "--overwrite starts afresh" if self.overwrite else None
            if reason is None:
                try:
                    store = open_store(self.partial, "r+", fmt=self.fmt)
                    reason = self._refusal(store, weight, bias, root_attrs, resume_key)
                except Exception as exc:  # any failure to read it: damaged by a failed write or a kill
                    reason = f"it cannot be read ({_first_line(exc)}); a failed write may have damaged it"
            if reason is None:
                self.store = store
                return True
            if store is not None:
                try:
                    store.close()
                except Exception:
                    pass  # damaged: it is removed next
            self.restart_reason = reason
            _remove(self.partial)
        self.store = open_store(self.partial, "w", fmt=self.fmt)
        created = datetime.now(timezone.utc).isoformat(timespec="seconds")
        if resume_key is not None:
            root_attrs = {**root_attrs, "resume_key": json.dumps(resume_key, sort_keys=True, default=str)}
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

    @staticmethod
    def _refusal(store: Store, weight, bias, root_attrs: dict, resume_key: dict | None) -> str | None:
        """Why the partial in `store` cannot be resumed, or None."""
        attrs = store.attrs("/")
        if attrs.get("schema") != SCHEMA:
            return f"it was begun under cache schema {attrs.get('schema')!r}, this featcache writes {SCHEMA!r}"
        if resume_key is not None:
            stored = attrs.get("resume_key")
            if not stored:
                return "it records no resume key (begun by an older featcache)"
            found = _difference(json.loads(stored), json.loads(json.dumps(resume_key, default=str)))
            if found:
                return f"what shapes its numbers changed since it was begun: {found}"
        if attrs.get("checkpoint_sha256") != root_attrs.get("checkpoint_sha256"):
            return "it was begun with another checkpoint"
        if not (store.has("/head/weight") and np.array_equal(store.read("/head/weight"), weight)
                and np.array_equal(store.read("/head/bias"), bias)):
            return "it was begun with another head"
        return None

    def abandon(self) -> None:
        """After a write failed for want of space: never touch the store again, and remove the
        partial, whose metadata the failed write may have damaged (HDF5 keeps it in the file)."""
        if self.store is not None:
            _ABANDONED.append(self.store)
            self.store = None
        _remove(self.partial)

    def close(self):
        try:
            if self.store is not None:
                self.store.close()
        finally:
            self.lock.release()


def _first_line(exc) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__


def _remove(path: Path):
    if path.is_dir():
        shutil.rmtree(path)
    elif path.exists():
        path.unlink()
