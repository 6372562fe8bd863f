"""A DeepSpeed JSON config becomes engine settings with DeepSpeed's semantics (engine/dsconfig.py):
Hugging Face's `auto` from the spec, DeepSpeed's defaults and batch arithmetic, refusals only for
what changes the result, each located at its key."""

from __future__ import annotations

import json
import re

import pytest

from dsl.engine.config import EngineConfig
from dsl.engine.ds_auto import HF_AUTO
from dsl.engine.dsconfig import Context, import_deepspeed, is_deepspeed_config, merge, report
from dsl.engine.ds_json import load_json_located
from dsl.engine.errors import UserError
from dsl.engine.schedule import from_config
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

TINY = "model: {preset: tiny}, steps: 300"


def _spec(write, ds: dict | str, engine_extra: str = "", resources: str = "", train: str = TINY) -> str:
    write("ds_config.json", ds if isinstance(ds, str) else json.dumps(ds, indent=2))
    return write("s.yaml", f"name: j\nrun: {{train: {{{train}}}}}\n{resources}"
                           f"engine:\n  deepspeed_config: ds_config.json\n{engine_extra}")


def _import(ds: dict, **context) -> EngineConfig:
    data, locations = load_json_located(json.dumps(ds, indent=2), "ds.json")
    imported = import_deepspeed(data, locations, Context(**context))
    return EngineConfig.model_validate(merge(imported.engine, dict(context.get("explicit", {}))))


def _refusal(ds: dict | str, **context) -> str:
    text = ds if isinstance(ds, str) else json.dumps(ds, indent=2)
    data, locations = load_json_located(text, "ds.json")
    with pytest.raises(UserError) as info:
        import_deepspeed(data, locations, Context(**context))
    return str(info.value)


def test_supported_keys_map_onto_engine_settings(write):
    engine = load_spec(_spec(write, DS)).spec.engine
    assert (engine.train_batch, engine.micro_batch, engine.grad_accum, engine.zero_stage) == (32, 4, 4, 2)
    assert engine.offload.optimizer == "cpu" and engine.bucket_mib == pytest.approx(5e7 * 4 / 2**20)
    assert engine.precision == "fp16" and engine.loss_scale.static is None
    assert (engine.loss_scale.initial_scale_power, engine.loss_scale.growth_interval) == (12, 500)
    assert engine.grad_clip == 0.5
    assert engine.optimizer.type == "adamw" and engine.optimizer.lr == 2e-4
    assert engine.optimizer.betas == (0.9, 0.95) and engine.optimizer.weight_decay == 0.1
    s = engine.scheduler
    assert (s.type, s.warmup_steps, s.min_lr_ratio, s.total_steps, s.warmup_type, s.warmup_min_ratio) == \
        ("WarmupCosineLR", 100, 0.05, 1000, "log", 0.0)
    assert engine.deepspeed_config is None  # the resolved spec carries plain settings


def test_spec_settings_override_the_json(write):
    engine = load_spec(_spec(write, DS, "  micro_batch: 2\n  optimizer: {lr: 1.0e-3}\n")).spec.engine
    assert engine.micro_batch == 2 and engine.optimizer.lr == 1e-3
    assert engine.optimizer.betas == (0.9, 0.95)  # the rest of the block still comes from the JSON
    # A spec scheduler that names its type replaces the JSON's scheduler whole.
    engine = load_spec(_spec(write, DS, "  scheduler: {type: cosine}\n")).spec.engine
    assert (engine.scheduler.type, engine.scheduler.warmup_steps, engine.scheduler.total_steps) == ("cosine", 20, None)


# -- DeepSpeed's defaults for what a config leaves out ------------------------------------------


