"""The bundle of user code (pre/post processors, tools) that a client builds and the API and the
sandbox workers read: tool specs (`tools`), the user's local modules (`modules`), the wire format
(`format`) and what to say when something cannot be pickled (`diagnose`).

The user's own local modules (files of their project, not the standard library or installed
packages) are pickled by value, so helpers, classes and constants defined next to the user's
script travel with it; their source files travel too, so that a function may also `import` them
when it runs. Installed packages travel by name and come from `runtime.packages`.
"""

from spider.bundle.format import (
    BUNDLE_FORMAT,
    BUNDLE_MAGIC,
    DEFAULT_MAX_BUNDLE_BYTES,
    build_bundle,
    bundle_manifest,
    bundle_sources,
    python_minor,
    split_bundle,
)
from spider.bundle.modules import ModuleSource, local_module_sources, local_modules
from spider.bundle.tools import TOOL_NAME_PATTERN, ToolSpec, infer_parameters, parse_docstring, tool_spec, type_schema
from spider.types import BundleManifest

__all__ = [
    "BUNDLE_FORMAT",
    "BUNDLE_MAGIC",
    "DEFAULT_MAX_BUNDLE_BYTES",
    "TOOL_NAME_PATTERN",
    "BundleManifest",
    "ModuleSource",
    "ToolSpec",
    "build_bundle",
    "bundle_manifest",
    "bundle_sources",
    "infer_parameters",
    "local_module_sources",
    "local_modules",
    "parse_docstring",
    "python_minor",
    "split_bundle",
    "tool_spec",
    "type_schema",
]
