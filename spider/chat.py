"""One model's chat template, rendered one way for every part of Spider.

Engines sample from the ids a `Renderer` gives, and the aligner scores teacher tokens on ids from
the same renderer: the ids a student was sampled on and the ids it is trained and scored on can
never differ (a template rendered one way for sampling and another for scoring biases every
token's log-probability). The one BOS rule: the rendered text is tokenized without extra special
tokens (templates write their own BOS), and a tokenizer that prepends BOS to every encoding gets
it when the template did not write it, never twice.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Sequence

from spider.errors import SpiderError
from spider.types import Message

ConversationLike = Sequence[Message | Mapping[str, Any]]


class TemplateError(SpiderError, ValueError):
    """A conversation that a model's chat template cannot render (or a model without a template)."""


@dataclass(frozen=True)
class RenderedPrompt:
    """A conversation in one model's chat template, ready to generate (or score) from."""

    text: str
    ids: list[int]


def messages_of(conversation: ConversationLike) -> list[dict[str, Any]]:
    """The chat-template (OpenAI) shape of each message."""
    return [m.to_openai() if isinstance(m, Message) else dict(m) for m in conversation]


class Renderer:
    """Renders conversations (and tools) with one tokenizer's chat template.

    `chat_template` overrides the tokenizer's own (vLLM may hold a template the tokenizer lacks);
    `chat_template_kwargs` go to every rendering (e.g. `enable_thinking`)."""

    def __init__(
        self,
        tokenizer: Any,
        chat_template: str | None = None,
        chat_template_kwargs: Mapping[str, Any] | None = None,
        name: str | None = None,
    ):
        self.tokenizer = tokenizer
        self._chat_template = chat_template
        self.kwargs = dict(chat_template_kwargs or {})
        self.name = name or getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
        self.bos_id: int | None = _int_or_none(getattr(tokenizer, "bos_token_id", None))
        self.adds_bos = self.bos_id is not None and _adds_bos(tokenizer, self.bos_id)
        self._end_of_turn: int | None | bool = False  # False: not computed yet
        self._prefix_preserving: bool | None = None

    @property
    def chat_template(self) -> str | None:
        return self._chat_template or getattr(self.tokenizer, "chat_template", None)

    @property
    def has_template(self) -> bool:
        return bool(self.chat_template)

    def check(self) -> None:
        """Raise TemplateError when the model has no chat template: Spider's requests are conversations."""
        if not self.has_template:
            raise TemplateError(
                f"model {self.name!r} has no chat template; use an instruct/chat model, or give its tokenizer "
                "a chat_template"
            )

    def render_text(
        self, conversation: ConversationLike, tools: Sequence[Mapping[str, Any]] | None = None, add_generation_prompt: bool = True
    ) -> str:
        self.check()
        text = self.tokenizer.apply_chat_template(
            messages_of(conversation),
            tools=list(tools) if tools else None,
            chat_template=self.chat_template,
            add_generation_prompt=add_generation_prompt,
            tokenize=False,
            **self.kwargs,
        )
        if not isinstance(text, str):
            raise TemplateError("apply_chat_template(tokenize=False) did not return text")
        return text

    def encode(self, text: str) -> list[int]:
        """Ids of rendered text, with the one BOS rule."""
        ids = list(self.tokenizer(text, add_special_tokens=False)["input_ids"])
        if self.adds_bos and (not ids or ids[0] != self.bos_id):
            ids.insert(0, self.bos_id)  # type: ignore[arg-type]
        return ids

    def render(
        self, conversation: ConversationLike, tools: Sequence[Mapping[str, Any]] | None = None, add_generation_prompt: bool = True
    ) -> RenderedPrompt:
        """The conversation as text and ids; with `add_generation_prompt`, ready for the assistant's turn."""
        if not conversation:
            raise TemplateError("the conversation has no messages")
        text = self.render_text(conversation, tools, add_generation_prompt)
        ids = self.encode(text)
        if not ids:
            raise TemplateError("the chat template rendered an empty prompt")
        return RenderedPrompt(text=text, ids=ids)

    @property
    def end_of_turn_id(self) -> int | None:
        """The control token the template closes an assistant turn with (e.g. `<|im_end|>`), if any."""
        if self._end_of_turn is False:
            self._end_of_turn = _template_end_of_turn(self)
        return self._end_of_turn  # type: ignore[return-value]

    @property
    def stop_token_ids(self) -> list[int]:
        """Where generation ends: the end-of-turn token and the tokenizer's EOS."""
        eos = _int_or_none(getattr(self.tokenizer, "eos_token_id", None))
        return list(dict.fromkeys(i for i in (self.end_of_turn_id, eos) if i is not None))

    def is_prefix_preserving(self) -> bool:
        """Whether a conversation's tokens can be extended by appending: the prompt of turn k, the
        assistant's answer, and then the next turn render as one growing text (the prompt of turn
        k + answer is a prefix of the prompt of turn k+1, in text and in ids). Templates that rewrite
        earlier turns (dropping the reasoning of past assistant messages, moving tool lists) are not."""
        if self._prefix_preserving is None:
            first = [{"role": "system", "content": "S"}, {"role": "user", "content": "U1"}]
            answer = "A1 answer"
            second = first + [{"role": "assistant", "content": answer}, {"role": "user", "content": "U2"}]
            try:
                before = self.render_text(first)
                after = self.render_text(second)
            except Exception:  # a template that cannot render the probe cannot promise anything
                self._prefix_preserving = False
            else:
                before_ids = self.encode(before)
                self._prefix_preserving = (
                    after.startswith(before + answer) and self.encode(after)[: len(before_ids)] == before_ids
                )
        return self._prefix_preserving


def _int_or_none(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _adds_bos(tokenizer: Any, bos_id: int) -> bool:
    """Whether plain encoding with special tokens prepends BOS."""
    try:
        probe = tokenizer("a", add_special_tokens=True)["input_ids"]
    except Exception:
        return False
    return bool(probe) and probe[0] == bos_id


def _template_end_of_turn(renderer: Renderer) -> int | None:
    """The first special token the template writes right after an assistant message."""
    if not renderer.has_template:
        return None
    sentinel = "SpiderSentinelReply"
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": sentinel}]
    try:
        text = renderer.render_text(messages, add_generation_prompt=False)
    except Exception:  # a template that cannot render a plain exchange has no end-of-turn to learn
        return None
    if sentinel not in text:
        return None
    tail = text[text.rindex(sentinel) + len(sentinel) :]
    special = set(getattr(renderer.tokenizer, "all_special_ids", []) or [])
    special |= {i for i, t in (getattr(renderer.tokenizer, "added_tokens_decoder", {}) or {}).items() if getattr(t, "special", False)}
    for token_id in renderer.tokenizer(tail, add_special_tokens=False)["input_ids"]:
        if token_id in special:
            return int(token_id)
    return None
