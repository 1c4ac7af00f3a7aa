"""The student's trainer for a job (`local` or `tinker`, from `on_policy_options.backend`), and the
export of what it trained."""

from __future__ import annotations

import os
from pathlib import Path

from spider.config import TINKER_KEY_SECRET, JobConfig
from spider.train.backend import LoraSpec, TrainingBackend


def lora_spec(config: JobConfig) -> LoraSpec:
    o = config.generation.on_policy_options
    if o.lora_rank == 0:
        return LoraSpec(rank=None)
    return LoraSpec(rank=o.lora_rank, alpha=o.lora_alpha, target_modules=o.lora_target_modules)


def tinker_base_url() -> str | None:
    """The Tinker service the operator points workers at (`SPIDER_TINKER_BASE_URL`; None: the SDK's
    default). Never a job's choice: a job naming the endpoint could send its requests anywhere."""
    return os.environ.get("SPIDER_TINKER_BASE_URL") or None


# Beside the exported adapter: where a remote trainer's weights are downloaded to be exported.
EXPORT_SCRATCH = ".export-source"


def make_backend(config: JobConfig, secrets: dict[str, str], work_dir: Path, resume: str | None = None) -> TrainingBackend:
    """The job's student trainer, at the saved state `resume` (a path `save_state` returned) when
    given. Local models resolve as every engine's do (SPIDER_MODEL_DIRS, the Hugging Face cache,
    Spider's model cache); the job's HF_TOKEN, never the worker's, reads private ones."""
    from spider.models import ModelAccess, resolve_model

    o = config.generation.on_policy_options
    access = ModelAccess.from_env()
    if o.resolved_backend == "tinker":
        from spider.train.tinker_backend import TinkerBackend

        return TinkerBackend(
            config.model.name,
            {TINKER_KEY_SECRET: secrets.get(TINKER_KEY_SECRET, "")},
            base_url=tinker_base_url(),
            lora=lora_spec(config),
            seed=o.seed,
            student_checkpoint=resume or o.student_checkpoint,  # a resumed run continues its own state
            access=access,
        )
    from spider.train.local import LocalBackend

    folder = resolve_model(config.model.name, token=secrets.get("HF_TOKEN"), access=access)
    parameters = dict(config.model.parameters)
    device = dtype = None
    if config.model.provider == "vllm":
        sampler = parameters  # the engine arguments of the worker's vLLM sampler
    else:
        # hf: the trainer's own device and dtype; the sampler decodes with the adapter merged into
        # a float32 copy on a GPU (1.6x the step throughput measured on an H200, see BENCHMARKS.md)
        device = None if parameters.get("device") in (None, "auto") else parameters["device"]
        dtype = None if parameters.get("dtype") in (None, "auto") else parameters["dtype"]
        # a whole step's samples decode as one batch unless the job says otherwise
        batch = parameters.get("batch_size") or min(256, o.groups_per_batch * o.group_size)
        sampler = {"batch_size": batch, "merged": _on_gpu(device)}
    backend = LocalBackend(
        folder,
        lora_spec(config),
        work_dir=work_dir,
        device=device,
        dtype=dtype,
        seed=o.seed,
        sampler_engine="vllm" if config.model.provider == "vllm" else "hf",
        sampler_parameters=sampler,
    )
    if resume is not None:
        backend.load_state(resume)
    elif o.student_checkpoint is not None:
        backend.load_weights(resolve_model(o.student_checkpoint, access=access))
    return backend


def _on_gpu(device: str | None) -> bool:
    import torch

    return (device or ("cuda" if torch.cuda.is_available() else "cpu")).startswith("cuda")


def export_backend(backend: TrainingBackend, sampler_path: str, adapter_dir: Path, merged_dir: Path | None,
                   card: str) -> list[str]:
    """The trained weights as a PEFT adapter folder (and merged weights when `merged_dir` is given);
    the names of the folders written."""
    from spider.train.export import export_adapter, merge_adapter

    folder = backend.export_weights(sampler_path, adapter_dir.parent / EXPORT_SCRATCH)
    if getattr(backend, "lora", None) is not None and backend.lora.rank is None:
        # Every weight was trained: the model folder itself is the export.
        import shutil

        if adapter_dir.exists():
            shutil.rmtree(adapter_dir)
        shutil.copytree(folder, adapter_dir)
        (adapter_dir / "README.md").write_text(card)
        return [adapter_dir.name]
    export_adapter(folder, adapter_dir, tokenizer=backend.tokenizer(), model_card=card, base_model=backend.base_model)
    written = [adapter_dir.name]
    if merged_dir is not None:
        merge_adapter(backend.base_folder(), adapter_dir, merged_dir)
        written.append(merged_dir.name)
    return written
