"""Packing user code (pre/post processors, tools) into a bundle that sandbox workers can run.

A bundle is a small JSON header, then the source files of the user's local modules (JSON), then a
cloudpickle payload. The header says everything the server needs to know before running anything
(Python version, tool schemas, which processors are present) and the size and sha256 of both
sections, so the API and the workers can validate a bundle without unpickling it: unpickling user
code executes it, and that only ever happens inside the jail.

The user's own local modules (files of their project, not the standard library or installed
packages) are pickled by value, so helpers, classes and constants defined next to the user's
script travel with it; their source files travel too, so that a function may also `import` them
when it runs. Installed packages travel by name and come from `runtime.packages`.
"""

from __future__ import annotations

import dataclasses
import dis
import enum
import functools
import hashlib
import importlib.machinery
import importlib.util
import inspect
import json
import re
import struct
import sys
import sysconfig
import types
import typing
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cloudpickle

from spider.errors import BundleError
from spider.types import BundleManifest

BUNDLE_MAGIC = b"SPIDERBUNDLE\x00"
# 2: the source files of local modules travel in their own section, between header and payload.
BUNDLE_FORMAT = 2
DEFAULT_MAX_BUNDLE_BYTES = 16 * 1024 * 1024
_HEADER_LEN = struct.Struct(">I")
TOOL_NAME_PATTERN = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


@dataclass
class ToolSpec:
    """A tool the model may call: its name, what it does, the JSON schema of its arguments, and
    fixed keyword arguments (`kwargs`) that the sandbox adds to every call without showing them to
    the model. `kwargs` travel inside the pickled payload; a manifest carries the schema only."""

    name: str
    description: str
    parameters: dict[str, Any]
    kwargs: dict[str, Any] = field(default_factory=dict)

    def to_openai(self) -> dict[str, Any]:
        """The OpenAI `tools` entry for this tool (also what HF chat templates take)."""
        return {
            "type": "function",
            "function": {"name": self.name, "description": self.description, "parameters": self.parameters},
        }

    def schema_dict(self) -> dict[str, Any]:
        """The JSON-safe part of the spec (no kwargs), as stored in a bundle header."""
        return {"name": self.name, "description": self.description, "parameters": self.parameters}

    @classmethod
    def from_schema_dict(cls, data: dict[str, Any]) -> "ToolSpec":
        return cls(name=data["name"], description=data.get("description", ""), parameters=data["parameters"])


# ---------------------------------------------------------------------------------------------
# Tool schemas from signatures, type hints and docstrings


def tool_spec(
    func: Callable[..., Any],
    description: str | None = None,
    json_schema: dict[str, Any] | None = None,
    name: str | None = None,
    kwargs: dict[str, Any] | None = None,
) -> ToolSpec:
    """Describe `func` as a tool. Without `json_schema`, the argument schema is inferred from the
    signature, the type hints and the docstring (Google, NumPy or reST argument sections); an
    explicit schema wins. Parameters filled by `kwargs` are hidden from the model."""
    if not callable(func):
        raise BundleError(f"a tool must be a callable, got {type(func).__name__}")
    kwargs = dict(kwargs or {})
    tool_name = name or getattr(func, "__name__", None) or getattr(getattr(func, "func", None), "__name__", None)
    if not tool_name or tool_name == "<lambda>":
        raise BundleError("this tool has no usable name (a lambda?); pass name='...' when adding it")
    if not TOOL_NAME_PATTERN.match(tool_name):
        raise BundleError(f"tool name {tool_name!r} is invalid: use 1-64 letters, digits, '_' or '-'")
    summary, arg_docs = parse_docstring(inspect.getdoc(func) or "")
    if json_schema is not None:
        parameters = _checked_schema(json_schema, tool_name)
    else:
        parameters = infer_parameters(func, arg_docs, exclude=set(kwargs))
    return ToolSpec(name=tool_name, description=description or summary, parameters=parameters, kwargs=kwargs)


def _checked_schema(schema: Any, tool_name: str) -> dict[str, Any]:
    if not isinstance(schema, dict):
        raise BundleError(f"json_schema of tool {tool_name!r} must be a dict (a JSON schema object)")
    if schema.get("type") == "function" or "parameters" in schema:
        raise BundleError(
            f"json_schema of tool {tool_name!r} looks like a whole tool entry; pass only the arguments' "
            "schema, e.g. {'type': 'object', 'properties': {...}, 'required': [...]}"
        )
    if schema.get("type") != "object":
        raise BundleError(f"json_schema of tool {tool_name!r} must have \"type\": \"object\" (got {schema.get('type')!r})")
    try:
        json.dumps(schema)
    except (TypeError, ValueError) as exc:
        raise BundleError(f"json_schema of tool {tool_name!r} is not JSON-serializable: {exc}") from None
    return schema


