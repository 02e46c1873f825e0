"""Choosing hyperparameters without looking at the evaluation OOD data.

For every method in a pipeline's grid, the configuration is chosen on id_val against the
pseudo_ood splits (corrupted ID data, NAP appendix H) only: a grid search over the method's own
parameters (p, k, T, alpha, percentile...) and, for nap+<method>, a binary search over w in (0, 1)
for every point of that grid. The chosen configuration is then evaluated once on id_test against
each ood split, beside the papers' default configuration for the pipeline's `benchmark` (none where
the seeds give none, or where the pipeline declares no benchmark) and the oracle: the same search
run on the test OOD data, which no deployment could do.

Binary search over w: keep an interval [lo, hi] (initially [0, 1]); compare the objective at its
quarter points lo + (hi-lo)/4 and lo + 3(hi-lo)/4 and keep the half holding the better one (the
lower half on a tie), until the interval is shorter than `W_TOL`; the answer is the best w
evaluated. This assumes the objective is unimodal in w, as the NAP paper reports it to be.
"""

from __future__ import annotations

import itertools
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from featcache.errors import FeatcacheError
from featcache.methods.registry import Method, get_method
from featcache.methods.nap import combine_scores, nap_input, shared_nap_score, shared_output
from featcache.metrics import ood_metrics
from featcache.grid import expand_grid
from featcache.replay import Replay, evaluate, refuse_flat_prepool
from featcache.results import MEAN, METRICS, with_group_rows

W_TOL = 1 / 64
CRITERIA = ("auroc", "fpr95")
CHOICES = ("selected", "paper_default", "oracle")


def objective_value(metric_rows: list[dict], criterion: str) -> tuple:
    """Sortable objective, larger is better: mean AUROC, or minus mean FPR95 (AUROC breaks ties)."""
    auroc = float(np.mean([m["auroc"] for m in metric_rows]))
    if criterion == "auroc":
        return (auroc,)
    return (-float(np.mean([m["fpr95"] for m in metric_rows])), auroc)


def binary_search_w(value_of, tol: float = W_TOL) -> tuple[float, tuple]:
    """Best w in (0, 1) by repeated halving; `value_of(w)` returns a sortable objective."""
    seen: dict[float, tuple] = {}

    def f(w):
        if w not in seen:
            seen[w] = value_of(w)
        return seen[w]

    lo, hi = 0.0, 1.0
    while hi - lo > tol:
        quarter = (hi - lo) / 4
        left, right = lo + quarter, hi - quarter
        if f(left) >= f(right):
            hi = (lo + hi) / 2
        else:
            lo = (lo + hi) / 2
    best = max(seen, key=lambda w: (seen[w], -w))
    return best, seen[best]


@dataclass
class Target:
    """The data a choice is made on: ID samples and the OOD splits they are scored against."""

    id_split: object
    ood_splits: list


def choose(method: Method, space: dict, replay: Replay, target: Target, criterion: str) -> tuple[dict, tuple]:
    """The configuration of `method` with the best objective on `target`."""
    is_nap = method.name.startswith("nap+")
    space = {k: v for k, v in (space or {}).items() if not (is_nap and k == "w")}
    if not is_nap:
        best = None
        for _, params in expand_grid({method.name: space}):
            value = objective_value(evaluate(method, params, replay, target.id_split, target.ood_splits)[:-1], criterion)
            if best is None or value > best[1]:
                best = (params, value)
        return best
    base = get_method(method.name[4:])
    best = None
    base_space = {k: v for k, v in space.items() if k not in ("eps", "form")}
    listed = [space.get(k, method.defaults[k]) for k in ("eps", "form")]
    for eps, form in itertools.product(*(v if isinstance(v, list) else [v] for v in listed)):
        for _, base_params in expand_grid({base.name: base_space}):
            # the base scores and NAP do not depend on w: computed once per split, shared with evaluation
            def scored(split):
                s_x = shared_output(base, split, replay.head, replay.fit, base_params).scores
                return nap_input(base, s_x, form), shared_nap_score(split, eps)

            id_scores = scored(target.id_split)
            ood_scores = [scored(s) for s in target.ood_splits]

            def value_of(w):
                id_s = combine_scores(*id_scores, w, form)
                rows = [ood_metrics(id_s, combine_scores(*o, w, form)) for o in ood_scores]
                return objective_value(rows, criterion)

            w, value = binary_search_w(value_of)
            params = method.resolve({**base_params, "w": w, "eps": eps, "form": form})
            if best is None or value > best[1]:
                best = (params, value)
    return best


def paper_config(method: Method, overrides: dict, benchmark: str | None) -> dict | None:
    """The pipeline's override for `method`, else the papers' setting on `benchmark` (None: none)."""
    if method.name in overrides:
        return method.resolve(overrides[method.name] or {})
    paper = method.paper_default(benchmark) if benchmark is not None else None
    return None if paper is None else method.resolve(paper)


