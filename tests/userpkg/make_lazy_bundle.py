"""A user's script whose functions import local modules inside their bodies, when they run:
`textutil` (which imports `constants`, and `emphasis` only inside one of its functions), `constants`
and the package `wordtools`, which nothing imports while the bundle is built. `judge` is imported
at the top and travels by value, as before. Writes the bundle to argv[1].

Run it as `python make_lazy_bundle.py OUT` from this directory, like make_bundle.py.
"""

import sys

from spider.bundle import build_bundle, tool_spec
from textutil import judge


def pre_processor(row):
    import textutil

    return {"prompt": textutil.format_prompt(row["question"])}


def post_processor(record):
    from constants import PREFIX

    if not judge(record["completion"], 2).keep:
        return None
    return {**record, "question": record["prompt"].removeprefix(PREFIX)}


def headline(text: str) -> str:
    """Turn a question into a headline."""
    import textutil

    return textutil.headline(text)


def count(text: str) -> dict:
    """Count the words of a text."""
    from wordtools import count_words

    return count_words(text)


if __name__ == "__main__":
    tools = [(headline, tool_spec(headline)), (count, tool_spec(count))]
    bundle = build_bundle(pre_processor=pre_processor, post_processor=post_processor, tools=tools)
    with open(sys.argv[1], "wb") as out:
        out.write(bundle)
