"""Hub output against tests/fake_hub.py, a local stand-in for the Hub's HTTP API: the real
huggingface_hub client uploads to it (its LFS path: the fake has no Xet storage), and the real
`datasets.load_dataset` reads the result back from it in a subprocess."""

from __future__ import annotations

import json
import socket
import threading
from pathlib import Path

import pytest
import redis
import yaml

from spider.config import ConfigError, HFOutput, JobConfig
from spider.data import sinks
from spider.data.sinks import HubRetry, read_jsonl, upload_folder_to_hub, upload_shards, upload_to_hub
from spider.errors import SpiderError
from spider.events import EventBus
from spider.jobs import dataset
from spider.jobs.stages import Context
from spider.jobs.store import JobStore
from spider.policy import Policy
from spider.settings import Settings
from tests.fake_hub import HubUser, fake_hub_server, load_dataset_in_subprocess
from tests.helpers import Recorder, SAMPLE_PROMPTS

ALICE = "hf_alice_write"
ALICE_READ_ONLY = "hf_alice_read"
BOB = "hf_bob_write"
FAST_RETRY = HubRetry(tries=3, first_wait_s=0.01, max_wait_s=0.02)


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    tokens = {ALICE: HubUser("alice", orgs=("lab",)), ALICE_READ_ONLY: HubUser("alice", write=False),
              BOB: HubUser("bob")}
    with fake_hub_server(tokens, tmp_path_factory.mktemp("fake-hub")) as server:
        yield server


@pytest.fixture(scope="module", autouse=True)
def hub_env(hub):
    """Uploads go to the fake (HF_ENDPOINT, read at each upload), online (the test session sets
    HF_HUB_OFFLINE), over LFS, and retry quickly."""
    from huggingface_hub import constants

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_ENDPOINT", hub.url)
        mp.setattr(constants, "HF_HUB_OFFLINE", False)
        mp.setattr(constants, "HF_HUB_DISABLE_XET", True)
        mp.setattr(sinks, "HUB_RETRY", FAST_RETRY)
        yield


@pytest.fixture(autouse=True)
def no_faults_left(hub):
    yield
    hub.clear_faults()
    hub.before_commit = None
    assert not hub.errors, hub.errors[-1]


@pytest.fixture(scope="module")
def ctx(redis_url, tmp_path_factory):
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    settings = Settings(redis_url=redis_url, data_dir=tmp_path_factory.mktemp("data"),
                        policy=Policy(data_roots=(SAMPLE_PROMPTS.parent.resolve(),)))
    return Context(settings, JobStore(client), EventBus(client), Recorder())


def run_job(ctx, tiny_model, rows: str, output: dict, secrets: dict) -> str:
    """A real dataset job on the tiny model, driven through its stages; returns its id."""
    config = JobConfig.parse({
        "model": {"provider": "hf", "name": str(tiny_model)},
        "source": {"dataset": str(SAMPLE_PROMPTS), "split": f"train[{rows}]", "field": "question"},
        "generation": {"parameters": {"max_tokens": 6, "seed": 3}, "max_batch_size": 2},
        "output": output,
    })
    record = ctx.store.create("owner", config.model_dump(mode="json"), secrets, has_bundle=False)
    dataset.plan_job(ctx, record.id)
    while ctx.dispatcher.calls:
        stage, *args = ctx.dispatcher.calls.pop(0)
        {dataset.ROLLOUT: dataset.run_batch, dataset.FINALIZE: dataset.finalize_job}[stage](ctx, *args)
    return record.id


@pytest.fixture(scope="module")
def finished_job(ctx, tiny_model):
    """A job kept to itself (output `return`): its result, metadata and three shards of records
    (kept after finalize: the tests upload them as a job with `upload_every` would, batch by batch)."""
    job_id = run_job(ctx, tiny_model, "0:5", {"mode": "return", "keep_intermediate": True}, {})
    assert ctx.store.get(job_id).status == "completed"
    return job_id, ctx.files(job_id)


def load_from_hub(hub, token: str, wanted: list[tuple[str, str | None]], scratch: Path) -> list[list[dict]]:
    return load_dataset_in_subprocess(hub.url, token, wanted, scratch / "hf-home")


def card_of(hub, repo_id: str) -> tuple[dict, str]:
    text = hub.repo("dataset", repo_id).files()["README.md"].decode()
    _, header, body = text.split("---\n", 2)
    return yaml.safe_load(header), body


