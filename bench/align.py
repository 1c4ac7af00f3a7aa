"""Cross-tokenizer alignment speed: spider.align against two baselines, same process, same inputs.

Baselines:
* decode-buffer: per token, decode the prefix to get its piece; grow a student buffer and a
  teacher buffer, appending to the shorter, until their NFC-normalized decodes are equal; flush.
* TRL GOLD (`trl.experimental.gold`): byte offsets from ids with `piece_byte_len` (its on-policy
  path), the teacher's from `encode_with_byte_offsets`, groups from `ULDLoss._align_by_byte_offsets`.
  It supports ByteLevel tokenizers only, so pairs with the SentencePiece tokenizer show n/a.

Modes: "align" starts from student ids and teacher ids; "align+retok" starts from student ids,
re-tokenizes the text for the teacher, then aligns (spider: `teacher_inputs_for_completion`, which
also renders the teacher's prompt and builds the report). Times are the best of several runs.

    .venv/bin/python bench/align.py                       # all pairs, 256 / 4k / 32k tokens
    .venv/bin/python bench/align.py --decode-buffer-32k none --sizes 256 4096
"""

from __future__ import annotations

import argparse
import inspect
import itertools
import os
import random
import sys
import time
import unicodedata
from pathlib import Path
from typing import Any, Callable

os.environ.setdefault("OMP_NUM_THREADS", "2")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

import tokenizers_offline  # noqa: E402
from spider.align import align_tokens, byte_vocab, encode_continuation, teacher_inputs_for_completion  # noqa: E402
from spider.align.core import TokenSide, align_sides  # noqa: E402
from spider.types import Message  # noqa: E402

SIZES = (256, 4096, 32768)
CONVERSATION = [Message("system", "You are a helpful assistant."), Message("user", "Write a long answer.")]

PROSE = [
    "The committee met on Tuesday to review the budget; after a long discussion, it approved the plan with two amendments.",
    "Distillation trains a small student to imitate a larger teacher, token by token, on the student's own samples.",
    "If the request fails, retry with exponential backoff (1 s, 2 s, 4 s) and give up after five attempts.",
    "She said: \"It's not what we expected — but it's what we needed.\" Then she left.",
    "Prices rose 3.2% in March, while wages grew 4.1%; economists called it 'a modest relief'.",
]
MULTILINGUAL = [
    "Le café était fermé, alors nous sommes allés à la bibliothèque près de la gare.",
    "Straße, Grüße und Äpfel — das übliche Durcheinander vor dem Wochenende.",
    "Привет! Как дела? Всё хорошо, спасибо, а у тебя?",
    "東京は日本の首都です。人口は約千四百万人で、多くの観光客が訪れます。",
    "北京是中国的首都，也是一座历史悠久的城市，有很多名胜古迹。",
    "서울은 대한민국의 수도이며, 한강이 도시를 가로지릅니다.",
    "שלום, מה שלומך היום? אני בסדר, תודה.",
    "مرحبا بك في عالم البرمجة، حيث كل شيء ممكن.",
    "Καλημέρα κόσμε! Η γλώσσα είναι ελληνική.",
    "नमस्ते दुनिया, यह एक परीक्षण वाक्य है।",
]
SYMBOLS = [
    "Great job! 🎉🎉 Let's ship it 🚀", "Weather: ☀️ 23 °C, 🌧️ tomorrow, 🌡️ 18 °C at night",
    "👩‍💻👨‍🔬 team from 🇫🇷🇯🇵🇧🇷", "✅ done ❌ failed ⚠️ pending 🔁 retrying",
    "∑_{i=1}^{n} x_i² ≤ ∞, λ → 0, ∀ε > 0 ∃δ > 0", "3 × 4 = 12; π ≈ 3.14159; √2 ≈ 1.414; ½ + ¼ = ¾",
    "| name | value |\n|------|-------|\n| α    | 0.5   |\n| β    | 2     |",
]
SPACING = ["\n\n", "\n", "\t", "    ", "  ", "\r\n", "\n\n\n"]


