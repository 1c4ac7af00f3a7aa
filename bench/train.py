"""On-policy distillation step throughput: Spider's local trainer against TRL's trainers, same device,
same random-init models, same batch and lengths.

Spider runs its real step, `spider.train.loop.on_policy_step`: the student (LocalBackend, LoRA) samples
through its hf sampler, an in-process HFEngine teacher scores (through spider.train.teacher.Teacher,
which renders and aligns), the importance-sampling update runs, and the sampler's weights are saved.
The baselines are TRL's `DistillationTrainer` (its on-policy distillation trainer, same tokenizer,
reverse KL) and `experimental.gold.GOLDTrainer` (lmbda=1, ULD loss, across tokenizers); see
bench/train_trl.py.

Throughput of a step = (sampled tokens + trained tokens) / step seconds, counted alike for every
trainer (completion tokens, the stop token included). Reported: medians over the steps after the
warm-up, each Spider stage's share, peak GPU memory, and Spider / TRL ratios from the same run.

    .venv/bin/python bench/train.py --tiny              # smoke run, tiny models (CPU here)
    PYTHONPATH=. python3 bench/train.py                  # ~0.5B student, ~1B teachers, on a GPU (~15 min)
    python3 bench/train.py --runs spider-same trl-same   # a subset

Tokenizers come from tests/tokenizers_offline.py (SmolLM2's byte-level BPE for the student and the
same-tokenizer teacher, Qwen's for the cross-tokenizer teacher); set SPIDER_TOKENIZER_CACHE to a
folder they were saved in to run where their source packages are missing.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
ROOT = Path(__file__).resolve().parent.parent
for path in (ROOT / "bench", ROOT / "tests", ROOT):
    sys.path.insert(0, str(path))

import torch  # noqa: E402

from spider.train.backend import LoraSpec  # noqa: E402
from spider.train.local import LocalBackend  # noqa: E402

# "-merged": the student's sampler decodes the adapter merged into a float32 copy (LocalBackend's
# hf sampler parameter `merged`); otherwise through its LoRA layers.
RUNS = ("spider-same", "spider-same-merged", "trl-same", "spider-cross", "spider-cross-merged", "trl-cross")
BASELINE = {"spider-same": "trl-same", "spider-same-merged": "trl-same",
            "spider-cross": "trl-cross", "spider-cross-merged": "trl-cross"}
PROMPT_TOKENS_MAX = 192  # room for the longest rendered prompt below, system prompt included

PROMPTS = [
    "Explain, step by step, how a hash map handles collisions, and when open addressing beats chaining.",
    "Write a short story about a lighthouse keeper who finds a message in a bottle on a stormy night.",
    "Summarise the causes of the French Revolution in a few paragraphs for a high-school student.",
    "A train leaves at 9:40 and travels 210 km at 84 km/h. When does it arrive? Show your reasoning.",
    "Compare TCP and UDP: reliability, ordering, latency, and which applications use each and why.",
    "Translate into French and explain the grammar: 'We would have left earlier if it had not rained.'",
    "Give a recipe for a vegetarian lasagna for six people, with quantities and timings for each step.",
    "Write a Python function that merges overlapping intervals, then explain its time complexity.",
]


@dataclass(frozen=True)
class Shape:
    """A random-init causal LM: `family` llama or qwen2."""

    family: str
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int


@dataclass(frozen=True)
class Setup:
    student: Shape
    teacher: Shape  # same tokenizer as the student
    cross_teacher: Shape  # Qwen's tokenizer
    prompts: int  # prompts per step
    group_size: int  # samples per prompt
    max_tokens: int
    lora_rank: int
    warmup: int
    steps: int  # measured steps after the warm-up

    @property
    def batch(self) -> int:
        return self.prompts * self.group_size


SETUPS = {
    "gpu": Setup(
        student=Shape("llama", 1024, 4096, 28, 16, 8),
        teacher=Shape("llama", 1536, 6144, 28, 12, 4),
        cross_teacher=Shape("qwen2", 1536, 6144, 28, 12, 4),
        prompts=8, group_size=4, max_tokens=256, lora_rank=32, warmup=1, steps=4,
    ),
    "tiny": Setup(
        student=Shape("llama", 64, 128, 2, 4, 2),
        teacher=Shape("llama", 96, 192, 2, 4, 2),
        cross_teacher=Shape("qwen2", 96, 192, 2, 4, 2),
        prompts=2, group_size=2, max_tokens=12, lora_rank=8, warmup=1, steps=2,
    ),
}


@dataclass
class Models:
    student: Path
    teacher: Path
    cross_teacher: Path
    parameters: dict[str, int]


@dataclass
class Env:
    """Where and how everything runs."""

    setup: Setup
    models: Models
    device: torch.device
    dtype: torch.dtype
    work: Path

    @property
    def dtype_name(self) -> str:
        return str(self.dtype).removeprefix("torch.")

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()


@dataclass
class RunResult:
    """One trainer's steps (each a dict of seconds and token counts); the first `warmup` are not counted."""

    name: str
    warmup: int
    steps: list[dict[str, float]] = field(default_factory=list)
    peak_gib: float | None = None
    error: str | None = None

    @property
    def measured(self) -> list[dict[str, float]]:
        return self.steps[self.warmup :]

    def median(self, key: str) -> float | None:
        values = [s[key] for s in self.measured if key in s]
        return statistics.median(values) if values else None

    def share(self, key: str) -> float | None:
        values = [s[key] / s["step_s"] for s in self.measured if key in s]
        return statistics.median(values) if values else None

    @property
    def tokens_per_s(self) -> float | None:
        values = [s["tokens"] / s["step_s"] for s in self.measured]
        return statistics.median(values) if values else None


