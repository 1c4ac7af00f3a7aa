"""A job's config never reaches past what the job carried: engine parameters, model folders, remote
code, sources, outbound hosts and limits are refused at submit, and checked again on the workers.

Each attack is one an ordinary API key holder can send; the stack runs with two keys, a private
Redis and real workers (tests/conftest.py)."""

from __future__ import annotations

import base64
import http.server
import json
import threading
from pathlib import Path

import httpx
import pytest

from spider.config import JobConfig, ModelConfig, SourceConfig, apply_override
from spider.data.sources import SourceAccess, load_source_rows
from spider.errors import EngineError, ModelNotFoundError, SourceError
from spider.models import ModelAccess, resolve_model, token_cache
from tests.conftest import API_KEYS
from tests.helpers import SAMPLE_PROMPTS, make_config

ALICE, BOB = API_KEYS


def submit(stack, job: dict, key: str = ALICE, **body):
    """POST a job as the client would; the sample prompts travel with it when it names them."""
    if job["source"]["dataset"] == SAMPLE_PROMPTS.name and "source_files" not in body:
        body["source_files"] = {SAMPLE_PROMPTS.name: base64.b64encode(SAMPLE_PROMPTS.read_bytes()).decode()}
    return httpx.post(f"{stack.url}/v1/jobs", json={"job": job, **body},
                      headers={"Authorization": f"Bearer {key}"}, timeout=60)


def job_body(stack, model, **overrides) -> dict:
    """A job as JSON, with `overrides` (dotted keys) applied without client-side validation: an
    attacker sends whatever JSON it likes."""
    body = make_config(stack.url, ALICE, model).job.model_dump(mode="json", exclude_unset=True)
    body["source"]["dataset"] = SAMPLE_PROMPTS.name
    for key, value in overrides.items():
        apply_override(body, key, value)
    return body


def refused(response, *needles: str) -> str:
    assert response.status_code == 422, (response.status_code, response.text)
    detail = response.json()["detail"]
    for needle in needles:
        assert needle in detail, detail
    return detail


class Recorder(http.server.ThreadingHTTPServer):
    """An HTTP server that records every request it gets: a stand-in for an attacker's endpoint or
    an internal service."""

    def __init__(self, host: str = "127.0.0.1"):
        self.requests: list[tuple[str, dict[str, str]]] = []
        recorder = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self):
                recorder.requests.append((self.path, dict(self.headers)))
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.end_headers()
                self.wfile.write(b'{"internal": "secret data of an internal service"}')

            do_GET = do_POST

            def log_message(self, *args):
                pass

        super().__init__((host, 0), Handler)
        self.url = f"http://{host}:{self.server_address[1]}"
        threading.Thread(target=self.serve_forever, daemon=True).start()


# -- engine parameters, model folders, remote code -------------------------------------------------


@pytest.mark.parametrize(
    "parameters, field",
    [
        ({"download_dir": "/etc"}, "download_dir"),
        ({"worker_cls": "os.system"}, "worker_cls"),
        ({"hf_overrides": {"auto_map": {}}}, "hf_overrides"),
        ({"load_format": "pt"}, "load_format"),
        ({"allowed_local_media_path": "/"}, "allowed_local_media_path"),
        ({"generation_config": "/etc"}, "generation_config"),
    ],
)
def test_engine_parameters_outside_the_providers_list_are_refused(stack, parameters, field):
    body = job_body(stack, "HuggingFaceTB/SmolLM2-135M-Instruct", **{"model.provider": "vllm", "model.parameters": parameters})
    refused(submit(stack, body), "job.model.parameters", field)


def test_remote_code_in_an_uploaded_model_folder_is_refused(stack):
    """The finding: trust_remote_code plus a "model folder" uploaded as source files ran the
    submitter's Python as root on the rollout worker."""
    evil = {
        "model/config.json": json.dumps({"model_type": "evil", "auto_map": {"AutoConfig": "evil.Config"}}),
        "model/evil.py": "import os; os.system('touch /tmp/spider-pwned')",
        "rows.jsonl": json.dumps({"question": "hi"}) + "\n",
    }
    files = {name: base64.b64encode(text.encode()).decode() for name, text in evil.items()}
    data_dir = Path(stack.data_dir).resolve()
    for name in (str(data_dir / "jobs"), str(data_dir), "./model", "jobs/../model"):
        body = job_body(stack, name, **{"model.provider": "vllm", "model.parameters": {"trust_remote_code": True}})
        detail = refused(submit(stack, body, source_files=files), "job.model.name", "SPIDER_MODEL_DIRS")
        assert "trust_remote_code" in detail
    # A hub id does not lend remote code either.
    body = job_body(stack, "org/model", **{"model.provider": "hf", "model.parameters": {"trust_remote_code": True}})
    refused(submit(stack, body), "trust_remote_code")
    assert not Path("/tmp/spider-pwned").exists()


