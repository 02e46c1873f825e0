"""featcache: run the backbone once, replay post-hoc OOD detectors from a feature cache."""

__version__ = "0.1.0"

from featcache.cache import open_cache  # noqa: E402
from featcache.methods.registry import register  # noqa: E402  (a plugin's methods, see featcache.plugins)

__all__ = ["__version__", "open_cache", "register"]
