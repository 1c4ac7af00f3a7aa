"""Errors a user can cause, in one hierarchy that callers can catch by meaning."""

from __future__ import annotations


class SpiderError(Exception):
    """Base class of every error Spider raises on purpose."""


class ConfigError(SpiderError, ValueError):
    """The config is invalid; the message names the offending key path and what to change."""


class SourceError(SpiderError):
    """The job's source dataset cannot be loaded or lacks the requested field."""


class EngineError(SpiderError):
    """A generation backend could not be started or failed as a whole."""


class ModelNotFoundError(EngineError):
    """A model name resolves to nothing available offline (local path, HF cache, or a shipped package)."""


class BundleError(SpiderError):
    """User code cannot be serialized, is too large, or cannot be loaded on the server."""


class SandboxError(SpiderError):
    """The sandbox cannot run user code (no firejail, a dependency venv failed to build, ...)."""


class AlignmentError(SpiderError):
    """Two tokenizers cannot be aligned: bad token ids, a tokenizer without exact byte pieces, or a
    tokenizer pair whose alignment on the probe set falls below the required threshold."""


class APIError(SpiderError):
    """The Spider server answered with an error; `status_code` and `detail` say which."""

    def __init__(self, status_code: int, detail: object):
        self.status_code = status_code
        self.detail = detail
        super().__init__(f"HTTP {status_code}: {detail}")


class AuthError(APIError):
    """The API key is missing or invalid (HTTP 401)."""


class JobNotFoundError(APIError):
    """No such job for this API key (HTTP 404)."""