def corpus(min_chars: int, seed: int = 0) -> str:
    """A deterministic mix of prose, code, many scripts, emoji, math and whitespace runs (NFC)."""
    import argparse as _argparse
    import difflib
    import json.decoder
    import textwrap

    code_lines: list[str] = []
    for module in (difflib, textwrap, json.decoder, _argparse):
        code_lines.extend(inspect.getsource(module).splitlines(keepends=True))
    rng = random.Random(seed)
    parts: list[str] = []
    size = 0
    while size < min_chars:
        kind = rng.random()
        if kind < 0.3:
            start = rng.randrange(len(code_lines) - 30)
            piece = "```python\n" + "".join(code_lines[start : start + rng.randint(5, 25)]) + "```"
        elif kind < 0.55:
            piece = " ".join(rng.choice(PROSE) for _ in range(rng.randint(1, 4)))
        elif kind < 0.8:
            piece = " ".join(rng.choice(MULTILINGUAL) for _ in range(rng.randint(1, 3)))
        else:
            piece = rng.choice(SYMBOLS)
        parts.append(piece + rng.choice(SPACING))
        size += len(parts[-1])
    return unicodedata.normalize("NFC", "".join(parts))


# ---------------------------------------------------------------- decode-buffer baseline


def decode_buffer_pieces(tok: Any, ids: list[int]) -> list[str]:
    """Each token's piece as the growth of the decoded prefix."""
    pieces, previous = [], ""
    for k in range(1, len(ids) + 1):
        current = tok.decode(ids[:k])
        pieces.append(current[len(previous):])
        previous = current
    return pieces


def decode_buffer_groups(s_pieces: list[str], t_pieces: list[str]) -> list[tuple[int, int, int, int]]:
    nfc = lambda text: unicodedata.normalize("NFC", text)  # noqa: E731
    groups = []
    i = j = 0
    n_s, n_t = len(s_pieces), len(t_pieces)
    while i < n_s or j < n_t:
        s0, t0 = i, j
        s_buf = t_buf = ""
        if i < n_s:
            s_buf, i = s_pieces[i], i + 1
        if j < n_t:
            t_buf, j = t_pieces[j], j + 1
        while nfc(s_buf) != nfc(t_buf) and (i < n_s or j < n_t):
            if (len(s_buf) <= len(t_buf) and i < n_s) or j >= n_t:
                s_buf, i = s_buf + s_pieces[i], i + 1
            else:
                t_buf, j = t_buf + t_pieces[j], j + 1
        groups.append((s0, i, t0, j))
    return groups


def decode_buffer_align(s_tok: Any, s_ids: list[int], t_tok: Any, t_ids: list[int]) -> list[tuple[int, int, int, int]]:
    return decode_buffer_groups(decode_buffer_pieces(s_tok, s_ids), decode_buffer_pieces(t_tok, t_ids))


def decode_buffer_retok(s_tok: Any, s_ids: list[int], t_tok: Any) -> list[tuple[int, int, int, int]]:
    text = s_tok.decode(s_ids)
    t_ids = t_tok(text, add_special_tokens=False)["input_ids"]
    return decode_buffer_align(s_tok, s_ids, t_tok, t_ids)


# ---------------------------------------------------------------- TRL GOLD baseline


def trl_available(tok: Any) -> bool:
    from trl.experimental.utils import is_byte_level_tokenizer

    return is_byte_level_tokenizer(tok.backend_tokenizer)


def trl_offsets_from_ids(tok: Any, ids: list[int]) -> list[tuple[int, int]]:
    """TRL GOLD's on-policy byte offsets (GOLDTrainer._maybe_add_completion_byte_offsets)."""
    from trl.experimental.utils import piece_byte_len

    offsets, cumulative = [], 0
    for token_id in ids:
        size = piece_byte_len(tok.convert_ids_to_tokens([token_id])[0])
        offsets.append((cumulative, cumulative + size))
        cumulative += size
    return offsets


def trl_groups(s_groups: list[list[int]], t_groups: list[list[int]], n_s: int, n_t: int) -> list[tuple[int, int, int, int]]:
    out, s_pos, t_pos = [], 0, 0
    for sg, tg in zip(s_groups, t_groups):
        out.append((s_pos, s_pos + len(sg), t_pos, t_pos + len(tg)))
        s_pos, t_pos = s_pos + len(sg), t_pos + len(tg)
    return out


def trl_align(s_tok: Any, s_ids: list[int], t_tok: Any, t_ids: list[int]):
    from trl.experimental.gold.gold_trainer import ULDLoss

    return ULDLoss._align_by_byte_offsets(trl_offsets_from_ids(s_tok, s_ids), trl_offsets_from_ids(t_tok, t_ids))