# -- models -----------------------------------------------------------------------------------


def tokenizers() -> dict[str, Any]:
    import tokenizers_offline

    return {"smollm2": tokenizers_offline.smollm2(), "qwen": tokenizers_offline.qwen()}


def build_model(shape: Shape, tokenizer: Any, folder: Path, seed: int, device: torch.device, dtype: torch.dtype) -> int:
    """A random-init model with `tokenizer`, saved as a Hugging Face folder; returns its parameter count."""
    from transformers import AutoModelForCausalLM, GenerationConfig, LlamaConfig, Qwen2Config

    config_class = {"llama": LlamaConfig, "qwen2": Qwen2Config}[shape.family]
    vocab = -(-len(tokenizer) // 64) * 64
    config = config_class(
        vocab_size=vocab,
        hidden_size=shape.hidden,
        intermediate_size=shape.intermediate,
        num_hidden_layers=shape.layers,
        num_attention_heads=shape.heads,
        num_key_value_heads=shape.kv_heads,
        max_position_embeddings=4096,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id
    )
    model.save_pretrained(str(folder))
    tokenizer.save_pretrained(str(folder))
    count = sum(p.numel() for p in model.parameters())
    del model
    release()
    return count


def build_models(setup: Setup, folder: Path, device: torch.device, dtype: torch.dtype) -> Models:
    toks = tokenizers()
    paths = {"student": folder / "student", "teacher": folder / "teacher", "cross_teacher": folder / "teacher-cross"}
    parameters = {
        "student": build_model(setup.student, toks["smollm2"], paths["student"], 1, device, dtype),
        "teacher": build_model(setup.teacher, toks["smollm2"], paths["teacher"], 2, device, dtype),
        "cross_teacher": build_model(setup.cross_teacher, toks["qwen"], paths["cross_teacher"], 3, device, dtype),
    }
    return Models(**paths, parameters=parameters)


def release() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# -- Spider -----------------------------------------------------------------------------------


class TimedBackend(LocalBackend):
    """LocalBackend that adds up the seconds its `sampler()` calls take (the snapshot of the weights)."""

    sampler_seconds = 0.0

    def sampler(self, path: str):
        start = time.perf_counter()
        try:
            return super().sampler(path)
        finally:
            self.sampler_seconds += time.perf_counter() - start


class TimedScores:
    """The teacher's engine, adding up the seconds of its `score` calls: what Teacher.score spends
    outside them is rendering the teacher's prompt, re-tokenizing and aligning."""

    def __init__(self, engine: Any):
        self.engine = engine
        self.tokenizer = engine.tokenizer
        self.seconds = 0.0

    def score(self, requests):
        start = time.perf_counter()
        try:
            return self.engine.score(requests)
        finally:
            self.seconds += time.perf_counter() - start


def spider_settings(setup: Setup):
    from spider.train.loop import Settings

    return Settings(
        group_size=setup.group_size, max_tokens=setup.max_tokens, temperature=1.0, learning_rate=1e-4,
        lr_schedule="constant", warmup_steps=0, total_steps=setup.warmup + setup.steps, num_substeps=1,
        kl_penalty_coef=1.0, kl_discount_factor=0.0, loss_fn="importance_sampling", loss_fn_config=None,
        adam_beta1=0.9, adam_beta2=0.95, adam_eps=1e-12, weight_decay=0.0, max_grad_norm=0.0,
        compute_post_kl=False, seed=0,
    )


def spider_backend(env: Env, work: Path, merged: bool = False) -> TimedBackend:
    setup = env.setup
    return TimedBackend(
        env.models.student, LoraSpec(rank=setup.lora_rank), work_dir=work, device=env.device, dtype=env.dtype,
        micro_batch_tokens=setup.batch * (PROMPT_TOKENS_MAX + setup.max_tokens),  # the whole batch in one pass, as TRL's
        sampler_engine="hf", sampler_parameters={"batch_size": setup.batch, "merged": merged},
    )


def spider_run(env: Env, name: str, teacher_folder: Path, merged: bool) -> RunResult:
    from spider.engines.hf_engine import HFEngine
    from spider.engines.loop import engine_loop
    from spider.train.loop import Prompt, TrainData, TrainRun, on_policy_step
    from spider.train.teacher import Teacher
    from spider.types import Message

    setup = env.setup
    result = RunResult(name, setup.warmup)
    backend = spider_backend(env, env.work / name, merged)
    engine = TimedScores(HFEngine(str(teacher_folder), {"dtype": env.dtype_name, "device": str(env.device)}))
    rows = [Prompt(i, [Message("user", text)]) for i, text in enumerate(PROMPTS[: setup.prompts])]
    run = TrainRun(
        settings=spider_settings(setup),
        backend=backend,
        teacher=Teacher(engine, engine.tokenizer, backend.tokenizer()),
        data=TrainData(rows=rows, eval_rows=[], groups_per_batch=setup.prompts),
        sampler_path=backend.save_weights_for_sampler("step-000000"),
    )
    try:
        for step in range(setup.warmup + setup.steps):
            engine.seconds = backend.sampler_seconds = 0.0
            env.sync()
            m = on_policy_step(run, step, engine_loop())
            staged = m["sample_s"] + m["teacher_s"] + m["train_s"] + m["save_s"]
            result.steps.append({
                "step_s": m["step_s"],
                "sample_s": m["sample_s"],
                "sampler_build_s": backend.sampler_seconds,
                "teacher_s": m["teacher_s"],
                "score_s": engine.seconds,
                "align_s": m["teacher_s"] - engine.seconds,
                "train_s": m["train_s"],
                "save_s": m["save_s"],
                "other_s": m["step_s"] - staged,  # assembling the data, the metrics
                "tokens_sampled": m["tokens_sampled"],
                "tokens_trained": m["tokens_trained"],
                "tokens": m["tokens_sampled"] + m["tokens_trained"],
                "aligned_fraction": m["aligned_fraction"],
            })
            print(f"  {name} step {step}: {result.steps[-1]['step_s']:.2f}s, {result.steps[-1]['tokens']} tokens", flush=True)
    finally:
        run.close_sampler()
        backend.close()
        engine.engine.close()
    return result


# -- the sampler alone ------------------------------------------------------------------------


def probe_requests(setup: Setup) -> list[Any]:
    from spider.engines.base import GenerationRequest

    return [
        GenerationRequest(f"{i}:{k}", [{"role": "user", "content": text}], seed=97 * i + k)
        for i, text in enumerate(PROMPTS[: setup.prompts]) for k in range(setup.group_size)
    ]


def sampler_variants(env: Env, backend: TimedBackend, path: str) -> dict[str, Callable[[], Any]]:
    """The student's sampler for the weights at `path`: Spider's two (LoRA layers; merged float32)
    and the same snapshot decoding through peft's own LoRA layers."""
    import copy

    from spider.engines.hf_engine import HFEngine
    from spider.train.local import _load_adapter

    def with_parameters(merged: bool) -> Any:
        backend.sampler_parameters["merged"] = merged
        return backend.sampler(path)

    def peft_layers() -> HFEngine:
        shared = {id(t): t for t in list(backend.model.parameters()) + list(backend.model.buffers()) if not t.requires_grad}
        snapshot = copy.deepcopy(backend.peft, memo=shared)
        with torch.no_grad():
            _load_adapter(snapshot, Path(path), backend.lora, backend.lora_alpha)
        snapshot.requires_grad_(False)
        return HFEngine.from_model(snapshot.get_base_model(), backend.tokenizer(), name="peft", batch_size=env.setup.batch)

    return {
        "LoRA layers (FrozenLoraLinear)": lambda: with_parameters(False),
        "merged float32": lambda: with_parameters(True),
        "peft's LoRA layers": peft_layers,
    }


def sampler_probe(env: Env, profile_to: Path | None, timed: bool) -> dict[str, Any]:
    """The student's sampler alone, each variant of `sampler_variants` on one batch: with `timed`, the
    seconds of a full-length decode; with `profile_to`, torch.profiler's tables of 16 decoding steps of
    Spider's two variants (the file names go in the answer)."""
    from spider.engines.base import SamplingParams

    setup = env.setup
    backend = spider_backend(env, env.work / "probe")
    path = backend.save_weights_for_sampler("probe")
    requests = probe_requests(setup)
    params = SamplingParams(temperature=1.0, max_tokens=setup.max_tokens, logprobs=True)
    out: dict[str, Any] = {}
    try:
        for label, make in sampler_variants(env, backend, path).items():
            if not timed and label.startswith("peft"):
                continue
            engine = make()
            engine.generate(requests, SamplingParams(temperature=1.0, max_tokens=4))  # kernels and caches warm
            if profile_to is not None and not label.startswith("peft"):
                out[f"profile: {label}"] = profile_decoding(engine, requests, profile_to / f"profile_{label.split()[0]}.txt")
            if timed:
                env.sync()
                start = time.perf_counter()
                results = engine.generate(requests, params)
                env.sync()
                seconds = time.perf_counter() - start
                count = sum(len(c.token_ids) for r in results for c in r.completions)
                out[label] = {"seconds": seconds, "tokens": count, "tokens_per_s": count / seconds}
            engine.close()
    finally:
        backend.close()
    return out


def profile_decoding(engine: Any, requests: list[Any], file: Path) -> str:
    """torch.profiler over 16 decoding steps of the batch, its tables (by host time, by device time)
    written to `file`; returns the kernel launches per decoding step."""
    from torch.profiler import ProfilerActivity, profile

    from spider.engines.base import SamplingParams

    steps = 16
    on_gpu = torch.cuda.is_available()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_gpu else [])
    with profile(activities=activities) as prof:
        engine.generate(requests, SamplingParams(temperature=1.0, max_tokens=steps, logprobs=True))
    events = prof.key_averages()
    launches = sum(e.count for e in events if e.key in ("cudaLaunchKernel", "cuLaunchKernel", "cudaLaunchKernelExC"))
    file.parent.mkdir(parents=True, exist_ok=True)
    file.write_text(events.table(sort_by="cpu_time_total", row_limit=30) + "\n\n"
                    + events.table(sort_by="cuda_time_total" if on_gpu else "self_cpu_time_total", row_limit=20))
    return f"{file.name}: {launches / steps:.0f} kernel launches per decoding step"


