"""Copying caches: HDF5 <-> Zarr without loss, and joining the shards of one extraction."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from featcache.cache.reader import Cache, open_cache
from featcache.cache.schema import SPLIT_ARRAYS
from featcache.cache.writer import CacheWriter
from featcache.errors import FeatcacheError

COPY_ROWS = 4096
OWN_SPLIT_ATTRS = {"role", "source", "n", "complete", "rows_written", "write_rows", "checksums",
                   "chan_mean_is_features", "shard_index", "shard_count", "row_offset", "total_n"}
OWN_ROOT_ATTRS = {"schema", "fingerprint", "shard"}


def _write_split(writer: CacheWriter, name: str, attrs: dict, parts: list, dims: dict) -> None:
    """Write split `name` from `parts`, (split, rows) pairs read in order, in chunks of rows."""
    n = sum(len(range(*rows.indices(split.n))) for split, rows in parts)
    extra = {k: v for k, v in attrs.items() if k not in OWN_SPLIT_ATTRS}
    # chan_mean is linked to (or stored as) the features only where every source holds the same
    # bytes in both, as their checksums say: an attribute claiming so over other means would drop them
    same = all(split.same_contents("chan_mean", "features") for split, _ in parts)
    out = writer.split(name, role=attrs["role"], source=attrs["source"], n=n, dims=dims,
                       chan_mean_is_features=same, extra_attrs=extra, write_rows=COPY_ROWS)
    if out.complete:
        return
    if out.rows_written:  # a resumed copy starts the split again: simpler than finding the part
        out.rows_written = 0
    for split, rows in parts:
        start, stop, _ = rows.indices(split.n)
        for a in range(start, stop, COPY_ROWS):
            block = slice(a, min(a + COPY_ROWS, stop))
            out.append({key: split.read(key, block) for key in SPLIT_ARRAYS})
    out.finish()


def _dims(cache: Cache, split) -> dict:
    k, d = cache.store.shape("/head/weight")
    return {"D": d, "C": split.shape("chan_max")[1], "K": k}


def convert(source, target, *, overwrite: bool = False) -> Path:
    """Copy a complete cache to another path, the format chosen by the target's suffix.

    Every checksum of the source is verified before anything is written, so a damaged cache is
    refused instead of being copied into one whose fresh checksums would call it intact.
    """
    with open_cache(source) as cache:
        if Path(str(target)).resolve() == Path(str(source)).resolve():
            raise FeatcacheError(f"{target}: the target is the source")
        splits = cache.splits()  # refuses incomplete splits: a partial cache is never copied as whole
        cache.verify_all()  # the slices copied below come from these verified datasets
        writer = CacheWriter(target, overwrite=overwrite)
        try:
            root = {k: v for k, v in cache.attrs.items() if k not in OWN_ROOT_ATTRS}
            # a partial left by a copy of another cache is started again, not finished with this one's rows
            writer.open(root, cache.head_weight, cache.head_bias, resume_key={"copy of": cache.fingerprint})
            for split in splits:
                _write_split(writer, split.name, split.attrs, [(split, slice(None))], _dims(cache, split))
            return writer.finish()
        finally:
            writer.close()


def merge(shards, target, *, overwrite: bool = False) -> Path:
    """Join the shard caches of one extraction (`featcache extract --shard i/n`) into one cache.

    The shards must come from the same head, checkpoint and preprocessing, and together be every
    shard 0..n-1; rows are joined in shard order, so the result equals a single-process run,
    fingerprint included. Every shard's checksums are verified before anything is written.
    """
    caches = [open_cache(path) for path in shards]
    try:
        info = []
        for cache in caches:
            shard = cache.attrs.get("shard")
            if not shard:
                raise FeatcacheError(f"{cache.path}: not a shard (no 'shard' attribute); extract with --shard i/n")
            index, count = (int(v) for v in str(shard).split("/"))
            info.append((index, count, cache))
        counts = {count for _, count, _ in info}
        indexes = sorted(index for index, _, _ in info)
        if len(counts) != 1 or indexes != list(range(counts.pop())):
            raise FeatcacheError(f"shards {', '.join(str(c.path) for c in caches)} are not one complete set "
                                 f"(have {', '.join(str(i) + '/' + str(n) for i, n, _ in info)})")
        info.sort(key=lambda t: t[0])
        for _, _, cache in info:
            cache.splits()  # refuses incomplete splits
            cache.verify_all()
        first = info[0][2]
        for _, _, cache in info[1:]:
            for key in ("checkpoint_sha256", "preprocessing", "backbone", "feature_layer", "prepool_layer", "precision"):
                if cache.attrs.get(key) != first.attrs.get(key):
                    raise FeatcacheError(f"{cache.path}: {key} differs from {first.path}; not shards of one extraction")
            if not (np.array_equal(cache.head_weight, first.head_weight) and np.array_equal(cache.head_bias, first.head_bias)):
                raise FeatcacheError(f"{cache.path}: head differs from {first.path}; not shards of one extraction")
            if cache.split_names != first.split_names:
                raise FeatcacheError(f"{cache.path}: splits differ from {first.path}")
            for name in first.split_names:
                # whether chan_mean was stored as the features (autocast stores the means since 2026-12-05):
                # shards that differ would join two kinds of rows no single run writes
                mine, theirs = (bool(c.split(name).attrs.get("chan_mean_is_features")) for c in (cache, first))
                if mine != theirs:
                    raise FeatcacheError(f"{cache.path}: split {name!r} stores chan_mean {'as' if mine else 'apart from'} "
                                         f"the features, {first.path} {'as' if theirs else 'apart from'} them; "
                                         "not shards of one extraction (extract them again with one featcache)")
        writer = CacheWriter(target, overwrite=overwrite)
        try:
            root = {k: v for k, v in first.attrs.items() if k not in OWN_ROOT_ATTRS}
            writer.open(root, first.head_weight, first.head_bias,
                        resume_key={"merge of": [cache.fingerprint for _, _, cache in info]})
            for name in first.split_names:
                parts = [(cache.split(name), slice(None)) for _, _, cache in info]
                total = parts[0][0].attrs.get("total_n")
                if total is not None and sum(p.n for p, _ in parts) != total:
                    raise FeatcacheError(f"split {name!r}: shards hold {sum(p.n for p, _ in parts)} rows, "
                                         f"the extraction had {total}")
                _write_split(writer, name, parts[0][0].attrs, parts, _dims(first, parts[0][0]))
            return writer.finish()
        finally:
            writer.close()
    finally:
        for cache in caches:
            cache.close()
