"""One on-policy distillation step, top to bottom::

    prompts  = run.data.batch(step)                    # groups_per_batch prompts, a seeded order per epoch
    sampler  = run.backend.sampler(run.sampler_path)   # exactly the weights the previous step saved
    groups   = sample_groups(sampler, prompts, ...)    # group_size student conversations per prompt
    scored   = score_turns(run.teacher, groups)        # teacher log-probs on the student's own tokens
    data     = assemble(scored, kl_penalty_coef, kl_discount_factor)
    for chunk in substeps(data, num_substeps):
        run.backend.train_step(chunk, loss_fn, adam(step))   # forward_backward + optim_step
    run.sampler_path = run.backend.save_weights_for_sampler(f"step-{step + 1}")

The advantage of a student token is `-kl_penalty_coef * (logp_student - logp_teacher)`: the
per-token reverse KL (a sampled estimate: one sample per position, under the student's own
distribution), discounted over the tokens that follow when `kl_discount_factor` > 0. Only tokens
the student sampled carry an advantage; prompts, tool outputs and template tokens are context.

A multi-turn conversation (tools, simulated user) is one sequence when every turn's prompt extends
the previous turn's prompt and answer token for token (a prefix-preserving template); otherwise
each assistant turn is trained as its own sequence, and the step's metrics say how many were.
"""

from __future__ import annotations

import asyncio
import hashlib
import math
import random
import time
from dataclasses import dataclass, field
from typing import Any, Protocol, Sequence

import numpy as np

from spider.engines.base import Engine, SamplingParams
from spider.rollouts.conversation import Limits, Policy, Trajectory, run_conversation
from spider.rollouts.tools import ToolExecutor
from spider.train.backend import AdamParams, Datum, TrainingBackend
from spider.train.losses import learning_rate, reverse_kl_advantages
from spider.train.teacher import TeacherItem, TeacherScore
from spider.types import Message

# What an inexact token counts as when its completion has no exactly aligned token at all.
MISSING_TEACHER_LOGPROB = -30.0


# -- what the loop is given -------------------------------------------------------------------


class Scorer(Protocol):
    def score(self, items: list[TeacherItem]) -> list[TeacherScore]: ...


@dataclass
class Prompt:
    """A training prompt: the source row's conversation start, and its index in the source."""

    index: int
    messages: list[Message]


