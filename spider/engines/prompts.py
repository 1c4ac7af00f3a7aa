"""Turning a conversation into prompt token ids with the model's own chat template.

The in-process engines (vLLM, transformers) render prompts here, so both see the same ids for the
same conversation and a request whose template fails is an error for that request alone.
"""

from __future__ import annotations

from typing import Any

from spider.errors import EngineError
from spider.types import Message


def check_chat_template(tokenizer: Any, model_name: str, chat_template: str | None = None) -> None:
    """Refuse a model that has no chat template: Spider's requests are conversations."""
    if chat_template is None and not getattr(tokenizer, "chat_template", None):
        raise EngineError(
            f"model {model_name!r} has no chat template; use an instruct/chat model, or give one in "
            "model.parameters.chat_template (vllm)"
        )


def render_prompt(
    tokenizer: Any,
    messages: list[Message],
    tools: list[dict[str, Any]] | None = None,
    chat_template: str | None = None,
) -> list[int]:
    """Prompt ids for `messages` followed by the assistant's turn header.

    The template is rendered to text and tokenized without extra special tokens, as
    `apply_chat_template(tokenize=True)` does: templates write their own BOS where the model wants one.
    """
    if not messages:
        raise ValueError("the request has no messages")
    text = tokenizer.apply_chat_template(
        [m.to_openai() for m in messages],
        tools=tools or None,
        chat_template=chat_template,
        add_generation_prompt=True,
        tokenize=False,
    )
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if not ids:
        raise ValueError("the chat template rendered an empty prompt")
    return list(ids)