def trl_retok(s_tok: Any, s_ids: list[int], t_tok: Any):
    from trl.experimental.gold.gold_trainer import ULDLoss
    from trl.experimental.utils import encode_with_byte_offsets

    text = s_tok.decode(s_ids, skip_special_tokens=True)
    s_offsets = trl_offsets_from_ids(s_tok, s_ids)
    [(_, t_offsets)] = encode_with_byte_offsets(t_tok.backend_tokenizer, [text], add_special_tokens=False)
    return ULDLoss._align_by_byte_offsets(s_offsets, t_offsets)


# ---------------------------------------------------------------- harness


def best_time(fn: Callable[[], Any], budget_s: float = 0.5, max_reps: int = 200) -> tuple[float, Any]:
    """Best wall time of `fn` over as many runs as fit the budget, and its result. The first run
    counts only when it alone exceeds the budget (the quadratic baseline at large sizes)."""
    start = time.perf_counter()
    result = fn()
    first = time.perf_counter() - start
    if first > budget_s:
        return first, result
    times = [first]
    spent = first
    while spent < budget_s and len(times) < max_reps:
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
        spent += times[-1]
    return (min(times[1:]) if len(times) > 1 else first), result


def completion_ids(tok: Any, text_ids: list[int], size: int) -> list[int]:
    """The first `size` ids, minus trailing tokens that would cut a character (valid UTF-8 text)."""
    ids = text_ids[:size]
    vocab = byte_vocab(tok)
    while ids:
        try:
            vocab.text_bytes(np.asarray(ids), at_start=False).decode("utf-8")
            return ids
        except UnicodeDecodeError:
            ids = ids[:-1]
    return ids


def fmt_ms(seconds: float | None) -> str:
    return "n/a" if seconds is None else (f"{seconds * 1e3:.2f}" if seconds < 10 else f"{seconds * 1e3:.0f}")


