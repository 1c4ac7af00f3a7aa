"""The client side of Spider: `SpiderClient`, user-code bundling and the `spider` CLI."""

from spider.client.client import SpiderClient

__all__ = ["SpiderClient"]
