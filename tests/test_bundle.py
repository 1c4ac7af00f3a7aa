"""Bundling user code on the client: tool schemas, by-value shipping, errors, manifests.

Bundles are loaded here in a separate, isolated Python process started from another directory,
so a function only works if everything it needs travelled inside the bundle.
"""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
import threading
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Literal, Optional

import pytest

from spider.bundle import (
    BUNDLE_FORMAT,
    BUNDLE_MAGIC,
    ToolSpec,
    build_bundle,
    bundle_manifest,
    bundle_sources,
    parse_docstring,
    split_bundle,
    tool_spec,
)
from spider.errors import BundleError
from spider.sandbox import jailed

USERPKG = Path(__file__).parent / "userpkg"

LOADER = r"""
import json, pickle, sys
import cloudpickle  # noqa: F401
from pathlib import Path
if sys.argv[3] == "jail":  # as the jail loads it: the shipped source files are importable
    from spider.sandbox.jailed import load_bundle
    funcs = load_bundle(sys.argv[1])
else:  # the pickled payload alone: only what travelled by value is there
    from spider.bundle import split_bundle
    funcs = pickle.loads(split_bundle(Path(sys.argv[1]).read_bytes())[1])
calls = json.loads(sys.argv[2])
out = []
for kind, name, args, kwargs in calls:
    if kind == "tool":
        func, fixed = funcs["tools"][name]
        out.append(func(**args, **fixed))
    else:
        out.append(funcs[kind](*args, **kwargs))
print(json.dumps(out))
"""


def run_in_fresh_process(bundle: bytes, calls: list, tmp_path: Path, loader: str = "pickle") -> list:
    """Unpickle and call the bundle in an isolated interpreter whose cwd and sys.path hold none
    of the user's files. `loader="jail"` loads it with the jail's own code, shipped sources and all."""
    path = tmp_path / "bundle.bin"
    path.write_bytes(bundle)
    empty = tmp_path / "elsewhere"
    empty.mkdir(exist_ok=True)
    result = subprocess.run(
        [sys.executable, "-I", "-c", LOADER, str(path), json.dumps(calls), loader],
        capture_output=True, text=True, cwd=empty, timeout=60,
    )
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


# -- tool schemas ------------------------------------------------------------------------------


def google_tool(city: str, days: int = 3, units: Literal["C", "F"] = "C", tags: list[str] | None = None) -> str:
    """Get the weather forecast.

    Looks the city up first.

    Args:
        city: Name of the city,
            with the country if ambiguous.
        days (int): How many days ahead.
        units: Temperature units.

    Returns:
        The forecast as text.
    """
    return city


def numpy_tool(x: float, y: Optional[float] = None):
    """Compute a distance.

    Parameters
    ----------
    x : float
        The first coordinate.
    y : float, optional
        The second coordinate.

    Returns
    -------
    float
    """
    return x


def rest_tool(query, limit: int = 10):
    """Search the index.

    :param query: What to look for.
    :param int limit: At most this many hits.
    :returns: hits
    """
    return query


class Color(Enum):
    RED = "red"
    BLUE = "blue"


@dataclass
class Point:
    x: float
    y: float = 0.0


def typed_tool(color: Color, point: Point, weights: dict[str, float], pair: tuple[int, str], *args, api_key: str = "", **kw):
    return color


def test_google_docstring_and_hints_make_the_schema():
    spec = tool_spec(google_tool)
    assert spec.name == "google_tool"
    assert spec.description == "Get the weather forecast. Looks the city up first."
    props = spec.parameters["properties"]
    assert spec.parameters["required"] == ["city"]
    assert props["city"] == {"type": "string", "description": "Name of the city, with the country if ambiguous."}
    assert props["days"] == {"type": "integer", "description": "How many days ahead.", "default": 3}
    assert props["units"]["enum"] == ["C", "F"] and props["units"]["type"] == "string"
    assert props["tags"]["type"] == ["array", "null"] and props["tags"]["items"] == {"type": "string"}
    assert spec.to_openai() == {
        "type": "function",
        "function": {"name": "google_tool", "description": spec.description, "parameters": spec.parameters},
    }


def test_numpy_and_rest_docstrings():
    spec = tool_spec(numpy_tool)
    assert spec.description == "Compute a distance."
    assert spec.parameters["properties"]["x"] == {"type": "number", "description": "The first coordinate."}
    assert spec.parameters["properties"]["y"]["description"] == "The second coordinate."
    assert spec.parameters["properties"]["y"]["type"] == ["number", "null"]
    assert spec.parameters["required"] == ["x"]

    spec = tool_spec(rest_tool)
    assert spec.description == "Search the index."
    assert spec.parameters["properties"]["query"] == {"description": "What to look for."}
    assert spec.parameters["properties"]["limit"]["description"] == "At most this many hits."


