"""An instruction dataset with prompt variations: a pre-processor (run in the sandbox) rewrites each
source row's question into one of several instruction styles. Offline, on a CPU."""

from __future__ import annotations

import random
import sys
from pathlib import Path

from spider.client import SpiderClient
from spider.config import AppConfig

ROOT = Path(__file__).resolve().parent.parent


def vary_prompt(row: dict, styles: list[str]) -> str:
    """One instruction style per row, chosen by the row's id so reruns give the same prompts."""
    style = random.Random(row["id"]).choice(styles)
    return style.format(q=row["question"])


def keep_answered(record: dict) -> dict | None:
    return record if record["completion"] and record["completion"].strip() else None


def main() -> int:
    config = AppConfig.load(ROOT / "configs" / "prompt_variations.yaml")
    with SpiderClient(config=config, pre_processor=vary_prompt, post_processor=keep_answered) as client:
        job_id = client.submit_job()["job_id"]
        status = client.poll_job(job_id, interval=1.0)
        if status["status"] != "completed":
            print(f"job {job_id} {status['status']}: {status.get('error')}", file=sys.stderr)
            return 1
        path = client.download_result(job_id, ROOT / "artifacts" / "prompt_variations.jsonl")
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
