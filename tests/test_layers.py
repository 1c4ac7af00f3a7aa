"""Layers that import one way: the client and the bundle format sit below the API, the jobs, the
workers and the sandbox; the CLI (spider.cli) is the top layer and may import anything."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import spider

PACKAGE = Path(spider.__file__).parent


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path) -> set[str]:
    """Every spider module that `path` imports, at its top or inside a function."""
    package = module_name(path) if path.name == "__init__.py" else module_name(path).rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
    return {name for name in found if name == "spider" or name.startswith("spider.")}


MODULES = {module_name(path): path for path in PACKAGE.rglob("*.py")}
GRAPH = {name: {m for m in imports_of(path) if m in MODULES} for name, path in MODULES.items()}


def reachable(start: str) -> set[str]:
    """The spider modules that importing `start` may load, following every import, lazy ones too."""
    seen, todo = set(), [start]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        todo += GRAPH.get(name, ())
        todo += [parent for parent in _parents(name) if parent in MODULES]
    return seen - {start}


def _parents(name: str) -> list[str]:
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


def under(names: set[str], packages: tuple[str, ...]) -> set[str]:
    return {n for n in names if any(n == p or n.startswith(p + ".") for p in packages)}


@pytest.mark.parametrize("start", sorted(n for n in MODULES if n.startswith(("spider.client", "spider.bundle"))))
def test_client_and_bundle_do_not_reach_the_server_side(start):
    assert under(reachable(start), ("spider.workers", "spider.jobs", "spider.api", "spider.sandbox", "spider.cli")) == set()


@pytest.mark.parametrize("start", sorted(n for n in MODULES if n.startswith(("spider.bundle", "spider.api", "spider.sandbox"))))
def test_the_bundle_format_is_read_without_the_client(start):
    assert under(reachable(start), ("spider.client",)) == set()


def test_the_graph_sees_lazy_imports():
    # SpiderClient starts the local stack with an import inside a method.
    assert "spider.local" in GRAPH["spider.client.client"]
    assert "spider.bundle" in GRAPH["spider.client.client"]
    assert "spider.workers.app" in GRAPH["spider.cli"]
