"""What a conversational dataset batch runs with: the policy (the job's model, with its family's
tool-call and reasoning parsers), the job's tools on the sandbox queue, and its simulated user."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from spider.config import JobConfig
from spider.jobs.mcp import job_mcp_tools
from spider.jobs.stages import Context
from spider.rollouts.conversation import Policy
from spider.rollouts.mcp import combine_tools
from spider.rollouts.multi_turn import conversation_records
from spider.rollouts.parsers import ReasoningParser, ToolCallParser, default_tool_parser
from spider.rollouts.tools import SandboxTools
from spider.rollouts.users import SimulatedUser
from spider.types import BatchRow, BundleManifest, Record

# The stage that runs one tool call of a job on the sandbox queue.
TOOL_CALL = "tools.call"


def tool_schemas(manifest: BundleManifest | None) -> list[dict[str, Any]]:
    """The job's own tools (from `add_tool`), as OpenAI function schemas."""
    from spider.bundle import ToolSpec

    if manifest is None:
        return []
    return [ToolSpec.from_schema_dict(spec).to_openai() for spec in manifest.tool_specs]


def make_policy(config: JobConfig, engine: Any, schemas: list[dict[str, Any]]) -> Policy:
    from spider.engines import sampling_params

    generation = config.generation
    params = sampling_params(generation.parameters)
    params.logprobs = generation.return_tokens
    tokenizer = getattr(engine, "tokenizer", None)
    parser = None
    if schemas:
        # Endpoints parse calls themselves; what they leave in the text (a call cut short, one they
        # could not read) is read in Hermes format, so the model hears what went wrong.
        name = generation.tool_parser or (default_tool_parser(tokenizer) if tokenizer is not None else "hermes")
        parser = ToolCallParser(name, tokenizer, schemas)
    reasoning = ReasoningParser(generation.reasoning_parser, tokenizer) if generation.reasoning_parser and tokenizer else None
    return Policy(engine, params, parser, reasoning, return_tokens=generation.return_tokens)


@dataclass
class Toolkit:
    """The tools a job's conversations call: its own (add_tool, on the sandbox queue) and its MCP
    servers', combined; open on the engine loop, closed there with `await toolkit.aclose()`."""

    tools: Any  # a ToolExecutor, or None when the job has no tools
    aredis: Any
    mcp: Any = None

    async def aclose(self) -> None:
        try:
            if self.mcp is not None:
                await self.mcp.aclose()
        finally:
            await self.aredis.aclose()


async def open_toolkit(ctx: Context, job_id: str, config: JobConfig, manifest: BundleManifest | None) -> Toolkit:
    """The job's tools (this coroutine runs on the engine loop)."""
    import redis.asyncio as aioredis

    generation = config.generation
    schemas = tool_schemas(manifest)
    aredis = aioredis.Redis.from_url(ctx.settings.redis_url, decode_responses=True)
    toolkit = Toolkit(None, aredis)
    try:
        own = None
        if schemas:
            own = SandboxTools(
                schemas,
                send=lambda call_id, name, arguments: ctx.dispatch(TOOL_CALL, job_id, call_id, name, arguments),
                aredis=aredis,
                reply_key=ctx.store.keys.tool_reply,
                timeout_s=generation.tool_timeout_s,
                max_output_chars=generation.max_tool_output_chars,
            )
        toolkit.mcp = await job_mcp_tools(ctx, job_id, config, aredis)  # None without mcp_servers
        toolkit.tools = combine_tools(
            {"the job's own tools (add_tool)": own, "MCP": toolkit.mcp}, generation.max_tool_output_chars
        )
    except BaseException:
        await toolkit.aclose()
        raise
    return toolkit


def simulated_user(config: JobConfig, user_engine: Any | None) -> SimulatedUser | None:
    from spider.engines import sampling_params

    spec = config.generation.user
    if spec is None or user_engine is None:
        return None
    return SimulatedUser(user_engine, sampling_params(spec.parameters), spec.prompt, spec.max_turns, spec.stop_phrase)


async def batch_records(
    ctx: Context,
    job_id: str,
    config: JobConfig,
    rows: list[BatchRow],
    manifest: BundleManifest | None,
    engine: Any,
    user_engine: Any | None,
) -> list[Record]:
    """Run the batch's conversations on the engine loop (this coroutine runs there)."""
    toolkit = await open_toolkit(ctx, job_id, config, manifest)
    try:
        tools = toolkit.tools
        policy = make_policy(config, engine, tools.schemas if tools is not None else [])
        return await conversation_records(job_id, config, rows, policy, tools, simulated_user(config, user_engine))
    finally:
        await toolkit.aclose()
