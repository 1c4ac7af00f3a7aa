"""Token alignment between two tokenizations of one text, and projection of teacher values.

`align_tokens(student_tokenizer, student_ids, teacher_tokenizer, teacher_ids) -> Alignment`

Each token's UTF-8 byte span comes from the tokenizer's byte table (`spider.align.vocab`), so
spans are exact even for a multibyte character split across byte tokens, and nothing is ever
re-decoded. Groups are the shortest runs of consecutive tokens whose byte spans end at the same
place on both sides; they are found in one vectorized linear pass over byte positions: a
student token closes a group when a teacher token ends at the same byte (for zero-width control
tokens, the k-th one at a position pairs with the k-th one on the other side, if their roles
agree). When the two byte strings differ, a diff finds where they agree; groups resynchronize at
the next agreeing position and every group touching a difference is marked unaligned and
counted, bytes and tokens, on both sides.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from difflib import SequenceMatcher
from functools import cached_property
from typing import Any, Sequence

import numpy as np

from spider.align.vocab import ByteVocab, Role, byte_vocab
from spider.errors import AlignmentError

Group = tuple[int, int, int, int]

# A byte-level match shorter than this inside a differing region is a resync point only if it is
# made of whole characters on both sides: a shared UTF-8 continuation byte is a coincidence.
MIN_SYNC_BYTES = 4
# Differing regions are diffed by lines, then words, then bytes; byte-level diffing is quadratic,
# so beyond this many bytes it lets difflib skip very common bytes (faster, coarser).
_BYTE_DIFF_EXACT_LIMIT = 8192
_CHUNKERS = (re.compile(rb"[^\n]*\n|[^\n]+"), re.compile(rb"\s+|\S+"))


@dataclass(frozen=True)
class TokenSide:
    """One tokenization: token ids, their byte lengths, the bytes they spell and their roles."""

    vocab: ByteVocab
    ids: np.ndarray
    lengths: np.ndarray
    data: bytes

    @classmethod
    def of(cls, tokenizer: Any, ids: Sequence[int] | np.ndarray, side: str, at_start: bool) -> "TokenSide":
        vocab = byte_vocab(tokenizer)
        arr = vocab.check_ids(ids, side)
        return cls(vocab, arr, vocab.lengths_of(arr, at_start), vocab.text_bytes(arr, at_start))

    @property
    def ends(self) -> np.ndarray:
        return np.cumsum(self.lengths)


@dataclass(frozen=True, eq=False)
class Alignment:
    """How the student's tokens and the teacher's tokens of one text correspond.

    `bounds[g] = (s_start, s_end, t_start, t_end)`: group `g` is student tokens
    `[s_start, s_end)` and teacher tokens `[t_start, t_end)`, half-open. Groups are contiguous,
    in order, and partition both sequences. `aligned[g]` says whether the group's bytes agree on
    both sides; unaligned groups are where the texts differ (see the counts).

    A group may have an empty teacher side (student text the teacher's text lacks, or a student
    control token with no counterpart at the very end). It never has an empty student side when
    there are student tokens: teacher tokens with no student counterpart join a neighbouring group.
    """

    bounds: np.ndarray
    aligned: np.ndarray
    student_ends: np.ndarray
    student_lengths: np.ndarray
    teacher_ends: np.ndarray
    teacher_lengths: np.ndarray
    student_unaligned_bytes: int
    teacher_unaligned_bytes: int
    special_mismatches: int  # control tokens at the same place whose roles differ (left unpaired)

    @cached_property
    def groups(self) -> list[Group]:
        """The groups as `(s_start, s_end, t_start, t_end)` tuples."""
        # zip builds the tuples straight from four int lists: no per-row lists for the GC to chase.
        return list(zip(*self.bounds.T.tolist()))

    @property
    def num_student_tokens(self) -> int:
        return int(self.student_lengths.size)

    @property
    def num_teacher_tokens(self) -> int:
        return int(self.teacher_lengths.size)

    @property
    def student_bytes(self) -> int:
        return int(self.student_ends[-1]) if self.student_ends.size else 0

    @property
    def teacher_bytes(self) -> int:
        return int(self.teacher_ends[-1]) if self.teacher_ends.size else 0

    @property
    def student_spans(self) -> np.ndarray:
        """`(n, 2)` byte spans `[start, end)` of the student tokens in the student's text."""
        return np.stack([self.student_ends - self.student_lengths, self.student_ends], axis=1)

    @property
    def teacher_spans(self) -> np.ndarray:
        """`(n, 2)` byte spans `[start, end)` of the teacher tokens in the teacher's text."""
        return np.stack([self.teacher_ends - self.teacher_lengths, self.teacher_ends], axis=1)

    @cached_property
    def student_mask(self) -> np.ndarray:
        """Per student token: True where its group is aligned (its projected value can be trusted)."""
        sizes = self.bounds[:, 1] - self.bounds[:, 0]
        return np.repeat(self.aligned, sizes)

    @cached_property
    def teacher_mask(self) -> np.ndarray:
        sizes = self.bounds[:, 3] - self.bounds[:, 2]
        return np.repeat(self.aligned, sizes)

    @property
    def unaligned_student_tokens(self) -> int:
        return int(self.num_student_tokens - self.student_mask.sum())

    @property
    def unaligned_teacher_tokens(self) -> int:
        return int(self.num_teacher_tokens - self.teacher_mask.sum())

    @property
    def exact(self) -> bool:
        """Both sides spell the same bytes: every group is aligned."""
        return bool(self.aligned.all()) and self.student_unaligned_bytes == 0 and self.teacher_unaligned_bytes == 0

    @cached_property
    def is_one_to_one(self) -> bool:
        """Every group is one student token and one teacher token (identical tokenizations)."""
        return bool(
            self.bounds.shape[0] == self.num_student_tokens == self.num_teacher_tokens
            and self.aligned.all()
            and ((self.bounds[:, 1] - self.bounds[:, 0]) == 1).all()
        )

    def project(self, values: Sequence[float] | np.ndarray) -> np.ndarray:
        """Per-teacher-token values (log-probs) -> one value per student token.

        Within each group, the teacher's group total is spread evenly over the group's student
        tokens: with k student tokens, each gets `sum(teacher values of the group) / k`. The sum
        over a group is preserved (to float rounding), so the sum over a completion is the
        teacher's log-probability of the text; with identical tokenizations it is the identity.

        Why spread rather than putting the whole group on one token: the teacher only judges a
        group as a whole, and every student token of the group took part in spelling it. In a
        per-token reverse-KL loss `log p_student(x_t) - teacher_t`, spreading keeps each token's
        teacher term on the same per-token scale as its own log-prob, so each token's KL estimate
        stays an honest share of the group's KL. Putting the group on its last token would tell the
        earlier tokens the teacher fully agreed with them (teacher term 0: a reward for whatever they
        were) and charge the last token for the whole group, a large signal of the opposite sign on
        a token that may have been the teacher's favourite.

        Unaligned groups are projected the same way; mask them with `student_mask`.
        """
        v = np.asarray(values, dtype=np.float64)
        if v.shape != (self.num_teacher_tokens,):
            raise AlignmentError(
                f"project expects one value per teacher token ({self.num_teacher_tokens}), got shape {v.shape}"
            )
        if self.is_one_to_one:
            return v.copy()
        s_start, s_stop, t_start, t_stop = self.bounds.T
        sums = np.zeros(self.bounds.shape[0], dtype=np.float64)
        nonempty = t_stop > t_start
        if nonempty.any():
            sums[nonempty] = np.add.reduceat(v, t_start[nonempty])
        sizes = s_stop - s_start
        has_student = sizes > 0
        return np.repeat(sums[has_student] / sizes[has_student], sizes[has_student])