def test_structured_hints_and_hidden_kwargs():
    spec = tool_spec(typed_tool, kwargs={"api_key": "k"})
    props = spec.parameters["properties"]
    assert props["color"] == {"enum": ["red", "blue"]}
    assert props["point"]["properties"] == {"x": {"type": "number"}, "y": {"type": "number"}}
    assert props["point"]["required"] == ["x"]
    assert props["weights"] == {"type": "object", "additionalProperties": {"type": "number"}}
    assert props["pair"]["prefixItems"] == [{"type": "integer"}, {"type": "string"}]
    assert "api_key" not in props and "args" not in props and "kw" not in props
    assert spec.kwargs == {"api_key": "k"}


def test_explicit_schema_wins_and_is_checked():
    schema = {"type": "object", "properties": {"q": {"type": "string"}}, "required": ["q"]}
    spec = tool_spec(google_tool, json_schema=schema, description="custom", name="weather")
    assert (spec.parameters, spec.description, spec.name) == (schema, "custom", "weather")
    with pytest.raises(BundleError, match="type.*object"):
        tool_spec(google_tool, json_schema={"type": "string"})
    with pytest.raises(BundleError, match="whole tool entry"):
        tool_spec(google_tool, json_schema={"type": "function", "function": {}})
    with pytest.raises(BundleError, match="lambda"):
        tool_spec(lambda x: x)
    with pytest.raises(BundleError, match="invalid"):
        tool_spec(google_tool, name="has space")


def test_parse_docstring_keeps_unrelated_sections_out():
    summary, args = parse_docstring("Do it.\n\nArgs:\n    a: the a\n\nRaises:\n    ValueError: never\n")
    assert summary == "Do it." and args == {"a": "the a"}


# -- shipping user code ------------------------------------------------------------------------


def test_user_project_helpers_travel_by_value(tmp_path):
    """A script whose processors and tools use helpers from two other local files (one importing
    the other) produces a bundle that works where those files do not exist."""
    out = tmp_path / "user.bundle"
    subprocess.run([sys.executable, "make_bundle.py", str(out)], cwd=USERPKG, check=True, timeout=120)
    bundle = out.read_bytes()
    manifest = bundle_manifest(bundle)
    assert set(manifest["local_modules"]) >= {"textutil", "constants"}
    assert manifest["tools"] == ["convert", "square", "shout"]
    results = run_in_fresh_process(
        bundle,
        [
            ["pre_processor", None, [{"question": "  what IS   spider? "}], {"tag": "t1"}],
            ["pre_processor", None, [{"question": ""}], {}],
            ["post_processor", None, [{"completion": "a fine answer"}], {"min_words": 2}],
            ["post_processor", None, [{"completion": "spam spam spam"}], {}],
            ["tool", "convert", {"value": 1.5, "unit": "km"}, {}],
            ["tool", "square", {"base": 7}, {}],
            ["tool", "shout", {"text": "hi"}, {}],
        ],
        tmp_path,
    )
    assert results == [
        {"prompt": "Q: What is spider?", "tag": "t1"},
        None,
        {"completion": "a fine answer", "reason": "ok", "words": 3},
        None,
        "1500.00 m (kilometre)",
        49,
        "HI!",
    ]


def test_local_modules_imported_inside_functions_travel_as_source(tmp_path):
    """Functions that import the user's local modules when they run (a module the script never
    imports, a package, a module imported lazily by another local module) work where those files
    do not exist, and what travels by value still does."""
    out = tmp_path / "lazy.bundle"
    subprocess.run([sys.executable, "make_lazy_bundle.py", str(out)], cwd=USERPKG, check=True, timeout=120)
    bundle = out.read_bytes()
    sources = bundle_sources(bundle)
    # Exactly the user's files: nothing of spider, the stdlib or site-packages, which the script uses too.
    assert sorted(sources) == ["constants", "emphasis", "textutil", "wordtools", "wordtools.counting"]
    assert [m.path for m in sources.values()] == [
        "constants.py", "emphasis.py", "textutil.py", "wordtools/__init__.py", "wordtools/counting.py"
    ]
    assert sources["textutil"].source == (USERPKG / "textutil.py").read_text()
    assert bundle_manifest(bundle)["source_modules"] == sorted(sources)
    calls = [
        ["pre_processor", None, [{"question": "  why   so lazy "}], {}],
        ["post_processor", None, [{"prompt": "Q: Why", "completion": "because it can"}], {}],
        ["post_processor", None, [{"prompt": "Q: Why", "completion": "spam"}], {}],
        ["tool", "headline", {"text": "what is new"}, {}],
        ["tool", "count", {"text": "The cat is a cat"}, {}],
    ]
    assert run_in_fresh_process(bundle, calls, tmp_path, loader="jail") == [
        {"prompt": "Q: Why so lazy"},
        {"prompt": "Q: Why", "completion": "because it can", "question": "Why"},
        None,
        "*** WHAT IS NEW ***",
        {"words": 5, "content_words": 2},
    ]


