"""Conversation jobs through the real stack: tools added with `add_tool` offered to the model, called
by it, run in the jail on the sandbox queue and fed back; the same through an OpenAI-compatible
vLLM server; a simulated user on another provider than the policy."""

from __future__ import annotations

import json
import os
import socket
from typing import Literal

import pytest

from spider.client import SpiderClient
from spider.models import SMOLLM2_135M_INSTRUCT
from tests.conftest import API_KEYS
from tests.helpers import make_config, read_jsonl

pytestmark = pytest.mark.slow
ALICE = API_KEYS[0]


def where_am_i(detail: Literal["host", "user"]) -> str:
    """Say where this tool runs.

    Args:
        detail: What to report: "host" or "user".
    """
    return json.dumps({"host": socket.gethostname(), "uid": os.getuid(), "detail": detail})


def get_weather(city: str) -> str:
    """Current weather of a city.

    Args:
        city: The city's name, e.g. Paris.
    """
    return json.dumps({"city": city, "temperature_c": 21, "host": socket.gethostname(), "uid": os.getuid()})


def run(config, tools, tmp_path):
    with SpiderClient(config=config) as client:
        for tool in tools:
            client.add_tool(tool)
        job_id = client.submit_job()["job_id"]
        status = client.poll_job(job_id, interval=0.5)
        assert status["status"] == "completed", status
        return read_jsonl(client.download_result(job_id, tmp_path / f"{job_id}.jsonl"))


def check_tool_trajectory(record, tool_name):
    roles = [m["role"] for m in record["messages"]]
    assert roles[-4:] == ["user", "assistant", "tool", "assistant"] or roles.count("tool") >= 1, roles
    call_message = next(m for m in record["messages"] if m["role"] == "assistant" and m.get("tool_calls"))
    call = call_message["tool_calls"][0]
    assert call["function"]["name"] == tool_name and isinstance(call["function"]["arguments"], dict)
    result = next(m for m in record["messages"] if m["role"] == "tool")
    assert result["tool_call_id"] == call["id"] and result["name"] == tool_name
    answer = json.loads(result["content"])
    # It ran in the jail, as the job's own user: the sandbox's host name, never root.
    assert answer["host"] == "spider-sandbox" and answer["uid"] != 0
    assert [t["function"]["name"] for t in record["tools"]] and isinstance(record["tools"][0], dict)
    assert record["tool_calls"] >= 1 and record["tool_errors"] == 0
    assert record["stop_reason"] in ("answered", "max_tool_turns")
    assert len(record["turns"]) >= 2 and all(t["completion_tokens"] > 0 for t in record["turns"])
    return answer


def test_smollm2_calls_a_tool_that_runs_in_the_jail(stack, tmp_path):
    config = make_config(
        stack.url, ALICE, SMOLLM2_135M_INSTRUCT, "vllm",
        **{"source.split": "train[0:3]", "model.parameters": {"max_model_len": 2048, "dtype": "bfloat16"},
           "generation.tool_choice": "get_weather", "generation.max_tool_turns": 1,
           "generation.parameters": {"temperature": 0.0, "max_tokens": 48}, "generation.return_tokens": True},
    )
    records = run(config, [get_weather], tmp_path)
    assert len(records) == 3
    for record in records:
        answer = check_tool_trajectory(record, "get_weather")
        assert answer["city"]  # the model filled in the argument
        first = record["turns"][0]
        assert first["token_ids"] and len(first["token_ids"]) == len(first["logprobs"])
        assert record["completion"] == record["messages"][-1]["content"]


@pytest.fixture(scope="module")
def smollm2_server(tmp_path_factory):
    """vLLM's OpenAI-compatible server on SmolLM2-135M-Instruct."""
    from spider.models import resolve_model
    from tests.helpers import vllm_server_process

    path = resolve_model(SMOLLM2_135M_INSTRUCT)
    with vllm_server_process(path, tmp_path_factory.mktemp("smollm2-server"), dtype="bfloat16", max_model_len=2048,
                             name="smollm2") as url:
        yield url


