"""What a method sees: one split's cached arrays, the linear head, id_train statistics, and its output.

What several configurations share (each row's k largest values, energies, clipped sums, a base
method's scores) is memoised on the split with `data.memo(key, compute)`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from functools import cached_property
from typing import Callable

import numpy as np

from featcache.allocator import faulted_empty
from featcache.errors import FeatcacheError
from featcache.methods.kernels import energy, energy_blocks_shared, n_lse_blocks
from featcache.methods import sparse


PRECISE_HEAD_WEIGHTS = 1 << 18  # heads up to this many weights (CIFAR-size) replay in float64


@dataclass
class Head:
    weight: np.ndarray  # (K, D) float32
    bias: np.ndarray  # (K,) float32

    @property
    def precise(self) -> bool:
        """Small heads multiply in float64: it costs nothing there and keeps scores free of float32
        rounding (which a per-sample scale such as ASH-S's exp(s1/s2) would magnify). Large heads
        (ImageNet's 2048 x 1000) multiply in float32, where BLAS speed is the point."""
        return self.weight.size <= PRECISE_HEAD_WEIGHTS

    def __call__(self, x: np.ndarray) -> np.ndarray:
        """Logits of (N, D) features: x @ W.T + b, the product in float32 as the model computes it."""
        return np.asarray(x, dtype=np.float32) @ self.weight.T + self.bias

    def energy(self, x, row_scale: np.ndarray | None = None, T: float = 1.0, n: int | None = None,
               sparse_rows: bool = False, sparse_weights: bool = False):
        """(energy, predicted class) of the logits r_n * (W x_n) + b, r_n = row_scale (1 if None).

        `x` is an (N, D) array, or a function (start, stop) -> the shaped rows start:stop, so that
        shaping too runs a block at a time. One product per block (float32 unless `precise`; over
        the nonzero terms only with `sparse_rows` or `sparse_weights`, see `job`); the scaling, bias
        and logsumexp in float64.
        """
        return self.energies(x, [row_scale], T, n, sparse_rows, sparse_weights)[0]

    def energies(self, x, row_scales: list, T: float = 1.0, n: int | None = None, sparse_rows: bool = False,
                 sparse_weights: bool = False) -> list:
        """`energy` for each of `row_scales` (arrays or None) from one product of `x` with the head.

        The head is linear, (r x) W^T + b = r (x W^T) + b, so configurations that differ only by a
        per-row scale of the same shaped feature (ASH-P and ASH-S at one p) share the product; each
        gets the very numbers `energy` gives it alone.
        """
        # the flags only where asked: a plugin's Head subclass or wrapper of `job` written before
        # them keeps working for dense products
        flags = {name: True for name, on in (("sparse_rows", sparse_rows), ("sparse_weights", sparse_weights)) if on}
        job = self.job(x, row_scales, **flags)
        return energy_blocks_shared([job], len(x) if n is None else n, T)[0]

    def _weight_form(self, name: str, make: Callable):
        """make(), a form of the weight (its nonzeros, its transpose in float32, whether it is finite):
        kept with a head that featcache made read-only (`read_only`: the replay's head, DICE's
        memoised heads) while it holds the very same read-only array owning its memory, else made at
        each call, since a plugin's own head may be changed in place (through any view), or given
        another array, between calls."""
        weight, held = self.weight, self.__dict__.get("_weight_forms")  # (the sealed weight, its forms)
        if held is None or held[0] is not weight or weight.flags.writeable or weight.base is not None:
            return make()
        if name not in held[1]:
            held[1][name] = make()
        return held[1][name]

    def _sparse_ready(self) -> bool:
        """Whether products with this head may skip zeros: float32 (not `precise`) and finite."""
        return not self.precise and self._weight_form("finite", lambda: bool(np.isfinite(self.weight).all()))

    def _sparse_weight(self):
        """The weight's nonzeros as `sparse.sparse_weight`, where it keeps few (DICE at a high p), else None."""
        def make():
            if not sparse.worth_sparse(np.count_nonzero(self.weight), self.weight.size):
                return None
            return sparse.sparse_weight(self.weight)
        return self._weight_form("sparse", make) if self._sparse_ready() else None

    def _weight_t_float32(self):
        """W.T as a C-contiguous float32 array: the sparse product walks its rows."""
        return self._weight_form("transposed", lambda: np.ascontiguousarray(self.weight.T, dtype=np.float32))

    def job(self, x, row_scales: list = (None,), sparse_rows: bool = False,
            sparse_weights: bool = False) -> tuple[Callable, list]:
        """(product, finishes) of `energies(x, row_scales)`, for `kernels.energy_blocks_shared` to run
        along with other features' and heads' jobs in one queue.

        `sparse_rows`: x's rows keep few nonzeros (ASH's k, `sparse.worth_sparse`); `sparse_weights`:
        the head may keep few weights (DICE's). A finite float32 head then multiplies only the
        nonzero terms (`featcache.methods.sparse`). Other methods' products stay dense whatever the
        zeros, so that their numbers do not change with a head's sparsity.
        """
        rows = x if callable(x) else (lambda a, b: x[a:b])
        dtype = np.float64 if self.precise else np.float32
        weight_t = self.weight.T.astype(dtype, copy=False)  # a view when the weight has the dtype already

        weight_csr = self._sparse_weight() if sparse_weights else None
        if weight_csr is not None:

            def product(start, stop):
                return sparse.sparse_weight_product(rows(start, stop), weight_csr, weight_t)
        elif sparse_rows and self._sparse_ready():
            weight_t32 = self._weight_t_float32()

            def product(start, stop):
                return sparse.sparse_rows_product(rows(start, stop), weight_t32)
        else:
            def product(start, stop):
                return np.asarray(rows(start, stop), dtype=dtype) @ weight_t

        bias = self.bias.astype(np.float64)

        def finish_with(row_scale):
            # in float64, as (float64 product) * r + b: the very operations of the model's logits
            def finish(z, out, index):
                if row_scale is None:
                    np.copyto(out, z)  # then the bias in place: faster than numpy's casting add, the same numbers
                else:
                    np.multiply(z, row_scale[index, None], out=out, dtype=np.float64)
                out += bias
            return finish

        return product, [finish_with(r) for r in row_scales]


def shares(data, head) -> bool:
    """Whether `head` is the head of the replay that split `data` belongs to (`SplitData.replay_head`).
    Only its products are made along with the batch's other configurations and memoised on the
    split; any other head (a plugin's own, made per call, perhaps changed in place) gets exactly the
    product it asks for, computed at each call."""
    return data.replay_head is not None and head is data.replay_head


def made_together(data, head: Head, name: str, key, variant: str, planned: list, job_of: Callable,
                  n: int) -> "Output":
    """`variant`'s `Output` at `key` on n rows of split `data` with `head`, made along with every
    (key, variant) pair of `planned` (what the batch scores) not made yet, and memoised per (name,
    key), when `head` is the replay's (`shares`); with any other head, that one output alone.

    `key` is what fixes a head product (ASH's p, ReAct's clip c); the variants at one key share its
    product and differ in how it is finished (ASH-P's and ASH-S's row scales). job_of(key, variants)
    gives that product finished once per variant (a `Head.job`); every key's product runs in one
    queue (`kernels.energy_blocks_shared`).
    """
    if not shares(data, head):
        return Output(*energy_blocks_shared([job_of(key, [variant])], n)[0][0])
    if variant not in data.memo((name, key), dict):
        wanted: dict = {}
        for k, v in [(key, variant), *planned]:
            if v not in data.memo((name, k), dict) and v not in wanted.setdefault(k, []):
                wanted[k].append(v)
        todo = {k: variants for k, variants in wanted.items() if variants}
        outs = energy_blocks_shared([job_of(k, variants) for k, variants in todo.items()], n)
        for (k, variants), out in zip(todo.items(), outs):
            data.memo((name, k), dict).update(zip(variants, (read_only(Output(*o)) for o in out)))
    return data.memo((name, key), dict)[variant]


def read_only(value):
    """`value`, with the numpy arrays in it (itself, or the fields of an `Output` or other dataclass,
    or the items of a tuple or list) made read-only.

    What is memoised and the replay's head are handed to every configuration that asks for them: a
    plugin that changed a built-in's scores in place (`out.scores += ...`) would otherwise change
    them for the rest of the batch too; it gets numpy's "assignment destination is read-only" error
    instead, and should work on a copy (`out.scores + ...`). The arrays read from the cache stay
    writable (see `SplitData.__getattr__`)."""
    if isinstance(value, np.ndarray):
        value.setflags(write=False)
    elif dataclasses.is_dataclass(value) and not isinstance(value, type):
        for field in dataclasses.fields(value):
            read_only(getattr(value, field.name))
        if isinstance(value, Head):
            # its weight can no longer change through it: forms of that weight may be kept (Head._weight_form)
            value.__dict__["_weight_forms"] = (value.weight, {})
    elif isinstance(value, (tuple, list)):
        for item in value:
            read_only(item)
    return value


ARRAYS = ("features", "chan_max", "chan_mean", "logits", "labels", "ids")
STREAM_ROWS = 2048  # rows per run of an array held in memory (`SplitData.row_runs`)


class SplitData:
    """One split's arrays, given directly or read on first use through `loader(name)`; an array not
    held is read as (start, stop, rows) runs through `run_loader(name)` (see `row_runs`)."""

    def __init__(self, name: str, loader: Callable | None = None, same_as: dict | None = None,
                 run_loader: Callable | None = None, **arrays):
        self.name = name
        self._loader = loader
        self._run_loader = run_loader
        self._same_as = same_as or {}  # e.g. {"chan_mean": "features"}: equal arrays are read once
        self._memo: dict = {}
        # (method, params key) of every configuration the batch scores on this split, nap+X as X:
        # what one shared product may serve besides the configuration that asks for it
        self.plan: frozenset = frozenset()
        # the head of the replay this split belongs to: what is made with it may be shared (`shares`)
        self.replay_head: Head | None = None
        for key, value in arrays.items():
            setattr(self, key, value)

    def memo(self, key, compute):
        """compute() once per key for this split: what several configurations share, made read-only
        (`read_only`) since every one of them gets the same arrays."""
        if key not in self._memo:
            self._memo[key] = read_only(compute())
        return self._memo[key]

    def has(self, key) -> bool:
        """Whether `memo(key, ...)` has its value already."""
        return key in self._memo

    def memo_together(self, key: tuple, value, others, compute):
        """memo(key + (value,)), computed in one pass with those of `others` (the values the batch will
        ask for next) not memoised yet: compute(values) returns their results, in order."""
        if not self.has(key + (value,)):
            missing = [v for v in dict.fromkeys([value, *others]) if not self.has(key + (v,))]
            for v, result in zip(missing, compute(missing)):
                self.memo(key + (v,), lambda result=result: result)
        return self._memo[key + (value,)]

    def planned(self, methods) -> list[dict]:
        """The parameters of every configuration of the batch (nap+X's as X's) whose method is one of
        `methods`: what a shared computation may serve along with the one asking for it."""
        import json

        return [json.loads(key) for name, key in self.plan if name in methods]

    def row_runs(self, key: str):
        """(start, stop, rows of array `key`) over the split: an array read only to be reduced row by
        row (NAP's pre-pool maxima) is read a run at a time when it is not held, so that it never
        takes the memory of a whole split; every run must be taken (the last one finishes its check)."""
        key = self._same_as.get(key, key)
        if key in self.__dict__ or self.__dict__.get("_run_loader") is None:
            values = getattr(self, key)
            for start in range(0, len(values), STREAM_ROWS):
                yield start, min(start + STREAM_ROWS, len(values)), values[start : start + STREAM_ROWS]
        else:
            yield from self._run_loader(key)

    def row_runs_together(self, *keys):
        """(start, stop, [rows of each of `keys`]) over the split: `row_runs` of several arrays at once,
        on the boundaries of all of them. Every run of every array is taken, so each streamed array
        finishes its check after its last run."""
        streams = [self.row_runs(key) for key in keys]
        runs = [next(stream, None) for stream in streams]
        start = 0
        while all(run is not None for run in runs):
            stop = min(run[1] for run in runs)
            yield start, stop, [rows[start - first : stop - first] for first, _, rows in runs]
            start = stop
            runs = [next(stream, None) if run[1] <= stop else run for stream, run in zip(streams, runs)]
        for stream, run in zip(streams, runs):  # the arrays are one length: the others end here too
            if run is not None or next(stream, None) is not None:
                raise FeatcacheError(f"split {self.name!r}: arrays {', '.join(keys)} have different lengths")

    def same_as(self, key: str) -> str:
        """The array that array `key` is read as (chan_mean may be the features)."""
        return self._same_as.get(key, key)

    def __getattr__(self, key):
        # only reached when the attribute is not set yet
        if key in ARRAYS and self.__dict__.get("_loader") is not None:
            # left writable although every configuration reads them: numpy's argmax copies a read-only
            # array whole (it asks for a writeable one), 200 MB for ImageNet's id_test logits
            value = getattr(self, self._same_as[key]) if key in self._same_as else self._loader(key)
            setattr(self, key, value)
            return value
        raise AttributeError(f"split {self.__dict__.get('name')!r} has no array {key!r}")

    def __len__(self):
        return len(self.logits)

    def take(self, index: np.ndarray) -> "SplitData":
        """The same split restricted to rows `index`."""
        return SplitData(self.name, **{k: getattr(self, k)[index] for k in ARRAYS})


class Fit:
    """Statistics of the id_train split that methods fit on, each computed once; and of id_val, for
    the statistics a method may take from it instead (ReAct's `percentile_of: id_val`)."""

    def __init__(self, id_train: SplitData, seed: int = 0, id_val: SplitData | Callable | None = None):
        self.data = id_train
        self.seed = seed
        self._id_val = id_val  # a split, or a function reading it on first use (most methods never do)

    def memo(self, key, compute):
        return self.data.memo(("fit",) + tuple(key), compute)

    def memo_together(self, key, value, others, compute):
        return self.data.memo_together(("fit",) + tuple(key), value, others, compute)

    def split(self, role: str) -> SplitData:
        """The fitted-on split of `role`: id_train, or id_val when the cache has one."""
        if role == "id_train":
            return self.data
        if role != "id_val" or self._id_val is None:
            raise FeatcacheError(f"statistics of {role!r} were asked for, but there is no {role} split")
        if callable(self._id_val):
            self._id_val = self._id_val()
        return self._id_val

    def feature_percentile(self, q: float, of: str = "id_train", also=()) -> float:
        """np.percentile (linear) over every entry of the features of `of` (id_train or id_val):
        ReAct's clip. The percentiles `also` (others the batch will ask for) are computed with it, from
        one sort of the values instead of one partition each."""
        return self.memo_together(("percentile", of), q, also, lambda qs: percentiles(self.split(of).features, qs))

    @cached_property
    def mean_feature(self) -> np.ndarray:
        """id_train's mean feature in float64 (DICE's contributions): the rows summed in order."""
        features = self.data.features
        if features.flags.f_contiguous and features.ndim == 2 and len(features) > 1:
            # numpy sums a column-major float64 copy pairwise down the columns: keep those numbers
            mean = features.astype(np.float64).mean(axis=0)
        else:
            # the same numbers as a float64 copy's mean, cast a buffer at a time: no copy of the split
            mean = features.mean(axis=0, dtype=np.float64)
        return read_only(mean)

    def subsample(self, n: int) -> np.ndarray:
        """Row indices of n random id_train samples (all if fewer), fixed by `seed`."""
        total = len(self.data)
        if total <= n:
            return np.arange(total)
        return np.sort(np.random.default_rng(self.seed).choice(total, n, replace=False))


def percentiles(values: np.ndarray, qs) -> list[float]:
    """[float(np.percentile(values, q)) for q in qs], from one sort of the values.

    Each value is numpy's own for a Python number q (numpy's linear method, with the weak-scalar
    arithmetic of a Python q: the interpolation runs in the values' dtype), so the clip is the same
    to the last bit as one np.percentile per q; tests/test_perf_exact.py checks it against numpy.
    A numpy float q counts as its Python value (np.percentile would interpolate in float64 for it),
    so a clip does not depend on how its percentile was typed. A sort, not np.partition at every rank
    the qs need: numpy's vectorised sort of 20 M float32 values takes a fifth of the time of
    partitioning them at 20 ranks. Two differences from np.percentile, neither reachable from a
    cache's features: where the values hold both 0.0 and -0.0, a zero result may have the other
    sign (the sort and numpy's partition order equal values differently); and NaN values, which
    numpy answers with NaN, are not supported (the reader refuses them).
    """
    flat = faulted_empty(values.size, values.dtype)  # np.sort(values, axis=None), in memory faulted on every core
    np.copyto(flat.reshape(values.shape), values)
    flat.sort()
    n = flat.size
    points = []
    for q in qs:
        virtual = (n - 1) * np.true_divide(q, 100)
        below = np.floor(virtual)
        if virtual >= n - 1:
            prev = nxt = n - 1
            below = -1  # numpy's previous index past the end: its gamma, virtual + 1, keeps a -0.0 at n = 1
        elif virtual < 0:
            prev = nxt = 0
        else:
            prev, nxt = int(below), int(below) + 1
        points.append((prev, nxt, float(virtual - below)))
    out = []
    for prev, nxt, gamma in points:
        a, b = flat[prev], flat[nxt]
        diff = b - a
        out.append(float(b - diff * (1 - gamma) if gamma >= 0.5 else a + diff * gamma))
    return out


@dataclass
class Output:
    scores: np.ndarray  # (N,) float64, higher = more in-distribution
    predictions: np.ndarray  # (N,) class predicted by the head the method used (for ID accuracy)
    nonpositive: int | None = None  # nap+X (paper form): how many samples had S_X <= 0


def original_energy(data: "SplitData", T: float = 1.0) -> np.ndarray:
    """Energy of the cached (original) logits, computed once per split and T; the logits' block maxima
    that the first T finds serve every other T."""
    def compute():
        if data.has(("logit block tops",)):  # memo returns what it holds: nothing to compute
            return energy(data.logits, T, block_tops=data.memo(("logit block tops",), None))
        tops = np.empty(n_lse_blocks(len(data.logits)))
        scores = energy(data.logits, T, tops_out=tops)
        data.memo(("logit block tops",), lambda: tops)  # only once all are found: an error leaves none
        return scores

    return data.memo(("energy", T), compute)


def original_predictions(data: "SplitData") -> np.ndarray:
    return data.memo(("argmax",), lambda: data.logits.argmax(axis=1))