def test_left_out_keys_take_deepspeeds_defaults_not_dsls():
    engine = _import({"train_micro_batch_size_per_gpu": 2, "optimizer": {"type": "Adam"}})
    assert engine.grad_clip == 1.0  # DeepSpeed 0.19.8's default (0.19.3+); 0 turns it off
    assert engine.optimizer.lr == 1e-3  # FusedAdam's default, not dsl's 3e-3
    assert (engine.optimizer.betas, engine.optimizer.eps, engine.optimizer.weight_decay) == ((0.9, 0.999), 1e-8, 0.0)
    assert (engine.scheduler.type, engine.scheduler.warmup_steps) == ("constant", 0)  # no scheduler: constant lr
    assert (engine.zero_stage, engine.precision, engine.offload.optimizer, engine.offload.params) == (0, "fp32", "none", "none")
    assert engine.grad_accum == 1  # DeepSpeed's implied accumulation with only a micro batch
    assert _import({"train_micro_batch_size_per_gpu": 2, "gradient_clipping": 0}).grad_clip is None
    schedule = from_config(engine.scheduler, engine.optimizer.lr, 10)
    assert [schedule(s) for s in (1, 2, 10)] == [1e-3] * 3


def test_warmup_lr_warms_up_logarithmically_by_default_from_deepspeeds_step_timing():
    engine = _import({"train_micro_batch_size_per_gpu": 1, "optimizer": {"type": "AdamW", "params": {"lr": 0.5}},
                      "scheduler": {"type": "WarmupLR", "params": {"warmup_max_lr": 1e-3, "warmup_num_steps": 10}}})
    s = engine.scheduler
    assert (s.type, s.warmup_type, s.warmup_min_lr, s.warmup_steps) == ("WarmupLR", "log", 0.0, 10)
    assert engine.optimizer.lr == 1e-3  # warmup_max_lr replaces the optimizer's lr, as in DeepSpeed
    lr = from_config(s, engine.optimizer.lr, None)
    # DeepSpeed: update k runs at iteration k - 2; gamma = log(it + 1) / log(10) during warm-up.
    import math
    assert [lr(1), lr(2)] == [0.0, 0.0]
    assert lr(3) == pytest.approx(1e-3 * math.log(2) / math.log(10))
    assert lr(12) == lr(100) == 1e-3


def test_warmup_cosine_lr_defaults_cos_min_ratio_and_warmup_decay_lr_its_peak():
    engine = _import({"train_micro_batch_size_per_gpu": 1, "optimizer": {"type": "AdamW", "params": {"lr": 1e-3}},
                      "scheduler": {"type": "WarmupCosineLR", "params": {"total_num_steps": 50}}})
    assert (engine.scheduler.min_lr_ratio, engine.scheduler.warmup_steps, engine.scheduler.warmup_min_ratio) == \
        (0.0001, 1000, 0.0)
    engine = _import({"train_micro_batch_size_per_gpu": 1, "optimizer": {"type": "AdamW", "params": {"lr": 0.3}},
                      "scheduler": {"type": "WarmupDecayLR", "params": {"total_num_steps": 50}}})
    assert engine.optimizer.lr == 0.001  # WarmupDecayLR's own warmup_max_lr default, not the optimizer's lr
    assert (engine.scheduler.total_steps, engine.scheduler.warmup_steps) == (50, 1000)


def test_loss_scale_defaults_are_deepspeeds():
    engine = _import({"train_micro_batch_size_per_gpu": 1, "fp16": {"enabled": True}})
    ls = engine.loss_scale
    assert (ls.initial_scale_power, ls.growth_interval, ls.hysteresis, ls.min_scale, ls.static) == (16, 1000, 2, 1.0, None)
    assert _import({"train_micro_batch_size_per_gpu": 1, "fp16": {"enabled": True, "loss_scale": 128}}).loss_scale.static == 128


# -- batch arithmetic ---------------------------------------------------------------------------


def test_train_batch_and_micro_on_two_ranks_derive_accumulation_as_deepspeed(write):
    # The case: 256 with micro 8 on 2 ranks is micro 8 x 16 accumulation steps.
    spec = load_spec(_spec(write, {"train_batch_size": 256, "train_micro_batch_size_per_gpu": 8},
                           resources="resources: {backend: local, procs_per_node: 2}\n")).spec
    assert (spec.engine.train_batch, spec.engine.micro_batch, spec.engine.grad_accum) == (256, 8, 16)


