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
