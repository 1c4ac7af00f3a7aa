"""schemathesis over every operation of the API's OpenAPI schema, against a real API process on a
throwaway Redis (no workers: what it accepts waits in that Redis's queues): no answer is a 5xx.

The submit route reads its body itself, so the schema it publishes has no request body; the test
adds the body's real shape (`job` is JobConfig's JSON schema) so that schemathesis fuzzes it too."""

from __future__ import annotations

from typing import Any

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis.checks import not_a_server_error
from schemathesis.generation.modes import GenerationMode

from spider.api.app import create_app
from spider.config import JobConfig
from spider.settings import Settings
from tests.helpers import api_process

KEY = "key-fuzz"
AUTH = {"Authorization": f"Bearer {KEY}"}
EXAMPLES = 50  # per operation and mode


def with_submit_body(schema: dict[str, Any]) -> dict[str, Any]:
    """The API's schema with the submit route's request body described."""
    job = JobConfig.model_json_schema(ref_template="#/components/schemas/{model}")
    components = schema.setdefault("components", {}).setdefault("schemas", {})
    components.update(job.pop("$defs", {}))
    components["JobConfig"] = job
    strings = {"type": "object", "additionalProperties": {"type": "string"}}
    body = {
        "type": "object",
        "required": ["job"],
        "properties": {
            "job": {"$ref": "#/components/schemas/JobConfig"},
            "env": strings,
            "source_files": strings,
            "bundle": {"type": "string"},
        },
    }
    schema["paths"]["/v1/jobs"]["post"]["requestBody"] = {
        "required": True,
        "content": {"application/json": {"schema": body}},
    }
    return schema


@pytest.fixture(scope="module")
def api_url(redis_url, tmp_path_factory) -> str:
    """`spider serve` in its own process on a free port."""
    root = tmp_path_factory.mktemp("fuzz")
    with api_process(redis_url, root / "data", root, KEY) as (url, log):
        yield url
    errors = [line for line in log.read_text().split("\n") if " 500 " in line or "Traceback" in line]
    assert not errors, "\n".join(errors[:20])


# The schema the server publishes, read from the app itself (building it connects to nothing).
SCHEMA = schemathesis.openapi.from_dict(with_submit_body(create_app(Settings()).openapi()))
OPERATIONS = [result.ok() for result in SCHEMA.get_all_operations()]


@pytest.fixture
def real_job(api_url) -> str:
    """A job of the fuzzing key's, so that routes on a job id reach past their 404 (one per test:
    an operation may cancel or remove it)."""
    job = {"model": {"provider": "hf", "name": "no-such-org/no-such-model"}, "source": {"dataset": "no-org/no-data"}}
    answer = httpx.post(f"{api_url}/v1/jobs", json={"job": job}, headers=AUTH)
    assert answer.status_code == 201, answer.text
    return answer.json()["job_id"]


def negatable(operation: Any) -> bool:
    """Whether the operation has input that can be made invalid (a query or a body: its path's job id
    is any string, and every string is a valid one)."""
    definition = operation.definition.raw
    return "requestBody" in definition or any(p.get("in") == "query" for p in definition.get("parameters", []))


CASES = [(op, GenerationMode.POSITIVE) for op in OPERATIONS] + [
    (op, GenerationMode.NEGATIVE) for op in OPERATIONS if negatable(op)
]


@pytest.mark.parametrize(("operation", "mode"), CASES, ids=[f"{op.label}-{mode.value}" for op, mode in CASES])
def test_no_operation_answers_a_server_error(api_url, real_job, operation, mode):
    answers: list[int] = []
    if operation.path.endswith("/events"):
        # A live job's stream follows it for as long as it runs; an ended one's stops after its history.
        assert httpx.post(f"{api_url}/v1/jobs/{real_job}/cancel", headers=AUTH).status_code == 200

    @given(case=operation.as_strategy(generation_mode=mode), own_job=st.booleans())
    @settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck), database=None)
    def call(case, own_job):
        if own_job and "job_id" in (case.path_parameters or {}):
            case.path_parameters["job_id"] = real_job
        response = case.call(base_url=api_url, headers=AUTH, timeout=30)
        answers.append(response.status_code)
        case.validate_response(response, checks=[not_a_server_error])

    call()
    assert answers and all(status < 500 for status in answers), answers