@pytest.mark.parametrize("given, dp, expected", [
    ({"train_batch_size": 256, "train_micro_batch_size_per_gpu": 8}, 2, (256, 8, 16)),
    ({"train_batch_size": 256, "gradient_accumulation_steps": 4}, 2, (256, 32, 4)),
    ({"train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 3}, 2, (24, 4, 3)),
    ({"train_batch_size": 64}, 4, (64, 16, 1)),
    ({"train_micro_batch_size_per_gpu": 4}, 4, (16, 4, 1)),
    ({"train_batch_size": 24, "train_micro_batch_size_per_gpu": 6, "gradient_accumulation_steps": 2}, 2, (24, 6, 2)),
])
def test_any_two_batch_keys_derive_the_third(given, dp, expected):
    engine = _import(given, dp=dp)
    assert (engine.train_batch or engine.micro_batch * engine.grad_accum * dp, engine.micro_batch,
            engine.grad_accum) == expected


def test_batch_keys_that_disagree_fail_with_deepspeeds_message_at_the_key():
    message = _refusal({"train_batch_size": 100, "train_micro_batch_size_per_gpu": 8}, dp=2)
    assert "ds.json:2:3 train_batch_size: DeepSpeed's rule on 2 data-parallel rank(s): Check batch related " \
           "parameters. train_batch_size is not equal to micro_batch_per_gpu * gradient_acc_step * world_size " \
           "100 != 8 * 6 * 2" in message
    message = _refusal({"train_batch_size": 24, "train_micro_batch_size_per_gpu": 6,
                        "gradient_accumulation_steps": 4}, dp=2)
    assert "24 != 6 * 4 * 2" in message
    assert "has to be greater than 0" in _refusal({"train_batch_size": 4, "train_micro_batch_size_per_gpu": 8}, dp=2)
    assert "ds.json:2:3 train_batch_size: 0 is not a positive whole number" in \
        _refusal({"train_batch_size": 0}, dp=1).replace("\n", " ")


def test_with_the_ranks_unknown_the_derived_key_is_left_to_the_planner(write):
    spec_file = load_spec(_spec(write, {"train_batch_size": 256, "train_micro_batch_size_per_gpu": 8}))
    assert ("engine", "micro_batch") in spec_file.locations.values  # counts as written: the planner keeps 8
    assert ("engine", "grad_accum") not in spec_file.locations.values  # derived once the hosts are known
    # A split the ranks make impossible is refused by dsl validate when the spec fixes them.
    with pytest.raises(UserError, match="train_batch_size: DeepSpeed's rule on 3 data-parallel rank"):
        load_spec(_spec(write, {"train_batch_size": 256, "train_micro_batch_size_per_gpu": 8},
                        resources="resources: {backend: local, procs_per_node: 3}\n"))


# -- auto ---------------------------------------------------------------------------------------

HF_STYLE = {
    "fp16": {"enabled": "auto", "loss_scale": 0, "initial_scale_power": 16},
    "bf16": {"enabled": "auto"},
    "amp": {"enabled": "auto", "opt_level": "auto"},
    "optimizer": {"type": "AdamW", "params": {"lr": "auto", "betas": "auto", "eps": "auto", "weight_decay": "auto"}},
    "scheduler": {"type": "WarmupDecayLR", "params": {"warmup_min_lr": "auto", "warmup_max_lr": "auto",
                                                      "warmup_num_steps": "auto", "total_num_steps": "auto"}},
    "zero_optimization": {"stage": 3, "reduce_bucket_size": "auto", "stage3_prefetch_bucket_size": "auto",
                          "stage3_param_persistence_threshold": "auto"},
    "gradient_accumulation_steps": "auto", "gradient_clipping": "auto", "train_batch_size": "auto",
    "train_micro_batch_size_per_gpu": "auto",
}
SPEC_ENGINE = ("  precision: bf16\n  micro_batch: 2\n  grad_accum: 3\n  grad_clip: 0.25\n"
               "  optimizer: {lr: 2.0e-4, betas: [0.8, 0.9], eps: 1.0e-6, weight_decay: 0.05}\n"
               "  scheduler: {warmup_steps: 7}\n")
# Every key Hugging Face's trainer_config_process / trainer_config_finalize fills, and what it becomes
# with the spec above (tiny model: hidden_size 64; run.train.steps 300; 2 ranks).
AUTO_EXPECTED = {
    "train_micro_batch_size_per_gpu": ("micro_batch", 2),
    "gradient_accumulation_steps": ("grad_accum", 3),
    "train_batch_size": ("train_batch", None),  # unset: micro x accum x dp = 12
    "gradient_clipping": ("grad_clip", 0.25),
    "optimizer.params.lr": ("optimizer.lr", 2e-4),
    "optimizer.params.betas": ("optimizer.betas", (0.8, 0.9)),
    "optimizer.params.eps": ("optimizer.eps", 1e-6),
    "optimizer.params.weight_decay": ("optimizer.weight_decay", 0.05),
    "scheduler.params.warmup_min_lr": ("scheduler.warmup_min_lr", 0.0),
    "scheduler.params.warmup_max_lr": ("optimizer.lr", 2e-4),
    "fp16.enabled": ("precision", "bf16"),
    "bf16.enabled": ("precision", "bf16"),
    "amp.enabled": (None, None),
    "amp.opt_level": (None, None),
    "zero_optimization.reduce_bucket_size": ("bucket_mib", 64 * 64 * 4 / 2**20),
    "zero_optimization.stage3_prefetch_bucket_size": (None, None),
    "zero_optimization.stage3_param_persistence_threshold": (None, None),
    "scheduler.params.total_num_steps": ("scheduler.total_steps", 300),
    "scheduler.params.warmup_num_steps": ("scheduler.warmup_steps", 7),
}


def test_the_auto_table_covers_every_key_hugging_face_fills():
    assert sorted(AUTO_EXPECTED) == sorted(rule.path for rule in HF_AUTO)


@pytest.mark.parametrize("key", sorted(AUTO_EXPECTED))
def test_auto_takes_the_specs_value_as_hugging_face_takes_its_arguments(write, key):
    spec = load_spec(_spec(write, HF_STYLE, SPEC_ENGINE, "resources: {backend: local, procs_per_node: 2}\n")).spec
    field, want = AUTO_EXPECTED[key]
    if field is None:
        return  # noted only (amp is disabled; the ZeRO-3 tuning keys have no dsl setting)
    value = spec.engine
    for part in field.split("."):
        value = getattr(value, part)
    assert value == pytest.approx(want) if isinstance(want, float) else value == want


def test_auto_with_nothing_in_the_spec_takes_dsls_defaults_and_validate_says_so(write, capsys):
    spec = load_spec(_spec(write, HF_STYLE)).spec
    defaults = EngineConfig()
    assert (spec.engine.optimizer.lr, spec.engine.grad_clip, spec.engine.precision) == \
        (defaults.optimizer.lr, defaults.grad_clip, "fp32")
    err = capsys.readouterr().err
    assert re.search(r"ds_config.json:\d+:\d+ optimizer.params.lr: auto -> 0.003 \(engine.optimizer.lr, dsl's default\)", err)
    assert "train_micro_batch_size_per_gpu: auto -> planned (engine.micro_batch: dsl launch chooses it" in err
    assert "zero_optimization.reduce_bucket_size: auto -> 4096 (hidden_size 64 squared" in err
    assert "scheduler.params.total_num_steps: auto -> 300 (the run's optimizer steps" in err
    assert "fp16.enabled: auto -> false (engine.precision is fp32)" in err


def test_auto_fp16_flags_are_not_both_enabled():
    engine = _import({"train_micro_batch_size_per_gpu": 1, "fp16": {"enabled": "auto"}, "bf16": {"enabled": "auto"}},
                     explicit={"precision": "fp16"})
    assert engine.precision == "fp16"
    assert "cannot be simultaneously enabled" in _refusal(
        {"train_micro_batch_size_per_gpu": 1, "fp16": {"enabled": True}, "bf16": {"enabled": "auto"}},
        explicit={"precision": "bf16"})


def test_auto_where_nothing_fills_it_is_refused_at_the_key():
    message = _refusal({"train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": "auto"}})
    assert "ds.json:4:5 zero_optimization.stage: \"auto\" is filled by neither Hugging Face nor DeepSpeed" in message
    message = _refusal({"train_micro_batch_size_per_gpu": 1, "optimizer": {"type": "AdamW", "params": {"torch_adam": "auto"}}})
    assert "optimizer.params.torch_adam: \"auto\" is filled by neither" in message


def test_auto_total_steps_needs_the_runs_length():
    message = _refusal({"train_micro_batch_size_per_gpu": 1,
                        "scheduler": {"type": "WarmupCosineLR", "params": {"total_num_steps": "auto"}}})
    assert "scheduler.params.total_num_steps: auto is the run's length" in message and "total_steps=N" in message


# -- what is refused, noted, accepted -----------------------------------------------------------


def test_unsupported_keys_are_each_named_with_their_place(write):
    ds = {"train_micro_batch_size_per_gpu": 1,
          "zero_optimization": {"stage": 3, "zero_quantized_weights": True, "stage3_max_live_parameters": 1e9,
                                "stage3_param_persitence_threshold": 1},
          "optimizer": {"type": "Lamb", "params": {"lr": 1e-3}},
          "gradient_allreduce_op": "sum", "sparse_attention": {"mode": "fixed"}}
    with pytest.raises(UserError) as info:
        load_spec(_spec(write, ds))
    message = str(info.value)
    assert "ds_config.json:5:5 zero_optimization.zero_quantized_weights: true: ZeRO++ qwZ" in message
    assert ("ds_config.json:7:5 zero_optimization.stage3_param_persitence_threshold: unknown key in "
            "zero_optimization (DeepSpeed 0.19.8 refuses it too); did you mean 'stage3_param_persistence_threshold'?") in message
    assert "ds_config.json:10:5 optimizer.type: LAMB (layer-wise adaptive steps) is not implemented" in message
    assert "ds_config.json:15:3 gradient_allreduce_op: 'sum': sums the ranks' gradients" in message
    assert "ds_config.json:16:3 sparse_attention: DeepSpeed sparse attention" in message
    assert "stage3_max_live_parameters" not in message  # a tuning key: noted, not refused


def test_keys_at_deepspeeds_default_are_accepted_silently_and_tuning_keys_with_a_note(capsys):
    data, locations = load_json_located(json.dumps({
        "train_micro_batch_size_per_gpu": 1, "prescale_gradients": False, "gradient_predivide_factor": 1.0,
        "gradient_allreduce_op": "mean", "zero_optimization": {"stage": 2, "allgather_partitions": True,
                                                               "contiguous_gradients": True, "overlap_comm": True,
                                                               "stage3_prefetch_bucket_size": 5e7},
        "bf16": {"enabled": True, "bf16_master_weights_and_grads": False},
        "wall_clock_breakdown": False, "zero_allow_untested_optimizer": False}, indent=2), "ds.json")
    imported = import_deepspeed(data, locations, Context())
    notes = "\n".join(imported.notes)
    for silent in ("prescale_gradients", "gradient_predivide_factor", "allgather_partitions",
                   "contiguous_gradients", "bf16_master_weights_and_grads", "wall_clock_breakdown",
                   "gradient_allreduce_op", "stage3_prefetch_bucket_size", "zero_allow_untested_optimizer"):
        assert silent not in notes, silent
    assert "zero_optimization.overlap_comm: true: dsl always overlaps gradient communication" in notes


def test_loss_scale_keys_of_a_disabled_fp16_section_are_accepted_silently():
    data, locations = load_json_located(json.dumps({
        "train_micro_batch_size_per_gpu": 1, "bf16": {"enabled": True},
        "fp16": {"enabled": False, "loss_scale": 0, "consecutive_hysteresis": True, "auto_cast": True,
                 "fp16_master_weights_and_grads": True, "loss_scale_window": 0}}), "ds.json")
    imported = import_deepspeed(data, locations, Context())
    assert imported.engine["precision"] == "bf16" and not any("fp16" in n for n in imported.notes)
    assert "fp16_master_weights_and_grads: true: dsl keeps fp32 master" in _refusal(
        {"train_micro_batch_size_per_gpu": 1, "fp16": {"enabled": True, "fp16_master_weights_and_grads": True}})


def test_legacy_keys_map():
    engine = _import({"train_micro_batch_size_per_gpu": 1, "zero_allow_untested_optimizer": True,
                      "zero_optimization": {"stage": 3, "cpu_offload": True, "cpu_offload_param": True,
                                            "stage3_gather_fp16_weights_on_model_save": True},
                      "bfloat16": {"enabled": True}})
    assert (engine.offload.optimizer, engine.offload.params, engine.precision) == ("cpu", "cpu", "bf16")
    assert _import({"train_micro_batch_size_per_gpu": 1, "zero_optimization": True}).zero_stage == 1


def test_refusals_say_what_to_do_instead():
    message = _refusal({"train_micro_batch_size_per_gpu": 1, "optimizer": {"type": "Adam", "params": {
        "adam_w_mode": False, "max_grad_norm": 1.0, "bias_correction": False, "lrr": 1e-3}},
        "scheduler": {"type": "OneCycle", "params": {"cycle_min_lr": 1e-4}}})
    assert "optimizer.params.adam_w_mode: False: false is Adam with L2 weight decay" in message
    assert "optimizer.params.max_grad_norm: DeepSpeed refuses it too" in message and "'gradient_clipping'" in message
    assert "optimizer.params.bias_correction: False: dsl's Adam always corrects" in message
    assert "optimizer.params.lrr: not a parameter of DeepSpeed's Adam (its constructor refuses it); did you mean 'lr'?" in message
    assert "scheduler.type: OneCycle (cyclic lr and momentum) is not implemented; use WarmupCosineLR" in message
    message = _refusal({"train_micro_batch_size_per_gpu": 1, "zero_optimization": {
        "stage": 3, "offload_optimizer": {"device": "cpu", "ratio": 0.5}, "offload_param": {"device": "nvme"}}})
    assert "offload_param.device: nvme needs offload_param.nvme_path (a folder on a fast local disk)" in message
    assert "offload_optimizer.ratio" not in message  # partial offload at stage 3: mapped
    message = _refusal({"train_micro_batch_size_per_gpu": 1, "zero_optimization": {
        "stage": 2, "offload_optimizer": {"device": "cpu", "ratio": 0.5}}})
    assert "Partial offloading only supported for ZeRO Stage 3 (stage is 2)" in message


def test_sgd_has_torchs_defaults_and_refuses_coupled_weight_decay():
    engine = _import({"train_micro_batch_size_per_gpu": 1, "optimizer": {"type": "SGD", "params": {"lr": 0.1}}})
    assert (engine.optimizer.type, engine.optimizer.lr, engine.optimizer.momentum) == ("sgd", 0.1, 0.0)
    assert "optimizer.params.weight_decay: 0.01: torch's SGD adds weight decay to the gradient" in \
        _refusal({"train_micro_batch_size_per_gpu": 1, "optimizer": {"type": "SGD", "params": {"weight_decay": 0.01}}})


def test_onebit_adam_and_quantized_gradients_map_too(write):
    ds = {"train_micro_batch_size_per_gpu": 4, "zero_optimization": {"stage": 0},
          "optimizer": {"type": "OneBitAdam", "params": {"lr": 1e-3, "freeze_step": 400, "cuda_aware": False,
                                                         "comm_backend_name": "nccl"}}}
    engine = load_spec(_spec(write, ds)).spec.engine
    assert engine.optimizer.type == "onebit_adam" and engine.optimizer.freeze_step == 400
    ds = {"train_micro_batch_size_per_gpu": 4, "zero_optimization": {"stage": 2, "zero_quantized_gradients": True}}
    assert load_spec(_spec(write, ds)).spec.engine.comm.quantize_gradients is True
    # 1-bit Adam with a ZeRO stage it cannot run is refused, naming the stages that work.
    ds = {"train_micro_batch_size_per_gpu": 4, "zero_optimization": {"stage": 2},
          "optimizer": {"type": "OneBitAdam", "params": {"lr": 1e-3}}}
    with pytest.raises(UserError, match="zero_stage 0"):
        load_spec(_spec(write, ds))


def test_a_tab_indented_json_with_exponents_goes_through_the_spec(write):
    text = '{\n\t"train_micro_batch_size_per_gpu": 2,\n\t"zero_optimization": {\n\t\t"stage": 2,\n\t\t"reduce_bucket_size": 5e8\n\t}\n}\n'
    engine = load_spec(_spec(write, text)).spec.engine
    assert engine.zero_stage == 2 and engine.bucket_mib == pytest.approx(5e8 * 4 / 2**20)
    with pytest.raises(UserError, match=r"ds_config.json:3:2: JSON syntax error: expected a \"key\""):
        load_spec(_spec(write, '{\n\t"zero_optimization": {"stage": 2},\n\tstage: 3\n}'))


def test_missing_json_names_the_spec_field(write):
    spec = write("s.yaml", "name: j\nrun: {train: {}}\nengine:\n  deepspeed_config: nope.json\n")
    with pytest.raises(UserError, match=r"s.yaml:4:21 engine.deepspeed_config: cannot read DeepSpeed config"):
        load_spec(spec)


def test_a_mapping_is_told_apart_from_engine_settings():
    assert is_deepspeed_config({"train_micro_batch_size_per_gpu": 1})
    assert is_deepspeed_config({"optimizer": {"type": "AdamW", "params": {"lr": 1e-3}}})
    assert not is_deepspeed_config({"zero_stage": 2, "optimizer": {"type": "adamw", "lr": 1e-3}})


def test_report_names_every_auto_once():
    data, locations = load_json_located(json.dumps(HF_STYLE, indent=2), "ds.json")
    imported = import_deepspeed(data, locations, Context(steps=10, hidden_size=8))
    lines = report(imported, EngineConfig.model_validate(merge(imported.engine, {})))
    for rule in HF_AUTO:
        assert sum(f" {rule.path}: auto -> " in line for line in lines) == 1, rule.path


# -- initialize ---------------------------------------------------------------------------------


def _model():
    import torch

    from dsl.engine.model import GPT
    from dsl.engine.train_config import ModelConfig

    torch.manual_seed(0)
    return GPT(ModelConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, seq_len=16))


