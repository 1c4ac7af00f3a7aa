"""Tools as the model sees them: `ToolSpec` (name, description, JSON schema of the arguments) and
`tool_spec`, which infers the schema from a function's signature, type hints and docstring."""

from __future__ import annotations

import dataclasses
import enum
import inspect
import json
import re
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from spider.errors import BundleError

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
    if not any(p.kind is p.VAR_KEYWORD for p in signature.parameters.values()):
        # The function takes no other keyword: a model that adds one learns it from the schema
        # (and constrained decoding never writes one).
        out["additionalProperties"] = False
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

