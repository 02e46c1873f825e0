"""`featcache verify`: prove a cache intact and true to the contract before trusting or sharing it."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from featcache.cache.integrity import content_fingerprint
from featcache.cache.reader import ChecksumMismatch, open_cache
from featcache.cache.schema import HEAD_ARRAYS, OPTIONAL_ROOT_ATTRS, ROOT_ATTRS, SPLIT_ARRAYS
from featcache.errors import FeatcacheError

# float32 logits from a model and features @ W.T + b agree to a few ulps of the magnitude of the
# terms summed; the bound scales with that magnitude instead of the (possibly cancelling) result.
LOGIT_RTOL = 1e-4


def logits_mismatch(features: np.ndarray, logits: np.ndarray, weight: np.ndarray, bias: np.ndarray) -> np.ndarray:
    """Boolean (N, K): where logits differ from features @ weight.T + bias beyond float32 tolerance."""
    f64 = features.astype(np.float64)
    expected = f64 @ weight.T.astype(np.float64) + bias
    scale = np.abs(f64) @ np.abs(weight.T.astype(np.float64)) + np.abs(bias) + 1e-6
    return np.abs(logits - expected) > LOGIT_RTOL * scale


def check_logits(features, logits, weight, bias, where: str) -> None:
    """Refuse a batch whose logits are not `features @ weight.T + bias` to float32 tolerance."""
    bad = logits_mismatch(features, logits, weight, bias)
    if bad.any():
        row = int(np.argwhere(bad)[0][0])
        raise FeatcacheError(
            f"{where}: logits differ from features @ head.weight.T + head.bias (first at row {row}, "
            f"{int(bad.sum())} entries); the head is not a plain linear layer on the pooled feature"
        )


@dataclass
class Check:
    ok: bool
    what: str


def verify(path, *, sample_rows: int = 512, storage_options: dict | None = None) -> list[Check]:
    """Every check of the contract that can be made from the cache alone.

    Beyond what opening a cache and reading through it already check (reader.py), this reads every
    array, including those no command has read yet, and checks NaN/Inf, labels, logits against
    features and head on sampled rows, the root attributes, the roles present, and recomputes the
    content fingerprint from the checksums of what it read.
    """
    checks: list[Check] = []

    def check(ok, what):
        checks.append(Check(bool(ok), what))
        return ok

    try:
        cache = open_cache(path, storage_options=storage_options)
    except FeatcacheError as exc:
        return [Check(False, str(exc))]
    with cache:
        check(True, f"schema {cache.attrs['schema']}; shapes, dtypes, roles and names as the contract says")
        missing = [k for k in ROOT_ATTRS if k not in cache.attrs and k not in OPTIONAL_ROOT_ATTRS]
        unrecorded = [k for k in OPTIONAL_ROOT_ATTRS if k not in cache.attrs]
        check(not missing, "root attributes present" + (f"; missing {', '.join(missing)}" if missing else "") +
              (f" ({', '.join(unrecorded)} not recorded)" if unrecorded else ""))
        read = {}  # what was read and matched its checksum: (head or split, dataset) -> checksum

        def verified(what, key, reader, checksum):
            try:
                values = reader()
            except ChecksumMismatch:
                check(False, f"{what}/{key}: checksum DIFFERS: the data changed after it was written")
                return None
            except FeatcacheError as exc:
                check(False, f"{what}/{key}: {exc}")
                return None
            check(True, f"{what}/{key}: checksum matches")
            read[what, key] = checksum
            return values

        weight = verified("head", "weight", lambda: cache.head_weight, cache.layout.head_checksums["weight"])
        bias = verified("head", "bias", lambda: cache.head_bias, cache.layout.head_checksums["bias"])
        k, d = cache.layout.head_shape
        splits = cache.splits(allow_incomplete=True)
        roles = [s.role for s in splits]
        for role in ("id_train", "id_val", "id_test"):
            check(roles.count(role) == 1, f"exactly one {role} split (found {roles.count(role)})")
        check(roles.count("ood") >= 1, f"at least one ood split (found {roles.count('ood')})")
        for split in splits:
            attrs, name, n = split.attrs, split.name, split.n
            if not check(split.complete, f"{name}: complete" if split.complete else
                         f"{name}: INCOMPLETE ({attrs.get('rows_written', 0)} of {n} rows written)"):
                continue
            rows = np.unique(np.linspace(0, n - 1, min(n, sample_rows)).astype(int)) if n else np.arange(0)
            sampled, ids = {}, None
            stored = cache.layout.checksums[name]
            for key in ("ids", *(a for a in SPLIT_ARRAYS if a != "ids")):  # each read once, ids first to name samples
                values = verified(name, key, lambda key=key: split.read(key), stored[key])
                if values is None:
                    continue
                if key == "ids":
                    ids = values
                if values.dtype.kind == "f":
                    bad = ~np.isfinite(values)
                    first = int(np.argwhere(bad)[0][0]) if bad.any() else None
                    check(not bad.any(), f"{name}/{key}: finite" if not bad.any() else
                          f"{name}/{key}: {int(bad.sum())} NaN or Inf values, first in "
                          + (f"sample {str(ids[first])!r}" if ids is not None else f"row {first}"))
                if key == "labels":
                    if attrs["role"] in ("ood", "pseudo_ood"):
                        check((values == -1).all(), f"{name}: labels all -1")
                    else:
                        check(((values >= 0) & (values < k)).all(), f"{name}: labels in [0, {k})")
                if key in ("features", "logits") and n:
                    sampled[key] = values[rows]
            if weight is not None and bias is not None and len(sampled) == 2:
                bad = logits_mismatch(sampled["features"], sampled["logits"], weight, bias)
                check(not bad.any(), f"{name}: logits = features @ W.T + b on {len(rows)} sampled rows" + (
                    "" if not bad.any() else f" FAILS in {int(bad.any(axis=1).sum())} rows"))
        everything = len(read) == 2 + len(SPLIT_ARRAYS) * len(splits)
        if everything:  # every array read and equal to its checksum: the content fingerprint, recomputed
            again = content_fingerprint({key: read["head", key] for key in HEAD_ARRAYS}, {
                s.name: (s.role, {key: read[s.name, key] for key in SPLIT_ARRAYS}) for s in splits})
            check(again == cache.attrs["fingerprint"], "fingerprint recomputed from the content " + (
                "matches" if again == cache.attrs["fingerprint"] else "DIFFERS"))
        else:
            check(False, "fingerprint not recomputed: not every array could be read and checked")
    return checks
