"""On-policy distillation across tokenizers, offline, on a CPU: a tiny random student learns from
SmolLM2-135M-Instruct, which scores every token the student samples in its own tokenization.
Prints the held-out teacher KL curve and unpacks the trained model, its metrics and their plot."""

from __future__ import annotations

import sys
import tarfile
from pathlib import Path

from spider.client import SpiderClient
from spider.config import AppConfig

ROOT = Path(__file__).resolve().parent.parent


def main() -> int:
    config = AppConfig.load(ROOT / "configs" / "on_policy.yaml")
    with SpiderClient(config=config) as client:
        job_id = client.submit_job()["job_id"]
        status = client.poll_job(job_id, interval=1.0)
        if status["status"] != "completed":
            print(f"job {job_id} {status['status']}: {status.get('error')}", file=sys.stderr)
            return 1
        steps = client.training_metrics(job_id)
        archive = client.download_result(job_id, ROOT / "artifacts" / f"{job_id}.tar.gz")
    for step in steps:
        if step.get("eval_teacher_kl") is not None:
            print(f"step {step['step']:3d}: held-out teacher KL {step['eval_teacher_kl']:.3f} nats/token", file=sys.stderr)
    out = archive.with_name(job_id)
    with tarfile.open(archive) as tar:
        tar.extractall(out, filter="data")
    print(out)  # adapter/ (the trained model and its card), metrics.jsonl, metrics.png
    return 0


if __name__ == "__main__":
    sys.exit(main())
