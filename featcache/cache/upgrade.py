"""`featcache upgrade CACHE`: a version-1 cache rewritten as version 2, in place.

Version 1 stored the same per-split checksums as version 2 but a fingerprint made of the head, the
preprocessing and the ids, not the numbers. Upgrading checks the cache as a reader would, verifies
every stored checksum against the data, and then rewrites only attributes: the head's `checksums`,
and at the root the schema, the content fingerprint and, for provenance version 1 did not record,
"unknown (...)". No array is written.
"""

from __future__ import annotations

import json

from featcache.cache.integrity import array_checksum, content_fingerprint
from featcache.cache.reader import check_schema, inspect_layout, stream_checksum
from featcache.cache.schema import HEAD_ARRAYS, SCHEMA, SCHEMA_V1, SPLIT_ARRAYS
from featcache.cache.store import open_store
from featcache.errors import FeatcacheError, NextStep

NEW_IN_V2 = ("precision", "device", "preprocessing", "prepool_size")


def upgrade(path) -> str:
    """Upgrade the version-1 cache at `path` to version 2; returns a line saying what was done."""
    store = open_store(path, "r+")
    try:
        schema = store.attrs("/").get("schema")
        if schema == SCHEMA:
            return f"{path}: already {SCHEMA}; nothing to do"
        if schema != SCHEMA_V1:
            check_schema(schema, path)  # names what it is instead
        layout = inspect_layout(store, path, version1=True)
        if layout.incomplete:
            raise NextStep(f"{path}: split {layout.incomplete[0]!r} is incomplete; only a finished cache "
                           "can be upgraded", "featcache extract PIPELINE", "again to finish it")
        for name, checksums in layout.checksums.items():
            for key in SPLIT_ARRAYS:
                where = f"{path}: split {name!r} dataset {key!r}"
                actual, _ = stream_checksum(store, f"/splits/{name}/{key}", where)
                if actual != checksums[key]:
                    raise FeatcacheError(f"{where}: checksum differs from the one stored when it was written; "
                                         "the cache is damaged and is not upgraded")
        head = {key: array_checksum(store.read(f"/head/{key}")) for key in HEAD_ARRAYS}
        layout.head_checksums = head
        fingerprint = layout.fingerprint()
        root = store.attrs("/")
        unknown = {key: f"unknown ({SCHEMA_V1})" for key in NEW_IN_V2 if key not in root}
        # Head first, root last: killed in between, the cache still says version 1 and can be upgraded again.
        store.set_attrs("/head", checksums=json.dumps(head, sort_keys=True))
        store.flush()
        store.set_attrs("/", **unknown, fingerprint=fingerprint, schema=SCHEMA)
        store.flush()
    finally:
        store.close()
    return f"{path}: every checksum verified; upgraded from {SCHEMA_V1} to {SCHEMA}, fingerprint {fingerprint}"
