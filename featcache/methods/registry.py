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
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

import numpy as np

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
    origin: str = "featcache"  # where it was registered: featcache, "plugin: <spec>", "entry point: <value>", ...
    # What a worker process imports to register it again: a plugin spec (module name or absolute .py
    # path), MAIN when it was registered in __main__ (which no worker can import), None for built-ins.
    plugin: str | None = None

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
        # CHECKS say what the built-ins' parameters mean (p of ASH is a percentile): a plugin's own
        # parameters are its business, only NAP's (w, eps, form of nap+<plugin>) are checked for it
        checks = CHECKS if self.origin == "featcache" else {k: CHECKS[k] for k in ("w", "eps", "form")
                                                            if self.name.startswith("nap+")}
        for key, value in full.items():
            if value is None and (any(key in g for g in self.one_of) or key in self.qualifies):
                continue
            ok, what = checks.get(key, (lambda v: True, ""))
            if key in self.integer and not (isinstance(value, int) and not isinstance(value, bool) and value > 0):
                raise FeatcacheError(f"{self.name}: {key} must be a positive integer, got {value!r}")
            if not ok(value):
                raise FeatcacheError(f"{self.name}: {key} must be {what}, got {value!r}")
        return {k: v for k, v in full.items() if v is not None}

    def __call__(self, data: SplitData, head: Head, fit: Fit, **params) -> Output:
        if self.origin == "featcache":
            return self.fn(data, head, fit, **params)
        # a plugin's failure is reported on one line naming it, like any user error
        where = f"method {self.name!r} ({self.origin}) on split {data.name!r}"
        try:
            out = self.fn(data, head, fit, **params)
        except FeatcacheError as exc:
            raise FeatcacheError(f"{where}: {exc}") from None
        except (Exception, SystemExit) as exc:  # sys.exit in a plugin must not pass for a finished sweep
            text = str(exc).strip()
            raise FeatcacheError(f"{where} failed: {type(exc).__name__}"
                                 + (f": {text.splitlines()[0]}" if text else "")) from None
        if not isinstance(out, Output):
            raise FeatcacheError(f"{where} returned a {type(out).__name__}; a method returns "
                                 "featcache.methods.Output(scores, predictions)")
        n = len(data.labels)
        for what, values in (("scores", out.scores), ("predictions", out.predictions)):
            if getattr(values, "shape", None) != (n,):
                raise FeatcacheError(f"{where}: {what} have shape {getattr(values, 'shape', None)}, expected ({n},), "
                                     "one per sample")
        if np.asarray(out.scores).dtype.kind not in "biuf":
            raise FeatcacheError(f"{where}: scores are {np.asarray(out.scores).dtype}, not numbers")
        predictions = np.asarray(out.predictions)
        classes = head.weight.shape[0]
        if predictions.dtype.kind not in "iu" or (n and (predictions.min() < 0 or predictions.max() >= classes)):
            raise FeatcacheError(f"{where}: predictions must be integer classes of the head (0..{classes - 1}), got "
                                 f"{predictions.dtype} values" + (f" from {predictions.min()} to {predictions.max()}"
                                                                 if n and predictions.dtype.kind in "biuf" else ""))
        return out


REGISTRY: dict[str, Method] = {}

MAIN = "__main__"
_LOADING: list[tuple[str, str | None]] = []  # (origin, spec) of the plugins being imported, innermost last


@contextmanager
def registering(origin: str, spec: str | None):
    """Methods registered inside the block come from plugin `spec`, shown as `origin`."""
    _LOADING.append((origin, spec))
    try:
        yield
    finally:
        _LOADING.pop()


def origin_of(fn) -> tuple[str, str | None]:
    """(origin, spec) of a method registered by `fn`: the plugin being imported, else fn's module."""
    if _LOADING:
        return _LOADING[-1]
    module = getattr(fn, "__module__", None) or MAIN
    if module == "featcache" or module.startswith("featcache."):
        return "featcache", None
    if module == MAIN:
        return MAIN, MAIN
    return f"module: {module}", module


def same_function(old: Method, fn, origin: str) -> bool:
    """Whether `fn` is `old`'s function registered again (a module loaded once more, a notebook cell
    run again) rather than another method taking its name."""
    def where(f):
        code = getattr(f, "__code__", None)
        return getattr(code, "co_filename", None), getattr(f, "__qualname__", None)

    if old.fn is fn or (old.origin == origin and getattr(old.fn, "__qualname__", 0) == getattr(fn, "__qualname__", 1)):
        return True
    return where(old.fn)[0] is not None and where(old.fn) == where(fn)


