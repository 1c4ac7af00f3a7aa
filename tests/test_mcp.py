"""MCP tools with real parts: the mcp SDK, a real stdio server (tests/mcp_servers/toolbox.py) in a
real firejail jail of the job's own profile, the sandbox-queue stages with a real Redis, and the
Celery tasks of a real stack. Remote servers: tests/test_mcp_remote.py."""

from __future__ import annotations

import asyncio
import http.server
import json
import shutil
import socketserver
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

import psutil
import pytest

from spider.bundle import build_bundle
from spider.config import JobConfig, MCPServerConfig, RuntimeConfig, SandboxLimits
from spider.errors import SandboxError
from spider.jobs import mcp as mcp_stages
from spider.policy import Policy
from spider.rollouts.mcp import MCPServerError, MCPTools, combine_tools, mcp_servers
from spider.rollouts.tools import CheckedTools, ToolAnswer
from spider.sandbox import Sandbox
from spider.sandbox.jail import job_uid
from spider.types import ToolCall

TOOLBOX = Path(__file__).parent / "mcp_servers" / "toolbox.py"
# The jail's venv gets the SDK from PyPI, at the version this side runs.
MCP_PACKAGES = [f"mcp=={__import__('importlib.metadata').metadata.version('mcp')}"]


def toolbox(timeout_s: float = 30.0, **extra) -> MCPServerConfig:
    """The test server as a job's stdio server: its source travels in the command line."""
    return MCPServerConfig(name="toolbox", command=["python", "-c", TOOLBOX.read_text()], timeout_s=timeout_s, **extra)


def run(coroutine):
    return asyncio.run(coroutine)


@pytest.fixture(scope="module")
def sandbox(firejail):
    base = Path(tempfile.mkdtemp(prefix="spider-mcp-test-", dir="/tmp"))
    base.chmod(0o755)
    # The operator lets networked jails reach this host's loopback (the tests' HTTP server).
    box = Sandbox(base / "root", policy=Policy(allowed_hosts=("127.0.0.1",)))
    yield box
    box.close()
    shutil.rmtree(base, ignore_errors=True)


def new_job(sandbox, network=False, secrets=None, **limits):
    job_id = f"m-{uuid.uuid4().hex[:10]}"
    runtime = RuntimeConfig(
        packages=MCP_PACKAGES, network=network, env={"MODE": "test"}, limits=SandboxLimits(**limits)
    )
    sandbox.open_job(job_id, build_bundle(), runtime, secrets or {})
    return job_id


@pytest.fixture()
def http_site():
    """A plain HTTP server on the host's loopback; yields its URL."""

    class Hello(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            body = b"x" * 5000 if self.path == "/big" else b"hello from the host"
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            if self.path == "/gzip":
                self.send_header("Content-Encoding", "gzip")
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), Hello)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


# -- the stdio server in the job's jail ----------------------------------------------------------


def test_a_jailed_stdio_server_lists_its_tools_and_answers_calls(sandbox):
    job_id = new_job(sandbox)
    server = sandbox.mcp_server(job_id, toolbox())
    names = {tool["name"] for tool in server.list_tools()}
    assert {"add", "whoami", "connect", "fetch", "fail", "hang", "shout"} <= names
    add = next(tool for tool in server.list_tools() if tool["name"] == "add")
    assert add["inputSchema"]["required"] == ["a", "b"]
    assert server.call_tool("add", {"a": 2, "b": 5}).content == "7"
    assert server.call_tool("shout", {"text": "hi", "times": 2}).content == "HIHI"
    sandbox.close_job(job_id)


