"""A simulated user: another model that plays the human side of a conversation.

It sees the conversation from the user's side: its own system prompt, the policy's answers as
the messages it received, its own earlier messages as its answers (tool traffic is the policy's
business and stays out of its view). Saying the stop phrase ends the conversation.
"""

from __future__ import annotations

from dataclasses import dataclass

from spider.engines.base import Engine, GenerationRequest, SamplingParams
from spider.types import Message

DEFAULT_PROMPT = (
    "You are a user talking to an AI assistant. Reply as the user would: ask a natural follow-up "
    "question, or say what you still need. Write only the user's next message."
)


@dataclass
class SimulatedUser:
    """`engine` plays the user (any provider); `max_turns` user messages after the first one."""

    engine: Engine
    params: SamplingParams
    prompt: str = DEFAULT_PROMPT
    max_turns: int = 1
    stop_phrase: str | None = None

    def view(self, conversation: list[Message]) -> list[Message]:
        """The conversation as the user model sees it: roles flipped, its own system prompt."""
        flipped = [Message("system", self.prompt)]
        for message in conversation:
            if message.role == "user":
                flipped.append(Message("assistant", message.content))
            elif message.role == "assistant" and message.content.strip():
                flipped.append(Message("user", message.content))
        return flipped

    async def reply(self, conversation: list[Message], key: str, seed: int | None) -> tuple[str | None, str]:
        """(the user's next message, or None when the user is done; why it stopped, if it did)."""
        request = GenerationRequest(key=f"{key}:user", messages=self.view(conversation), seed=seed)
        result = await self.engine.sample(request, self.params)
        if result.error is not None or not result.completions:
            return None, f"user_error: {result.error or 'no completion'}"
        text = result.completions[0].text.strip()
        if self.stop_phrase and self.stop_phrase in text:
            return None, "user_stop_phrase"
        if not text:
            return None, "user_empty"
        return text, ""
