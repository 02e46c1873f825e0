"""What every method sees, and the registry that names them.

A method is a function `score(data, head, fit, **params) -> Output`: `data` holds one split's cached
arrays, `head` the linear layer, `fit` statistics of the id_train split. It returns a score per
sample (higher = more in-distribution) and the class the head it used predicts, for ID accuracy.
Methods are registered with `@register`, one module per family; `get_method` also builds
`nap+<method>` combinations.

Speed at ImageNet scale comes from two habits: the head is applied in row chunks, so no (N, K)
float64 array is ever held, and what several configurations share (sorted features, energies,
clipped sums, a base method's scores) is memoised on the split with `data.memo(key, compute)`.
"""

from __future__ import annotations

import difflib
import math
import os
from dataclasses import dataclass
from functools import cached_property
from typing import Callable

import numpy as np

from featcache.errors import FeatcacheError


ROW_BLOCK = 1024  # rows per block of work: one head product of 1024 x D, temporaries of 1024 x K
LSE_BLOCK = 128  # rows per in-place logsumexp pass: small enough to stay in the CPU cache


def n_workers() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:
        return max(1, os.cpu_count() or 1)


def map_row_blocks(fn: Callable, n: int, block: int = ROW_BLOCK) -> None:
    """Call fn(start, stop) for every block of rows, on all cores.

    numpy's elementwise work is single-threaded; running whole blocks (product, shaping,
    logsumexp) in a thread per core, with BLAS held to one thread, keeps every core busy.
    """
    blocks = [(start, min(start + block, n)) for start in range(0, n, block)]
    workers = min(n_workers(), len(blocks))
    if workers <= 1:
        for start, stop in blocks:
            fn(start, stop)
        return
    from concurrent.futures import ThreadPoolExecutor

    from threadpoolctl import threadpool_limits

    with threadpool_limits(limits=1, user_api="blas"), ThreadPoolExecutor(workers) as pool:
        for future in [pool.submit(fn, start, stop) for start, stop in blocks]:
            future.result()


def logsumexp_rows(z: np.ndarray) -> np.ndarray:
    """log(sum_j exp(z_j)) per row, shifted by the row maximum so it cannot overflow."""
    top = z.max(axis=1, keepdims=True)
    return top[:, 0] + np.log(np.exp(z - top).sum(axis=1))


def _energy_inplace(z: np.ndarray, T: float, reload: Callable) -> np.ndarray:
    """T * logsumexp(z / T) per row of float64 `z`, which is overwritten.

    Shifted by the block's largest value, a scalar (cheaper than a per-row maximum): every term is
    then at most 1, so nothing overflows. Rows whose own maximum lies so far below that their sum
    underflows are redone from `reload(rows)`, the original values, each with its own shift.
    """
    top = z.max()
    z -= top
    if T != 1:
        z *= 1.0 / T  # a multiply is several times cheaper than a divide
    sums = np.exp(z, out=z).sum(axis=1)
    low = np.flatnonzero(sums < 1e-250)
    sums[low] = 1.0
    out = top + T * np.log(sums)
    if low.size:
        again = reload(low) / T
        row_top = again.max(axis=1, keepdims=True)
        out[low] = T * (row_top[:, 0] + np.log(np.exp(again - row_top).sum(axis=1)))
    return out


def energy_blocks(block: Callable, n: int, T: float = 1.0):
    """(energy, argmax) of float64 logits produced `block(start, stop)` at a time, on all cores."""
    scores, predictions = np.empty(n), np.empty(n, dtype=np.int64)

    def run(start, stop):
        z = block(start, stop)
        for a in range(0, len(z), LSE_BLOCK):
            sub = z[a : a + LSE_BLOCK]
            rows = slice(start + a, start + a + len(sub))
            predictions[rows] = sub.argmax(axis=1)
            scores[rows] = _energy_inplace(sub, T, lambda low, a=a: block(start, stop)[a + low])

    map_row_blocks(run, n)
    return scores, predictions