def align_tokens(
    student_tokenizer: Any,
    student_ids: Sequence[int] | np.ndarray,
    teacher_tokenizer: Any,
    teacher_ids: Sequence[int] | np.ndarray,
    *,
    continuation: bool = False,
) -> Alignment:
    """Align two tokenizations of the same text.

    `student_ids` and `teacher_ids` are token ids from each (fast) tokenizer. By default each
    sequence is read the way `tokenizer.decode(ids, skip_special_tokens=True)` reads it, as a
    whole text (so SentencePiece's leading "▁" start marker is not a space). With
    `continuation=True` both sequences are read as continuing a prompt (a completion): a leading
    "▁" is then a real space. Control tokens (BOS, EOS, end-of-turn, ...) are zero-width and pair
    with control tokens of the same role (or the same literal text) at the same place.

    Raises AlignmentError for ids outside a tokenizer's vocabulary or a tokenizer whose decoder
    has no exact byte pieces.
    """
    student = TokenSide.of(student_tokenizer, student_ids, "student", at_start=not continuation)
    teacher = TokenSide.of(teacher_tokenizer, teacher_ids, "teacher", at_start=not continuation)
    return align_sides(student, teacher)


def align_sides(student: TokenSide, teacher: TokenSide) -> Alignment:
    """`align_tokens` on already-resolved sides."""
    s_lens, t_lens = student.lengths, teacher.lengths
    s_ends, t_ends = np.cumsum(s_lens), np.cumsum(t_lens)
    n_s, n_t = s_lens.size, t_lens.size
    s_total, t_total = len(student.data), len(teacher.data)
    same_text = student.data == teacher.data
    blocks = [(0, 0, s_total)] if same_text else matching_blocks(student.data, teacher.data)

    # Per teacher byte position: how many teacher tokens end there, and the first of them.
    t_count = np.bincount(t_ends, minlength=t_total + 1)
    t_first = np.cumsum(t_count) - t_count
    s_count = np.bincount(s_ends, minlength=s_total + 1)
    s_rank = np.arange(n_s) - (np.cumsum(s_count) - s_count)[s_ends]

    if same_text:
        mapped = s_ends
        mappable = np.ones(n_s, dtype=bool)
    else:
        to_teacher = np.full(s_total + 1, -1, dtype=np.int64)
        for a, b, size in reversed(blocks):  # a position shared by two blocks belongs to the earlier
            to_teacher[a : a + size + 1] = np.arange(b, b + size + 1)
        mapped = to_teacher[s_ends]
        mappable = mapped >= 0
        mapped = np.where(mappable, mapped, 0)

    closes = mappable & (s_rank < t_count[mapped])
    s_idx = np.flatnonzero(closes)
    t_idx = t_first[mapped[s_idx]] + s_rank[s_idx]
    if not same_text and t_idx.size:
        keep = t_idx >= np.maximum.accumulate(t_idx)
        s_idx, t_idx = s_idx[keep], t_idx[keep]

    special_mismatches = 0
    zero_width = (s_lens[s_idx] == 0) & (t_lens[t_idx] == 0)
    if zero_width.any():
        keep = np.ones(s_idx.size, dtype=bool)
        for k in np.flatnonzero(zero_width):
            if not _roles_agree(student, int(student.ids[s_idx[k]]), teacher, int(teacher.ids[t_idx[k]])):
                keep[k] = False
                special_mismatches += 1
        s_idx, t_idx = s_idx[keep], t_idx[keep]

    s_stop, t_stop = s_idx + 1, t_idx + 1
    if n_s == 0:  # nothing to project onto: at most one group holding whatever the teacher has
        s_stop = np.zeros(1 if n_t else 0, dtype=np.int64)
        t_stop = np.full(1 if n_t else 0, n_t, dtype=np.int64)
    elif s_stop.size and s_stop[-1] == n_s:
        t_stop[-1] = n_t  # trailing teacher-only tokens join the last group
    else:
        s_stop = np.append(s_stop, n_s)
        t_stop = np.append(t_stop, n_t)
    s_start = np.concatenate(([0], s_stop[:-1]))[: s_stop.size].astype(np.int64)
    t_start = np.concatenate(([0], t_stop[:-1]))[: t_stop.size].astype(np.int64)
    bounds = np.stack([s_start, s_stop, t_start, t_stop], axis=1).astype(np.int64)

    if same_text:
        aligned = np.ones(bounds.shape[0], dtype=bool)
        s_unaligned = t_unaligned = 0
    else:
        s_gap = _gap_prefix(s_total, [(a, n) for a, _, n in blocks])
        t_gap = _gap_prefix(t_total, [(b, n) for _, b, n in blocks])
        s_pos = np.concatenate(([0], s_ends))
        t_pos = np.concatenate(([0], t_ends))
        s_bad = s_gap[s_pos[s_stop]] - s_gap[s_pos[s_start]]
        t_bad = t_gap[t_pos[t_stop]] - t_gap[t_pos[t_start]]
        aligned = (s_bad == 0) & (t_bad == 0)
        s_unaligned, t_unaligned = int(s_gap[-1]), int(t_gap[-1])

    return Alignment(
        bounds=bounds,
        aligned=aligned,
        student_ends=s_ends,
        student_lengths=s_lens,
        teacher_ends=t_ends,
        teacher_lengths=t_lens,
        student_unaligned_bytes=s_unaligned,
        teacher_unaligned_bytes=t_unaligned,
        special_mismatches=special_mismatches,
    )


