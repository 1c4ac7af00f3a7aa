"""A package of the fake user project that its script imports only inside a tool, when it runs."""

from .counting import count_words

__all__ = ["count_words"]