def run_select(grid: dict, replay: Replay, *, criterion: str = "auroc", paper_defaults: dict | None = None,
               benchmark: str | None = None, progress: bool = True, groups: dict[str, str] | None = None,
               pipeline_path=None, plugins: list[str] | None = None) -> list[dict]:
    """Rows of selection.csv: for each method and choice, metrics per ood split, per group of ood
    splits (`groups`, {split: label}: rows `group:<label>`) and their mean.

    A method without a paper setting on `benchmark` (and no override in `paper_defaults`) has no
    paper_default rows. `plugins`: modules and .py files whose import registers methods of the
    grid (relative files from the pipeline's folder when `pipeline_path` is given), see
    `featcache.plugins.load_plugins`.
    """
    from tqdm import tqdm

    from featcache.plugins import load_plugins

    base = Path(pipeline_path).resolve().parent if pipeline_path else None
    load_plugins(plugins, base, pipeline_path)

    if criterion not in CRITERIA:
        raise FeatcacheError(f"criterion must be one of {', '.join(CRITERIA)}, got {criterion!r}")
    if not replay.pseudo_oods:
        raise FeatcacheError(missing_pseudo_ood(replay.id_val.name if replay.id_val else "<id_val dataset>", pipeline_path))
    expand_grid(grid)  # every name and value checked before any work
    unused = sorted(set(paper_defaults or {}) - set(grid))
    if unused:
        raise FeatcacheError(f"paper_defaults: {unused[0]!r} is not a method of the grid ({', '.join(grid)})")
    refuse_flat_prepool(replay, grid)
    validation = Target(replay.id_val, replay.pseudo_oods)
    test = Target(replay.id_test, replay.oods)
    rows = []
    for name, space in tqdm(grid.items(), desc="select", unit="method", disable=not progress):
        method = get_method(str(name))
        selected, value = choose(method, space, replay, validation, criterion)
        configs = {
            "selected": selected,
            "paper_default": paper_config(method, paper_defaults or {}, benchmark),
            "oracle": choose(method, space, replay, test, criterion)[0],
        }
        for choice, params in configs.items():
            if params is None:
                continue
            for row in with_group_rows(evaluate(method, params, replay), groups or {}):
                rows.append({"method": method.name, "choice": choice, **row,
                             "selection_auroc": value[-1] if choice == "selected" else ""})
    return rows


def missing_pseudo_ood(id_val: str, pipeline_path=None) -> str:
    """What to add, and where, when a cache has no pseudo_ood split to select on."""
    where = pipeline_path or "the pipeline"
    command = f"featcache extract {pipeline_path} --overwrite" if pipeline_path else "featcache extract PIPELINE --overwrite"
    return (f"selection needs pseudo_ood splits (corrupted id_val data, NAP appendix H) and the cache has none; add "
            f"the line `pseudo_ood: {{of: {id_val}, corruptions: all, severity: 3, per_corruption: 200}}` to {where} "
            f"(top level, beside `splits:`), then extract again: {command}")


SELECTION_COLUMNS = ("method", "choice", "params", "ood") + METRICS + ("id_acc", "selection_auroc")


CHOICE_TITLES = {"selected": "selected on pseudo-OOD", "paper_default": "paper default",
                 "oracle": "ORACLE: best on test OOD"}


def format_selection(rows: list[dict], benchmark: str | None = None) -> str:
    """Per method, a line per choice: selected on pseudo-OOD, paper default on `benchmark`, oracle
    (test OOD), with mean FPR95 / AUROC (percent) and the parameters exactly as selection.csv has
    them (featcache.tables: wrapped when long, never cut)."""
    from featcache.tables import render, wrap_params

    mean = {(r["method"], r["choice"]): r for r in rows if r["ood"] == MEAN}
    body = []
    for m in dict.fromkeys(r["method"] for r in rows):
        for n, choice in enumerate(CHOICES):
            r = mean.get((m, choice))
            if r is None:
                missing = f"none for {benchmark}" if benchmark else "no benchmark declared"
                body.append([m if n == 0 else "", CHOICE_TITLES[choice], "", "", missing])
                continue
            body.append([m if n == 0 else "", CHOICE_TITLES[choice], f"{100 * r['fpr95']:.2f}",
                         f"{100 * r['auroc']:.2f}", wrap_params(r["params"])])
    return render(["method", "configuration", "FPR95", "AUROC", "params"], body, right={2, 3})


def select_to_csv(grid: dict, cache_path, out_path, *, criterion: str = "auroc", paper_defaults: dict | None = None,
                  benchmark: str | None = None, groups: dict[str, str] | None = None, groups_where: str = "groups",
                  progress: bool = True, overwrite: bool = False, pipeline_path=None, pipeline: str | None = None,
                  storage_options: dict | None = None) -> list[dict]:
    """run_select on the cache at `cache_path`, its rows written to `out_path` (a selection results
    file or new, unless `overwrite`) with their provenance (`pipeline`, the name recorded, and the
    cache's fingerprint, backbone and checkpoint) in the meta file beside it."""
    from featcache.cache.reader import open_cache
    from featcache.replay import check_fingerprint, load_replay, ood_groups
    from featcache.results import cache_provenance, guard_output, write_csv, write_meta

    out_path = guard_output(out_path, "selection", overwrite, SELECTION_COLUMNS)
    with open_cache(cache_path, storage_options=storage_options) as cache:
        replay = load_replay(cache, with_selection=True)
        provenance = cache_provenance(cache)
        rows = run_select(grid, replay, criterion=criterion, paper_defaults=paper_defaults, benchmark=benchmark,
                          progress=progress, groups=ood_groups(cache, groups, groups_where),
                          pipeline_path=pipeline_path)
    check_fingerprint(cache_path, replay.fingerprint, storage_options)  # every number above came from one cache
    write_csv(rows, out_path, SELECTION_COLUMNS)
    write_meta(out_path, command="selection", pipeline=pipeline, **provenance, cache=str(cache_path),
               criterion=criterion, benchmark=benchmark)
    return rows
