"""Packing user code (pre/post processors, tools) into a bundle that sandbox workers can run.

A bundle is a small JSON header followed by a cloudpickle payload. The header says everything the
server needs to know before running anything (Python version, tool schemas, which processors are
present), so the API and the workers can validate a bundle without unpickling it: unpickling user
code executes it, and that only ever happens inside the jail.

The user's own local modules (files of their project, not the standard library or installed
packages) are pickled by value, so helpers, classes and constants defined next to the user's
script travel with it; installed packages travel by name and come from `runtime.packages`.
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import hashlib
import inspect
import json
import re
import struct
import sys
import sysconfig
import types
import typing
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cloudpickle

from spider.errors import BundleError

BUNDLE_MAGIC = b"SPIDERBUNDLE\x00"
BUNDLE_FORMAT = 1
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
    header = {
        "format": BUNDLE_FORMAT,
        "python": ".".join(str(v) for v in sys.version_info[:3]),
        "cloudpickle": cloudpickle.__version__,
        "pre_processor": _qualname(pre_processor),
        "post_processor": _qualname(post_processor),
        "tools": [spec.schema_dict() for spec in specs],
        "local_modules": modules,
        "payload_bytes": len(payload),
        "payload_sha256": hashlib.sha256(payload).hexdigest(),
    }
    try:
        header_bytes = json.dumps(header).encode()
    except (TypeError, ValueError) as exc:
        raise BundleError(f"a tool schema is not JSON-serializable: {exc}") from None
    bundle = BUNDLE_MAGIC + _HEADER_LEN.pack(len(header_bytes)) + header_bytes + payload
    if len(bundle) > max_bytes:
        raise BundleError(
            f"the bundle of user code is {len(bundle) / 1e6:.1f} MB, over the limit of {max_bytes / 1e6:.1f} MB: "
            "large data captured by a function (a global, a closure variable or a default) travels with it; "
            "load such data from the dataset or a package instead"
        )
    return bundle


def _qualname(func: Callable[..., Any] | None) -> str | None:
    if func is None:
        return None
    target = func.func if isinstance(func, functools.partial) else func
    module = getattr(target, "__module__", None) or "?"
    return f"{module}.{getattr(target, '__qualname__', type(target).__name__)}"


def split_bundle(bundle: bytes) -> tuple[dict[str, Any], bytes]:
    """(header, payload) of a bundle, checked for format and integrity. Never unpickles."""
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
    if not isinstance(header, dict) or header.get("format") != BUNDLE_FORMAT:
        raise BundleError(f"unsupported bundle format {header.get('format') if isinstance(header, dict) else '?'}; "
                          "client and server Spider versions differ")
    payload = bundle[start + header_len :]
    if len(payload) != header.get("payload_bytes") or hashlib.sha256(payload).hexdigest() != header.get("payload_sha256"):
        raise BundleError("the bundle payload is truncated or corrupt (size or sha256 mismatch)")
    return header, payload


def bundle_manifest(bundle: bytes) -> dict[str, Any]:
    """What a bundle holds, read from its header without executing any user code:
    `python` (the client's version), `python_minor`, `cloudpickle`, `tools` (names),
    `tool_specs` (schemas), `has_pre_processor`, `has_post_processor`, `bytes`."""
    header, _ = split_bundle(bundle)
    return {
        "python": header["python"],
        "python_minor": python_minor(header["python"]),
        "cloudpickle": header["cloudpickle"],
        "tools": [tool["name"] for tool in header["tools"]],
        "tool_specs": header["tools"],
        "has_pre_processor": header["pre_processor"] is not None,
        "has_post_processor": header["post_processor"] is not None,
        "pre_processor": header["pre_processor"],
        "post_processor": header["post_processor"],
        "local_modules": header["local_modules"],
        "bytes": len(bundle),
    }


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