def test_it_runs_as_the_jobs_user_in_its_scratch_with_its_environment_only(sandbox, monkeypatch, http_site):
    monkeypatch.setenv("SPIDER_WORKER_ONLY", "server-side-value")
    job_id = new_job(sandbox, secrets={"API_TOKEN": "job-secret"})
    server = sandbox.mcp_server(job_id, toolbox(env={"SERVER_FLAG": "on"}))
    seen = json.loads(server.call_tool("whoami", {}).content)
    assert seen["uid"] == job_uid(job_id) and seen["uid"] != 0 and seen["gid"] == seen["uid"]
    assert seen["hostname"] == "spider-sandbox"
    assert seen["cwd"] == str(sandbox.root / "jobs" / job_id / "scratch") == seen["env"]["HOME"]
    assert seen["python"].startswith(str(sandbox.venvs.path_for(MCP_PACKAGES)))
    assert set(seen["env"]) == {"PATH", "HOME", "TMPDIR", "LANG", "VIRTUAL_ENV", "MODE", "API_TOKEN", "SERVER_FLAG"}
    assert seen["env"]["API_TOKEN"] == "job-secret" and seen["env"]["SERVER_FLAG"] == "on"
    # No network: the host's loopback is not the jail's, and there is no proxy to go through.
    port = int(http_site.rsplit(":", 1)[1])
    assert server.call_tool("connect", {"host": "127.0.0.1", "port": port}).content.startswith("blocked")
    assert server.call_tool("fetch", {"url": http_site}).content.startswith("blocked")
    sandbox.close_job(job_id)


def test_a_networked_job_reaches_out_through_the_egress_proxy_only(sandbox, http_site):
    job_id = new_job(sandbox, network=True)
    server = sandbox.mcp_server(job_id, toolbox())
    env = json.loads(server.call_tool("whoami", {}).content)["env"]
    assert env["HTTP_PROXY"].startswith("http://127.0.0.1:")
    # Through the proxy, to a host the operator allows; never straight to the host's loopback.
    assert server.call_tool("fetch", {"url": http_site}).content == "hello from the host"
    port = int(http_site.rsplit(":", 1)[1])
    assert server.call_tool("connect", {"host": "127.0.0.1", "port": port}).content.startswith("blocked")
    sandbox.close_job(job_id)


def test_unknown_raising_and_hanging_tools_are_error_answers(sandbox):
    job_id = new_job(sandbox)
    server = sandbox.mcp_server(job_id, toolbox(timeout_s=1.5))
    unknown = server.call_tool("no_such_tool", {})
    assert unknown.error is not None and "no_such_tool" in unknown.error.message
    failed = server.call_tool("fail", {"message": "boom"})
    assert failed.error.kind == "exception" and failed.error.type == "ToolError" and "fail" in failed.error.message
    started = time.monotonic()
    hung = server.call_tool("hang", {})
    assert hung.error.kind == "timeout" and "1.5 s" in hung.error.message
    assert time.monotonic() - started < 10
    # The server still answers (it answered the ping after the timeout): nothing was restarted.
    pid = server.pid
    assert server.call_tool("add", {"a": 1, "b": 1}).content == "2" and server.pid == pid
    sandbox.close_job(job_id)


def test_a_message_over_output_mb_stops_the_server_and_the_next_call_starts_it_again(sandbox):
    job_id = new_job(sandbox, output_mb=1)
    server = sandbox.mcp_server(job_id, toolbox())
    first = server.pid if server.list_tools() else None
    big = server.call_tool("shout", {"text": "x", "times": 2 * 1024 * 1024})
    assert big.error.kind == "limit" and "output_mb" in big.error.message
    assert server.call_tool("add", {"a": 3, "b": 4}).content == "7"
    assert server.pid != first and not psutil.pid_exists(first)
    sandbox.close_job(job_id)


def test_servers_that_cannot_start_fail_clearly(sandbox):
    job_id = new_job(sandbox)
    missing = MCPServerConfig(name="missing", command=["no-such-mcp-server", "--stdio"])
    with pytest.raises(SandboxError, match=r"(?s)'no-such-mcp-server' is not in the job's venv.*runtime.packages"):
        sandbox.mcp_server(job_id, missing).list_tools()
    exits = MCPServerConfig(name="exits", command=["python", "-c", "import sys; print('no server here', file=sys.stderr); sys.exit(3)"])
    with pytest.raises(SandboxError, match=r"(?s)could not be started.*status 3.*no server here"):
        sandbox.mcp_server(job_id, exits).list_tools()
    answer = sandbox.mcp_server(job_id, exits).call_tool("add", {})
    assert answer.error.kind == "load" and "status 3" in answer.error.message
    sandbox.close_job(job_id)


