"""The teacher's side of on-policy distillation: each student completion is rendered in the
teacher's own chat template, scored by the teacher's engine, and its log-probs are brought back
onto the student's tokens.

    teacher = Teacher(engine, teacher_tokenizer, student_tokenizer)
    scores = teacher.score([TeacherItem(conversation, completion_ids, tools), ...])   # one Engine.score call
    scores[k].logprobs   # one teacher log-prob per student completion token
    scores[k].mask       # True where that value is exact (its alignment group matched)
    scores[k].report     # spider.align.AlignmentReport of the completion
    scores[k].error      # why this completion could not be scored (the others still are)

When the student and the teacher tokenize and template alike (same vocabulary, same pipeline,
same chat template), the teacher scores the student's own prompt rendering and token ids: no
re-tokenization, no projection. For a completion in the tokenizer's canonical tokenization this
gives exactly the numbers of the aligned path; for a non-canonical one (a sampler may spell a word
in pieces) it gives the teacher's log-prob of each token the student actually sampled, which the
aligned path can only give per group.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Mapping, Sequence

import numpy as np

from spider.align import AlignmentReport, align_tokens, byte_vocab, teacher_inputs_for_completion
from spider.chat import ConversationLike, Renderer, TemplateError
from spider.engines.base import Engine, ScoreRequest, ScoreResult
from spider.errors import AlignmentError, EngineError

if TYPE_CHECKING:
    from spider.config import ModelConfig


@dataclass
class TeacherItem:
    """One assistant turn to score: the conversation it answered (system / user / assistant / tool
    messages) and the token ids the student sampled for it (its stop token included)."""

    conversation: ConversationLike
    completion_ids: list[int]
    tools: list[dict[str, Any]] | None = None


@dataclass
class TeacherScore:
    """The teacher's view of one student completion, per student completion token.

    `logprobs[i]` is the teacher's log-prob of student token i (within an alignment group, the
    group's log-prob spread evenly); `mask[i]` says whether it is exact. On an `error` the arrays
    keep the completion's length, NaN and all False, so nothing of it is trained on."""

    logprobs: np.ndarray
    mask: np.ndarray
    report: AlignmentReport | None = None
    error: str | None = None
    teacher_tokens: int = 0  # the teacher's completion tokens that were scored

    @classmethod
    def failed(cls, length: int, error: str) -> "TeacherScore":
        return cls(np.full(length, np.nan), np.zeros(length, dtype=bool), error=error)


@dataclass
class _Planned:
    """What one item sends to the engine, and how its answer comes back to the student's tokens."""

    input_ids: list[int]
    completion_start: int
    project: Any  # teacher completion log-probs -> per student token
    mask: np.ndarray
    report: AlignmentReport


