"""The `local` trainer backend: a Hugging Face causal LM trained with torch on this worker's own
device, as a peft LoRA adapter (or every weight, for tiny models). Samplers read the weights a
`save_weights_for_sampler` call wrote to disk, never the live ones, so a later step cannot change
what an older sampler samples from.

Samplers are either one vLLM engine of the base model with `enable_lora=True` and a fresh
`LoRARequest` per `sampler()` call, or transformers (`HFEngine`) over a snapshot of the model: a
copy that shares the frozen base weights with the trainer and holds its own adapter weights, read
from the saved folder (a full fine-tune loads the saved folder whole).
"""

from __future__ import annotations

import copy
import gc
import importlib.util
import itertools
import json
import re
import shutil
import uuid
from collections import defaultdict
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from spider.engines.base import Engine
from spider.errors import EngineError
from spider.models import resolve_model
from spider.train.backend import AdamParams, Datum, ForwardBackwardOutput, LoraSpec, OptimStepOutput, TrainingBackend
from spider.train.losses import check_loss_inputs, compute_loss

SAMPLER_ENGINES = ("auto", "hf", "vllm")
# LoRA scale alpha / rank with alpha fixed at 32 whatever the rank, as Tinker's LoRA: the best
# learning rate then barely moves with the rank, so a job can change lora_rank and keep its rate.
DEFAULT_LORA_ALPHA = 32.0
# The ranks vLLM's `max_lora_rank` accepts; the engine is sized to the smallest one that fits.
VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
TRAINER_STATE = "trainer_state.pt"
WEIGHTS_DIR = "weights"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._\-]{0,199}$")


