"""Tinker's built-in losses as pure torch functions of the current model's log-probs of the targets,
summed over tokens and data as Tinker sums them; and the on-policy helpers the training loop needs:
reverse-KL advantages against a teacher and learning-rate schedules.

Every loss reads flat tensors (one entry per target token, sequences concatenated), so a backend
computes the log-probs however it batches and hands them over unpadded.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch

from spider.train.backend import LOSS_FNS, Datum

PPO_CLIP_LOW = 0.8
PPO_CLIP_HIGH = 1.2
LR_SCHEDULES = ("constant", "linear", "cosine")

# What each loss reads from a Datum besides `target_tokens`, and the loss_fn_config keys it takes.
LOSS_INPUTS: dict[str, tuple[str, ...]] = {
    "importance_sampling": ("logprobs", "advantages"),
    "ppo": ("logprobs", "advantages"),
    "cross_entropy": ("weights",),
}
LOSS_CONFIG_KEYS: dict[str, tuple[str, ...]] = {
    "importance_sampling": (),
    "ppo": ("clip_low_threshold", "clip_high_threshold"),
    "cross_entropy": (),
}


def importance_sampling(
    target_logprobs: torch.Tensor, sampling_logprobs: torch.Tensor, advantages: torch.Tensor
) -> torch.Tensor:
    """-sum(r * A), r = exp(logp - logp_sampler): REINFORCE corrected for the sampler's lag."""
    ratio = torch.exp(target_logprobs - sampling_logprobs)
    return -(ratio * advantages).sum()


def ppo(
    target_logprobs: torch.Tensor,
    sampling_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    clip_low: float = PPO_CLIP_LOW,
    clip_high: float = PPO_CLIP_HIGH,
) -> tuple[torch.Tensor, torch.Tensor]:
    """-sum(min(r * A, clamp(r, low, high) * A)), token-wise. Also returns, per token, whether the
    clipped term was the smaller one (the token's gradient is cut)."""
    ratio = torch.exp(target_logprobs - sampling_logprobs)
    unclipped = ratio * advantages
    clipped = torch.clamp(ratio, clip_low, clip_high) * advantages
    return -torch.minimum(unclipped, clipped).sum(), clipped < unclipped


