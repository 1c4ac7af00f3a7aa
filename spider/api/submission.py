"""What a submit request must be: every check of its body (job config, secrets, uploaded source
files, bundle of user code) before anything of it is stored."""

from __future__ import annotations

import base64
import binascii
import json
import logging
import re
import unicodedata
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fastapi import HTTPException

from spider.config import MAX_ENV_VALUE_CHARS, MAX_ENV_VARS, TINKER_KEY_SECRET, JobConfig
from spider.errors import BundleError, ConfigError
from spider.jobs import admission
from spider.jobs.dataset import PLAN as DATASET_PLAN
from spider.jobs.on_policy import START as ON_POLICY_START
from spider.settings import Settings
from spider.types import BundleManifest

log = logging.getLogger(__name__)

BODY_KEYS = {"job", "env", "bundle", "source_files"}
ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,255}")
# Bounds on the names of uploaded source files (bytes of UTF-8).
MAX_SOURCE_FILES = 1000
MAX_SOURCE_NAME_PART = 255
MAX_SOURCE_NAME = 1024
MAX_ENV_VALUE_BYTES = MAX_ENV_VALUE_CHARS
# How deep a request body may nest: a job config is a few levels, its free-form values a few more.
MAX_BODY_DEPTH = 64


@dataclass
class _Bundle:
    data: bytes
    manifest: BundleManifest


@dataclass
class Submission:
    """A submit request that passed every check: nothing of it has been stored yet."""

    job: JobConfig
    env: dict[str, str]
    bundle: _Bundle | None
    source_files: dict[str, bytes]  # normalised relative name -> content

    @property
    def first_stage(self) -> str:
        """The stage that starts the job, by its kind: an on-policy training run or a dataset."""
        return ON_POLICY_START if self.job.generation.on_policy else DATASET_PLAN


def parse_submission(raw: bytes, settings: Settings) -> Submission:
    """Validate a submit request body completely, without side effects; every fault is a 4xx."""
    try:
        body = json.loads(raw)
    except RecursionError:
        raise HTTPException(422, f"the request body nests deeper than {MAX_BODY_DEPTH} levels") from None
    except ValueError:
        raise HTTPException(422, "the request body must be JSON: {job, env, bundle, source_files}") from None
    _check_json_text(body)
    if not isinstance(body, dict) or "job" not in body:
        raise HTTPException(422, "the request body must be a JSON object with a `job` key")
    unknown = set(body) - BODY_KEYS
    if unknown:
        raise HTTPException(422, f"unknown request keys {sorted(unknown)}; expected {sorted(BODY_KEYS)}")
    try:
        job = JobConfig.parse(body["job"])
    except ConfigError as exc:
        raise HTTPException(422, str(exc)) from None
    options = job.generation.on_policy_options
    if options is not None and options.tinker_key:
        raise HTTPException(
            422,
            "job.generation.on_policy_options.api_key: secrets are never part of a job's config; send the Tinker key "
            f"in the request's env as {TINKER_KEY_SECRET} (SpiderClient moves on_policy_options.api_key there)",
        )
    if job.model.provider == "tinker" and not job.generation.on_policy:
        raise HTTPException(422, "job.model.provider: 'tinker' serves on-policy jobs only; use vllm, openai or hf")
    env = _checked_env(body.get("env"))
    source_files = _decode_source_files(body.get("source_files"), settings.max_bundle_bytes)
    try:
        admission.admit(job, settings.policy, source_files=sorted(source_files) or None, secret_names=sorted(env))
    except ConfigError as exc:
        raise HTTPException(422, str(exc)) from None
    _check_source_types(job, source_files)  # after admission: only paths the job may read are looked at
    bundle = _decode_bundle(body.get("bundle"), settings.max_bundle_bytes)
    _check_tool_choice(job, bundle.manifest.tools if bundle is not None else [])
    if job.generation.on_policy and bundle is not None and bundle.manifest.has_post_processor:
        raise HTTPException(422, "post_processor: it reshapes a dataset's records, and an on-policy job writes none; "
                                 "shape its prompts with a pre_processor")
    return Submission(job, env, bundle, source_files)


