"""The Python API: extract from a model in memory, sweep, select and score, with DataFrames out.

The command line and these functions share one code path: `extract` writes the cache `featcache
extract` writes (same schema, resume and checks), `sweep` and `select` write the same CSV files
and return their rows, `scores` gives the per-sample table `featcache scores` saves.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from contextlib import nullcontext
from pathlib import Path

import numpy as np

from featcache.errors import FeatcacheError

SCORE_COLUMNS = ("split", "role", "group", "id", "label", "score", "prediction")


def extract(model, splits: Mapping, out, *, feature_layer: str | None = None, prepool_layer: str | None = None,
            batch_size: int = 256, device: str = "cpu", amp: str | None = None, overwrite: bool = False,
            progress: bool = True, backbone: str | None = None) -> Path:
    """Run an in-memory classifier once over every split and write its feature cache.

    The cache is the one `featcache extract` writes (shared/cache-schema.md): pooled features,
    pre-pool channel max and mean, logits, labels and ids per split, the head's weight and bias.
    The head is the `nn.Linear` producing the model's output, the feature its input, and the
    pre-pool map the one its spatial pooling reduces, found by tracing the model as for a
    pipeline's backbone; `feature_layer` and `prepool_layer` name other nodes. An interrupted run
    leaves `<out>.partial`, which the same call resumes when model weights, layers, batch size,
    device, precision and every split's data (type, length, first and last images) are unchanged.

    Parameters
    ----------
    model : torch.nn.Module
        A classifier ending in a linear layer. It is put in eval mode for the extraction and moved
        to `device`; afterwards every submodule's training flag is restored and, when all its
        parameters were on one device, the model is moved back there.
    splits : mapping of str to (data, role) or dict
        Split name -> `(data, role)`, or `{"data": ..., "role": ..., "group": ...}` where `group`
        labels an ood split (near/far) and a pseudo_ood split may give `corruption`, `severity`
        and `of`. `data` is a map-style torch Dataset of image tensors (C, H, W), or of
        `(image, label)` pairs as torchvision's data sets give, or a DataLoader over one that
        keeps its order. `role` is one of id_train, id_val, id_test, ood, pseudo_ood; exactly one
        of each id role and at least one ood split are needed. Sample ids are row numbers.
    out : str or path
        The cache to write: `.h5` for HDF5, `.zarr` for a Zarr store. An existing file is
        refused unless `overwrite`.
    feature_layer, prepool_layer : str, optional
        Node names overriding the feature and pre-pool layers found.
    batch_size : int, default 256
    device : str, default "cpu"
        "cpu", "cuda" or "cuda:N".
    amp : {"bf16", "fp16"}, optional
        Run the backbone under autocast; outputs are stored as float32.
    overwrite : bool, default False
    progress : bool, default True
        Show progress bars.
    backbone : str, optional
        What the cache's `backbone` attribute records; by default the model's class.

    Returns
    -------
    pathlib.Path
        The cache written.

    Examples
    --------
    >>> import featcache, torchvision
    >>> model = torchvision.models.resnet18(num_classes=10)
    >>> featcache.extract(model, {"train": (train_set, "id_train"), "val": (val_set, "id_val"),
    ...                           "test": (test_set, "id_test"), "svhn": (svhn, "ood")},
    ...                   "cache/mine.h5")  # doctest: +SKIP
    PosixPath('cache/mine.h5')
    """
    from torch import nn

    from featcache.cache.writer import CacheWriter
    from featcache.extract.backbones import state_dict_sha256
    from featcache.extract.runner import SplitSource, check_roles, write_cache
    from featcache.extract.torchdata import TorchSplit

    if not isinstance(model, nn.Module):
        raise FeatcacheError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(splits, Mapping) or not splits:
        raise FeatcacheError("splits must be a non-empty mapping of split name to (data, role)")
    from featcache.extract.runner import input_channels, refuse_channels

    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise FeatcacheError(f"batch_size must be a positive integer, got {batch_size!r}")
    training = {name: module.training for name, module in model.named_modules()}
    sources = [_api_source(name, value, TorchSplit, SplitSource) for name, value in splits.items()]
    check_roles([(s.name, s.role) for s in sources], "splits")
    expected = input_channels(model)
    for source in sources:  # every split's images checked before any is written
        refuse_channels(source.load().first(), expected, source.where, "convert them in the data set's transform")
    kind = type(model)
    label = backbone or f"{kind.__module__}.{kind.__qualname__}"
    devices = {p.device for p in model.parameters()}
    model.eval()
    writer = CacheWriter(Path(out), overwrite=overwrite)
    try:
        return write_cache(model, sources, writer, backbone=label, checkpoint_sha256=state_dict_sha256(model),
                           feature_layer=feature_layer, prepool_layer=prepool_layer, batch_size=batch_size,
                           device=str(device), amp=amp, progress=progress)
    finally:
        writer.close()
        for name, module in model.named_modules():
            module.training = training[name]
        if len(devices) == 1:
            model.to(devices.pop())


def _api_source(name, value, TorchSplit, SplitSource):
    from featcache.config import plain_name_problem

    problem = plain_name_problem(name) if isinstance(name, str) else "is not a string"
    if problem:
        raise FeatcacheError(f"splits: split name {name!r} {problem}")
    if isinstance(value, Mapping):
        unknown = sorted(set(value) - {"data", "role", "group", "corruption", "severity", "of"})
        if unknown or "data" not in value or "role" not in value:
            raise FeatcacheError(f"splits[{name!r}]: expected keys data, role and optionally group, corruption, "
                                 f"severity, of; got {', '.join(map(str, value))}")
        data, role, extra = value["data"], value["role"], value
    elif isinstance(value, (tuple, list)) and len(value) == 2:
        (data, role), extra = value, {}
    else:
        raise FeatcacheError(f"splits[{name!r}]: expected (data, role) or a dict with data and role")
    from featcache.cache.schema import ROLES

    if role not in ROLES:
        raise FeatcacheError(f"splits[{name!r}]: role must be one of {', '.join(ROLES)}, got {role!r}")
    attrs = {}
    if role == "pseudo_ood":
        severity = extra.get("severity", 0)
        if isinstance(severity, bool) or not isinstance(severity, int) or not 0 <= severity <= 5:
            raise FeatcacheError(f"splits[{name!r}]: severity must be an integer 1 to 5 (0: not recorded), got {severity!r}")
        attrs = {"corruption": str(extra.get("corruption", "")), "severity": severity, "of": str(extra.get("of", ""))}
    if extra.get("group"):
        if role != "ood":
            raise FeatcacheError(f"splits[{name!r}]: only ood splits take a group, this one is {role}")
        attrs["group"] = str(extra["group"])
    data = TorchSplit(data, name)
    return SplitSource(name=name, role=role, load=lambda: data, entry=data.describe(), resume=data.identity(),
                       attrs=attrs, where=f"split {name!r}", labels_required=True)


def results_frame(rows: list[dict], columns) -> "pandas.DataFrame":  # noqa: F821
    """Results rows as a DataFrame: the CSV's columns, then one column per parameter (empty where a
    method does not take it; a parameter named like a column gets the prefix `param_`)."""
    import pandas as pd

    frame = pd.DataFrame([{k: row[k] for k in columns} for row in rows], columns=list(columns))
    params = [json.loads(p) for p in frame["params"]] if len(frame) else []
    names = list(dict.fromkeys(k for p in params for k in p))
    for name in names:
        column = f"param_{name}" if name in frame.columns else name
        frame[column] = pd.Series([p.get(name) for p in params], index=frame.index, dtype=object)
    return frame


def sweep(cache, grid: Mapping, *, out=None, jobs: int = 1, backend: str = "loky", scheduler: str | None = None,
          groups: Mapping | None = None, overwrite: bool = False, progress: bool = True,
          storage_options: dict | None = None, name: str | None = None, plugins=None
          ) -> "pandas.DataFrame":  # noqa: F821
    """Replay every configuration of `grid` on the cache and compute its metrics per ood split.

    The rows of `featcache sweep`'s sweep.csv: per configuration one row per ood split, per group
    of ood splits (`group:<label>`) and their mean, with FPR95, AUROC, AUPR-In, AUPR-Out (as the
    ASH/ReAct reference code computes them) and the ID test accuracy.

    Parameters
    ----------
    cache : str or path
        A feature cache (`featcache extract` or `featcache.extract`).
    grid : mapping
        Method -> {parameter: value or list of values}, as a pipeline's `sweep:`; every
        combination is evaluated, e.g. `{"ash_s": {"p": [80, 90]}, "energy": {}}`.
    out : str or path, optional
        The results CSV to write (and resume from: configurations already in it for this cache are
        not computed again). By default the rows are computed in a temporary folder and only
        returned.
    jobs : int, default 1
        Batches of configurations run in parallel joblib workers (same results as serial).
    backend : {"loky", "dask"}, default "loky"
    scheduler : str, optional
        With backend "dask", the scheduler's address (default: a local cluster of `jobs` workers).
    groups : mapping of str to str, optional
        Ood split -> group label, over the splits' own `group` attributes.
    overwrite : bool, default False
        Replace `out` even if it is not a sweep results file.
    progress : bool, default True
    storage_options : dict, optional
        fsspec options for a Zarr cache at a URL.
    name : str, optional
        What the meta file beside `out` records as the pipeline's name (report provenance).
    plugins : list of str, optional
        Modules (`package.module`) or `.py` files whose import registers methods of the grid with
        `featcache.register`; worker processes import them too (see featcache.plugins). Installed
        packages' `featcache.methods` entry points are always loaded.

    Returns
    -------
    pandas.DataFrame
        Columns method, params (JSON), ood, fpr95, auroc, aupr_in, aupr_out, id_acc, then one
        column per parameter.

    Examples
    --------
    >>> rows = featcache.sweep("cache/digits.h5", {"react": {"percentile": [85, 90]}})  # doctest: +SKIP
    >>> rows[rows.ood == "mean"][["method", "percentile", "fpr95", "auroc"]]  # doctest: +SKIP
    """
    import tempfile

    from featcache.results import COLUMNS
    from featcache.sweep import run_sweep

    grid = _grid(grid)
    if backend not in ("loky", "dask"):
        raise FeatcacheError(f"backend must be 'loky' or 'dask', got {backend!r}")
    if isinstance(jobs, bool) or not isinstance(jobs, int) or jobs < 1:
        raise FeatcacheError(f"jobs must be a positive integer, got {jobs!r}")
    groups = _groups(groups)
    scratch = tempfile.TemporaryDirectory(prefix="featcache-sweep-") if out is None else nullcontext(Path(out).parent)
    with scratch as folder:
        target = Path(folder) / "sweep.csv" if out is None else Path(out)
        rows = run_sweep(grid, cache, target, jobs=jobs, progress=progress, storage_options=storage_options,
                         backend=backend, scheduler=scheduler, groups=groups, overwrite=overwrite,
                         pipeline=name, plugins=_plugins(plugins))
    return results_frame(rows, COLUMNS)


def select(cache, grid: Mapping, *, criterion: str = "auroc", benchmark: str | None = None,
           paper_defaults: Mapping | None = None, groups: Mapping | None = None, out=None,
           overwrite: bool = False, progress: bool = True, storage_options: dict | None = None,
           name: str | None = None, plugins=None) -> "pandas.DataFrame":  # noqa: F821
    """Choose each method's hyperparameters on id_val against the pseudo_ood splits, then evaluate.

    The rows of `featcache select`'s selection.csv: for each method of `grid` the configuration
    selected on pseudo-OOD (grid search; a binary search over w for nap+X), the papers' setting on
    `benchmark` and the oracle (best on the test OOD splits), each evaluated on id_test against
    every ood split.

    Parameters
    ----------
    cache : str or path
        A feature cache with pseudo_ood splits.
    grid : mapping
        Method -> {parameter: values}, as for `sweep`.
    criterion : {"auroc", "fpr95"}, default "auroc"
        What the search maximises on pseudo-OOD: mean AUROC, or minus mean FPR95.
    benchmark : {"cifar10", "cifar100", "imagenet"}, optional
        Whose paper settings fill the `paper_default` rows (none without it).
    paper_defaults : mapping, optional
        Method -> parameters overriding the papers' settings.
    groups : mapping of str to str, optional
        Ood split -> group label.
    out : str or path, optional
        Also write the rows to this CSV (with its meta file).
    overwrite, progress, storage_options, name, plugins
        As for `sweep`.

    Returns
    -------
    pandas.DataFrame
        Columns method, choice, params, ood, the metrics, id_acc, selection_auroc, then one column
        per parameter.

    Examples
    --------
    >>> chosen = featcache.select("cache/digits.h5", {"ash_s": {"p": [60, 70, 80, 90]}})  # doctest: +SKIP
    >>> chosen[(chosen.choice == "selected") & (chosen.ood == "mean")]  # doctest: +SKIP
    """
    import tempfile

    from featcache.plugins import load_plugins
    from featcache.select import SELECTION_COLUMNS, select_to_csv

    load_plugins(_plugins(plugins))
    grid = _grid(grid)
    scratch = tempfile.TemporaryDirectory(prefix="featcache-select-") if out is None else nullcontext(Path(out).parent)
    with scratch as folder:
        target = Path(folder) / "selection.csv" if out is None else Path(out)
        rows = select_to_csv(grid, cache, target, criterion=criterion, benchmark=benchmark,
                             paper_defaults=dict(paper_defaults or {}), groups=_groups(groups), progress=progress,
                             overwrite=overwrite, storage_options=storage_options, pipeline=name)
    return results_frame(rows, SELECTION_COLUMNS)


def scores(cache, method: str, *, groups: Mapping | None = None, storage_options: dict | None = None,
           plugins=None, **params) -> "pandas.DataFrame":  # noqa: F821
    """Per-sample scores and predictions of one configuration on every split of the cache.

    Parameters
    ----------
    cache : str or path
        A feature cache.
    method : str
        A registered method (`featcache methods` lists them) or `nap+<method>`.
    groups : mapping of str to str, optional
        Ood split -> group label, over the splits' own `group` attributes.
    storage_options : dict, optional
        fsspec options for a Zarr cache at a URL.
    plugins : list of str, optional
        Modules or `.py` files registering the method, as for `sweep`.
    **params
        The method's parameters; the rest take their defaults.

    Returns
    -------
    pandas.DataFrame
        One row per sample of every complete split, in cache order: split, role, group (empty
        when none), id, label (-1 where unknown), score (higher = more in-distribution) and
        prediction (the class the head the method used predicts). `frame.attrs` holds the method,
        its resolved parameters (`params`, JSON) and the cache's path, fingerprint, backbone and
        checkpoint sha256.

    Examples
    --------
    >>> table = featcache.scores("cache/digits.h5", "ash_s", p=90)  # doctest: +SKIP
    >>> table.groupby("split").score.mean()  # doctest: +SKIP
    """
    import pandas as pd

    from featcache.cache.reader import open_cache
    from featcache.grid import params_key
    from featcache.methods.registry import get_method
    from featcache.plugins import load_plugins
    from featcache.replay import check_fingerprint, load_replay, refuse_flat_prepool, split_data
    from featcache.results import cache_provenance

    load_plugins(_plugins(plugins))
    chosen = get_method(str(method))
    resolved = chosen.resolve(params)
    parts = []
    with open_cache(cache, storage_options=storage_options) as opened:
        replay = load_replay(opened)
        refuse_flat_prepool(replay, [chosen.name])
        group_of = {s.name: str(s.attrs["group"]) for s in opened.splits() if s.attrs.get("group")}
        names = {s.name for s in opened.splits("ood")}
        for name, label in _groups(groups).items():
            if name not in names:
                raise FeatcacheError(f"groups: {name!r} is not an ood split of {opened.path}")
            group_of[name] = str(label)
        width = replay.head.weight.shape[1]
        for split in opened.splits():
            data = replay.fit.data if split.role == "id_train" else split_data(opened, split, width, head=replay.head)
            out = chosen(data, replay.head, replay.fit, **resolved)
            parts.append(pd.DataFrame({
                "split": split.name, "role": split.role, "group": group_of.get(split.name, ""),
                "id": np.asarray(data.ids).astype(str), "label": np.asarray(data.labels, np.int64),
                "score": np.asarray(out.scores, np.float64), "prediction": np.asarray(out.predictions, np.int64)}))
        fingerprint = opened.fingerprint
        provenance = cache_provenance(opened)
    check_fingerprint(cache, fingerprint, storage_options)
    frame = pd.concat(parts, ignore_index=True)[list(SCORE_COLUMNS)]
    frame.attrs.update(method=chosen.name, params=params_key(resolved), **provenance, cache=str(cache))
    return frame


def check_scores_path(out, overwrite: bool = False) -> Path:
    """`out` as a scores file: its suffix a known format, not a folder, not replacing a file unless
    `overwrite`; checked before the work."""
    out = Path(out)
    if out.suffix.lower() not in (".parquet", ".csv", ".npz"):
        raise FeatcacheError(f"{out}: the file's suffix says its format: .parquet, .csv or .npz")
    if out.is_dir():
        raise FeatcacheError(f"{out}: is a directory; give a file name")
    if out.exists() and not overwrite:
        raise FeatcacheError(f"{out}: exists; not replacing it (choose another --out, or pass --overwrite)")
    return out


def write_scores(frame, out, *, overwrite: bool = False) -> Path:
    """Write a `scores` table to `out`: Parquet (.parquet, with pyarrow), CSV (.csv) or NumPy
    (.npz, one array per column), and beside it `<out>.meta.json` with its provenance (method,
    parameters, cache fingerprint, backbone, checkpoint). An existing file is refused unless
    `overwrite`; the file appears whole or not at all."""
    import os

    from featcache.results import write_meta

    out = check_scores_path(out, overwrite)
    suffix = out.suffix.lower()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp{suffix}")
    try:
        if suffix == ".parquet":
            try:
                import pyarrow  # noqa: F401
            except ImportError:
                raise FeatcacheError(f"{out}: writing Parquet needs pyarrow (pip install pyarrow)") from None
            table = frame.copy()
            table.attrs = {}
            table.to_parquet(tmp, index=False)
        elif suffix == ".csv":
            text = frame.copy()
            for column in text.columns:  # the shortest text that reads back as the same float
                if text[column].dtype.kind == "f":
                    text[column] = [repr(float(v)) for v in text[column]]
            text.to_csv(tmp, index=False)
        else:
            with open(tmp, "wb") as fh:
                # strings as fixed-width unicode: object arrays would need pickle to load
                np.savez(fh, **{c: frame[c].to_numpy() if frame[c].dtype.kind in "biuf" else frame[c].to_numpy(dtype=str)
                               for c in frame.columns})
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    # named after the whole file name: s.parquet and s.csv of two configurations keep their own
    write_meta(out, meta_file=out.with_name(out.name + ".meta.json"), command="scores", **frame.attrs)
    return out


def _plugins(plugins) -> list[str]:
    """A plugin spec or a list of them."""
    if plugins is None:
        return []
    return [str(plugins)] if isinstance(plugins, (str, Path)) else [str(p) for p in plugins]


def _groups(groups) -> dict:
    if groups is None:
        return {}
    if not isinstance(groups, Mapping) or not all(isinstance(v, str) and v for v in groups.values()):
        raise FeatcacheError(f"groups must map ood split names to non-empty labels, got {groups!r}")
    return {str(k): v for k, v in groups.items()}


def _grid(grid) -> dict:
    if not isinstance(grid, Mapping) or not grid:
        raise FeatcacheError("grid must be a non-empty mapping of method to {parameter: values}")
    return {str(name): (dict(space) if isinstance(space, Mapping) else space) for name, space in grid.items()}
