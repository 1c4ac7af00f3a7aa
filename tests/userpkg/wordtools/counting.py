"""Word counts (a submodule, reached from its package by a relative import)."""

STOPWORDS = {"a", "an", "is", "of", "the"}


def count_words(text: str) -> dict:
    words = text.lower().split()
    return {"words": len(words), "content_words": sum(word not in STOPWORDS for word in words)}