def key(records) -> list[tuple]:
    return sorted((r["id"], r["row_index"], r["prompt"], r["completion"]) for r in records)


# -- dataset jobs ---------------------------------------------------------------------------------


def test_jobs_share_a_repo_as_configs_that_load_dataset_reads(ctx, tiny_model, hub, tmp_path):
    """Three real jobs finalize into one repo: two into the default config, one into `v1`. Each
    keeps its own files, the card lists both configs and every job, and load_dataset finds them."""
    secrets = {"HF_TOKEN": ALICE}
    first = run_job(ctx, tiny_model, "0:3", {"mode": "upload_hf", "hf": {"repo_id": "alice/distilled"}}, secrets)
    first_files = hub.repo("dataset", "alice/distilled").files()
    v1 = run_job(ctx, tiny_model, "3:6",
                 {"mode": "upload_hf", "hf": {"repo_id": "alice/distilled", "config_name": "v1"}}, secrets)
    second = run_job(ctx, tiny_model, "6:8", {"mode": "upload_hf", "hf": {"repo_id": "alice/distilled"}}, secrets)
    for job_id in (first, v1, second):
        assert ctx.store.get(job_id).status == "completed", ctx.store.get(job_id).error

    repo = hub.repo("dataset", "alice/distilled")
    files = repo.files()
    for folder, job_id in (("data", first), ("v1", v1), ("data", second)):
        local = ctx.files(job_id)
        assert files[f"{folder}/{job_id}.jsonl"] == local.result("jsonl").read_bytes()
        assert json.loads(files[f"{folder}/{job_id}.metadata.json"])["job_id"] == job_id
        hub_meta = json.loads(local.metadata.read_text())["hub"]
        assert hub_meta["repo_id"] == "alice/distilled"
        assert hub_meta["commit"].split("/commit/")[1] in [c.oid for c in repo.commits]
    assert files[f"data/{first}.jsonl"] == first_files[f"data/{first}.jsonl"]  # untouched by the later jobs

    header, body = card_of(hub, "alice/distilled")
    assert header["configs"] == [
        {"config_name": "default", "data_files": [{"split": "train", "path": "data/*.jsonl"}]},
        {"config_name": "v1", "data_files": [{"split": "train", "path": "v1/*.jsonl"}]},
    ]
    for config, job_id in (("default", first), ("v1", v1), ("default", second)):
        assert f"| `{config}` | `{job_id}` | {tiny_model} |" in body

    default, subset = load_from_hub(hub, ALICE, [("alice/distilled", None), ("alice/distilled", "v1")], tmp_path)
    both = [*read_jsonl(ctx.files(first).result("jsonl")), *read_jsonl(ctx.files(second).result("jsonl"))]
    assert key(default) == key(both) and len(default) == 5
    assert key(subset) == key(read_jsonl(ctx.files(v1).result("jsonl"))) and len(subset) == 3


def test_a_finalize_run_twice_commits_nothing_new(finished_job, hub):
    job_id, files = finished_job
    hf = HFOutput(repo_id="alice/twice")
    first = upload_to_hub(files.result("jsonl"), files.metadata, hf, ALICE, job_id)
    commits = len(hub.repo("dataset", "alice/twice").commits)
    again = upload_to_hub(files.result("jsonl"), files.metadata, hf, ALICE, job_id)
    assert again == first
    assert len(hub.repo("dataset", "alice/twice").commits) == commits
    assert card_of(hub, "alice/twice")[1].count(f"`{job_id}`") == 1


def test_the_card_already_there_is_merged_not_replaced(finished_job, hub):
    from huggingface_hub import HfApi

    job_id, files = finished_job
    api = HfApi(endpoint=hub.url, token=ALICE)
    api.create_repo("alice/curated", repo_type="dataset")
    card = ("---\nlicense: mit\nconfigs:\n- config_name: human\n  data_files: human/*.jsonl\n---\n"
            "# Curated\n\nWritten by hand.\n")
    api.upload_file(path_or_fileobj=card.encode(), path_in_repo="README.md", repo_id="alice/curated",
                    repo_type="dataset")

    upload_to_hub(files.result("jsonl"), files.metadata, HFOutput(repo_id="alice/curated", config_name="spider"),
                  ALICE, job_id)
    header, body = card_of(hub, "alice/curated")
    assert header["license"] == "mit"
    assert header["configs"] == [
        {"config_name": "human", "data_files": "human/*.jsonl"},
        {"config_name": "spider", "data_files": [{"split": "train", "path": "spider/*.jsonl"}]},
    ]
    assert body.startswith("# Curated\n\nWritten by hand.\n")
    assert f"| `spider` | `{job_id}` |" in body