def jail_processes(uid: int) -> list[psutil.Process]:
    return [p for p in psutil.process_iter(["uids"]) if p.info["uids"] and p.info["uids"].real == uid]


def test_closing_the_job_kills_the_server_and_everything_in_its_jail(sandbox):
    job_id = new_job(sandbox)
    server = sandbox.mcp_server(job_id, toolbox())
    server.list_tools()
    jail = server.pid
    assert psutil.pid_exists(jail)
    assert any("python" in " ".join(p.cmdline()) for p in jail_processes(job_uid(job_id)))
    sandbox.close_job(job_id)
    assert not psutil.pid_exists(jail) or psutil.Process(jail).status() == psutil.STATUS_ZOMBIE
    assert jail_processes(job_uid(job_id)) == []
    with pytest.raises(SandboxError, match="not open"):
        sandbox.mcp_server(job_id, toolbox())


def test_an_idle_server_is_stopped_and_started_again_when_used(sandbox):
    job_id = new_job(sandbox)
    server = sandbox.mcp_server(job_id, toolbox())
    server.list_tools()
    jail, hub = server.pid, server.hub
    hub.idle_s = 0.0
    try:
        hub._wait(hub.sweep(), 30)
    finally:
        hub.idle_s = 600.0
    assert server.pid is None and not psutil.pid_exists(jail)
    assert server.call_tool("add", {"a": 1, "b": 2}).content == "3" and server.pid not in (None, jail)
    sandbox.close_job(job_id)


# A sandbox worker that opens a job, starts a server that ignores the end of its input, prints
# the job's id and dies.
DYING_WORKER = """
import signal, sys
from pathlib import Path
from spider.bundle import build_bundle
from spider.config import MCPServerConfig, RuntimeConfig
from spider.sandbox import Sandbox

box = Sandbox(Path(sys.argv[1]))
box.open_job(sys.argv[2], build_bundle(), RuntimeConfig(packages=sys.argv[3:]), {})
source = Path("tests/mcp_servers/toolbox.py").read_text()
stubborn = source.replace("server.run()", "server.run(); import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(3600)")
box.mcp_server(sys.argv[2], MCPServerConfig(name="stubborn", command=["python", "-c", stubborn])).list_tools()
print("ready", flush=True)
signal.pthread_kill(__import__("threading").main_thread().ident, signal.SIGKILL)
"""


