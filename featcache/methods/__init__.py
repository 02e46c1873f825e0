"""OOD scoring methods, one module per family, all registered by name in `base.REGISTRY`.

To add a method: write `featcache/methods/<family>.py` with a pure array function for the formula
and a `@register("name", defaults={...})` wrapper `(data, head, fit, **params) -> Output`, import it
below, and add a test comparing it with a brute-force version of the paper's formula.
"""

from featcache.methods import ash, dice, gradnorm, knn, logit, nap, react, rg, scale  # noqa: F401  (registration)
from featcache.methods.base import REGISTRY, Fit, Head, Method, Output, SplitData, get_method

__all__ = ["REGISTRY", "Fit", "Head", "Method", "Output", "SplitData", "get_method"]
