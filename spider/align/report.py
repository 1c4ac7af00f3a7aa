"""What an alignment could and could not match, as numbers a trainer logs every step.

`AlignmentReport.of(alignment, specials=..., ...)` summarizes one completion; `AlignmentReport.merge`
adds reports up (a batch, a probe set); `to_metrics()` flattens one for logging.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Iterable

import numpy as np

from spider.align.core import Alignment


@dataclass(frozen=True)
class SpecialMapping:
    """One student control token and the teacher token it was scored as (None: dropped)."""

    role: str
    student_id: int
    student_token: str
    teacher_id: int | None
    teacher_token: str | None


@dataclass
class AlignmentReport:
    """Counts over one or more aligned completions.

    `group_sizes` is the joint histogram of group shapes, keyed `"s:t"` (student tokens : teacher
    tokens), e.g. `{"1:1": 812, "2:1": 40, "1:2": 17}`. `round_trip_ok` says the teacher's
    completion tokens spell the student's text byte for byte; `template_keeps_completion` says the
    teacher's own chat template, rendering the conversation with the completion as an assistant
    turn, contains the completion text unchanged (None when not checked).
    """

    completions: int = 0
    student_tokens: int = 0
    teacher_tokens: int = 0
    student_bytes: int = 0
    teacher_bytes: int = 0
    unaligned_student_tokens: int = 0
    unaligned_teacher_tokens: int = 0
    unaligned_student_bytes: int = 0
    unaligned_teacher_bytes: int = 0
    groups: int = 0
    unaligned_groups: int = 0
    group_sizes: dict[str, int] = field(default_factory=dict)
    specials_mapped: list[SpecialMapping] = field(default_factory=list)
    specials_unmapped: int = 0
    special_mismatches: int = 0
    round_trip_ok: bool = True
    template_keeps_completion: bool | None = None
    notes: list[str] = field(default_factory=list)

    @classmethod
    def of(
        cls,
        alignment: Alignment,
        *,
        specials: Iterable[SpecialMapping] = (),
        template_keeps_completion: bool | None = None,
        notes: Iterable[str] = (),
    ) -> "AlignmentReport":
        bounds = alignment.bounds
        shapes = Counter(
            f"{s}:{t}" for s, t in zip((bounds[:, 1] - bounds[:, 0]).tolist(), (bounds[:, 3] - bounds[:, 2]).tolist())
        )
        specials = list(specials)
        notes = list(notes)
        if not alignment.exact:
            notes.append(
                f"texts differ: {alignment.student_unaligned_bytes} student bytes and "
                f"{alignment.teacher_unaligned_bytes} teacher bytes unmatched"
            )
        return cls(
            completions=1,
            student_tokens=alignment.num_student_tokens,
            teacher_tokens=alignment.num_teacher_tokens,
            student_bytes=alignment.student_bytes,
            teacher_bytes=alignment.teacher_bytes,
            unaligned_student_tokens=alignment.unaligned_student_tokens,
            unaligned_teacher_tokens=alignment.unaligned_teacher_tokens,
            unaligned_student_bytes=alignment.student_unaligned_bytes,
            unaligned_teacher_bytes=alignment.teacher_unaligned_bytes,
            groups=int(bounds.shape[0]),
            unaligned_groups=int((~alignment.aligned).sum()),
            group_sizes=dict(shapes),
            specials_mapped=[m for m in specials if m.teacher_id is not None],
            specials_unmapped=sum(1 for m in specials if m.teacher_id is None),
            special_mismatches=alignment.special_mismatches,
            round_trip_ok=alignment.exact,
            template_keeps_completion=template_keeps_completion,
            notes=notes,
        )

    @classmethod
    def merge(cls, reports: Iterable["AlignmentReport"]) -> "AlignmentReport":
        total = cls()
        shapes: Counter[str] = Counter()
        for r in reports:
            for name in (
                "completions", "student_tokens", "teacher_tokens", "student_bytes", "teacher_bytes",
                "unaligned_student_tokens", "unaligned_teacher_tokens", "unaligned_student_bytes",
                "unaligned_teacher_bytes", "groups", "unaligned_groups", "specials_unmapped", "special_mismatches",
            ):
                setattr(total, name, getattr(total, name) + getattr(r, name))
            shapes.update(r.group_sizes)
            total.specials_mapped.extend(r.specials_mapped)
            total.round_trip_ok = total.round_trip_ok and r.round_trip_ok
            if r.template_keeps_completion is not None:
                kept = total.template_keeps_completion
                total.template_keeps_completion = r.template_keeps_completion if kept is None else kept and r.template_keeps_completion
            total.notes.extend(r.notes)
        total.group_sizes = dict(shapes)
        return total

    @property
    def aligned_byte_fraction(self) -> float:
        total = self.student_bytes + self.teacher_bytes
        return 1.0 if total == 0 else 1.0 - (self.unaligned_student_bytes + self.unaligned_teacher_bytes) / total

    @property
    def aligned_token_fraction(self) -> float:
        total = self.student_tokens + self.teacher_tokens
        return 1.0 if total == 0 else 1.0 - (self.unaligned_student_tokens + self.unaligned_teacher_tokens) / total

    @property
    def teacher_tokens_per_student_token(self) -> float:
        return self.teacher_tokens / self.student_tokens if self.student_tokens else float("nan")

    @property
    def student_tokens_per_group(self) -> float:
        return self.student_tokens / self.groups if self.groups else float("nan")

    @property
    def teacher_tokens_per_group(self) -> float:
        return self.teacher_tokens / self.groups if self.groups else float("nan")

    def to_metrics(self, prefix: str = "align/") -> dict[str, float]:
        """Flat numbers for a step log; group shapes beyond 4 tokens on a side are bucketed as "5+"."""
        metrics = {
            "aligned_byte_fraction": self.aligned_byte_fraction,
            "aligned_token_fraction": self.aligned_token_fraction,
            "unaligned_student_tokens": float(self.unaligned_student_tokens),
            "unaligned_teacher_tokens": float(self.unaligned_teacher_tokens),
            "unaligned_student_bytes": float(self.unaligned_student_bytes),
            "unaligned_teacher_bytes": float(self.unaligned_teacher_bytes),
            "groups": float(self.groups),
            "student_tokens_per_group": self.student_tokens_per_group,
            "teacher_tokens_per_group": self.teacher_tokens_per_group,
            "teacher_tokens_per_student_token": self.teacher_tokens_per_student_token,
            "specials_mapped": float(len(self.specials_mapped)),
            "specials_unmapped": float(self.specials_unmapped),
            "special_mismatches": float(self.special_mismatches),
            "round_trip_ok": float(self.round_trip_ok),
        }
        if self.template_keeps_completion is not None:
            metrics["template_keeps_completion"] = float(self.template_keeps_completion)
        buckets: Counter[str] = Counter()
        for shape, count in self.group_sizes.items():
            s, t = (int(x) for x in shape.split(":"))
            buckets[f"{s if s <= 4 else '5+'}x{t if t <= 4 else '5+'}"] += count
        for shape, count in sorted(buckets.items()):
            metrics[f"group_share/{shape}"] = count / self.groups if self.groups else 0.0
        return {prefix + k: float(v) for k, v in metrics.items()}

    def summary(self) -> str:
        """One paragraph for a log line or an error message."""
        shapes = ", ".join(f"{k}={v}" for k, v in sorted(self.group_sizes.items(), key=lambda kv: -kv[1])[:6])
        specials = ", ".join(sorted({f"{m.student_token}->{m.teacher_token}" for m in self.specials_mapped}))
        text = (
            f"{self.completions} completion(s): aligned {self.aligned_byte_fraction:.2%} of bytes and "
            f"{self.aligned_token_fraction:.2%} of tokens; unaligned student/teacher tokens "
            f"{self.unaligned_student_tokens}/{self.unaligned_teacher_tokens}, bytes "
            f"{self.unaligned_student_bytes}/{self.unaligned_teacher_bytes}; {self.groups} groups ({shapes}); "
            f"{np.round(self.teacher_tokens_per_student_token, 3)} teacher tokens per student token; "
            f"specials mapped [{specials}], unmapped {self.specials_unmapped}, role mismatches "
            f"{self.special_mismatches}; round trip {'ok' if self.round_trip_ok else 'FAILED'}"
        )
        if self.template_keeps_completion is False:
            text += "; the teacher's chat template rewrites the completion when rendering it as an assistant turn"
        if self.notes:
            unique = list(dict.fromkeys(self.notes))
            text += "; notes: " + " | ".join(unique[:5]) + (f" (+{len(unique) - 5} more)" if len(unique) > 5 else "")
        return text
