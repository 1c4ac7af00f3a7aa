"""Emphasis for the fake user project: imported only inside a function of textutil, when it runs,
so it is never in sys.modules when the bundle is built."""

from constants import PREFIX


def emphasize(prompt: str) -> str:
    return f"*** {prompt.removeprefix(PREFIX).upper()} ***"