def test_a_worker_that_dies_takes_its_servers_jails_with_it(sandbox):
    from tests.helpers import ROOT

    job_id = f"m-{uuid.uuid4().hex[:10]}"
    worker = subprocess.run(
        [sys.executable, "-c", DYING_WORKER, str(sandbox.root), job_id, *MCP_PACKAGES],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    assert worker.returncode == -9 and "ready" in worker.stdout, worker.stderr[-2000:]
    deadline = time.monotonic() + 30
    while jail_processes(job_uid(job_id)) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert jail_processes(job_uid(job_id)) == []
    Sandbox(sandbox.root)  # a worker starting on the same root removes what the dead one left
    assert not (sandbox.root / "jobs" / job_id).exists()


# -- the rollout side: sandbox-queue stages, real Redis ---------------------------------------------


class WorkerPool:
    """What a sandbox worker's SandboxPool gives the stages: the job's sandbox, opened on demand."""

    def __init__(self, sandbox, ctx):
        self.sandbox = sandbox
        self.ctx = ctx

    def job(self, job_id, config):
        return self.sandbox.open_job(job_id, build_bundle(), config.runtime, self.ctx.store.secrets(job_id))


class ThreadDispatcher:
    """Runs the sandbox-queue stages as the worker's task threads would, without Celery."""

    def __init__(self):
        self.pool = None
        self.ctx = None
        self.sent: list[tuple] = []
        self.threads: list[threading.Thread] = []

    def dispatch(self, stage, job_id, *args):
        self.sent.append((stage, job_id, *args))
        target = {mcp_stages.MCP_LIST: mcp_stages.list_tools, mcp_stages.MCP_CALL: mcp_stages.call_tool}[stage]
        thread = threading.Thread(target=target, args=(self.ctx, self.pool, job_id, *args), daemon=True)
        thread.start()
        self.threads.append(thread)

    def join(self):
        for thread in self.threads:
            thread.join(timeout=120)


@pytest.fixture()
def queue(sandbox, redis_url, tmp_path):
    import redis

    from spider.events import EventBus
    from spider.jobs.stages import Context
    from spider.jobs.store import JobStore
    from spider.settings import Settings

    client = redis.Redis.from_url(redis_url, decode_responses=True)
    dispatcher = ThreadDispatcher()
    ctx = Context(Settings(redis_url=redis_url, data_dir=tmp_path), JobStore(client), EventBus(client), dispatcher)
    dispatcher.ctx, dispatcher.pool = ctx, WorkerPool(sandbox, ctx)
    yield ctx
    dispatcher.join()
    client.close()


def store_job(ctx, servers: list[MCPServerConfig]) -> tuple[str, JobConfig]:
    from spider.jobs.store import new_job_id
    from tests.helpers import make_config

    overrides = {
        "generation.mcp_servers": [s.model_dump(exclude_none=True) for s in servers],
        "generation.max_tool_output_chars": 64,
        "runtime.packages": MCP_PACKAGES,
    }
    config = make_config("http://127.0.0.1:9", None, "spider-tiny", provider="openai", **overrides).job
    job_id = new_job_id()
    ctx.store.create("tester", config.model_dump(mode="json", exclude_none=True), {"API_TOKEN": "t"}, has_bundle=True, job_id=job_id)
    return job_id, config


class OwnTools(CheckedTools):
    """Stands in for the job's own sandbox tools: one tool, `echo`, or whatever `names` say."""

    def __init__(self, names=("echo",)):
        schemas = [{"type": "function", "function": {"name": n, "parameters": {"type": "object"}}} for n in names]
        super().__init__(schemas, 1000)

    async def run(self, calls):
        return [ToolAnswer(f"own:{c.name}:{json.dumps(c.arguments)}") for c in calls]


def test_the_rollout_calls_stdio_servers_through_sandbox_tasks(queue):
    import redis.asyncio as aioredis

    # The hanging call waits past redis-py's 5 s socket timeout on its reply list.
    job_id, config = store_job(queue, [toolbox(timeout_s=6)])

    async def scenario():
        aredis = aioredis.Redis.from_url(queue.settings.redis_url, decode_responses=True)
        tools = await mcp_stages.job_mcp_tools(queue, job_id, config, aredis)
        try:
            names = [s["function"]["name"] for s in tools.schemas]
            combined = combine_tools({"the job's own tools": OwnTools(), "MCP": tools}, 64)
            calls = [
                ToolCall("1", "add", {"a": 20, "b": 22}),
                ToolCall("2", "echo", {"x": 1}),
                ToolCall("3", "no_such_tool", {}),
                ToolCall("4", "add", {"a": "twenty"}),
                ToolCall("5", "fail", {"message": "boom"}),
                ToolCall("6", "shout", {"text": "ab", "times": 100}),
                ToolCall("7", "hang", {}),
            ]
            return names, await combined.call_many(calls)
        finally:
            await tools.aclose()
            await aredis.aclose()

    names, answers = run(scenario())
    assert {"add", "whoami", "fail", "hang"} <= set(names)
    add, echo, unknown, invalid, failed, long, hung = answers
    assert (add.content, add.error) == ("42", None)
    assert echo.content == 'own:echo:{"x": 1}'
    assert unknown.error == "invalid_call" and "no tool named 'no_such_tool'" in unknown.content
    assert invalid.error == "invalid_call" and "schema" in invalid.content
    assert failed.error == "exception" and failed.content.startswith("error: ToolError")
    assert long.error is None and long.content.startswith("ABAB") and "truncated" in long.content
    assert hung.error == "timeout"
    stages = [sent[0] for sent in queue.dispatcher.sent]
    assert stages.count(mcp_stages.MCP_LIST) == 1 and mcp_stages.MCP_CALL in stages
    # Only the server's name travels: its command is read from the stored job.
    assert all(sent[2] == "toolbox" and TOOLBOX.read_text() not in map(str, sent) for sent in queue.dispatcher.sent)


def test_a_listing_failure_fails_with_the_servers_name_and_why(queue):
    import redis.asyncio as aioredis

    broken = MCPServerConfig(name="broken", command=["no-such-mcp-server"])
    job_id, config = store_job(queue, [toolbox(), broken])

    async def scenario():
        aredis = aioredis.Redis.from_url(queue.settings.redis_url, decode_responses=True)
        try:
            await mcp_stages.job_mcp_tools(queue, job_id, config, aredis)
        finally:
            await aredis.aclose()

    with pytest.raises(MCPServerError, match=r"MCP server 'broken' could not be listed.*no-such-mcp-server.*runtime.packages") as caught:
        run(scenario())
    assert "'toolbox'" not in str(caught.value)


def test_an_ended_job_answers_every_call_with_an_error(queue):
    import redis.asyncio as aioredis

    from spider.types import JobStatus

    job_id, config = store_job(queue, [toolbox()])
    queue.store.transition(job_id, JobStatus.CANCELLED, list(JobStatus))

    async def scenario():
        aredis = aioredis.Redis.from_url(queue.settings.redis_url, decode_responses=True)
        try:
            from spider.rollouts.mcp import QueuedMCPServer

            server = QueuedMCPServer(config.generation.mcp_servers[0], mcp_stages.sandbox_route(queue, job_id, aredis))
            return await server.call("add", {"a": 1, "b": 2})
        finally:
            await aredis.aclose()

    outcome = run(scenario())
    assert outcome.error.type == "JobEnded"


# -- through the real stack: Celery tasks on the sandbox queue ---------------------------------------------


@pytest.mark.slow
def test_the_sandbox_workers_tasks_list_and_call_a_jobs_stdio_server(firejail, stack):
    import redis
    import redis.asyncio as aioredis

    from spider.api.app import owner_of
    from spider.jobs.store import JobFiles, JobStore, new_job_id, write_atomic
    from spider.keys import DEFAULT_KEYS
    from spider.rollouts.mcp import SandboxRoute
    from spider.settings import Settings
    from spider.workers.app import make_celery
    from tests.conftest import API_KEYS
    from tests.helpers import make_config

    overrides = {"generation.mcp_servers": [toolbox(timeout_s=5).model_dump(exclude_none=True)], "runtime.packages": MCP_PACKAGES}
    config = make_config(stack.url, API_KEYS[0], "spider-tiny", provider="openai", **overrides).job
    job_id = new_job_id()
    write_atomic(JobFiles(stack.data_dir, job_id).bundle, build_bundle())
    store = JobStore(redis.Redis.from_url(stack.redis_url, decode_responses=True))
    store.create(owner_of(API_KEYS[0]), config.model_dump(mode="json", exclude_none=True), {}, has_bundle=True, job_id=job_id)
    app = make_celery(Settings(redis_url=stack.redis_url))

    async def scenario():
        aredis = aioredis.Redis.from_url(stack.redis_url, decode_responses=True)
        route = SandboxRoute(
            send_list=lambda server, reply: app.send_task("spider.mcp_list", (job_id, server, reply), queue="sandbox"),
            send_call=lambda server, reply, tool, arguments: app.send_task(
                "spider.mcp_call", (job_id, server, reply, tool, arguments), queue="sandbox"
            ),
            aredis=aredis,
            reply_key=DEFAULT_KEYS.tool_reply,
        )
        tools = await MCPTools.open(mcp_servers(config.generation.mcp_servers, route, (), network=False), 1000)
        try:
            return await tools.call_many([ToolCall("1", "add", {"a": 40, "b": 2}), ToolCall("2", "whoami", {})])
        finally:
            await tools.aclose()
            await aredis.aclose()

    try:
        add, whoami = run(scenario())
    finally:
        import httpx

        httpx.post(f"{stack.url}/v1/jobs/{job_id}/cancel", headers={"Authorization": f"Bearer {API_KEYS[0]}"})
    assert add.content == "42"
    seen = json.loads(whoami.content)
    assert seen["uid"] == job_uid(job_id) and seen["hostname"] == "spider-sandbox"
