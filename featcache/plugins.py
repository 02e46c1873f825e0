"""Detector plugins: Python modules whose import registers methods with `featcache.register`.

A plugin is named by a pipeline's `plugins:` field (a module name, `package.module`, or a file,
`path/to/file.py`), by the `plugins=` argument of `run_sweep`, or by an entry point of the group
`featcache.methods` of an installed package. Its methods then behave like the built-in ones: in
grids, as `nap+<method>`, in `featcache methods`, and in every process that scores.

Worker processes (joblib/loky, dask) do not share the parent's registry, so each batch is sent the
resolved specs (module names and absolute file paths) and imports them itself before it looks a
method up; functions are never pickled across. Importing a plugin twice in one process is harmless:
a module name is imported once by Python, and a file is always loaded under the same module name,
derived from its absolute path.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import sys
from pathlib import Path

from featcache.errors import FeatcacheError
from featcache.methods import registry

ENTRY_POINT_GROUP = "featcache.methods"

_entry_points_loaded = False


def is_file_spec(spec: str) -> bool:
    return spec.endswith(".py") or "/" in spec or "\\" in spec


def check_spec(spec, where: str) -> None:
    """A plugin spec is a dotted module name or a path to a .py file; anything else is refused."""
    if not isinstance(spec, str) or not spec.strip():
        raise FeatcacheError(f"{where}: a plugin must be a module name (package.module) or a .py file, got {spec!r}")
    if is_file_spec(spec):
        if not spec.endswith(".py"):
            raise FeatcacheError(f"{where}: plugin {spec!r}: a plugin file must end in .py")
    elif not all(part.isidentifier() for part in spec.split(".")):
        raise FeatcacheError(f"{where}: plugin {spec!r} is neither a module name (package.module) nor a .py file")


def resolve_spec(spec: str, base_dir=None, where: str = "plugins") -> str:
    """The spec as workers get it: a module name as given, a file as its absolute path (a relative
    one taken from `base_dir`, else from the current directory)."""
    check_spec(spec, where)
    if not is_file_spec(spec):
        return spec
    path = Path(spec).expanduser()
    if not path.is_absolute():
        path = Path(base_dir or Path.cwd()) / path
    return str(path.resolve())


def module_name_for(path: str) -> str:
    """One module name per file, so that a file loaded twice is the same module, and two files
    named alike (two `plugin.py`) are two."""
    digest = hashlib.sha256(str(Path(path).resolve()).encode()).hexdigest()[:12]
    return f"featcache_plugin_{Path(path).stem}_{digest}"


def import_plugin(spec: str, *, label: str | None = None, where: str = "plugins") -> None:
    """Import one resolved plugin spec (module name or absolute .py path), registering its methods.

    Registrations made by a plugin whose import fails are undone, so that a corrected plugin can be
    imported again in the same process. Errors are one line naming `where` and the plugin.
    """
    label = label or spec
    shown = f"{where}: plugin {label!r}"
    if is_file_spec(spec):
        path = Path(spec)
        if not path.is_file():
            raise FeatcacheError(f"{shown}: file {path} not found")
        name, folder, origin = module_name_for(spec), str(path.parent), f"plugin: {label}"
        if name in sys.modules:
            return
    else:
        if spec in sys.modules:
            return
        # like backbone.factory: a package in the current directory imports without being installed
        name, folder, origin = spec, str(Path.cwd()), f"plugin: {spec}"
    before = set(registry.REGISTRY)
    sys.path.insert(0, folder)  # a plugin file can import the files beside it
    try:
        with registry.registering(origin, spec):
            if is_file_spec(spec):
                module_spec = importlib.util.spec_from_file_location(name, spec)
                module = importlib.util.module_from_spec(module_spec)
                sys.modules[name] = module  # pickling and dataclasses look a module up by name
                try:
                    module_spec.loader.exec_module(module)
                except BaseException:
                    sys.modules.pop(name, None)
                    raise
            else:
                importlib.import_module(spec)
    except FeatcacheError as exc:
        undo(before)
        raise FeatcacheError(f"{shown}: {exc}") from None
    except ModuleNotFoundError as exc:
        undo(before)
        if exc.name == spec or spec.startswith(f"{exc.name}."):
            raise FeatcacheError(f"{shown}: no module named {spec!r} (install it, or give a path/to/file.py)") from None
        raise FeatcacheError(f"{shown}: importing it failed: no module named {exc.name!r}") from None
    except Exception as exc:
        undo(before)
        raise FeatcacheError(f"{shown}: importing it failed: {one_line(exc)}") from None
    finally:
        sys.path.remove(folder)


def undo(before: set) -> None:
    for name in set(registry.REGISTRY) - before:
        del registry.REGISTRY[name]


def one_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0]}" if text else type(exc).__name__


def load_entry_points(refresh: bool = False) -> list[str]:
    """Import the plugins of installed packages (entry-point group `featcache.methods`), once per process.

    Each entry point's value is a module, or an object in one (`pkg.mod:obj`), whose import registers
    methods. Returns the entry points' values. `refresh`: look again (after installing a package).
    """
    global _entry_points_loaded
    from importlib.metadata import entry_points

    found = list(entry_points(group=ENTRY_POINT_GROUP))
    if _entry_points_loaded and not refresh:
        return [ep.value for ep in found]
    _entry_points_loaded = True
    seen = set()
    for ep in found:
        if ep.value in seen:  # one package seen twice on sys.path
            continue
        seen.add(ep.value)
        dist = getattr(getattr(ep, "dist", None), "name", None)
        where = f"entry point {ep.name!r} of {dist or 'an installed package'} (group {ENTRY_POINT_GROUP})"
        before = set(registry.REGISTRY)
        try:
            with registry.registering(f"entry point: {ep.value}", None):
                ep.load()
        except FeatcacheError as exc:
            undo(before)
            raise FeatcacheError(f"{where}: {exc}") from None
        except Exception as exc:
            undo(before)
            raise FeatcacheError(f"{where}: importing {ep.value} failed: {one_line(exc)}") from None
    return [ep.value for ep in found]


def load_plugins(specs=None, base_dir=None, where: str | None = None) -> list[str]:
    """Import plugins, so that the methods they register can be swept, selected and listed.

    Parameters
    ----------
    specs : list of str, optional
        Module names (``"package.module"``) and paths to ``.py`` files. A relative path is taken
        from `base_dir` (a pipeline's folder), else from the current directory.
    base_dir : str or Path, optional
        Where relative plugin files are.
    where : str, optional
        What named the plugins (a pipeline file), for error messages.

    Returns
    -------
    list of str
        The resolved specs (module names, absolute file paths): what worker processes import
        (``run_sweep`` sends them with every batch).

    The entry points of installed packages (group ``featcache.methods``) are imported as well.
    Importing the same plugin again is harmless.

    Examples
    --------
    >>> from featcache.plugins import load_plugins
    >>> load_plugins(["plugins/featnorm.py"], base_dir="pipelines")  # doctest: +SKIP
    ['/home/me/project/pipelines/plugins/featnorm.py']
    """
    where = str(where) if where else "plugins"
    if specs is None:
        specs = []
    if isinstance(specs, str) or not isinstance(specs, (list, tuple)):
        raise FeatcacheError(f"{where}: plugins must be a list of module names or .py files, got {specs!r}")
    import featcache.methods  # noqa: F401  (built-ins first: a plugin may not take their names)

    load_entry_points()
    resolved = []
    for spec in specs:
        full = resolve_spec(spec, base_dir, where)
        import_plugin(full, label=spec, where=where)
        if full not in resolved:
            resolved.append(full)
    return resolved


def worker_specs(resolved: list[str], methods) -> list[str]:
    """What a worker must import to find `methods`: the given plugins, and the module of any method
    registered outside them (a user's module imported by their script). A method registered in
    `__main__` (a notebook, a script run directly) cannot be re-created in another process."""
    specs = list(resolved)
    for method in methods:
        spec = method.plugin
        if spec == registry.MAIN:
            raise FeatcacheError(f"method {method.name!r} was registered in __main__ (a notebook or the script "
                                 "itself), which worker processes cannot import; put it in a module or .py file and "
                                 "pass it with plugins=[...], or run with jobs=1")
        if spec and spec not in specs:
            specs.append(spec)
    return specs


def import_in_worker(specs: list[str] | None) -> None:
    """Called by each batch before it looks methods up: entry points and the sweep's plugins."""
    load_entry_points()
    for spec in specs or []:
        import_plugin(spec, where="plugins")
