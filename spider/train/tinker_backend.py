"""The `tinker` trainer backend: a LoRA of a base model trained on the hosted Tinker service
through its SDK, with the job's own API key.

Requests on one Tinker training client run in the order they were submitted, so `train_step`
submits forward_backward and optim_step before waiting on either. Saved weights are tinker://
paths; `sampler(path)` opens a sampling client on exactly those weights. The tokenizer comes from
a local model folder (spider.models.resolve_model), never from the hub.
"""

from __future__ import annotations

import logging
import threading
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import httpx
import tinker
from tinker import types as tt

from spider.engines.tinker_engine import API_KEY_SECRET, TinkerEngine, load_tokenizer, service_client, tinker_failure
from spider.errors import EngineError
from spider.models import ModelAccess
from spider.train.backend import (
    LOSS_FNS,
    AdamParams,
    Datum,
    ForwardBackwardOutput,
    LoraSpec,
    OptimStepOutput,
    TrainingBackend,
)

# The per-token inputs each loss reads, besides `target_tokens` (Tinker's names are Spider's).
LOSS_INPUTS = {
    "importance_sampling": ("logprobs", "advantages"),
    "ppo": ("logprobs", "advantages"),
    "cross_entropy": ("weights",),
}
TINKER_LORA_ALPHA = 32
EXPORT_TTL_S = 3600  # an export lives this long at most (Tinker's shortest TTL); it is deleted once downloaded

log = logging.getLogger(__name__)


