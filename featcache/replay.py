"""The batch engine: read a cache's splits and score configurations on them, one split at a time."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from featcache.cache.reader import Cache, Split, open_cache
from featcache.errors import FeatcacheError
from featcache.grid import base_config, params_key, work_plan
from featcache.methods.data import Fit, Head, SplitData, read_only
from featcache.methods.kernels import map_items
from featcache.methods.nap import shared_output
from featcache.methods.registry import Method, get_method
from featcache.metrics import SortedScores, accuracy, ood_metrics
from featcache.results import MEAN, METRICS


@dataclass
class Replay:
    """Everything a sweep reads from one cache."""

    head: Head
    fit: Fit
    id_test: SplitData
    oods: list[SplitData]
    fingerprint: str
    id_val: SplitData | None = None
    pseudo_oods: list[SplitData] | None = None
    flat_prepool: str | None = None  # why NAP cannot run on this cache (a 1x1 pre-pool map), if so


def flat_prepool(cache: Cache) -> str | None:
    """The reason NAP cannot run on `cache`, or None.

    NAP scores the ratio chan_max / chan_mean of the pre-pool map; on a 1x1 map (root attribute
    `prepool_size`, e.g. torchvision's ResNet-18 on 32x32 images) the two are equal, every sample
    scores the same, and nap+X silently degrades to X. Caches written before `prepool_size` existed
    are not judged.
    """
    if str(cache.attrs.get("prepool_size", "")) != "1x1":
        return None
    return (f"{cache.path}: the pre-pool map {cache.attrs.get('prepool_layer')!r} is 1x1, so chan_max equals "
            "chan_mean and NAP is undefined; extract again with backbone.prepool_layer naming a larger map "
            "(every method but nap and nap+X runs on this cache)")


def refuse_flat_prepool(replay: Replay, method_names) -> None:
    """Refuse NAP and every nap+X before any work when the cache's pre-pool map is 1x1."""
    nap = [str(n) for n in method_names if str(n) == "nap" or str(n).startswith("nap+")]
    if replay.flat_prepool and nap:
        raise FeatcacheError(f"{', '.join(nap)}: {replay.flat_prepool}")


def surely_finite(values: np.ndarray) -> bool:
    """True when `values` hold no NaN or Inf, from one fast pass; False when they may (then count).

    A NaN or Inf anywhere makes the sum non-finite. Summed in float32 (float64 for float64 values),
    numpy's vectorised sum, three times as fast as a float64 one; large finite values may overflow it,
    and then the count that follows finds nothing to refuse."""
    if values.dtype.kind != "f":
        return True
    with np.errstate(over="ignore", invalid="ignore"):
        return bool(np.isfinite(values.sum(dtype=np.result_type(values.dtype, np.float32))))


def split_loader(cache: Cache, split: Split, read_clock: list | None = None):
    """(load(key), runs(key)): arrays of `split` read on demand, whole or as (start, stop, rows) runs
    (`Split.runs`), refusing NaN or Inf with a count and the first sample id.

    Seconds spent reading are added to read_clock[0] when it is given.
    """
    import time

    flat = flat_prepool(cache)

    def refuse_flat(key):
        if key == "chan_max" and flat:
            raise FeatcacheError(f"split {split.name!r}: {flat}")  # the last guard, for callers that skip the check

    def clock(started):
        if read_clock is not None:
            read_clock[0] += time.perf_counter() - started

    def load(key):
        refuse_flat(key)
        started = time.perf_counter()
        values = split.read(key)
        clock(started)
        if not surely_finite(values):
            bad = ~np.isfinite(values)
            if bad.any():
                rows = np.flatnonzero(bad.reshape(len(values), -1).any(axis=1))
                first = str(split.read("ids", slice(int(rows[0]), int(rows[0]) + 1))[0])
                raise FeatcacheError(f"{cache.path}: split {split.name!r} dataset {key!r} has {int(bad.sum())} "
                                     f"NaN or Inf values in {len(rows)} samples, first in sample {first!r}")
        return values

    def runs(key):
        refuse_flat(key)
        started = time.perf_counter()
        for start, stop, values in split.runs(key):
            clock(started)
            if not surely_finite(values):
                load(key)  # raises, with the count and first bad sample of the whole array
            yield start, stop, values
            started = time.perf_counter()
        clock(started)  # the checksum's comparison, after the last run

    return load, runs


def split_data(cache: Cache, split: Split, width: int, read_clock: list | None = None,
               head: Head | None = None) -> SplitData:
    """`split` read on demand; `head`: the replay's head, whose products the split may share and keep."""
    if split.n == 0 or split.shape("features")[0] == 0:
        raise FeatcacheError(f"{cache.path}: split {split.name!r} is empty")
    d = split.shape("features")[1]
    if d != width:
        raise FeatcacheError(f"{cache.path}: split {split.name!r} features have width {d}, the head takes {width}")
    # chan_mean is read as features where their checksums say the bytes are the same (a ResNet's
    # mean pool), whatever the attributes claim: an attribute is not checked, a checksum is
    same = {"chan_mean": "features"} if split.same_contents("chan_mean", "features") else None
    load, runs = split_loader(cache, split, read_clock)
    data = SplitData(split.name, loader=load, run_loader=runs, same_as=same)
    data.replay_head = head
    return data


def load_replay(cache: Cache, *, with_selection: bool = False, read_clock: list | None = None) -> Replay:
    weight, bias = cache.head_weight, cache.head_bias
    if weight.ndim != 2 or bias.shape != (weight.shape[0],):
        raise FeatcacheError(f"{cache.path}: head weight {weight.shape} and bias {bias.shape} do not fit together")
    width = weight.shape[1]
    oods = cache.splits("ood")
    if not oods:
        raise FeatcacheError(f"{cache.path}: no split with role 'ood' to evaluate against")
    head = read_only(Head(weight.astype(np.float32), bias.astype(np.float32)))  # shared by every configuration

    def id_val():
        return split_data(cache, cache.one_split("id_val"), width, read_clock, head)

    replay = Replay(
        head=head,
        fit=Fit(split_data(cache, cache.one_split("id_train"), width, read_clock, head), id_val=id_val),
        id_test=split_data(cache, cache.one_split("id_test"), width, read_clock, head),
        oods=[split_data(cache, s, width, read_clock, head) for s in oods],
        fingerprint=cache.fingerprint,
        flat_prepool=flat_prepool(cache),
    )
    if with_selection:
        replay.id_val = replay.fit.split("id_val")
        replay.pseudo_oods = [split_data(cache, s, width, head=head) for s in cache.splits("pseudo_ood")]
    return replay


def ood_groups(cache: Cache, override: dict[str, str] | None = None, where: str = "groups") -> dict[str, str]:
    """{ood split: group label}: the splits' `group` attributes, with a pipeline's `groups:` over them."""
    names = {s.name for s in cache.splits("ood")}
    groups = {s.name: str(s.attrs["group"]) for s in cache.splits("ood") if s.attrs.get("group")}
    for name, label in (override or {}).items():
        if name not in names:
            raise FeatcacheError(f"{where}: {name!r} is not an ood split of {cache.path} (ood splits: "
                                 f"{', '.join(sorted(names))})")
        groups[name] = label
    return groups


def metric_rows(method_name: str, params: dict, id_scores, id_acc: float, ood_scores: dict) -> list[dict]:
    """One row per ood split (ID scores against that split's), then their mean. The splits' sorts
    and metrics run on all cores (`map_items`)."""
    return metric_rows_of([(method_name, params, id_scores, id_acc, ood_scores)])[0]


METRIC_GROUP = 8  # configurations whose sorts share one queue: the cores balance, the sorted copies stay few


def metric_rows_of(entries: list[tuple]) -> list[list[dict]]:
    """`metric_rows` of each (method name, params, id scores, id acc, {ood split: scores}) of
    `entries`; METRIC_GROUP configurations' sorts, then their metrics, in one queue each, so that
    no core waits while another sorts the largest split. An error names the first configuration and
    split in order that fails."""
    def named(item, compute, *args):
        (method_name, params), where = item
        try:
            return compute(*args)
        except FeatcacheError as exc:
            raise FeatcacheError(f"{method_name} {params_key(params)} on {where}: {exc}") from None

    out = []
    for first in range(0, len(entries), METRIC_GROUP):
        group = entries[first : first + METRIC_GROUP]
        # per configuration, the ID split is sorted once for every ood split, the ood splits' own sorts alongside
        sorts = [((name, params), where, scores) for name, params, id_scores, _, ood_scores in group
                 for where, scores in [("the ID split", id_scores), *ood_scores.items()]]
        sorted_scores = map_items(lambda item: named(item[:2], SortedScores, item[2]), sorts)
        pairs, at = [], 0
        for name, params, _, _, ood_scores in group:
            id_sorted = sorted_scores[at]
            pairs += [((name, params), ood, id_sorted, ood_sorted)
                      for ood, ood_sorted in zip(ood_scores, sorted_scores[at + 1 : at + 1 + len(ood_scores)])]
            at += 1 + len(ood_scores)
        metrics = iter(map_items(lambda item: named(item[:2], ood_metrics, *item[2:]), pairs))
        for name, params, _, id_acc, ood_scores in group:
            rows = [{"method": name, "params": params_key(params), "ood": ood, **next(metrics), "id_acc": id_acc}
                    for ood in ood_scores]
            mean = {m: float(np.mean([r[m] for r in rows])) for m in METRICS}
            rows.append({"method": name, "params": params_key(params), "ood": MEAN, **mean, "id_acc": id_acc})
            out.append(rows)
    return out


def evaluate(method: Method, params: dict, replay: Replay, id_split: SplitData | None = None,
             ood_splits: list[SplitData] | None = None) -> list[dict]:
    """Metric rows for one configuration on already loaded splits (by default id_test and the oods)."""
    id_split = id_split or replay.id_test
    ood_splits = replay.oods if ood_splits is None else ood_splits
    out_id = method(id_split, replay.head, replay.fit, **params)
    ood_scores = {ood.name: method(ood, replay.head, replay.fit, **params).scores for ood in ood_splits}
    return metric_rows(method.name, params, out_id.scores, accuracy(out_id.predictions, id_split.labels), ood_scores)


def check_fingerprint(cache_path, expected: str, storage_options: dict | None = None, cache: Cache | None = None):
    """Refuse to go on when the cache at `cache_path` no longer has the fingerprint a run started with.

    A cache replaced or rewritten while a sweep runs would otherwise mix two caches in one results
    file; with `cache` given, that open cache is checked instead of opening the path again.
    """
    if cache is None:
        with open_cache(cache_path, storage_options=storage_options) as reopened:
            found = reopened.fingerprint
    else:
        found = cache.fingerprint
    if found != expected:
        raise FeatcacheError(f"{cache_path}: the cache changed while this run was using it (fingerprint "
                             f"{expected[:12]} when it started, now {found[:12]}); nothing from the new cache "
                             "was kept: run the command again to use it")


def sweep_batch(cache_path, configs: list[tuple[str, dict]], storage_options: dict | None = None, *,
                fingerprint: str | None = None, scratch=None, plugins: list[str] | None = None
                ) -> tuple[list[dict], dict, list[dict]]:
    """Metric rows of `configs` (method name, parameters), computed one split at a time.

    Each split's arrays and its memo of shared work are held only while every configuration of
    the batch is scored on it, so memory stays at about one split whatever the grid. A module-level
    function of plain arguments, so joblib can run batches in other processes. Returns the rows,
    timings (the batch's seconds in all, and those spent reading the cache), and for each
    configuration whose method counts samples with S_X <= 0 (nap+X in the paper form)
    {"method", "params", "nonpositive": {split name: count}}.

    `fingerprint`: the cache's fingerprint when the sweep started; the batch stops with an error if
    the cache it opens, or the one at the path once its scores are computed, has another.
    `scratch` (a `progress.ScoreScratch`): scores of each (configuration, split) are saved there as
    soon as they are computed (written in the background, all of them before the batch returns),
    and those already saved are not computed again.
    `plugins`: in a worker process, which starts with the built-ins only, the resolved plugin specs
    (`featcache.plugins.worker_specs`) that register the batch's methods, imported before any is
    looked up; None in the process that loaded them.
    """
    import time
    from contextlib import nullcontext

    from featcache.plugins import import_in_worker
    from featcache.progress import saving_in_background

    if plugins is not None:
        import_in_worker(plugins)
    started, read_clock = time.perf_counter(), [0.0]
    with open_cache(cache_path, storage_options=storage_options) as cache, \
            (saving_in_background(scratch.save) if scratch is not None else nullcontext()) as save:
        if fingerprint is not None:
            check_fingerprint(cache_path, fingerprint, cache=cache)
        sizes = {split.name: split.n for split in cache.splits()}
        replay = load_replay(cache, read_clock=read_clock)
        methods = [(get_method(name), params) for name, params in configs]
        counts: list[dict] = [{} for _ in methods]
        nap_bases = {(name, params_key(base_config(name, params)[1])) for name, params in configs
                     if name.startswith("nap+")}

        def scored(method, params, data):
            """The method's output; kept on the split when a nap+ configuration of the batch
            combines it, which then takes it instead of computing it again (see nap.shared_output)."""
            if method.name.startswith("nap+") or (f"nap+{method.name}", params_key(params)) not in nap_bases:
                return method(data, replay.head, replay.fit, **params)
            return shared_output(method, data, replay.head, replay.fit, params)

        def scores_on(data: SplitData, is_id: bool) -> list:
            """Per configuration, its scores on one split (and the ID accuracy on the ID split), taken
            from the scratch or computed and saved there."""
            saved_before = [scratch.load(method.name, params_key(params), data.name, sizes[data.name])
                            if scratch else None for method, params in methods]
            # the configurations to score here: a product computed for one of them serves those
            # sharing it, and one family's products run together (those saved already are not redone)
            data.plan = work_plan((method.name, params) for (method, params), saved in zip(methods, saved_before)
                                  if saved is None)
            found = []
            for (method, params), count, saved in zip(methods, counts, saved_before):
                key = params_key(params)
                if saved is None:
                    out = scored(method, params, data)
                    acc = accuracy(out.predictions, data.labels) if is_id else None
                    saved = (np.asarray(out.scores, dtype=np.float64), acc, out.nonpositive)
                    if save is not None:
                        save(method.name, key, data.name, *saved)
                scores, acc, nonpositive = saved
                if nonpositive is not None:
                    count[data.name] = nonpositive
                found.append((scores, acc))
            return found

        id_results = scores_on(replay.id_test, is_id=True)
        replay.id_test = None
        ood_scores: list[dict] = [{} for _ in methods]
        for i, ood in enumerate(replay.oods):
            for scores, (found, _) in zip(ood_scores, scores_on(ood, is_id=False)):
                scores[ood.name] = found
            replay.oods[i] = None  # release the split and its memo before the next one is read
    if fingerprint is not None:
        check_fingerprint(cache_path, fingerprint, storage_options)  # the path may hold another cache by now
    rows = [row for config_rows in metric_rows_of([(method.name, params, ids, acc, oods) for (method, params), (ids, acc), oods
                                                    in zip(methods, id_results, ood_scores)])
            for row in config_rows]
    nonpositive = [{"method": method.name, "params": params_key(params), "nonpositive": count}
                   for (method, params), count in zip(methods, counts) if count]
    return rows, {"seconds": time.perf_counter() - started, "read_seconds": read_clock[0]}, nonpositive