def infer_parameters(func: Callable[..., Any], arg_docs: dict[str, str], exclude: set[str] = frozenset()) -> dict[str, Any]:
    """The JSON schema object of `func`'s arguments (minus `exclude`), from its signature."""
    try:
        signature = inspect.signature(func)
    except (TypeError, ValueError) as exc:
        raise BundleError(f"cannot read the signature of {func!r}: {exc}; pass json_schema=...") from None
    try:
        hints = typing.get_type_hints(func)
    except Exception:
        hints = dict(getattr(func, "__annotations__", {}) or {})
    properties: dict[str, Any] = {}
    required: list[str] = []
    for param in signature.parameters.values():
        if param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD) or param.name in exclude:
            continue
        if param.kind is param.POSITIONAL_ONLY:
            raise BundleError(
                f"parameter {param.name!r} of {getattr(func, '__name__', func)!r} is positional-only; "
                "tools are called with keyword arguments"
            )
        schema = type_schema(hints.get(param.name, param.annotation))
        if param.name in arg_docs:
            schema = {**schema, "description": arg_docs[param.name]}
        if param.default is param.empty:
            required.append(param.name)
        elif _json_safe(param.default):
            schema = {**schema, "default": param.default}
        properties[param.name] = schema
    out: dict[str, Any] = {"type": "object", "properties": properties}
    if required:
        out["required"] = required
    return out


def _json_safe(value: Any) -> bool:
    try:
        json.dumps(value)
    except (TypeError, ValueError):
        return False
    return True


_SCALARS: dict[Any, str] = {str: "string", int: "integer", float: "number", bool: "boolean", type(None): "null"}


def type_schema(annotation: Any) -> dict[str, Any]:
    """A JSON schema for a Python type hint; unknown or missing hints accept anything."""
    if annotation is inspect.Parameter.empty or annotation is Any:
        return {}
    if annotation is None:
        return {"type": "null"}
    if annotation in _SCALARS:
        return {"type": _SCALARS[annotation]}
    if isinstance(annotation, str):
        return {}
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin is typing.Literal:
        values = list(args)
        kinds = {_SCALARS.get(type(v)) for v in values}
        schema: dict[str, Any] = {"enum": values}
        if len(kinds) == 1 and None not in kinds:
            schema["type"] = kinds.pop()
        return schema
    if origin in (typing.Union, types.UnionType):
        members = [a for a in args if a is not type(None)]
        nullable = len(members) < len(args)
        if len(members) == 1:
            inner = type_schema(members[0])
            if nullable and isinstance(inner.get("type"), str):
                return {**inner, "type": [inner["type"], "null"]}
            return {"anyOf": [inner, {"type": "null"}]} if nullable else inner
        options = [type_schema(a) for a in members] + ([{"type": "null"}] if nullable else [])
        return {"anyOf": options}
    if origin is typing.Annotated:
        return type_schema(args[0])
    if origin in (list, set, frozenset, tuple) or annotation in (list, set, frozenset, tuple):
        schema = {"type": "array"}
        if origin is tuple and args and args[-1] is not Ellipsis:
            schema["prefixItems"] = [type_schema(a) for a in args]
        elif args:
            schema["items"] = type_schema(args[0])
        return schema
    if origin is dict or annotation is dict:
        schema = {"type": "object"}
        if len(args) == 2 and args[1] is not Any:
            schema["additionalProperties"] = type_schema(args[1])
        return schema
    if isinstance(annotation, type) and issubclass(annotation, enum.Enum):
        values = [member.value for member in annotation]
        return {"enum": values}
    if isinstance(annotation, type) and dataclasses.is_dataclass(annotation):
        hints = typing.get_type_hints(annotation)
        props = {f.name: type_schema(hints.get(f.name, Any)) for f in dataclasses.fields(annotation)}
        required = [
            f.name
            for f in dataclasses.fields(annotation)
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        ]
        return {"type": "object", "properties": props, **({"required": required} if required else {})}
    if isinstance(annotation, type) and typing.is_typeddict(annotation):
        hints = typing.get_type_hints(annotation)
        props = {key: type_schema(value) for key, value in hints.items()}
        required = sorted(getattr(annotation, "__required_keys__", set()))
        return {"type": "object", "properties": props, **({"required": required} if required else {})}
    return {}