def test_workers_refuse_model_folders_in_the_data_dir_even_inside_model_dirs(tmp_path):
    """Defence in depth: an operator whose SPIDER_MODEL_DIRS covers the data dir still never lets a
    job load a folder that jobs upload into."""
    data = tmp_path / "data"
    uploaded = data / "jobs" / "0123456789abcdef" / "source" / "model"
    uploaded.mkdir(parents=True)
    (uploaded / "config.json").write_text("{}")
    access = ModelAccess(roots=(tmp_path.resolve(),), forbidden=(data.resolve(),))
    with pytest.raises(ModelNotFoundError, match="SPIDER_MODEL_DIRS"):
        resolve_model(str(uploaded), access=access)
    allowed = tmp_path / "models" / "m"
    allowed.mkdir(parents=True)
    (allowed / "config.json").write_text("{}")
    assert resolve_model(str(allowed), access=access) == allowed.resolve()


def test_vllm_engine_refuses_remote_code_without_the_operators_permission(tiny_model):
    pytest.importorskip("vllm")
    from spider.engines.vllm_engine import VLLMEngine

    with pytest.raises(EngineError, match="SPIDER_ALLOW_REMOTE_CODE"):
        VLLMEngine(str(tiny_model), {"trust_remote_code": True}, allow_remote_code=False)


def test_private_hub_models_stay_in_their_tokens_cache(tmp_path, monkeypatch):
    """The Hub cannot be reached from here, so `snapshot_download` is replaced by a stand-in that
    writes a model folder where it is asked to: a model downloaded with one job's token is not
    found by a job without it, and a job without a token never sends the worker's own."""
    import huggingface_hub

    monkeypatch.setenv("SPIDER_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf-public"))
    monkeypatch.setenv("HF_TOKEN", "hf_worker_own_token")
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    calls = []

    def fake_snapshot_download(repo_id, local_files_only=False, cache_dir=None, token=None, **kwargs):
        calls.append({"local_only": local_files_only, "cache_dir": cache_dir, "token": token})
        folder = Path(cache_dir or tmp_path / "hf-public") / repo_id.replace("/", "--")
        if local_files_only:
            if not (folder / "config.json").exists():
                raise FileNotFoundError(repo_id)
            return str(folder)
        if token != "hf_job_a":  # the repo is private to the owner of token A
            raise PermissionError("private repo: this token may not read it")
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "config.json").write_text("{}")
        return str(folder)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    path = resolve_model("org/private-model", token="hf_job_a")
    assert path.is_relative_to(token_cache("hf_job_a"))
    assert calls[-1]["token"] == "hf_job_a"
    calls.clear()
    with pytest.raises(ModelNotFoundError):
        resolve_model("org/private-model", token=None)
    assert calls and all(call["token"] is False for call in calls)
    assert all(call["cache_dir"] is None for call in calls)
    with pytest.raises(ModelNotFoundError):
        resolve_model("org/private-model", token="hf_job_b")
    assert resolve_model("org/private-model", token="hf_job_a") == path


# -- sources ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "source, needle",
    [
        ({"dataset": "json", "options": {"data_files": "/etc/shadow"}}, "data_files"),
        ({"dataset": "json", "options": {"data_files": {"train": ["/proc/1/environ"]}}}, "data_files"),
        ({"dataset": "text", "options": {"data_files": "/proc/self/cmdline"}}, "data_files"),
        ({"dataset": "/etc/passwd"}, "source.dataset"),
        ({"dataset": "../../etc/passwd.csv"}, "source.dataset"),
        ({"dataset": "org/data", "options": {"cache_dir": "/etc/cron.d"}}, "cache_dir"),
        ({"dataset": "org/data", "options": {"storage_options": {}}}, "storage_options"),
        ({"dataset": "org/data", "options": {"data_files": "../../../etc/shadow"}}, "data_files"),
        ({"dataset": "org/data", "options": {"data_files": "/etc/shadow"}}, "data_files"),
        ({"dataset": "org/data", "options": {"data_files": "file:///etc/shadow"}}, "data_files"),
        ({"dataset": "org/data", "options": {"data_files": "zip://x::/etc/shadow"}}, "data_files"),
        ({"dataset": "json", "options": {"data_files": "http://127.0.0.2:6379/"}}, "SPIDER_ALLOW_REMOTE_DATA"),
        ({"dataset": "pandas", "options": {"data_files": "/tmp/x.pkl"}}, "pandas"),
        ({"dataset": "sql", "options": {"sql": "select 1", "con": "sqlite:////etc/x"}}, "source.options"),
    ],
)
def test_sources_reaching_server_files_or_urls_are_refused(stack, tiny_model, source, needle):
    body = job_body(stack, tiny_model)
    body["source"] = {"field": "question", **source}
    refused(submit(stack, body), needle)


