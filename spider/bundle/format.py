"""The bundle's wire format: a small JSON header, then the source files of the user's local
modules (JSON), then a cloudpickle payload. `build_bundle` writes one; `split_bundle`,
`bundle_sources` and `bundle_manifest` read one back without unpickling anything.

The header says everything the server needs to know before running anything (Python version,
tool schemas, which processors are present) and the size and sha256 of both sections, so the API
and the workers can validate a bundle without unpickling it: unpickling user code executes it, and
that only ever happens inside the jail. spider/sandbox/jailed.py reads this format with the
standard library only and keeps its own copy of BUNDLE_MAGIC and BUNDLE_FORMAT.
"""

from __future__ import annotations

import functools
import hashlib
import json
import re
import struct
import sys
from collections.abc import Callable
from typing import Any

import cloudpickle

from spider.bundle.diagnose import locate_failure
from spider.bundle.modules import ModuleSource, local_module_sources, local_modules, local_modules_by_value
from spider.bundle.tools import TOOL_NAME_PATTERN, ToolSpec
from spider.errors import BundleError
from spider.types import BundleManifest

BUNDLE_MAGIC = b"SPIDERBUNDLE\x00"
# 2: the source files of local modules travel in their own section, between header and payload.
BUNDLE_FORMAT = 2
DEFAULT_MAX_BUNDLE_BYTES = 16 * 1024 * 1024
_HEADER_LEN = struct.Struct(">I")


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
    with local_modules_by_value(modules):
        try:
            payload = cloudpickle.dumps(payload_obj, protocol=5)
        except Exception as exc:
            where, cause = locate_failure(payload_obj, exc)
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
        raise BundleError("not a Spider bundle (bad magic bytes); build it with spider.bundle.build_bundle")
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
