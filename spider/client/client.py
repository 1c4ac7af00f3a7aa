"""SpiderClient: submit a job, follow its progress, fetch its result."""

from __future__ import annotations

import base64
import json
import os
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping

import httpx

from spider.config import TINKER_KEY_SECRET, AppConfig, JobConfig, ServerConfig
from spider.errors import APIError, AuthError, JobNotFoundError, SpiderError
from spider.types import ENDED_STATUSES, ENDING_KINDS, Event

EnvSpec = Mapping[str, str] | Iterable[str] | str | None


def resolve_env(env: EnvSpec) -> dict[str, str]:
    """The secrets to send: names are read from this process's environment.

    `env` is a name, a sequence of names, or a mapping whose empty values are read from the
    environment (non-empty values are sent as given). Names not set anywhere are left out, with a
    warning."""
    if env is None:
        return {}
    if isinstance(env, str):
        env = (env,)
    pairs = env.items() if isinstance(env, Mapping) else ((name, "") for name in env)
    out: dict[str, str] = {}
    for name, value in pairs:
        value = value or os.environ.get(name, "")
        if value:
            out[name] = value
        else:
            warnings.warn(f"environment variable {name} is not set; the job will run without it", stacklevel=3)
    return out


class SpiderClient:
    """One client for every job kind.

    With `config.server.base_url` unset, entering the context starts the local stack (Redis, API,
    workers) on this machine and leaving it stops the stack.
    """

    def __init__(
        self,
        config: AppConfig | None = None,
        env: EnvSpec = None,
        pre_processor: Callable[..., Any] | None = None,
        post_processor: Callable[..., Any] | None = None,
        base_url: str | None = None,
        api_key: str | None = None,
    ):
        self.config = config
        self.server = config.server if config is not None else ServerConfig()
        self.env = resolve_env(env)
        self.pre_processor = pre_processor
        self.post_processor = post_processor
        self.tools: list[tuple[Callable[..., Any], Any]] = []
        self.base_url = base_url or self.server.base_url or os.environ.get("SPIDER_URL")
        self.api_key = api_key or self.server.api_key or os.environ.get("SPIDER_API_KEY")
        self._stack = None
        self._http: httpx.Client | None = None

    # -- lifecycle ------------------------------------------------------------------------------

    def __enter__(self) -> "SpiderClient":
        if not self.base_url:
            from spider.local import LocalStack

            self._stack = LocalStack().__enter__()
            self.base_url = self._stack.url
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    @property
    def local_stack(self):
        """The local stack this client started (no `server.base_url`), or None."""
        return self._stack

    def close(self) -> None:
        if self._http is not None:
            self._http.close()
            self._http = None
        if self._stack is not None:
            self._stack.stop()
            self._stack = None
            self.base_url = None

    @property
    def http(self) -> httpx.Client:
        if self._http is None:
            if not self.base_url:
                raise SpiderError("no server: set server.base_url, or use the client as a context manager")
            headers = dict(self.server.headers)
            if self.api_key:
                headers["Authorization"] = f"Bearer {self.api_key}"
            self._http = httpx.Client(
                base_url=self.base_url.rstrip("/"),
                headers=headers,
                timeout=self.server.request_timeout,
                verify=self.server.verify_tls,
            )
        return self._http

    def _call(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        response = self.http.request(method, path, **kwargs)
        if response.status_code >= 400:
            _raise_for(response)
        return response

    # -- user code ------------------------------------------------------------------------------

    def add_tool(
        self,
        func: Callable[..., Any],
        description: str | None = None,
        json_schema: dict[str, Any] | None = None,
        name: str | None = None,
        kwargs: dict[str, Any] | None = None,
    ) -> Any:
        """Offer `func` to the model as a tool; it runs in the sandbox. Returns its ToolSpec."""
        from spider.bundle import tool_spec

        spec = tool_spec(func, description=description, json_schema=json_schema, name=name, kwargs=kwargs)
        if any(existing.name == spec.name for _, existing in self.tools):
            raise SpiderError(f"a tool named {spec.name!r} was already added")
        self.tools.append((func, spec))
        return spec

    def _bundle(self) -> str | None:
        # A job with stdio MCP servers runs them in its sandbox, which opens from a bundle (even an
        # empty one): it carries the Python version the sandbox checks.
        stdio_mcp = self.config is not None and any(s.command for s in self.config.job.generation.mcp_servers)
        if not (self.pre_processor or self.post_processor or self.tools or stdio_mcp):
            return None
        from spider.bundle import build_bundle

        data = build_bundle(self.pre_processor, self.post_processor, self.tools)
        return base64.b64encode(data).decode()

    # -- jobs -----------------------------------------------------------------------------------

    def submit_job(self) -> dict[str, Any]:
        """Send the config, secrets and user code; returns `{"job_id", "status"}`."""
        if self.config is None:
            raise SpiderError("submit_job needs a config: SpiderClient(config=AppConfig.load(...))")
        job, env = job_and_secrets(self.config.job, self.env)
        body = {
            "job": job,
            "env": env,
            "bundle": self._bundle(),
            "source_files": local_source_files(self.config.job.source.dataset),
        }
        return self._call("POST", "/v1/jobs", json=body).json()

    def get_job_status(self, job_id: str) -> dict[str, Any]:
        return self._call("GET", f"/v1/jobs/{job_id}").json()

    def list_jobs(self) -> list[dict[str, Any]]:
        return self._call("GET", "/v1/jobs").json()["jobs"]

    def cancel_job(self, job_id: str) -> dict[str, Any]:
        return self._call("POST", f"/v1/jobs/{job_id}/cancel").json()

    def resume_job(self, job_id: str, secrets: dict[str, str] | None = None) -> dict[str, Any]:
        """Bring a job back to work: a failed one (its cause fixed: a full disk, Redis down) runs
        again from where it stopped, an active one has whatever it lost handed out again now.
        A failed job's secrets were dropped when it failed: pass them again (the status lists
        their names in `secret_names`)."""
        return self._call("POST", f"/v1/jobs/{job_id}/resume", json={"secrets": secrets or {}}).json()

    def delete_job(self, job_id: str) -> dict[str, Any]:
        """Remove a job from the server (cancelling it first if it still runs): its record, events
        and files, result included. JobNotFoundError if it is not one of yours."""
        return self._call("DELETE", f"/v1/jobs/{job_id}").json()

    def stream_events(
        self, job_id: str, after: str | None = None, follow: bool = True, reconnect_delay: float = 2.0
    ) -> Iterator[Event]:
        """The job's events: its history first, then (with `follow`) live ones until it ends.
        Reconnects after a dropped connection (or a restarted API) from the last event seen."""
        last = after
        while True:
            try:
                headers = {"Last-Event-ID": last} if last else {}
                with self.http.stream(
                    "GET",
                    f"/v1/jobs/{job_id}/events",
                    params={"follow": str(follow).lower()},
                    headers=headers,
                    timeout=httpx.Timeout(30.0, read=None),
                ) as response:
                    if response.status_code >= 400:
                        response.read()
                        self._call("GET", f"/v1/jobs/{job_id}")  # raises the right error type
                        raise APIError(response.status_code, response.text)
                    for event in parse_sse(self._checked(response.iter_lines())):
                        last = event.id
                        yield event
                        if event.kind in ENDING_KINDS:
                            return
                if not follow:
                    return
                if self.get_job_status(job_id)["status"] in ENDED_STATUSES:
                    # The stream closed on an ended job: collect whatever came after the last event.
                    yield from self.stream_events(job_id, after=last, follow=False)
                    return
            except (httpx.TransportError, httpx.RemoteProtocolError):
                self._check_stack()
                time.sleep(reconnect_delay)

    def _checked(self, lines: Iterator[str]) -> Iterator[str]:
        """`lines` of an event stream, checking between them (the server's keepalives come every
        15 s of silence) that the local stack this client started still has every process: a job
        no worker is left to run must not be followed forever."""
        for line in lines:
            self._check_stack()
            yield line

    def _check_stack(self) -> None:
        if self._stack is not None:
            self._stack.check()

    def poll_job(
        self,
        job_id: str,
        interval: float = 5.0,
        wait_for_completion: bool = True,
        on_event: Callable[[Event], None] | None = None,
    ) -> dict[str, Any]:
        """Return the job's status; with `wait_for_completion`, stream its events (printed, or
        passed to `on_event`) until it ends. `interval` is the wait between reconnects."""
        if not wait_for_completion:
            return self.get_job_status(job_id)
        handler = on_event or print_event
        for event in self.stream_events(job_id, reconnect_delay=interval):
            handler(event)
        return self.get_job_status(job_id)

    def training_metrics(self, job_id: str) -> list[dict[str, Any]]:
        """A training job's metrics so far: one dict per step (as its `train.step` events carry
        them), with the held-out KL before the first step as step 0 when it evaluates."""
        return self._call("GET", f"/v1/jobs/{job_id}/metrics").json()["steps"]

    def download_result(self, job_id: str, destination: str | os.PathLike[str], wait_s: float = 120.0) -> Path:
        """Save the result to `destination` and its metadata beside it (`<name>.metadata.json`).
        A dataset job's result is its records (JSONL or Parquet); an on-policy job's is a .tar.gz
        of the trained adapter (`adapter/`), `metrics.jsonl` and `metrics.png`. A cancelled dataset
        job's result is the rows done before the cancel (its metadata says `"partial": true`):
        while the server still assembles it, this waits up to `wait_s` seconds for it."""
        destination = Path(destination)
        destination.parent.mkdir(parents=True, exist_ok=True)
        tmp = destination.with_name(f".{destination.name}.part")
        deadline = time.monotonic() + wait_s
        while True:
            with self.http.stream("GET", f"/v1/jobs/{job_id}/result") as response:
                if response.status_code < 400:
                    with open(tmp, "wb") as handle:
                        for chunk in response.iter_bytes():
                            handle.write(chunk)
                    break
                response.read()
                pause = _retry_after(response)
                if pause is None or time.monotonic() + pause > deadline:
                    _raise_for(response)
            time.sleep(pause)
        tmp.replace(destination)
        metadata = self._call("GET", f"/v1/jobs/{job_id}/metadata").json()
        stem = destination.name[: -len(".tar.gz")] if destination.name.endswith(".tar.gz") else destination.stem
        meta_path = destination.with_name(stem + ".metadata.json")
        meta_path.write_text(json.dumps(metadata, indent=2))
        return destination


def _raise_for(response: httpx.Response) -> None:
    """Raise the error an API error response means (AuthError, JobNotFoundError, APIError)."""
    try:
        detail = response.json().get("detail", response.text)
    except ValueError:
        detail = response.text
    error = {401: AuthError, 404: JobNotFoundError}.get(response.status_code, APIError)
    raise error(response.status_code, detail)


def _retry_after(response: httpx.Response) -> float | None:
    """The seconds a 409 asks to wait before asking again (a result being assembled), else None."""
    if response.status_code != 409:
        return None
    try:
        return max(0.0, float(response.headers.get("retry-after", "")))
    except ValueError:
        return None


def job_and_secrets(job: JobConfig, env: Mapping[str, str]) -> tuple[dict[str, Any], dict[str, str]]:
    """The job as it is sent (JSON, no secret in it) and the secrets sent with it.

    `on_policy_options.api_key` moves into the secrets as TINKER_API_KEY; left empty, a job that
    uses Tinker gets TINKER_API_KEY from `env`, else from this process's environment."""
    body = job.model_dump(mode="json")
    secrets = dict(env)
    options = job.generation.on_policy_options
    if options is None:
        return body, secrets
    body["generation"]["on_policy_options"]["api_key"] = None
    sent = secrets.get(TINKER_KEY_SECRET)
    if options.tinker_key:
        if sent and sent != options.tinker_key:
            raise SpiderError(
                f"on_policy_options.api_key and env[{TINKER_KEY_SECRET!r}] are two different Tinker keys; give one"
            )
        secrets[TINKER_KEY_SECRET] = options.tinker_key
    elif options.uses_tinker and not sent and os.environ.get(TINKER_KEY_SECRET):
        secrets[TINKER_KEY_SECRET] = os.environ[TINKER_KEY_SECRET]
    return body, secrets


def local_source_files(dataset: str) -> dict[str, str] | None:
    """A local source file (or folder of files) travels with the job, so that a remote server
    reads the same rows the user sees; hub dataset ids are left to the server."""
    from spider.data.sources import LOCAL_BUILDERS

    path = Path(dataset).expanduser()
    if not path.exists():
        return None
    files = sorted(p for p in path.rglob("*") if p.suffix.lower() in LOCAL_BUILDERS) if path.is_dir() else [path]
    return {str(p.relative_to(path) if path.is_dir() else p.name): base64.b64encode(p.read_bytes()).decode() for p in files}


def print_event(event: Event) -> None:
    stamp = time.strftime("%H:%M:%S", time.localtime(event.ts))
    print(f"{stamp} {event.kind:<18} {event.message}", flush=True)


def parse_sse(lines: Iterable[str]) -> Iterator[Event]:
    """Events from a Server-Sent Events stream (comments and retry hints skipped)."""
    data: list[str] = []
    for line in lines:
        if line == "":
            if data:
                payload = json.loads("\n".join(data))
                data = []
                yield Event(**payload)
            continue
        if line.startswith(":"):
            continue
        name, _, value = line.partition(":")
        if name == "data":
            data.append(value[1:] if value.startswith(" ") else value)
