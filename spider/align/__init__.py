"""Cross-tokenizer alignment: exact teacher log-probs on student tokens.

The core contract::

    alignment = align_tokens(student_tokenizer, student_ids, teacher_tokenizer, teacher_ids,
                             continuation=False) -> Alignment
    alignment.groups              # [(s_start, s_end, t_start, t_end)], half-open, in order
    alignment.project(values)     # per teacher token -> per student token (group sums kept:
                                  # each group's total spread evenly over its student tokens)
    alignment.student_mask        # per student token: its group's bytes agree on both sides

For the on-policy trainer::

    render_prompt(tokenizer, conversation, tools=None, chat_template_kwargs=None) -> RenderedPrompt
    teacher_inputs_for_completion(conversation, student_completion_ids, student_tokenizer,
                                  teacher_tokenizer, tools=None, chat_template_kwargs=None,
                                  check_template=True) -> TeacherInputs
        .input_ids, .completion_start        # what the teacher scores (prompt_logprobs)
        .project_logprobs(teacher_logprobs)  # -> np.ndarray, one per student completion token
        .student_mask, .alignment, .report   # report: AlignmentReport
    AlignmentReport.merge(reports) / .to_metrics() / .summary()
    check_tokenizer_pair(student_tokenizer, teacher_tokenizer, probes=DEFAULT_PROBES,
                         min_aligned_fraction=0.99) -> AlignmentReport   # raises AlignmentError

Helpers: `encode_continuation(tokenizer, text)` tokenizes text as the middle of a sequence;
`byte_vocab(tokenizer)` is the cached byte table every alignment reads spans from.
"""

from spider.align.chat import RenderedPrompt, TeacherInputs, render_prompt, teacher_inputs_for_completion
from spider.align.core import Alignment, align_tokens
from spider.align.probe import DEFAULT_PROBES, check_tokenizer_pair
from spider.align.report import AlignmentReport, SpecialMapping
from spider.align.vocab import ByteVocab, Role, byte_vocab, encode_continuation

__all__ = [
    "Alignment",
    "AlignmentReport",
    "ByteVocab",
    "DEFAULT_PROBES",
    "RenderedPrompt",
    "Role",
    "SpecialMapping",
    "TeacherInputs",
    "align_tokens",
    "byte_vocab",
    "check_tokenizer_pair",
    "encode_continuation",
    "render_prompt",
    "teacher_inputs_for_completion",
]