_GOOGLE_SECTIONS = {"args", "arguments", "parameters", "params", "keyword args", "keyword arguments"}
_OTHER_GOOGLE_SECTIONS = {
    "returns", "return", "yields", "raises", "examples", "example", "notes", "note", "see also",
    "attributes", "warnings", "warning", "todo", "references",
}


def parse_docstring(doc: str) -> tuple[str, dict[str, str]]:
    """(summary, {argument: description}) from a Google, NumPy or reST style docstring."""
    lines = inspect.cleandoc(doc).splitlines() if doc else []
    arg_docs: dict[str, str] = {}
    summary_lines: list[str] = []
    in_summary = True
    i = 0
    while i < len(lines):
        line = lines[i]
        stripped = line.strip()
        lowered = stripped.rstrip(":").lower()
        # NumPy: a section title underlined with dashes.
        if i + 1 < len(lines) and re.fullmatch(r"-{3,}", lines[i + 1].strip()) and stripped:
            in_summary = False
            i += 2
            body, i = _take_numpy_section(lines, i)
            if lowered in _GOOGLE_SECTIONS:
                arg_docs.update(body)
            continue
        # Google: `Args:` and indented entries below it.
        if stripped.endswith(":") and lowered in _GOOGLE_SECTIONS | _OTHER_GOOGLE_SECTIONS:
            in_summary = False
            body, i = _take_google_section(lines, i + 1, _indent(line))
            if lowered in _GOOGLE_SECTIONS:
                arg_docs.update(body)
            continue
        # reST: `:param [type] name: description`.
        match = re.match(r"^:param\s+(?:[^:]*\s)?(\*{0,2}\w+)\s*:\s*(.*)$", stripped)
        if match or re.match(r"^:(type|returns?|rtype|raises?)\b", stripped):
            in_summary = False
            text = match.group(2) if match else ""
            i += 1
            while i < len(lines) and lines[i].strip() and not lines[i].strip().startswith(":"):
                text += " " + lines[i].strip()
                i += 1
            if match:
                arg_docs[match.group(1).lstrip("*")] = _squash(text)
            continue
        if in_summary:
            summary_lines.append(stripped)
        i += 1
    summary = _squash(" ".join(summary_lines))
    return summary, arg_docs


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip())


