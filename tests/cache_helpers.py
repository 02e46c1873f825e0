"""Independent computations of the version-2 checksums and fingerprint (cache-schema.md), straight
from h5py/zarr and hashlib, for tests that check featcache against them or craft caches with them."""

import hashlib
import json

import h5py
import numpy as np

ARRAYS = ("features", "chan_max", "chan_mean", "logits", "labels", "ids")


def sha(values) -> str:
    """The schema's dataset checksum: little-endian C-order bytes, or UTF-8 text joined with "\\n"."""
    values = np.asarray(values)
    if values.dtype.kind in "OSUT":
        text = "\n".join(v.decode() if isinstance(v, bytes) else str(v) for v in values.tolist())
        return hashlib.sha256(text.encode("utf-8")).hexdigest()
    return hashlib.sha256(values.astype(values.dtype.newbyteorder("<")).tobytes(order="C")).hexdigest()


def fingerprint_text(head: dict, splits: dict) -> str:
    """The schema's fingerprint lines, written out: head {weight, bias} -> hex, splits name -> (role, {dataset: hex})."""
    text = f"featcache-cache/2\nhead/weight {head['weight']}\nhead/bias {head['bias']}\n"
    for name in sorted(splits):
        role, sums = splits[name]
        text += f"splits/{name} {role}\n" + "".join(f"splits/{name}/{key} {sums[key]}\n" for key in ARRAYS)
    return text


def h5_content(path) -> tuple[dict, dict]:
    """(head checksums, splits name -> (role, checksums)) computed from the arrays of an HDF5 cache."""
    with h5py.File(path, "r") as fh:
        head = {key: sha(fh[f"head/{key}"][...]) for key in ("weight", "bias")}
        splits = {}
        for name, group in fh["splits"].items():
            role = group.attrs["role"]
            role = role.decode() if isinstance(role, bytes) else str(role)
            splits[name] = (role, {key: sha(group[key][...]) for key in ARRAYS})
    return head, splits


def zarr_content(path) -> tuple[dict, dict]:
    import zarr

    root = zarr.open_group(str(path), mode="r")
    head = {key: sha(np.asarray(root[f"head/{key}"][...])) for key in ("weight", "bias")}
    splits = {}
    for name, group in root["splits"].groups():
        splits[name] = (group.attrs["role"], {key: sha(np.asarray(group[key][...])) for key in ARRAYS})
    return head, splits


def content_fingerprint_of(path) -> str:
    head, splits = (zarr_content if str(path).endswith(".zarr") else h5_content)(path)
    return hashlib.sha256(fingerprint_text(head, splits).encode("utf-8")).hexdigest()


def restamp(path) -> None:
    """Rewrite an HDF5 cache's checksum attributes and fingerprint from its arrays, as a writer
    would have: a crafted cache then differs only in what the test changed."""
    head, splits = h5_content(path)
    with h5py.File(path, "r+") as fh:
        fh["head"].attrs["checksums"] = json.dumps(head)
        for name, (_, sums) in splits.items():
            fh[f"splits/{name}"].attrs["checksums"] = json.dumps(sums)
        fh.attrs["fingerprint"] = hashlib.sha256(fingerprint_text(head, splits).encode()).hexdigest()
