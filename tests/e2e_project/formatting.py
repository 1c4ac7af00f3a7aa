"""A user's helper module: it exists only on the client, so it must travel inside the bundle."""

import os

STYLE = "Answer in one short sentence"


def format_question(question: str) -> str:
    return f"{STYLE}: {question.strip()}"


def keep(record: dict) -> bool:
    return record["row_index"] % 2 == 0


def visible_env() -> dict:
    names = ("SECRET_A", "SECRET_B", "SPIDER_API_KEYS", "SPIDER_REDIS_URL", "PUBLIC_SETTING")
    return {name: os.environ.get(name) for name in names}