def test_initialize_takes_a_deepspeed_path_a_dict_and_the_dict_itself(write):
    from dsl.engine import initialize

    one_rank = {**DS, "train_batch_size": 16}  # 4 x 4 x 1 process: DeepSpeed's rule without a process group
    path = write("ds.json", json.dumps(one_rank))
    by_path = initialize(_model(), {"deepspeed_config": path}).config
    by_dict = initialize(_model(), {"deepspeed_config": one_rank}).config
    itself = initialize(_model(), config=one_rank).config
    assert by_path == by_dict == itself
    assert (by_path.zero_stage, by_path.precision, by_path.grad_clip, by_path.scheduler.type) == (2, "fp16", 0.5, "WarmupCosineLR")
    assert (by_path.train_batch, by_path.micro_batch, by_path.grad_accum) == (16, 4, 4)
    with pytest.raises(UserError, match=r"32 != 4 \* 4 \* 1"):
        initialize(_model(), config=DS)
    over = initialize(_model(), {"deepspeed_config": path, "grad_clip": 0.75}).config
    assert over.grad_clip == 0.75 and over.optimizer.lr == 2e-4


def test_initialize_refuses_what_the_yaml_path_refuses_in_the_same_words(write):
    from dsl.engine import initialize

    bad = {"train_micro_batch_size_per_gpu": 1, "optimizer": {"type": "Lamb"}}
    with pytest.raises(UserError, match="optimizer.type: LAMB \\(layer-wise adaptive steps\\) is not implemented"):
        initialize(_model(), config=bad)
    path = write("bad.json", json.dumps(bad, indent=2))
    with pytest.raises(UserError, match=r"bad.json:4:5 optimizer.type: LAMB"):
        initialize(_model(), {"deepspeed_config": path})


