"""Stage two: replay every method and hyperparameter grid from a cache, through the linear head.

Reads only the cache and the pipeline's `sweep:` grid; never builds or runs a backbone. The pieces:
`grid` (expansion), `replay` (the batch engine), `progress` (the progress store), `results` (files),
`tables` (terminal tables), `cluster` (dask).
"""

from __future__ import annotations

from pathlib import Path

from featcache.cache.reader import open_cache
from featcache.cluster import dask_client
from featcache.grid import batches_for, expand_grid, params_key
from featcache.progress import ProgressStore
from featcache.replay import load_replay, ood_groups, refuse_flat_prepool, sweep_batch
from featcache.results import cache_provenance, guard_output, with_group_rows, write_csv, write_meta


def run_sweep(grid: dict, cache_path, out_path, *, jobs: int = 1, progress: bool = True,
              storage_options: dict | None = None, backend: str = "loky", scheduler: str | None = None,
              groups: dict[str, str] | None = None, groups_where: str = "groups", overwrite: bool = False,
              pipeline: str | None = None, plugins: list[str] | None = None, plugins_base=None,
              plugins_where: str | None = None) -> list[dict]:
    """Evaluate every configuration of `grid` on the cache and write the results CSV.

    Besides a row per ood split and their mean, each configuration gets a row per group of ood
    splits (`group:<label>`, the mean over the group): groups from the splits' `group` attributes,
    with `groups` ({split: label}, a pipeline's `groups:`, named `groups_where` in errors) over them.

    Configurations already in the progress store for this cache's fingerprint are not computed
    again; with `jobs` > 1, batches of configurations run in parallel joblib workers, each reading
    the cache itself, with the same results as a serial run. With backend "dask" the batches go to
    the dask cluster at `scheduler` (or to a local one with `jobs` workers); its workers must be able
    to read `cache_path` (a shared file system, or a Zarr URL on an object store).

    Every batch checks that the cache still has the fingerprint the sweep started with, so a cache
    replaced meanwhile stops the sweep instead of mixing into its results. `out_path` must be a
    sweep results file or new, unless `overwrite`. The meta file beside it records `pipeline` (the
    pipeline's name, where there is one) and the cache's provenance.

    `plugins`: modules and .py files (relative ones from `plugins_base`, named `plugins_where` in
    errors) whose import registers methods of the grid; every worker imports them too, as it does
    the entry points of installed packages (see `featcache.plugins`).
    """
    from contextlib import nullcontext

    from joblib import Parallel, delayed, parallel_config
    from tqdm import tqdm

    from featcache.plugins import load_plugins, worker_specs

    out_path = Path(out_path)
    plugins = load_plugins(plugins, plugins_base, plugins_where)
    configs = expand_grid(grid)  # bad names and values fail before any data is read
    # a worker imports what registers the grid's methods, then looks them up (None: this process has them)
    in_workers = worker_specs(plugins, [m for m, _ in configs]) if jobs > 1 or backend == "dask" else None
    guard_output(out_path, "sweep", overwrite)
    with open_cache(cache_path, storage_options=storage_options) as cache:
        # refuses a cache that cannot be swept, or NAP on a 1x1 pre-pool map, before any work starts
        replay = load_replay(cache)
        refuse_flat_prepool(replay, [m.name for m, _ in configs])
        fingerprint = cache.fingerprint
        provenance = cache_provenance(cache)
        groups = ood_groups(cache, groups, groups_where)
        ood_names = [ood.name for ood in replay.oods]
        id_name = replay.id_test.name
    versions = {m.name: m.version for m, _ in configs}
    store = ProgressStore(out_path, fingerprint, versions, ood_names, id_name)
    todo = [(m, p) for m, p in configs if (m.name, params_key(p)) not in store.done]
    bar = tqdm(total=len(configs), initial=len(configs) - len(todo), desc="sweep", unit="config", disable=not progress)
    client = dask_client(scheduler, jobs) if backend == "dask" else None
    batches = batches_for(todo, parallel=jobs > 1 or client is not None)
    each = dict(fingerprint=fingerprint, scratch=store.scores, plugins=in_workers)
    try:
        with parallel_config(backend="dask") if client else nullcontext():
            if jobs == 1 and client is None:
                finished = (sweep_batch(cache_path, batch, storage_options, **each) for batch in batches)
            else:
                finished = Parallel(n_jobs=-1 if client else jobs, return_as="generator")(
                    delayed(sweep_batch)(str(cache_path), batch, storage_options, **each) for batch in batches)
            for rows, timings, nonpositive in finished:
                store.add(rows, timings, nonpositive)
                bar.update(len({(r["method"], r["params"]) for r in rows}))
    finally:
        if client is not None:
            client.close()
    bar.close()
    store.scores.remove_if_empty()
    rows = with_group_rows([row for m, p in configs for row in store.done[(m.name, params_key(p))]], groups)
    write_csv(rows, out_path)
    write_meta(out_path, command="sweep", pipeline=pipeline, **provenance, cache=str(cache_path),
               configurations=len(configs), nap_nonpositive=nonpositive_counts(store, configs))
    return rows


def nonpositive_counts(store: ProgressStore, configs) -> dict:
    """{method: {params: {split: samples with S_X <= 0}}} for the nap+X configurations (paper form)
    of the grid: how many samples the rule of featcache.methods.nap placed below every positive one."""
    out: dict = {}
    for method, params in configs:
        key = (method.name, params_key(params))
        if key in store.nonpositive:
            out.setdefault(method.name, {})[key[1]] = store.nonpositive[key]
    return out
