"""The single-turn rollout and the types it writes: requests per row, records per (row, sample),
and records that serialize to the result format users read."""

from __future__ import annotations

import json

from spider.config import JobConfig
from spider.engines.base import Completion, GenerationResult
from spider.rollouts.single_turn import build_requests, records_for
from spider.types import BatchRow, BatchStats, BundleManifest, Message, RowError, Usage


def config(**generation) -> JobConfig:
    return JobConfig.parse({
        "model": {"provider": "hf", "name": "m"},
        "source": {"dataset": "d", "field": "question"},
        "generation": {"parameters": {"seed": 3}, **generation},
    })


def test_requests_start_from_the_prompt_or_the_conversation_with_the_system_prompt():
    rows = [
        BatchRow(0, "What is 2+2?", {"question": "What is 2+2?"}),
        BatchRow(1, None, {}, error=RowError("SourceError", "no question")),
        BatchRow(2, "And 3+3?", {}, conversation=[
            Message("user", "What is 2+2?"), Message("assistant", "4"), Message("user", "And 3+3?")]),
        BatchRow(3, "Hi", {}, conversation=[Message("system", "Be rude."), Message("user", "Hi")]),
    ]
    requests = build_requests(config(system_prompt="Be brief.", duplications=2), rows)
    assert [r.key for r in requests] == ["0", "2", "3"]  # the row with an error generates nothing
    assert [(m.role, m.content) for m in requests[0].messages] == [("system", "Be brief."), ("user", "What is 2+2?")]
    assert [m.role for m in requests[1].messages] == ["system", "user", "assistant", "user"]
    assert [(m.role, m.content) for m in requests[2].messages] == [("system", "Be rude."), ("user", "Hi")]
    assert all(r.n == 2 for r in requests) and len({r.seed for r in requests}) == 3


def test_records_serialize_as_the_result_format():
    cfg = config(duplications=2)
    rows = [BatchRow(0, "Q", {"question": "Q"}), BatchRow(1, None, {"x": 1}, error=RowError("SourceError", "bad row"))]
    requests = {r.key: r for r in build_requests(cfg, rows)}
    usage = Usage(prompt_tokens=5, completion_tokens=2)
    results = {"0": GenerationResult("0", completions=[Completion("A", "stop", usage)])}  # one sample of two
    records = [json.loads(json.dumps(r.to_dict())) for r in records_for("0123456789abcdef", cfg, rows, results, requests)]
    assert records[0] == {
        "id": "0123456789abcdef:0:0", "row_index": 0, "sample_index": 0, "prompt": "Q",
        "messages": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}],
        "completion": "A", "finish_reason": "stop", "usage": {"prompt_tokens": 5, "completion_tokens": 2},
        "source": {"question": "Q"}, "error": None,
    }
    assert records[1]["error"] == {"type": "GenerationError", "message": "the engine returned no completion"}
    assert records[1]["messages"] == [{"role": "user", "content": "Q"}]
    assert records[2]["error"] == {"type": "SourceError", "message": "bad row"} and records[2]["messages"] == []
    assert [list(r) for r in records] == [list(records[0])] * 4  # every record has the same keys, in order


def test_rows_stats_and_manifests_round_trip_through_json():
    row = BatchRow(4, "Hi", {"a": 1}, error=RowError("ValueError", "no", kind="exception"),
                   conversation=[Message("user", "Hi")])
    assert BatchRow.from_dict(json.loads(json.dumps(row.to_dict()))) == row
    assert "conversation" not in BatchRow(0, "p", {}).to_dict()  # a prompt row's file is as before
    stats = BatchStats(rows_done=4, dropped=1, records=3, row_errors=1, prompt_tokens=9, completion_tokens=12,
                       generation_seconds=0.5, error_examples=["row 2: no"])
    assert BatchStats.from_dict(json.loads(json.dumps(stats.to_dict()))) == stats
    manifest = BundleManifest(
        python="3.11.7", python_minor="3.11", cloudpickle="3.0.0", tools=["t"],
        tool_specs=[{"name": "t", "description": "", "parameters": {}}], has_pre_processor=True,
        has_post_processor=False, pre_processor="m.pre", post_processor=None, local_modules=[], source_modules=[],
        bytes=10,
    )
    stored = json.loads(json.dumps(manifest.to_dict()))
    assert list(stored) == ["python", "python_minor", "cloudpickle", "tools", "tool_specs", "has_pre_processor",
                            "has_post_processor", "pre_processor", "post_processor", "local_modules",
                            "source_modules", "bytes"]
    assert BundleManifest.from_dict(stored) == manifest and manifest.has_tools and manifest["python_minor"] == "3.11"
