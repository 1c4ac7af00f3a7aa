"""A student's completion, re-rendered for a teacher with a different tokenizer and chat template.

`render_prompt(tokenizer, conversation, tools=None) -> RenderedPrompt`
    The model's own chat template with the generation prompt, as text and ids (at most one BOS).

`teacher_inputs_for_completion(conversation, student_completion_ids, student_tokenizer,
teacher_tokenizer, tools=None) -> TeacherInputs`
    The teacher's prompt ids (its own template around the same conversation) followed by the
    student's completion re-tokenized by the teacher, with the student's control tokens mapped by
    role (the student's EOS / end-of-turn becomes the teacher's own end-of-turn token). The result
    carries the alignment and `project_logprobs`, which brings teacher log-probs back onto the
    student's completion tokens, and an `AlignmentReport`.

The teacher scores the completion as a continuation of its generation prompt, exactly where it
would have generated it itself, so the student's text reaches it unchanged even when the
teacher's template would rewrite an assistant turn (strip it, add a space); the report says
whether it would.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np

from spider.align.core import Alignment, TokenSide, align_sides
from spider.align.report import AlignmentReport, SpecialMapping
from spider.align.vocab import ByteVocab, Role, byte_vocab, encode_continuation
from spider.chat import ConversationLike, RenderedPrompt, Renderer, TemplateError, messages_of
from spider.errors import AlignmentError

@dataclass(frozen=True)
class TeacherInputs:
    """What the teacher scores for one student completion, and how to bring the scores back.

    `input_ids = prompt.ids + completion_ids`; the teacher's log-prob of `input_ids[k]` given
    `input_ids[:k]` for `k >= completion_start` is what `project_logprobs` needs.
    """

    prompt: RenderedPrompt
    completion_ids: list[int]
    student_text: str
    alignment: Alignment
    report: AlignmentReport

    @property
    def input_ids(self) -> list[int]:
        return self.prompt.ids + self.completion_ids

    @property
    def completion_start(self) -> int:
        return len(self.prompt.ids)

    @property
    def student_mask(self) -> np.ndarray:
        """Per student completion token: True where the projected teacher log-prob is exact."""
        return self.alignment.student_mask

    def project_logprobs(self, teacher_logprobs: Sequence[float | None] | np.ndarray) -> np.ndarray:
        """Teacher log-probs -> one per student completion token (see `Alignment.project`).

        Accepts either one value per teacher input token (vLLM's `prompt_logprobs` shape, whose
        first entry is None) or one per teacher completion token.
        """
        values = np.array([np.nan if v is None else v for v in teacher_logprobs], dtype=np.float64)
        n_input, n_completion = len(self.prompt.ids) + len(self.completion_ids), len(self.completion_ids)
        if values.size == n_input:
            values = values[self.completion_start :]
        elif values.size != n_completion:
            raise AlignmentError(
                f"expected teacher log-probs for all {n_input} teacher input tokens or for the "
                f"{n_completion} completion tokens, got {values.size}"
            )
        return self.alignment.project(values)


def render_prompt(
    tokenizer: Any,
    conversation: ConversationLike,
    *,
    tools: Sequence[Mapping[str, Any]] | None = None,
    chat_template_kwargs: Mapping[str, Any] | None = None,
) -> RenderedPrompt:
    """The conversation in `tokenizer`'s chat template, with the generation prompt: the shared
    `spider.chat.Renderer`, so it is exactly what an engine samples from (one BOS rule)."""
    try:
        return _renderer(tokenizer, chat_template_kwargs).render(conversation, tools)
    except TemplateError as exc:
        raise AlignmentError(f"tokenizer {byte_vocab(tokenizer).name!r}: {exc}") from None


def _renderer(tokenizer: Any, chat_template_kwargs: Mapping[str, Any] | None) -> Renderer:
    return Renderer(tokenizer, chat_template_kwargs=chat_template_kwargs)


def _map_control(student: ByteVocab, student_id: int, teacher: ByteVocab) -> SpecialMapping:
    role = student.role_of(student_id)
    teacher_id: int | None = None
    if role == Role.END:
        teacher_id = teacher.end_of_turn_id
    elif role == Role.BOS:
        teacher_id = teacher.bos_id
    if teacher_id is None:  # no role counterpart: the teacher's control token with the same text, if any
        content = student.contents.get(student_id)
        teacher_id = next((i for i, c in teacher.contents.items() if c == content), None)
    return SpecialMapping(
        role=role.name.lower(),
        student_id=student_id,
        student_token=student.contents.get(student_id, ""),
        teacher_id=teacher_id,
        teacher_token=None if teacher_id is None else teacher.contents.get(teacher_id),
    )


def teacher_inputs_for_completion(
    conversation: ConversationLike,
    student_completion_ids: Sequence[int] | np.ndarray,
    student_tokenizer: Any,
    teacher_tokenizer: Any,
    *,
    tools: Sequence[Mapping[str, Any]] | None = None,
    chat_template_kwargs: Mapping[str, Any] | None = None,
    check_template: bool = True,
) -> TeacherInputs:
    """The teacher's view of a student completion, and the mapping back to the student's tokens.

    `conversation` is the prompt (system / user / assistant / tool messages) the student answered,
    `student_completion_ids` the tokens it sampled (its end token included if it stopped there),
    `tools` the JSON schemas both templates render. Text runs of the completion are re-tokenized
    by the teacher as continuations of its prompt; control tokens are mapped by role: EOS /
    end-of-turn -> the teacher's end-of-turn token, BOS -> the teacher's BOS; a token with no role
    counterpart -> the teacher's control token with the same literal text, else it is dropped
    (counted as unmapped, noted in the report).

    `check_template` also renders the whole conversation, completion included, with the teacher's
    template, and reports whether the template keeps the completion text unchanged.
    """
    student, teacher = byte_vocab(student_tokenizer), byte_vocab(teacher_tokenizer)
    s_ids = student.check_ids(student_completion_ids, "student completion")
    prompt = render_prompt(teacher_tokenizer, conversation, tools=tools, chat_template_kwargs=chat_template_kwargs)

    # Text between the control tokens the teacher keeps is re-tokenized as one run: a dropped
    # control token does not split the teacher's tokenization of the text around it.
    completion_ids: list[int] = []
    specials: list[SpecialMapping] = []
    text_runs: list[bytes] = []
    pending: list[bytes] = []

    def flush() -> None:
        run = b"".join(pending)
        if run:
            completion_ids.extend(encode_continuation(teacher_tokenizer, run.decode("utf-8", "replace")))
        pending.clear()

    start = 0
    controls = np.flatnonzero(student.roles[s_ids] != Role.TEXT).tolist()
    for stop in controls + [s_ids.size]:
        if stop > start:
            run = student.text_bytes(s_ids[start:stop], at_start=False)
            text_runs.append(run)
            pending.append(run)
        if stop < s_ids.size:
            mapping = _map_control(student, int(s_ids[stop]), teacher)
            specials.append(mapping)
            if mapping.teacher_id is not None:
                flush()
                completion_ids.append(mapping.teacher_id)
        start = stop + 1
    flush()

    student_bytes = b"".join(text_runs)
    student_side = TokenSide(student, s_ids, student.lengths_of(s_ids, at_start=False), student_bytes)
    teacher_side = TokenSide.of(teacher_tokenizer, completion_ids, "teacher", at_start=False)
    alignment = align_sides(student_side, teacher_side)

    student_text = student_bytes.decode("utf-8", "replace")
    notes: list[str] = []
    try:
        student_bytes.decode("utf-8")
    except UnicodeDecodeError as exc:
        notes.append(
            f"student completion is not valid UTF-8 at byte {exc.start} (a character cut between "
            "sampled byte tokens): the teacher scores U+FFFD there"
        )
    for m in specials:
        if m.teacher_id is None:
            notes.append(f"student {m.role} token {m.student_token!r} has no teacher counterpart; dropped")
    keeps = None
    if check_template:
        keeps = _template_keeps(teacher_tokenizer, conversation, student_text, prompt.text, tools, chat_template_kwargs)
    report = AlignmentReport.of(alignment, specials=specials, template_keeps_completion=keeps, notes=notes)
    return TeacherInputs(prompt=prompt, completion_ids=completion_ids, student_text=student_text,
                         alignment=alignment, report=report)


def _template_keeps(
    tokenizer: Any,
    conversation: ConversationLike,
    completion: str,
    prompt_text: str,
    tools: Sequence[Mapping[str, Any]] | None,
    kwargs: Mapping[str, Any] | None,
) -> bool:
    """Whether the template, rendering the completion as the assistant turn, keeps its text unchanged."""
    messages = messages_of(conversation) + [{"role": "assistant", "content": completion}]
    try:
        full = _renderer(tokenizer, kwargs).render_text(messages, tools, add_generation_prompt=False)
    except Exception:  # a template that refuses this turn order does not keep the completion
        return False
    shared = len(os.path.commonprefix([prompt_text, full]))
    return completion in full[shared:]