def _check_json_text(body: Any) -> None:
    """Refuse a body that nests deeper than MAX_BODY_DEPTH, or whose strings (keys included) are
    not text: JSON's \\ud800 escapes decode to lone surrogates, which no answer could encode. The
    422 names the path of the first fault. Walked without recursion, whatever the depth."""
    pending: list[tuple[Any, str, int]] = [(body, "", 0)]
    while pending:
        node, where, depth = pending.pop()
        if depth > MAX_BODY_DEPTH:
            raise HTTPException(422, f"{where[:200]}: nested deeper than {MAX_BODY_DEPTH} levels")
        if isinstance(node, str) and not _is_text(node):
            raise HTTPException(422, f"{where[:200] or 'the request body'}: not valid Unicode text (a lone surrogate "
                                     "such as \\ud800)")
        if isinstance(node, dict):
            for key, child in node.items():
                if not _is_text(key):
                    raise HTTPException(422, f"{where[:200] or 'the request body'}: a key is not valid Unicode text "
                                             "(a lone surrogate such as \\ud800)")
                pending.append((child, f"{where}.{key}" if where else key, depth + 1))
        elif isinstance(node, list):
            pending.extend((child, f"{where}[{i}]", depth + 1) for i, child in enumerate(node))


def _is_text(value: str) -> bool:
    try:
        value.encode()
    except UnicodeEncodeError:
        return False
    return True


def _check_source_types(job: JobConfig, source_files: dict[str, bytes]) -> None:
    """A source's files must be of a type Spider reads (LOCAL_BUILDERS); checked here, before the
    plan stage would meet them."""
    from spider.data.sources import LOCAL_BUILDERS

    known = ", ".join(sorted(LOCAL_BUILDERS))
    if source_files:
        for name in source_files:
            if Path(name).suffix.lower() not in LOCAL_BUILDERS:
                raise HTTPException(422, f"source_files: {name[:80]!r} is not a file type Spider reads as a source "
                                         f"(its name must end in one of {known})")
        return
    dataset = Path(job.source.dataset).expanduser()
    if dataset.suffix and dataset.suffix.lower() not in LOCAL_BUILDERS and dataset.is_file():
        raise HTTPException(422, f"job.source.dataset: {job.source.dataset[:200]!r} is not a file type Spider reads "
                                 f"as a source (its name must end in one of {known})")


def _check_tool_choice(job: JobConfig, tools: list[str]) -> None:
    """`tool_choice` must have tools to choose from, and a named tool must be one of them (MCP
    servers' tools are known only once listed, so a name may then be one of theirs)."""
    choice = job.generation.tool_choice
    if choice in ("auto", "none"):
        return
    servers = job.generation.mcp_servers
    if not tools and not servers:
        raise HTTPException(422, f"job.generation.tool_choice: {choice!r} needs tools: add them with add_tool or "
                                 "generation.mcp_servers")
    if choice != "required" and choice not in tools and not servers:
        raise HTTPException(422, f"job.generation.tool_choice: no tool named {choice!r}; the job's tools are: "
                                 f"{', '.join(tools)}")


def _checked_env(env: Any) -> dict[str, str]:
    env = env or {}
    if not isinstance(env, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in env.items()):
        raise HTTPException(422, "env must map variable names to string values")
    if len(env) > MAX_ENV_VARS:
        raise HTTPException(422, f"env: {len(env)} variables, more than the limit of {MAX_ENV_VARS}")
    for name, value in env.items():
        if not ENV_NAME.fullmatch(name):
            raise HTTPException(422, f"env: {name[:60]!r} is not a variable name (letters, digits and '_')")
        if "\x00" in value:
            raise HTTPException(422, f"env: the value of {name} contains a NUL character")
        try:
            value.encode()
        except UnicodeEncodeError:
            raise HTTPException(422, f"env: the value of {name} is not valid UTF-8 text") from None
        if len(value.encode()) > MAX_ENV_VALUE_BYTES:
            raise HTTPException(422, f"env.{name}: its value is longer than the limit of {MAX_ENV_VALUE_BYTES} bytes")
    return env