class LocalBackend(TrainingBackend):
    """`base_model` (a local Hugging Face folder, or a name `resolve_model` finds offline) trained
    on `device` (default cuda when available, else cpu) in `dtype` (default bf16 on cuda, fp32 on
    cpu; LoRA weights stay fp32, as peft keeps them). `seed` seeds torch's global generator, which
    draws the LoRA initialisation and dropout. `save_state` and `save_weights_for_sampler` write
    under `work_dir`. `forward_backward` cuts its data into micro-batches of at most
    `micro_batch_tokens` padded tokens and sums their gradients. `sampler_engine`: `vllm`, `hf`, or
    `auto` (vLLM on cuda when it is installed and a LoRA is trained, else hf);
    `sampler_parameters` go to the sampler engine (vLLM engine arguments, or hf's `batch_size` and
    `merged`: True decodes with the adapter merged into a float32 copy of the model, which on a GPU
    samples about twice as fast as LoRA layers do, for the memory of that copy while a sampler lives).
    """

    def __init__(
        self,
        base_model: str | Path,
        lora: LoraSpec | None = None,
        *,
        work_dir: str | Path,
        device: str | torch.device | None = None,
        dtype: str | torch.dtype | None = None,
        seed: int = 0,
        micro_batch_tokens: int = 4096,
        sampler_engine: str = "auto",
        sampler_parameters: dict[str, Any] | None = None,
    ):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.base_model = str(base_model)
        self.lora = lora if lora is not None else LoraSpec()
        if self.lora.rank is not None and self.lora.rank < 1:
            raise ValueError(f"LoraSpec.rank must be a positive integer or None (every weight), got {self.lora.rank}")
        if micro_batch_tokens < 1:
            raise ValueError(f"micro_batch_tokens must be positive, got {micro_batch_tokens}")
        self.micro_batch_tokens = micro_batch_tokens
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.dtype = _dtype(dtype, self.device)
        self.work_dir = Path(work_dir)
        self.work_dir.mkdir(parents=True, exist_ok=True)
        self.sampler_engine = _sampler_engine(sampler_engine, self.device, self.lora)
        self.sampler_parameters = dict(sampler_parameters or {})
        self.steps = 0

        self.path = resolve_model(self.base_model)
        self._tokenizer = AutoTokenizer.from_pretrained(str(self.path))
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_pretrained(str(self.path), dtype=self.dtype).to(self.device)
        self.peft: Any = None
        if self.lora.rank is not None:
            from peft import LoraConfig, get_peft_model

            config = LoraConfig(
                r=self.lora.rank,
                lora_alpha=self.lora_alpha,
                target_modules=self.lora.target_modules or "all-linear",
                lora_dropout=self.lora.dropout,
                task_type="CAUSAL_LM",
            )
            self.peft = get_peft_model(model, config)
            model = self.peft.get_base_model()  # the transformers model, LoRA layers inside it
        self.model: Any = model
        self.trainable = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer: torch.optim.Optimizer | None = None
        self.context: int | None = getattr(self.model.config, "max_position_embeddings", None)
        self.vocab_size: int = self.model.get_input_embeddings().weight.shape[0]
        self._vllm: Any = None
        self._lora_ids = itertools.count(1)

    @property
    def lora_alpha(self) -> float:
        return self.lora.alpha if self.lora.alpha is not None else DEFAULT_LORA_ALPHA

    # -- training -------------------------------------------------------------------------------

    def forward_backward(
        self, data: list[Datum], loss_fn: str, loss_fn_config: dict[str, float] | None = None
    ) -> ForwardBackwardOutput:
        """Metrics: `loss:sum`, `tokens` (target positions), `sequences`, and the loss's own
        (ppo: `clipped:sum`, tokens whose gradient the clip cut). The log-probs are the model's in
        training mode (with LoRA dropout, when it has some)."""
        check_loss_inputs(loss_fn, data, loss_fn_config)
        self._check_tokens(data)
        self.model.train()
        logprobs: list[list[float]] = [[] for _ in data]
        metrics: dict[str, float] = defaultdict(float)
        for batch in micro_batches([len(d.model_input) for d in data], self.micro_batch_tokens):
            chunk = [data[i] for i in batch]
            target_logprobs = self._target_logprobs(chunk)
            loss, loss_metrics = compute_loss(loss_fn, target_logprobs, chunk, loss_fn_config)
            loss.backward()
            for index, values in zip(batch, target_logprobs):
                logprobs[index] = values.detach().float().tolist()
            for key, value in loss_metrics.items():
                metrics[key] += value
        metrics["tokens"] = float(sum(len(d.model_input) for d in data))
        metrics["sequences"] = float(len(data))
        return ForwardBackwardOutput(logprobs=logprobs, metrics=dict(metrics))

    def forward(self, data: list[Datum]) -> list[list[float]]:
        if not data:
            raise ValueError("no data: a forward pass needs at least one Datum")
        self._check_tokens(data)
        self.model.eval()
        logprobs: list[list[float]] = [[] for _ in data]
        with torch.no_grad():
            for batch in micro_batches([len(d.model_input) for d in data], self.micro_batch_tokens):
                for index, values in zip(batch, self._target_logprobs([data[i] for i in batch])):
                    logprobs[index] = values.float().tolist()
        return logprobs

    def optim_step(self, adam: AdamParams) -> OptimStepOutput:
        _check_adam(adam)
        settings = {
            "lr": adam.learning_rate,
            "betas": (adam.beta1, adam.beta2),
            "eps": adam.eps,
            "weight_decay": adam.weight_decay,
        }
        if self.optimizer is None:
            self.optimizer = torch.optim.AdamW(self.trainable, **settings)
        for group in self.optimizer.param_groups:  # the rate (and the rest) may change every step
            group.update(settings)
        with_grad = [p for p in self.trainable if p.grad is not None]
        grad_norm = torch.nn.utils.get_total_norm([p.grad for p in with_grad]) if with_grad else torch.zeros(())
        if adam.grad_clip_norm > 0 and with_grad:
            torch.nn.utils.clip_grads_with_norm_(with_grad, adam.grad_clip_norm, grad_norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.steps += 1
        return OptimStepOutput(metrics={"grad_norm": float(grad_norm), "learning_rate": adam.learning_rate})

    def _target_logprobs(self, data: list[Datum]) -> list[torch.Tensor]:
        """One padded forward pass: each datum's log-probs of its targets (a 1-D tensor each)."""
        width = max(len(d.model_input) for d in data)
        pad = self._tokenizer.pad_token_id or 0
        input_ids = torch.full((len(data), width), pad, dtype=torch.long)
        targets = torch.zeros((len(data), width), dtype=torch.long)
        attention_mask = torch.zeros((len(data), width), dtype=torch.long)
        for row, datum in enumerate(data):
            n = len(datum.model_input)
            input_ids[row, :n] = torch.tensor(datum.model_input)
            targets[row, :n] = torch.tensor(datum.target_tokens)
            attention_mask[row, :n] = 1
        input_ids, targets, attention_mask = (t.to(self.device) for t in (input_ids, targets, attention_mask))
        logits = self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits.float()
        picked = logits.gather(2, targets[:, :, None]).squeeze(2) - torch.logsumexp(logits, dim=-1)
        return [picked[row, : len(datum.model_input)] for row, datum in enumerate(data)]

    def _check_tokens(self, data: list[Datum]) -> None:
        for index, datum in enumerate(data):
            if self.context is not None and len(datum.model_input) > self.context:
                raise ValueError(f"datum {index} has {len(datum.model_input)} tokens; the model's context is {self.context}")
            ids = datum.model_input + datum.target_tokens
            if min(ids) < 0 or max(ids) >= self.vocab_size:
                raise ValueError(f"datum {index} has token ids outside the model's vocabulary (0..{self.vocab_size - 1})")

    # -- checkpoints ----------------------------------------------------------------------------

    def save_state(self, name: str) -> str:
        """`work_dir/state/<name>`: the trained weights (as `save_weights_for_sampler` writes them,
        under `weights/`), the optimizer's moments, the step count and torch's random generators."""

        def write(folder: Path) -> None:
            self._write_weights(folder / WEIGHTS_DIR)
            state = {
                "optimizer": None if self.optimizer is None else self.optimizer.state_dict(),
                "steps": self.steps,
                "rng_cpu": torch.get_rng_state(),
                "rng_cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
                "lora": asdict(self.lora),
                "base_model": self.base_model,
            }
            torch.save(state, folder / TRAINER_STATE)

        return str(_write_atomically(self.work_dir / "state", name, write))

    def load_state(self, path: str) -> None:
        folder = Path(path)
        if not (folder / TRAINER_STATE).is_file():
            raise ValueError(f"{str(folder)!r} holds no trainer state: give a path that save_state returned")
        state = torch.load(folder / TRAINER_STATE, weights_only=True)
        if state["lora"] != asdict(self.lora):
            raise ValueError(f"the state at {str(folder)!r} trained LoRA {state['lora']}, this backend trains {asdict(self.lora)}")
        self._read_weights(folder / WEIGHTS_DIR)
        if state["optimizer"] is None:
            self.optimizer = None
        else:
            if self.optimizer is None:
                self.optimizer = torch.optim.AdamW(self.trainable)
            self.optimizer.load_state_dict(state["optimizer"])
        for p in self.trainable:
            p.grad = None
        self.steps = state["steps"]
        torch.set_rng_state(state["rng_cpu"])
        if state["rng_cuda"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["rng_cuda"])

    def save_weights_for_sampler(self, name: str) -> str:
        """`work_dir/sampler/<name>`: a PEFT adapter folder (or, for a full fine-tune, a whole
        model folder with its tokenizer). Saving a name again replaces that folder."""
        return str(_write_atomically(self.work_dir / "sampler", name, self._write_weights))

    def _write_weights(self, folder: Path) -> None:
        if self.peft is not None:
            self.peft.save_pretrained(str(folder))
        else:
            self.model.save_pretrained(str(folder))
            self._tokenizer.save_pretrained(str(folder))

    def _read_weights(self, folder: Path) -> None:
        """Copy the weights saved in `folder` into the live model, bit for bit."""
        with torch.no_grad():
            if self.peft is not None:
                _load_adapter(self.peft, folder, self.lora, self.lora_alpha)
            else:
                saved = _read_safetensors(folder)
                for name, param in self.model.named_parameters():
                    if name not in saved:
                        raise ValueError(f"{str(folder)!r} has no weight {name!r}: it was written for another model")
                    param.copy_(saved[name])

    def load_weights(self, folder: str | Path) -> None:
        """Start from the weights in `folder` (a PEFT adapter of this rank, or a whole model
        folder for full fine-tuning) instead of the initial ones; the optimizer starts fresh."""
        self._read_weights(Path(folder))
        self.optimizer = None

    def export_weights(self, path: str, scratch: Path) -> Path:
        return Path(path)

    def base_folder(self) -> Path:
        return self.path

    # -- sampling -------------------------------------------------------------------------------

    def sampler(self, path: str) -> Engine:
        folder = Path(path)
        if (folder / WEIGHTS_DIR).is_dir():  # a save_state folder carries sampler weights too
            folder = folder / WEIGHTS_DIR
        if self.peft is not None and not (folder / ADAPTER_CONFIG).is_file():
            raise ValueError(f"{str(folder)!r} holds no LoRA adapter: give a path that save_weights_for_sampler returned")
        if self.peft is None and not (folder / "config.json").is_file():
            raise ValueError(f"{str(folder)!r} holds no model: give a path that save_weights_for_sampler returned")
        if self.sampler_engine == "vllm":
            return self._vllm_sampler(folder)
        return self._hf_sampler(folder)

    def _hf_sampler(self, folder: Path) -> Engine:
        from transformers import AutoModelForCausalLM

        from spider.engines.hf_engine import HFEngine

        unknown = sorted(set(self.sampler_parameters) - {"batch_size", "merged"})
        if unknown:
            raise EngineError(f"the hf sampler takes only batch_size and merged, not {unknown}")
        if self.peft is not None:
            # The frozen base tensors are shared (the memo maps each to itself); only the LoRA
            # layers are copied, then overwritten with the saved adapter.
            shared = {id(t): t for t in itertools.chain(self.model.parameters(), self.model.buffers()) if not t.requires_grad}
            snapshot = copy.deepcopy(self.peft, memo=shared)
            with torch.no_grad():
                _load_adapter(snapshot, folder, self.lora, self.lora_alpha)
            for param in snapshot.parameters():
                param.requires_grad_(False)
                param.grad = None
            model = snapshot.get_base_model()
            model = _merged_float32(model) if self.sampler_parameters.get("merged") else _frozen_lora_layers(model)
        else:
            model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=self.dtype).to(self.device)
            model.requires_grad_(False)
        return HFEngine.from_model(
            model, self._tokenizer, name=f"{self.base_model}@{folder.name}", batch_size=self.sampler_parameters.get("batch_size", 16)
        )

    def _vllm_sampler(self, folder: Path) -> Engine:
        from vllm.lora.request import LoRARequest

        if self._vllm is None:
            from spider.engines.vllm_engine import VLLMEngine

            rank = self.lora.rank or 1
            parameters: dict[str, Any] = {
                "enable_lora": True,
                "max_lora_rank": next((r for r in VLLM_LORA_RANKS if r >= rank), rank),
                "max_loras": 2,  # the current sampler and the one before it, in flight together
                "dtype": str(self.dtype).removeprefix("torch."),
                "seed": 0,
            }
            if self.device.type == "cuda":
                parameters["gpu_memory_utilization"] = 0.35  # the trainer holds the rest of the device
            parameters.update(self.sampler_parameters)
            self._vllm = VLLMEngine(str(self.path), parameters)
        lora_id = next(self._lora_ids)
        return AdapterSampler(self._vllm, LoRARequest(f"{folder.name}-{lora_id}", lora_id, str(folder.resolve())))

    # -- the rest -------------------------------------------------------------------------------

    def tokenizer(self) -> Any:
        return self._tokenizer

    def info(self) -> dict[str, Any]:
        trainable = sum(p.numel() for p in self.trainable)
        total = sum(p.numel() for p in self.model.parameters())
        return {
            "base_model": self.base_model,
            "path": str(self.path),
            "lora_rank": self.lora.rank,
            "lora_alpha": self.lora_alpha if self.lora.rank is not None else None,
            "target_modules": (self.lora.target_modules or "all-linear") if self.lora.rank is not None else None,
            "trainable_parameters": trainable,
            "total_parameters": total,
            "device": str(self.device),
            "dtype": str(self.dtype).removeprefix("torch."),
            "sampler_engine": self.sampler_engine,
            "steps": self.steps,
        }

    def close(self) -> None:
        vllm, self._vllm = self._vllm, None
        if vllm is not None:
            vllm.close()
        self.model = self.peft = self.optimizer = None
        self.trainable = []
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def micro_batches(lengths: list[int], max_tokens: int) -> list[list[int]]:
    """Indices of sequences grouped so that each group's padded size (rows x its longest) is at most
    `max_tokens`; a longer sequence goes alone. Longest first, so similar lengths share a batch."""
    batches: list[list[int]] = []
    current: list[int] = []
    for index in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        if current and (len(current) + 1) * lengths[current[0]] > max_tokens:
            batches.append(current)
            current = []
        current.append(index)
    if current:
        batches.append(current)
    return batches