def test_installed_and_standard_modules_never_travel_as_source():
    def pre(row):
        import email.mime.text  # noqa: F401
        import json  # noqa: F401

        import cloudpickle  # noqa: F401
        import pytest  # noqa: F401
        import yaml  # noqa: F401

        import spider.align  # noqa: F401

        return row

    shipped = bundle_sources(build_bundle(pre_processor=pre))
    assert "test_bundle" in shipped  # this file is local: sources do travel from here
    for name in shipped:
        top = name.partition(".")[0]
        assert top not in sys.stdlib_module_names and top not in {"cloudpickle", "pytest", "yaml", "spider"}
        assert "site-packages" not in (getattr(sys.modules.get(top), "__file__", None) or "")


def test_closures_partials_lambdas_and_dataclasses_defined_here(tmp_path):
    @dataclass
    class Scale:
        factor: int

    scale = Scale(3)
    offset = 10

    def pre(row, extra=0):
        return {"v": row["v"] * scale.factor + offset + extra}

    def add(a: int, b: int) -> int:
        return a + b

    add_five = functools.partial(add, b=5)
    tools = [
        (add_five, tool_spec(add_five, name="add_five")),
        (
            lambda s: s[::-1],
            tool_spec(lambda s: s[::-1], name="reverse", json_schema={"type": "object", "properties": {"s": {"type": "string"}}}),
        ),
    ]
    bundle = build_bundle(pre_processor=pre, post_processor=lambda r: r if r["ok"] else None, tools=tools)
    results = run_in_fresh_process(
        bundle,
        [
            ["pre_processor", None, [{"v": 2}], {"extra": 1}],
            ["post_processor", None, [{"ok": False}], {}],
            ["tool", "add_five", {"a": 1}, {}],
            ["tool", "reverse", {"s": "abc"}, {}],
        ],
        tmp_path,
    )
    assert results == [{"v": 17}, None, 6, "cba"]


def test_tool_kwargs_travel_in_the_payload_not_the_manifest(tmp_path):
    def fetch(query: str, api_key: str) -> str:
        return f"{query}:{api_key}"

    bundle = build_bundle(tools=[(fetch, tool_spec(fetch, kwargs={"api_key": "sekrit"}))])
    assert "sekrit" not in json.dumps(split_bundle(bundle)[0])
    assert "api_key" not in bundle_manifest(bundle)["tool_specs"][0]["parameters"]["properties"]
    assert run_in_fresh_process(bundle, [["tool", "fetch", {"query": "q"}, {}]], tmp_path) == ["q:sekrit"]


class ApiClient:
    def __init__(self):
        self.base_url = "http://example"
        self.lock = threading.Lock()

    def get(self, path):
        return self.base_url + path


client = ApiClient()


def uses_client(row):
    return {"url": client.get(row["path"])}


def test_unpicklable_object_is_named():
    with pytest.raises(BundleError) as info:
        build_bundle(post_processor=uses_client)
    message = str(info.value)
    assert "the post_processor -> global 'client' -> attribute 'lock'" in message
    assert "lock" in message and "TypeError" in message

    lock = threading.Lock()

    def tool(x: int) -> int:
        with lock:
            return x

    with pytest.raises(BundleError, match="tool 'tool' -> closure variable 'lock'"):
        build_bundle(tools=[(tool, tool_spec(tool))])


def test_size_limit():
    blob = os.urandom(300_000)

    def heavy(row):
        return {"n": len(blob) + len(row)}

    assert len(build_bundle(pre_processor=heavy)) > 300_000
    with pytest.raises(BundleError, match="over the limit"):
        build_bundle(pre_processor=heavy, max_bytes=100_000)