def energy(logits: np.ndarray, T: float = 1.0) -> np.ndarray:
    """T * logsumexp(f / T) per row, in float64."""
    out = np.empty(len(logits))

    def run(start, stop):
        for a in range(start, stop, LSE_BLOCK):
            b = min(a + LSE_BLOCK, stop)
            out[a:b] = _energy_inplace(logits[a:b].astype(np.float64), T,
                                       lambda low, a=a: logits[a + low].astype(np.float64))

    map_row_blocks(run, len(logits))
    return out


def row_reduce(fn: Callable, n: int) -> np.ndarray:
    """fn(start, stop) -> one float64 per row, over all rows, on all cores."""
    out = np.empty(n)

    def run(start, stop):
        out[start:stop] = fn(start, stop)

    map_row_blocks(run, n)
    return out


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

    def energy(self, x, row_scale: np.ndarray | None = None, T: float = 1.0, n: int | None = None):
        """(energy, predicted class) of the logits r_n * (W x_n) + b, r_n = row_scale (1 if None).

        `x` is an (N, D) array, or a function (start, stop) -> the shaped rows start:stop, so that
        shaping too runs a block at a time. One product per block (float32 unless `precise`); the
        scaling, bias and logsumexp in float64.
        """
        rows = x if callable(x) else (lambda a, b: x[a:b])
        dtype = np.float64 if self.precise else np.float32
        weight_t = self.weight.T.astype(dtype)

        def block(start, stop):
            z = (np.asarray(rows(start, stop), dtype=dtype) @ weight_t).astype(np.float64, copy=False)
            if row_scale is not None:
                z *= row_scale[start:stop, None]
            z += self.bias
            return z

        return energy_blocks(block, len(x) if n is None else n, T)


ARRAYS = ("features", "chan_max", "chan_mean", "logits", "labels", "ids")


class SplitData:
    """One split's arrays, given directly or read on first use through `loader(name)`."""

    def __init__(self, name: str, loader: Callable | None = None, same_as: dict | None = None, **arrays):
        self.name = name
        self._loader = loader
        self._same_as = same_as or {}  # e.g. {"chan_mean": "features"}: equal arrays are read once
        self._memo: dict = {}
        for key, value in arrays.items():
            setattr(self, key, value)

    def memo(self, key, compute):
        """compute() once per key for this split: what several configurations share."""
        if key not in self._memo:
            self._memo[key] = compute()
        return self._memo[key]

    def __getattr__(self, key):
        # only reached when the attribute is not set yet
        if key in ARRAYS and self.__dict__.get("_loader") is not None:
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
    """Statistics of the id_train split that methods fit on, each computed once."""

    def __init__(self, id_train: SplitData, seed: int = 0):
        self.data = id_train
        self.seed = seed

    def memo(self, key, compute):
        return self.data.memo(("fit",) + tuple(key), compute)

    def feature_percentile(self, q: float) -> float:
        """np.percentile (linear) over every entry of the id_train features: ReAct's clip."""
        return self.memo(("percentile", q), lambda: float(np.percentile(self.data.features, q)))

    @cached_property
    def mean_feature(self) -> np.ndarray:
        return self.data.features.astype(np.float64).mean(axis=0)

    def subsample(self, n: int) -> np.ndarray:
        """Row indices of n random id_train samples (all if fewer), fixed by `seed`."""
        total = len(self.data)
        if total <= n:
            return np.arange(total)
        return np.sort(np.random.default_rng(self.seed).choice(total, n, replace=False))


@dataclass
class Output:
    scores: np.ndarray  # (N,) float64, higher = more in-distribution
    predictions: np.ndarray  # (N,) class predicted by the head the method used (for ID accuracy)


def original_energy(data: "SplitData", T: float = 1.0) -> np.ndarray:
    """Energy of the cached (original) logits, computed once per split and T."""
    return data.memo(("energy", T), lambda: energy(data.logits, T))


def original_predictions(data: "SplitData") -> np.ndarray:
    return data.memo(("argmax",), lambda: data.logits.argmax(axis=1))


# --- parameters -----------------------------------------------------------------------------------


def _finite(v):
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


