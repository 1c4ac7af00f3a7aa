"""A job's MCP servers across the queues: the sandbox-queue stages that list a stdio server's tools
and run its calls in the job's sandbox (answers pushed to Redis reply lists), and, for the rollout,
the `MCPTools` of a job (stdio servers through those stages, remote ones directly).

The stages take the server's name only: its command comes from the job's stored, admitted config,
never from the rollout that asks.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

from spider.config import JobConfig
from spider.errors import SpiderError
from spider.jobs.stages import Context, load_job
from spider.sandbox.outcomes import CallError, ToolOutcome

if TYPE_CHECKING:
    from spider.config import MCPServerConfig

# The stages of the sandbox queue that list a stdio MCP server's tools and call one of them.
MCP_LIST = "mcp.list"
MCP_CALL = "mcp.call"
REPLY_TTL_S = 3600


def stdio_server(config: JobConfig, name: str) -> MCPServerConfig:
    """The job's stdio MCP server called `name`."""
    for server in config.generation.mcp_servers:
        if server.name == name and server.command is not None:
            return server
    raise SpiderError(f"the job has no stdio MCP server named {name!r}")


def _push(ctx: Context, reply_id: str, reply: dict[str, Any]) -> None:
    key = ctx.store.keys.tool_reply(reply_id)
    pipe = ctx.store.r.pipeline()
    pipe.rpush(key, json.dumps(reply))
    pipe.expire(key, REPLY_TTL_S)
    pipe.execute()


def list_tools(ctx: Context, pool: Any, job_id: str, server_name: str, reply_id: str) -> None:
    """List the tools of the job's stdio MCP server in its sandbox (starting the server) and push
    `{"tools": [...]}` (MCP wire form), or `{"error": {...}}` saying why not, to the reply list."""
    try:
        config, record = load_job(ctx, job_id)
        if record.status.ended:
            raise SpiderError(f"job {job_id} is {record.status}")
        server = stdio_server(config, server_name)
        pool.job(job_id, config)  # open (or keep open) the job's sandbox on this worker
        reply: dict[str, Any] = {"tools": pool.sandbox.mcp_server(job_id, server).list_tools()}
    except Exception as exc:
        reply = {"error": CallError("load", type(exc).__name__, str(exc)).to_dict()}
    _push(ctx, reply_id, reply)


def call_tool(ctx: Context, pool: Any, job_id: str, server_name: str, reply_id: str, tool: str, arguments: dict[str, Any]) -> None:
    """Call one tool of the job's stdio MCP server in its sandbox and push the answer (the shape of
    a tool call's reply: `{"content", "error"}`) to the reply list."""
    try:
        config, record = load_job(ctx, job_id)
        if record.status.ended:
            outcome = ToolOutcome(error=CallError("exception", "JobEnded", f"job {job_id} is {record.status}"))
        else:
            server = stdio_server(config, server_name)
            pool.job(job_id, config)
            outcome = pool.sandbox.mcp_server(job_id, server).call_tool(tool, arguments)
    except Exception as exc:
        outcome = ToolOutcome(error=CallError("exception", type(exc).__name__, str(exc)))
    _push(ctx, reply_id, {"content": outcome.content, "error": outcome.error.to_dict() if outcome.error else None})


def sandbox_route(ctx: Context, job_id: str, aredis: Any) -> Any:
    """How the job's rollout reaches its stdio MCP servers: the stages above, through `ctx.dispatch`."""
    from spider.rollouts.mcp import SandboxRoute

    return SandboxRoute(
        send_list=lambda server, reply: ctx.dispatch(MCP_LIST, job_id, server, reply),
        send_call=lambda server, reply, tool, arguments: ctx.dispatch(MCP_CALL, job_id, server, reply, tool, arguments),
        aredis=aredis,
        reply_key=ctx.store.keys.tool_reply,
    )


async def job_mcp_tools(ctx: Context, job_id: str, config: JobConfig, aredis: Any) -> Any:
    """The `MCPTools` of the job's `generation.mcp_servers` (None when it has none), listed:
    MCPServerError (which fails the batch) when a server's tools cannot be listed. Close it with
    `await tools.aclose()` on the same event loop."""
    from spider.policy import Policy
    from spider.rollouts.mcp import MCPTools, mcp_servers

    generation = config.generation
    if not generation.mcp_servers:
        return None
    policy = Policy.from_env()
    servers = mcp_servers(
        generation.mcp_servers,
        sandbox_route(ctx, job_id, aredis),
        policy.allowed_hosts,
        network=config.runtime.network and policy.sandbox_network,
        max_response_mb=config.runtime.limits.output_mb,
    )
    return await MCPTools.open(servers, generation.max_tool_output_chars)