def _roles_agree(student: TokenSide, s_id: int, teacher: TokenSide, t_id: int) -> bool:
    s_role, t_role = student.vocab.role_of(s_id), teacher.vocab.role_of(t_id)
    if s_role == t_role:
        return True
    s_text, t_text = student.vocab.contents.get(s_id), teacher.vocab.contents.get(t_id)
    return s_role != Role.TEXT and s_text is not None and s_text == t_text


def _gap_prefix(total: int, covered: list[tuple[int, int]]) -> np.ndarray:
    """Prefix counts of bytes outside the matching blocks: `out[p]` = unmatched bytes before p."""
    unmatched = np.ones(total, dtype=np.int64)
    for start, size in covered:
        unmatched[start : start + size] = 0
    return np.concatenate(([0], np.cumsum(unmatched)))


def _common_prefix(a: bytes, b: bytes) -> int:
    n = min(len(a), len(b))
    if n == 0:
        return 0
    diff = np.frombuffer(a, dtype=np.uint8, count=n) != np.frombuffer(b, dtype=np.uint8, count=n)
    return int(np.argmax(diff)) if diff.any() else n


def matching_blocks(a: bytes, b: bytes) -> list[tuple[int, int, int]]:
    """Where two byte strings agree: `(i, j, n)` with `a[i:i+n] == b[j:j+n]`, increasing in i and j.

    The common prefix and suffix are found directly; the middle is diffed by lines, then words,
    then bytes (short byte-level matches that cut characters are ignored as coincidences).
    """
    prefix = _common_prefix(a, b)
    rest = min(len(a), len(b)) - prefix
    suffix = _common_prefix(a[::-1][:rest], b[::-1][:rest]) if rest else 0
    blocks: list[tuple[int, int, int]] = []
    if prefix:
        blocks.append((0, 0, prefix))
    blocks.extend(_diff(a[prefix : len(a) - suffix], b[prefix : len(b) - suffix], prefix, prefix, 0))
    if suffix:
        blocks.append((len(a) - suffix, len(b) - suffix, suffix))
    merged: list[tuple[int, int, int]] = []
    for i, j, n in blocks:
        if merged and merged[-1][0] + merged[-1][2] == i and merged[-1][1] + merged[-1][2] == j:
            pi, pj, pn = merged[-1]
            merged[-1] = (pi, pj, pn + n)
        elif n:
            merged.append((i, j, n))
    return merged