def _squash(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip()


def _take_google_section(lines: list[str], i: int, header_indent: int) -> tuple[dict[str, str], int]:
    entries: dict[str, str] = {}
    entry_indent: int | None = None
    current: str | None = None
    while i < len(lines):
        line = lines[i]
        if line.strip() and _indent(line) <= header_indent:
            break
        if not line.strip():
            i += 1
            continue
        indent = _indent(line)
        if entry_indent is None:
            entry_indent = indent
        match = re.match(r"^\s*(\*{0,2}\w+)\s*(?:\([^)]*\))?\s*:\s*(.*)$", line)
        if indent == entry_indent and match:
            current = match.group(1).lstrip("*")
            entries[current] = match.group(2).strip()
        elif current is not None:
            entries[current] = (entries[current] + " " + line.strip()).strip()
        i += 1
    return {k: _squash(v) for k, v in entries.items()}, i


def _take_numpy_section(lines: list[str], i: int) -> tuple[dict[str, str], int]:
    entries: dict[str, str] = {}
    current: list[str] = []
    while i < len(lines):
        line = lines[i]
        if i + 1 < len(lines) and re.fullmatch(r"-{3,}", lines[i + 1].strip()) and line.strip():
            break
        if line.strip() and _indent(line) == 0:
            names = [n.strip().lstrip("*") for n in line.split(":", 1)[0].split(",")]
            current = [n for n in names if re.fullmatch(r"\w+", n)]
            for name in current:
                entries[name] = ""
        elif line.strip():
            for name in current:
                entries[name] = (entries[name] + " " + line.strip()).strip()
        i += 1
    return {k: _squash(v) for k, v in entries.items()}, i


# ---------------------------------------------------------------------------------------------
# Which modules are the user's own


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
def _local_modules_by_value(modules: list[str]) -> Iterator[None]:
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


# ---------------------------------------------------------------------------------------------
# Building and reading bundles


def build_bundle(
    pre_processor: Callable[..., Any] | None = None,
    post_processor: Callable[..., Any] | None = None,
    tools: list[tuple[Callable[..., Any], ToolSpec]] | tuple[()] = (),
    max_bytes: int = DEFAULT_MAX_BUNDLE_BYTES,
) -> bytes:
    """Serialize the user's functions into one bundle.

    Processors are called as `f(row, **kwargs)` on the server and return the new row/record, or
    `None` to drop it. Tools are called with the model's arguments plus their spec's `kwargs`.
    Raises BundleError naming the object that cannot be serialized, or when the bundle exceeds
    `max_bytes`."""
    for label, func in (("pre_processor", pre_processor), ("post_processor", post_processor)):
        if func is not None and not callable(func):
            raise BundleError(f"{label} must be a callable, got {type(func).__name__}")
    specs: list[ToolSpec] = []
    tool_funcs: dict[str, tuple[Callable[..., Any], dict[str, Any]]] = {}
    for item in tools:
        if not (isinstance(item, tuple) and len(item) == 2 and isinstance(item[1], ToolSpec)):
            raise BundleError("tools must be (function, ToolSpec) pairs; build the spec with tool_spec(func)")
        func, spec = item
        if spec.name in tool_funcs:
            raise BundleError(f"two tools are named {spec.name!r}; give one of them another name")
        specs.append(spec)
        tool_funcs[spec.name] = (func, spec.kwargs)

    payload_obj = {"pre_processor": pre_processor, "post_processor": post_processor, "tools": tool_funcs}
    modules = local_modules()
    with _local_modules_by_value(modules):
        try:
            payload = cloudpickle.dumps(payload_obj, protocol=5)
        except Exception as exc:
            where, cause = _locate_failure(payload_obj, exc)
            raise BundleError(
                f"cannot serialize {where}: {type(cause).__name__}: {cause}. Create such objects inside "
                "the function (or pass plain data through kwargs) so that the function can be shipped."
            ) from None
    functions = [pre_processor, post_processor, *(func for func, _ in tool_funcs.values())]
    shipped = local_module_sources([f for f in functions if f is not None], modules)
    sources = json.dumps(
        {m.name: {"package": m.is_package, "source": m.source} for m in shipped.values()}, sort_keys=True
    ).encode()
    header = {
        "format": BUNDLE_FORMAT,
        "python": ".".join(str(v) for v in sys.version_info[:3]),
        "cloudpickle": cloudpickle.__version__,
        "pre_processor": _qualname(pre_processor),
        "post_processor": _qualname(post_processor),
        "tools": [spec.schema_dict() for spec in specs],
        "local_modules": modules,
        "source_modules": list(shipped),
        "sources_bytes": len(sources),
        "sources_sha256": hashlib.sha256(sources).hexdigest(),
        "payload_bytes": len(payload),
        "payload_sha256": hashlib.sha256(payload).hexdigest(),
    }
    try:
        header_bytes = json.dumps(header).encode()
    except (TypeError, ValueError) as exc:
        raise BundleError(f"a tool schema is not JSON-serializable: {exc}") from None
    bundle = BUNDLE_MAGIC + _HEADER_LEN.pack(len(header_bytes)) + header_bytes + sources + payload
    if len(bundle) > max_bytes:
        raise BundleError(
            f"the bundle of user code is {len(bundle) / 1e6:.1f} MB, over the limit of {max_bytes / 1e6:.1f} MB "
            f"({len(payload) / 1e6:.1f} MB of functions and the data they capture, {len(sources) / 1e6:.1f} MB "
            f"of source files of {len(shipped)} local modules): large data captured by a function (a global, a "
            "closure variable or a default) travels with it; load such data from the dataset or a package instead"
        )
    return bundle


def _qualname(func: Callable[..., Any] | None) -> str | None:
    if func is None:
        return None
    target = func.func if isinstance(func, functools.partial) else func
    module = getattr(target, "__module__", None) or "?"
    return f"{module}.{getattr(target, '__qualname__', type(target).__name__)}"


def split_bundle(bundle: bytes) -> tuple[dict[str, Any], bytes]:
    """(header, payload) of a bundle, checked for format and integrity (the source files' section
    included). Never unpickles; any malformed input raises BundleError."""
    try:
        header, _, payload = _sections(bundle)
    except RecursionError:  # a header of deeply nested JSON
        raise BundleError("the bundle header is corrupt") from None
    if header["sources_bytes"] < 0 or header["payload_bytes"] < 0:
        raise BundleError("the bundle is truncated or corrupt (its sections' sizes do not match its header)")
    return header, payload


def bundle_sources(bundle: bytes) -> dict[str, ModuleSource]:
    """The source files of local modules that a bundle carries, by module name. Reading them runs
    nothing."""
    _, sources, _ = _sections(bundle)
    try:
        entries = json.loads(sources)
        return {name: ModuleSource(name, bool(e["package"]), e["source"]) for name, e in entries.items()}
    except (ValueError, TypeError, KeyError, AttributeError):
        raise BundleError("the source files' section of the bundle is corrupt") from None


def _sections(bundle: bytes) -> tuple[dict[str, Any], bytes, bytes]:
    """(header, sources, payload) of a bundle, checked for format, sizes and sha256."""
    if not isinstance(bundle, (bytes, bytearray, memoryview)):
        raise BundleError(f"a bundle is bytes, got {type(bundle).__name__}")
    bundle = bytes(bundle)
    start = len(BUNDLE_MAGIC) + _HEADER_LEN.size
    if not bundle.startswith(BUNDLE_MAGIC) or len(bundle) < start:
        raise BundleError("not a Spider bundle (bad magic bytes); build it with spider.client.bundle.build_bundle")
    (header_len,) = _HEADER_LEN.unpack_from(bundle, len(BUNDLE_MAGIC))
    try:
        header = json.loads(bundle[start : start + header_len])
    except ValueError:
        raise BundleError("the bundle header is corrupt") from None
    if not isinstance(header, dict):
        raise BundleError("the bundle header is corrupt")
    if header.get("format") != BUNDLE_FORMAT:
        raise BundleError(_format_mismatch(header.get("format")))
    body = bundle[start + header_len :]
    sources_len, payload_len = header.get("sources_bytes"), header.get("payload_bytes")
    if not (isinstance(sources_len, int) and isinstance(payload_len, int)) or len(body) != sources_len + payload_len:
        raise BundleError("the bundle is truncated or corrupt (its sections' sizes do not match its header)")
    sources, payload = body[:sources_len], body[sources_len:]
    if hashlib.sha256(sources).hexdigest() != header.get("sources_sha256"):
        raise BundleError("the bundle's source files are corrupt (sha256 mismatch)")
    if hashlib.sha256(payload).hexdigest() != header.get("payload_sha256"):
        raise BundleError("the bundle payload is corrupt (sha256 mismatch)")
    return header, sources, payload


def _format_mismatch(found: Any) -> str:
    """The error for a bundle of another layout than this Spider's."""
    if isinstance(found, int) and found > BUNDLE_FORMAT:
        who = "a newer Spider than this one"
    elif isinstance(found, int):
        who = "an older Spider than this one"
    else:
        who = "an unknown program"
    return (
        f"the bundle has format {found!r}, but this Spider reads only format {BUNDLE_FORMAT}: it was built by "
        f"{who}; install the same Spider version on the client and the server, then submit the job again"
    )


def bundle_manifest(bundle: bytes) -> BundleManifest:
    """What a bundle holds, read from its header without executing any user code (see
    spider.types.BundleManifest for its fields).

    The header comes from whoever submitted the bundle: every field is checked for its type, and
    anything malformed raises BundleError naming the field."""
    header, _ = split_bundle(bundle)

    def checked(name: str, check: Callable[[Any], bool], what: str) -> Any:
        value = header.get(name)
        if name not in header or not check(value):
            raise BundleError(f"the bundle header is corrupt: `{name}` must be {what}")
        return value

    def text(value: Any) -> bool:
        return isinstance(value, str) and 0 < len(value) <= 1000

    def names(value: Any) -> bool:
        return isinstance(value, list) and all(text(v) for v in value)

    def tool(value: Any) -> bool:
        return (
            isinstance(value, dict)
            and isinstance(value.get("name"), str)
            and TOOL_NAME_PATTERN.match(value["name"]) is not None
            and isinstance(value.get("description", ""), str)
            and isinstance(value.get("parameters"), dict)
        )

    python = checked("python", lambda v: isinstance(v, str) and re.fullmatch(r"\d+\.\d+(\.\d+)?", v), "a version")
    tools = checked("tools", lambda v: isinstance(v, list) and all(tool(t) for t in v),
                  "a list of tool schemas {name, description, parameters}")
    if len({t["name"] for t in tools}) != len(tools):
        raise BundleError("the bundle header is corrupt: two tools have the same name")
    pre = checked("pre_processor", lambda v: v is None or text(v), "a name or null")
    post = checked("post_processor", lambda v: v is None or text(v), "a name or null")
    return BundleManifest(
        python=python,
        python_minor=python_minor(python),
        cloudpickle=checked("cloudpickle", text, "a version"),
        tools=[t["name"] for t in tools],
        tool_specs=tools,
        has_pre_processor=pre is not None,
        has_post_processor=post is not None,
        pre_processor=pre,
        post_processor=post,
        local_modules=checked("local_modules", names, "a list of module names"),
        source_modules=checked("source_modules", names, "a list of module names"),
        bytes=len(bundle),
    )


def python_minor(version: str) -> str:
    """`3.11.7` -> `3.11`: cloudpickled code runs only on the same minor version."""
    return ".".join(version.split(".")[:2])


# ---------------------------------------------------------------------------------------------
# Finding the object that cannot be pickled


def _locate_failure(payload: dict[str, Any], exc: Exception) -> tuple[str, Exception]:
    roots: list[tuple[str, Any]] = []
    if payload["pre_processor"] is not None:
        roots.append(("the pre_processor", payload["pre_processor"]))
    if payload["post_processor"] is not None:
        roots.append(("the post_processor", payload["post_processor"]))
    for name, (func, kwargs) in payload["tools"].items():
        roots.append((f"tool {name!r}", func))
        for key, value in kwargs.items():
            roots.append((f"tool {name!r} kwargs[{key!r}]", value))
    for label, obj in roots:
        found = _find_unpicklable(obj, label, depth=0, seen=set())
        if found is not None:
            return found
    return "the user code", exc


def _pickle_error(obj: Any) -> Exception | None:
    try:
        cloudpickle.dumps(obj, protocol=5)
    except Exception as exc:
        return exc
    return None


def _find_unpicklable(obj: Any, path: str, depth: int, seen: set[int]) -> tuple[str, Exception] | None:
    """The deepest path below `obj` whose value alone fails to pickle, or None if `obj` pickles."""
    error = _pickle_error(obj)
    if error is None:
        return None
    if depth >= 8 or id(obj) in seen:
        return path, error
    seen.add(id(obj))
    for suffix, child in _children(obj):
        found = _find_unpicklable(child, f"{path} -> {suffix}", depth + 1, seen)
        if found is not None:
            return found
    return path, error


def _code_global_names(code: types.CodeType) -> Iterator[str]:
    yield from code.co_names
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            yield from _code_global_names(const)


def _children(obj: Any) -> Iterator[tuple[str, Any]]:
    if isinstance(obj, functools.partial):
        yield "partial function", obj.func
        for i, arg in enumerate(obj.args):
            yield f"partial argument {i}", arg
        for key, value in obj.keywords.items():
            yield f"partial keyword {key!r}", value
        return
    if isinstance(obj, types.MethodType):
        yield "bound object", obj.__self__
        yield "method", obj.__func__
        return
    if isinstance(obj, types.FunctionType):
        code = obj.__code__
        for name, cell in zip(code.co_freevars, obj.__closure__ or (), strict=False):
            try:
                yield f"closure variable {name!r}", cell.cell_contents
            except ValueError:
                continue
        seen: set[str] = set()
        for name in _code_global_names(code):
            if name in obj.__globals__ and name not in seen:
                seen.add(name)
                yield f"global {name!r}", obj.__globals__[name]
        for i, default in enumerate(obj.__defaults__ or ()):
            yield f"default argument {i}", default
        for key, value in (obj.__kwdefaults__ or {}).items():
            yield f"default argument {key!r}", value
        return
    if isinstance(obj, dict):
        for key, value in obj.items():
            yield f"[{key!r}]", value
        return
    if isinstance(obj, (list, tuple, set, frozenset)):
        for i, value in enumerate(obj):
            yield f"[{i}]", value
        return
    if isinstance(obj, type):
        for key, value in vars(obj).items():
            if not key.startswith("__"):
                yield f"class attribute {key!r}", value
        return
    attributes = getattr(obj, "__dict__", None)
    if isinstance(attributes, dict):
        for key, value in attributes.items():
            yield f"attribute {key!r}", value
    for slot in getattr(type(obj), "__slots__", ()) or ():
        if isinstance(slot, str) and hasattr(obj, slot):
            yield f"attribute {slot!r}", getattr(obj, slot)