def test_another_users_uploaded_source_cannot_be_named(stack, tiny_model, tmp_path):
    rows = tmp_path / "alice.jsonl"
    rows.write_text(json.dumps({"question": "alice's private row"}) + "\n")
    body = job_body(stack, tiny_model)
    body["source"] = {"dataset": "alice.jsonl", "field": "question"}
    files = {"alice.jsonl": base64.b64encode(rows.read_bytes()).decode()}
    response = submit(stack, body, source_files=files)
    assert response.status_code == 201, response.text
    job_id = response.json()["job_id"]
    stolen = str(Path(stack.data_dir).resolve() / "jobs" / job_id / "source" / "alice.jsonl")
    bob = job_body(stack, tiny_model)
    bob["source"] = {"dataset": "json", "field": "question", "options": {"data_files": stolen}}
    refused(submit(stack, bob, key=BOB), "data_files")
    bob["source"] = {"dataset": stolen, "field": "question"}
    refused(submit(stack, bob, key=BOB), "source.dataset")


def test_workers_check_the_files_a_source_resolves_to(tmp_path):
    """Admission is the first check; the planner checks the files the source really resolves to
    (a relative path, a folder, patterns) before reading any of them."""
    inside = tmp_path / "job" / "source"
    inside.mkdir(parents=True)
    (inside / "rows.jsonl").write_text('{"q": 1}\n')
    secret = tmp_path / "secret.jsonl"
    secret.write_text('{"q": "secret"}\n')
    access = SourceAccess(uploaded=inside, cache_dir=tmp_path / "cache")
    assert load_source_rows(SourceConfig(dataset=str(inside / "rows.jsonl"), field="q"), access=access) == [{"q": 1}]
    for source in (
        SourceConfig(dataset=str(secret), field="q"),
        SourceConfig(dataset="json", field="q", options={"data_files": str(secret)}),
        SourceConfig(dataset="json", field="q", options={"data_files": str(inside / ".." / ".." / "secret.jsonl")}),
    ):
        with pytest.raises(SourceError, match="outside what this job may read"):
            load_source_rows(source, access=access)


def test_a_jobs_rows_do_not_stay_in_a_shared_datasets_cache(stack, tiny_model, tmp_path):
    marker = "marker-7f3c9e-not-in-any-cache"
    rows = tmp_path / "rows.jsonl"
    rows.write_text("".join(json.dumps({"question": f"{marker} {i}"}) + "\n" for i in range(3)))
    body = job_body(stack, tiny_model, **{"generation.parameters.max_tokens": 2})
    body["source"] = {"dataset": "rows.jsonl", "field": "question"}
    response = submit(stack, body, source_files={"rows.jsonl": base64.b64encode(rows.read_bytes()).decode()})
    assert response.status_code == 201, response.text
    job_id = response.json()["job_id"]
    status = wait_for(stack, job_id)
    assert status["status"] == "completed", status
    job_dir = Path(stack.data_dir) / "jobs" / job_id
    assert not (job_dir / "datasets-cache").exists()
    for cache in (Path.home() / ".cache" / "huggingface" / "datasets",):
        if cache.exists():
            for path in cache.rglob("*"):
                if path.is_file() and path.stat().st_size < 50_000_000:
                    assert marker.encode() not in path.read_bytes(), path


def wait_for(stack, job_id: str, key: str = ALICE, timeout: float = 240) -> dict:
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = httpx.get(f"{stack.url}/v1/jobs/{job_id}", headers={"Authorization": f"Bearer {key}"}).json()
        if status["status"] in ("completed", "failed", "cancelled"):
            return status
        time.sleep(0.5)
    raise AssertionError(f"job {job_id} did not end: {status}")


