"""What each token id of a fast tokenizer means in UTF-8 bytes, and what each control token is for.

Alignment never re-decodes text: a token's bytes are read from a table built once per tokenizer
from its vocabulary and its decoder pipeline, so a sequence's byte spans are a cumulative sum.
"""

from __future__ import annotations

import json
import re
import threading
import weakref
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Any, Sequence

import numpy as np

from spider.errors import AlignmentError


class Role(IntEnum):
    """What a token is for. Text tokens carry bytes; every other role is a zero-width control token."""

    INVALID = -1  # an id with no token behind it (a hole in the vocabulary)
    TEXT = 0
    BOS = 1
    END = 2  # end of sequence or end of turn: where the model stops
    PAD = 3
    UNK = 4
    CONTROL = 5  # any other special token (<|im_start|>, <tool_call> when special, ...)


_BYTE_FALLBACK = re.compile(r"<0x([0-9A-Fa-f]{2})>")
_SUPPORTED_DECODERS = "ByteLevel, Metaspace, Replace (string patterns), ByteFallback, Fuse, Strip, Sequence"


def _byte_level_table() -> dict[int, int]:
    """GPT-2's printable-character stand-ins for bytes, as a `str.translate` table (char -> byte value)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return {c: b for b, c in zip(printable, chars)}


_BYTE_LEVEL = _byte_level_table()


def _byte_level_piece(token: str) -> bytes:
    mapped = token.translate(_BYTE_LEVEL)
    try:
        return mapped.encode("latin-1")
    except UnicodeEncodeError:
        # The `tokenizers` ByteLevel decoder keeps a token verbatim when any char is not a byte stand-in.
        return token.encode("utf-8")


@dataclass
class _DecoderPlan:
    """The decoder pipeline reduced to what matters per token and at the start of a sequence."""

    steps: list[tuple[str, Any]] = field(default_factory=list)  # per-token steps, in order
    strip_start: int = 0  # leading chars the decoder strips from a whole sequence
    strip_char: bytes = b" "


def _plan_decoder(spec: dict[str, Any] | None, name: str) -> _DecoderPlan:
    plan = _DecoderPlan()
    fused = False

    def visit(node: dict[str, Any]) -> None:
        nonlocal fused
        kind = node["type"]
        if kind == "Sequence":
            for child in node["decoders"]:
                visit(child)
        elif kind == "ByteLevel":
            plan.steps.append(("bytelevel", None))
        elif kind == "Metaspace":
            plan.steps.append(("replace", (node["replacement"].encode(), b" ")))
            scheme = node.get("prepend_scheme", "always" if node.get("add_prefix_space", True) else "never")
            if scheme != "never":
                plan.strip_start, plan.strip_char = 1, b" "
        elif kind == "Replace":
            pattern = node["pattern"]
            if "String" not in pattern:
                raise AlignmentError(
                    f"tokenizer {name!r} uses a regex Replace decoder, whose per-token bytes are not exact; "
                    f"alignment supports decoders made of {_SUPPORTED_DECODERS}"
                )
            plan.steps.append(("replace", (pattern["String"].encode(), node["content"].encode())))
        elif kind == "ByteFallback":
            plan.steps.append(("bytefallback", None))
        elif kind == "Fuse":
            fused = True
        elif kind == "Strip":
            if node.get("stop", 0):
                raise AlignmentError(
                    f"tokenizer {name!r} has a decoder that strips the end of the text (Strip stop="
                    f"{node['stop']}); a completion's last bytes would be ambiguous, so it cannot be aligned"
                )
            if fused:  # after Fuse there is one token: the strip applies to the start of the whole text
                plan.strip_start, plan.strip_char = node.get("start", 0), node["content"].encode()
            elif node.get("start", 0):
                plan.steps.append(("strip", (node["content"].encode(), node["start"])))
        else:
            raise AlignmentError(
                f"tokenizer {name!r} uses the {kind} decoder, which does not give exact bytes per token; "
                f"alignment supports decoders made of {_SUPPORTED_DECODERS} (causal LM tokenizers: "
                "byte-level BPE, SentencePiece, tiktoken conversions)"
            )

    if spec is not None:
        visit(spec)
    return plan


def _apply_steps(token: str, steps: list[tuple[str, Any]]) -> bytes:
    """The bytes one vocabulary token decodes to, following the decoder's per-token steps."""
    piece = token.encode("utf-8")
    for step, arg in steps:
        if step == "bytelevel":  # the token's chars stand for bytes (decoding what earlier steps left)
            piece = _byte_level_piece(piece.decode("utf-8", "replace"))
        elif step == "replace":
            piece = piece.replace(*arg)
        elif step == "bytefallback":
            m = _BYTE_FALLBACK.fullmatch(piece.decode("utf-8", "replace"))
            if m:
                piece = bytes([int(m.group(1), 16)])
        elif step == "strip":
            char, count = arg
            for _ in range(count):
                if piece.startswith(char):
                    piece = piece[len(char):]
    return piece


