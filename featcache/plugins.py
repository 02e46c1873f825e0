"""Detector plugins: Python modules whose import registers methods with `featcache.register`.

A plugin is named by a pipeline's `plugins:` field (a module name, `package.module`, or a file,
`path/to/file.py`), by the `plugins=` argument of `run_sweep`, or by an entry point of the group
`featcache.methods` of an installed package. Its methods then behave like the built-in ones: in
grids, as `nap+<method>`, in `featcache methods`, and in every process that scores.

Worker processes (joblib/loky, dask) do not share the parent's registry, so each batch is sent the
resolved specs (module names and absolute file paths) and imports them itself before it looks a
method up; functions are never pickled across. Importing a plugin twice in one process is harmless:
a module name is imported once by Python, and a file is loaded once under a module name derived
from its absolute path (and its modification time, so that an edited file, in a notebook session,
is loaded anew and replaces its own methods rather than clashing with them).

loky keeps its workers between sweeps, so a worker may hold the plugins of an earlier sweep: each
batch first sets aside the methods of plugins the current sweep does not name.
"""

from __future__ import annotations

import hashlib
import importlib
import sys
from pathlib import Path

from featcache.errors import FeatcacheError
from featcache.importing import exec_file_module
from featcache.methods import registry

ENTRY_POINT_GROUP = "featcache.methods"

_entry_points_loaded = False
# plugin spec -> (module name, {method name: Method}) of what its import registered in this process
_LOADED: dict[str, tuple[str, dict]] = {}


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
    """One module name per file and revision, so that a file loaded twice is the same module, two
    files named alike (two `plugin.py`) are two, and an edited file is loaded again."""
    stat = Path(path).stat()
    key = f"{Path(path).resolve()}\0{stat.st_mtime_ns}\0{stat.st_size}"
    return f"featcache_plugin_{Path(path).stem}_{hashlib.sha256(key.encode()).hexdigest()[:12]}"


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
    else:
        # like backbone.factory: a package in the current directory imports without being installed
        name, folder, origin = spec, str(Path.cwd()), f"plugin: {spec}"
    if name in sys.modules:
        restore(spec, name, shown)
        return
    before = dict(registry.REGISTRY)
    sys.path.insert(0, folder)  # a plugin file can import the files beside it
    try:
        with registry.registering(origin, spec):
            if is_file_spec(spec):
                exec_file_module(name, spec)
            else:
                importlib.import_module(spec)
        _LOADED[spec] = (name, {k: m for k, m in registry.REGISTRY.items() if before.get(k) is not m})
    except FeatcacheError as exc:
        undo(before)
        raise FeatcacheError(f"{shown}: {exc}") from None
    except ModuleNotFoundError as exc:
        undo(before)
        if exc.name == spec or spec.startswith(f"{exc.name}."):
            raise FeatcacheError(f"{shown}: no module named {spec!r} (install it, or give a path/to/file.py)") from None
        raise FeatcacheError(f"{shown}: importing it failed: no module named {exc.name!r}") from None
    except (Exception, SystemExit) as exc:  # sys.exit at import must not end a command as if it succeeded
        undo(before)
        raise FeatcacheError(f"{shown}: importing it failed: {one_line(exc)}") from None
    finally:
        sys.path.remove(folder)


def undo(before) -> None:
    """Put the registry back as it was before a failed import."""
    for name in set(registry.REGISTRY) - set(before):
        del registry.REGISTRY[name]
    if isinstance(before, dict):
        registry.REGISTRY.update(before)


def restore(spec: str, module: str, shown: str) -> None:
    """A plugin imported before: its methods back in the registry if they were set aside."""
    name, methods = _LOADED.get(spec, (None, {}))
    if name != module:
        return  # imported by other means than this function: it registered what it registers
    for method_name, method in methods.items():
        current = registry.REGISTRY.get(method_name)
        if current is not None and current is not method and current.plugin != spec:
            first = "featcache (built-in)" if current.origin == "featcache" else current.origin
            raise FeatcacheError(f"{shown}: method {method_name!r} is registered twice: by {first} and by "
                                 f"{method.origin}; rename one of them")
        registry.REGISTRY[method_name] = method


def one_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0]}" if text else type(exc).__name__


def load_entry_points(refresh: bool = False) -> None:
    """Import the plugins of installed packages (entry-point group `featcache.methods`), once per process.

    Each entry point's value is a module, or an object in one (`pkg.mod:obj`), whose import registers
    methods. `refresh`: look again (after installing a package).
    """
    global _entry_points_loaded
    if _entry_points_loaded and not refresh:
        return  # get_method calls this every time: scanning the installed packages costs milliseconds
    _entry_points_loaded = True
    from importlib.metadata import entry_points

    found = list(entry_points(group=ENTRY_POINT_GROUP))
    seen = set()
    for ep in found:
        if ep.value in seen:  # one package seen twice on sys.path
            continue
        seen.add(ep.value)
        dist = getattr(getattr(ep, "dist", None), "name", None)
        where = f"entry point {ep.name!r} of {dist or 'an installed package'} (group {ENTRY_POINT_GROUP})"
        before = dict(registry.REGISTRY)
        try:
            with registry.registering(f"entry point: {ep.value}", None):
                ep.load()
        except FeatcacheError as exc:
            undo(before)
            _entry_points_loaded = False  # tried again next time, not skipped in silence
            raise FeatcacheError(f"{where}: {exc}") from None
        except Exception as exc:
            undo(before)
            _entry_points_loaded = False
            raise FeatcacheError(f"{where}: importing {ep.value} failed: {one_line(exc)}") from None


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
    registered outside them (a user's module imported by their script: a single-file module is sent
    by path, a package's module by name, so it must be installed or on PYTHONPATH for the workers).
    A method registered in `__main__` (a notebook, a script run directly) cannot be re-created in
    another process."""
    specs = list(resolved)
    for method in methods:
        spec = method.plugin
        if spec == registry.MAIN:
            raise FeatcacheError(f"method {method.name!r} was registered in __main__ (a notebook or the script "
                                 "itself), which worker processes cannot import; put it in a module or .py file and "
                                 "pass it with plugins=[...], or run with jobs=1")
        module = sys.modules.get(spec) if spec else None
        path = getattr(module, "__file__", None) or ""
        if "." not in str(spec) and path.endswith(".py") and Path(path).name != "__init__.py":
            # a module file of the user's, importable here thanks to the script's sys.path, which a
            # worker started earlier (loky reuses them) or elsewhere (dask) does not have: sent by path
            spec = str(Path(path).resolve())
        if spec and spec not in specs:
            specs.append(spec)
    return specs


def import_in_worker(specs: list[str] | None) -> None:
    """Called by each batch in a worker process before it looks methods up: entry points and the
    sweep's plugins, and none of the plugins an earlier sweep left in this (reused) worker."""
    load_entry_points()
    wanted = set(specs or [])
    for spec, (_, methods) in _LOADED.items():
        if spec not in wanted:
            for name, method in methods.items():
                if registry.REGISTRY.get(name) is method:
                    del registry.REGISTRY[name]
    for spec in specs or []:
        import_plugin(spec, where="plugins")
