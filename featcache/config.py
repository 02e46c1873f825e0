"""Pipelines and the data manifest: YAML in, validated plain dicts out, with errors that name the field.

Relative paths in a pipeline (manifest, cache, checkpoint) are taken from the directory the command
runs in, which for `make` is the repository root.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import yaml

from featcache.errors import FeatcacheError

MANIFEST_ROLES = ("train", "id_train", "id_val", "id_test", "ood", "pseudo_ood")


def plain_name_problem(name) -> str | None:
    """Why `name` is not a plain name (None if it is): it becomes a path part or a cache group name,
    so it must be a non-empty string with no path separator, not '.' or '..', and no control
    character (cache-schema.md, Rules)."""
    if not isinstance(name, str) or not name:
        return "it must be a non-empty string"
    if "/" in name or "\\" in name:
        return "it contains a path separator"
    if name in (".", ".."):
        return "'.' and '..' name directories"
    if any(ord(c) < 32 or 127 <= ord(c) < 160 for c in name):
        return "it contains a control character"
    return None


def load_yaml(path) -> dict:
    path = Path(path)
    if not path.exists():
        raise FeatcacheError(f"{path}: no such file")
    if path.is_dir():
        raise FeatcacheError(f"{path}: is a directory, expected a YAML file")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise FeatcacheError(f"{path}: cannot be read ({exc})") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise FeatcacheError(f"{path}:{where}: malformed YAML: {problem}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise FeatcacheError(f"{path}: expected a mapping at the top level, found {type(data).__name__}")
    return data


@dataclass
class Pipeline:
    path: Path
    name: str
    raw: dict = field(repr=False)

    @property
    def cache(self):
        """The cache path; an fsspec URL (file://, s3://, zip::...) is kept as the string it is."""
        value = str(self.raw.get("cache") or f"cache/{self.name}.h5")
        return value if ("://" in value or "::" in value) else Path(value)

    @property
    def manifest_path(self) -> Path:
        return Path(self.raw.get("manifest", "data_manifest.yaml"))

    @property
    def backbone(self) -> dict:
        backbone = self.raw.get("backbone")
        if not isinstance(backbone, dict) or ("name" in backbone) == ("factory" in backbone):
            raise FeatcacheError(f"{self.path}: field 'backbone' must be a mapping with a 'name' or a 'factory' "
                                 "(\"package.module:callable\" or \"path/to/file.py:callable\"), not both")
        return backbone

    @property
    def splits(self) -> list[str]:
        splits = self.raw.get("splits")
        if not isinstance(splits, list) or not splits or not all(isinstance(s, str) for s in splits):
            raise FeatcacheError(f"{self.path}: field 'splits' must be a non-empty list of manifest dataset names")
        return splits

    @property
    def extract(self) -> dict:
        return dict(self.raw.get("extract") or {})

    @property
    def sweep(self) -> dict:
        sweep = self.raw.get("sweep")
        if not isinstance(sweep, dict) or not sweep:
            raise FeatcacheError(f"{self.path}: field 'sweep' must be a mapping of method name to parameter grid")
        return sweep

    @property
    def benchmark(self) -> str | None:
        """cifar10, cifar100 or imagenet: whose paper settings `select` and `methods` show; None if unset."""
        from featcache.methods.registry import BENCHMARKS

        value = self.raw.get("benchmark")
        if value is not None and value not in BENCHMARKS:
            raise FeatcacheError(f"{self.path}: field 'benchmark' must be one of {', '.join(BENCHMARKS)}, got {value!r}")
        return value

    @property
    def results_dir(self) -> Path:
        return Path(self.raw.get("results", "results")) / self.name


def load_pipeline(path) -> Pipeline:
    raw = load_yaml(path)
    name = raw.get("name", Path(path).stem)
    problem = plain_name_problem(name)
    if problem:
        raise FeatcacheError(f"{path}: field 'name' must be a plain name ({problem}), got {name!r}")
    return Pipeline(Path(path), name, raw)


def load_manifest(path) -> dict[str, dict]:
    """The manifest's datasets by name, each checked for a source, a role and a size."""
    raw = load_yaml(path)
    datasets = raw.get("datasets")
    if not isinstance(datasets, dict) or not datasets:
        raise FeatcacheError(f"{path}: field 'datasets' must be a mapping of dataset name to entry")
    for name, entry in datasets.items():
        where = f"{path}: dataset {name!r}"
        problem = plain_name_problem(name)
        if problem:  # a split of this name becomes the cache group /splits/<name>
            raise FeatcacheError(f"{where}: a dataset name must be a plain name ({problem})")
        if not isinstance(entry, dict):
            raise FeatcacheError(f"{where}: must be a mapping")
        if entry.get("role") not in MANIFEST_ROLES:
            raise FeatcacheError(f"{where}: field 'role' must be one of {', '.join(MANIFEST_ROLES)}, got {entry.get('role')!r}")
        source = entry.get("source")
        if not isinstance(source, dict) or not ("generator" in source or "path" in source):
            raise FeatcacheError(f"{where}: field 'source' must name a 'generator' or a 'path' and a 'format'")
        if "path" in source and "format" not in source:
            raise FeatcacheError(f"{where}: source.path needs source.format")
        size = entry.get("size")
        if size is not None and (not isinstance(size, int) or size <= 0):
            raise FeatcacheError(f"{where}: field 'size' must be a positive integer, got {size!r}")
        entry.setdefault("transform", {})
        entry["name"] = name
    return datasets


def manifest_entry(manifest: dict, name: str, manifest_path) -> dict:
    if name not in manifest:
        import difflib

        close = difflib.get_close_matches(name, list(manifest), n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise FeatcacheError(f"{manifest_path}: unknown dataset {name!r}{hint}")
    return manifest[name]