class AdapterSampler(Engine):
    """The backend's one vLLM engine, with every request (samples and scores) sent under one LoRA
    adapter. vLLM loads the adapter from disk under a fresh id, so it is never a cached older one."""

    def __init__(self, engine: Any, lora_request: Any):
        self.lora_request = lora_request
        # A view of the engine whose `llm` adds the adapter to each call: VLLMEngine's own sampling
        # and scoring code runs unchanged on it.
        self._view = copy.copy(engine)
        self._view.llm = _WithAdapter(engine.llm, lora_request)
        self._engine = engine

    def generate(self, requests, params):
        return self._view.generate(requests, params)

    async def sample(self, request, params):
        return await self._view.sample(request, params)

    def score(self, requests):
        return self._view.score(requests)

    def close(self) -> None:
        view, self._view = self._view, None
        if view is None or self._engine.llm is None:
            return
        try:
            self._engine.loop.run(self._engine.llm.remove_lora(self.lora_request.lora_int_id))
        except Exception:  # an engine already shut down has no adapter to drop
            pass


class _WithAdapter:
    """An AsyncLLM stand-in that sends every `generate` with one LoRA request."""

    def __init__(self, llm: Any, lora_request: Any):
        self._llm, self._lora_request = llm, lora_request

    def generate(self, *args: Any, **kwargs: Any) -> Any:
        return self._llm.generate(*args, lora_request=self._lora_request, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._llm, name)


