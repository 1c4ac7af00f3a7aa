"""Which of the imported modules are the user's own (files of their project, not the standard
library or installed packages), and the source files of those that shipped functions may import
when they run. Nothing here imports or runs the user's modules to find them."""

from __future__ import annotations

import dis
import functools
import importlib.machinery
import importlib.util
import sys
import sysconfig
import types
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cloudpickle


def _system_roots() -> list[Path]:
    """Directories whose modules are installed, not the user's: the stdlib and every site dir."""
    roots: set[str] = set()
    for key in ("stdlib", "platstdlib", "purelib", "platlib"):
        path = sysconfig.get_paths().get(key)
        if path:
            roots.add(path)
    for prefix in {sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix}:
        roots.add(prefix)
    try:
        import site

        roots.update(site.getsitepackages())
        roots.add(site.getusersitepackages())
    except Exception:
        pass
    for entry in sys.path:
        if entry and ("site-packages" in entry or "dist-packages" in entry):
            roots.add(entry)
    resolved = []
    for root in roots:
        try:
            resolved.append(Path(root).resolve())
        except OSError:
            continue
    return resolved


def local_modules() -> list[str]:
    """Top-level names of the imported modules that are the user's own files.

    A module is local when it comes from a `.py` file outside the standard library, the virtual
    environment and every site-packages directory: those travel by value. Everything else is
    expected to be importable on the server (stdlib or `runtime.packages`)."""
    roots = _system_roots()
    names: set[str] = set()
    for name, module in list(sys.modules.items()):
        if module is None or name == "__main__" or name.startswith("spider.") or name == "spider":
            continue
        top = name.split(".", 1)[0]
        if top in names:
            continue
        top_module = sys.modules.get(top)
        file = getattr(top_module, "__file__", None)
        if not file or not file.endswith(".py"):
            continue
        try:
            path = Path(file).resolve()
        except OSError:
            continue
        if any(path.is_relative_to(root) for root in roots):
            continue
        names.add(top)
    return sorted(names)


@contextmanager
def local_modules_by_value(modules: list[str]) -> Iterator[None]:
    """Within the block, cloudpickle pickles the functions and classes of `modules` (names from
    `local_modules`) by value instead of by reference; registrations made by others are kept."""
    registered = []
    try:
        for name in modules:
            if cloudpickle.cloudpickle._is_registered_pickle_by_value(sys.modules[name]):
                continue
            cloudpickle.register_pickle_by_value(sys.modules[name])
            registered.append(name)
        yield
    finally:
        for name in registered:
            cloudpickle.unregister_pickle_by_value(sys.modules[name])


# ---------------------------------------------------------------------------------------------
# Source files of the user's modules, for imports made when a function runs


@dataclass(frozen=True)
class ModuleSource:
    """The source of one of the user's local modules, shipped so that a function that imports it
    when it runs finds it in the sandbox under the same name."""

    name: str
    is_package: bool
    source: str

    @property
    def path(self) -> str:
        """Where the file lies relative to the project's import root (`pkg/__init__.py`): what
        tracebacks show in the sandbox, without revealing where the project lives on the client."""
        return self.name.replace(".", "/") + ("/__init__.py" if self.is_package else ".py")


# (module name, relative-import level, from-list) of one import statement.
ImportRef = tuple[str, int, tuple[str, ...]]


def local_module_sources(functions: list[Any], modules: list[str]) -> dict[str, ModuleSource]:
    """The source files of the user's local modules that `functions` may import when they run.

    Those are the imported modules under the top-level names `modules` (see `local_modules`) and,
    transitively, every local module named by an import statement in a shipped source, in the
    user's script or in `functions` themselves (imports inside function bodies included). Found
    without importing anything; the standard library and installed packages are never included."""
    roots = _system_roots()
    tops = set(modules)
    pending = [name for name in list(sys.modules) if name.partition(".")[0] in tops]
    pending += _user_code_imports(functions, roots)
    shipped: dict[str, ModuleSource] = {}
    refused: set[str] = set()
    while pending:
        name = pending.pop()
        if name in shipped or name in refused:
            continue
        found = _local_module_file(name, roots)
        read = _read_module(*found) if found is not None else None
        if read is None:
            refused.add(name)
            continue
        source, imports = read
        is_package = found[0].name == "__init__.py"
        shipped[name] = ModuleSource(name, is_package, source)
        pending += _absolute_names(imports, name if is_package else name.rpartition(".")[0])
        if "." in name:  # `import pkg.sub` needs pkg too
            pending.append(name.rpartition(".")[0])
    return dict(sorted(shipped.items()))


def _local_module_file(name: str, roots: list[Path]) -> tuple[Path, int, int] | None:
    """(path, mtime_ns, size) of the `.py` file that `import name` would load on this machine, when
    that file is the user's own; None for the stdlib, installed packages and unknown names."""
    top = name.partition(".")[0]
    if top in ("spider", "__main__") or top in sys.builtin_module_names:
        return None
    module = sys.modules.get(name)
    if module is not None:
        file = getattr(module, "__file__", None)
    else:
        spec = _find_spec_without_importing(name)
        file = spec.origin if spec is not None and spec.has_location else None
    return _user_file(file, roots)


