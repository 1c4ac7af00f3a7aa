"""Reading tool calls and reasoning out of a model's raw text, in the format of its family.

`ToolCallParser(name, tokenizer, tools)` reads one assistant turn: Hermes / Qwen `<tool_call>{json}
</tool_call>` blocks with Spider's own parser (every block is kept, a block that is not JSON
becomes a call with an error instead of vanishing), any other family with the parser vLLM ships
(`llama3_json`, `mistral`, `pythonic`, `qwen3_xml`, ...). `default_tool_parser` picks the family
from the chat template. `ReasoningParser` splits `<think>` content off with vLLM's reasoning
parsers (`deepseek_r1`, `qwen3`, ...).
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass, field
from typing import Any

from spider.errors import ConfigError
from spider.types import ToolCall

HERMES_BLOCK = re.compile(r"<tool_call>(.*?)(?:</tool_call>|$)", re.DOTALL)


@dataclass
class ParsedTurn:
    """An assistant turn read from raw text: what it said, the calls it asked for, and calls it
    asked for in a form that could not be read (`malformed`: (call, why), answered with an error)."""

    content: str
    tool_calls: list[ToolCall] = field(default_factory=list)
    malformed: list[tuple[ToolCall, str]] = field(default_factory=list)
    reasoning: str | None = None


def call_id() -> str:
    return "call_" + uuid.uuid4().hex[:24]


def default_tool_parser(tokenizer: Any) -> str:
    """The tool-call format a model's chat template teaches it."""
    template = str(getattr(tokenizer, "chat_template", "") or "")
    if "[TOOL_CALLS]" in template:
        return "mistral"
    if "<|python_tag|>" in template or "ipython" in template:
        return "llama3_json"
    return "hermes"  # Hermes, Qwen 2.5/3, SmolLM and most ChatML templates


class ToolCallParser:
    """Reads tool calls out of one model's raw output."""

    def __init__(self, name: str, tokenizer: Any, tools: list[dict[str, Any]] | None = None):
        self.name = name
        self.tokenizer = tokenizer
        self.tools = tools or []
        self._vllm: Any = None
        if name != "hermes":
            self._vllm = _vllm_tool_parser(name, tokenizer, self.tools)

    def parse(self, text: str) -> ParsedTurn:
        if self._vllm is None:
            return parse_hermes(text)
        from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest

        request = ChatCompletionRequest(model="spider", messages=[], tools=self.tools or None)
        info = self._vllm.extract_tool_calls(text, request)
        calls = []
        malformed = []
        for raw in info.tool_calls if info.tools_called else []:
            call = ToolCall(id=raw.id or call_id(), name=raw.function.name, arguments={})
            try:
                arguments = json.loads(raw.function.arguments or "{}")
            except json.JSONDecodeError as exc:
                malformed.append((call, f"the arguments are not JSON ({exc.msg})"))
                continue
            if not isinstance(arguments, dict):
                malformed.append((call, "the arguments are not a JSON object"))
                continue
            call.arguments = arguments
            calls.append(call)
        return ParsedTurn(content=info.content or "", tool_calls=calls, malformed=malformed)


def parse_hermes(text: str) -> ParsedTurn:
    """`<tool_call>{"name": ..., "arguments": {...}}</tool_call>` blocks; the text around them is the content."""
    calls: list[ToolCall] = []
    malformed: list[tuple[ToolCall, str]] = []
    for block in HERMES_BLOCK.findall(text):
        try:
            data = json.loads(block.strip())
        except json.JSONDecodeError as exc:
            name = _name_in(block)
            malformed.append((ToolCall(call_id(), name, {}), f"the call is not JSON ({exc.msg}): {block.strip()[:200]!r}"))
            continue
        if not isinstance(data, dict) or not isinstance(data.get("name"), str):
            malformed.append((ToolCall(call_id(), "unknown", {}), 'a call must be {"name": ..., "arguments": {...}}'))
            continue
        arguments = data.get("arguments", data.get("parameters", {}))
        if isinstance(arguments, str):
            try:
                arguments = json.loads(arguments)
            except json.JSONDecodeError:
                pass
        call = ToolCall(call_id(), data["name"], arguments if isinstance(arguments, dict) else {})
        if not isinstance(arguments, dict):
            malformed.append((call, "the arguments are not a JSON object"))
            continue
        calls.append(call)
    content = HERMES_BLOCK.sub("", text).strip() if (calls or malformed) else text
    return ParsedTurn(content=content, tool_calls=calls, malformed=malformed)


def _name_in(block: str) -> str:
    match = re.search(r'"name"\s*:\s*"([^"]{1,128})"', block)
    return match.group(1) if match else "unknown"


def _vllm_tool_parser(name: str, tokenizer: Any, tools: list[dict[str, Any]]) -> Any:
    try:
        from vllm.tool_parsers import ToolParserManager
    except ImportError:
        raise ConfigError(
            f"generation.tool_parser {name!r} comes from vLLM, which this worker lacks; use 'hermes' or install vllm"
        ) from None
    try:
        parser_class = ToolParserManager.get_tool_parser(name)
    except KeyError:
        raise ConfigError(f"generation.tool_parser: vLLM has no tool parser {name!r}") from None
    from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest

    request = ChatCompletionRequest(model="spider", messages=[], tools=tools or None)
    return parser_class(tokenizer, request.tools)


class ReasoningParser:
    """Splits a model's reasoning (`<think>...</think>` and its family's variants) from its answer."""

    def __init__(self, name: str, tokenizer: Any):
        try:
            from vllm.reasoning import ReasoningParserManager
        except ImportError:
            raise ConfigError(f"generation.reasoning_parser {name!r} comes from vLLM, which this worker lacks") from None
        try:
            self._parser = ReasoningParserManager.get_reasoning_parser(name)(tokenizer)
        except KeyError:
            raise ConfigError(f"generation.reasoning_parser: vLLM has no reasoning parser {name!r}") from None

    def split(self, text: str) -> tuple[str | None, str]:
        """(reasoning, answer)."""
        from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest

        reasoning, content = self._parser.extract_reasoning(text, ChatCompletionRequest(model="spider", messages=[]))
        return reasoning or None, content or ""
