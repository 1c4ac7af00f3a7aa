"""Why the user's code cannot be pickled: the path from a processor or tool down to the one object
(a global, a closure variable, a default, an attribute...) that fails on its own."""

from __future__ import annotations

import functools
import types
from collections.abc import Iterator
from typing import Any

import cloudpickle


def locate_failure(payload: dict[str, Any], exc: Exception) -> tuple[str, Exception]:
    """(where, error) for a bundle payload that failed to pickle with `exc`: a readable path such as
    "tool 'search' -> global 'client'" to the deepest object that fails alone, and its own error;
    ("the user code", exc) when no single object is to blame."""
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
