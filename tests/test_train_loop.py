"""The on-policy step's data plumbing on real tokenizers and templates: which tokens train, with
which advantages; multi-turn conversations as one sequence or per turn; the data order."""

from __future__ import annotations

import numpy as np
import pytest

from spider.chat import Renderer
from spider.rollouts.conversation import TurnInfo, Trajectory
from spider.train.loop import (
    Assembled,
    Prompt,
    ScoredTurn,
    TrainData,
    assemble,
    assistant_turns,
    substeps,
)
from spider.train.teacher import TeacherScore
from spider.types import Message, ToolCall


@pytest.fixture(scope="module")
def renderer(tmp_path_factory):
    from transformers import AutoTokenizer

    from spider.testing import build_tiny_tokenizer

    path = tmp_path_factory.mktemp("tok")
    build_tiny_tokenizer(path)
    return Renderer(AutoTokenizer.from_pretrained(str(path)))


def scored(prompt_ids, token_ids, student, teacher, mask=None):
    mask = np.ones(len(token_ids), dtype=bool) if mask is None else np.asarray(mask, dtype=bool)
    score = TeacherScore(np.asarray(teacher, dtype=float), mask)
    return ScoredTurn(list(prompt_ids), list(token_ids), np.asarray(student, dtype=float), score)


def test_only_sampled_tokens_carry_advantages_and_logprobs(renderer):
    prompt = renderer.render([Message("user", "What is the capital of France?")]).ids
    answer = renderer.encode("Paris.") + [renderer.end_of_turn_id]
    student = [-1.0, -2.0, -0.5][: len(answer)] + [-0.1] * (len(answer) - 3)
    teacher = [-1.5, -0.5, -0.5][: len(answer)] + [-0.2] * (len(answer) - 3)
    out = assemble([[[scored(prompt, answer, student, teacher)]]], kl_penalty_coef=2.0, kl_discount_factor=0.0)
    (datum,) = out.data
    assert datum.model_input == (prompt + answer)[:-1] and datum.target_tokens == (prompt + answer)[1:]
    start = len(prompt) - 1  # target index of the first sampled token
    assert datum.advantages[:start] == [0.0] * start and datum.logprobs[:start] == [0.0] * start
    expected = [-2.0 * (s - t) for s, t in zip(student, teacher)]
    assert datum.advantages[start:] == pytest.approx(expected)
    assert datum.logprobs[start:] == pytest.approx(student)
    assert out.teacher_kl == pytest.approx(np.mean(np.subtract(student, teacher)))
    assert out.sampled_tokens == out.trained_tokens == len(answer)


def test_tokens_without_an_exact_teacher_value_get_the_completions_worst(renderer):
    """A token the aligner could not match exactly is never free (with no advantage it would be
    where every other token's negative advantage pushes probability) nor judged on text it did
    not write: it counts as the completion's worst exactly scored token."""
    prompt = renderer.render([Message("user", "hi")]).ids
    answer = renderer.encode("a small cat")[:3]
    out = assemble([[[scored(prompt, answer, [-1.0] * 3, [-2.0, -0.5, -5.0], [True, False, True])]]], 1.0, 0.0)
    start = len(prompt) - 1
    assert out.data[0].advantages[start : start + 3] == pytest.approx([-1.0, -4.0, -4.0])
    assert out.unaligned_tokens == 1 and out.unscored_tokens == 1
    assert out.kl_tokens == 3 and out.aligned_kl_tokens == 2
    assert out.teacher_kl == pytest.approx((1 + 4 + 4) / 3) and out.aligned_teacher_kl == pytest.approx(2.5)
    out = assemble([[[scored(prompt, answer, [-1.0] * 3, [-2.0, float("nan"), -5.0], [True, True, True])]]], 1.0, 0.0)
    assert out.unscored_tokens == 1 and out.data[0].advantages[start + 1] == pytest.approx(-4.0)


def test_discount_spreads_later_kl_back_within_the_answer(renderer):
    prompt = renderer.render([Message("user", "hi")]).ids
    answer = renderer.encode("the answer today")[:3]
    out = assemble([[[scored(prompt, answer, [-1.0, -1.0, -1.0], [-1.0, -1.0, -2.0])]]], 1.0, 0.5)
    start = len(prompt) - 1
    # per token: 0, 0, -1; discounted from the end: -0.25, -0.5, -1
    assert out.data[0].advantages[start:] == pytest.approx([-0.25, -0.5, -1.0])


def two_turns(renderer, second_prompt_extends=True):
    first_prompt = renderer.render([Message("user", "hi")]).ids
    first_answer = renderer.encode("hello there") + [renderer.end_of_turn_id]
    messages = [Message("user", "hi"), Message("assistant", "hello there"), Message("user", "and then?")]
    second_prompt = renderer.render(messages).ids
    if not second_prompt_extends:
        second_prompt = renderer.encode("something else entirely") + second_prompt[5:]
    second_answer = renderer.encode("we go home") + [renderer.end_of_turn_id]
    return first_prompt, first_answer, second_prompt, second_answer


