"""What an on-policy job's trainer is made of, from its config: the student's backend, the teacher,
the prompts, the tools and simulated user of its conversations; and the export at the end."""

from __future__ import annotations

import json
import time
import uuid
from typing import Any

from spider.config import JobConfig
from spider.engines.base import Engine, GenerationRequest, GenerationResult, SamplingParams, ScoreRequest, ScoreResult
from spider.errors import SpiderError
from spider.jobs.stages import Context, bundle_manifest, job_engine
from spider.jobs.store import JobFiles
from spider.train.loop import Prompt, Settings, TrainData, TrainRun
from spider.types import EventKind, Message

SCORE_WAIT_S = 3600.0


class RemoteScorer(Engine):
    """The job's teacher on the rollout workers: each `score` call is one `on_policy.score` task,
    its answer awaited on a Redis list (in slices, so no socket timeout ends a long wait)."""

    def __init__(self, ctx: Context, job_id: str, timeout_s: float = SCORE_WAIT_S):
        self.ctx = ctx
        self.job_id = job_id
        self.timeout_s = timeout_s

    def generate(self, requests: list[GenerationRequest], params: SamplingParams) -> list[GenerationResult]:
        raise SpiderError("the teacher on rollout workers only scores token sequences")

    def score(self, requests: list[ScoreRequest]) -> list[ScoreResult]:
        from spider.jobs.on_policy import SCORE

        r, keys = self.ctx.store.r, self.ctx.store.keys
        request_id = uuid.uuid4().hex
        r.set(keys.score_request(request_id), json.dumps([q.token_ids for q in requests]), ex=int(self.timeout_s) + 60)
        self.ctx.dispatch(SCORE, self.job_id, request_id)
        deadline = time.monotonic() + self.timeout_s
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                r.delete(keys.score_request(request_id))
                raise SpiderError(f"the teacher did not answer in {self.timeout_s:.0f}s (are rollout workers running?)")
            answer = r.blpop([keys.score_reply(request_id)], timeout=max(1, min(4, int(left))))
            if answer is not None:
                break
        reply = json.loads(answer[1])
        if reply.get("error"):
            raise SpiderError(f"the teacher could not score: {reply['error']}")
        return [
            ScoreResult(key=q.key, logprobs=res["logprobs"], error=res.get("error"))
            for q, res in zip(requests, reply["results"])
        ]


def settings_of(config: JobConfig, total_steps: int) -> Settings:
    o = config.generation.on_policy_options
    return Settings(
        group_size=o.group_size,
        max_tokens=o.max_tokens,
        temperature=o.temperature,
        learning_rate=o.learning_rate,
        lr_schedule=o.lr_schedule,
        warmup_steps=o.warmup_steps,
        total_steps=total_steps,
        num_substeps=o.num_substeps,
        kl_penalty_coef=o.kl_penalty_coef,
        kl_discount_factor=o.kl_discount_factor,
        loss_fn=o.loss_fn,
        loss_fn_config=o.loss_fn_config(),
        adam_beta1=o.adam_beta1,
        adam_beta2=o.adam_beta2,
        adam_eps=o.adam_eps,
        weight_decay=o.weight_decay,
        max_grad_norm=o.max_grad_norm,
        compute_post_kl=o.compute_post_kl,
        seed=o.seed,
        max_tool_turns=config.generation.max_tool_turns,
        tool_choice=config.generation.tool_choice,
    )


def train_data(files: JobFiles, config: JobConfig) -> TrainData:
    saved = json.loads(files.train_rows.read_text())

    def prompts(items: list[dict[str, Any]]) -> list[Prompt]:
        return [Prompt(p["index"], [Message.from_openai(m) for m in p["messages"]]) for p in items]

    o = config.generation.on_policy_options
    return TrainData(prompts(saved["train"]), prompts(saved["eval"]), o.groups_per_batch, o.seed)