def test_initialize_runs_a_deepspeed_scheduler_without_total_steps_and_follows_applied_updates():
    import torch

    from dsl.engine import initialize

    ds = {"train_micro_batch_size_per_gpu": 2, "gradient_clipping": 0, "fp16": {"enabled": True, "loss_scale": 4},
          "optimizer": {"type": "SGD", "params": {"lr": 0.1}},
          "scheduler": {"type": "WarmupLR", "params": {"warmup_min_lr": 0.01, "warmup_max_lr": 0.1,
                                                       "warmup_num_steps": 4, "warmup_type": "linear"}}}
    engine = initialize(_model(), config=ds)
    x = torch.randint(0, 64, (2, 16))
    lrs = []
    for step in range(4):
        engine(x, x).backward()
        if step == 1:
            engine.stage.grad_flat[0] = float("nan")  # an fp16 overflow: the step is skipped
        engine.step()
        lrs.append((engine.lr, engine.last_step_skipped))
        engine.zero_grad()
    # DeepSpeed: update k runs at iteration k - 2 (min lr twice), then +0.09/4 per applied update; the
    # skipped step does not step the scheduler.
    assert [skipped for _, skipped in lrs] == [False, True, False, False]
    assert [round(lr, 6) for lr, _ in lrs] == [0.01, 0.01, 0.01, 0.0325]


