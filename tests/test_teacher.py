"""The teacher scores student completions in its own template: with the student's tokenizer the
fast path gives the aligned path's numbers exactly; with another tokenizer the per-student-token
log-probs add up to the teacher's log-prob of the completion text; errors stay on their completion.

Real models throughout: the tiny random Llama (student, and teacher of the identical-tokenizer
case) and SmolLM2-135M-Instruct (teacher of the cross-tokenizer case), scored by the hf engine."""

from __future__ import annotations

import numpy as np
import pytest
from transformers import AutoTokenizer

from spider.align import encode_continuation
from spider.config import ModelConfig
from spider.engines.base import Engine, GenerationRequest, SamplingParams, ScoreRequest
from spider.engines.hf_engine import HFEngine
from spider.models import SMOLLM2_135M_INSTRUCT, resolve_model
from spider.testing import TINY_CONTEXT
from spider.train.teacher import Teacher, TeacherItem, same_tokenization
from spider.types import Message, ToolCall

ENGINE = {"device": "cpu", "dtype": "float32"}
WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "weather",
        "description": "The weather in a city.",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}


@pytest.fixture(scope="module")
def tiny_engine(tiny_model):
    engine = HFEngine(str(tiny_model), ENGINE)
    yield engine
    engine.close()


@pytest.fixture(scope="module")
def student_tokenizer(tiny_model):
    """The student's own copy of the tiny tokenizer: equal to the teacher's, not the same object."""
    return AutoTokenizer.from_pretrained(str(tiny_model))


@pytest.fixture(scope="module")
def smollm2_engine():
    engine = HFEngine(str(resolve_model(SMOLLM2_135M_INSTRUCT)), ENGINE)
    yield engine
    engine.close()


class CountingEngine(Engine):
    """A real engine, with every `score` call it gets recorded (how many requests each)."""

    def __init__(self, engine: Engine):
        self.inner = engine
        self.calls: list[int] = []

    def generate(self, requests, params):
        return self.inner.generate(requests, params)

    def score(self, requests):
        self.calls.append(len(requests))
        return self.inner.score(requests)


def end_of_turn(tokenizer) -> int:
    return tokenizer.convert_tokens_to_ids("<|im_end|>")


def canonical(tokenizer, text: str, stop: bool = True) -> list[int]:
    """The student's tokens of `text` as its tokenizer would write them, with the end-of-turn token."""
    return encode_continuation(tokenizer, text) + ([end_of_turn(tokenizer)] if stop else [])