def test_a_config_reading_other_files_is_refused_before_anything_is_sent(finished_job, hub, tmp_path):
    job_id, files = finished_job
    hf = HFOutput(repo_id="alice/formats", config_name="v1")
    upload_to_hub(files.result("jsonl"), files.metadata, hf, ALICE, job_id)
    head = hub.repo("dataset", "alice/formats").head.oid
    parquet = tmp_path / "result.parquet"
    sinks.write_result(read_jsonl(files.result("jsonl")), parquet, "parquet")
    with pytest.raises(SpiderError, match=r"config 'v1' of the dataset repo alice/formats reads \['v1/\*\.jsonl'\]"):
        upload_to_hub(parquet, files.metadata, hf, ALICE, "0000000000000001")
    assert hub.repo("dataset", "alice/formats").head.oid == head


def test_a_card_whose_header_does_not_parse_is_a_clear_error(finished_job, hub):
    from huggingface_hub import HfApi

    job_id, files = finished_job
    HfApi(endpoint=hub.url, token=ALICE).create_repo("alice/broken-card", repo_type="dataset")
    repo = hub.repo("dataset", "alice/broken-card")
    hub.add_file(repo, "README.md", b"---\nconfigs: [unclosed\n---\n# Broken\n")
    head = repo.head.oid
    with pytest.raises(SpiderError, match=r"card \(README.md\) of alice/broken-card has a YAML header that does not parse"):
        upload_to_hub(files.result("jsonl"), files.metadata, HFOutput(repo_id="alice/broken-card"), ALICE, job_id)
    assert repo.head.oid == head


def test_a_repo_read_as_another_format_is_refused_before_anything_is_sent(finished_job, hub):
    """`datasets` reads all of a repo's configs with the builder of the first one's files."""
    from huggingface_hub import HfApi

    job_id, files = finished_job
    api = HfApi(endpoint=hub.url, token=ALICE)
    api.create_repo("alice/tables", repo_type="dataset")
    card = "---\nconfigs:\n- config_name: sheets\n  data_files: sheets/*.csv\n---\n# Tables\n"
    api.upload_file(path_or_fileobj=card.encode(), path_in_repo="README.md", repo_id="alice/tables",
                    repo_type="dataset")
    head = hub.repo("dataset", "alice/tables").head.oid
    with pytest.raises(SpiderError, match=r"repo alice/tables is read as csv files .*'sheets'.*jsonl files would not"):
        upload_to_hub(files.result("jsonl"), files.metadata, HFOutput(repo_id="alice/tables", config_name="gen"),
                      ALICE, job_id)
    assert hub.repo("dataset", "alice/tables").head.oid == head


def test_private_is_honoured_on_creation_and_a_public_repo_is_not_taken_for_private(finished_job, hub):
    from huggingface_hub import HfApi
    from huggingface_hub.errors import RepositoryNotFoundError

    job_id, files = finished_job
    upload_to_hub(files.result("jsonl"), files.metadata, HFOutput(repo_id="alice/secret", private=True), ALICE, job_id)
    upload_to_hub(files.result("jsonl"), files.metadata, HFOutput(repo_id="alice/open"), ALICE, job_id)
    assert hub.repo("dataset", "alice/secret").private and not hub.repo("dataset", "alice/open").private
    with pytest.raises(RepositoryNotFoundError):
        HfApi(endpoint=hub.url, token=BOB).dataset_info("alice/secret")
    assert HfApi(endpoint=hub.url, token=BOB).dataset_info("alice/open").id == "alice/open"

    head = hub.repo("dataset", "alice/open").head.oid
    with pytest.raises(SpiderError, match=r"repo alice/open exists and is public, but output.hf.private is true"):
        upload_to_hub(files.result("jsonl"), files.metadata, HFOutput(repo_id="alice/open", private=True), ALICE,
                      "0000000000000002")
    assert hub.repo("dataset", "alice/open").head.oid == head


