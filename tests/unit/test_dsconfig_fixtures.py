"""Every collected DeepSpeed config (tests/fixtures/deepspeed_configs, SOURCES) either imports, with
the engine settings DeepSpeed 0.19.8's semantics give it, or is refused with a located message
naming the key; none crashes. The same files give the same engine settings through
`dsl.engine.initialize(model, {"deepspeed_config": path})` as through a spec.

The expected table is written from DeepSpeed's documented behaviour, not from the importer's
output, for a spec that trains the tiny preset (hidden_size 64) for 300 steps on 2 local ranks
and writes no engine setting of its own, so every `auto` takes dsl's default (lr 3e-3, betas
(0.9, 0.999), eps 1e-8, weight decay 0, clipping 1.0, warm-up 20 steps, fp32, micro_batch and
grad_accum planned) as Hugging Face's Trainer takes its TrainingArguments:
- a key left out takes DeepSpeed's default: clipping 1.0 (0.19.3+), no scheduler = constant lr,
  the optimizer's own defaults (Adam lr 1e-3), ZeRO stage 0, fp32, nothing offloaded;
- WarmupLR / WarmupDecayLR / WarmupCosineLR warm up logarithmically unless warmup_type says
  linear; WarmupDecayLR's peak is 0.001 without warmup_max_lr; WarmupCosineLR ends at 1e-4 x lr;
- the batch: two keys derive the third on 2 data-parallel ranks (train 256 with micro 8 -> 16
  accumulation steps), a single key implies accumulation 1.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from dsl.engine.errors import UserError
from dsl.launcher.spec import load_spec

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "deepspeed_configs"
MIB = 1 << 20
PLANNED = "planned"

DSL_ADAMW = ("adamw", 3e-3, (0.9, 0.999), 1e-8, 0.0)  # engine.optimizer as the spec leaves it: what `auto` takes
CONSTANT = ("constant", 0)  # no scheduler: DeepSpeed keeps the optimizer's lr
FP16_DEFAULT = (16, 1000, 2, 1.0, None)  # initial_scale_power, window, hysteresis, min, static


def fix(**kw):
    """An expected row: the engine settings that matter (DeepSpeed's defaults unless given)."""
    row = dict(stage=0, precision="fp32", offload=("none", "none"), clip=1.0, optimizer=DSL_ADAMW,
               scheduler=CONSTANT, batch=(None, PLANNED, PLANNED), bucket_mib=25.0, loss_scale=None)
    row.update(kw)
    return row


def hf_warmup(kind="WarmupLR"):
    """An all-auto Hugging Face scheduler: warmup_min_lr 0, warmup_max_lr = lr, warmup 20 steps
    (engine.scheduler.warmup_steps), total_num_steps = run.train.steps, log warm-up."""
    if kind == "WarmupCosineLR":
        return (kind, 20, "log", 0.0, 0.0001, 300)
    return (kind, 20, "log", 0.0, None if kind == "WarmupLR" else 300)


AUTO_BUCKET = 64 * 64 * 4 / MIB  # reduce_bucket_size: auto = hidden_size squared elements
ACC1 = (None, PLANNED, 1)  # gradient_accumulation_steps 1, the micro batch planned, train derived

EXPECTED = {
    "accelerate_sp_alst": fix(stage=3, precision="bf16", batch=ACC1, optimizer=DSL_ADAMW),
    "accelerate_zero_stage1": fix(stage=1, precision="fp16", loss_scale=FP16_DEFAULT, batch=ACC1,
                                  scheduler=hf_warmup("WarmupDecayLR"), bucket_mib=AUTO_BUCKET),
    "accelerate_zero_stage2": fix(stage=2, precision="fp16", loss_scale=FP16_DEFAULT, batch=ACC1,
                                  scheduler=hf_warmup("WarmupDecayLR"), bucket_mib=AUTO_BUCKET),
    "accelerate_zero_stage2_offload": fix(stage=2, precision="fp16", loss_scale=FP16_DEFAULT, batch=ACC1,
                                          offload=("cpu", "none"), scheduler=hf_warmup("WarmupDecayLR"),
                                          bucket_mib=AUTO_BUCKET),
    "accelerate_zero_stage3": fix(stage=3, precision="fp16", loss_scale=FP16_DEFAULT, batch=ACC1,
                                  scheduler=hf_warmup("WarmupDecayLR"), bucket_mib=AUTO_BUCKET),
    "accelerate_zero_stage3_offload": fix(stage=3, precision="fp16", loss_scale=FP16_DEFAULT, batch=ACC1,
                                          offload=("cpu", "cpu"), scheduler=hf_warmup("WarmupDecayLR"),
                                          bucket_mib=AUTO_BUCKET),
    "axolotl_zero1": fix(stage=1),
    "axolotl_zero1_torch_compile": fix(stage=1),
    "axolotl_zero2": fix(stage=2, offload=("cpu", "none")),
    "axolotl_zero3_bf16": fix(stage=3, precision="bf16", bucket_mib=AUTO_BUCKET),
    "axolotl_zero3_bf16_cpuoffload_all": fix(stage=3, precision="bf16", offload=("cpu", "cpu"), bucket_mib=AUTO_BUCKET),
    # offload_param without offload_optimizer: dsl keeps the parameters on the device (noted).
    "axolotl_zero3_bf16_cpuoffload_params": fix(stage=3, precision="bf16", bucket_mib=AUTO_BUCKET),
    "dsexamples_autotuning_fp16_z2": fix(stage=2, precision="fp16", loss_scale=FP16_DEFAULT),
    "dsexamples_bing_bert_lamb_64k": ["optimizer.type", "sparse_attention"],
    "dsexamples_bing_bert_onebit_4k": ["optimizer.params.bias_correction"],
    "dsexamples_bing_bert_pld": ["optimizer.params.bias_correction"],
    "dsexamples_bingbertsquad_bsz24": ["optimizer.params.max_grad_norm", "optimizer.params.bias_correction"],
    "dsexamples_cifar": ["fp16.fp16_master_weights_and_grads"],
    "dsexamples_curriculum_template": ["34:23: JSON syntax error"],
    "dsexamples_megatron_zero2": fix(stage=2, precision="fp16", loss_scale=FP16_DEFAULT, batch=(16, 8, 1),
                                     optimizer=("adamw", 1.5e-4, (0.9, 0.999), 1e-8, 0.0)),
    "dsexamples_megatron_zero3": ["zero_optimization.stage3_param_persitence_threshold"],
    "dsexamples_megatron_zero_infinity": ["zero_optimization.stage3_param_persitance_threshold"],
    "dsexamples_qanet_1cycle": ["scheduler.type"],
    "dsexamples_qanet_warmup": fix(batch=(32, 16, 1), optimizer=("adamw", 1e-3, (0.8, 0.999), 1e-8, 3e-7),
                                   scheduler=("WarmupLR", 1000, "log", 0.0, None)),
    "fastchat_s2": fix(stage=2, offload=("cpu", "none")),
    "fastchat_s3": fix(stage=3, offload=("cpu", "cpu")),
    "hf-transformers_zero2": fix(stage=2, offload=("cpu", "none"), scheduler=hf_warmup(), bucket_mib=2e8 * 4 / MIB),
    "hf-transformers_zero2_bf16": fix(stage=2, offload=("cpu", "none"), scheduler=hf_warmup(), bucket_mib=2e8 * 4 / MIB),
    # reduce_bucket_size 0 (DeepSpeed 0.19.8 refuses it; a tuning key): dsl's bucket, noted.
    "hf-transformers_zero3": fix(stage=3, precision="fp16", loss_scale=FP16_DEFAULT, offload=("cpu", "cpu"),
                                 optimizer=("adamw", 3e-5, (0.8, 0.999), 1e-8, 3e-7),
                                 scheduler=("WarmupLR", 500, "log", 0.0, None)),
    "hf-transformers_zero3_bf16": fix(stage=3, offload=("cpu", "cpu"), scheduler=hf_warmup(), bucket_mib=AUTO_BUCKET),
    "llamafactory_ds_z0": fix(bucket_mib=5e8 * 4 / MIB),
    "llamafactory_ds_z2": fix(stage=2, bucket_mib=5e8 * 4 / MIB),
    "llamafactory_ds_z2_offload": fix(stage=2, offload=("cpu", "none"), bucket_mib=5e8 * 4 / MIB),
    "llamafactory_ds_z3": fix(stage=3, bucket_mib=AUTO_BUCKET),
    "llamafactory_ds_z3_fp8": fix(stage=3, offload=("cpu", "none"), clip=0.001, bucket_mib=12845056 * 4 / MIB),
    "llamafactory_ds_z3_offload": fix(stage=3, offload=("cpu", "cpu"), bucket_mib=AUTO_BUCKET),
    "llamafactory_ds_z3_partial_offload": fix(stage=3, offload=("cpu", "none"), bucket_mib=AUTO_BUCKET),
    "llava_zero3_offload": fix(stage=3, precision="bf16", offload=("cpu", "cpu"), scheduler=hf_warmup(),
                               bucket_mib=AUTO_BUCKET),
    "megatron-ds_moe_tokendropping": fix(precision="fp16", loss_scale=(11, 500, 2, 1.0, None), batch=(256, 4, 32)),
    "megatron-ds_rebase_gbs256_mbs8_zero1": fix(stage=1, precision="fp16", loss_scale=(11, 500, 2, 1.0, None),
                                                batch=(256, 8, 16)),
    "megatron-ds_sp_gbs16_mbs1_zero3": fix(stage=3, precision="fp16", loss_scale=(11, 500, 2, 1.0, None),
                                           batch=(16, 1, 8)),
    "megatron-ds_zero2_bf16": ["communication_data_type", "bfloat16.loss_scale"],
    "ms-swift_zero1": fix(stage=1, bucket_mib=2e8 * 4 / MIB),
    "ms-swift_zero2": fix(stage=2, scheduler=hf_warmup("WarmupCosineLR"), bucket_mib=2e8 * 4 / MIB),
    "ms-swift_zero2_offload": fix(stage=2, offload=("cpu", "none"), scheduler=hf_warmup("WarmupCosineLR"),
                                  bucket_mib=2e8 * 4 / MIB),
    "ms-swift_zero3_offload": fix(stage=3, scheduler=hf_warmup("WarmupCosineLR"), bucket_mib=AUTO_BUCKET),
    "openrlhf_ddpo": fix(stage=3, precision="fp16", loss_scale=(32, 1000, 2, 1.0, None), offload=("cpu", "cpu"),
                         batch=(32, 2, 8), bucket_mib=5e8 * 4 / MIB),
    "qwen_finetune_zero2": fix(stage=2, scheduler=hf_warmup(), bucket_mib=2e8 * 4 / MIB),
    "stanford-alpaca_offload_opt_param": fix(stage=3, offload=("cpu", "cpu"), scheduler=hf_warmup("WarmupDecayLR"),
                                             bucket_mib=AUTO_BUCKET),
    "trl_stack_llama": fix(stage=3, scheduler=hf_warmup(), bucket_mib=AUTO_BUCKET),
    "trl_zero3": fix(stage=3),
}

NAMES = sorted(p.stem for p in FIXTURES.glob("*.json"))


def test_every_collected_config_has_a_row_and_a_source():
    assert len(NAMES) >= 40
    assert sorted(EXPECTED) == NAMES
    sources = (FIXTURES / "SOURCES").read_text()
    for name in NAMES:
        assert re.search(rf"^{re.escape(name)}\.json\t\S+/\S+\t\S+\t[0-9a-f]{{40}}\thttps://github.com/", sources, re.M), name


def _spec(tmp_path: Path, name: str, procs: int = 2) -> Path:
    spec = tmp_path / "s.yaml"
    spec.write_text("name: j\nrun: {train: {model: {preset: tiny}, steps: 300}}\n"
                    f"resources: {{backend: local, procs_per_node: {procs}}}\n"
                    f"engine:\n  deepspeed_config: {FIXTURES / (name + '.json')}\n")
    return spec


def _row(spec_file) -> dict:
    e = spec_file.spec.engine
    written = spec_file.locations.values
    s = e.scheduler
    if s.type == "WarmupCosineLR":
        scheduler = (s.type, s.warmup_steps, s.warmup_type, s.warmup_min_ratio, s.min_lr_ratio, s.total_steps)
    elif s.type in ("WarmupLR", "WarmupDecayLR"):
        scheduler = (s.type, s.warmup_steps, s.warmup_type, s.warmup_min_lr, s.total_steps)
    else:
        scheduler = (s.type, s.warmup_steps)
    ls = e.loss_scale
    return dict(
        stage=e.zero_stage, precision=e.precision, offload=(e.offload.optimizer, e.offload.params), clip=e.grad_clip,
        optimizer=(e.optimizer.type, e.optimizer.lr, e.optimizer.betas, e.optimizer.eps, e.optimizer.weight_decay),
        scheduler=scheduler,
        batch=(e.train_batch, e.micro_batch if ("engine", "micro_batch") in written else PLANNED,
               e.grad_accum if ("engine", "grad_accum") in written else PLANNED),
        bucket_mib=e.bucket_mib,
        loss_scale=(ls.initial_scale_power, ls.growth_interval, ls.hysteresis, ls.min_scale, ls.static)
        if e.precision == "fp16" else None)


@pytest.mark.parametrize("name", NAMES)
def test_config_imports_with_deepspeeds_semantics_or_is_refused_at_the_key(tmp_path, name):
    expected = EXPECTED[name]
    if isinstance(expected, list):
        with pytest.raises(UserError) as info:
            load_spec(_spec(tmp_path, name))
        message = str(info.value)
        for key in expected:
            if "JSON syntax error" in key:
                assert f"{name}.json:{key}" in message
            else:  # `file:line:col key: why`, at the key's own line:col in the JSON
                assert re.search(rf"{re.escape(name)}\.json:\d+:\d+ {re.escape(key)}: \S", message), (key, message)
        return
    got = _row(load_spec(_spec(tmp_path, name)))
    assert _same(got, expected), (name, got, expected)


def _same(got: dict, expected: dict) -> bool:
    def close(a, b):
        if isinstance(a, float) and isinstance(b, (int, float)):
            return a == pytest.approx(b, rel=1e-12)
        if isinstance(a, tuple) and isinstance(b, tuple):
            return len(a) == len(b) and all(close(x, y) for x, y in zip(a, b))
        return a == b
    return all(close(got[k], expected[k]) for k in expected)


IMPORTED = [name for name in NAMES if isinstance(EXPECTED[name], dict)]


@pytest.mark.parametrize("name", IMPORTED)
def test_initialize_gives_the_same_engine_settings_as_the_yaml_path(tmp_path, name):
    """One process (no process group): the spec with one rank, and initialize, read the same file to
    the same EngineConfig (auto from the same defaults, the hidden size from the same model, the
    batch arithmetic on one data-parallel rank, total_num_steps from the same 300 steps)."""
    from dsl.engine import initialize
    from dsl.engine.model import GPT
    from dsl.engine.presets import PRESETS
    from dsl.engine.train_config import ModelConfig

    by_spec = load_spec(_spec(tmp_path, name, procs=1)).spec.engine
    engine = initialize(GPT(ModelConfig(**PRESETS["tiny"])), {"deepspeed_config": str(FIXTURES / (name + ".json"))},
                        total_steps=300)
    assert engine.config == by_spec
    engine.close()
