"""`"auto"` in a DeepSpeed config, with Hugging Face's meaning, resolved from the dsl spec.

Hugging Face's Trainer fills every `"auto"` it knows before DeepSpeed sees the config
(transformers' integrations/deepspeed.py: `trainer_config_process` from TrainingArguments,
`trainer_config_finalize` from the model and the run's length; DeepSpeed alone cannot read them).
In dsl the spec plays the part of TrainingArguments: an `auto` takes the value the spec gives
the engine setting (written next to `deepspeed_config`, or dsl's default, or the planner's
choice for micro_batch / grad_accum left out), and the bucket sizes Hugging Face derives from
the model's hidden size are derived from the model's hidden size here too.

`HF_AUTO` lists every key Hugging Face fills, what it fills it from, and what it becomes in
dsl. An `auto` anywhere else is refused, located: neither Hugging Face nor DeepSpeed gives it a
value (DeepSpeed's pydantic sections drop it and use their default, its other keys crash on it).
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["Auto", "HF_AUTO", "auto_rule"]


@dataclass(frozen=True)
class Auto:
    path: str
    """The DeepSpeed key, dotted."""
    hf: str
    """What Hugging Face fills it with (transformers' integrations/deepspeed.py)."""
    dsl: str
    """What it becomes in dsl."""
    field: str = ""
    """The engine setting the spec decides (the value printed by `dsl validate`), if any."""
    stage: str = "process"
    """process | finalize: which of Hugging Face's two passes fills it."""


HF_AUTO: list[Auto] = [
    Auto("train_micro_batch_size_per_gpu", "per_device_train_batch_size",
         "engine.micro_batch from the spec (planned when left out)", "micro_batch"),
    Auto("gradient_accumulation_steps", "gradient_accumulation_steps",
         "engine.grad_accum from the spec (planned when left out)", "grad_accum"),
    Auto("train_batch_size", "world_size x per_device_train_batch_size x gradient_accumulation_steps",
         "micro_batch x grad_accum x data-parallel size (engine.train_batch from the spec when written)", "train_batch"),
    Auto("gradient_clipping", "max_grad_norm", "engine.grad_clip from the spec", "grad_clip"),
    Auto("optimizer.params.lr", "learning_rate", "engine.optimizer.lr from the spec", "optimizer.lr"),
    Auto("optimizer.params.betas", "[adam_beta1, adam_beta2]", "engine.optimizer.betas from the spec", "optimizer.betas"),
    Auto("optimizer.params.eps", "adam_epsilon", "engine.optimizer.eps from the spec", "optimizer.eps"),
    Auto("optimizer.params.weight_decay", "weight_decay", "engine.optimizer.weight_decay from the spec",
         "optimizer.weight_decay"),
    Auto("scheduler.params.warmup_min_lr", "0", "0", "scheduler.warmup_min_lr"),
    Auto("scheduler.params.warmup_max_lr", "learning_rate", "engine.optimizer.lr from the spec", "optimizer.lr"),
    Auto("fp16.enabled", "fp16 or fp16_full_eval (amp backend)", "engine.precision from the spec is fp16", "precision"),
    Auto("bf16.enabled", "bf16 or bf16_full_eval", "engine.precision from the spec is bf16", "precision"),
    Auto("amp.enabled", "fp16 with the apex backend", "false (dsl has no apex backend)"),
    Auto("amp.opt_level", "fp16_opt_level", "unused (amp is disabled)"),
    Auto("zero_optimization.reduce_bucket_size", "hidden_size x hidden_size",
         "hidden_size x hidden_size of the model -> engine.bucket_mib", "bucket_mib", "finalize"),
    Auto("zero_optimization.stage3_prefetch_bucket_size", "0.9 x hidden_size x hidden_size (ZeRO-3)",
         "computed as Hugging Face does, then noted (a tuning key)", "", "finalize"),
    Auto("zero_optimization.stage3_param_persistence_threshold", "10 x hidden_size (ZeRO-3)",
         "computed as Hugging Face does, then noted (a tuning key)", "", "finalize"),
    Auto("scheduler.params.total_num_steps", "num_training_steps",
         "run.train.steps (initialize: total_steps=)", "scheduler.total_steps", "finalize"),
    Auto("scheduler.params.warmup_num_steps", "warmup_steps, or ceil(warmup_ratio x num_training_steps)",
         "engine.scheduler.warmup_steps from the spec", "scheduler.warmup_steps", "finalize"),
]
"""Every key Hugging Face's `trainer_config_process` / `trainer_config_finalize` fills, in its order."""

# Keys Hugging Face's DeepSpeed plugin in accelerate also fills from its own settings, and the
# aliases of the hidden-size keys (DeepSpeed reads both spellings).
_ALIASES = {
    "bfloat16.enabled": "bf16.enabled",
    "zero_optimization.prefetch_bucket_size": "zero_optimization.stage3_prefetch_bucket_size",
    "zero_optimization.param_persistence_threshold": "zero_optimization.stage3_param_persistence_threshold",
}
EXTRA_AUTO = {
    "zero_optimization.stage3_gather_16bit_weights_on_model_save":
        "accelerate's zero3_save_16bit_model; a save format, noted",
    "zero_optimization.gather_16bit_weights_on_model_save":
        "accelerate's zero3_save_16bit_model; a save format, noted",
}

_BY_PATH = {a.path: a for a in HF_AUTO}


def auto_rule(path: str) -> Auto | None:
    """The Hugging Face rule for an `auto` at `path` (dotted), or None when nothing fills it."""
    return _BY_PATH.get(_ALIASES.get(path, path))