def test_prefix_preserving_turns_train_as_one_sequence_with_the_user_turn_masked(renderer):
    p1, a1, p2, a2 = two_turns(renderer)
    assert p2[: len(p1) + len(a1)] == p1 + a1, "ChatML keeps earlier turns' tokens"
    turns = [scored(p1, a1, [-1.0] * len(a1), [-2.0] * len(a1)), scored(p2, a2, [-1.0] * len(a2), [-3.0] * len(a2))]
    out = assemble([[turns]], 1.0, 0.0)
    assert len(out.data) == 1 and out.separate_turns == 0
    adv = np.asarray(out.data[0].advantages)
    first = slice(len(p1) - 1, len(p1) - 1 + len(a1))
    second = slice(len(p2) - 1, len(p2) - 1 + len(a2))
    assert np.allclose(adv[first], -1.0) and np.allclose(adv[second], -2.0)
    between = np.ones(len(adv), dtype=bool)
    between[first] = between[second] = False
    assert np.all(adv[between] == 0.0)  # the prompt, the template tokens and the user's second turn
    assert out.trained_tokens == len(a1) + len(a2)


def test_turns_whose_prompt_does_not_extend_the_last_train_separately_and_are_reported(renderer):
    p1, a1, p2, a2 = two_turns(renderer, second_prompt_extends=False)
    turns = [scored(p1, a1, [-1.0] * len(a1), [-2.0] * len(a1)), scored(p2, a2, [-1.0] * len(a2), [-3.0] * len(a2))]
    out = assemble([[turns]], 1.0, 0.0)
    assert len(out.data) == 2 and out.separate_turns == 1
    assert out.data[0].model_input == (p1 + a1)[:-1] and out.data[1].model_input == (p2 + a2)[:-1]


def test_a_failed_teacher_score_drops_that_turn_only(renderer):
    p1, a1, _, _ = two_turns(renderer)
    good = scored(p1, a1, [-1.0] * len(a1), [-2.0] * len(a1))
    bad = scored(p1, a1, [-1.0] * len(a1), [0.0] * len(a1))
    bad.teacher.error = "the teacher's context is full"
    out = assemble([[[good], [bad]]], 1.0, 0.0)
    assert len(out.data) == 1 and out.score_errors == 1 and out.groups == [0]


def test_assistant_turns_pair_each_sampled_turn_with_the_conversation_before_it():
    call = ToolCall(id="c1", name="lookup", arguments={"q": "x"})
    messages = [
        Message("user", "look it up"),
        Message("assistant", "", tool_calls=[call]),
        Message("tool", "42", tool_call_id="c1", name="lookup"),
        Message("assistant", "It is 42."),
    ]
    turns = [TurnInfo(0, "stop", 5, 3, 0.1, 1, [1, 2, 3], [-0.1] * 3, [9, 9]),
             TurnInfo(1, "stop", 9, 2, 0.1, 0, [4, 5], [-0.2] * 2, [9, 9, 1, 2, 3, 7])]
    pairs = assistant_turns(Trajectory(messages, turns), tools=[{"name": "lookup"}])
    assert [len(item.conversation) for item, _ in pairs] == [1, 3]
    assert pairs[1][0].conversation[-1].role == "tool" and pairs[1][0].completion_ids == [4, 5]
    assert pairs[0][0].tools == [{"name": "lookup"}]


def test_substeps_split_whole_groups():
    from spider.train.backend import Datum

    data = [Datum([1, 2], [2, 3]) for _ in range(6)]
    out = Assembled(data, groups=[0, 0, 1, 1, 2, 2])
    chunks = substeps(out, 2)
    assert [len(c) for c in chunks] == [4, 2]
    assert len(substeps(out, 10)) == 3  # never more chunks than groups


def test_batches_are_a_pure_function_of_the_step_and_cover_every_row_each_epoch():
    rows = [Prompt(i, [Message("user", str(i))]) for i in range(8)]
    data = TrainData(rows, [], groups_per_batch=4, seed=3)
    again = TrainData(rows, [], groups_per_batch=4, seed=3)
    assert [[p.index for p in data.batch(s)] for s in range(4)] == [[p.index for p in again.batch(s)] for s in range(4)]
    assert sorted(p.index for s in (0, 1) for p in data.batch(s)) == list(range(8))
    assert sorted(p.index for s in (2, 3) for p in data.batch(s)) == list(range(8))
    assert [p.index for p in data.batch(0)] != [p.index for p in TrainData(rows, [], 4, seed=4).batch(0)]
