"""Hub output against the real Hugging Face Hub, with the write token in HF_TOKEN (skipped
without it): a dataset job's records as configs of one private dataset repo, read back by
`load_dataset`; an adapter folder in a private model repo, downloaded back; a refused token.
Uploads take the Hub's own storage path (Xet, when hf_xet is installed). The repos are
created under the token's user with a random name and deleted afterwards."""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path

import pytest
import yaml

from spider.config import HFOutput
from spider.data.sinks import upload_folder_to_hub, upload_shards, upload_to_hub, write_result
from spider.errors import SpiderError
from tests.fake_hub import load_dataset_in_subprocess

TOKEN = os.environ.get("HF_TOKEN", "")
ENDPOINT = "https://huggingface.co"
pytestmark = pytest.mark.skipif(not TOKEN, reason="HF_TOKEN is not set: the live Hub tests need a write token")


@pytest.fixture(scope="module")
def api():
    """The real Hub, online although the test session sets HF_HUB_OFFLINE."""
    from huggingface_hub import HfApi, constants

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(constants, "HF_HUB_OFFLINE", False)
        mp.setenv("HF_ENDPOINT", ENDPOINT)
        yield HfApi(endpoint=ENDPOINT, token=TOKEN)


@pytest.fixture
def repo_name(api):
    """A fresh repo id under the token's user; every repo of that id is deleted afterwards."""
    name = f"{api.whoami()['name']}/spider-live-{uuid.uuid4().hex[:10]}"
    yield name
    for repo_type in ("dataset", "model"):
        api.delete_repo(name, repo_type=repo_type, missing_ok=True)


def records(job_id: str, count: int) -> list[dict]:
    return [
        {"id": f"{job_id}-{i}-0", "row_index": i, "sample_index": 0, "prompt": f"question {i}",
         "messages": [{"role": "user", "content": f"question {i}"}, {"role": "assistant", "content": f"answer {i}"}],
         "completion": f"answer {i}", "finish_reason": "stop",
         "usage": {"prompt_tokens": 3, "completion_tokens": 2}, "source": {"question": f"question {i}"}, "error": None}
        for i in range(count)
    ]


def job_files(folder: Path, job_id: str, rows: list[dict], fmt: str = "jsonl") -> tuple[Path, Path]:
    result = folder / job_id / f"result.{fmt}"
    write_result(rows, result, fmt)
    metadata = folder / job_id / "metadata.json"
    metadata.write_text(json.dumps({"job_id": job_id, "counts": {"records": len(rows)},
                                    "config": {"model": {"name": "live-test"}, "source": {"dataset": "handmade"}}}))
    return result, metadata


def key(rows) -> list[tuple]:
    return sorted((r["id"], r["row_index"], r["completion"]) for r in rows)


def test_dataset_configs_in_a_private_repo_load_back(api, repo_name, tmp_path):
    plain, subset, sharded = "1111111111111111", "2222222222222222", "3333333333333333"
    result, metadata = job_files(tmp_path, plain, records(plain, 4))
    upload_to_hub(result, metadata, HFOutput(repo_id=repo_name, private=True), TOKEN, plain)
    result, metadata = job_files(tmp_path, subset, records(subset, 3))
    url = upload_to_hub(result, metadata, HFOutput(repo_id=repo_name, private=True, config_name="v1"), TOKEN, subset)
    assert url.startswith(f"{ENDPOINT}/datasets/{repo_name}/commit/")

    rows = records(sharded, 5)
    shards = {i: tmp_path / sharded / f"{i:06d}.jsonl" for i in range(3)}
    for i, chunk in enumerate((rows[:2], rows[2:4], rows[4:])):
        write_result(chunk, shards[i], "jsonl")
    hf = HFOutput(repo_id=repo_name, private=True, config_name="parts", upload_every=2)
    assert upload_shards({0: shards[0], 1: shards[1]}, "jsonl", hf, TOKEN, sharded) == [0, 1]
    assert upload_shards({0: shards[0], 1: shards[1]}, "jsonl", hf, TOKEN, sharded) == []
    result, metadata = job_files(tmp_path, sharded, rows)
    upload_to_hub(result, metadata, hf, TOKEN, sharded, shards=shards)

    info = api.dataset_info(repo_name)
    assert info.private
    files = {s.rfilename for s in info.siblings}
    assert {f"data/{plain}.jsonl", f"v1/{subset}.jsonl", f"parts/{sharded}-000002.jsonl"} <= files
    assert f"parts/{sharded}.jsonl" not in files
    card = api.hf_hub_download(repo_name, "README.md", repo_type="dataset", local_dir=tmp_path / "card")
    header = yaml.safe_load(Path(card).read_text().split("---\n")[1])
    assert [c["config_name"] for c in header["configs"]] == ["default", "v1", "parts"]

    loaded = load_dataset_in_subprocess(ENDPOINT, TOKEN, [(repo_name, None), (repo_name, "v1"), (repo_name, "parts")],
                                        tmp_path / "hf-home", xet=True)
    assert [key(rows_) for rows_ in loaded] == [key(records(plain, 4)), key(records(subset, 3)), key(rows)]


@pytest.fixture
def adapter_folder(tiny_model, tmp_path):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from spider.train.export import export_adapter

    torch.manual_seed(0)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(str(tiny_model)),
                           LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    model.save_pretrained(str(tmp_path / "saved"))
    return export_adapter(tmp_path / "saved", tmp_path / "adapter", tokenizer=str(tiny_model),
                          model_card="# tiny adapter\n\nUploaded by Spider's live test.\n")


def test_an_adapter_folder_in_a_private_model_repo_downloads_back(api, repo_name, adapter_folder, tmp_path):
    from huggingface_hub import snapshot_download

    url = upload_folder_to_hub(adapter_folder, HFOutput(repo_id=repo_name, repo_type="model", private=True), TOKEN,
                               "4444444444444444")
    assert url.startswith(f"{ENDPOINT}/{repo_name}/commit/")
    assert api.model_info(repo_name).private
    downloaded = Path(snapshot_download(repo_name, token=TOKEN, endpoint=ENDPOINT, local_dir=tmp_path / "download"))
    for path in adapter_folder.rglob("*"):
        if path.is_file():
            assert (downloaded / path.relative_to(adapter_folder)).read_bytes() == path.read_bytes()


def test_a_refused_token_is_a_clear_error(api, tmp_path):
    result, metadata = job_files(tmp_path, "5555555555555555", records("5555555555555555", 1))
    with pytest.raises(SpiderError, match=r"refused the token in HF_TOKEN for the dataset repo .*\(401"):
        upload_to_hub(result, metadata, HFOutput(repo_id="spider-live/never-created"), "hf_" + "x" * 34,
                      "5555555555555555")

