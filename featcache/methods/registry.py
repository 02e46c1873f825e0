"""The registry of methods: the public face of `featcache.methods`.

A method is a function `score(data, head, fit, **params) -> Output` (see `featcache.methods.data`):
`data` holds one split's cached arrays, `head` the linear layer, `fit` statistics of the id_train
split. It returns a score per sample (higher = more in-distribution) and the class the head it used
predicts, for ID accuracy. Methods are registered with `@register`, one module per family;
`get_method` also builds `nap+<method>` combinations.

Paper settings are per benchmark (`BENCHMARKS`): each module types them from the seeds' tables and
names the table; a benchmark the seeds give no value for is absent, never borrowed from another.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from typing import Callable

from featcache.errors import FeatcacheError
from featcache.methods.data import Fit, Head, Output, SplitData
from featcache.methods.params import CHECKS


BENCHMARKS = ("cifar10", "cifar100", "imagenet")


def check_benchmark(benchmark) -> str:
    if benchmark not in BENCHMARKS:
        raise FeatcacheError(f"benchmark must be one of {', '.join(BENCHMARKS)}, got {benchmark!r}")
    return benchmark


def every_benchmark(params: dict) -> dict:
    """The same paper setting on every benchmark: a method without parameters, or a value its paper
    states once for all of them."""
    return {b: dict(params) for b in BENCHMARKS}


@dataclass(frozen=True)
class Method:
    name: str
    fn: Callable
    defaults: dict  # every parameter the method takes, with its default (None: one of a choice)
    nap_offset: float = 0.0  # nap+ (paper form) uses S_X = score + nap_offset; 2 for KNN's -distance
    one_of: tuple = ()  # groups of parameters of which at most one may be given
    paper: dict = field(default_factory=dict)  # benchmark -> the source papers' setting (absent: none given)
    integer: tuple = ()  # parameters that must be integers (k of KNN)
    qualifies: dict = field(default_factory=dict)  # parameter -> the one it qualifies (percentile_of -> percentile)
    # Bumped whenever a change to the method's code changes its numbers, so that saved progress
    # computed by the old code is recomputed rather than reused.
    version: str = "1"

    def paper_default(self, benchmark: str) -> dict | None:
        """The papers' setting on `benchmark`, or None where the seeds give none."""
        check_benchmark(benchmark)
        value = self.paper.get(benchmark)
        return None if value is None else dict(value)

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
        for key, parent in self.qualifies.items():
            if full.get(parent) is None:  # e.g. percentile_of means nothing once a clip is given
                if params.get(key) is not None:
                    raise FeatcacheError(f"{self.name}: {key} applies only with {parent}, which is not used here")
                full[key] = None
        for key, value in full.items():
            if value is None and (any(key in g for g in self.one_of) or key in self.qualifies):
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


def register(name: str, *, defaults: dict | None = None, nap_offset: float = 0.0, one_of: tuple = (),
             paper: dict | None = None, integer: tuple = (), qualifies: dict | None = None,
             version: int | str = 1):
    """Register `fn(data, head, fit, **params) -> Output` under `name`.

    `paper` maps a benchmark of `BENCHMARKS` to the source papers' setting on it. `version` names
    the revision of the method's code: raise it when a fix changes the scores, and sweeps recompute
    what they had saved with the old code.
    """

    def wrap(fn):
        if name in REGISTRY:
            raise ValueError(f"method {name!r} registered twice")
        unknown = sorted(set(paper or {}) - set(BENCHMARKS))
        if unknown:
            raise ValueError(f"method {name!r}: unknown benchmark {unknown[0]!r} in its paper settings")
        REGISTRY[name] = Method(name, fn, dict(defaults or {}), nap_offset, one_of, dict(paper or {}), integer,
                                dict(qualifies or {}), str(version))
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