def cross_entropy(target_logprobs: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """-sum(weights * logp): weighted negative log-likelihood of the targets."""
    return -(weights * target_logprobs).sum()


def check_loss_inputs(loss_fn: str, data: Sequence[Datum], config: Mapping[str, float] | None = None) -> None:
    """Raise ValueError, saying what to change, when `data` or `config` cannot feed `loss_fn`."""
    if loss_fn not in LOSS_FNS:
        raise ValueError(f"unknown loss_fn {loss_fn!r}; use one of {', '.join(LOSS_FNS)}")
    if not data:
        raise ValueError("no data: a forward pass needs at least one Datum")
    unknown = sorted(set(config or {}) - set(LOSS_CONFIG_KEYS[loss_fn]))
    if unknown:
        accepted = ", ".join(LOSS_CONFIG_KEYS[loss_fn]) or "no keys"
        raise ValueError(f"loss_fn_config {unknown} is not used by {loss_fn!r} (it takes {accepted})")
    if loss_fn == "ppo":
        low, high = _clip_bounds(config)
        if not 0 <= low <= 1 <= high:
            raise ValueError(f"ppo ratio bounds must satisfy 0 <= clip_low_threshold <= 1 <= clip_high_threshold, got {low}, {high}")
    for index, datum in enumerate(data):
        missing = [name for name in LOSS_INPUTS[loss_fn] if getattr(datum, name) is None]
        if missing:
            raise ValueError(f"loss {loss_fn!r} needs Datum.{' and Datum.'.join(missing)}; datum {index} has none")


def compute_loss(
    loss_fn: str,
    target_logprobs: Sequence[torch.Tensor],
    data: Sequence[Datum],
    config: Mapping[str, float] | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """The summed loss of `data` given each datum's target log-probs (1-D tensors, one per datum,
    as long as its `target_tokens`), and additive metrics (`loss:sum`; ppo: `clipped:sum`, tokens
    whose gradient the clip cuts) that sum across micro-batches."""
    check_loss_inputs(loss_fn, data, config)
    logprobs = torch.cat([lp.reshape(-1) for lp in target_logprobs])
    if logprobs.numel() != sum(len(d.target_tokens) for d in data):
        raise ValueError("target_logprobs must hold one entry per target token of each datum")

    def inputs(name: str) -> torch.Tensor:
        values = [v for datum in data for v in getattr(datum, name)]
        return torch.tensor(values, dtype=torch.float32, device=logprobs.device)

    logprobs = logprobs.float()
    metrics: dict[str, float] = {}
    if loss_fn == "importance_sampling":
        loss = importance_sampling(logprobs, inputs("logprobs"), inputs("advantages"))
    elif loss_fn == "ppo":
        low, high = _clip_bounds(config)
        loss, clipped = ppo(logprobs, inputs("logprobs"), inputs("advantages"), low, high)
        metrics["clipped:sum"] = float(clipped.sum())
    else:
        loss = cross_entropy(logprobs, inputs("weights"))
    metrics["loss:sum"] = float(loss.detach())
    return loss, metrics


def _clip_bounds(config: Mapping[str, float] | None) -> tuple[float, float]:
    config = config or {}
    return float(config.get("clip_low_threshold", PPO_CLIP_LOW)), float(config.get("clip_high_threshold", PPO_CLIP_HIGH))


def reverse_kl_advantages(
    student_logprobs: Sequence[float | None],
    teacher_logprobs: Sequence[float | None],
    mask: Sequence[float],
    kl_penalty_coef: float,
    kl_discount_factor: float = 0.0,
) -> list[float]:
    """Per-token advantages of on-policy distillation: the negative reverse KL to the teacher,
    a_t = -coef * (logp_student_t - logp_teacher_t) on tokens whose mask is set, as tinker-cookbook's
    `incorporate_kl_penalty`. With a discount gamma > 0 each token also answers for the KL of the
    tokens after it, A_t = sum_{k>=t} gamma^(k-t) a_k (the cookbook's `discounted_future_sum`).

    Masked-out positions (prompt, tool output, padding) get 0 and may hold None log-probs. Unlike
    the cookbook, they stay 0 after discounting: the cookbook lets the discounted sum run back into
    the prompt, where Tinker's losses would then push on prompt tokens the student never sampled.
    On masked-in tokens both agree.
    """
    n = len(student_logprobs)
    if len(teacher_logprobs) != n or len(mask) != n:
        raise ValueError(
            f"student_logprobs, teacher_logprobs and mask must be as long as each other ({n}, {len(teacher_logprobs)}, {len(mask)})"
        )
    if not 0 <= kl_discount_factor <= 1:
        raise ValueError(f"kl_discount_factor must be in [0, 1], got {kl_discount_factor}")
    per_token = []
    for t, (student, teacher, keep) in enumerate(zip(student_logprobs, teacher_logprobs, mask)):
        if not keep:
            per_token.append(0.0)
            continue
        if student is None or teacher is None:
            raise ValueError(f"position {t} is masked in but has no log-prob (student {student}, teacher {teacher})")
        per_token.append(-kl_penalty_coef * (float(student) - float(teacher)))
    if kl_discount_factor == 0:
        return per_token
    advantages = [0.0] * n
    running = 0.0
    for t in range(n - 1, -1, -1):
        running = per_token[t] + kl_discount_factor * running
        advantages[t] = running if mask[t] else 0.0
    return advantages


def learning_rate(
    step: int, total_steps: int, base_lr: float, schedule: str = "constant", warmup_steps: int = 0
) -> float:
    """The learning rate of optimizer step `step` (0-based) of `total_steps`.

    Without warmup this is tinker-cookbook's `compute_schedule_lr_multiplier` times `base_lr`:
    constant 1; linear 1 - step/total; cosine (1 + cos(pi * step/total)) / 2. With `warmup_steps`
    the rate first rises linearly, (step + 1)/warmup of the base (the first step already trains,
    the last warmup step reaches the full rate), then the schedule runs over the remaining steps.
    """
    if schedule not in LR_SCHEDULES:
        raise ValueError(f"unknown learning-rate schedule {schedule!r}; use one of {', '.join(LR_SCHEDULES)}")
    if total_steps <= 0:
        raise ValueError(f"total_steps must be positive, got {total_steps}")
    if not 0 <= warmup_steps <= total_steps:
        raise ValueError(f"warmup_steps must be between 0 and total_steps ({total_steps}), got {warmup_steps}")
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    if step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    progress = (step - warmup_steps) / (total_steps - warmup_steps) if total_steps > warmup_steps else 1.0
    if schedule == "linear":
        return base_lr * (1 - progress)
    if schedule == "cosine":
        return base_lr * 0.5 * (1 + math.cos(math.pi * progress))
    return base_lr