class FrozenLoraLinear(torch.nn.Module):
    """A sampler's LoRA linear layer: the operations of peft's `lora.Linear.forward` for one adapter
    in eval mode (the base layer's output; the input cast to the adapter's dtype; B(A x), times the
    scale unless it is 1, added; the sum cast back to the base output's dtype), so its outputs are
    peft's bit for bit, without peft's per-call dispatch, which dominates decoding on a GPU (a
    decode step runs this once per adapted layer)."""

    def __init__(self, layer: Any, adapter: str):
        super().__init__()
        self.base_layer = layer.base_layer
        self.lora_A = layer.lora_A[adapter]
        self.lora_B = layer.lora_B[adapter]
        self.scaling = float(layer.scaling[adapter])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.base_layer(x)
        delta = self.lora_B(self.lora_A(x.to(self.lora_A.weight.dtype)))
        if self.scaling != 1.0:
            delta = delta * self.scaling
        return (result + delta).to(result.dtype)


def _frozen_lora_layers(model: Any) -> Any:
    """`model` (a sampler's snapshot) with each plain LoRA linear layer of one active adapter
    replaced by a `FrozenLoraLinear` over the same tensors; other adapter layers stay peft's."""
    from peft.tuners.lora.layer import Linear as LoraLinear

    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if not isinstance(child, LoraLinear) or child.merged:
                continue
            adapters = [a for a in child.active_adapters if a in child.lora_A]
            plain = (
                len(adapters) == 1
                and not getattr(child, "lora_variant", None)  # DoRA and the like keep peft's forward
                and not getattr(child, "use_dora", {}).get(adapters[0], False)
                and getattr(child, "cast_input_dtype_enabled", True)
            )
            if plain:
                setattr(parent, name, FrozenLoraLinear(child, adapters[0]))
    return model


