"""Property tests: for every tokenizer pair and arbitrary Unicode text, the alignment invariants hold.

Texts mix emoji (with ZWJ and flags), CJK, combining marks, right-to-left scripts, runs of spaces,
tabs and newlines, and code. Student sequences are the tokenizer's canonical encoding or a
non-canonical one (random tokens replaced by their byte tokens, as a sampling student may emit,
splitting multibyte characters).
"""

from __future__ import annotations

import itertools
import unicodedata

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import tokenizers_offline as offline
from spider.align import align_tokens, byte_vocab, encode_continuation

FAMILIES = list(offline.FAMILIES)
PAIRS = list(itertools.product(FAMILIES, FAMILIES))
SETTINGS = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])

EMOJI = ["🦀", "🐍", "👩‍💻", "🇫🇷", "✅", "❤️", "🏳️‍🌈", "👍🏽", "☀️"]
CJK = st.characters(min_codepoint=0x4E00, max_codepoint=0x9FFF)
KANA_HANGUL = st.characters(min_codepoint=0x3040, max_codepoint=0x30FF) | st.characters(min_codepoint=0xAC00, max_codepoint=0xD7A3)
COMBINING = st.builds(lambda base, marks: base + "".join(marks), st.sampled_from("aeinouAEO"),
                      st.lists(st.characters(min_codepoint=0x0300, max_codepoint=0x036F), min_size=1, max_size=3))
RTL = st.characters(min_codepoint=0x05D0, max_codepoint=0x05EA) | st.characters(min_codepoint=0x0621, max_codepoint=0x064A)
WHITESPACE = st.lists(st.sampled_from([" ", "  ", "\t", "\n", "\n\n", "\r\n", "\u00a0", "\u3000"]), min_size=1, max_size=6).map("".join)
CODE = st.sampled_from([
    "def f(x):\n    return x ** 2\n", "for (int i = 0; i < n; ++i) {\n\ta[i] = i;\n}", "{\"key\": [1, 2.5, null]}",
    "SELECT * FROM t WHERE id = 3;", "x => x?.y ?? 0", "#include <stdio.h>\n", "    # comment\n", "</s><|im_end|>",
])
WORDS = st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), min_size=1, max_size=12)
ANY = st.text(st.characters(blacklist_categories=("Cs",)), min_size=1, max_size=8)
PIECE = st.one_of(st.sampled_from(EMOJI), CJK, KANA_HANGUL, COMBINING, RTL, WHITESPACE, CODE, WORDS, ANY)
TEXT = st.lists(PIECE, min_size=1, max_size=12).map("".join)


@pytest.fixture(scope="session")
def toks():
    return offline.all_tokenizers()


def byte_token_ids(tok) -> dict[int, int]:
    """byte value -> the id of the token spelling just that byte."""
    vocab = byte_vocab(tok)
    out: dict[int, int] = {}
    for token_id, piece in enumerate(vocab.pieces):
        if len(piece) == 1 and vocab.roles[token_id] == 0 and piece[0] not in out:
            out[piece[0]] = token_id
    return out


_BYTE_TOKENS: dict[str, dict[int, int]] = {}


def split_into_bytes(name, tok, ids, picks):
    """Replace the tokens at `picks` by one token per byte (a valid, non-canonical tokenization)."""
    table = _BYTE_TOKENS.setdefault(name, byte_token_ids(tok))
    pieces = byte_vocab(tok).pieces
    out: list[int] = []
    for k, token_id in enumerate(ids):
        piece = pieces[token_id]
        if k in picks and len(piece) > 1 and all(b in table for b in piece):
            out.extend(table[b] for b in piece)
        else:
            out.append(token_id)
    return out


def check_invariants(alignment, s_data: bytes, t_data: bytes, values: np.ndarray):
    groups = alignment.groups
    n_s, n_t = alignment.num_student_tokens, alignment.num_teacher_tokens
    # Groups are contiguous, in order, and partition both sequences.
    if n_s or n_t:
        assert groups[0][0] == 0 and groups[0][2] == 0
        assert groups[-1][1] == n_s and groups[-1][3] == n_t
    for (a0, a1, b0, b1), (c0, _, d0, _) in zip(groups, groups[1:]):
        assert a1 == c0 and b1 == d0
    for s0, s1, t0, t1 in groups:
        assert s1 > s0 or n_s == 0
        assert t1 >= t0
    # An aligned group's byte spans spell the same bytes on both sides.
    s_pos = np.concatenate(([0], alignment.student_ends))
    t_pos = np.concatenate(([0], alignment.teacher_ends))
    for (s0, s1, t0, t1), ok in zip(groups, alignment.aligned):
        if ok:
            assert s_data[s_pos[s0] : s_pos[s1]] == t_data[t_pos[t0] : t_pos[t1]]
    # project keeps every group's sum and the total.
    projected = alignment.project(values)
    assert projected.shape == (n_s,)
    for s0, s1, t0, t1 in groups:
        assert projected[s0:s1].sum() == pytest.approx(values[t0:t1].sum(), rel=1e-9, abs=1e-9)


