"""Checksums, the content fingerprint (cache-schema.md, version 2), and the names a cache may hold.

A dataset's checksum is the sha256 of its contents: numbers as little-endian C-order bytes of the
stored dtype, strings as their UTF-8 text joined with "\\n". The fingerprint hashes those checksums
in a fixed order (`content_fingerprint`), so anyone can recompute it from the arrays alone.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections import deque
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from featcache.cache.schema import HEAD_ARRAYS, SCHEMA, SPLIT_ARRAYS
from featcache.errors import FeatcacheError

_HEX64 = re.compile(r"[0-9a-f]{64}\Z")
# Blocks at least this large are hashed in a background thread while the next one is read.
THREAD_BYTES = 1 << 20


def array_checksum(values: np.ndarray) -> str:
    """sha256 of an array's contents; strings as utf-8 lines, numbers as little-endian C-order bytes."""
    digest = Checksum(values.dtype.kind in "UOST")
    digest.update(values)
    return digest.hexdigest()


class Checksum:
    """`array_checksum` fed block by block of whole rows, in order.

    With `threaded`, numeric blocks are hashed in one background thread while the caller reads the
    next block: hashlib releases the GIL while it hashes, so reading and hashing overlap. A block
    handed to `update` must not change until `hexdigest` returns; at most two wait in the queue.
    """

    def __init__(self, strings: bool, threaded: bool = False):
        self.strings = strings
        self._digest = hashlib.sha256()
        self._first = True
        self._pool = ThreadPoolExecutor(1) if threaded else None
        self._pending: deque = deque()

    def update(self, block) -> None:
        if self.strings:
            values = block.tolist() if isinstance(block, np.ndarray) else list(block)
            if not values:
                return
            text = "\n".join(map(str, values))
            self._digest.update(((("" if self._first else "\n") + text)).encode("utf-8"))
            self._first = False
            return
        block = np.ascontiguousarray(block, dtype=block.dtype.newbyteorder("<"))
        if self._pool is None or block.nbytes < THREAD_BYTES:
            self._drain(0)
            self._digest.update(block)
            return
        self._drain(1)  # bounded: a reader never runs more than two blocks ahead of the hash
        self._pending.append(self._pool.submit(self._digest.update, block))

    def _drain(self, keep: int) -> None:
        while len(self._pending) > keep:
            self._pending.popleft().result()

    def hexdigest(self) -> str:
        self.close()
        return self._digest.hexdigest()

    def close(self) -> None:
        self._drain(0)
        if self._pool is not None:
            self._pool.shutdown()
            self._pool = None


def content_fingerprint(head_checksums: dict, splits: dict) -> str:
    """The cache's fingerprint: sha256 (hex) of these UTF-8 lines, each ending in "\\n":

        featcache-cache/2
        head/weight <checksum>
        head/bias <checksum>
        splits/<name> <role>                  for every split in sorted name order, followed by
        splits/<name>/<dataset> <checksum>    features, chan_max, chan_mean, logits, labels, ids

    `head_checksums` is {"weight": hex, "bias": hex}; `splits` maps each split name to
    (role, {dataset: hex}). Dates, paths and versions never enter it: equal fingerprints, equal numbers.
    """
    lines = [SCHEMA] + [f"head/{key} {head_checksums[key]}" for key in HEAD_ARRAYS]
    for name in sorted(splits):
        role, checksums = splits[name]
        lines.append(f"splits/{name} {role}")
        lines.extend(f"splits/{name}/{key} {checksums[key]}" for key in SPLIT_ARRAYS)
    return hashlib.sha256("".join(line + "\n" for line in lines).encode("utf-8")).hexdigest()


def checksum_attr(value, keys, where: str) -> dict:
    """A `checksums` attribute: JSON {key: 64 lowercase hex digits} holding every one of `keys`."""
    try:
        parsed = json.loads(value) if isinstance(value, str) else None
    except ValueError:
        parsed = None
    if not isinstance(parsed, dict):
        raise FeatcacheError(f"{where}: attribute 'checksums' is {_short(value)}, not a JSON object of sha256 checksums")
    missing = [key for key in keys if key not in parsed]
    if missing:
        raise FeatcacheError(f"{where}: attribute 'checksums' has no checksum for {', '.join(missing)}")
    bad = [key for key in keys if not (isinstance(parsed[key], str) and _HEX64.match(parsed[key]))]
    if bad:
        raise FeatcacheError(f"{where}: attribute 'checksums' holds {_short(parsed[bad[0]])} for {bad[0]}, "
                             "not a sha256 in hex")
    return {key: parsed[key] for key in keys}


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _control(text: str) -> bool:
    return any(ord(c) < 32 or 127 <= ord(c) < 160 for c in text)


def name_problem(name) -> str | None:
    """Why a split name is not a plain name (None if it is): not empty, no path separator ('/' or
    '\\\\'), not '.' or '..', no control character. Split names become group and file names."""
    if not isinstance(name, str) or not name:
        return "it is empty"
    if "/" in name or "\\" in name:
        return "it contains a path separator"
    if name in (".", ".."):
        return "'.' and '..' name directories"
    if _control(name):
        return "it contains a control character"
    return None


# Sample ids are relative names ("digits/17", "train/cat/001.png"): '/' separates their parts, but
# no part is '.' or '..', none starts at the root, and none holds a backslash (a separator elsewhere)
# or a control character ("\n" would also make the joined-text checksum ambiguous).
_BAD_ID = re.compile(r"[\x00-\x1f\x7f-\x9f\\]|^$|^/|(?:^|/)\.\.?(?:/|$)")
_BAD_IDS = re.compile(r"[\x00-\x09\x0b-\x1f\x7f-\x9f\\]|^$|^/|(?:^|/)\.\.?(?:/|$)", re.MULTILINE)


def check_ids(ids: list, where: str, offset: int = 0) -> None:
    """Refuse sample ids that are not plain relative names, naming the first one and its row."""
    text = "\n".join(ids)
    if text.count("\n") == len(ids) - 1 and not _BAD_IDS.search(text):
        return  # one scan over all ids: the usual case
    for i, value in enumerate(ids):
        if _BAD_ID.search(value):
            raise FeatcacheError(f"{where}: sample {offset + i} has id {_short(value)}; a sample id must be a non-empty "
                                 "relative name without '.' or '..' parts, backslashes or control characters")