def test_a_null_section_is_a_section_left_out_and_a_scalar_one_is_refused():
    engine = _import({"train_micro_batch_size_per_gpu": 1,
                      "zero_optimization": {"stage": 2, "offload_optimizer": None}})
    assert (engine.zero_stage, engine.offload.optimizer) == (2, "none")
    assert "zero_optimization.offload_param: 3 is not a section" in _refusal(
        {"train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 3, "offload_param": 3}})


def test_gradients_are_reduced_in_the_dtype_deepspeed_reduces_them_in():
    # Left out, DeepSpeed reduces in the training dtype (bf16 training: bf16 on the wire).
    assert _import({"train_micro_batch_size_per_gpu": 1, "bf16": {"enabled": True}}).comm.reduce_dtype == "bf16"
    assert _import({"train_micro_batch_size_per_gpu": 1}).comm.reduce_dtype == "fp32"
    assert _import({"train_micro_batch_size_per_gpu": 1, "bf16": {"enabled": True},
                    "communication_data_type": "fp32"}).comm.reduce_dtype == "fp32"
    assert _import({"train_micro_batch_size_per_gpu": 1, "bf16": {"enabled": "auto"}},
                   explicit={"precision": "bf16"}).comm.reduce_dtype == "bf16"
    # fp16 on the wire is not dsl's: fp32, with a note.
    data, locations = load_json_located(json.dumps({"train_micro_batch_size_per_gpu": 1, "fp16": {"enabled": True}}),
                                        "ds.json")
    imported = import_deepspeed(data, locations, Context())
    assert imported.engine["comm"]["reduce_dtype"] == "fp32"
    assert any("dsl reduces them in fp32" in note for note in imported.notes)


def test_stage3_gathers_and_parameter_offload_to_nvme_map_as_deepspeed_reads_them():
    # Stage 3 gathers one module at a time, at most stage3_max_live_parameters live and
    # stage3_prefetch_bucket_size prefetched (DeepSpeed's defaults when left out; 0 is valid).
    engine = _import({"train_micro_batch_size_per_gpu": 1, "zero_optimization": {
        "stage": 3, "stage3_max_live_parameters": 3e8, "stage3_prefetch_bucket_size": 1e7,
        "offload_optimizer": {"device": "cpu"}, "offload_param": {"device": "nvme", "nvme_path": "/local_nvme"}}})
    assert (engine.stage3.gather, engine.stage3.max_live_params, engine.stage3.prefetch_params) == (
        "module", 300_000_000, 10_000_000)
    assert (engine.offload.params, engine.offload.nvme_path) == ("nvme", "/local_nvme")
    engine = _import({"train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 3, "max_live_parameters": 0}})
    assert (engine.stage3.gather, engine.stage3.max_live_params, engine.stage3.prefetch_params) == (
        "module", 0, 50_000_000)
    engine = _import({"train_micro_batch_size_per_gpu": 1, "zero_optimization": {
        "stage": 3, "stage3_prefetch_bucket_size": "auto"}}, hidden_size=1000)
    assert (engine.stage3.max_live_params, engine.stage3.prefetch_params) == (1_000_000_000, 900_000)
    # Stages 0-2 have no gathers: the stage-3 block stays at its defaults.
    engine = _import({"train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 2}})
    assert engine.stage3.gather == "layer" and engine.stage3.max_live_params is None
    # The optimizer's folder wins when both are given and differ (one folder in dsl), with a note.
    data, locations = load_json_located(json.dumps({"train_micro_batch_size_per_gpu": 1, "zero_optimization": {
        "stage": 3, "offload_optimizer": {"device": "nvme", "nvme_path": "/a"},
        "offload_param": {"device": "nvme", "nvme_path": "/b"}}}), "ds.json")
    imported = import_deepspeed(data, locations, Context())
    assert imported.engine["offload"]["nvme_path"] == "/a"
    assert any("offload_param.nvme_path: /b: dsl keeps the parameter and optimizer files in one folder" in n
               for n in imported.notes)