def conversations() -> list[tuple[list, list | None, str, bool]]:
    """(conversation, tools, completion text, stopped) cases: a plain question, a system prompt,
    a tool result the model answers (Message objects), and an answer cut by the length limit."""
    call = ToolCall(id="call_1", name="weather", arguments={"city": "Paris"})
    return [
        ([{"role": "user", "content": "Say hello to the world."}], None, "Hello world, how are you today?", True),
        ([{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Two plus two?"}], None,
         "Four.", True),
        ([Message("user", "Weather in Paris?"), Message("assistant", "", tool_calls=[call]),
          Message("tool", "sunny, 21 C", tool_call_id="call_1", name="weather")], [WEATHER_TOOL],
         "It is sunny and 21 degrees in Paris.", True),
        ([{"role": "user", "content": "Count to five."}], None, "one two three", False),
    ]


def items_for(tokenizer) -> list[TeacherItem]:
    return [TeacherItem(conv, canonical(tokenizer, text, stop), tools) for conv, tools, text, stop in conversations()]


def test_identical_tokenizers_are_recognised_and_others_are_not(tiny_engine, student_tokenizer, smollm2_engine):
    assert Teacher(tiny_engine, tiny_engine.tokenizer, student_tokenizer).identical
    assert not Teacher(smollm2_engine, smollm2_engine.tokenizer, student_tokenizer).identical
    assert not Teacher(tiny_engine, tiny_engine.tokenizer, student_tokenizer, identity=False).identical
    # Same vocabulary, another chat template: the prompts differ, so the fast path does not apply.
    retemplated = AutoTokenizer.from_pretrained(tiny_engine.name)
    retemplated.chat_template = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    assert not same_tokenization(student_tokenizer, retemplated)
    assert same_tokenization(student_tokenizer, tiny_engine.tokenizer)


def test_the_identity_path_equals_the_aligned_path_exactly(tiny_engine, student_tokenizer):
    items = items_for(student_tokenizer)
    fast_engine, aligned_engine = CountingEngine(tiny_engine), CountingEngine(tiny_engine)
    fast = Teacher(fast_engine, tiny_engine.tokenizer, student_tokenizer).score(items)
    aligned = Teacher(aligned_engine, tiny_engine.tokenizer, student_tokenizer, identity=False).score(items)
    assert fast_engine.calls == aligned_engine.calls == [len(items)]  # one score call for the whole batch
    for item, a, b in zip(items, fast, aligned):
        assert a.error is None and b.error is None, (a.error, b.error)
        assert len(a.logprobs) == len(item.completion_ids)
        assert np.array_equal(a.logprobs, b.logprobs)  # the same numbers, bit for bit
        assert np.array_equal(a.mask, b.mask) and a.mask.all()
        assert a.report.group_sizes == b.report.group_sizes == {"1:1": len(item.completion_ids)}
        assert np.all(a.logprobs < 0)


def test_the_identity_path_scores_the_tokens_the_student_sampled(tiny_engine, student_tokenizer):
    """A word spelled in pieces: the fast path scores exactly those pieces; the aligned path, which
    re-tokenizes the text, can only give their group's log-prob spread over them."""
    text = " world"
    pieces = [i for ch in text for i in encode_continuation(student_tokenizer, ch)]
    assert pieces != encode_continuation(student_tokenizer, text)  # not the canonical tokenization
    conversation = [{"role": "user", "content": "Say hello to the world."}]
    item = TeacherItem(conversation, pieces + [end_of_turn(student_tokenizer)])
    fast = Teacher(tiny_engine, tiny_engine.tokenizer, student_tokenizer).score([item])[0]
    aligned = Teacher(tiny_engine, tiny_engine.tokenizer, student_tokenizer, identity=False).score([item])[0]

    prompt = tiny_engine.renderer.render(conversation).ids
    direct = tiny_engine.score([ScoreRequest("direct", prompt + item.completion_ids)])[0].logprobs
    assert fast.logprobs.tolist() == direct[len(prompt):]
    assert not np.allclose(fast.logprobs, aligned.logprobs)
    assert len(aligned.logprobs) == len(item.completion_ids) and aligned.mask.all()


def reference_logprobs(engine: HFEngine, cases: list[tuple[list, str]]) -> list[float]:
    """The teacher's own log-prob of each text as the assistant turn of its conversation (closed by
    its end-of-turn token), from one tokenization of the whole rendered string; one score call."""
    requests, starts = [], []
    for k, (conversation, text) in enumerate(cases):
        prompt = engine.renderer.render(conversation)
        ids = engine.renderer.encode(prompt.text + text + "<|im_end|>")
        assert ids[: len(prompt.ids)] == prompt.ids
        requests.append(ScoreRequest(str(k), ids))
        starts.append(len(prompt.ids))
    return [float(sum(r.logprobs[start:])) for r, start in zip(engine.score(requests), starts)]


def test_a_different_teacher_scores_in_its_own_template_and_keeps_the_sum(smollm2_engine, student_tokenizer):
    items = items_for(student_tokenizer)[:3]  # the completions that end with the student's end-of-turn
    counting = CountingEngine(smollm2_engine)
    teacher = Teacher.for_model(ModelConfig(provider="hf", name=SMOLLM2_135M_INSTRUCT), counting, student_tokenizer)
    assert teacher.tokenizer is not student_tokenizer and not teacher.identical
    scores = teacher.score(items)
    assert counting.calls == [len(items)]
    references = reference_logprobs(smollm2_engine, [(conv, text) for conv, _, text, _ in conversations()[:3]])
    for item, score, reference in zip(items, scores, references):
        assert score.error is None, score.error
        assert len(score.logprobs) == len(score.mask) == len(item.completion_ids)
        assert score.mask.all(), score.report.summary()
        assert score.report.completions == 1 and score.report.round_trip_ok
        # The student's <|im_end|> is scored as the teacher's own end-of-turn token.
        assert [(m.student_token, m.teacher_token) for m in score.report.specials_mapped] == [("<|im_end|>", "<|im_end|>")]
        assert score.logprobs.sum() == pytest.approx(reference, abs=1e-3)
    # The student's and the teacher's tokenizations differ: some groups are not one to one.
    shapes = {shape for s in scores for shape in s.report.group_sizes}
    assert shapes != {"1:1"}


def clean_prefix(tokenizer, ids: list[int]) -> list[int]:
    """The longest prefix of sampled ids that spells whole UTF-8 text with no control token (a
    random model's samples often end inside a character)."""
    special = set(tokenizer.all_special_ids)
    for k in range(len(ids), 0, -1):
        text = tokenizer.decode(ids[:k], clean_up_tokenization_spaces=False)
        if "\ufffd" not in text and not special & set(ids[:k]):
            return ids[:k]
    return []


def test_a_sampled_student_completion_is_scored_by_a_different_teacher(tiny_engine, smollm2_engine, student_tokenizer):
    conversation = [Message("user", "Tell me about the sea.")]
    request = GenerationRequest("sea", conversation, n=4, seed=11)
    completions = tiny_engine.generate([request], SamplingParams(max_tokens=24))[0].completions
    sampled = [clean_prefix(student_tokenizer, c.token_ids) for c in completions]
    sampled = [ids for ids in sampled if len(ids) >= 5]
    assert sampled, "no sample has five whole-text tokens"
    teacher = Teacher(smollm2_engine, smollm2_engine.tokenizer, student_tokenizer)
    scores = teacher.score([TeacherItem(conversation, ids) for ids in sampled])
    # The teacher's log-prob of each sampled text, continuing its own prompt, in its own tokens.
    prompt = smollm2_engine.renderer.render(conversation).ids
    texts = [student_tokenizer.decode(ids, clean_up_tokenization_spaces=False) for ids in sampled]
    teacher_ids = [encode_continuation(smollm2_engine.tokenizer, text) for text in texts]
    direct = smollm2_engine.score([ScoreRequest(str(k), prompt + t) for k, t in enumerate(teacher_ids)])
    for ids, t_ids, score, reference in zip(sampled, teacher_ids, scores, direct):
        assert score.error is None, score.error
        assert len(score.logprobs) == len(ids) and score.mask.all(), score.report.summary()
        assert score.report.completions == 1 and score.report.student_tokens == len(ids)
        assert score.teacher_tokens == len(t_ids)
        assert score.logprobs.sum() == pytest.approx(sum(reference.logprobs[len(prompt):]), abs=1e-3)


def test_a_completion_that_cannot_be_scored_fails_alone(tiny_engine, student_tokenizer):
    good = items_for(student_tokenizer)[0]
    out_of_vocab = TeacherItem(good.conversation, [5, 10**6, 7])
    too_long = TeacherItem(good.conversation, canonical(student_tokenizer, "word " * TINY_CONTEXT))
    empty = TeacherItem(good.conversation, [])
    counting = CountingEngine(tiny_engine)
    teacher = Teacher(counting, tiny_engine.tokenizer, student_tokenizer)
    scores = teacher.score([out_of_vocab, good, too_long, empty])
    assert counting.calls == [2]  # the good one and the long one went to the engine, together

    assert "outside" in scores[0].error or "vocab" in scores[0].error, scores[0].error
    assert "context" in scores[2].error, scores[2].error
    for item, score in ((out_of_vocab, scores[0]), (too_long, scores[2])):
        assert len(score.logprobs) == len(item.completion_ids) and not score.mask.any()
    assert scores[3].error is None and len(scores[3].logprobs) == 0

    alone = teacher.score([good])[0]
    assert scores[1].error is None
    assert np.array_equal(scores[1].logprobs, alone.logprobs)


def test_a_teacher_scored_elsewhere_loads_its_tokenizer_from_the_model(tiny_model, tiny_engine, student_tokenizer):
    """An engine without a tokenizer (a teacher on other workers, an endpoint): the tokenizer comes
    from the model's own folder, inside the directories the operator allows."""
    remote = CountingEngine(tiny_engine)
    assert not hasattr(remote, "tokenizer")
    teacher = Teacher.for_model(ModelConfig(provider="hf", name=str(tiny_model)), remote, student_tokenizer)
    assert teacher.identical
    score = teacher.score(items_for(student_tokenizer)[:1])[0]
    assert score.error is None and score.mask.all()
