"""The trainer interface Spider owns, shaped like Tinker's so the on-policy loop does not know
which backend it drives: `local` (torch + peft on the worker's device, spider.train.local) or
`tinker` (the hosted service through its SDK, spider.train.tinker_backend).

A training step is::

    out = backend.forward_backward(data, "importance_sampling")   # gradients accumulate
    backend.forward_backward(more, "importance_sampling")         # ... until
    backend.optim_step(AdamParams(learning_rate=...))             # one Adam update, grads cleared
    path = backend.save_weights_for_sampler(f"step-{k}")
    sampler = backend.sampler(path)                               # samples from exactly those weights

Every `Datum` is one sequence, already shifted: the model reads `model_input` and position i
predicts `target_tokens[i]`. `logprobs` are the sampler's log-probs of the targets, `advantages`
the per-token advantages (0 on prompt and masked tokens), `weights` the per-token weights of
`cross_entropy`. Losses are *summed* over tokens and data, as Tinker's are:

* importance_sampling: -sum(exp(logp - logprobs) * advantages)
* ppo: -sum(min(r * A, clamp(r, low, high) * A)), r = exp(logp - logprobs); `loss_fn_config`
  `clip_low_threshold` / `clip_high_threshold` are the ratio bounds (default 0.8 / 1.2)
* cross_entropy: -sum(weights * logp)
"""

from __future__ import annotations

import abc
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from spider.engines.base import Engine

LOSS_FNS = ("importance_sampling", "ppo", "cross_entropy")


@dataclass
class Datum:
    """One training sequence (see the module doc). All lists have the length of `model_input`."""

    model_input: list[int]
    target_tokens: list[int]
    logprobs: list[float] | None = None
    advantages: list[float] | None = None
    weights: list[float] | None = None

    def __post_init__(self) -> None:
        n = len(self.model_input)
        if n == 0:
            raise ValueError("a Datum needs at least one input token")
        for name in ("target_tokens", "logprobs", "advantages", "weights"):
            value = getattr(self, name)
            if value is not None and len(value) != n:
                raise ValueError(f"Datum.{name} has {len(value)} entries for {n} input tokens")

    @classmethod
    def from_sequence(
        cls,
        tokens: list[int],
        *,
        logprobs: list[float] | None = None,
        advantages: list[float] | None = None,
        weights: list[float] | None = None,
    ) -> "Datum":
        """A datum from a whole sequence whose per-token values are given per *token* (position k
        = token k, as samplers report them); position 0 has no prediction and is dropped."""

        def shift(values: list[float] | None) -> list[float] | None:
            return None if values is None else [float(v) for v in values[1:]]

        return cls(list(tokens[:-1]), list(tokens[1:]), shift(logprobs), shift(advantages), shift(weights))


@dataclass
class AdamParams:
    """One Adam step's settings (Tinker's defaults). `grad_clip_norm` 0: no clipping."""

    learning_rate: float = 1e-4
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-12
    weight_decay: float = 0.0
    grad_clip_norm: float = 0.0


@dataclass
class ForwardBackwardOutput:
    """Per datum, the current model's log-probs of its targets; metrics such as `loss:sum`."""

    logprobs: list[list[float]]
    metrics: dict[str, float] = field(default_factory=dict)


@dataclass
class OptimStepOutput:
    """Metrics of the update: `grad_norm` (before clipping), `learning_rate`."""

    metrics: dict[str, float] = field(default_factory=dict)


@dataclass
class LoraSpec:
    """What is trained: a LoRA adapter of `rank` (None: every weight, for tiny models)."""

    rank: int | None = 32
    alpha: float | None = None  # None: 32, as Tinker's LoRA
    target_modules: list[str] | None = None  # None: every linear layer of the model
    dropout: float = 0.0


class TrainingBackend(abc.ABC):
    """A model being trained. Calls run in order; each returns when its work is done."""

    base_model: str

    @abc.abstractmethod
    def forward_backward(
        self, data: list[Datum], loss_fn: str, loss_fn_config: dict[str, float] | None = None
    ) -> ForwardBackwardOutput:
        """Accumulate the gradient of the summed loss over `data`."""

    @abc.abstractmethod
    def forward(self, data: list[Datum]) -> list[list[float]]:
        """The current model's log-probs of each datum's targets, no gradient."""

    @abc.abstractmethod
    def optim_step(self, adam: AdamParams) -> OptimStepOutput:
        """One Adam update with the accumulated gradient, which is then cleared."""

    def train_step(
        self, data: list[Datum], loss_fn: str, adam: AdamParams, loss_fn_config: dict[str, float] | None = None
    ) -> tuple[ForwardBackwardOutput, OptimStepOutput]:
        """`forward_backward(data)` then `optim_step(adam)`, in one call: a remote backend submits
        both before waiting on either, so the update follows the gradient without a round trip."""
        out = self.forward_backward(data, loss_fn, loss_fn_config)
        return out, self.optim_step(adam)

    @abc.abstractmethod
    def save_state(self, name: str) -> str:
        """Weights + optimizer state, to resume training; returns a path for `load_state`."""

    @abc.abstractmethod
    def load_state(self, path: str) -> None:
        """Restore what `save_state` wrote (weights and optimizer)."""

    @abc.abstractmethod
    def save_weights_for_sampler(self, name: str) -> str:
        """Freeze the current weights under `name`; returns the path `sampler` takes."""

    @abc.abstractmethod
    def sampler(self, path: str) -> Engine:
        """An engine that samples from (and scores with) exactly the weights saved at `path`:
        `Engine.sample` with `prompt_ids`, `Engine.score` for prompt log-probs."""

    @abc.abstractmethod
    def tokenizer(self) -> Any:
        """The student's tokenizer (from a local path; never the hub)."""

    def export_weights(self, path: str, scratch: Path) -> Path:
        """A local folder holding the weights saved at `path` (a sampler path) as a PEFT adapter
        (or, for full fine-tuning, a model folder); a remote backend downloads them under `scratch`."""
        raise NotImplementedError(f"{type(self).__name__} cannot export weights")

    def base_folder(self) -> Path:
        """The base model's local folder (for merging an adapter into it)."""
        from spider.models import resolve_model

        return resolve_model(self.base_model)

    def info(self) -> dict[str, Any]:
        """What is trained (model, LoRA rank, device, dtype, parameter counts)."""
        return {"base_model": self.base_model}

    def close(self) -> None:
        """Release the model and its sampler engines."""