def _user_file(file: Any, roots: list[Path]) -> tuple[Path, int, int] | None:
    """(path, mtime_ns, size) of `file` when it is a `.py` file outside the stdlib and every
    site-packages directory."""
    if not isinstance(file, str) or not file.endswith(".py"):
        return None
    try:
        path = Path(file).resolve()
        stat = path.stat()
    except OSError:
        return None
    if any(path.is_relative_to(root) for root in roots):
        return None
    return path, stat.st_mtime_ns, stat.st_size


def _find_spec_without_importing(name: str) -> importlib.machinery.ModuleSpec | None:
    """Where the path finder would find `name`; unlike `importlib.util.find_spec`, never runs a
    parent package's `__init__` to learn where its submodules are."""
    parent = name.rpartition(".")[0]
    try:
        if not parent:
            if importlib.machinery.FrozenImporter.find_spec(name) is not None:
                return None
            return importlib.machinery.PathFinder.find_spec(name)
        if parent in sys.modules:
            locations = getattr(sys.modules[parent], "__path__", None)
        else:
            parent_spec = _find_spec_without_importing(parent)
            locations = parent_spec.submodule_search_locations if parent_spec is not None else None
        return importlib.machinery.PathFinder.find_spec(name, list(locations)) if locations else None
    except (ImportError, ValueError, OSError):
        return None


@functools.lru_cache(maxsize=4096)
def _read_module(path: Path, mtime_ns: int, size: int) -> tuple[str, tuple[ImportRef, ...]] | None:
    """(source, imports) of a module file; cached on the file's mtime and size, as a script builds
    many bundles from the same files."""
    try:
        source = importlib.util.decode_source(path.read_bytes())
    except (OSError, SyntaxError, UnicodeDecodeError):
        return None
    try:
        code = compile(source, str(path), "exec", dont_inherit=True)
    except (SyntaxError, ValueError):  # shipped all the same: it fails in the sandbox as it would here
        return source, ()
    return source, tuple(_imports_in(code))


def _imports_in(code: types.CodeType) -> Iterator[ImportRef]:
    """Every import statement compiled into `code` or the functions and classes defined in it."""
    consts: list[Any] = []
    for instruction in dis.get_instructions(code):
        if instruction.opname == "IMPORT_NAME":
            # The compiler pushes the level and the from-list right before IMPORT_NAME.
            level = consts[-2] if len(consts) >= 2 and isinstance(consts[-2], int) else 0
            fromlist = consts[-1] if consts and isinstance(consts[-1], tuple) else ()
            yield instruction.argval, level, tuple(item for item in fromlist if isinstance(item, str))
        if instruction.opname in ("LOAD_CONST", "LOAD_SMALL_INT"):
            consts.append(instruction.argval)
        else:
            consts.clear()
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            yield from _imports_in(const)


def _absolute_names(imports: Iterable[ImportRef], package: str | None) -> list[str]:
    """The modules an import statement may load: the one it names and each name it takes from it
    (`from pkg import sub` loads `pkg.sub` when that is a submodule)."""
    names = []
    for name, level, fromlist in imports:
        if level:
            try:
                name = importlib.util.resolve_name("." * level + name, package)
            except (ImportError, ValueError):
                continue
        if not name:
            continue
        names.append(name)
        names += [f"{name}.{item}" for item in fromlist if item != "*"]
    return names


def _user_code_imports(functions: list[Any], roots: list[Path]) -> list[str]:
    """Modules imported by the shipped functions and by the user's script: its file, or, without
    one (a notebook, `python -c`), every function and class it defined in `__main__`."""
    to_scan = [func for obj in functions for func in _functions_in(obj)]
    names: list[str] = []
    main = sys.modules.get("__main__")
    main_file = getattr(main, "__file__", None)
    found = _user_file(main_file, roots)
    read = _read_module(*found) if found is not None else None
    if read is not None:
        names += _absolute_names(read[1], getattr(main, "__package__", None))
    elif main is not None and main_file is None:
        for value in list(vars(main).values()):
            if getattr(value, "__module__", None) == "__main__":
                to_scan += _functions_in(value)
    for func in to_scan:
        package = func.__globals__.get("__package__") or func.__globals__.get("__name__", "").rpartition(".")[0]
        names += _absolute_names(_imports_in(func.__code__), package or None)
    return names


def _functions_in(obj: Any) -> list[types.FunctionType]:
    """The Python functions whose code runs when `obj` is called: itself, a partial's or a bound
    method's function, a class's (or a callable instance's class's) methods."""
    if isinstance(obj, functools.partial):
        return _functions_in(obj.func)
    if isinstance(obj, types.MethodType):
        return _functions_in(obj.__func__)
    if isinstance(obj, types.FunctionType):
        return [obj]
    if not isinstance(obj, type):
        obj = type(obj) if callable(obj) else None
    if obj is None:
        return []
    found = []
    for klass in obj.__mro__:
        for value in vars(klass).values():
            value = value.__func__ if isinstance(value, (staticmethod, classmethod)) else value
            if isinstance(value, types.FunctionType):
                found.append(value)
    return found