class TinkerBackend(TrainingBackend):
    """A LoRA adapter of `base_model` trained by Tinker.

    `secrets` are the job's (`TINKER_API_KEY`); `base_url` None is the SDK's default service.
    `student_checkpoint`, a tinker:// path from `save_state`, resumes that run (weights and
    optimizer) instead of starting a fresh adapter. `tokenizer_name` names the local model folder
    of the tokenizer when it differs from `base_model`. `seed` seeds the adapter's initialization."""

    def __init__(
        self,
        base_model: str,
        secrets: Mapping[str, str] | None,
        *,
        base_url: str | None = None,
        lora: LoraSpec | None = None,
        seed: int | None = None,
        student_checkpoint: str | None = None,
        tokenizer_name: str | None = None,
        access: ModelAccess | None = None,
    ):
        self.base_model = base_model
        self.lora = lora or LoraSpec()
        self._rank = _tinker_rank(self.lora)
        self._tokenizer_name = tokenizer_name or base_model
        self._access = access
        self._base_url = base_url
        self._service = service_client(secrets, base_url)
        api_key = (secrets or {})[API_KEY_SECRET]
        self._rest = lambda: tinker.RestClient(base_url=base_url, api_key=api_key)
        # Which weights the run holds: updates since it was created or loaded, and the update count
        # at which each sampler path of this backend was saved (Tinker exports current weights only).
        self._updates = 0
        self._saved_at: dict[str, int] = {}
        self._samplers: list[TinkerEngine] = []
        self._samplers_lock = threading.Lock()
        self._tokenizer: Any = None
        self._tokenizer_lock = threading.Lock()
        try:
            if student_checkpoint is None:
                future = self._service.create_lora_training_client(base_model, rank=self._rank, seed=seed)
            else:
                future = self._service.create_training_client_from_state_with_optimizer(student_checkpoint)
            self._training: tinker.TrainingClient = future.result()
        except tinker.TinkerError as exc:
            self._service.close("errored", detail=str(exc))  # not awaited: the error is what matters
            raise tinker_failure(exc, f"creating the training run of {base_model!r}") from exc
        if student_checkpoint is not None:
            self._check_resumed(student_checkpoint)

    def _check_resumed(self, checkpoint: str) -> None:
        """A resumed run must be the one this job describes: the same base model and LoRA rank."""
        info = self._training.get_info()
        problem = None
        if info.model_data.model_name is not None and info.model_data.model_name != self.base_model:
            problem = f"was trained from {info.model_data.model_name!r}, not from {self.base_model!r}"
        elif info.lora_rank is not None and info.lora_rank != self._rank:
            problem = f"trains a LoRA of rank {info.lora_rank}, not {self._rank}"
        if problem is not None:
            self.close()
            raise EngineError(
                f"student_checkpoint {checkpoint!r} {problem}; resume it with the settings it was trained with"
            )

    # -- training ---------------------------------------------------------------------------

    def forward_backward(
        self, data: list[Datum], loss_fn: str, loss_fn_config: dict[str, float] | None = None
    ) -> ForwardBackwardOutput:
        future = self._training.forward_backward(tinker_data(data, loss_fn), loss_fn, loss_fn_config)
        return _forward_backward_output(self._wait(future, f"forward_backward ({loss_fn})"))

    def forward(self, data: list[Datum]) -> list[list[float]]:
        # Cross-entropy with the data's own weights (zeros when absent): only the log-probs are read.
        weighted = [d if d.weights is not None else _with_zero_weights(d) for d in data]
        future = self._training.forward(tinker_data(weighted, "cross_entropy"), "cross_entropy")
        return _forward_backward_output(self._wait(future, "forward")).logprobs

    def optim_step(self, adam: AdamParams) -> OptimStepOutput:
        future = self._training.optim_step(_adam(adam))
        self._updates += 1
        return _optim_step_output(self._wait(future, "optim_step"), adam)

    def train_step(
        self, data: list[Datum], loss_fn: str, adam: AdamParams, loss_fn_config: dict[str, float] | None = None
    ) -> tuple[ForwardBackwardOutput, OptimStepOutput]:
        """Both requests submitted before either is awaited: the update follows the gradient on the
        service without a round trip in between."""
        gradient = self._training.forward_backward(tinker_data(data, loss_fn), loss_fn, loss_fn_config)
        update = self._training.optim_step(_adam(adam))
        self._updates += 1
        out = _forward_backward_output(self._wait(gradient, f"forward_backward ({loss_fn})"))
        return out, _optim_step_output(self._wait(update, "optim_step"), adam)

    # -- checkpoints and samplers -----------------------------------------------------------

    def save_state(self, name: str) -> str:
        return self._wait(self._training.save_state(name), f"saving state {name!r}").path

    def load_state(self, path: str) -> None:
        """A new training client from the checkpoint (weights and optimizer), which replaces the
        current one: the SDK's way to resume (its in-place load_state is deprecated)."""
        future = self._service.create_training_client_from_state_with_optimizer(path)
        self._training = self._wait(future, f"loading state {path!r}")
        self._updates, self._saved_at = 0, {}
        self._check_resumed(path)

    def save_weights_for_sampler(self, name: str) -> str:
        path = self._wait(self._training.save_weights_for_sampler(name), f"saving sampler weights {name!r}").path
        self._saved_at[path] = self._updates
        return path

    def export_weights(self, path: str, scratch: Path) -> Path:
        """The weights of sampler `path` as the PEFT adapter folder Tinker exports, downloaded to a
        new folder under `scratch`. Sampler weights cannot be downloaded and Tinker exports a run's
        current weights only, so `path` must hold what the run holds now: saved by this backend
        with no update since, or, when the run has not been updated since it was created or loaded,
        the sampler saved together with that state."""
        saved = self._saved_at.get(path)
        if (saved if saved is not None else 0) != self._updates:
            since = "it was saved" if saved is not None else "it was created or loaded"
            raise EngineError(
                f"cannot export {path!r}: the run has been updated since {since}, and Tinker exports the run's "
                "current weights only; save sampler weights now and export those"
            )
        name = f"export-{uuid.uuid4().hex[:12]}"
        future = self._training.save_weights_external(name, ttl_seconds=EXPORT_TTL_S)
        exported = self._wait(future, f"exporting the weights of {path!r}").path
        rest = self._rest()
        try:
            urls = self._wait(rest.get_external_weights_urls(exported), f"listing the files of {exported!r}").urls
            folder = Path(scratch) / name
            for relative, url in sorted(urls.items()):
                _download(url, _inside(folder, relative))
        finally:
            try:
                rest.delete_checkpoint_from_tinker_path(exported).result()
            except tinker.TinkerError:  # it expires by itself
                log.warning("could not delete the temporary export %s", exported, exc_info=True)
        return folder

    def sampler(self, path: str) -> TinkerEngine:
        client = self._wait(self._service.create_sampling_client(model_path=path), f"opening a sampler of {path!r}")
        engine = TinkerEngine(client, path, tokenizer=self.tokenizer)
        with self._samplers_lock:
            self._samplers.append(engine)
        return engine

    def tokenizer(self) -> Any:
        with self._tokenizer_lock:
            if self._tokenizer is None:
                self._tokenizer = load_tokenizer(self._tokenizer_name, self._access)
            return self._tokenizer

    def info(self) -> dict[str, Any]:
        info = self._training.get_info()
        return {
            "backend": "tinker",
            "base_model": self.base_model,
            "model_id": self._training.model_id,
            "lora_rank": info.lora_rank,
            "lora_alpha": TINKER_LORA_ALPHA,
            "base_url": self._base_url,
        }

    def close(self) -> None:
        with self._samplers_lock:
            samplers, self._samplers = self._samplers, []
        for engine in samplers:
            engine.close()
        self._service.close("success").result()

    def _wait(self, future: Any, what: str) -> Any:
        try:
            return future.result()
        except tinker.TinkerError as exc:
            raise tinker_failure(exc, what) from exc