def source_file_name(name: str) -> str:
    """The normalised form of an uploaded source file's name: relative, '/'-separated, NFC, without
    empty or '.' parts. Raises a 422 for anything that could leave the job's source folder."""

    def bad(why: str) -> HTTPException:
        return HTTPException(422, f"source_files: bad file name {name[:80]!r}: {why}")

    if not isinstance(name, str) or not name:
        raise bad("empty")
    try:
        size = len(name.encode())
    except UnicodeEncodeError:
        raise bad("not valid UTF-8 text") from None
    if size > MAX_SOURCE_NAME:
        raise bad(f"longer than {MAX_SOURCE_NAME} bytes")
    if any(ord(c) < 32 or ord(c) == 127 for c in name):
        raise bad("contains a NUL or control character")
    if "\\" in name:
        raise bad("use '/' between folders")
    if name.startswith("/"):
        raise bad("must be relative")
    parts = [part for part in unicodedata.normalize("NFC", name).split("/") if part not in ("", ".")]
    if not parts:
        raise bad("names no file")
    if ".." in parts:
        raise bad("'..' is not allowed")
    if any(len(part.encode()) > MAX_SOURCE_NAME_PART for part in parts):
        raise bad(f"a part is longer than {MAX_SOURCE_NAME_PART} bytes")
    return "/".join(parts)


def source_file_names(names: list[str]) -> dict[str, str]:
    """{submitted name: normalised name} for a set of uploaded files; refuses too many files, two
    names for the same file (after normalisation, ignoring case) and a name that is both a file and
    a folder."""
    if len(names) > MAX_SOURCE_FILES:
        raise HTTPException(422, f"source_files: {len(names)} files, more than the limit of {MAX_SOURCE_FILES}")
    out: dict[str, str] = {}
    seen: dict[str, str] = {}
    for name in names:
        normal = source_file_name(name)
        key = normal.casefold()
        if key in seen:
            raise HTTPException(422, f"source_files: {seen[key][:80]!r} and {name[:80]!r} name the same file")
        seen[key] = name
        out[name] = normal
    folders = {"/".join(key.split("/")[:i]) for key in seen for i in range(1, key.count("/") + 1)}
    for key, name in seen.items():
        if key in folders:
            raise HTTPException(422, f"source_files: {name[:80]!r} is both a file and a folder")
    return out


def _decode_source_files(encoded: Any, limit: int) -> dict[str, bytes]:
    if not encoded:
        return {}
    if not isinstance(encoded, dict):
        raise HTTPException(422, "source_files must map file names to base64 strings")
    names = source_file_names(list(encoded))
    out, total = {}, 0
    for name, data in encoded.items():
        if not isinstance(data, str):
            raise HTTPException(422, f"source_files: {name[:80]!r} must be a base64 string")
        try:
            content = base64.b64decode(data, validate=True)
        except (binascii.Error, ValueError):
            raise HTTPException(422, f"source_files: {name[:80]!r} is not valid base64") from None
        total += len(content)
        if total > limit:
            raise HTTPException(413, f"source files are larger than the server's limit of {limit} bytes")
        out[names[name]] = content
    return out


def _decode_bundle(encoded: Any, limit: int) -> _Bundle | None:
    if encoded in (None, ""):
        return None
    if not isinstance(encoded, str):
        raise HTTPException(422, "bundle must be a base64 string")
    if len(encoded) * 3 // 4 > limit:
        raise HTTPException(413, f"bundle is larger than the server's limit of {limit} bytes")
    try:
        data = base64.b64decode(encoded, validate=True)
    except (binascii.Error, ValueError):
        raise HTTPException(422, "bundle is not valid base64") from None
    from spider.bundle import bundle_manifest

    try:
        manifest = bundle_manifest(data)
    except BundleError as exc:
        raise HTTPException(422, f"bundle: {exc}") from None
    except Exception:
        # bundle_manifest refuses malformed headers with BundleError; anything else is still the
        # submitter's input, never a server error.
        log.warning("unexpected error reading a bundle header", exc_info=True)
        raise HTTPException(422, "bundle: the bundle header is corrupt") from None
    return _Bundle(data, manifest)
