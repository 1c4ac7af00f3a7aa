"""A user's script: processors and tools that use helpers from other local files, a lambda, a
closure, functools.partial and a dataclass defined here. Writes the bundle to argv[1].

Run it as `python make_bundle.py OUT`: the helpers are importable only because this directory is
the script's directory, so a bundle that works elsewhere proves they travelled by value.
"""

import functools
import sys
from dataclasses import dataclass

from spider.bundle import build_bundle, tool_spec
from textutil import format_prompt, judge


@dataclass
class Unit:
    name: str
    factor: float


UNITS = {"km": Unit("kilometre", 1000.0), "cm": Unit("centimetre", 0.01)}


def make_scaler(offset):
    def scale(value):
        return value + offset

    return scale


shift = make_scaler(0.5)


def pre_processor(row, tag="default"):
    if not row.get("question"):
        return None
    return {"prompt": format_prompt(row["question"]), "tag": tag}


def post_processor(record, min_words=2):
    verdict = judge(record["completion"], min_words)
    if not verdict.keep:
        return None
    return {**record, "reason": verdict.reason, "words": len(record["completion"].split())}


def convert(value: float, unit: str, precision: int = 2) -> str:
    """Convert a length to metres.

    Args:
        value: the length in `unit`
        unit: one of km, cm
        precision: digits after the decimal point
    """
    return f"{shift(value * UNITS[unit].factor) - 0.5:.{precision}f} m ({UNITS[unit].name})"


def power(base: int, exponent: int) -> int:
    return base**exponent


square = functools.partial(power, exponent=2)
shout = lambda text: text.upper() + "!"  # noqa: E731


if __name__ == "__main__":
    tools = [
        (convert, tool_spec(convert)),
        (square, tool_spec(square, name="square", description="Square a number")),
        (shout, tool_spec(shout, name="shout", description="Shout", json_schema={
            "type": "object", "properties": {"text": {"type": "string"}}, "required": ["text"]})),
    ]
    bundle = build_bundle(pre_processor=pre_processor, post_processor=post_processor, tools=tools)
    with open(sys.argv[1], "wb") as out:
        out.write(bundle)