def tinker_data(data: list[Datum], loss_fn: str) -> list[tt.Datum]:
    """Spider data as Tinker's: `model_input` as tokens, the loss's per-token inputs as tensors."""
    if loss_fn not in LOSS_FNS:
        raise ValueError(f"unknown loss_fn {loss_fn!r}; use one of {', '.join(LOSS_FNS)}")
    if not data:
        raise ValueError("forward_backward needs at least one Datum")
    out = []
    for index, datum in enumerate(data):
        n = len(datum.model_input)
        inputs = {"target_tokens": tt.TensorData(data=list(datum.target_tokens), dtype="int64", shape=[n])}
        for name in LOSS_INPUTS[loss_fn]:
            values = getattr(datum, name)
            if values is None:
                raise ValueError(f"{loss_fn} needs Datum.{name}; data[{index}] has none")
            inputs[name] = tt.TensorData(data=[float(v) for v in values], dtype="float32", shape=[n])
        out.append(tt.Datum(model_input=tt.ModelInput.from_ints(list(datum.model_input)), loss_fn_inputs=inputs))
    return out


def _inside(folder: Path, relative: str) -> Path:
    """Where an exported file goes: under `folder`, whatever its name says."""
    target = (folder / relative).resolve()
    if not target.is_relative_to(folder.resolve()):
        raise EngineError(f"Tinker named an exported file {relative!r}, outside the export folder")
    return target


def _download(url: str, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(target.name + ".partial")
    try:
        with httpx.stream("GET", url, follow_redirects=True, timeout=httpx.Timeout(60.0, read=600.0)) as response:
            response.raise_for_status()
            with partial.open("wb") as out:
                for chunk in response.iter_bytes(1 << 20):
                    out.write(chunk)
    except httpx.HTTPError as exc:
        partial.unlink(missing_ok=True)
        raise EngineError(f"downloading the exported {target.name} failed: {exc}") from exc
    partial.replace(target)


def _with_zero_weights(datum: Datum) -> Datum:
    return Datum(list(datum.model_input), list(datum.target_tokens), weights=[0.0] * len(datum.model_input))


def _adam(adam: AdamParams) -> tt.AdamParams:
    return tt.AdamParams(
        learning_rate=adam.learning_rate,
        beta1=adam.beta1,
        beta2=adam.beta2,
        eps=adam.eps,
        weight_decay=adam.weight_decay,
        grad_clip_norm=adam.grad_clip_norm,
    )


def _forward_backward_output(result: tt.ForwardBackwardOutput) -> ForwardBackwardOutput:
    logprobs = [[float(v) for v in output["logprobs"].tolist()] for output in result.loss_fn_outputs]
    return ForwardBackwardOutput(logprobs=logprobs, metrics={k: float(v) for k, v in result.metrics.items()})


def _optim_step_output(result: tt.OptimStepResponse, adam: AdamParams) -> OptimStepOutput:
    """The service's metrics as they come (`grad_norm:mean`), each also under its bare name
    (`grad_norm`), as the interface names them."""
    metrics: dict[str, float] = {}
    for key, value in (result.metrics or {}).items():
        metrics[key] = float(value)
        metrics.setdefault(key.split(":", 1)[0], float(value))
    metrics.setdefault("learning_rate", adam.learning_rate)
    return OptimStepOutput(metrics=metrics)


def _tinker_rank(lora: LoraSpec) -> int:
    """The LoRA rank Tinker is asked for; what Tinker cannot train is refused here, by name."""
    if lora.rank is None:
        raise EngineError("the tinker backend trains LoRA adapters only; set a lora rank")
    if lora.alpha not in (None, TINKER_LORA_ALPHA):
        raise EngineError(f"Tinker's LoRA alpha is fixed at {TINKER_LORA_ALPHA}; got alpha {lora.alpha}")
    if lora.target_modules is not None:
        raise EngineError(
            "Tinker adapts every linear layer (attention, MLP, unembedding); target_modules cannot be chosen"
        )
    if lora.dropout:
        raise EngineError(f"Tinker's LoRA has no dropout; got dropout {lora.dropout}")
    return lora.rank