# -- the run ----------------------------------------------------------------------------------


def measured(env: Env, name: str, run: Callable[[], RunResult]) -> RunResult:
    """`run()` with its peak GPU memory; a failure is recorded, not raised."""
    release()
    if env.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    try:
        result = run()
    except Exception as exc:  # the other trainers still run; the error is reported
        traceback.print_exc()
        result = RunResult(name, env.setup.warmup, error=f"{type(exc).__name__}: {exc}")
    if env.device.type == "cuda":
        result.peak_gib = (torch.cuda.max_memory_allocated() - base) / 2**30
    release()
    return result


def run_one(env: Env, name: str) -> RunResult:
    import train_trl

    models = env.models
    runners: dict[str, Callable[[], RunResult]] = {
        "spider-same": lambda: spider_run(env, name, models.teacher, merged=False),
        "spider-same-merged": lambda: spider_run(env, name, models.teacher, merged=True),
        "spider-cross": lambda: spider_run(env, name, models.cross_teacher, merged=False),
        "spider-cross-merged": lambda: spider_run(env, name, models.cross_teacher, merged=True),
        "trl-same": lambda: RunResult(name, env.setup.warmup, train_trl.distillation(env, name, PROMPTS)),
        "trl-cross": lambda: RunResult(name, env.setup.warmup, train_trl.gold(env, name, PROMPTS)),
    }
    return measured(env, name, runners[name])