CHECKS = {
    "p": (lambda v: _finite(v) and 0 <= v < 100, "a number in [0, 100)"),
    "percentile": (lambda v: _finite(v) and 0 <= v <= 100, "a number in [0, 100]"),
    "w": (lambda v: _finite(v) and 0 < v < 1, "a number in (0, 1)"),
    "T": (lambda v: _finite(v) and v > 0, "a positive number"),
    "k": (lambda v: _finite(v) and v > 0, "a positive number"),
    "eps": (lambda v: _finite(v) and v > 0, "a positive number"),
    "alpha_scale": (lambda v: _finite(v) and v > 0, "a positive number"),
    "alpha": (_finite, "a finite number"),
    "clip": (_finite, "a finite number"),
    "seed": (lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 0, "a non-negative integer"),
    "bank": (lambda v: _finite(v) and 0 < v <= 1, "a fraction in (0, 1]"),
}


@dataclass(frozen=True)
class Method:
    name: str
    fn: Callable
    defaults: dict  # every parameter the method takes, with its default (None: one of a choice)
    positive: str = "exp"  # how nap+ makes the score positive: "exp" (log-domain) or "identity" (> 0)
    one_of: tuple = ()  # groups of parameters of which at most one may be given
    paper_default: dict | None = None  # the source paper's recommended setting, where it gives one
    integer: tuple = ()  # parameters that must be integers (k of KNN)

    def resolve(self, params: dict) -> dict:
        """Defaults filled in and every value checked; errors name the method, parameter and value."""
        params = dict(params)
        unknown = sorted(set(params) - set(self.defaults))
        if unknown:
            close = difflib.get_close_matches(unknown[0], list(self.defaults), n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            takes = ", ".join(self.defaults) or "no parameters"
            raise FeatcacheError(f"{self.name}: unknown parameter {unknown[0]!r}{hint} (it takes {takes})")
        for group in self.one_of:
            given = [g for g in group if params.get(g) is not None]
            if len(given) > 1:
                raise FeatcacheError(f"{self.name}: give only one of {' or '.join(group)}, not both")
            chosen = given[0] if given else group[0]
            for other in group:
                params[other] = params.get(chosen, self.defaults[chosen]) if other == chosen else None
        full = {k: params[k] if k in params else v for k, v in self.defaults.items()}
        for key, value in full.items():
            if value is None and any(key in g for g in self.one_of):
                continue
            ok, what = CHECKS.get(key, (lambda v: True, ""))
            if key in self.integer and not (isinstance(value, int) and not isinstance(value, bool) and value > 0):
                raise FeatcacheError(f"{self.name}: {key} must be a positive integer, got {value!r}")
            if not ok(value):
                raise FeatcacheError(f"{self.name}: {key} must be {what}, got {value!r}")
        return {k: v for k, v in full.items() if v is not None}

    def __call__(self, data: SplitData, head: Head, fit: Fit, **params) -> Output:
        return self.fn(data, head, fit, **params)


REGISTRY: dict[str, Method] = {}


def register(name: str, *, defaults: dict | None = None, positive: str = "exp", one_of: tuple = (),
             paper_default: dict | None = None, integer: tuple = ()):
    """Register `fn(data, head, fit, **params) -> Output` under `name`."""

    def wrap(fn):
        if name in REGISTRY:
            raise ValueError(f"method {name!r} registered twice")
        REGISTRY[name] = Method(name, fn, dict(defaults or {}), positive, one_of, paper_default, integer)
        return fn

    return wrap


def get_method(name: str) -> Method:
    """The registered method `name`, or the NAP combination `nap+<method>`."""
    import featcache.methods  # noqa: F401  (registers every family)

    if name in REGISTRY:
        return REGISTRY[name]
    if name.startswith("nap+"):
        from featcache.methods.nap import combine

        base = name[4:]
        if base.startswith("nap"):
            raise FeatcacheError(f"{name}: NAP cannot be combined with itself")
        if base in REGISTRY:
            return combine(REGISTRY[base])
    candidates = list(REGISTRY) + [f"nap+{m}" for m in REGISTRY if m != "nap"]
    close = difflib.get_close_matches(name, candidates, n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    raise FeatcacheError(f"unknown method {name!r}{hint}")
