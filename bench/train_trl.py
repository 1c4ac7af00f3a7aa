"""TRL's on-policy distillation trainers as bench/train.py's baselines, set up like Spider's step:
the same student, teacher, prompts, batch (one generation batch and one optimizer step per step, no
gradient accumulation), completion length, LoRA (rank, alpha, every linear layer), Adam settings and
dtype. Gradient checkpointing is off, as Spider trains without it (TRL turns it on by default).

* same tokenizer: `trl.DistillationTrainer` (TRL's on-policy distillation trainer; `beta=1`, the
  reverse KL over the whole vocabulary), each prompt `group_size` times in the batch.
* across tokenizers: `trl.experimental.gold.GOLDTrainer` with `lmbda=1` (every batch on-policy),
  the ULD loss with its byte-offset alignment, `num_generations=group_size`.

A step is timed from one `on_step_end` to the next (the device synchronized at both ends); its
tokens are the completion tokens TRL generated in it (the stop token included), sampled once and
trained once, as Spider's are counted.
"""

from __future__ import annotations

import time
from typing import Any

from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback

Env = Any  # bench/train.py's Env: setup, models, device, dtype, work, sync()
Step = dict[str, float]


class Meter:
    """What the trainer's generation hooks add up between two step ends."""

    def __init__(self, env: Env):
        self.env = env
        self.sample_s = 0.0
        self.tokens = 0

    def timed(self, generate, count):
        self.env.sync()
        start = time.perf_counter()
        out = generate()
        self.env.sync()
        self.sample_s += time.perf_counter() - start
        self.tokens += count(out)
        return out


class StepClock(TrainerCallback):
    """Appends one dict per optimizer step to `steps`: its seconds, its generation's seconds and tokens."""

    def __init__(self, meter: Meter, name: str, steps: list[Step]):
        self.meter, self.name, self.steps = meter, name, steps
        self.last = 0.0

    def on_train_begin(self, args, state, control, **kwargs):
        self.meter.env.sync()
        self.last = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        self.meter.env.sync()
        now = time.perf_counter()
        tokens = self.meter.tokens
        self.steps.append({
            "step_s": now - self.last,
            "sample_s": self.meter.sample_s,
            "tokens_sampled": tokens,
            "tokens_trained": tokens,
            "tokens": 2 * tokens,
        })
        print(f"  {self.name} step {len(self.steps) - 1}: {now - self.last:.2f}s, {2 * tokens} tokens", flush=True)
        self.meter.sample_s, self.meter.tokens, self.last = 0.0, 0, now


def common_args(env: Env, name: str) -> dict[str, Any]:
    setup = env.setup
    on_gpu = env.device.type == "cuda"
    return {
        "output_dir": str(env.work / name),
        "per_device_train_batch_size": setup.batch,
        "gradient_accumulation_steps": 1,
        "max_steps": setup.warmup + setup.steps,
        "learning_rate": 1e-4,
        "lr_scheduler_type": "constant",
        "adam_beta1": 0.9,
        "adam_beta2": 0.95,
        "adam_epsilon": 1e-12,
        "weight_decay": 0.0,
        "max_grad_norm": 0.0,
        "max_completion_length": setup.max_tokens,
        "temperature": 1.0,
        "top_p": 1.0,
        "top_k": 0,
        "bf16": on_gpu,
        "use_cpu": not on_gpu,
        "gradient_checkpointing": False,
        "save_strategy": "no",
        "report_to": "none",
        "disable_tqdm": True,
        "seed": 0,
    }


def lora(env: Env):
    from peft import LoraConfig

    rank = env.setup.lora_rank
    return LoraConfig(r=rank, lora_alpha=32, target_modules="all-linear", lora_dropout=0.0, task_type="CAUSAL_LM")


def load(folder, env: Env):
    return AutoModelForCausalLM.from_pretrained(str(folder), dtype=env.dtype)


def distillation(env: Env, name: str, prompts: list[str]) -> list[Step]:
    from datasets import Dataset
    from trl import DistillationConfig, DistillationTrainer

    meter = Meter(env)

    class Timed(DistillationTrainer):
        def _generate(self, prompts):
            return meter.timed(lambda: super(Timed, self)._generate(prompts), lambda out: sum(len(c) for c in out[1]))

    setup = env.setup
    rows = [{"prompt": [{"role": "user", "content": text}]} for text in prompts[: setup.prompts] for _ in range(setup.group_size)]
    config = DistillationConfig(**common_args(env, name), beta=1.0, disable_dropout=True, shuffle_dataset=False)
    tokenizer = AutoTokenizer.from_pretrained(str(env.models.student), padding_side="left")
    return train(Timed, env, name, meter, env.models.teacher, Dataset.from_list(rows), config, tokenizer)


def gold(env: Env, name: str, prompts: list[str]) -> list[Step]:
    from datasets import Dataset
    from trl.experimental.gold import GOLDConfig, GOLDTrainer

    meter = Meter(env)

    class Timed(GOLDTrainer):
        def generate_on_policy_outputs(self, model, inputs, generation_config):
            parent = super(Timed, self).generate_on_policy_outputs
            return meter.timed(lambda: parent(model, inputs, generation_config), lambda out: int((out[2] != -100).sum()))

    setup = env.setup
    rows = [
        {"messages": [{"role": "user", "content": text}, {"role": "assistant", "content": "Sure."}]}
        for text in prompts[: setup.prompts]
    ]
    config = GOLDConfig(
        **common_args(env, name),
        lmbda=1.0,
        num_generations=setup.group_size,
        use_uld_loss=True,
        teacher_tokenizer_name_or_path=str(env.models.cross_teacher),
        max_length=setup.max_tokens + 256,
    )
    tokenizer = AutoTokenizer.from_pretrained(str(env.models.student))
    return train(Timed, env, name, meter, env.models.cross_teacher, Dataset.from_list(rows), config, tokenizer)


def train(trainer_class, env: Env, name: str, meter: Meter, teacher, dataset, config, tokenizer) -> list[Step]:
    """Run a TRL trainer on the bench's student and `teacher`; the timed steps."""
    steps: list[Step] = []
    trainer = trainer_class(
        model=load(env.models.student, env),
        teacher_model=load(teacher, env),
        args=config,
        train_dataset=dataset,
        processing_class=tokenizer,
        peft_config=lora(env),
        callbacks=[StepClock(meter, name, steps)],
    )
    trainer.train()
    return steps