def _merged_float32(model: Any) -> Any:
    """`model` (a sampler's snapshot) in float32 with each LoRA linear layer replaced by a plain
    linear layer of weight W + scale * B A, computed in float32: the saved weights exactly, as one
    matrix, so decoding runs no adapter operations (on a GPU, a decode step of a LoRA model launches
    about twice the kernels of the plain model). Tensors the trainer holds are never converted in
    place: a float32 trainer's are shared as they are, other dtypes are copied (ties kept)."""
    from peft.tuners.lora.layer import Linear as LoraLinear

    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if not isinstance(child, LoraLinear):
                continue
            adapters = [a for a in child.active_adapters if a in child.lora_A]
            base = child.base_layer
            weight = base.weight.detach().float()
            for adapter in adapters:
                a, b = child.lora_A[adapter].weight.detach().float(), child.lora_B[adapter].weight.detach().float()
                weight = weight + (b @ a) * float(child.scaling[adapter])
            linear = torch.nn.Linear(base.in_features, base.out_features, bias=base.bias is not None, device="meta")
            linear.weight = torch.nn.Parameter(weight, requires_grad=False)
            if base.bias is not None:
                linear.bias = torch.nn.Parameter(base.bias.detach().float(), requires_grad=False)
            setattr(parent, name, linear)
    converted: dict[int, torch.nn.Parameter] = {}
    for module in model.modules():
        for name, param in list(module._parameters.items()):
            if param is not None and param.is_floating_point() and param.dtype != torch.float32:
                if id(param) not in converted:
                    converted[id(param)] = torch.nn.Parameter(param.detach().float(), requires_grad=False)
                module._parameters[name] = converted[id(param)]
    model.config.dtype = torch.float32
    return model


