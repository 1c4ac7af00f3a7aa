"""MCP tools on the rollout's side, with real parts: a streamable-HTTP server (tests/mcp_servers/
toolbox.py) on loopback reached through spider.netpolicy's guarded transport, the tool names of
several sources, and what the model reads of MCP results."""

from __future__ import annotations

import socket
import subprocess
import sys
import time

import pytest

from spider.config import MCPServerConfig
from spider.netpolicy import EgressDenied, ResponseTooLarge, guarded_async_transport
from spider.rollouts.mcp import (
    CombinedTools,
    MCPServerError,
    MCPTools,
    RemoteMCPServer,
    ToolNameClash,
    combine_tools,
    function_schema,
    mcp_servers,
    outcome_of,
)
from spider.rollouts.tools import CheckedTools, ToolAnswer
from spider.types import ToolCall
from tests.test_mcp import TOOLBOX, http_site, run  # noqa: F401 (http_site is a fixture)


class OwnTools(CheckedTools):
    """Stands in for the job's own sandbox tools."""

    def __init__(self, names):
        schemas = [{"type": "function", "function": {"name": n, "parameters": {"type": "object"}}} for n in names]
        super().__init__(schemas, 1000)

    async def run(self, calls):
        return [ToolAnswer(c.name) for c in calls]


def test_tool_names_stay_unique_across_sources():
    with pytest.raises(ToolNameClash, match=r"'add' is offered by both the job's own tools and MCP server 'calc'"):
        tools = MCPTools([(FakeServer("calc"), [{"name": "add"}])], 100)
        CombinedTools({"the job's own tools": OwnTools(["add"]), "MCP": tools}, 100)
    with pytest.raises(ToolNameClash, match=r"'add' is offered by both MCP server 'one' and MCP server 'two'"):
        MCPTools([(FakeServer("one"), [{"name": "add"}]), (FakeServer("two"), [{"name": "add"}])], 100)
    assert combine_tools({"own": None, "MCP": None}, 100) is None
    own = OwnTools(["echo"])
    assert combine_tools({"own": own, "MCP": None}, 100) is own


class FakeServer:
    def __init__(self, name):
        self.config = MCPServerConfig(name=name, command=["true"])


# -- remote servers -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def remote_url():
    """The test server over streamable HTTP on 127.0.0.1 (a loopback address jobs may not reach
    unless the operator allows it)."""
    from spider.local import free_port

    port = free_port()
    process = subprocess.Popen([sys.executable, str(TOOLBOX), "--http", str(port)], stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            assert process.poll() is None, "the streamable-HTTP test server exited"
            time.sleep(0.2)
    yield f"http://127.0.0.1:{port}/mcp"
    process.kill()
    process.wait()


def test_a_remote_server_on_loopback_is_refused_without_the_operators_permission(remote_url):
    config = MCPServerConfig(name="remote", url=remote_url, timeout_s=5)

    async def scenario():
        await MCPTools.open(mcp_servers([config], None, allowed_hosts=(), network=True), 100)

    with pytest.raises(MCPServerError, match=r"'remote'.*loopback address.*SPIDER_ALLOWED_HOSTS=127.0.0.1"):
        run(scenario())
    with pytest.raises(MCPServerError, match="needs runtime.network: true"):
        mcp_servers([config], None, allowed_hosts=("127.0.0.1",), network=False)


def test_a_remote_server_the_operator_allows_lists_and_answers(remote_url):
    # Long enough for an answer on a loaded machine: the `hang` call waits it out.
    config = MCPServerConfig(name="remote", url=remote_url, timeout_s=8)

    async def scenario():
        servers = mcp_servers([config], None, allowed_hosts=("127.0.0.1",), network=True)
        assert isinstance(servers[0], RemoteMCPServer)
        tools = await MCPTools.open(servers, 1000)
        try:
            calls = [ToolCall("1", "add", {"a": 1, "b": 2}), ToolCall("2", "fail", {"message": "x"}), ToolCall("3", "hang", {})]
            answers = await tools.call_many(calls)
            again = await tools.call_many([ToolCall("4", "add", {"a": 5, "b": 5})])
            return [s["function"]["name"] for s in tools.schemas], answers + again
        finally:
            await tools.aclose()

    names, (add, failed, hung, again) = run(scenario())
    assert {"add", "whoami", "hang"} <= set(names)
    assert add.content == "3" and failed.error == "exception" and hung.error == "timeout" and again.content == "10"


def test_a_remote_answer_over_the_limit_is_an_error(remote_url):
    config = MCPServerConfig(name="remote", url=remote_url, timeout_s=10)

    async def scenario():
        server = RemoteMCPServer(config, ("127.0.0.1",), max_response_bytes=64 * 1024)
        try:
            ok = await server.call("add", {"a": 1, "b": 1})
            big = await server.call("shout", {"text": "x", "times": 200_000})
            return ok, big
        finally:
            await server.aclose()

    ok, big = run(scenario())
    assert ok.content == "2"
    assert big.error.kind == "limit" and big.error.type == "ResponseTooLarge" and "65536 bytes" in big.error.message


# -- the guarded async transport -------------------------------------------------------------------------


@pytest.mark.parametrize("library", ["httpx", "httpx2"])
def test_the_guarded_async_transport_checks_every_connection_and_bounds_bodies(library, http_site):
    http = __import__(library)

    async def get(allowed, path, limit=None):
        transport = guarded_async_transport(allowed, library, max_response_bytes=limit)
        async with http.AsyncClient(transport=transport, trust_env=False) as client:
            return await client.get(http_site + path)

    with pytest.raises(EgressDenied, match="loopback address"):
        run(get((), "/"))
    assert run(get(("127.0.0.1",), "/")).text == "hello from the host"
    assert len(run(get(("127.0.0.1",), "/big", limit=10_000)).content) == 5000
    with pytest.raises(ResponseTooLarge, match="longer than 1000 bytes"):
        run(get(("127.0.0.1",), "/big", limit=1000))
    with pytest.raises(ResponseTooLarge, match="compressed"):
        run(get(("127.0.0.1",), "/gzip", limit=1000))


# -- what the model reads -------------------------------------------------------------------------------


def test_results_and_schemas_in_the_models_terms():
    import mcp.types as t

    def result(**wire):
        return t.CallToolResult.model_validate(wire)

    image = {"type": "image", "data": "AAAA", "mimeType": "image/png"}
    assert outcome_of(result(content=[{"type": "text", "text": "a"}, image])).content == "a\n[image image/png, 3 bytes]"
    assert outcome_of(result(content=[], structuredContent={"result": 3})).content == '{"result": 3}'
    error = outcome_of(result(content=[{"type": "text", "text": "bad input"}], isError=True))
    assert error.error.kind == "exception" and error.error.message == "bad input"
    schema = function_schema({"name": "add", "description": "Add.", "inputSchema": {"type": "object", "required": ["a"]}})
    assert schema == {
        "type": "function",
        "function": {"name": "add", "description": "Add.", "parameters": {"type": "object", "properties": {}, "required": ["a"]}},
    }