def _template_end_of_turn(tokenizer: Any, special_ids: set[int]) -> int | None:
    """The control token the chat template writes right after an assistant message (as the shared
    renderer finds it), if it is one of this vocabulary's control tokens."""
    from spider.chat import Renderer

    end = Renderer(tokenizer).end_of_turn_id
    return end if end in special_ids else None


@dataclass(eq=False)
class ByteVocab:
    """The exact UTF-8 bytes of every token id of one tokenizer, and the role of its control tokens.

    `pieces[i]` is what token `i` contributes in the middle of a sequence; `lengths` is the same as an
    array. Control (special) tokens are zero-width: they are not text, they are matched by `roles`.
    `strip_start` is how many leading `strip_char` bytes the decoder removes from a whole sequence
    (SentencePiece's "▁" marker prepended at the start of a text); it applies only to a sequence
    that starts a text, never to a completion that continues a prompt.
    """

    name: str
    pieces: list[bytes]
    lengths: np.ndarray
    table: np.ndarray  # every piece, concatenated (uint8)
    offsets: np.ndarray  # where each piece starts in `table`
    roles: np.ndarray
    contents: dict[int, str]  # control token id -> its literal text, to pair control tokens across tokenizers
    strip_start: int
    strip_char: bytes
    bos_id: int | None
    end_ids: tuple[int, ...]  # EOS first, then the template's end-of-turn token if it differs
    end_of_turn_id: int | None  # the token the chat template closes an assistant turn with
    adds_bos: bool  # whether plain encoding with special tokens prepends BOS
    chat_template: str | None
    _continuation: Any = None

    @property
    def size(self) -> int:
        return len(self.pieces)

    def check_ids(self, ids: Sequence[int] | np.ndarray, side: str) -> np.ndarray:
        """`ids` as an int64 array, or an AlignmentError naming the first id this tokenizer does not have."""
        arr = np.asarray(ids, dtype=np.int64)
        if arr.ndim != 1:
            raise AlignmentError(f"{side} ids must be a flat sequence of token ids, got shape {arr.shape}")
        if arr.size == 0:
            return arr
        bad = (arr < 0) | (arr >= self.size)
        if not bad.any():
            bad = self.roles[arr] == Role.INVALID
        if bad.any():
            pos = int(np.argmax(bad))
            raise AlignmentError(
                f"{side} token id {int(arr[pos])} at position {pos} is not in the vocabulary of {self.name!r} "
                f"({self.size} ids); pass ids produced by that tokenizer (or by a model that uses it)"
            )
        return arr

    def lengths_of(self, ids: np.ndarray, at_start: bool) -> np.ndarray:
        """Byte length of each token of `ids`; `at_start` applies the decoder's start-of-text strip."""
        lens = self.lengths[ids]
        if at_start and self.strip_start and lens.size:
            text = np.flatnonzero(lens)
            if text.size:
                first = int(text[0])
                piece = self.pieces[int(ids[first])]
                cut = 0
                while cut < self.strip_start and piece[cut * len(self.strip_char):].startswith(self.strip_char):
                    cut += 1
                lens = lens.copy()
                lens[first] -= cut * len(self.strip_char)
        return lens

    def text_bytes(self, ids: np.ndarray, at_start: bool) -> bytes:
        """The bytes `ids` spell (control tokens contribute none), gathered from the byte table."""
        lens = self.lengths[ids]
        ends = np.cumsum(lens)
        total = int(ends[-1]) if ends.size else 0
        # Output byte k of token m is table byte offsets[ids[m]] + (k - start of token m).
        gather = np.repeat(self.offsets[ids] - (ends - lens), lens) + np.arange(total)
        data = self.table[gather].tobytes()
        if at_start and self.strip_start:
            for _ in range(self.strip_start):
                if data.startswith(self.strip_char):
                    data = data[len(self.strip_char):]
        return data

    def role_of(self, token_id: int) -> Role:
        return Role(int(self.roles[token_id]))


_CACHE: "weakref.WeakKeyDictionary[Any, ByteVocab]" = weakref.WeakKeyDictionary()
_LOCK = threading.Lock()


def _backend(tokenizer: Any) -> Any:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise AlignmentError(
            f"{type(tokenizer).__name__} is not a fast tokenizer: alignment needs a `tokenizers`-backed "
            "tokenizer (load it with AutoTokenizer.from_pretrained(..., use_fast=True))"
        )
    return backend


def _name(tokenizer: Any) -> str:
    return getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__


def byte_vocab(tokenizer: Any) -> ByteVocab:
    """The `ByteVocab` of a fast tokenizer, built once and cached for the tokenizer's lifetime.

    The cache is refreshed when the tokenizer's chat template changes (the end-of-turn role comes
    from it).
    """
    with _LOCK:
        cached = _CACHE.get(tokenizer)
        if cached is not None and cached.chat_template == getattr(tokenizer, "chat_template", None):
            return cached
        vocab = _build(tokenizer)
        _CACHE[tokenizer] = vocab
        return vocab


