"""OOD scoring methods, one module per family, all registered by name in `registry.REGISTRY`.

To add a method: write `featcache/methods/<family>.py` with a pure array function for the formula
and a `@register("name", defaults={...})` wrapper `(data, head, fit, **params) -> Output`, import it
below, and add a test comparing it with a brute-force version of the paper's formula.

Layout: `registry` (names, parameters, `register`, `get_method`), `data` (what a method sees:
`SplitData`, `Head`, `Fit`, `Output`), `kernels` (row-block products and logsumexp), `params` (value
checks), then one module per family.
"""

from featcache.methods import ash, dice, gradnorm, knn, logit, nap, react, rg, scale  # noqa: F401  (registration)
from featcache.methods.data import Fit, Head, Output, SplitData
from featcache.methods.registry import REGISTRY, Method, get_method, register

__all__ = ["REGISTRY", "Fit", "Head", "Method", "Output", "SplitData", "get_method", "register"]
