"""A user's script run from its own folder: processors and a tool that use `formatting.py`.

Usage: python job_script.py URL API_KEY MODEL_DIR OUT_JSON MODE
MODE `dataset`: a job with a pre- and post-processor, waited for and downloaded.
MODE `tool`: a job with a tool, not submitted: writes the job's config and its bundle (as the
client builds it from this folder), so that a test can store the job itself and call its tool
through the sandbox queue.
"""

import base64
import json
import sys

from formatting import format_question, keep, visible_env

from spider.client import SpiderClient
from spider.bundle import build_bundle
from spider.config import AppConfig

url, api_key, model, out, mode = sys.argv[1:6]


def pre(row, suffix="?"):
    if row["category"] != "factual":
        return None  # dropped
    if "Italy" in row["question"]:
        raise ValueError("this row is refused by the user's code")
    return format_question(row["question"].rstrip("?") + suffix)


def post(record, tag="kept"):
    if not keep(record):
        return None
    return {**record, "tag": tag, "env": visible_env()}


def lookup_capital(country: str) -> str:
    """Look up the capital of a country.

    Args:
        country: the country's English name.
    """
    capitals = {"France": "Paris", "Japan": "Tokyo"}
    return capitals.get(country, "unknown") + " " + str(visible_env())


config = AppConfig.parse(
    {
        "server": {"base_url": url, "api_key": api_key},
        "job": {
            "model": {"provider": "hf", "name": model},
            "source": {"dataset": "../../examples/data/prompts.jsonl",
                       "split": "train[0:24]" if mode == "dataset" else "train", "field": "question"},
            "generation": {"parameters": {"temperature": 0.0, "max_tokens": 12 if mode == "dataset" else 64},
                           "max_batch_size": 4 if mode == "dataset" else 1,
                           "duplications": 1 if mode == "dataset" else 8},
            "runtime": {"env": {"PUBLIC_SETTING": "on"}},
            "processors": {"pre_kwargs": {"suffix": "?!"}, "post_kwargs": {"tag": "checked"}},
        },
    }
)
secret = {"dataset": {"SECRET_A": "alpha-secret"}, "tool": {"SECRET_B": "beta-secret"}}[mode]
with SpiderClient(config=config, env=secret, pre_processor=pre if mode == "dataset" else None,
                  post_processor=post if mode == "dataset" else None) as client:
    if mode == "tool":
        spec = client.add_tool(lookup_capital)
        bundle = build_bundle(tools=[(lookup_capital, spec)])
        answer = {"job": config.job.model_dump(mode="json"), "bundle": base64.b64encode(bundle).decode()}
        json.dump(answer, open(out + ".job.json", "w"))
        sys.exit(0)
    job_id = client.submit_job()["job_id"]
    status = client.poll_job(job_id, on_event=lambda e: None)
    if status["status"] != "completed":
        sys.exit(f"job {job_id} {status['status']}: {status['error']}")
    client.download_result(job_id, out)
    json.dump({"job_id": job_id}, open(out + ".job.json", "w"))
