"""Constants of the cache contract (shared/cache-schema.md, version 2)."""

SCHEMA = "featcache-cache/2"
SCHEMA_V1 = "featcache-cache/1"  # refused by readers; `featcache upgrade` rewrites it as version 2
SCHEMA_PREFIX = "featcache-cache/"

ROLES = ("id_train", "id_val", "id_test", "ood", "pseudo_ood")

HEAD_ARRAYS = ("weight", "bias")

# dataset name -> (dtype, which second dimension: "D" features, "C" channels, "K" classes, None 1-d)
SPLIT_ARRAYS = {
    "features": ("float32", "D"),
    "chan_max": ("float32", "C"),
    "chan_mean": ("float32", "C"),
    "logits": ("float32", "K"),
    "labels": ("int64", None),
    "ids": ("str", None),
}

ROOT_ATTRS = (
    "schema",
    "fingerprint",
    "created_utc",
    "featcache_version",
    "torch_version",
    "precision",
    "device",
    "preprocessing",
    "backbone",
    "checkpoint_sha256",
    "feature_layer",
    "prepool_layer",
    "prepool_size",
)

# Provenance that version 2 records but whose absence `verify` tolerates (extractions before it, or
# other writers): neither enters the fingerprint.
OPTIONAL_ROOT_ATTRS = ("precision", "device")

SPLIT_ATTRS = ("role", "source", "n", "complete")

SUFFIXES = {".h5": "h5", ".zarr": "zarr", ".zip": "zarr"}  # .zip: a zipped Zarr store, read-only


def format_of(path) -> str:
    """'h5' or 'zarr' from the path's suffix; the contract chooses the format by suffix alone."""
    from pathlib import Path

    from featcache.errors import FeatcacheError

    text = str(path).rstrip("/")
    if "://" in text or "::" in text:
        return "zarr"  # an fsspec URL (file://, s3://, zip::...): Zarr is the format for object stores
    suffix = Path(text).suffix.lower()
    if suffix not in SUFFIXES:
        raise FeatcacheError(f"{path}: a cache path must end in .h5 (HDF5) or .zarr (Zarr), or be a zipped "
                             f"Zarr store (.zip) or an fsspec URL, not {suffix or 'nothing'!r}")
    return SUFFIXES[suffix]