def fmt(value: float | None, spec: str = ".2f", unit: str = "") -> str:
    return "n/a" if value is None else f"{value:{spec}}{unit}"


def report(results: dict[str, RunResult]) -> str:
    lines = [
        "| run | step s (median) | tokens / step | tokens/s | peak GPU GiB | sample | sampler build | teacher score |"
        " render+align | train | save | other |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name, r in results.items():
        if r.error:
            lines.append(f"| {name} | failed: {r.error[:120]} |" + " |" * 10)
            continue
        shares = [fmt(r.share(k) and 100 * r.share(k), ".1f", "%") for k in
                  ("sample_s", "sampler_build_s", "score_s", "align_s", "train_s", "save_s", "other_s")]
        lines.append(
            f"| {name} | {fmt(r.median('step_s'))} | {fmt(r.median('tokens'), '.0f')} | {fmt(r.tokens_per_s, '.0f')} |"
            f" {fmt(r.peak_gib)} | " + " | ".join(shares) + " |"
        )
    lines.append("")
    for spider, trl in BASELINE.items():
        if spider in results and trl in results and results[spider].tokens_per_s and results[trl].tokens_per_s:
            ratio = results[spider].tokens_per_s / results[trl].tokens_per_s
            lines.append(f"{spider} / {trl} step throughput: {ratio:.2f}x (target >= 1.5x)")
    for name in ("spider-cross", "spider-cross-merged"):
        cross = results.get(name)
        if cross and not cross.error:
            lines.append(f"alignment (render + re-tokenize + align) in {name}: {fmt(100 * cross.share('align_s'), '.2f')}% "
                         f"of step time (target < 5%); aligned fraction {fmt(cross.median('aligned_fraction'), '.3f')}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="tiny models, a few steps (a smoke run)")
    parser.add_argument("--runs", nargs="+", choices=RUNS, default=list(RUNS))
    parser.add_argument("--steps", type=int, help="measured steps (default: the setup's)")
    parser.add_argument("--warmup", type=int, help="warm-up steps (default: the setup's)")
    parser.add_argument("--device", help="default: cuda when available, else cpu")
    parser.add_argument("--work", type=Path, default=None, help="models and checkpoints (default: a fresh temp folder)")
    parser.add_argument("--out", type=Path, help="write every step's numbers here (JSON)")
    parser.add_argument("--probe", action="store_true", help="also time the student's sampler alone, three ways")
    parser.add_argument("--profile", type=Path, help="first profile the student's sampler; the tables go in this folder")
    args = parser.parse_args(argv)

    import dataclasses
    import tempfile

    setup = SETUPS["tiny" if args.tiny else "gpu"]
    setup = dataclasses.replace(
        setup, steps=args.steps if args.steps is not None else setup.steps,
        warmup=args.warmup if args.warmup is not None else setup.warmup,
    )
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    if device.type == "cpu":
        torch.set_num_threads(min(4, os.cpu_count() or 1))
    work = args.work or Path(tempfile.mkdtemp(prefix="spider-bench-train-"))
    started = time.perf_counter()
    models = build_models(setup, work / "models", device, dtype)
    env = Env(setup, models, device, dtype, work)
    print(f"device {device} ({torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu'}), {env.dtype_name}; "
          f"models built in {time.perf_counter() - started:.1f}s: "
          + ", ".join(f"{k} {v / 1e6:.1f}M" for k, v in models.parameters.items()), flush=True)
    print(f"batch {setup.prompts} prompts x {setup.group_size} samples, max_tokens {setup.max_tokens}, "
          f"LoRA rank {setup.lora_rank}; {setup.warmup} warm-up + {setup.steps} measured steps", flush=True)

    probe: dict[str, Any] = {}
    if args.profile:
        probe.update(sampler_probe(env, args.profile, timed=False))
        for label, value in probe.items():
            print(f"sampler {label}: {value}", flush=True)
    results: dict[str, RunResult] = {}
    for name in args.runs:
        started = time.perf_counter()
        results[name] = run_one(env, name)
        print(f"{name}: {time.perf_counter() - started:.1f}s", flush=True)
        if args.out:
            write(args.out, env, results, probe)
    if args.probe:
        timed = sampler_probe(env, None, timed=True)
        probe.update(timed)
        for label, value in timed.items():
            print(f"sampler probe: {label}: {value}", flush=True)
    if args.out:
        write(args.out, env, results, probe)
    print(versions())
    print(report(results))
    return 1 if any(r.error for r in results.values()) else 0


def versions() -> str:
    import importlib.metadata as metadata

    names = ("torch", "transformers", "peft", "accelerate", "trl", "datasets")
    found = []
    for name in names:
        try:
            found.append(f"{name} {metadata.version(name)}")
        except metadata.PackageNotFoundError:
            found.append(f"{name} absent")
    return ", ".join(found)


def write(out: Path, env: Env, results: dict[str, RunResult], probe: dict[str, Any]) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "setup": asdict(env.setup),
        "device": str(env.device),
        "dtype": env.dtype_name,
        "parameters": env.models.parameters,
        "versions": versions(),
        "runs": {
            name: asdict(r) | {"tokens_per_s": r.tokens_per_s, "median_step_s": r.median("step_s")}
            for name, r in results.items()
        },
        "sampler_probe": probe,
    }
    out.write_text(json.dumps(payload, indent=1))


if __name__ == "__main__":
    sys.exit(main())
