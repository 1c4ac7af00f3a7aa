"""Helpers of the fake user project, imported by its script: they must travel by value."""

import re
from dataclasses import dataclass

from constants import BANNED_WORDS, PREFIX


def normalize(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip()


def format_prompt(text: str) -> str:
    return PREFIX + normalize(text).capitalize()


@dataclass
class Verdict:
    keep: bool
    reason: str


def judge(completion: str, min_words: int) -> Verdict:
    words = completion.lower().split()
    if any(word in BANNED_WORDS for word in words):
        return Verdict(False, "banned word")
    if len(words) < min_words:
        return Verdict(False, "too short")
    return Verdict(True, "ok")


def headline(text: str) -> str:
    """The prompt for `text`, emphasized: `emphasis` is imported only when this runs."""
    from emphasis import emphasize

    return emphasize(format_prompt(text))