def register(name: str, *, defaults: dict | None = None, nap_offset: float = 0.0, one_of: tuple = (),
             paper: dict | None = None, integer: tuple = (), qualifies: dict | None = None,
             version: int | str = 1):
    """Register `fn(data, head, fit, **params) -> Output` under `name`, as a decorator.

    Built-in methods and plugins (`featcache.register`) use the same call.

    Parameters
    ----------
    name : str
        The method's name in grids, results and `featcache methods`; `nap+<name>` combines it with NAP.
    defaults : dict, optional
        Every parameter the method takes, with its default.
    nap_offset : float, default 0
        Added to the score before `nap+<name>` (paper form) combines it, which needs S_X > 0.
    one_of : tuple of tuples, optional
        Groups of parameters of which at most one may be given.
    paper : dict, optional
        Maps a benchmark of `BENCHMARKS` to the source paper's setting on it.
    integer : tuple, optional
        Parameters that must be positive integers.
    qualifies : dict, optional
        parameter -> the one it qualifies (meaningless when that one is not used).
    version : int or str, default 1
        The revision of the method's code: raise it when a fix changes the scores, and sweeps
        recompute what they had saved with the old code.

    Returns
    -------
    callable
        A decorator that registers the function and returns it unchanged.

    Examples
    --------
    >>> import numpy as np
    >>> import featcache
    >>> from featcache.methods import Output
    >>> @featcache.register("featnorm_doc", defaults={"p": 2.0}, paper={"cifar10": {"p": 2.0}})
    ... def featnorm(data, head, fit, p):
    ...     return Output(-np.linalg.norm(data.features, ord=p, axis=1), data.logits.argmax(axis=1))
    """
    # names become CSV cells and grid keys; nap+<name> is the NAP combination, built on request
    if (not isinstance(name, str) or not name or any(c.isspace() or c in "/\\,\"'" for c in name)
            or name.startswith("nap+")):
        raise FeatcacheError(f"method name must be a non-empty word without spaces, commas, '/' or quotes, and "
                             f"not start with 'nap+', got {name!r}")
    if defaults is not None and not isinstance(defaults, dict):
        raise FeatcacheError(f"method {name!r}: defaults must be a dict of parameter -> default, got {defaults!r}")

    def wrap(fn):
        if not callable(fn):
            raise FeatcacheError(f"method {name!r}: register decorates a function (data, head, fit, **params)")
        if not getattr(fn, "__module__", "").startswith("featcache.methods"):
            import featcache.methods  # noqa: F401  (built-ins first, so a plugin cannot take their names)
        origin, spec = origin_of(fn)
        old = REGISTRY.get(name)
        if old is not None and not same_function(old, fn, origin):
            first = "featcache (built-in)" if old.origin == "featcache" else old.origin
            raise FeatcacheError(f"method {name!r} is registered twice: by {first} and by {origin}; "
                                 "rename one of them")
        unknown = sorted(set(paper or {}) - set(BENCHMARKS))
        if unknown:
            raise FeatcacheError(f"method {name!r}: unknown benchmark {unknown[0]!r} in its paper settings "
                                 f"(benchmarks: {', '.join(BENCHMARKS)})")
        revision = str(version)
        if origin != "featcache":
            # saved progress is reused only for the same code: an edited plugin whose version was
            # not raised is recomputed all the same, and so is one that may call a built-in whose
            # version was raised (its scores would change with the built-in's)
            revision += "+" + source_digest(fn) + "." + builtin_versions_digest()
        method = Method(name, fn, dict(defaults or {}), nap_offset, tuple(one_of), dict(paper or {}),
                        tuple(integer), dict(qualifies or {}), revision, origin, spec)
        for benchmark, setting in method.paper.items():  # a paper setting must be one the method takes
            try:
                method.resolve(setting or {})
            except FeatcacheError as exc:
                raise FeatcacheError(f"method {name!r}: its paper setting on {benchmark}: {exc}") from None
        REGISTRY[name] = method
        return fn

    return wrap


def builtin_versions_digest() -> str:
    """The first 8 hex digits of sha256 over every built-in method's name and version."""
    import hashlib

    pairs = sorted((name, m.version) for name, m in REGISTRY.items() if m.origin == "featcache")
    return hashlib.sha256(repr(pairs).encode()).hexdigest()[:8]


def source_digest(fn) -> str:
    """The first 12 hex digits of sha256 over the source file that defines `fn` (of its code object
    where the file cannot be read, e.g. a notebook cell)."""
    import hashlib
    import inspect

    try:
        data = Path(inspect.getsourcefile(fn) or "").read_bytes()
    except (TypeError, OSError):
        code = getattr(fn, "__code__", None)
        data = code.co_code + repr(code.co_consts).encode() if code is not None else repr(fn).encode()
    return hashlib.sha256(data).hexdigest()[:12]


def get_method(name: str) -> Method:
    """The registered method `name`, or the NAP combination `nap+<method>`."""
    import featcache.methods  # noqa: F401  (registers every family)
    from featcache.plugins import load_entry_points

    load_entry_points()  # installed packages' plugins, once per process
    if name in REGISTRY:
        return REGISTRY[name]
    if name.startswith("nap+"):
        from featcache.methods.nap import combine

        base = name[4:]
        if base.startswith("nap"):
            raise FeatcacheError(f"{name}: NAP cannot be combined with itself")
        if base in REGISTRY:
            try:
                combined = combine(REGISTRY[base])
            except ValueError as exc:
                raise FeatcacheError(f"{name}: {exc}") from None
            return replace(combined, origin=REGISTRY[base].origin, plugin=REGISTRY[base].plugin)
    candidates = list(REGISTRY) + [f"nap+{m}" for m in REGISTRY if m != "nap"]
    close = difflib.get_close_matches(name, candidates, n=1)
    hint = (f"; did you mean {close[0]!r}?" if close else
            "; if it is a plugin's, name its file or module in the pipeline's `plugins:` (or plugins= in Python), "
            "or install its package")
    raise FeatcacheError(f"unknown method {name!r}{hint}")