def _load_adapter(peft_model: Any, folder: Path, lora: LoraSpec, alpha: float) -> None:
    """Copy the adapter saved in `folder` into `peft_model`, after checking it has the same shape."""
    from peft import set_peft_model_state_dict

    config = json.loads((folder / ADAPTER_CONFIG).read_text())
    if config.get("r") != lora.rank or float(config.get("lora_alpha", -1)) != alpha:
        raise ValueError(
            f"the adapter at {str(folder)!r} has rank {config.get('r')} and alpha {config.get('lora_alpha')}; "
            f"this backend trains rank {lora.rank}, alpha {alpha}"
        )
    result = set_peft_model_state_dict(peft_model, _read_safetensors(folder))
    if result.unexpected_keys:
        raise ValueError(f"the adapter at {str(folder)!r} has weights this model lacks: {result.unexpected_keys[:5]}")
    missing = [k for k in result.missing_keys if "lora_" in k]
    if missing:
        raise ValueError(f"the adapter at {str(folder)!r} lacks weights: {missing[:5]}")


def _read_safetensors(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise ValueError(f"{str(folder)!r} has no .safetensors weights")
    weights: dict[str, torch.Tensor] = {}
    for file in files:
        weights.update(load_file(str(file)))
    return weights


def _write_atomically(parent: Path, name: str, write: Any) -> Path:
    """Write `parent/name` with `write(folder)` into a fresh folder, then swap it in whole: a reader
    never sees half a checkpoint, and saving a name again replaces it."""
    if not _NAME.match(name):
        raise ValueError(f"checkpoint name {name!r}: use letters, digits, '.', '_' and '-' (e.g. 'step-12')")
    parent.mkdir(parents=True, exist_ok=True)
    dest = parent / name
    tmp = parent / f".{name}.{uuid.uuid4().hex[:8]}.tmp"
    tmp.mkdir()
    try:
        write(tmp)
        if dest.exists():
            old = parent / f".{name}.{uuid.uuid4().hex[:8]}.old"
            dest.rename(old)
            tmp.rename(dest)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(dest)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return dest


def _dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    if dtype is None:
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    names = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
             "float16": torch.float16, "fp16": torch.float16}
    if dtype not in names:
        raise ValueError(f"dtype {dtype!r} is not one of {', '.join(names)}")
    return names[dtype]


def _sampler_engine(choice: str, device: torch.device, lora: LoraSpec) -> str:
    if choice not in SAMPLER_ENGINES:
        raise ValueError(f"sampler_engine {choice!r} is not one of {', '.join(SAMPLER_ENGINES)}")
    has_vllm = importlib.util.find_spec("vllm") is not None
    if choice == "auto":
        return "vllm" if has_vllm and device.type == "cuda" and lora.rank is not None else "hf"
    if choice == "vllm":
        if not has_vllm:
            raise EngineError("sampler_engine 'vllm' needs the vllm package on this worker; use 'hf' or 'auto'")
        if lora.rank is None:
            raise ValueError("sampler_engine 'vllm' samples LoRA adapters; a full fine-tune (rank None) samples with 'hf'")
        if lora.rank > VLLM_LORA_RANKS[-1]:
            raise ValueError(f"vLLM serves LoRA ranks up to {VLLM_LORA_RANKS[-1]}, not {lora.rank}")
    return choice


def _check_adam(adam: AdamParams) -> None:
    problems = []
    if not adam.learning_rate >= 0:
        problems.append(f"learning_rate must be >= 0, got {adam.learning_rate}")
    for name in ("beta1", "beta2"):
        if not 0 <= getattr(adam, name) < 1:
            problems.append(f"{name} must be in [0, 1), got {getattr(adam, name)}")
    if not adam.eps > 0:
        problems.append(f"eps must be > 0, got {adam.eps}")
    if not adam.weight_decay >= 0:
        problems.append(f"weight_decay must be >= 0, got {adam.weight_decay}")
    if not adam.grad_clip_norm >= 0:
        problems.append(f"grad_clip_norm must be >= 0 (0: no clipping), got {adam.grad_clip_norm}")
    if problems:
        raise ValueError("AdamParams: " + "; ".join(problems))