@pytest.mark.parametrize("fmt", ["jsonl", "parquet"])
def test_shards_go_up_once_each_and_finalize_sends_only_the_rest(finished_job, hub, tmp_path, fmt):
    """upload_every: batches 1 and 0 complete, their shards go up; the same call again (a
    redelivered task) sends nothing; finalize sends shard 2, the metadata and the card, never
    the merged result. load_dataset reads the job's records from the shards."""
    job_id, files = finished_job
    repo_id = f"alice/incremental-{fmt}"
    hf = HFOutput(repo_id=repo_id, config_name="live", upload_every=2)
    shards = {i: files.shard(i) for i in range(3)}
    assert upload_shards({1: shards[1], 0: shards[0]}, fmt, hf, ALICE, job_id) == [0, 1]
    repo = hub.repo("dataset", repo_id)
    assert card_of(hub, repo_id)[0]["configs"] == [
        {"config_name": "live", "data_files": [{"split": "train", "path": f"live/*.{fmt}"}]}
    ]
    commits = len(repo.commits)
    assert upload_shards({0: shards[0], 1: shards[1]}, fmt, hf, ALICE, job_id) == []
    assert len(repo.commits) == commits

    result = tmp_path / f"result.{fmt}"
    sinks.write_result(read_jsonl(files.result("jsonl")), result, fmt)
    upload_to_hub(result, files.metadata, hf, ALICE, job_id, shards=shards)
    changed = [path for commit in repo.commits for path in commit.changed]
    for i in range(3):
        assert changed.count(f"live/{job_id}-{i:06d}.{fmt}") == 1
    assert f"live/{job_id}.{fmt}" not in repo.files()
    assert set(repo.head.changed) == {f"live/{job_id}-000002.{fmt}", f"live/{job_id}.metadata.json", "README.md"}
    if fmt == "parquet":  # a binary format goes through the Hub's LFS storage
        assert repo.head.files[f"live/{job_id}-000002.parquet"].lfs
        assert hub.requests_to(r"^/lfs-objects/[0-9a-f]{64}$", "PUT")

    (records,) = load_from_hub(hub, ALICE, [(repo_id, "live")], tmp_path)
    assert key(records) == key(read_jsonl(files.result("jsonl")))


def test_a_commit_that_loses_a_race_is_built_again_on_the_new_head(finished_job, hub):
    """Another client commits between the upload's read of the repo and its commit: the Hub
    answers 412 to the stale parent, and the upload re-reads and commits on top, keeping both."""
    job_id, files = finished_job
    hf = HFOutput(repo_id="alice/raced", upload_every=1)
    upload_shards({0: files.shard(0)}, "jsonl", hf, ALICE, job_id)
    repo = hub.repo("dataset", "alice/raced")
    raced = []

    def another_job_commits(target):
        if not raced:
            raced.append(hub.add_file(target, "data/0000000000000003-000000.jsonl", b'{"other": 1}\n'))

    hub.before_commit = another_job_commits
    assert upload_shards({0: files.shard(0), 1: files.shard(1)}, "jsonl", hf, ALICE, job_id) == [1]
    assert [r[2] for r in hub.requests_to(r"/api/datasets/alice/raced/commit/")][-2:] == [412, 200]
    assert repo.head.parent == raced[0].oid
    assert {"data/0000000000000003-000000.jsonl", f"data/{job_id}-000001.jsonl"} <= set(repo.files())
    changed = [path for commit in repo.commits for path in commit.changed]
    assert changed.count(f"data/{job_id}-000001.jsonl") == 1


