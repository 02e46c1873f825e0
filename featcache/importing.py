"""Running a user's .py file as a module: for `backbone.factory` files and detector plugins."""

from __future__ import annotations

import importlib.util
import sys
from types import ModuleType


def exec_file_module(name: str, path) -> ModuleType:
    """The .py file at `path` run as module `name`, registered in sys.modules under that name first
    (pickling and dataclasses look a module up by name) and removed again if running it fails."""
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        sys.modules.pop(name, None)
        raise
    return module
