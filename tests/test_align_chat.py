"""Conversation-level alignment: chat templates, role-mapped control tokens, reports, the probe check,
and teacher log-probs from a real (tiny, random-weight) transformers model projected back."""

from __future__ import annotations

import copy
import itertools
import json

import numpy as np
import pytest

import tokenizers_offline as offline
from spider.align import (
    AlignmentReport,
    byte_vocab,
    check_tokenizer_pair,
    encode_continuation,
    render_prompt,
    teacher_inputs_for_completion,
)
from spider.errors import AlignmentError
from spider.types import Message, ToolCall

FAMILIES = list(offline.FAMILIES)
PAIRS = list(itertools.product(FAMILIES, FAMILIES))
TOOLS = [{
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather.",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}]
CONVERSATION = [
    Message("system", "Be brief."),
    Message("user", "Weather in Zürich?"),
    Message("assistant", "", tool_calls=[ToolCall("c1", "get_weather", {"city": "Zürich"})]),
    Message("tool", '{"temp": 21}', tool_call_id="c1", name="get_weather"),
    Message("user", "And tomorrow?"),
]
COMPLETION = "Tomorrow: 23 °C ☀️ in Zürich (你好!).\n\n```py\nprint(\"<|im_end|> </s> stays text\")\n```"


@pytest.fixture(scope="session")
def toks():
    return offline.all_tokenizers()


def student_completion(tok, text=COMPLETION, end=True):
    return encode_continuation(tok, text) + ([byte_vocab(tok).end_of_turn_id] if end else [])


def test_chatml_rendering_with_tools(toks):
    prompt = render_prompt(toks["smollm2"], CONVERSATION, tools=TOOLS)
    assert prompt.text.startswith("<|im_start|>system\nBe brief.\n\n# Tools\n")
    assert "<tools>\n" + json.dumps(TOOLS[0]) + "\n</tools>" in prompt.text
    assert (
        "<|im_start|>assistant\n<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Zürich\"}}\n"
        "</tool_call><|im_end|>\n<|im_start|>user\n<tool_response>\n{\"temp\": 21}\n</tool_response><|im_end|>\n"
        "<|im_start|>user\nAnd tomorrow?<|im_end|>\n<|im_start|>assistant\n"
    ) in prompt.text
    assert prompt.text.endswith("<|im_start|>assistant\n")
    assert toks["smollm2"].decode(prompt.ids) == prompt.text
    # Qwen renders the same conversation with its own default system prompt when there is none.
    qwen_prompt = render_prompt(toks["qwen"], CONVERSATION[1:])
    assert qwen_prompt.text.startswith("<|im_start|>system\nYou are Qwen, created by Alibaba Cloud.")


def test_llama_rendering_and_a_single_bos(toks):
    llama = toks["llama_sp"]
    prompt = render_prompt(llama, CONVERSATION, tools=TOOLS)
    assert prompt.text.startswith("<s>[INST] <<SYS>>\nBe brief.\n\nYou can call these functions.")
    assert "Weather in Zürich? [/INST] [TOOL_CALLS] [{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Zürich\"}}] </s>" in prompt.text
    assert prompt.text.endswith("<s>[INST] And tomorrow? [/INST]")
    bos = llama.bos_token_id
    assert prompt.ids[0] == bos and prompt.ids[1] != bos
    assert prompt.ids.count(bos) == prompt.text.count("<s>") == 3
    # A tokenizer that prepends BOS to every encoding gets it once even when its template omits it.
    chatml_llama = copy.deepcopy(llama)
    chatml_llama.chat_template = toks["qwen"].chat_template
    ids = render_prompt(chatml_llama, CONVERSATION).ids
    assert ids[0] == bos and ids.count(bos) == 1


def test_no_chat_template_is_a_clear_error(toks):
    bare = copy.deepcopy(toks["qwen"])
    bare.chat_template = None
    with pytest.raises(AlignmentError, match="has no chat template"):
        render_prompt(bare, CONVERSATION)


@pytest.mark.parametrize("student,teacher", PAIRS)
def test_teacher_scores_the_student_text_inside_its_own_template(toks, student, teacher):
    s, t = toks[student], toks[teacher]
    s_ids = student_completion(s)
    inputs = teacher_inputs_for_completion(CONVERSATION, s_ids, s, t, tools=TOOLS)
    teacher_prompt = render_prompt(t, CONVERSATION, tools=TOOLS)
    assert inputs.input_ids[: inputs.completion_start] == teacher_prompt.ids
    assert inputs.input_ids[inputs.completion_start :] == inputs.completion_ids
    # The student's end-of-turn is the teacher's own end-of-turn token, the only control token scored.
    t_vocab = byte_vocab(t)
    assert inputs.completion_ids[-1] == t_vocab.end_of_turn_id
    assert [i for i in inputs.completion_ids if i in t_vocab.contents] == [t_vocab.end_of_turn_id]
    # The teacher's completion tokens spell the student's text, decoded by the teacher's own decoder.
    assert t.decode(inputs.completion_ids[:-1]) == COMPLETION == inputs.student_text
    report = inputs.report
    assert report.round_trip_ok and inputs.alignment.exact and inputs.student_mask.all()
    assert [(m.role, m.student_token, m.teacher_token) for m in report.specials_mapped] == [
        ("end", s.convert_ids_to_tokens(s_ids[-1]), t.convert_ids_to_tokens(t_vocab.end_of_turn_id))
    ]
    assert report.template_keeps_completion is True
    # End token pairs with end token.
    assert inputs.alignment.groups[-1] == (len(s_ids) - 1, len(s_ids), len(inputs.completion_ids) - 1, len(inputs.completion_ids))
    # vLLM-style prompt log-probs (first is None) come back one per student completion token.
    rng = np.random.default_rng(0)
    prompt_logprobs = [None] + (-rng.exponential(size=len(inputs.input_ids) - 1)).tolist()
    projected = inputs.project_logprobs(prompt_logprobs)
    assert projected.shape == (len(s_ids),)
    assert projected.sum() == pytest.approx(sum(prompt_logprobs[inputs.completion_start :]))
    assert np.array_equal(projected, inputs.project_logprobs(prompt_logprobs[inputs.completion_start :]))
    if student == teacher:
        assert inputs.completion_ids == s_ids
        assert np.array_equal(projected, np.array(prompt_logprobs[inputs.completion_start :]))


def test_truncated_completion_gets_no_end_token(toks):
    s, t = toks["qwen"], toks["llama_sp"]
    inputs = teacher_inputs_for_completion(CONVERSATION, student_completion(s, end=False), s, t)
    assert inputs.completion_ids[-1] != byte_vocab(t).end_of_turn_id
    assert inputs.report.specials_mapped == [] and inputs.alignment.exact


def test_completion_cut_inside_a_character(toks):
    """A student can sample byte tokens that are not valid UTF-8; the teacher sees U+FFFD there."""
    s, t = toks["llama_sp"], toks["smollm2"]
    crab = encode_continuation(s, "🦀")
    assert len(crab) == 4
    s_ids = encode_continuation(s, "Look: ") + crab[:2] + encode_continuation(s, " and the rest is fine.") + [2]
    inputs = teacher_inputs_for_completion(CONVERSATION, s_ids, s, t)
    alignment, report = inputs.alignment, inputs.report
    assert inputs.student_text == "Look: \ufffd and the rest is fine."
    assert (alignment.student_unaligned_bytes, alignment.teacher_unaligned_bytes) == (2, 3)
    assert not report.round_trip_ok and any("not valid UTF-8 at byte 6" in n for n in report.notes)
    # "Look", ":", "▁", then the two cut byte tokens; everything after them is aligned again.
    mask = alignment.student_mask
    assert mask[:3].all() and not mask[3:5].any() and mask[5:].all()
    assert inputs.project_logprobs(np.zeros(len(inputs.completion_ids))).shape == (len(s_ids),)


def test_template_that_rewrites_the_completion_is_reported(toks):
    s = toks["smollm2"]
    text = "Sure.\n"  # the Llama-2 template strips assistant turns
    llama_view = teacher_inputs_for_completion(CONVERSATION, student_completion(s, text), s, toks["llama_sp"])
    assert llama_view.report.template_keeps_completion is False
    assert llama_view.report.round_trip_ok  # what the teacher scores is still exactly the student's text
    assert "rewrites the completion" in llama_view.report.summary()
    chatml_view = teacher_inputs_for_completion(CONVERSATION, student_completion(s, text), s, toks["qwen"])
    assert chatml_view.report.template_keeps_completion is True


def test_control_tokens_without_role_counterpart(toks):
    smol, qwen, llama = toks["smollm2"], toks["qwen"], toks["llama_sp"]
    repo = smol.convert_tokens_to_ids("<repo_name>")
    s_ids = encode_continuation(smol, "See ") + [repo] + encode_continuation(smol, "spider") + [2]
    inputs = teacher_inputs_for_completion(CONVERSATION, s_ids, smol, qwen)
    assert inputs.report.specials_unmapped == 1
    assert any("'<repo_name>' has no teacher counterpart" in n for n in inputs.report.notes)
    # The dropped token does not split the teacher's tokenization of the text around it.
    assert inputs.completion_ids == encode_continuation(qwen, "See spider") + [byte_vocab(qwen).end_of_turn_id]
    assert inputs.alignment.exact
    # SmolLM2 calls <|im_start|> its BOS; Qwen has no BOS but the same control token: mapped by text.
    start = smol.convert_tokens_to_ids("<|im_start|>")
    inputs = teacher_inputs_for_completion(CONVERSATION, [start] + encode_continuation(smol, "hi"), smol, qwen)
    assert [(m.role, m.teacher_token) for m in inputs.report.specials_mapped] == [("bos", "<|im_start|>")]
    # Llama has a BOS: the role decides.
    inputs = teacher_inputs_for_completion(CONVERSATION, [start] + encode_continuation(smol, "hi"), smol, llama)
    assert [(m.role, m.teacher_token) for m in inputs.report.specials_mapped] == [("bos", "<s>")]


def test_report_metrics_and_merge(toks):
    s, t = toks["qwen"], toks["llama_sp"]
    first = teacher_inputs_for_completion(CONVERSATION, student_completion(s), s, t).report
    second = teacher_inputs_for_completion(CONVERSATION, student_completion(s, "Plain ascii."), s, t).report
    merged = AlignmentReport.merge([first, second])
    assert merged.completions == 2
    assert merged.student_tokens == first.student_tokens + second.student_tokens
    assert sum(merged.group_sizes.values()) == merged.groups == first.groups + second.groups
    assert len(merged.specials_mapped) == 2
    metrics = merged.to_metrics()
    assert metrics["align/aligned_byte_fraction"] == 1.0 and metrics["align/round_trip_ok"] == 1.0
    assert metrics["align/teacher_tokens_per_student_token"] == pytest.approx(merged.teacher_tokens / merged.student_tokens)
    shares = [v for k, v in metrics.items() if k.startswith("align/group_share/")]
    assert sum(shares) == pytest.approx(1.0)
    assert metrics["align/group_share/1x1"] < 1.0  # Qwen and Llama split this text differently


@pytest.mark.parametrize("student,teacher", PAIRS)
def test_probe_check_passes_for_real_pairs(toks, student, teacher):
    report = check_tokenizer_pair(toks[student], toks[teacher])
    assert report.completions == 12 and report.round_trip_ok
    assert report.aligned_byte_fraction == report.aligned_token_fraction == 1.0
    assert len(report.specials_mapped) == 12 and report.specials_unmapped == 0
    if teacher == "qwen" and student != "qwen":
        # Qwen NFC-normalizes: decomposed accents are honestly unaligned, and a strict check refuses.
        probes = ["Cafe\u0301 and re\u0301sume\u0301 with decomposed accents, then plain words."]
        report = check_tokenizer_pair(toks[student], toks[teacher], probes=probes, min_aligned_fraction=0.0)
        assert report.unaligned_student_bytes == 9 and report.unaligned_teacher_bytes == 6
        with pytest.raises(AlignmentError, match="fails the alignment check"):
            check_tokenizer_pair(toks[student], toks[teacher], probes=probes, min_aligned_fraction=1.0)


def test_probe_check_refuses_a_teacher_that_cannot_spell_the_text(toks):
    """A SentencePiece teacher without byte fallback turns emoji and rare characters into <unk>."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    llama = toks["llama_sp"]
    spec = json.loads(llama.backend_tokenizer.to_str())
    spec["model"]["byte_fallback"] = False
    no_fallback = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(json.dumps(spec)), bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )
    no_fallback.chat_template = llama.chat_template
    with pytest.raises(AlignmentError, match=r"fails the alignment check .* unaligned") as err:
        check_tokenizer_pair(toks["qwen"], no_fallback, probes=["Emoji 🦀🐍 and ⅞ and 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 text"])
    assert "byte fallback" in str(err.value)
    with pytest.raises(AlignmentError, match="min_aligned_fraction"):
        check_tokenizer_pair(toks["qwen"], llama, min_aligned_fraction=1.5)


def test_real_teacher_model_logprobs_come_back_onto_student_tokens(toks):
    """A tiny random-weight Llama over SmolLM2's vocabulary scores what the student (Qwen) wrote."""
    torch = pytest.importorskip("torch")
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    torch.set_num_threads(2)
    teacher_tok, student_tok = toks["smollm2"], toks["qwen"]
    config = LlamaConfig(vocab_size=len(teacher_tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=1024)
    model = LlamaForCausalLM(config).eval()

    def prompt_logprobs(ids: list[int]) -> list[float | None]:
        with torch.no_grad():
            logits = model(torch.tensor([ids])).logits[0].double()
        logp = torch.log_softmax(logits[:-1], dim=-1).gather(1, torch.tensor(ids[1:])[:, None])[:, 0]
        return [None] + logp.tolist()

    s_ids = student_completion(student_tok)
    cross = teacher_inputs_for_completion(CONVERSATION, s_ids, student_tok, teacher_tok, tools=TOOLS)
    scored = prompt_logprobs(cross.input_ids)
    projected = cross.project_logprobs(scored)
    completion_logprob = sum(scored[cross.completion_start :])
    assert projected.shape == (len(s_ids),) and np.isfinite(projected).all()
    assert projected.sum() == pytest.approx(completion_logprob, rel=1e-12)
    for s0, s1, t0, t1 in cross.alignment.groups:
        group = sum(scored[cross.completion_start + t0 : cross.completion_start + t1])
        assert projected[s0:s1] == pytest.approx([group / (s1 - s0)] * (s1 - s0))
    # The same model as its own student: projection is exactly the teacher's per-token log-probs.
    own_ids = student_completion(teacher_tok)
    same = teacher_inputs_for_completion(CONVERSATION, own_ids, teacher_tok, teacher_tok, tools=TOOLS)
    own_scores = prompt_logprobs(same.input_ids)
    assert same.input_ids == render_prompt(teacher_tok, CONVERSATION, tools=TOOLS).ids + own_ids
    assert same.project_logprobs(own_scores).tolist() == own_scores[same.completion_start :]
    # Same text, so the teacher's log-probability of the completion is the same either way.
    assert completion_logprob == pytest.approx(sum(own_scores[same.completion_start :]), rel=1e-9)
