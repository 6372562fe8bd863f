"""A DeepSpeed JSON config becomes engine settings; what dsl cannot honour is named, located."""

from __future__ import annotations

import json

import pytest

from dsl.engine.errors import UserError
from dsl.launcher.spec import load_spec

DS = {
    "train_batch_size": 32,
    "train_micro_batch_size_per_gpu": 4,
    "gradient_accumulation_steps": 4,
    "zero_optimization": {"stage": 2, "overlap_comm": True, "contiguous_gradients": True,
                          "reduce_bucket_size": 5e7,
                          "offload_optimizer": {"device": "cpu", "pin_memory": True}},
    "fp16": {"enabled": True, "loss_scale": 0, "initial_scale_power": 12, "loss_scale_window": 500,
             "hysteresis": 2, "min_loss_scale": 1},
    "gradient_clipping": 0.5,
    "optimizer": {"type": "AdamW", "params": {"lr": 2e-4, "betas": [0.9, 0.95], "eps": 1e-8,
                                              "weight_decay": 0.1}},
    "scheduler": {"type": "WarmupCosineLR", "params": {"warmup_num_steps": 100, "total_num_steps": 1000,
                                                       "cos_min_ratio": 0.05}},
    "steps_per_print": 50,
}


def _spec(write, ds: dict, engine_extra: str = "") -> str:
    write("ds_config.json", json.dumps(ds, indent=2))
    return write("s.yaml", f"name: j\nrun: {{train: {{}}}}\nengine:\n  deepspeed_config: ds_config.json\n{engine_extra}")


def test_supported_keys_map_onto_engine_settings(write):
    engine = load_spec(_spec(write, DS)).spec.engine
    assert (engine.train_batch, engine.micro_batch, engine.grad_accum, engine.zero_stage) == (32, 4, 4, 2)
    assert engine.offload.optimizer == "cpu" and engine.bucket_mib == pytest.approx(5e7 * 4 / 2**20)
    assert engine.precision == "fp16" and engine.loss_scale.static is None
    assert (engine.loss_scale.initial_scale_power, engine.loss_scale.growth_interval) == (12, 500)
    assert engine.grad_clip == 0.5
    assert engine.optimizer.type == "adamw" and engine.optimizer.lr == 2e-4
    assert engine.optimizer.betas == (0.9, 0.95) and engine.optimizer.weight_decay == 0.1
    assert (engine.scheduler.type, engine.scheduler.warmup_steps, engine.scheduler.min_lr_ratio) == \
        ("cosine", 100, 0.05)
    assert engine.deepspeed_config is None  # the resolved spec carries plain settings


def test_spec_settings_override_the_json(write):
    engine = load_spec(_spec(write, DS, "  micro_batch: 2\n  optimizer: {lr: 1.0e-3}\n")).spec.engine
    assert engine.micro_batch == 2 and engine.optimizer.lr == 1e-3
    assert engine.optimizer.betas == (0.9, 0.95)  # the rest of the block still comes from the JSON


def test_unsupported_keys_are_each_named_with_their_place(write):
    ds = {"zero_optimization": {"stage": 3, "overlap_comm": False, "stage3_max_live_parameters": 1e9},
          "flops_profiler": {"enabled": True}, "optimizer": {"type": "Lamb", "params": {"lr": 1e-3}}}
    with pytest.raises(UserError) as info:
        load_spec(_spec(write, ds))
    message = str(info.value)
    assert "ds_config.json:4:21 zero_optimization.overlap_comm: False is not supported" in message
    assert "ds_config.json:5:35 zero_optimization.stage3_max_live_parameters: not supported" in message
    assert "flops_profiler.enabled: not supported" in message
    assert "optimizer.type: optimizer 'Lamb' is not supported" in message


def test_missing_json_names_the_spec_field(write):
    spec = write("s.yaml", "name: j\nrun: {train: {}}\nengine:\n  deepspeed_config: nope.json\n")
    with pytest.raises(UserError, match=r"s.yaml:4:21 engine.deepspeed_config: cannot read DeepSpeed config"):
        load_spec(spec)


def test_onebit_adam_and_quantized_gradients_map_too(write):
    ds = {"train_micro_batch_size_per_gpu": 4, "zero_optimization": {"stage": 0},
          "optimizer": {"type": "OneBitAdam", "params": {"lr": 1e-3, "freeze_step": 400, "cuda_aware": False,
                                                         "comm_backend_name": "nccl"}}}
    engine = load_spec(_spec(write, ds)).spec.engine
    assert engine.optimizer.type == "onebit_adam" and engine.optimizer.freeze_step == 400
    ds = {"train_micro_batch_size_per_gpu": 4, "zero_optimization": {"stage": 2, "zero_quantized_gradients": True}}
    assert load_spec(_spec(write, ds)).spec.engine.comm.quantize_gradients is True
    # 1-bit Adam with a ZeRO stage it cannot run is refused, naming the stages that work.
    ds = {"zero_optimization": {"stage": 2}, "optimizer": {"type": "OneBitAdam", "params": {"lr": 1e-3}}}
    with pytest.raises(UserError, match="zero_stage 0"):
        load_spec(_spec(write, ds))
