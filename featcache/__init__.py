"""featcache: run the backbone once, replay post-hoc OOD detectors from a feature cache.

The Python API (see the README): `extract` a model in memory into a cache, `sweep` and `select`
hyperparameters, `scores` per sample; `open_cache` reads a cache's arrays; `register` adds a
detector of your own (see featcache.plugins).
"""

__version__ = "0.1.0"

# The modules featcache/extract/, sweep.py and select.py are imported before the functions take their
# names here: Python binds a submodule to its parent's attribute only when it is first imported, so
# later imports of featcache.sweep or featcache.extract.runner leave `featcache.sweep` the function.
import featcache.extract  # noqa: E402,F401
import featcache.select  # noqa: E402,F401
import featcache.sweep  # noqa: E402,F401

from featcache.api import extract, scores, select, sweep  # noqa: E402
from featcache.cache import open_cache  # noqa: E402
from featcache.methods.registry import register  # noqa: E402  (a plugin's methods, see featcache.plugins)

__all__ = ["__version__", "extract", "open_cache", "register", "scores", "select", "sweep"]
