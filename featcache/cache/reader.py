"""Reading a cache: one interface whatever the format, refusing what the contract says is unusable."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from featcache.cache.schema import ROLES, SCHEMA, SCHEMA_PREFIX, SPLIT_ARRAYS
from featcache.cache.store import Store, open_store
from featcache.errors import FeatcacheError


@dataclass
class Split:
    """One split of a cache; arrays are read on demand with `split["features"]` or `split.read(...)`."""

    name: str
    store: Store = field(repr=False)

    @property
    def group(self) -> str:
        return f"/splits/{self.name}"

    @property
    def attrs(self) -> dict:
        return self.store.attrs(self.group)

    @property
    def role(self) -> str:
        return self.attrs.get("role")

    @property
    def n(self) -> int:
        return int(self.attrs.get("n", 0))

    @property
    def complete(self) -> bool:
        return bool(self.attrs.get("complete", False))

    def has(self, array: str) -> bool:
        return self.store.has(f"{self.group}/{array}")

    def read(self, array: str, rows: slice = slice(None)) -> np.ndarray:
        if array not in SPLIT_ARRAYS:
            raise FeatcacheError(f"split {self.name!r}: unknown array {array!r}; one of {', '.join(SPLIT_ARRAYS)}")
        if not self.has(array):
            raise FeatcacheError(f"{self.store.path}: split {self.name!r} has no dataset {array!r}")
        return self.store.read(f"{self.group}/{array}", rows)

    __getitem__ = read

    def shape(self, array: str) -> tuple:
        return self.store.shape(f"{self.group}/{array}")

    def dtype(self, array: str) -> str:
        return self.store.dtype(f"{self.group}/{array}")


class Cache:
    """An opened feature cache (HDF5 or Zarr). Use `open_cache`."""

    def __init__(self, store: Store):
        self.store = store
        self.path = store.path
        self.format = store.fmt
        self.attrs = store.attrs("/")

    @property
    def fingerprint(self) -> str:
        return self.attrs.get("fingerprint", "")

    @property
    def head_weight(self) -> np.ndarray:
        return self.store.read("/head/weight")

    @property
    def head_bias(self) -> np.ndarray:
        return self.store.read("/head/bias")

    @property
    def split_names(self) -> list[str]:
        return self.store.groups("/splits")

    def split(self, name: str, *, allow_incomplete: bool = False) -> Split:
        if name not in self.split_names:
            raise FeatcacheError(
                f"{self.path}: no split {name!r}; it has {', '.join(self.split_names) or 'none'}"
            )
        split = Split(name, self.store)
        if not allow_incomplete and not split.complete:
            raise FeatcacheError(
                f"{self.path}: split {name!r} is incomplete (extraction did not finish); "
                "run `featcache extract` again to resume it"
            )
        return split

    def splits(self, role: str | None = None, *, allow_incomplete: bool = False) -> list[Split]:
        if role is not None and role not in ROLES:
            raise FeatcacheError(f"unknown role {role!r}; one of {', '.join(ROLES)}")
        out = []
        for name in self.split_names:
            split = Split(name, self.store)
            if role is None or split.role == role:
                out.append(self.split(name, allow_incomplete=allow_incomplete))
        return out

    def one_split(self, role: str) -> Split:
        found = self.splits(role, allow_incomplete=True)
        if not found:
            raise FeatcacheError(f"{self.path}: no split with role {role!r}")
        if len(found) > 1:
            raise FeatcacheError(f"{self.path}: {len(found)} splits with role {role!r}, the contract allows one")
        return self.split(found[0].name)

    def close(self):
        self.store.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def open_cache(path, *, storage_options: dict | None = None) -> Cache:
    """Open an HDF5 (`.h5`) or Zarr (`.zarr`) feature cache read-only.

    Refuses, with a one-line FeatcacheError, anything that is not a version-1 cache. Incomplete
    splits are listed but `Cache.split` refuses them.
    """
    store = open_store(path, "r", storage_options=storage_options)
    try:
        attrs = store.attrs("/")
        schema = attrs.get("schema")
        if schema is None:
            raise FeatcacheError(f"{path}: not a featcache cache (no 'schema' attribute at the root)")
        if schema != SCHEMA:
            if isinstance(schema, str) and schema.startswith(SCHEMA_PREFIX):
                raise FeatcacheError(
                    f"{path}: cache schema {schema!r} is not supported; this featcache reads {SCHEMA!r}"
                )
            raise FeatcacheError(f"{path}: unknown schema {schema!r}; expected {SCHEMA!r}")
        for node in ("/head/weight", "/head/bias"):
            if not store.has(node):
                raise FeatcacheError(f"{path}: missing dataset {node}")
    except Exception:
        store.close()
        raise
    return Cache(store)