def test_tool_calls_through_an_openai_compatible_server(stack, smollm2_server, tmp_path):
    """The endpoint parses the model's calls itself (`tool_calls`); each reaches the job's tool in
    the jail, or, when its arguments are not an object, comes back to the model as an error."""
    config = make_config(
        stack.url, ALICE, "smollm2", "openai",
        **{"source.split": "train[0:2]", "model.parameters": {"base_url": smollm2_server},
           "generation.tool_choice": "get_weather", "generation.max_tool_turns": 1,
           "generation.parameters": {"temperature": 0.0, "max_tokens": 128}},
    )
    records = run(config, [get_weather], tmp_path)
    assert len(records) == 2
    for record in records:
        call_message = next(m for m in record["messages"] if m["role"] == "assistant" and m.get("tool_calls"))
        call = call_message["tool_calls"][0]
        assert call["function"]["name"] == "get_weather"
        result = next(m for m in record["messages"] if m["role"] == "tool")
        assert result["tool_call_id"] == call["id"]
        if call["function"]["arguments"]:
            assert json.loads(result["content"])["host"] == "spider-sandbox"
        else:  # the server let the model write a bare value: it hears why the call could not run
            assert "not a JSON object" in result["content"] and record["tool_errors"] == 1
        assert record["stop_reason"] in ("answered", "max_tool_turns")


def test_simulated_user_on_another_provider(stack, tiny_model, tmp_path):
    config = make_config(
        stack.url, ALICE, tiny_model, "vllm",
        **{"source.split": "train[0:3]", "model.parameters": {"dtype": "float32", "max_model_len": 1024},
           "generation.parameters": {"temperature": 1.0, "max_tokens": 12},
           "generation.user": {"model": {"provider": "hf", "name": str(tiny_model), "parameters": {"dtype": "float32"}},
                               "max_turns": 2, "parameters": {"temperature": 1.0, "max_tokens": 10}}},
    )
    records = run(config, [], tmp_path)
    assert len(records) == 3
    for record in records:
        roles = [m["role"] for m in record["messages"] if m["role"] != "system"]
        assert roles == ["user", "assistant"] * 3, roles
        assert record["stop_reason"] == "max_user_turns" and record["tools"] is None


def test_an_mcp_servers_tools_are_called_in_the_jail(stack, tmp_path):
    from tests.test_mcp import MCP_PACKAGES, toolbox

    config = make_config(
        stack.url, ALICE, SMOLLM2_135M_INSTRUCT, "vllm",
        **{"source.split": "train[0:2]", "model.parameters": {"max_model_len": 2048, "dtype": "bfloat16"},
           "generation.mcp_servers": [toolbox(timeout_s=30).model_dump(exclude_none=True)],
           "generation.tool_choice": "whoami", "generation.max_tool_turns": 1,
           "generation.parameters": {"temperature": 0.0, "max_tokens": 48},
           "runtime.packages": MCP_PACKAGES},
    )
    records = run(config, [], tmp_path)
    assert len(records) == 2
    for record in records:
        assert "whoami" in [t["function"]["name"] for t in record["tools"]] and "add" in [t["function"]["name"] for t in record["tools"]]
        result = next(m for m in record["messages"] if m["role"] == "tool")
        seen = json.loads(result["content"])
        assert seen["hostname"] == "spider-sandbox" and seen["uid"] != 0
        assert record["tool_errors"] == 0


def test_a_remote_mcp_server_needs_the_network_opt_in(stack):
    import httpx

    config = make_config(stack.url, ALICE, SMOLLM2_135M_INSTRUCT, "vllm",
                         **{"generation.mcp_servers": [{"name": "remote", "url": "https://mcp.example.com/mcp"}]})
    body = config.job.model_dump(mode="json", exclude_unset=True)
    body["source"]["dataset"] = "org/data"
    response = httpx.post(f"{stack.url}/v1/jobs", json={"job": body}, headers={"Authorization": f"Bearer {ALICE}"})
    assert response.status_code == 422 and "runtime.network" in response.json()["detail"]