# -- outbound calls --------------------------------------------------------------------------------


def test_openai_engine_never_sends_the_workers_own_keys(stack):
    """The finding: `api_key_env: SPIDER_API_KEYS` sent every API key to the submitter's server.
    A key the job did not send is refused at submit; the workers never fall back to their own
    environment either (tests/test_engines.py::test_auth_failure_fails_the_engine)."""
    attacker = Recorder("127.0.0.1")  # the stack's operator allows 127.0.0.1 (the tests' vLLM server)
    try:
        for key_env in ("SPIDER_API_KEYS", "SPIDER_REDIS_URL", "HF_TOKEN", "PATH"):
            body = job_body(stack, "m", **{"model.provider": "openai",
                                            "model.parameters": {"base_url": attacker.url, "api_key_env": key_env}})
            refused(submit(stack, body), "api_key_env", key_env)
        assert attacker.requests == []
    finally:
        attacker.shutdown()


def test_openai_base_url_must_be_public_unless_the_operator_allows_it(stack):
    internal = Recorder("127.0.0.2")  # loopback, but not the host the operator allowed
    try:
        for base_url in (internal.url + "/v1", "http://169.254.169.254/latest", "http://10.1.2.3/v1",
                         "http://[::1]:6379/v1", "http://0.0.0.0:80/", "http://100.100.100.200/"):
            body = job_body(stack, "m", **{"model.provider": "openai", "model.parameters": {"base_url": base_url}})
            refused(submit(stack, body), "job.model.parameters.base_url")
        assert internal.requests == []
    finally:
        internal.shutdown()


def test_openai_engine_connects_only_to_checked_addresses():
    """In the worker, every connection is checked again (a name may resolve differently later)."""
    from spider.engines.openai_engine import OpenAIEngine

    internal = Recorder("127.0.0.1")
    try:
        with pytest.raises(EngineError, match="loopback"):
            OpenAIEngine("m", {"base_url": internal.url.replace("127.0.0.1", "localhost")}, allowed_hosts=())
        allowed = OpenAIEngine("m", {"base_url": internal.url}, allowed_hosts=("127.0.0.1",))
        allowed.client.post("/chat/completions", json={})
        assert internal.requests
        # A request to another host through the same client is checked too.
        with pytest.raises(Exception, match="loopback"):
            allowed.client.post(internal.url.replace("127.0.0.1", "127.0.0.3") + "/x", json={})
        allowed.close()
    finally:
        internal.shutdown()


# -- limits ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "limits, ceiling",
    [
        ({"memory_mb": 1_000_000}, "SPIDER_MAX_MEMORY_MB"),
        ({"max_processes": 90_000}, "SPIDER_MAX_PROCESSES"),
        ({"disk_mb": 10_000_000}, "SPIDER_MAX_DISK_MB"),
        ({"max_files": 100_000_000}, "SPIDER_MAX_FILES"),
        ({"call_timeout_s": 86_400}, "SPIDER_MAX_CALL_TIMEOUT_S"),
        ({"output_mb": 100_000}, "SPIDER_MAX_OUTPUT_MB"),
    ],
)
def test_limits_above_the_operators_ceilings_are_refused(stack, tiny_model, limits, ceiling):
    body = job_body(stack, tiny_model)
    body["runtime"] = {"limits": limits}
    refused(submit(stack, body), f"job.runtime.limits.{next(iter(limits))}", ceiling)


def test_a_config_with_engine_parameter_typos_fails_before_it_is_sent():
    with pytest.raises(Exception, match="did you mean 'max_model_len'"):
        JobConfig.parse({"model": {"name": "m", "parameters": {"max_model_lenght": 512}}, "source": {"dataset": "d"}})
    with pytest.raises(Exception, match="base_url"):
        ModelConfig(provider="openai", name="m", parameters={"base_url": "ftp://example.com/v1"})
    assert ModelConfig(provider="openai", name="m", parameters={"base_url": "https://example.com/v1"}).parameters


@pytest.mark.parametrize("package", ["evil @ https://example.com/evil-1.0.tar.gz", "git+https://example.com/evil.git",
                                     "/etc/passwd", "./evil.tar.gz", "--index-url=http://10.0.0.1/simple"])
def test_packages_from_outside_the_index_are_refused(stack, tiny_model, package):
    body = job_body(stack, tiny_model)
    body["runtime"] = {"packages": [package]}
    refused(submit(stack, body), "job.runtime.packages")