@dataclass
class TrainData:
    """The rows a run trains on and the held-out rows it evaluates on. `batch(step)` is a pure
    function of the step: a resumed run reads exactly the prompts the lost one would have."""

    rows: list[Prompt]
    eval_rows: list[Prompt]
    groups_per_batch: int
    seed: int = 0

    def batch(self, step: int) -> list[Prompt]:
        per_epoch = max(1, len(self.rows) // self.groups_per_batch)
        epoch, offset = divmod(step, per_epoch)
        order = list(range(len(self.rows)))
        random.Random(f"{self.seed}:{epoch}").shuffle(order)
        start = offset * self.groups_per_batch
        picked = [order[(start + k) % len(order)] for k in range(self.groups_per_batch)]
        return [self.rows[i] for i in picked]


@dataclass
class Settings:
    """The step's knobs (from on_policy_options)."""

    group_size: int
    max_tokens: int
    temperature: float
    learning_rate: float
    lr_schedule: str
    warmup_steps: int
    total_steps: int
    num_substeps: int
    kl_penalty_coef: float
    kl_discount_factor: float
    loss_fn: str
    loss_fn_config: dict[str, float] | None
    adam_beta1: float
    adam_beta2: float
    adam_eps: float
    weight_decay: float
    max_grad_norm: float
    compute_post_kl: bool
    seed: int = 0
    max_tool_turns: int = 8
    tool_choice: str = "auto"

    def adam(self, step: int) -> AdamParams:
        lr = learning_rate(step, self.total_steps, self.learning_rate, self.lr_schedule, self.warmup_steps)
        return AdamParams(
            learning_rate=lr,
            beta1=self.adam_beta1,
            beta2=self.adam_beta2,
            eps=self.adam_eps,
            weight_decay=self.weight_decay,
            grad_clip_norm=self.max_grad_norm,
        )


@dataclass
class TrainRun:
    """Everything a step needs, kept warm between steps (and between segments on one worker)."""

    settings: Settings
    backend: TrainingBackend
    teacher: Scorer
    data: TrainData
    sampler_path: str
    tools: ToolExecutor | None = None
    parser: Any = None  # spider.rollouts.parsers.ToolCallParser, when tools are offered
    user: Any = None  # spider.rollouts.users.SimulatedUser
    _sampler: tuple[str, Engine] | None = field(default=None, repr=False)

    def sampler(self) -> Engine:
        """The engine for `sampler_path`: a new one whenever the path changes, never a stale one."""
        if self._sampler is None or self._sampler[0] != self.sampler_path:
            if self._sampler is not None:
                self._sampler[1].close()
            self._sampler = (self.sampler_path, self.backend.sampler(self.sampler_path))
        return self._sampler[1]

    def close_sampler(self) -> None:
        if self._sampler is not None:
            self._sampler[1].close()
            self._sampler = None


# -- sampling ---------------------------------------------------------------------------------


def request_seed(seed: int, step: int, row: int, sample: int) -> int:
    """A sampling seed per (step, row, sample): the same on a resumed run, whatever the batching."""
    digest = hashlib.sha256(f"{seed}:{step}:{row}:{sample}".encode()).digest()
    return int.from_bytes(digest[:4], "little")


async def sample_groups(run: TrainRun, prompts: list[Prompt], step: int, group_size: int) -> list[list[Trajectory]]:
    """`group_size` student conversations per prompt, all in the sampler at once."""
    s = run.settings
    params = SamplingParams(temperature=s.temperature, max_tokens=s.max_tokens, logprobs=True)
    policy = Policy(run.sampler(), params, run.parser, return_tokens=True)
    limits = Limits(max_tool_turns=s.max_tool_turns, tool_choice=s.tool_choice)

    async def one(prompt: Prompt, k: int) -> Trajectory:
        return await run_conversation(
            f"s{step}:r{prompt.index}:{k}", list(prompt.messages), policy, run.tools, run.user, limits,
            seed=request_seed(s.seed, step, prompt.index, k),
        )

    flat = await asyncio.gather(*(one(p, k) for p in prompts for k in range(group_size)))
    return [list(flat[i * group_size : (i + 1) * group_size]) for i in range(len(prompts))]


# -- scoring ----------------------------------------------------------------------------------


@dataclass
class ScoredTurn:
    """One assistant turn of a student conversation with the teacher's view of it."""

    prompt_ids: list[int]
    token_ids: list[int]
    sampler_logprobs: np.ndarray
    teacher: TeacherScore


def assistant_turns(trajectory: Trajectory, tools: list[dict[str, Any]] | None) -> list[tuple[TeacherItem, Any]]:
    """(what the teacher scores, the turn's info) for every sampled assistant turn, in order."""
    out = []
    turn_iter = iter(trajectory.turns)
    for position, message in enumerate(trajectory.messages):
        if message.role != "assistant":
            continue
        turn = next(turn_iter, None)
        if turn is None:
            break
        if not turn.token_ids:
            continue
        out.append((TeacherItem(trajectory.messages[:position], list(turn.token_ids), tools), turn))
    return out


def score_turns(run: TrainRun, groups: list[list[Trajectory]]) -> list[list[list[ScoredTurn]]]:
    """The teacher's scores of every assistant turn of every conversation, in one scoring call."""
    schemas = run.tools.schemas if run.tools is not None else None
    layout: list[tuple[int, int]] = []
    items: list[TeacherItem] = []
    infos: list[Any] = []
    for g, group in enumerate(groups):
        for k, trajectory in enumerate(group):
            if trajectory.error is not None:
                continue
            for item, turn in assistant_turns(trajectory, schemas):
                layout.append((g, k))
                items.append(item)
                infos.append(turn)
    scores = run.teacher.score(items) if items else []
    out: list[list[list[ScoredTurn]]] = [[[] for _ in group] for group in groups]
    for (g, k), turn, score in zip(layout, infos, scores):
        logprobs = np.asarray(turn.logprobs if turn.logprobs is not None else [0.0] * len(turn.token_ids), dtype=np.float64)
        out[g][k].append(ScoredTurn(list(turn.prompt_ids or []), list(turn.token_ids), logprobs, score))
    return out


# -- assembling training data -----------------------------------------------------------------


@dataclass
class Assembled:
    data: list[Datum]
    groups: list[int]  # the prompt group of each datum (substeps split by group)
    kl_sum: float = 0.0
    kl_tokens: int = 0
    sampled_tokens: int = 0
    trained_tokens: int = 0
    unaligned_tokens: int = 0  # sampled tokens the aligner could not match exactly (trained on their group's value)
    unscored_tokens: int = 0  # sampled tokens with no exact teacher value (trained on a pessimistic one)
    aligned_kl_sum: float = 0.0
    aligned_kl_tokens: int = 0
    separate_turns: int = 0  # turns trained as their own sequence (the template is not prefix-preserving)
    score_errors: int = 0
    entropy_sum: float = 0.0
    reports: list[Any] = field(default_factory=list)
    teacher_logprobs: list[np.ndarray] = field(default_factory=list)  # per datum, per target
    kl_mask: list[np.ndarray] = field(default_factory=list)  # per datum: targets the KL counts

    @property
    def teacher_kl(self) -> float | None:
        """Mean over every sampled token of logp_student - logp_teacher (a sampled estimate)."""
        return self.kl_sum / self.kl_tokens if self.kl_tokens else None

    @property
    def aligned_teacher_kl(self) -> float | None:
        """The same over the tokens the aligner matched exactly."""
        return self.aligned_kl_sum / self.aligned_kl_tokens if self.aligned_kl_tokens else None


def usable_teacher_logprobs(values: np.ndarray, aligned: np.ndarray) -> tuple[np.ndarray, int]:
    """The teacher's value for every sampled token, and how many had no exact value of their own.

    A token the aligner could not match exactly (its bytes are not what the teacher scored: a
    lone byte of a multibyte character reaches the teacher as U+FFFD) gets the completion's
    lowest exact teacher log-prob. It must never go free, nor be judged on text it did not write:
    a token with no advantage is where every other token's negative advantage pushes probability,
    and a student trained that way learns to say what the teacher cannot score (measured: the
    exactly aligned share of a random student's tokens fell from 80% to 13% while its KL on the
    rest fell)."""
    values = np.asarray(values, dtype=np.float64).copy()
    inexact = ~aligned | ~np.isfinite(values)
    if inexact.any():
        known = values[~inexact]
        values[inexact] = known.min() if known.size else MISSING_TEACHER_LOGPROB
    return values, int(inexact.sum())


def assemble(scored: list[list[list[ScoredTurn]]], kl_penalty_coef: float, kl_discount_factor: float) -> Assembled:
    """Training data from scored conversations: advantages on sampled tokens, zero on the rest."""
    out = Assembled([], [])
    for g, group in enumerate(scored):
        for turns in group:
            sequences: list[list[tuple[ScoredTurn, np.ndarray, np.ndarray]]] = []
            tokens_so_far: list[int] | None = None
            for turn in turns:
                out.sampled_tokens += len(turn.token_ids)
                out.entropy_sum += float(-turn.sampler_logprobs.sum())
                if turn.teacher.report is not None:
                    out.reports.append(turn.teacher.report)
                if turn.teacher.error is not None or not turn.prompt_ids:
                    out.score_errors += 1
                    tokens_so_far = None
                    continue
                aligned = turn.teacher.mask.astype(bool)
                teacher, unscored = usable_teacher_logprobs(turn.teacher.logprobs, aligned)
                turn.teacher.logprobs = teacher
                out.unaligned_tokens += int((~aligned).sum())
                out.unscored_tokens += unscored
                diff = turn.sampler_logprobs - teacher
                out.kl_sum += float(diff.sum())
                out.kl_tokens += len(diff)
                out.aligned_kl_sum += float(diff[aligned].sum())
                out.aligned_kl_tokens += int(aligned.sum())
                everywhere = np.ones(len(diff), dtype=bool)
                advantages = np.asarray(
                    reverse_kl_advantages(turn.sampler_logprobs, teacher, everywhere, kl_penalty_coef, kl_discount_factor)
                )
                mask = everywhere
                extends = tokens_so_far is not None and turn.prompt_ids[: len(tokens_so_far)] == tokens_so_far
                if extends and sequences:
                    sequences[-1].append((turn, advantages, mask))
                else:
                    if sequences:
                        out.separate_turns += 1
                    sequences.append([(turn, advantages, mask)])
                tokens_so_far = turn.prompt_ids + turn.token_ids
            for sequence in sequences:
                datum, teacher, counted = _datum(sequence)
                out.data.append(datum)
                out.teacher_logprobs.append(teacher)
                out.kl_mask.append(counted)
                out.groups.append(g)
                out.trained_tokens += sum(len(t.token_ids) for t, _, _ in sequence)
    return out


def _datum(sequence: list[tuple[ScoredTurn, np.ndarray, np.ndarray]]) -> tuple[Datum, np.ndarray, np.ndarray]:
    """One sequence: the last turn's prompt (which holds the earlier turns) and its answer, with the
    sampled tokens of every turn carrying their log-probs and advantages. Also, per target, the
    teacher's log-prob and whether it counts toward the KL (aligned sampled tokens)."""
    last = sequence[-1][0]
    tokens = last.prompt_ids + last.token_ids
    logprobs = np.zeros(len(tokens))
    advantages = np.zeros(len(tokens))
    teacher = np.zeros(len(tokens))
    counted = np.zeros(len(tokens), dtype=bool)
    for turn, adv, mask in sequence:
        span = slice(len(turn.prompt_ids), len(turn.prompt_ids) + len(turn.token_ids))
        logprobs[span] = turn.sampler_logprobs
        advantages[span] = adv
        teacher[span] = turn.teacher.logprobs
        counted[span] = mask
    datum = Datum.from_sequence(tokens, logprobs=logprobs.tolist(), advantages=advantages.tolist())
    return datum, teacher[1:], counted[1:]


def substeps(assembled: Assembled, count: int) -> list[list[Datum]]:
    """Split the data into `count` chunks of whole prompt groups (each chunk one optimizer step)."""
    groups = sorted(set(assembled.groups))
    if not groups:
        return []
    count = max(1, min(count, len(groups)))
    per = math.ceil(len(groups) / count)
    chunks = []
    for i in range(0, len(groups), per):
        chosen = set(groups[i : i + per])
        chunk = [d for d, g in zip(assembled.data, assembled.groups) if g in chosen]
        if chunk:
            chunks.append(chunk)
    return chunks


# -- the step ---------------------------------------------------------------------------------


def teacher_kl_of(run: TrainRun, prompts: list[Prompt], step: int, loop: Any) -> tuple[float | None, int]:
    """The teacher's reverse KL on fresh student samples of `prompts` (one each): eval."""
    run.sampler()  # made here, off the loop: an engine may start on the loop and wait for it
    groups = loop.run(sample_groups(run, prompts, step, 1))
    assembled = assemble(score_turns(run, groups), 1.0, 0.0)
    return assembled.teacher_kl, assembled.kl_tokens


def on_policy_step(run: TrainRun, step: int, loop: Any) -> dict[str, Any]:
    """Train one step; returns its metrics (one `train.step` event, one line of metrics.jsonl).
    `loop` runs coroutines on the worker's engine loop (spider.engines.loop.engine_loop())."""
    s = run.settings
    times: dict[str, float] = {}
    started = time.perf_counter()
    prompts = run.data.batch(step)
    run.sampler()  # made here, off the loop: an engine may start on the loop and wait for it
    groups = loop.run(sample_groups(run, prompts, step, s.group_size))
    times["sample_s"] = time.perf_counter() - started

    mark = time.perf_counter()
    scored = score_turns(run, groups)
    times["teacher_s"] = time.perf_counter() - mark

    assembled = assemble(scored, s.kl_penalty_coef, s.kl_discount_factor)
    if not assembled.data:
        errors = [t.error for group in groups for t in group if t.error]
        raise RuntimeError(f"step {step}: no student sample could be trained on ({(errors or ['every score failed'])[0]})")

    mark = time.perf_counter()
    adam = s.adam(step)
    losses, grad_norms = [], []
    for chunk in substeps(assembled, s.num_substeps):
        out, update = run.backend.train_step(chunk, s.loss_fn, adam, s.loss_fn_config)
        losses.append(out.metrics.get("loss:sum", 0.0))
        grad_norms.append(update.metrics.get("grad_norm"))
    times["train_s"] = time.perf_counter() - mark

    post_kl = None
    if s.compute_post_kl:
        mark = time.perf_counter()
        post_kl = _post_kl(run, assembled)
        times["post_kl_s"] = time.perf_counter() - mark

    mark = time.perf_counter()
    run.sampler_path = run.backend.save_weights_for_sampler(f"step-{step + 1:06d}")
    times["save_s"] = time.perf_counter() - mark
    times["step_s"] = time.perf_counter() - started

    report = _merged(assembled.reports)
    norms = [g for g in grad_norms if g is not None]
    return {
        "step": step,
        "teacher_kl": assembled.teacher_kl,
        "loss": sum(losses),
        "learning_rate": adam.learning_rate,
        "grad_norm": max(norms) if norms else None,
        "entropy": assembled.entropy_sum / assembled.sampled_tokens if assembled.sampled_tokens else None,
        "tokens_sampled": assembled.sampled_tokens,
        "tokens_trained": assembled.trained_tokens,
        "sequences": len(assembled.data),
        "aligned_teacher_kl": assembled.aligned_teacher_kl,
        "unaligned_tokens": assembled.unaligned_tokens,
        "unscored_tokens": assembled.unscored_tokens,
        "aligned_fraction": (
            1.0 - assembled.unaligned_tokens / assembled.sampled_tokens if assembled.sampled_tokens else None
        ),
        "separate_turns": assembled.separate_turns,
        "score_errors": assembled.score_errors,
        "tool_calls": sum(t.tool_calls for g in groups for t in g),
        "tool_errors": sum(t.tool_errors for g in groups for t in g),
        "post_kl": post_kl,
        "alignment": report,
        **times,
    }


def _post_kl(run: TrainRun, assembled: Assembled) -> float | None:
    """The teacher's reverse KL on the same samples under the updated student (no new sampling)."""
    new = run.backend.forward(assembled.data)
    total, count = 0.0, 0
    for logprobs, teacher, mask in zip(new, assembled.teacher_logprobs, assembled.kl_mask):
        total += float((np.asarray(logprobs) - teacher)[mask].sum())
        count += int(mask.sum())
    return total / count if count else None


def _merged(reports: Sequence[Any]) -> dict[str, Any] | None:
    if not reports:
        return None
    from spider.align import AlignmentReport

    return AlignmentReport.merge(list(reports)).to_metrics()