class Teacher:
    """Scores student completions with `engine` (any `Engine` that implements `score`), rendering
    with `tokenizer`, the teacher's own (fast) tokenizer and chat template.

    `chat_template_kwargs` go to the teacher's template (e.g. `enable_thinking`); `check_template`
    also reports whether the teacher's template would keep each completion unchanged as an
    assistant turn; `identity` False turns the identical-tokenizer fast path off."""

    def __init__(
        self,
        engine: Engine,
        tokenizer: Any,
        student_tokenizer: Any,
        *,
        chat_template_kwargs: Mapping[str, Any] | None = None,
        check_template: bool = True,
        identity: bool = True,
    ):
        self.engine = engine
        self.tokenizer = tokenizer
        self.student_tokenizer = student_tokenizer
        self.chat_template_kwargs = dict(chat_template_kwargs or {})
        self.check_template = check_template
        self.renderer = Renderer(tokenizer, chat_template_kwargs=self.chat_template_kwargs)
        self.identical = identity and same_tokenization(student_tokenizer, tokenizer)

    @classmethod
    def for_model(
        cls, model: "ModelConfig", engine: Engine, student_tokenizer: Any, secrets: Mapping[str, str] | None = None, **kwargs: Any
    ) -> "Teacher":
        """The teacher of a job: `engine` scores, and the tokenizer is the engine's own when it
        holds one (hf, vllm), else the one of `model` (its vLLM `tokenizer` parameter or its name),
        loaded from a local folder the operator allows or the model cache (never the hub)."""
        tokenizer = getattr(engine, "tokenizer", None)
        if tokenizer is None:
            tokenizer = teacher_tokenizer(model, secrets)
        return cls(engine, tokenizer, student_tokenizer, **kwargs)

    def score(self, items: Sequence[TeacherItem]) -> list[TeacherScore]:
        """The teacher's log-probs of every item's completion, in one `Engine.score` call. An item
        that cannot be rendered, aligned or scored gets its error; the others are unaffected."""
        scores: list[TeacherScore | None] = [None] * len(items)
        plans: dict[int, _Planned] = {}
        for k, item in enumerate(items):
            if not item.completion_ids:
                scores[k] = TeacherScore(np.zeros(0), np.zeros(0, dtype=bool), AlignmentReport())
                continue
            try:
                plans[k] = self._plan(item)
            except (AlignmentError, TemplateError) as exc:
                scores[k] = TeacherScore.failed(len(item.completion_ids), str(exc))
        requests = [ScoreRequest(key=str(k), token_ids=plan.input_ids) for k, plan in plans.items()]
        results = self.engine.score(requests) if requests else []
        if len(results) != len(requests):
            raise EngineError(f"the teacher engine answered {len(results)} of {len(requests)} score requests")
        for (k, plan), result in zip(plans.items(), results):
            scores[k] = _scored(plan, result, len(items[k].completion_ids))
        return scores  # type: ignore[return-value]

    def _plan(self, item: TeacherItem) -> _Planned:
        if self.identical:
            ids = byte_vocab(self.student_tokenizer).check_ids(item.completion_ids, "student completion").tolist()
            prompt = self.renderer.render(item.conversation, item.tools)
            alignment = align_tokens(self.student_tokenizer, ids, self.tokenizer, ids, continuation=True)
            return _Planned(prompt.ids + ids, len(prompt.ids), np.asarray, alignment.student_mask,
                            AlignmentReport.of(alignment))
        inputs = teacher_inputs_for_completion(
            item.conversation,
            item.completion_ids,
            self.student_tokenizer,
            self.tokenizer,
            tools=item.tools,
            chat_template_kwargs=self.chat_template_kwargs,
            check_template=self.check_template,
        )
        return _Planned(inputs.input_ids, inputs.completion_start, inputs.project_logprobs, inputs.student_mask,
                        inputs.report)


def _scored(plan: _Planned, result: ScoreResult, length: int) -> TeacherScore:
    if result.error is not None:
        return TeacherScore.failed(length, f"the teacher could not score this completion: {result.error}")
    if len(result.logprobs) != len(plan.input_ids):
        return TeacherScore.failed(
            length, f"the teacher returned {len(result.logprobs)} log-probs for {len(plan.input_ids)} tokens"
        )
    completion = result.logprobs[plan.completion_start :]
    if any(value is None for value in completion):
        return TeacherScore.failed(length, "the teacher returned no log-prob for some completion tokens")
    values = np.asarray(plan.project(np.asarray(completion, dtype=np.float64)), dtype=np.float64)
    return TeacherScore(values, np.asarray(plan.mask, dtype=bool), plan.report, teacher_tokens=len(completion))


def same_tokenization(a: Any, b: Any) -> bool:
    """Whether two tokenizers turn every conversation into the same ids: the same tokenization
    pipeline (normalizer, pre-tokenizer, vocabulary, merges, added and special tokens, decoder),
    the same chat template and the same BOS rule."""
    if a is b:
        return True
    pipelines = [_pipeline(t) for t in (a, b)]
    if pipelines[0] is None or pipelines[0] != pipelines[1]:
        return False
    ra, rb = Renderer(a), Renderer(b)
    return (ra.chat_template, ra.adds_bos, ra.bos_id, getattr(a, "eos_token_id", None)) == (
        rb.chat_template, rb.adds_bos, rb.bos_id, getattr(b, "eos_token_id", None)
    )


def _pipeline(tokenizer: Any) -> dict[str, Any] | None:
    """A fast tokenizer's definition, less its padding and truncation settings (which encode nothing)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return None
    spec = json.loads(backend.to_str())
    spec.pop("padding", None)
    spec.pop("truncation", None)
    return spec


def teacher_tokenizer(model: "ModelConfig", secrets: Mapping[str, str] | None = None) -> Any:
    """The tokenizer of a teacher whose engine holds none (openai, tinker, or one scored on other workers)."""
    from transformers import AutoTokenizer

    from spider.models import ModelAccess, resolve_model

    name = model.parameters.get("tokenizer") or model.name
    path = resolve_model(str(name), token=(secrets or {}).get("HF_TOKEN"), access=ModelAccess.from_env())
    return AutoTokenizer.from_pretrained(str(path))