def fmt_ratio(base: float | None, ours: float) -> str:
    return "n/a" if base is None else f"{base / ours:.0f}x" if base / ours >= 10 else f"{base / ours:.1f}x"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=list(SIZES))
    parser.add_argument("--decode-buffer-32k", choices=["one", "all", "none"], default="one",
                        help="the decode-buffer baseline is quadratic (over 10 min per pair at 32k here): "
                        "run it for the first pair only, all, or none")
    parser.add_argument("--pairs", nargs="*", default=None, help="student:teacher names (default: all 9)")
    args = parser.parse_args()

    import warnings

    warnings.filterwarnings("ignore", message="TRL currently supports vLLM")
    import trl.experimental.gold.gold_trainer  # noqa: F401  (imported here, outside every timing)

    toks = tokenizers_offline.all_tokenizers()
    names = list(toks)
    pairs = [tuple(p.split(":")) for p in args.pairs] if args.pairs else list(itertools.product(names, names))
    text = corpus(min_chars=max(args.sizes) * 6)
    ids_of = {name: encode_continuation(tok, text) for name, tok in toks.items()}
    for tok in toks.values():  # build byte tables and continuation encoders outside the timings
        encode_continuation(tok, "warm")
    print(f"corpus: {len(text)} chars; machine: {os.cpu_count()} cores; OMP_NUM_THREADS={os.environ['OMP_NUM_THREADS']}\n")

    align_rows, retok_rows, core_rows = [], [], []
    one_pair_32k = pairs[0]
    for (student, teacher), size in itertools.product(pairs, args.sizes):
        s_tok, t_tok = toks[student], toks[teacher]
        s_ids = completion_ids(s_tok, ids_of[student], size)
        s_text = byte_vocab(s_tok).text_bytes(np.asarray(s_ids), at_start=False).decode()
        t_ids = encode_continuation(t_tok, s_text)
        label = f"{student} → {teacher}"
        trl_ok = trl_available(s_tok) and trl_available(t_tok)
        run_decode_buffer = size < 32768 or args.decode_buffer_32k == "all" or (
            args.decode_buffer_32k == "one" and (student, teacher) == one_pair_32k
        )

        # alignment alone
        ours, alignment = best_time(lambda: align_tokens(s_tok, s_ids, t_tok, t_ids, continuation=True))
        ours_list, _ = best_time(lambda: align_tokens(s_tok, s_ids, t_tok, t_ids, continuation=True).groups)
        assert alignment.exact, label
        db = trl = None
        db_agree = trl_agree = "n/a"
        if run_decode_buffer:
            db, db_groups = best_time(lambda: decode_buffer_align(s_tok, s_ids, t_tok, t_ids), budget_s=1.0)
            same = len(set(db_groups) & set(alignment.groups))
            db_agree = f"{same / len(alignment.groups):.1%}"
        if trl_ok:
            trl, (s_groups, t_groups) = best_time(lambda: trl_align(s_tok, s_ids, t_tok, t_ids))
            trl_agree = "yes" if trl_groups(s_groups, t_groups, len(s_ids), len(t_ids)) == alignment.groups else "NO"
        align_rows.append((label, len(s_ids), len(t_ids), ours, ours_list, db, trl, db_agree, trl_agree))

        # alignment + teacher re-tokenization
        ours_rt, _ = best_time(lambda: teacher_inputs_for_completion(CONVERSATION, s_ids, s_tok, t_tok, check_template=False))
        db_rt = trl_rt = None
        if run_decode_buffer and size < 32768:
            db_rt, _ = best_time(lambda: decode_buffer_retok(s_tok, s_ids, t_tok), budget_s=1.0)
        if trl_ok:
            trl_rt, _ = best_time(lambda: trl_retok(s_tok, s_ids, t_tok))
        retok_rows.append((label, len(s_ids), ours_rt, db_rt, trl_rt))

        # the grouping pass alone, on byte spans built outside the timing
        if trl_ok:
            from trl.experimental.gold.gold_trainer import ULDLoss

            s_side = TokenSide.of(s_tok, s_ids, "student", at_start=False)
            t_side = TokenSide.of(t_tok, t_ids, "teacher", at_start=False)
            s_offs, t_offs = trl_offsets_from_ids(s_tok, s_ids), trl_offsets_from_ids(t_tok, t_ids)
            core, _ = best_time(lambda: align_sides(s_side, t_side))
            trl_core, _ = best_time(lambda: ULDLoss._align_by_byte_offsets(s_offs, t_offs))
            core_rows.append((label, len(s_ids), core, trl_core))
        print(f"  done {label} @ {size}", file=sys.stderr, flush=True)

    print("### Alignment alone (student ids + teacher ids -> groups)\n")
    print("| pair | student tokens | teacher tokens | spider ms | spider µs/token | spider + `.groups` list ms "
          "| decode-buffer ms | vs decode-buffer | TRL GOLD ms | vs TRL | same groups as decode-buffer | same groups as TRL |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for label, n_s, n_t, ours, ours_list, db, trl, db_agree, trl_agree in align_rows:
        print(f"| {label} | {n_s} | {n_t} | {fmt_ms(ours)} | {ours / n_s * 1e6:.3f} | {fmt_ms(ours_list)} | {fmt_ms(db)} "
              f"| {fmt_ratio(db, ours)} | {fmt_ms(trl)} | {fmt_ratio(trl, ours)} | {db_agree} | {trl_agree} |")

    print("\n### Alignment + teacher re-tokenization (student ids -> teacher ids + groups)\n")
    print("| pair | student tokens | spider ms | spider µs/token | decode-buffer ms | vs decode-buffer | TRL GOLD ms | vs TRL |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for label, n_s, ours, db, trl in retok_rows:
        print(f"| {label} | {n_s} | {fmt_ms(ours)} | {ours / n_s * 1e6:.3f} | {fmt_ms(db)} | {fmt_ratio(db, ours)} "
              f"| {fmt_ms(trl)} | {fmt_ratio(trl, ours)} |")

    print("\n### Grouping pass alone, on byte spans built outside the timing (ByteLevel pairs)\n")
    print("| pair | student tokens | spider `align_sides` ms | TRL `_align_by_byte_offsets` ms | vs TRL |")
    print("|---|---:|---:|---:|---:|")
    for label, n_s, core, trl_core in core_rows:
        print(f"| {label} | {n_s} | {fmt_ms(core)} | {fmt_ms(trl_core)} | {fmt_ratio(trl_core, core)} |")

    print("\n### Cost per token across sizes (spider, alignment alone)\n")
    print("| pair | " + " | ".join(f"µs/token @ {s}" for s in args.sizes) + " | largest / 4k |")
    print("|---|" + "---:|" * (len(args.sizes) + 1))
    by_pair: dict[str, dict[int, float]] = {}
    for (label, n_s, _, ours, *_), size in zip(align_rows, itertools.cycle(args.sizes)):
        by_pair.setdefault(label, {})[size] = ours / n_s * 1e6
    for label, costs in by_pair.items():
        ref = costs.get(4096)
        growth = f"{costs[max(args.sizes)] / ref:.2f}" if ref else "n/a"
        print(f"| {label} | " + " | ".join(f"{costs[s]:.3f}" for s in args.sizes) + f" | {growth} |")


if __name__ == "__main__":
    main()
