"""Spider: a distributed engine for LLM knowledge distillation.

The public surface is `spider.client.SpiderClient`, `spider.config.AppConfig`, the `spider` CLI,
the HTTP API and `spider.align`.
"""

__version__ = "0.1.0"