def _build(tokenizer: Any) -> ByteVocab:
    backend = _backend(tokenizer)
    name = _name(tokenizer)
    decoder = backend.decoder
    plan = _plan_decoder(json.loads(decoder.__getstate__()) if decoder is not None else None, name)
    token_to_id = backend.get_vocab(with_added_tokens=True)
    size = max(token_to_id.values()) + 1 if token_to_id else 0
    size = max(size, len(tokenizer))
    tokens: list[str | None] = [None] * size
    for token, token_id in token_to_id.items():
        tokens[token_id] = token
    added = backend.get_added_tokens_decoder()

    pieces: list[bytes] = [b""] * size
    roles = np.zeros(size, dtype=np.int8)
    contents: dict[int, str] = {}
    for token_id, token in enumerate(tokens):
        if token is None:
            roles[token_id] = Role.INVALID
        elif token_id in added:
            at = added[token_id]
            if at.special:
                roles[token_id] = Role.CONTROL
                contents[token_id] = at.content
            else:
                # An added token is matched on raw text when encoding: its content is its text.
                pieces[token_id] = at.content.encode("utf-8")
        else:
            pieces[token_id] = _apply_steps(token, plan.steps)

    def special_id(attr: str) -> int | None:
        value = getattr(tokenizer, attr, None)
        return value if isinstance(value, int) and 0 <= value < size and value in contents else None

    bos_id = special_id("bos_token_id")
    eos_id = special_id("eos_token_id")
    end_of_turn = _template_end_of_turn(tokenizer, set(contents))
    end_ids = tuple(dict.fromkeys(i for i in (eos_id, end_of_turn) if i is not None))
    for attr, role in (("unk_token_id", Role.UNK), ("pad_token_id", Role.PAD)):
        token_id = special_id(attr)
        if token_id is not None:
            roles[token_id] = role
    if bos_id is not None:
        roles[bos_id] = Role.BOS
    for token_id in end_ids:
        roles[token_id] = Role.END

    adds_bos = False
    if bos_id is not None:
        probe = backend.encode("a", add_special_tokens=True).ids
        adds_bos = bool(probe) and probe[0] == bos_id

    lengths = np.fromiter(map(len, pieces), dtype=np.int64, count=size)
    return ByteVocab(
        name=name,
        pieces=pieces,
        lengths=lengths,
        table=np.frombuffer(b"".join(pieces), dtype=np.uint8),
        offsets=np.cumsum(lengths) - lengths,
        roles=roles,
        contents=contents,
        strip_start=plan.strip_start,
        strip_char=plan.strip_char,
        bos_id=bos_id,
        end_ids=end_ids,
        end_of_turn_id=end_of_turn if end_of_turn is not None else eos_id,
        adds_bos=adds_bos,
        chat_template=getattr(tokenizer, "chat_template", None),
    )


def _continuation_spec(spec: dict[str, Any]) -> dict[str, Any]:
    """A tokenizer spec that never adds a start-of-text marker: text is encoded as a continuation."""

    def pre(node: dict[str, Any] | None) -> dict[str, Any] | None:
        if node is None:
            return None
        if node["type"] == "Sequence":
            node["pretokenizers"] = [pre(child) for child in node["pretokenizers"]]
        elif node["type"] == "Metaspace":
            node["prepend_scheme"] = "never"
            node.pop("add_prefix_space", None)
        elif node["type"] == "ByteLevel":
            node["add_prefix_space"] = False
        return node

    def norm(node: dict[str, Any] | None) -> dict[str, Any] | None:
        if node is None or node["type"] == "Prepend":
            return None
        if node["type"] == "Sequence":
            node["normalizers"] = [n for n in (norm(child) for child in node["normalizers"]) if n is not None]
        return node

    spec["pre_tokenizer"] = pre(spec.get("pre_tokenizer"))
    spec["normalizer"] = norm(spec.get("normalizer"))
    spec["post_processor"] = None
    spec["truncation"] = None
    spec["padding"] = None
    return spec


def encode_continuation(tokenizer: Any, text: str) -> list[int]:
    """Token ids of `text` as the tokenizer would produce it in the middle of a sequence.

    Unlike `tokenizer.encode(text)`, no start-of-text marker is added (SentencePiece's prepended "▁",
    a ByteLevel prefix space), no BOS/EOS, and special-token strings inside `text` stay literal
    text: the ids spell exactly `text` after whatever follows. This is how a completion is
    re-tokenized for a teacher, appended to the teacher's own prompt ids.
    """
    from tokenizers import Tokenizer

    vocab = byte_vocab(tokenizer)
    if vocab._continuation is None:
        backend = _backend(tokenizer)
        clone = Tokenizer.from_str(json.dumps(_continuation_spec(json.loads(backend.to_str()))))
        clone.encode_special_tokens = True
        vocab._continuation = clone
    return vocab._continuation.encode(text, add_special_tokens=False).ids
