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
LABELLED_ROLES = ("train", "id_train", "id_val", "id_test")  # samples of these keep their class; others get -1
PSEUDO_OOD_FIELDS = ("of", "corruptions", "severity", "per_corruption", "seed")


def check_group(label, where: str) -> None:
    """A group label (near, far, ...): a plain word, since results name it as `group:<label>`."""
    if not isinstance(label, str) or not label or not label.replace("_", "").replace("-", "").isalnum():
        raise FeatcacheError(f"{where}: group label must be a word (letters, digits, '-' or '_'), got {label!r}")


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
        """The listed splits, then those that the `pseudo_ood:` shorthand adds."""
        splits = self.raw.get("splits")
        if not isinstance(splits, list) or not splits or not all(isinstance(s, str) for s in splits):
            raise FeatcacheError(f"{self.path}: field 'splits' must be a non-empty list of manifest dataset names")
        return splits + [name for name in self.pseudo_ood_entries() if name not in splits]

    def pseudo_ood_entries(self) -> dict[str, dict]:
        """Manifest entries, by split name, that the pipeline's `pseudo_ood:` shorthand stands for.

        `pseudo_ood: {of: <dataset>, corruptions: all | [names], severity: 3, per_corruption: N,
        seed: 0}` (or a list of such) gives one split per corruption, named `<of>_c_<corruption>`:
        a corrupt source over `of` with its transform, `per_corruption` images of it (all when not
        given), drawn per corruption. One split per corruption rather than one mixed split: selection
        averages its objective over the pseudo-OOD splits, so each corruption weighs the same
        whatever its size, and results per corruption show which ones drive a choice.
        """
        from featcache.extract.corruptions import CORRUPTIONS, check_corruption

        declared = self.raw.get("pseudo_ood")
        if declared is None:
            return {}
        specs = declared if isinstance(declared, list) else [declared]
        entries: dict[str, dict] = {}
        for spec in specs:
            where = f"{self.path}: pseudo_ood"
            if not isinstance(spec, dict):
                raise FeatcacheError(f"{where}: must be a mapping (or a list of mappings) with 'of' and 'corruptions'")
            unknown = sorted(set(spec) - set(PSEUDO_OOD_FIELDS))
            if unknown:
                raise FeatcacheError(f"{where}: unknown field {unknown[0]!r}; fields: {', '.join(PSEUDO_OOD_FIELDS)}")
            of = spec.get("of")
            if not isinstance(of, str) or not of:
                raise FeatcacheError(f"{where}: field 'of' must name the manifest dataset to corrupt (the id_val data)")
            corruptions = spec.get("corruptions", "all")
            if corruptions == "all":
                corruptions = list(CORRUPTIONS)
            if not isinstance(corruptions, list) or not corruptions:
                raise FeatcacheError(f"{where}: field 'corruptions' must be 'all' or a list of corruption names")
            severity, seed, size = spec.get("severity", 3), spec.get("seed", 0), spec.get("per_corruption")
            if isinstance(seed, bool) or not isinstance(seed, int):
                raise FeatcacheError(f"{where}: field 'seed' must be an integer, got {seed!r}")
            if size is not None and (isinstance(size, bool) or not isinstance(size, int) or size <= 0):
                raise FeatcacheError(f"{where}: field 'per_corruption' must be a positive integer, got {size!r}")
            for corruption in corruptions:
                check_corruption(corruption, severity, where)
                name = f"{of}_c_{corruption}"
                if name in entries:
                    raise FeatcacheError(f"{where}: split {name!r} is declared twice")
                source = {"generator": "corrupt", "of": of, "corruption": corruption, "severity": severity, "seed": seed}
                if size is not None:
                    source["subset"] = size
                entries[name] = {"name": name, "source": source, "transform": {}, "role": "pseudo_ood"}
        return entries

    @property
    def groups(self) -> dict[str, str]:
        """`groups: {label: [ood split, ...]}` as {split: label}; it overrides the manifest's `group`."""
        declared = self.raw.get("groups")
        if declared is None:
            return {}
        where = f"{self.path}: groups"
        if not isinstance(declared, dict):
            raise FeatcacheError(f"{where}: must be a mapping of group label to a list of ood splits")
        out: dict[str, str] = {}
        for label, names in declared.items():
            check_group(label, where)
            if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
                raise FeatcacheError(f"{where}: group {label!r} must be a list of ood split names")
            for name in names:
                if name in out:
                    raise FeatcacheError(f"{where}: split {name!r} is in two groups, {out[name]!r} and {label!r}")
                out[name] = label
        return out

    def manifest(self) -> dict[str, dict]:
        """The manifest's datasets with the pipeline's pseudo-OOD splits and ood groups added."""
        manifest = load_manifest(self.manifest_path)
        for name, entry in self.pseudo_ood_entries().items():
            if name in manifest:
                raise FeatcacheError(f"{self.path}: pseudo_ood split {name!r} is also a dataset of {self.manifest_path}; "
                                     "remove one of them")
            base = manifest_entry(manifest, entry["source"]["of"], self.manifest_path)
            manifest[name] = {**entry, "transform": base["transform"]}
        for name, label in self.groups.items():
            entry = manifest_entry(manifest, name, self.manifest_path)
            if entry["role"] != "ood":
                raise FeatcacheError(f"{self.path}: groups: {name!r} has role {entry['role']!r}; only ood splits are grouped")
            manifest[name] = {**entry, "group": label}
        return manifest

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
    def plugins(self) -> list[str]:
        """`plugins: [package.module, path/to/file.py]`: modules whose import registers methods with
        `featcache.register`. Files are taken relative to this pipeline file's folder."""
        from featcache.plugins import check_spec

        declared = self.raw.get("plugins")
        if declared is None:
            return []
        where = f"{self.path}: plugins"
        if not isinstance(declared, list):
            raise FeatcacheError(f"{where}: must be a list of module names (package.module) or .py files, "
                                 f"got {declared!r}")
        for spec in declared:
            check_spec(spec, where)
        return list(declared)

    def load_plugins(self) -> list[str]:
        """Import this pipeline's plugins (and installed packages' entry points); returns the
        resolved specs that worker processes import (see `featcache.plugins.load_plugins`)."""
        from featcache.plugins import load_plugins

        return load_plugins(self.plugins, base_dir=self.path.resolve().parent, where=self.path)

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
        if "group" in entry:
            check_group(entry["group"], where)
            if entry["role"] != "ood":
                raise FeatcacheError(f"{where}: field 'group' is for ood datasets, this one has role {entry['role']!r}")
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