@pytest.mark.parametrize("student,teacher", PAIRS)
@SETTINGS
@given(text=TEXT, seed=st.integers(0, 2**32 - 1))
def test_same_text_aligns_exactly(toks, student, teacher, text, seed):
    s, t = toks[student], toks[teacher]
    rng = np.random.default_rng(seed)
    s_ids = encode_continuation(s, text)
    t_ids = encode_continuation(t, text)
    s_ids = split_into_bytes(student, s, s_ids, set(rng.choice(len(s_ids), size=len(s_ids) // 3, replace=False).tolist()))
    alignment = align_tokens(s, s_ids, t, t_ids, continuation=True)
    s_data = byte_vocab(s).text_bytes(np.array(s_ids, dtype=np.int64), at_start=False)
    t_data = byte_vocab(t).text_bytes(np.array(t_ids, dtype=np.int64), at_start=False)
    # What each tokenizer can spell: Llama everything (byte fallback), Qwen the NFC form, SmolLM2
    # everything but characters using the few bytes its vocabulary lacks (it drops them silently).
    for name, data in ((student, s_data), (teacher, t_data)):
        if name == "llama_sp":
            assert data == text.encode()
        elif name == "qwen":
            assert data == unicodedata.normalize("NFC", text).encode()
    if t_data == s_data:
        assert alignment.exact and alignment.student_mask.all()
        # Shortest groups: a group closes exactly where both sides have a token boundary.
        common = sorted(set(alignment.student_ends.tolist()) & set(alignment.teacher_ends.tolist()))
        closes = [int(alignment.student_ends[g[1] - 1]) for g in alignment.groups]
        assert closes == common
    else:  # the tokenizers do not spell the same text: said loudly, in counts
        assert not alignment.exact
        assert alignment.student_unaligned_bytes + alignment.teacher_unaligned_bytes > 0
    check_invariants(alignment, s_data, t_data, rng.normal(size=len(t_ids)) * 3)
    if student == teacher:
        same = align_tokens(s, t_ids, t, t_ids, continuation=True)
        values = rng.normal(size=len(t_ids))
        assert same.groups == [(k, k + 1, k, k + 1) for k in range(len(t_ids))]
        assert np.array_equal(same.project(values), values)


@pytest.mark.parametrize("student,teacher", PAIRS)
@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(prefix=TEXT, old=TEXT, new=TEXT, seed=st.integers(0, 2**32 - 1))
def test_differing_text_is_counted_and_resynchronized(toks, student, teacher, prefix, old, new, seed):
    s, t = toks[student], toks[teacher]
    suffix = " and then the sentence goes on in plain words until its end."
    s_text, t_text = prefix + old + suffix, prefix + new + suffix
    s_ids, t_ids = encode_continuation(s, s_text), encode_continuation(t, t_text)
    alignment = align_tokens(s, s_ids, t, t_ids, continuation=True)
    s_data = byte_vocab(s).text_bytes(np.array(s_ids, dtype=np.int64), at_start=False)
    t_data = byte_vocab(t).text_bytes(np.array(t_ids, dtype=np.int64), at_start=False)
    check_invariants(alignment, s_data, t_data, np.random.default_rng(seed).normal(size=len(t_ids)))
    if s_data != t_data:
        assert not alignment.exact
        assert alignment.student_unaligned_bytes + alignment.teacher_unaligned_bytes > 0
        if student == teacher == "llama_sp":  # lossless on both sides: only the edited middle is unmatched
            assert alignment.student_unaligned_bytes <= len(old.encode())
            assert alignment.teacher_unaligned_bytes <= len(new.encode())
    # The shared plain-ASCII tail is aligned again: the rest of the sequence is never dropped.
    tail_tokens = len(encode_continuation(s, "in plain words until its end."))
    assert alignment.student_mask[-tail_tokens:].all()
