"""A pre-flight check of a student/teacher tokenizer pair on texts that break weaker aligners.

`check_tokenizer_pair(student_tokenizer, teacher_tokenizer, min_aligned_fraction=0.99) -> AlignmentReport`
runs every probe through `teacher_inputs_for_completion` (as a completion the student ended with
its own end-of-turn token) and raises AlignmentError with the report when the pair aligns below
the threshold or the student's end token has no teacher counterpart. A trainer calls it before
its first step and refuses to start on failure.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

from spider.align.chat import ConversationLike, teacher_inputs_for_completion
from spider.align.report import AlignmentReport
from spider.align.vocab import byte_vocab, encode_continuation
from spider.errors import AlignmentError
from spider.types import Message

DEFAULT_PROBES: tuple[str, ...] = (
    "The capital of France is Paris. It has about 2.1 million inhabitants.",
    "Sure! Here's a short list:\n\n1. Apples\n2. Pears\n3. Plums\n",
    "def mean(xs: list[float]) -> float:\n    \"\"\"Average.\"\"\"\n    return sum(xs) / len(xs)  # O(n)\n",
    "{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Zürich\", \"unit\": \"°C\"}}",
    "Café, naïve, façade, Ångström, Straße, Ελληνικά, русский язык.",
    "中文、日本語のテキスト、한국어 문장도 섞여 있습니다。",
    "שלום עולם — مرحبا بالعالم — mixed RTL and LTR text.",
    # Combining marks without a precomposed form, so NFC-normalizing teachers (Qwen) keep them.
    "Emoji: 🦀🐍 👩‍💻 🇫🇷 ✅ and combining marks: q\u0301 j\u0308 z\u0330 ก\u0e49.",
    "Whitespace:  two spaces,\tone tab,\n\n\nthree newlines,   \t mixed  \r\n done.",
    "Math: ∑_{i=1}^{n} x_i² ≤ ∞; λ → 0; 3 × 4 = 12; π ≈ 3.14159.",
    "    indented line\n        deeper line\n\ttabbed line\n",
    "Special-looking text: <|im_end|> </s> [INST] <tool_call> stays text.",
)

PROBE_CONVERSATION: tuple[Message, ...] = (
    Message(role="system", content="You are a helpful assistant."),
    Message(role="user", content="Write whatever comes next."),
)


def check_tokenizer_pair(
    student_tokenizer: Any,
    teacher_tokenizer: Any,
    *,
    probes: Sequence[str] = DEFAULT_PROBES,
    conversation: ConversationLike = PROBE_CONVERSATION,
    tools: Sequence[Mapping[str, Any]] | None = None,
    min_aligned_fraction: float = 0.99,
) -> AlignmentReport:
    """Align every probe text between the two tokenizers; the merged report, or AlignmentError.

    Fails when the aligned fraction of bytes or of tokens is below `min_aligned_fraction`, or when a
    control token the student ends with cannot be mapped onto the teacher.
    """
    if not 0.0 <= min_aligned_fraction <= 1.0:
        raise AlignmentError(f"min_aligned_fraction must be within [0, 1], got {min_aligned_fraction}")
    if not probes:
        raise AlignmentError("check_tokenizer_pair needs at least one probe text")
    end_id = byte_vocab(student_tokenizer).end_of_turn_id
    reports = []
    for text in probes:
        ids = encode_continuation(student_tokenizer, text) + ([end_id] if end_id is not None else [])
        inputs = teacher_inputs_for_completion(conversation, ids, student_tokenizer, teacher_tokenizer, tools=tools)
        reports.append(inputs.report)
    report = AlignmentReport.merge(reports)
    worst = min(report.aligned_byte_fraction, report.aligned_token_fraction)
    if worst < min_aligned_fraction or report.specials_unmapped:
        raise AlignmentError(
            f"tokenizer pair {byte_vocab(student_tokenizer).name!r} -> {byte_vocab(teacher_tokenizer).name!r} "
            f"fails the alignment check (required {min_aligned_fraction:.2%} aligned): {report.summary()}. "
            "Use a teacher whose tokenizer can spell every byte of the student's text (byte-level BPE or "
            "SentencePiece with byte fallback), or lower the threshold knowingly."
        )
    return report
