"""Reading a cache: one interface whatever the format, refusing what the contract says is unusable.

Opening a cache checks, without reading any array: the schema version; that an HDF5 file holds its
own bytes (no external links, soft links, external storage or virtual datasets); the head's shape
and dtype; every split's name, role, `n` and `complete`; every array's dtype and shape against `n`
and the head; the checksum attributes; and, when every split is complete, that the root fingerprint
equals `content_fingerprint` of those checksums. Reading an array then checks it against its stored
checksum while it streams in, before anyone can use it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import numpy as np

from featcache.allocator import faulted_empty
from featcache.cache.integrity import Checksum, check_ids, checksum_attr, content_fingerprint, name_problem
from featcache.cache.schema import HEAD_ARRAYS, ROLES, SCHEMA, SCHEMA_PREFIX, SCHEMA_V1, SPLIT_ARRAYS
from featcache.cache.store import Store, open_store
from featcache.errors import FeatcacheError, NextStep


class ChecksumMismatch(FeatcacheError):
    """An array whose contents differ from the checksum stored when it was written."""


@dataclass
class Layout:
    """What opening a cache established from its attributes and shapes alone."""

    head_shape: tuple  # (K, D)
    head_checksums: dict | None  # {"weight": hex, "bias": hex}; None in a version-1 cache
    split_attrs: dict  # name -> attributes, as read when the cache was opened
    checksums: dict  # name -> {dataset: hex}, for complete splits
    incomplete: list  # names of splits not (yet) complete

    def fingerprint(self) -> str:
        return content_fingerprint(self.head_checksums, {
            name: (self.split_attrs[name]["role"], checksums) for name, checksums in self.checksums.items()})


def _dtype_name(dtype: str) -> str:
    return dtype if dtype == "str" else np.dtype(dtype).name  # '>f4' is a float32 too


def inspect_layout(store: Store, path, *, version1: bool = False) -> Layout:
    """Check everything that can be checked without reading an array (module docstring); one-line
    FeatcacheError otherwise. A version-1 cache (`version1`) has no head checksums to check."""
    foreign = store.foreign_storage()
    if foreign:
        raise FeatcacheError(f"{path}: refused: {foreign}; a cache must hold its own bytes")
    for node in ("/head/weight", "/head/bias"):
        if not store.has(node):
            raise FeatcacheError(f"{path}: missing dataset {node}")
    weight, bias = store.shape("/head/weight"), store.shape("/head/bias")
    kinds = (_dtype_name(store.dtype("/head/weight")), _dtype_name(store.dtype("/head/bias")))
    if len(weight) != 2 or bias != weight[:1] or kinds != ("float32", "float32"):
        raise FeatcacheError(f"{path}: head weight {kinds[0]} {weight} and bias {kinds[1]} {bias} do not fit "
                             "the contract (float32 (K, D) and (K,))")
    k, d = weight
    head_checksums = None
    if not version1:
        head_checksums = checksum_attr(store.attrs("/head").get("checksums"), HEAD_ARRAYS, f"{path}: /head")
    split_attrs, checksums, incomplete = {}, {}, []
    for name in store.groups("/splits"):
        problem = name_problem(name)
        if problem:
            raise FeatcacheError(f"{path}: split name {name!r} is not a plain name ({problem})")
        where = f"{path}: split {name!r}"
        attrs = store.attrs(f"/splits/{name}")
        role, n, complete = attrs.get("role"), attrs.get("n"), attrs.get("complete")
        if role not in ROLES:
            raise FeatcacheError(f"{where} has role {role!r}; a role is one of {', '.join(ROLES)}")
        if not isinstance(complete, bool):
            raise FeatcacheError(f"{where}: attribute 'complete' is {complete!r}, not a boolean")
        if not isinstance(n, int) or isinstance(n, bool) or n < 0:
            raise FeatcacheError(f"{where}: attribute 'n' is {n!r}, not a number of samples")
        channels = None
        for key, (dtype, dim) in SPLIT_ARRAYS.items():
            node = f"/splits/{name}/{key}"
            if not store.has(node):
                if complete:
                    raise FeatcacheError(f"{where} has no dataset {key!r}")
                continue  # a split being written may not have all its datasets yet
            shape, stored = store.shape(node), _dtype_name(store.dtype(node))
            if stored != dtype or len(shape) != (1 if dim is None else 2):
                raise FeatcacheError(f"{where} dataset {key!r} is {stored} {shape}, the contract says {dtype} "
                                     f"with {1 if dim is None else 2} dimensions")
            if shape[0] != n:
                raise FeatcacheError(f"{where} dataset {key!r} has {shape[0]} rows, the split declares n = {n}")
            if dim == "D" and shape[1] != d:
                raise FeatcacheError(f"{where} features have width {shape[1]}, the head takes {d}")
            if dim == "K" and shape[1] != k:
                raise FeatcacheError(f"{where} logits have width {shape[1]}, the head has {k} classes")
            if dim == "C":
                if channels is not None and shape[1] != channels:
                    raise FeatcacheError(f"{where} chan_max and chan_mean have different widths")
                channels = shape[1]
        split_attrs[name] = attrs
        if complete:
            checksums[name] = checksum_attr(attrs.get("checksums"), SPLIT_ARRAYS, where)
        else:
            incomplete.append(name)
    return Layout((k, d), head_checksums, split_attrs, checksums, incomplete)


def memory_bytes() -> int | None:
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def hashed_blocks(store: Store, node: str, where: str, digest: Checksum, out: np.ndarray | None = None):
    """(start, stop, rows) of `node` block by block (into `out` when given), each fed to `digest` as it
    goes, so that it is hashed while the next one is read. Read errors become one line naming `where`."""
    try:
        for start, stop, rows in store.blocks(node, out):
            digest.update(rows)
            yield start, stop, rows
    except FeatcacheError:
        raise
    except Exception as exc:  # h5py and zarr raise many types for unreadable data
        text = str(exc).strip().splitlines()
        raise FeatcacheError(f"{where} cannot be read ({text[0] if text else type(exc).__name__})") from None


def stream_checksum(store: Store, node: str, where: str, out: np.ndarray | None = None,
                    on_ids=None) -> tuple[str, list | None]:
    """The checksum of `node`, read block by block (into `out` when given, strings collected and
    returned). `on_ids(block, offset)` sees every block of strings."""
    strings = store.dtype(node) == "str"
    digest = Checksum(strings, threaded=True)
    collected = [] if strings else None
    try:
        for start, _, rows in hashed_blocks(store, node, where, digest, out):
            if strings:
                if on_ids is not None:
                    on_ids(rows, start)
                collected.extend(rows)
        return digest.hexdigest(), collected
    finally:
        digest.close()


@dataclass
class Split:
    """One split of a cache; arrays are read on demand with `split["features"]` or `split.read(...)`.

    Every read of a complete split is checked against the checksum stored when the split was
    finished (see `Cache.read_verified`); an incomplete split, which has none yet, is only handed
    out when asked for with `allow_incomplete` and is read as it is.
    """

    name: str
    cache: "Cache" = field(repr=False)

    @property
    def store(self) -> Store:
        return self.cache.store

    @property
    def group(self) -> str:
        return f"/splits/{self.name}"

    @property
    def attrs(self) -> dict:
        return self.cache.layout.split_attrs[self.name]

    @property
    def role(self) -> str:
        return self.attrs["role"]

    @property
    def n(self) -> int:
        return self.attrs["n"]

    @property
    def complete(self) -> bool:
        return self.attrs["complete"]

    def has(self, array: str) -> bool:
        return self.store.has(f"{self.group}/{array}")

    def same_contents(self, array: str, other: str) -> bool:
        """Whether datasets `array` and `other` of this complete split hold the same numbers: equal
        stored checksums (sha256 of the bytes), shapes and dtypes. Reading either one, checked, gives
        exactly what the other holds (chan_mean and features of a ResNet, linked or stored twice)."""
        checksums = self.cache.layout.checksums.get(self.name, {}) if self.complete else {}
        return (checksums.get(array) is not None and checksums.get(array) == checksums.get(other)
                and self.has(array) and self.has(other)
                and self.shape(array) == self.shape(other) and self.dtype(array) == self.dtype(other))

    def _node(self, array: str) -> str:
        """The store node of dataset `array`, refused by name when the split has no such dataset."""
        if array not in SPLIT_ARRAYS:
            raise FeatcacheError(f"split {self.name!r}: unknown array {array!r}; one of {', '.join(SPLIT_ARRAYS)}")
        if not self.has(array):
            raise FeatcacheError(f"{self.store.path}: split {self.name!r} has no dataset {array!r}")
        return f"{self.group}/{array}"

    def _where(self, array: str) -> str:
        return f"{self.store.path}: split {self.name!r} dataset {array!r}"

    def read(self, array: str, rows: slice = slice(None)) -> np.ndarray:
        node = self._node(array)
        if not self.complete:
            return self.store.read(node, rows)
        return self.cache.read_verified(node, self.cache.layout.checksums[self.name][array], self._where(array), rows)

    __getitem__ = read

    def runs(self, array: str):
        """(start, stop, rows) of a numeric `array` over the whole split, a block of rows at a time,
        for work that reduces it row by row without holding it whole. The blocks are hashed as they
        stream and the checksum is compared after the last one, so the bytes used are the bytes
        checked: a caller that goes through every run gets ChecksumMismatch instead of finishing on
        damaged data (one that stops early has checked nothing)."""
        node = self._node(array)
        if not self.complete:
            return self.store.blocks(node)
        return self.cache.runs(node, self.cache.layout.checksums[self.name][array], self._where(array))

    def shape(self, array: str) -> tuple:
        return self.store.shape(f"{self.group}/{array}")

    def dtype(self, array: str) -> str:
        return self.store.dtype(f"{self.group}/{array}")


class Cache:
    """An opened feature cache (HDF5 or Zarr). Use `open_cache`."""

    def __init__(self, store: Store, layout: Layout):
        self.store = store
        self.path = store.path
        self.format = store.fmt
        self.attrs = store.attrs("/")
        self.layout = layout
        self._verified: set[str] = set()  # datasets whose every byte matched its checksum in this handle

    @property
    def fingerprint(self) -> str:
        """The content fingerprint, checked against the checksums when the cache was opened."""
        if self.layout.incomplete:
            raise NextStep(f"{self.path}: split {self.layout.incomplete[0]!r} is incomplete, so the cache "
                           "has no fingerprint yet", "featcache extract PIPELINE", "again to resume it")
        return self.attrs["fingerprint"]

    def read_verified(self, node: str, checksum: str, where: str, rows: slice = slice(None)) -> np.ndarray:
        """Array `node` (or `rows` of it), its every byte checked against `checksum` before it is returned.

        A whole read is hashed while it streams in; a slice is served once the whole dataset has
        been checked in this handle (the first slice checks it, streaming without keeping it).
        Mismatch: ChecksumMismatch naming `where`.
        """
        if rows != slice(None):
            if node not in self._verified:
                self.check(node, checksum, where)
            return self.store.read(node, rows)
        self._fits_in_memory(node, where)
        dtype = self.store.dtype(node)
        out = None if dtype == "str" else faulted_empty(self.store.shape(node), dtype)
        strings = self.check(node, checksum, where, out)
        return np.asarray(strings, dtype=str) if strings is not None else out

    def runs(self, node: str, checksum: str, where: str):
        """`Split.runs` of dataset `node`."""
        digest = Checksum(False, threaded=True)
        try:
            yield from hashed_blocks(self.store, node, where, digest)
            actual = digest.hexdigest()
        finally:
            digest.close()
        self._accept(node, actual, checksum, where)

    def check(self, node: str, checksum: str, where: str, out: np.ndarray | None = None) -> list | None:
        """Stream `node` (into `out` when given) and refuse it unless its checksum is `checksum`;
        sample ids are also checked to be plain relative names. Returns the strings of a str array."""
        self._fits_in_memory(node, where)
        on_ids = (lambda block, offset: check_ids(block, where, offset)) if node.endswith("/ids") else None
        actual, strings = stream_checksum(self.store, node, where, out, on_ids)
        self._accept(node, actual, checksum, where)
        return strings

    def _accept(self, node: str, actual: str, checksum: str, where: str) -> None:
        """Refuse `node` unless its streamed checksum `actual` is the stored `checksum`; else remember
        that it was checked in this handle."""
        if actual != checksum:
            raise ChecksumMismatch(f"{where}: checksum differs from the one stored when it was written; "
                                   "the data changed afterwards (damaged or edited), refused")
        self._verified.add(node)

    def _fits_in_memory(self, node: str, where: str) -> None:
        """Refuse, before allocating or streaming it, an array larger than this machine's memory:
        stage two reads every array whole, so such a claim is damage or a crafted file."""
        shape, dtype = self.store.shape(node), self.store.dtype(node)
        nbytes = (16 if dtype == "str" else np.dtype(dtype).itemsize) * float(np.prod(shape, dtype=np.float64))
        memory = memory_bytes()
        if memory and nbytes > memory:
            raise FeatcacheError(f"{where} claims shape {shape} ({nbytes / 2**30:,.1f} GiB), more than this "
                                 f"machine's {memory / 2**30:,.1f} GiB of memory; refused before reading it")

    def _head(self, key: str) -> np.ndarray:
        return self.read_verified(f"/head/{key}", self.layout.head_checksums[key], f"{self.path}: head {key}")

    @property
    def head_weight(self) -> np.ndarray:
        return self._head("weight")

    @property
    def head_bias(self) -> np.ndarray:
        return self._head("bias")

    @property
    def split_names(self) -> list[str]:
        return list(self.layout.split_attrs)

    def split(self, name: str, *, allow_incomplete: bool = False) -> Split:
        if name not in self.layout.split_attrs:
            raise FeatcacheError(
                f"{self.path}: no split {name!r}; it has {', '.join(self.split_names) or 'none'}"
            )
        split = Split(name, self)
        if not allow_incomplete and not split.complete:
            raise NextStep(f"{self.path}: split {name!r} is incomplete (extraction did not finish)",
                           "featcache extract PIPELINE", "again to resume it")
        return split

    def splits(self, role: str | None = None, *, allow_incomplete: bool = False) -> list[Split]:
        if role is not None and role not in ROLES:
            raise FeatcacheError(f"unknown role {role!r}; one of {', '.join(ROLES)}")
        return [self.split(name, allow_incomplete=allow_incomplete) for name in self.split_names
                if role is None or self.layout.split_attrs[name]["role"] == role]

    def one_split(self, role: str) -> Split:
        found = self.splits(role, allow_incomplete=True)
        if not found:
            raise FeatcacheError(f"{self.path}: no split with role {role!r}")
        if len(found) > 1:
            raise FeatcacheError(f"{self.path}: {len(found)} splits with role {role!r}, the contract allows one")
        return self.split(found[0].name)

    def verify_all(self) -> None:
        """Check every array of the head and of every complete split against its checksum, streaming
        (for convert and merge, which then copy in slices from this handle)."""
        for key in HEAD_ARRAYS:
            self.check(f"/head/{key}", self.layout.head_checksums[key], f"{self.path}: head {key}")
        for name, checksums in self.layout.checksums.items():
            for key in SPLIT_ARRAYS:
                self.check(f"/splits/{name}/{key}", checksums[key], f"{self.path}: split {name!r} dataset {key!r}")

    def close(self):
        self.store.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def check_schema(schema, path) -> None:
    """Refuse anything but a version-2 cache; a version-1 one with the command that upgrades it."""
    if schema == SCHEMA:
        return
    if schema is None:
        raise FeatcacheError(f"{path}: not a featcache cache (no 'schema' attribute at the root)")
    if schema == SCHEMA_V1:
        raise FeatcacheError(f"{path}: cache schema {SCHEMA_V1!r} (version 1) is not read by this featcache, which "
                             f"reads {SCHEMA!r} (version 2); run `featcache upgrade {path}` to check it and "
                             "upgrade it in place")
    if isinstance(schema, str) and schema.startswith(SCHEMA_PREFIX):
        raise FeatcacheError(f"{path}: cache schema {schema!r} is not supported; this featcache reads {SCHEMA!r}")
    raise FeatcacheError(f"{path}: unknown schema {schema!r}; expected {SCHEMA!r}")


def open_cache(path, *, storage_options: dict | None = None) -> Cache:
    """Open an HDF5 (`.h5`) or Zarr (`.zarr`) feature cache read-only.

    Refuses, with a one-line FeatcacheError, anything that is not a sound version-2 cache (module
    docstring). Incomplete splits are listed but `Cache.split` refuses them.
    """
    store = open_store(path, "r", storage_options=storage_options)
    try:
        attrs = store.attrs("/")
        check_schema(attrs.get("schema"), path)
        layout = inspect_layout(store, path)
        if not layout.incomplete:
            expected = layout.fingerprint()
            if attrs.get("fingerprint") != expected:
                raise FeatcacheError(
                    f"{path}: root fingerprint {str(attrs.get('fingerprint'))[:16]!r}... is not the content "
                    f"fingerprint of its checksums ({expected[:16]}...); its attributes were changed after it "
                    "was written, refused")
    except Exception:
        store.close()
        raise
    return Cache(store, layout)
