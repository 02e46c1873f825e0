"""Grid expansion: a pipeline's `sweep:` mapping into checked (method, parameters) configurations."""

from __future__ import annotations

import itertools
import json

from featcache.errors import FeatcacheError
from featcache.methods.registry import Method, get_method


def expand_grid(grid: dict) -> list[tuple[Method, dict]]:
    """(method, resolved parameters) for every point of every method's grid, all checked up front."""
    configs = []
    for name, space in grid.items():
        method = get_method(str(name))
        space = space or {}
        if not isinstance(space, dict):
            raise FeatcacheError(f"sweep.{name}: expected a mapping of parameter to values, got {space!r}")
        keys = list(space)
        values = [v if isinstance(v, list) else [v] for v in space.values()]
        for key, vals in zip(keys, values):
            if not vals:
                raise FeatcacheError(f"sweep.{name}.{key}: empty list of values")
        seen = set()
        for combo in itertools.product(*values):
            params = method.resolve(dict(zip(keys, combo)))
            key = params_key(params)
            if key not in seen:
                seen.add(key)
                configs.append((method, params))
    return configs


def params_key(params: dict) -> str:
    """The `params` column: a JSON object with sorted keys."""
    return json.dumps(params, sort_keys=True)


def batches_by_method(configs: list[tuple[Method, dict]]) -> list[list[tuple[str, dict]]]:
    """Configurations grouped by method: the work they share (sorts, energies) is memoised per batch."""
    groups: dict[str, list] = {}
    for method, params in configs:
        groups.setdefault(method.name, []).append((method.name, params))
    return list(groups.values())


def batches_for(configs: list[tuple[Method, dict]], parallel: bool) -> list[list[tuple[str, dict]]]:
    """The sweep's batches: one of every configuration when they run in one process, per method when
    batches run in parallel workers.

    A batch reads each split of the cache once and shares its work across methods (one sort serves
    ASH-P, -B, -S and SCALE; one energy per T serves energy, RG and nap+energy; one head product
    serves ASH-P and ASH-S at the same p), one split at a time, so memory stays at about one split.
    """
    if parallel:
        return batches_by_method(configs)
    return [[(method.name, params) for method, params in configs]] if configs else []


# --- the floor: dense products a grid needs -------------------------------------------------------

# Methods whose scores need no dense product at all: they read the cached logits (energy at any T is
# a logsumexp of them; SCALE's r (W x) + b = r (f - b) + b) and cheap per-row statistics.
NO_PRODUCT = {"msp", "maxlogit", "energy", "gradnorm", "rg", "rg_add", "nap", "scale"}


def _clip_spec(params: dict) -> tuple:
    """ReAct's clip as the grid gives it: a value, or a percentile of a split (two specs that happen to
    resolve to the same value on some cache still count twice: the count is made from the grid)."""
    if params.get("clip") is not None:
        return ("clip", params["clip"])
    return ("percentile", params.get("percentile"), params.get("percentile_of", "id_train"))


NAP_PARAMS = ("w", "eps", "form")


def base_config(name: str, params: dict) -> tuple[str, dict]:
    """nap+X's configuration of X (its scores do not depend on w, eps or form); others as they are."""
    if name.startswith("nap+"):
        return name[4:], {k: v for k, v in params.items() if k not in NAP_PARAMS}
    return name, params


def work_plan(configs) -> frozenset:
    """{(method, params key)} of the configurations' base methods: what a split's shared work serves."""
    return frozenset((base, params_key(params)) for base, params in
                     (base_config(getattr(m, "name", m), p) for m, p in configs))


def product_key(name: str, params: dict) -> tuple | None:
    """What a configuration feeds a dense product, or None when it needs none.

    Configurations with equal keys multiply the same (N, D) array by the same matrix, so one product
    serves them all: ASH-P and ASH-S at the same p (ASH-S only rescales each row of the pruned
    feature, and the head is linear: (r x) W^T + b = r (x W^T) + b); likewise react+ash_p and
    react+ash_s; nap+X shares X's. ASH-B multiplies its 0/1 mask, DICE the features with its own
    sparsified head, KNN the normalised features with its bank (a product with the bank, not the head).
    """
    name, params = base_config(name, params)
    if name in NO_PRODUCT:
        return None
    if name in ("ash_p", "ash_s"):
        return ("pruned", params["p"])
    if name == "ash_b":
        return ("mask", params["p"])
    if name == "ash_rand":
        return ("rand", params["p"], params["seed"])
    if name == "react":
        return ("clipped", _clip_spec(params))
    if name in ("react+ash_p", "react+ash_s"):
        return ("clipped-pruned", _clip_spec(params), params["p"])
    if name == "react+ash_b":
        return ("clipped-mask", _clip_spec(params), params["p"])
    if name == "dice":
        return ("dice", params["p"])
    if name == "knn":
        return ("knn-bank", params["bank"], params["seed"])
    # a method registered later and not known here: counted as needing a product of its own
    return ("own", name, params_key(params))


def floor_products(configs) -> int:
    """The number of distinct dense products the configurations need: the grid's floor.

    Parameters
    ----------
    configs : iterable of (method, params)
        `method` a `Method` or a method name, `params` its resolved parameters (as `expand_grid`
        returns them).

    Returns
    -------
    int
        Distinct `product_key`s among them: one dense product of the evaluated samples per shaped
        feature (or per head), whatever the number of configurations sharing it. A product whose
        operand is mostly zeros (`featcache.methods.sparse`) counts as one here though it costs less.
    """
    keys = {product_key(getattr(m, "name", m), params) for m, params in configs}
    keys.discard(None)
    return len(keys)