def test_concurrent_shard_uploads_send_each_shard_once(finished_job, hub):
    """Two workers completing batches at once both upload: every shard still goes up once (the
    loser of the race finds the shards there; both report them on the Hub)."""
    job_id, files = finished_job
    hf = HFOutput(repo_id="alice/concurrent", upload_every=1)
    shards = {i: files.shard(i) for i in range(3)}
    sent: list[list[int]] = []
    workers = [threading.Thread(target=lambda: sent.append(upload_shards(shards, "jsonl", hf, ALICE, job_id)))
               for _ in range(2)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    assert len(sent) == 2 and {i for batch in sent for i in batch} == {0, 1, 2}
    changed = [path for commit in hub.repo("dataset", "alice/concurrent").commits for path in commit.changed]
    assert sorted(p for p in changed if p.startswith("data/")) == [f"data/{job_id}-{i:06d}.jsonl" for i in range(3)]


def test_upload_every_needs_the_shards_at_finalize(finished_job):
    job_id, files = finished_job
    with pytest.raises(ValueError, match="upload_every is set: pass the job's `shards`"):
        upload_to_hub(files.result("jsonl"), files.metadata, HFOutput(repo_id="alice/x", upload_every=2), ALICE, job_id)


def test_hf_output_checks_config_names_and_upload_every():
    assert HFOutput(repo_id="a/b", config_name="v1.2_x-y", upload_every=3).upload_every == 3
    for bad in ("../up", "a/b", "*", "", "data"):
        with pytest.raises(ValueError, match="config_name"):
            HFOutput(repo_id="a/b", config_name=bad)
    with pytest.raises(ValueError, match="upload_every"):
        HFOutput(repo_id="a/b", upload_every=0)
    with pytest.raises(ConfigError, match="output.hf.config_name"):
        JobConfig.parse({"model": {"name": "m"}, "source": {"dataset": "d"},
                         "output": {"mode": "upload_hf", "hf": {"repo_id": "a/b", "config_name": "x y"}}})


# -- adapters -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def adapter_folder(tiny_model, tmp_path_factory):
    """A real export: a LoRA on the tiny model, saved by peft, exported with tokenizer and card."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from spider.train.export import export_adapter

    torch.manual_seed(0)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(str(tiny_model)),
                           LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    root = tmp_path_factory.mktemp("adapter")
    model.save_pretrained(str(root / "saved"))
    return export_adapter(root / "saved", root / "adapter", tokenizer=str(tiny_model),
                          model_card="# tiny adapter\n\nTrained by a test.\n", base_model=str(tiny_model))


def test_an_adapter_folder_goes_to_a_model_repo_and_loads_from_it(adapter_folder, tiny_model, hub, tmp_path):
    import torch
    from huggingface_hub import snapshot_download
    from peft import PeftModel
    from transformers import AutoModelForCausalLM
    from safetensors.torch import load_file

    hf = HFOutput(repo_id="lab/tiny-adapter", repo_type="model", private=True)
    url = upload_folder_to_hub(adapter_folder, hf, ALICE, "00000000000000aa")
    repo = hub.repo("model", "lab/tiny-adapter")
    assert url == f"{hub.url}/lab/tiny-adapter/commit/{repo.head.oid}"
    assert repo.private and repo.head.title == "Spider job 00000000000000aa: trained weights"
    files = repo.files()
    local = {p.relative_to(adapter_folder).as_posix(): p.read_bytes() for p in adapter_folder.rglob("*") if p.is_file()}
    assert {"adapter_config.json", "adapter_model.safetensors", "tokenizer_config.json", "README.md"} <= set(local)
    assert {k: v for k, v in files.items() if k != ".gitattributes"} == local
    assert repo.head.files["adapter_model.safetensors"].lfs and not repo.head.files["README.md"].lfs

    downloaded = snapshot_download("lab/tiny-adapter", endpoint=hub.url, token=ALICE, local_dir=tmp_path / "download")
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(tiny_model)), downloaded)
    saved = load_file(str(adapter_folder / "adapter_model.safetensors"))
    lora = {k: v for k, v in model.state_dict().items() if "lora_" in k}
    assert len(lora) == len(saved) > 0
    for name, tensor in saved.items():
        assert torch.equal(lora[name.replace(".weight", ".default.weight")], tensor)


def test_the_wrong_repo_type_is_refused_before_anything_is_sent(adapter_folder, finished_job, hub):
    job_id, files = finished_job
    before = len(hub.requests)
    with pytest.raises(SpiderError, match=r"a trained adapter goes to a model repo, .* 'dataset' for alice/ds"):
        upload_folder_to_hub(adapter_folder, HFOutput(repo_id="alice/ds"), ALICE, job_id)
    with pytest.raises(SpiderError, match=r"records go to a dataset repo, .* 'model' for alice/m.*repo_type: dataset"):
        upload_to_hub(files.result("jsonl"), files.metadata, HFOutput(repo_id="alice/m", repo_type="model"), ALICE,
                      job_id)
    with pytest.raises(SpiderError, match="not an exported model folder"):
        upload_folder_to_hub(files.root / "shards", HFOutput(repo_id="alice/m", repo_type="model"), ALICE, job_id)
    assert len(hub.requests) == before


# -- errors ---------------------------------------------------------------------------------------


def test_no_token_is_a_clear_error(finished_job, hub):
    job_id, files = finished_job
    before = len(hub.requests)
    with pytest.raises(SpiderError, match=r"no token was sent to upload to alice/x: pass env=\('MY_HF',\)"):
        upload_to_hub(files.result("jsonl"), files.metadata, HFOutput(repo_id="alice/x", token_env="MY_HF"), None,
                      job_id)
    assert len(hub.requests) == before


def test_a_refused_token_is_a_clear_error_and_not_retried(finished_job, adapter_folder, hub):
    job_id, files = finished_job
    creates = len(hub.requests_to("/api/repos/create"))
    with pytest.raises(SpiderError, match=r"refused the token in HF_TOKEN for the dataset repo alice/x \(401"):
        upload_to_hub(files.result("jsonl"), files.metadata, HFOutput(repo_id="alice/x"), "hf_not_a_token", job_id)
    assert len(hub.requests_to("/api/repos/create")) == creates + 1

    with pytest.raises(SpiderError, match=r"token in HF_TOKEN may not write to the model repo alice/ro \(403.*'alice'"):
        upload_folder_to_hub(adapter_folder, HFOutput(repo_id="alice/ro", repo_type="model"), ALICE_READ_ONLY, job_id)
    with pytest.raises(SpiderError, match=r"may not write to the dataset repo bob/data \(403.*namespace 'bob'"):
        upload_to_hub(files.result("jsonl"), files.metadata, HFOutput(repo_id="bob/data"), ALICE, job_id)
    assert len(hub.requests_to("/api/repos/create")) == creates + 3
    assert ("model", "alice/ro") not in hub.repos and ("dataset", "bob/data") not in hub.repos


def test_transient_failures_are_retried(finished_job, hub):
    job_id, files = finished_job
    hub.fail_next(1, 502, r"^/api/repos/create$")
    hub.fail_next(2, 503, r"/api/datasets/alice/flaky/commit/")
    url = upload_to_hub(files.result("jsonl"), files.metadata, HFOutput(repo_id="alice/flaky"), ALICE, job_id)
    repo = hub.repo("dataset", "alice/flaky")
    assert [r[2] for r in hub.requests_to(r"/api/datasets/alice/flaky/commit/")] == [503, 503, 200]
    assert url.endswith(repo.head.oid) and len(repo.commits) == 2  # the Hub's first commit, and one upload
    assert repo.files()[f"data/{job_id}.jsonl"] == files.result("jsonl").read_bytes()


def test_a_hub_that_stays_down_is_retried_then_a_clear_error(finished_job, hub):
    job_id, files = finished_job
    creates = len(hub.requests_to("/api/repos/create"))
    hub.fail_next(100, 503)
    with pytest.raises(SpiderError, match=rf"the Hub at {hub.url} did not take the upload to the dataset repo "
                                          rf"alice/down after 3 tries: .*503"):
        upload_to_hub(files.result("jsonl"), files.metadata, HFOutput(repo_id="alice/down"), ALICE, job_id)
    assert len(hub.requests_to("/api/repos/create")) == creates + FAST_RETRY.tries


def test_an_unreachable_hub_is_retried_then_a_clear_error(finished_job, monkeypatch):
    job_id, files = finished_job
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{port}")
    slept = []
    monkeypatch.setattr(sinks.time, "sleep", slept.append)
    with pytest.raises(SpiderError, match=rf"Hub at http://127.0.0.1:{port} did not take the upload to the dataset "
                                          r"repo alice/gone after 3 tries: ConnectError"):
        upload_to_hub(files.result("jsonl"), files.metadata, HFOutput(repo_id="alice/gone"), ALICE, job_id)
    assert slept == [FAST_RETRY.first_wait_s, FAST_RETRY.first_wait_s * 2]


def test_offline_mode_is_a_clear_error(finished_job, monkeypatch):
    from huggingface_hub import constants

    job_id, files = finished_job
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(SpiderError, match="HF_HUB_OFFLINE is set on the server"):
        upload_to_hub(files.result("jsonl"), files.metadata, HFOutput(repo_id="alice/x"), ALICE, job_id)
