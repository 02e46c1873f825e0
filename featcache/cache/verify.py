"""`featcache verify`: prove a cache intact and true to the contract before trusting or sharing it."""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np

from featcache.cache.reader import open_cache
from featcache.cache.schema import ROLES, ROOT_ATTRS, SPLIT_ARRAYS, SPLIT_ATTRS
from featcache.cache.writer import array_checksum, fingerprint
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
    """Every check of the contract that can be made from the cache alone."""
    checks: list[Check] = []

    def check(ok, what):
        checks.append(Check(bool(ok), what))
        return ok

    try:
        cache = open_cache(path, storage_options=storage_options)
    except FeatcacheError as exc:
        return [Check(False, str(exc))]
    with cache:
        check(True, f"schema {cache.attrs['schema']}")
        missing = [k for k in ROOT_ATTRS if k not in cache.attrs]
        check(not missing, "root attributes present" + (f"; missing {', '.join(missing)}" if missing else ""))
        weight, bias = cache.head_weight, cache.head_bias
        head_ok = check(weight.ndim == 2 and weight.dtype == np.float32 and bias.shape == (weight.shape[0],)
                        and bias.dtype == np.float32, f"head weight {weight.shape} {weight.dtype}, bias {bias.shape} {bias.dtype}")
        k, d = weight.shape if weight.ndim == 2 else (None, None)
        splits = cache.splits(allow_incomplete=True)
        roles = [s.role for s in splits]
        for role in ("id_train", "id_val", "id_test"):
            check(roles.count(role) == 1, f"exactly one {role} split (found {roles.count(role)})")
        check(roles.count("ood") >= 1, f"at least one ood split (found {roles.count('ood')})")
        ids = {}
        for split in splits:
            attrs = split.attrs
            name = split.name
            absent = [a for a in SPLIT_ATTRS if a not in attrs]
            if not check(not absent, f"{name}: attributes" + (f" missing {', '.join(absent)}" if absent else " present")):
                continue
            check(attrs["role"] in ROLES, f"{name}: role {attrs['role']!r}")
            check(attrs["complete"], f"{name}: complete" if attrs["complete"] else
                  f"{name}: INCOMPLETE ({attrs.get('rows_written', 0)} of {attrs['n']} rows written)")
            n = int(attrs["n"])
            present = {key: split.has(key) for key in SPLIT_ARRAYS}
            if not check(all(present.values()), f"{name}: datasets " + (
                    "all present" if all(present.values()) else "missing " + ", ".join(k for k, v in present.items() if not v))):
                continue
            c = split.shape("chan_max")[1] if len(split.shape("chan_max")) == 2 else None
            expected = {"D": d, "C": c, "K": k}
            for key, (dtype, dim) in SPLIT_ARRAYS.items():
                shape = (n,) if dim is None else (n, expected[dim])
                check(split.shape(key) == shape and split.dtype(key) == dtype,
                      f"{name}/{key}: {split.dtype(key)} {split.shape(key)}" + (
                          "" if split.shape(key) == shape and split.dtype(key) == dtype else f", expected {dtype} {shape}"))
            stored = json.loads(attrs.get("checksums") or "{}")
            check(stored, f"{name}: checksums stored" if stored else f"{name}: no checksums stored")
            logits_ok = head_ok and n and split.shape("features") == (n, d) and split.shape("logits") == (n, k)
            rows = np.unique(np.linspace(0, n - 1, min(n, sample_rows)).astype(int)) if n else np.arange(0)
            sampled = {}
            ids[name] = split.read("ids")
            for key in SPLIT_ARRAYS:  # each array read once: checksum, finiteness and samples from one read
                values = ids[name] if key == "ids" else split.read(key)
                if stored:
                    same = array_checksum(values) == stored.get(key)
                    check(same, f"{name}/{key}: checksum " + ("matches" if same else
                                                               "DIFFERS: the data changed after it was written"))
                if values.dtype.kind == "f":
                    bad = ~np.isfinite(values)
                    check(not bad.any(), f"{name}/{key}: finite" if not bad.any() else
                          f"{name}/{key}: {int(bad.sum())} NaN or Inf values, first in sample "
                          f"{str(ids[name][int(np.argwhere(bad)[0][0])])!r}")
                if key == "labels":
                    if attrs["role"] in ("ood", "pseudo_ood"):
                        check((values == -1).all(), f"{name}: labels all -1")
                    elif k is not None:
                        check(((values >= 0) & (values < k)).all(), f"{name}: labels in [0, {k})")
                if key in ("features", "logits") and logits_ok:
                    sampled[key] = values[rows]
            if logits_ok:
                bad = logits_mismatch(sampled["features"], sampled["logits"], weight, bias)
                check(not bad.any(), f"{name}: logits = features @ W.T + b on {len(rows)} sampled rows" + (
                    "" if not bad.any() else f" FAILS in {int(bad.any(axis=1).sum())} rows"))
        preprocessing = cache.attrs.get("preprocessing")
        if preprocessing and head_ok and len(ids) == len(splits):
            again = fingerprint(weight, bias, json.loads(preprocessing), ids)
            check(again == cache.fingerprint, "fingerprint recomputed from head, preprocessing and ids " + (
                "matches" if again == cache.fingerprint else "DIFFERS"))
    return checks
