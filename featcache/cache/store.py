"""One small interface over h5py and zarr, so everything above it is format-blind.

Only what the cache needs: groups addressed by '/'-separated paths, attributes as plain Python
values, arrays of whole rows, and utf-8 string arrays.
"""

from __future__ import annotations

import os

import numpy as np

from featcache.errors import FeatcacheError, missing_cache


def _plain(value):
    """Attributes come back as numpy scalars or arrays from h5py; readers want plain Python."""
    if isinstance(value, bytes):
        return value.decode("utf-8")
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return [_plain(v) for v in value.tolist()]
    return value


def row_chunks(shape, itemsize: int, target_bytes: int = 1 << 20, multiple_of: int | None = None):
    """Chunks of whole rows, about 1 MiB each: rows are what a writer appends and a reader slices.

    With `multiple_of`, the chunk height is a multiple of it (or a divisor of it), so that writes of
    that many rows never share a chunk with rows written before: a write killed half way can only
    damage rows not yet counted as written.
    """
    row_bytes = itemsize * int(np.prod(shape[1:], dtype=np.int64)) if len(shape) > 1 else itemsize
    rows = max(1, min(max(int(shape[0]), 1), target_bytes // max(row_bytes, 1)))
    if multiple_of:
        # fewer rows than one append: a single chunk, written by a single append
        rows = max(1, rows // multiple_of) * multiple_of if multiple_of <= shape[0] else max(int(shape[0]), 1)
    return (rows,) + tuple(int(s) for s in shape[1:])


BLOCK_BYTES = 8 << 20  # a streaming read's step: a few chunks, small enough to hash while the next is read


def block_rows(shape, itemsize: int, chunk_rows: int | None, target_bytes: int = BLOCK_BYTES) -> int:
    """Rows per block of a streaming read: about `target_bytes`, in whole chunks when chunked."""
    row_bytes = itemsize * int(np.prod(shape[1:], dtype=np.int64)) if len(shape) > 1 else itemsize
    rows = max(1, target_bytes // max(row_bytes, 1))
    if chunk_rows:
        rows = max(1, rows // chunk_rows) * chunk_rows
    return int(rows)


class Store:
    """Abstract store; see H5Store and ZarrStore."""

    fmt: str
    path: str

    def attrs(self, node: str = "/") -> dict: ...
    def set_attrs(self, node: str, **values) -> None: ...
    def has(self, node: str) -> bool: ...
    def groups(self, node: str) -> list[str]: ...
    def create_group(self, node: str) -> None: ...
    def delete(self, node: str) -> None: ...
    def create_array(self, node: str, shape, dtype, write_rows: int | None = None) -> None: ...
    def write(self, node: str, start: int, values) -> None: ...
    def read(self, node: str, rows: slice = slice(None)) -> np.ndarray: ...
    def blocks(self, node: str, out: np.ndarray | None = None): ...  # (start, stop, rows) over the whole array
    def foreign_storage(self) -> str | None: ...  # where the tree reaches outside its own bytes
    def shape(self, node: str) -> tuple: ...
    def dtype(self, node: str) -> str: ...
    def link(self, source: str, target: str) -> None: ...  # HDF5 only
    def flush(self) -> None: ...
    def close(self) -> None: ...

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class H5Store(Store):
    fmt = "h5"

    def __init__(self, path, mode: str):
        import h5py

        self.path = str(path)
        self._writing: dict = {}
        try:
            # Readers lock "best effort": a cache shared on a read-only or lock-less file system still opens.
            self._file = h5py.File(self.path, mode, locking="best-effort" if mode == "r" else True)
        except FileNotFoundError:
            if mode in ("r", "r+"):  # reading a cache that is not there: name the command that makes it
                raise missing_cache(self.path) from None
            raise FeatcacheError(f"{self.path}: no such cache file") from None
        except PermissionError:
            raise FeatcacheError(f"{self.path}: permission denied") from None
        except OSError as exc:
            raise FeatcacheError(f"{self.path}: not a readable HDF5 file ({_first_line(exc)})") from None

    def attrs(self, node="/"):
        return {k: _plain(v) for k, v in self._file[node].attrs.items()}

    def set_attrs(self, node, **values):
        attrs = self._file[node].attrs
        for key, value in values.items():
            attrs[key] = str(value) if isinstance(value, str) else value  # str subclasses confuse h5py

    def has(self, node):
        return node in self._file

    def groups(self, node):
        import h5py

        if node not in self._file:
            return []
        return sorted(k for k, v in self._file[node].items() if isinstance(v, h5py.Group))

    def create_group(self, node):
        self._file.require_group(node)

    def delete(self, node):
        self._writing = {k: v for k, v in self._writing.items() if k != node and not k.startswith(node + "/")}
        if node in self._file:
            del self._file[node]

    def create_array(self, node, shape, dtype, write_rows=None):
        import h5py

        if dtype == "str":
            dtype_ = h5py.string_dtype("utf-8")
            chunks = row_chunks(shape, 64, multiple_of=write_rows)
        else:
            dtype_ = np.dtype(dtype)
            chunks = row_chunks(shape, dtype_.itemsize, multiple_of=write_rows)
        self._file.create_dataset(node, shape=tuple(shape), dtype=dtype_, chunks=chunks if shape[0] else None)

    def write(self, node, start, values):
        values = np.asarray(values)
        if values.dtype.kind == "U":
            values = values.astype(object)
        # Datasets written to stay open: one closed after each write would flush its chunk cache
        # as it goes, and a flush that fails (a full disk) is then only printed, never raised.
        if node not in self._writing:
            self._writing[node] = self._file[node]
        self._writing[node][start : start + len(values)] = values

    def read(self, node, rows=slice(None)):
        ds = self._file[node]
        if ds.dtype.kind == "O" or ds.dtype.kind == "S":
            return np.asarray(ds.asstr()[rows], dtype=str)
        if rows == slice(None) and ds.shape and ds.shape[0]:
            out = np.empty(ds.shape, dtype=ds.dtype)
            ds.read_direct(out)  # several times faster than ds[...] for large arrays
            return out
        return ds[rows]

    def blocks(self, node, out=None):
        """(start, stop, rows) over the whole dataset, chunk-aligned: numbers as arrays (read into
        out[start:stop] when `out` is given), strings as lists of str."""
        ds = self._file[node]
        strings = ds.dtype.kind in "OS"
        step = block_rows(ds.shape, 64 if strings else ds.dtype.itemsize, ds.chunks[0] if ds.chunks else None)
        for start in range(0, ds.shape[0], step):
            stop = min(ds.shape[0], start + step)
            if strings:
                yield start, stop, ds.asstr()[start:stop].tolist()
                continue
            rows = out[start:stop] if out is not None else np.empty((stop - start,) + ds.shape[1:], ds.dtype)
            ds.read_direct(rows, np.s_[start:stop])
            yield start, stop, rows

    def foreign_storage(self):
        """The first link or dataset whose bytes live outside this file: an external or soft link,
        a dataset with external storage, a virtual dataset; None when the file holds its own bytes."""
        import h5py

        found = []

        def link(name, value):
            if isinstance(value, h5py.ExternalLink):
                found.append(f"/{name} is an external link to {value.filename}:{value.path}")
            elif isinstance(value, h5py.SoftLink):
                found.append(f"/{name} is a soft link to {value.path}")
            return True if found else None  # anything but None stops the visit

        def dataset(name, value):
            if isinstance(value, h5py.Dataset):
                if value.is_virtual:
                    found.append(f"/{name} is a virtual dataset")
                elif value.external:
                    found.append(f"/{name} stores its data in external file {value.external[0][0]!r}")
            return True if found else None

        self._file.visititems_links(link)
        if not found:
            self._file.visititems(dataset)
        return found[0] if found else None

    def shape(self, node):
        return tuple(self._file[node].shape)

    def dtype(self, node):
        ds = self._file[node]
        return "str" if ds.dtype.kind in "OS" else str(ds.dtype)

    def link(self, source, target):
        self._file[target] = self._file[source]  # an HDF5 hard link: one copy on disk, two names

    def flush(self):
        self._file.flush()

    def close(self):
        self._writing = {}
        if self._file.id.valid:
            self._file.close()


class ZarrStore(Store):
    fmt = "zarr"

    def __init__(self, path, mode: str, storage_options: dict | None = None):
        import zarr

        self.path = str(path)
        try:
            if mode == "w":
                self._root = zarr.open_group(self.path, mode="w", zarr_format=3)
            elif self.path.endswith(".zip") and "://" not in self.path:
                if mode != "r":
                    raise FeatcacheError(f"{self.path}: a zipped Zarr store can only be read")
                if not os.path.exists(self.path):
                    raise FileNotFoundError(self.path)
                self._zip = zarr.storage.ZipStore(self.path, mode="r")
                self._root = zarr.open_group(store=self._zip, mode="r", zarr_format=3)
            else:
                # a local path or an fsspec URL (file://, s3://, gs://...; storage_options go to fsspec)
                self._root = zarr.open_group(
                    self.path, mode=mode, zarr_format=3, storage_options=storage_options
                )
        except FileNotFoundError:
            if os.path.isdir(self.path):
                raise FeatcacheError(f"{self.path}: a directory but not a Zarr store (no zarr.json)") from None
            if mode in ("r", "r+"):
                raise missing_cache(self.path, "Zarr store") from None
            raise FeatcacheError(f"{self.path}: no such Zarr store") from None
        except PermissionError:
            raise FeatcacheError(f"{self.path}: permission denied") from None
        except FeatcacheError:
            raise
        except Exception as exc:  # zarr raises many types for "not a zarr group"
            raise FeatcacheError(f"{self.path}: not a readable Zarr v3 store ({_first_line(exc)})") from None

    def _node(self, node):
        node = node.strip("/")
        return self._root if not node else self._root[node]

    def attrs(self, node="/"):
        return {k: _plain(v) for k, v in self._node(node).attrs.asdict().items()}

    def set_attrs(self, node, **values):
        self._node(node).attrs.update({k: _plain(v) for k, v in values.items()})

    def has(self, node):
        node = node.strip("/")
        if not node:
            return True
        try:
            self._root[node]
            return True
        except KeyError:
            return False

    def groups(self, node):
        import zarr

        if not self.has(node):
            return []
        return sorted(name for name, _ in self._node(node).members() if isinstance(_, zarr.Group))

    def create_group(self, node):
        self._root.require_group(node.strip("/"))

    def delete(self, node):
        parent, _, name = node.strip("/").rpartition("/")
        if self.has(node):
            del self._node(parent)[name]

    def create_array(self, node, shape, dtype, write_rows=None):
        itemsize = 64 if dtype == "str" else np.dtype(dtype).itemsize
        self._root.create_array(
            node.strip("/"), shape=tuple(shape), dtype=str if dtype == "str" else dtype,
            chunks=row_chunks(shape, itemsize, multiple_of=write_rows), fill_value="" if dtype == "str" else 0,
        )

    def write(self, node, start, values):
        values = np.asarray(values)
        self._node(node)[start : start + len(values)] = values

    def read(self, node, rows=slice(None)):
        arr = self._node(node)[rows]
        return np.array(np.asarray(arr).tolist(), dtype=str) if self.dtype(node) == "str" else np.asarray(arr)

    def blocks(self, node, out=None):
        """As H5Store.blocks; a chunk file that is missing reads as fill values (which checksums catch)."""
        arr = self._node(node)
        strings = self.dtype(node) == "str"
        step = block_rows(arr.shape, 64 if strings else arr.dtype.itemsize, arr.chunks[0])
        for start in range(0, arr.shape[0], step):
            stop = min(arr.shape[0], start + step)
            rows = np.asarray(arr[start:stop])
            if strings:
                yield start, stop, rows.tolist()
            elif out is not None:
                out[start:stop] = rows
                yield start, stop, out[start:stop]
            else:
                yield start, stop, rows

    def foreign_storage(self):
        return None  # a Zarr store has no links; its chunks are checked by their checksums

    def shape(self, node):
        return tuple(self._node(node).shape)

    def dtype(self, node):
        dt = self._node(node).dtype
        return "str" if getattr(dt, "kind", "T") in "TOUS" else str(dt)

    def flush(self):
        pass

    def close(self):
        zipped = getattr(self, "_zip", None)
        if zipped is not None:
            zipped.close()


def _first_line(exc) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def open_store(path, mode: str = "r", *, fmt: str | None = None, storage_options: dict | None = None) -> Store:
    """Open `path` as HDF5 or Zarr; the format comes from the suffix unless `fmt` names it."""
    from featcache.cache.schema import format_of

    if (fmt or format_of(path)) == "h5":
        return H5Store(path, mode)
    return ZarrStore(path, mode, storage_options=storage_options)
