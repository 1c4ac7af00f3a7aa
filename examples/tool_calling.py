"""A tool-calling dataset with your own tools: the functions below travel with the job and run in
the sandbox; the model calls them, sees their answers and replies. Offline, on a CPU."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from spider.client import SpiderClient
from spider.config import AppConfig

ROOT = Path(__file__).resolve().parent.parent

CAPITALS = {"france": "Paris", "japan": "Tokyo", "italy": "Rome", "germany": "Berlin", "spain": "Madrid"}


def lookup_capital(country: str) -> str:
    """The capital city of a country.

    Args:
        country: The country's name in English, e.g. France.
    """
    capital = CAPITALS.get(country.strip().lower())
    return json.dumps({"country": country, "capital": capital} if capital else {"error": f"unknown country {country!r}"})


def calculator(expression: str) -> str:
    """Evaluate an arithmetic expression with + - * / and parentheses.

    Args:
        expression: The expression, e.g. (2 + 3) * 4.
    """
    if not set(expression) <= set("0123456789+-*/(). "):
        return "error: only digits, + - * / and parentheses"
    return str(eval(expression, {"__builtins__": {}}))  # the characters are checked above


def main() -> int:
    config = AppConfig.load(ROOT / "configs" / "tool_calling.yaml")
    with SpiderClient(config=config) as client:
        client.add_tool(lookup_capital)
        client.add_tool(calculator)
        job_id = client.submit_job()["job_id"]
        status = client.poll_job(job_id, interval=1.0)
        if status["status"] != "completed":
            print(f"job {job_id} {status['status']}: {status.get('error')}", file=sys.stderr)
            return 1
        path = client.download_result(job_id, ROOT / "artifacts" / "tool_calling.jsonl")
    for line in path.read_text().split("\n"):
        if line:
            record = json.loads(line)
            print(record["stop_reason"], [m["role"] for m in record["messages"]], file=sys.stderr)
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