def _diff(a: bytes, b: bytes, a0: int, b0: int, level: int) -> list[tuple[int, int, int]]:
    if not a or not b:
        return []
    if level < len(_CHUNKERS):
        chunks_a = _CHUNKERS[level].findall(a)
        chunks_b = _CHUNKERS[level].findall(b)
        if len(chunks_a) > 1 or len(chunks_b) > 1:
            off_a = np.concatenate(([0], np.cumsum([len(c) for c in chunks_a]))).tolist()
            off_b = np.concatenate(([0], np.cumsum([len(c) for c in chunks_b]))).tolist()
            out: list[tuple[int, int, int]] = []
            for tag, i1, i2, j1, j2 in SequenceMatcher(None, chunks_a, chunks_b, autojunk=False).get_opcodes():
                pa, pb = off_a[i1], off_b[j1]
                if tag == "equal":
                    out.append((a0 + pa, b0 + pb, off_a[i2] - pa))
                elif tag == "replace":
                    out.extend(_diff(a[pa : off_a[i2]], b[pb : off_b[j2]], a0 + pa, b0 + pb, level + 1))
            return out
        return _diff(a, b, a0, b0, level + 1)
    exact = len(a) + len(b) <= _BYTE_DIFF_EXACT_LIMIT
    matcher = SequenceMatcher(None, a, b, autojunk=not exact)
    return [
        (a0 + i, b0 + j, n)
        for i, j, n in matcher.get_matching_blocks()
        if n >= MIN_SYNC_BYTES or (n and _whole_chars(a, i, n) and _whole_chars(b, j, n))
    ]


def _whole_chars(data: bytes, start: int, size: int) -> bool:
    """Whether `data[start:start+size]` starts and ends on UTF-8 character boundaries."""
    def boundary(pos: int) -> bool:
        return pos >= len(data) or not 0x80 <= data[pos] <= 0xBF

    return boundary(start) and boundary(start + size)