def build_run(ctx: Context, job_id: str, config: JobConfig, meta: dict[str, Any] | None) -> tuple[TrainRun, list[Any]]:
    """The job's trainer at the checkpoint `meta` (None: from the start), and what closes it."""
    from spider.engines.loop import engine_loop
    from spider.train.backends import make_backend
    from spider.train.teacher import Teacher

    files = ctx.files(job_id)
    options = config.generation.on_policy_options
    secrets = ctx.store.secrets(job_id)
    total = int(ctx.store.get_field(job_id, "batches_total") or 0)
    closers: list[Any] = []
    backend = make_backend(config, secrets, files.local.trainer, resume=meta["state"] if meta is not None else None)
    closers.append(backend.close)
    try:
        if meta is not None:
            sampler_path = meta["sampler_path"]
        else:
            sampler_path = backend.save_weights_for_sampler("step-000000")
        student_tokenizer = backend.tokenizer()
        scorer: Engine
        if options.teacher_in_process:
            scorer = job_engine(ctx, job_id, options.teacher, secrets)
        else:
            scorer = RemoteScorer(ctx, job_id)
        teacher = Teacher.for_model(options.teacher, scorer, student_tokenizer, secrets)
        manifest = bundle_manifest(ctx, job_id) if ctx.store.get(job_id).has_bundle else None
        tools, parser, user = None, None, None
        if (manifest is not None and manifest.has_tools) or config.generation.mcp_servers:
            from spider.jobs.conversations import open_toolkit
            from spider.rollouts.parsers import ToolCallParser, default_tool_parser

            toolkit = engine_loop().run(open_toolkit(ctx, job_id, config, manifest))
            closers.append(lambda: engine_loop().run(toolkit.aclose()))
            tools = toolkit.tools
            if tools is not None:
                name = config.generation.tool_parser or default_tool_parser(student_tokenizer)
                parser = ToolCallParser(name, student_tokenizer, tools.schemas)
        if config.generation.user is not None:
            from spider.jobs.conversations import simulated_user

            user = simulated_user(config, job_engine(ctx, job_id, config.generation.user.model, secrets))
        if (tools is not None or user is not None) and not _prefix_preserving(student_tokenizer):
            ctx.bus.publish(
                job_id, EventKind.TRAIN_TEMPLATE, "the student's chat template is not prefix-preserving: each "
                "assistant turn of a conversation trains as its own sequence (see separate_turns)", level="warning",
            )
        run = TrainRun(settings_of(config, total), backend, teacher, train_data(files, config), sampler_path,
                       tools=tools, parser=parser, user=user)
        closers.insert(0, lambda: run.close_sampler())
        return run, closers
    except BaseException:
        for close in reversed(closers):
            close()
        raise


def _prefix_preserving(tokenizer: Any) -> bool:
    from spider.chat import Renderer

    return Renderer(tokenizer).is_prefix_preserving()


def model_card(config: dict[str, Any], final: dict[str, Any], base_model: str) -> str:
    """The exported adapter's README: what it is, how it was trained, how it ended."""
    options = (config.get("generation") or {}).get("on_policy_options") or {}
    teacher = options.get("teacher")
    teacher_name = teacher.get("name") if isinstance(teacher, dict) else teacher
    shown = {k: v for k, v in final.items() if not isinstance(v, (dict, list))}
    lines = [
        "---",
        f"base_model: {base_model}",
        "library_name: peft",
        "tags: [spider, on-policy-distillation, lora]",
        "---",
        "",
        f"# On-policy distilled adapter of {base_model}",
        "",
        f"Trained by Spider with on-policy distillation from the teacher `{teacher_name}`: the student sampled,",
        "the teacher scored every sampled token, and the per-token reverse KL was the student's advantage.",
        "",
        "## Final metrics",
        "",
        "| metric | value |",
        "|---|---|",
        *[f"| {k} | {v} |" for k, v in shown.items()],
        "",
        "## Job configuration",
        "",
        "```json",
        json.dumps(config, indent=2, default=str),
        "```",
        "",
    ]
    return "\n".join(lines)


def export_run(run: TrainRun, config: JobConfig, public_config: dict[str, Any], final: dict[str, Any],
               files: JobFiles) -> list[str]:
    """Write the adapter folder (and merged weights when asked); the names of what was written."""
    from spider.train.backends import export_backend

    card = model_card(public_config, final, config.model.name)
    local = files.local  # written on this worker's disk; finalize publishes them to the store
    return export_backend(run.backend, run.sampler_path, local.adapter,
                          local.merged if config.generation.on_policy_options.merge_weights else None, card)
