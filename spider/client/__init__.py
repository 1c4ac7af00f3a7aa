"""The client side of Spider: `SpiderClient`, which submits jobs (with the user's code, bundled by
spider.bundle), follows their progress and fetches their results."""

from spider.client.client import SpiderClient

__all__ = ["SpiderClient"]