def test_size_limit_counts_the_source_files():
    def light(row):
        return row

    bundle = build_bundle(pre_processor=light)
    sources_bytes = split_bundle(bundle)[0]["sources_bytes"]
    assert sources_bytes > 1000  # this test file, at least
    with pytest.raises(BundleError, match=r"over the limit.* MB of source files of \d+ local modules"):
        build_bundle(pre_processor=light, max_bytes=len(bundle) - sources_bytes // 2)


def test_bad_tools_are_refused():
    def f(x: int) -> int:
        return x

    with pytest.raises(BundleError, match="two tools are named"):
        build_bundle(tools=[(f, tool_spec(f)), (f, tool_spec(f))])
    with pytest.raises(BundleError, match="pairs"):
        build_bundle(tools=[f])  # type: ignore[list-item]
    with pytest.raises(BundleError, match="callable"):
        build_bundle(pre_processor="not a function")  # type: ignore[arg-type]


class Booby:
    """A callable whose unpickling runs a command: the manifest must not trigger it."""

    def __init__(self, marker):
        self.marker = marker

    def __call__(self, row):
        return row

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_manifest_reads_without_executing_user_code(tmp_path):
    marker = tmp_path / "executed"
    bundle = build_bundle(pre_processor=Booby(str(marker)))
    manifest = bundle_manifest(bundle)
    assert manifest["has_pre_processor"] and not manifest["has_post_processor"]
    assert manifest["python"] == "%d.%d.%d" % sys.version_info[:3]
    assert manifest["python_minor"] == "%d.%d" % sys.version_info[:2]
    assert not marker.exists()
    # The payload really does run code when unpickled: this is why only the jail may load it.
    import pickle

    pickle.loads(split_bundle(bundle)[1])
    assert marker.exists()


def test_corrupt_bundles_are_refused():
    def f(row):
        return row

    bundle = build_bundle(pre_processor=f)
    with pytest.raises(BundleError, match="magic"):
        bundle_manifest(b"PK\x03\x04" + bundle)
    with pytest.raises(BundleError, match="corrupt"):
        bundle_manifest(bundle[:-3])
    assert bundle.startswith(BUNDLE_MAGIC)
    # A changed byte in the source files' section is caught as well as one in the payload.
    header = split_bundle(bundle)[0]
    at = len(bundle) - header["payload_bytes"] - header["sources_bytes"] // 2
    tampered = bundle[:at] + bytes([bundle[at] ^ 1]) + bundle[at + 1 :]
    with pytest.raises(BundleError, match="source files are corrupt"):
        bundle_manifest(tampered)


def with_header(bundle: bytes, **changes) -> bytes:
    start = len(BUNDLE_MAGIC) + 4
    header_len = int.from_bytes(bundle[len(BUNDLE_MAGIC) : start], "big")
    header = {**json.loads(bundle[start : start + header_len]), **changes}
    data = json.dumps(header).encode()
    return BUNDLE_MAGIC + len(data).to_bytes(4, "big") + data + bundle[start + header_len :]


def test_a_bundle_of_another_format_is_refused_clearly(tmp_path):
    def f(row):
        return row

    bundle = build_bundle(pre_processor=f)
    assert split_bundle(with_header(bundle))[0]["format"] == BUNDLE_FORMAT == jailed.BUNDLE_FORMAT
    with pytest.raises(BundleError, match=r"format 1, but this Spider reads only format 2: .*older Spider.*same Spider version"):
        bundle_manifest(with_header(bundle, format=1))
    with pytest.raises(BundleError, match=r"format 3, .*newer Spider"):
        bundle_manifest(with_header(bundle, format=3))
    # The jail checks too, before it unpickles anything.
    path = tmp_path / "old.bundle"
    path.write_bytes(with_header(bundle, format=1))
    with pytest.raises(RuntimeError, match=r"format 1, but this sandbox reads only format 2"):
        jailed.load_bundle(path)


def test_the_jail_keeps_the_same_format_constants():
    # jailed.py runs inside the jail with the standard library only, so it keeps its own copies.
    from spider.bundle import format

    assert jailed.BUNDLE_MAGIC == BUNDLE_MAGIC
    assert jailed.BUNDLE_FORMAT == BUNDLE_FORMAT
    assert jailed._LEN.format == format._HEADER_LEN.format


def test_tool_spec_round_trips_through_the_manifest():
    spec = tool_spec(google_tool)
    back = ToolSpec.from_schema_dict(bundle_manifest(build_bundle(tools=[(google_tool, spec)]))["tool_specs"][0])
    assert back.to_openai() == spec.to_openai()
