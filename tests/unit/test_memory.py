"""The memory model: the ZeRO paper's figures, parameter counts of real models, DeepSpeed's
published estimator output, activation terms, offload and sequence parallelism."""

from __future__ import annotations

import subprocess
import sys

import pytest

from dsl.engine import memory, memory_reference, memory_shape
from dsl.engine.config import EngineConfig
from dsl.engine.memory import GB, GiB, ModelShape


def _states(params: int, stage: int, shards: int, **kw) -> float:
    return sum(t.device_bytes for t in memory.model_states(params, stage=stage, shards=shards, **kw))


@pytest.mark.parametrize(("stage", "gb"), [(0, 120.0), (1, 31.4), (2, 16.6), (3, 1.9)])
def test_zero_paper_example(stage: int, gb: float):
    """Rajbhandari et al. 2020, Fig. 1 / Table 1: 7.5B parameters, N_d = 64, mixed-precision Adam (K = 12)."""
    got = _states(7_500_000_000, stage, 64, precision="bf16", layout="paper") / GB
    assert round(got, 1) == gb


def test_model_state_layouts_per_parameter():
    p = 1_000_000
    terms = {t.name: t.device_bytes for t in memory.model_states(p, stage=0, shards=1, precision="fp32")}
    assert terms == {"parameters": 4 * p, "gradients": 4 * p, "master weights": 0, "optimizer states": 8 * p}
    low = {t.name: t.device_bytes for t in memory.model_states(p, stage=0, shards=1, precision="bf16",
                                                               low_precision_states=True)}
    assert sum(low.values()) == 8 * p  # half of the 16 B/param of the other layouts
    sgd = {t.name: t.device_bytes for t in memory.model_states(p, stage=0, shards=1, precision="fp32", optimizer="sgd")}
    assert sgd["optimizer states"] == 4 * p  # momentum only


def test_offload_moves_the_optimizer_term_to_host_or_nvme():
    p, n = 8_000_000, 8
    on = {t.name: t for t in memory.model_states(p, stage=2, shards=n, precision="fp32",
                                                 offload_optimizer="cpu", sub_group_mib=1)}
    # The engine's CPU optimizer holds its own fp32 master copy of the shard next to the moments.
    assert on["master weights"].device_bytes == 0 and on["master weights"].host_bytes == 4 * p // n
    assert on["optimizer states"].host_bytes == 8 * p // n and on["optimizer states"].device_bytes == 0
    # Stages 2-3: the reduced gradient partition lives in host memory, read in place: no buffer.
    assert on["gradients"].device_bytes == 0 and on["gradients"].host_bytes == 4 * p // n
    assert on["offload buffers"].host_bytes == 0
    # Stage 1 keeps its gradient shard on the device and streams it through sub-group buffers:
    # two pinned 1 MiB buffers on a GPU (one in flight), one on a CPU device.
    s1 = {t.name: t for t in memory.model_states(p, stage=1, shards=n, precision="fp32",
                                                 offload_optimizer="cpu", sub_group_mib=1)}
    assert s1["gradients"].device_bytes == 4 * p + 4 * p // n and s1["offload buffers"].host_bytes == 2 * 2**20
    cpu = {t.name: t for t in memory.model_states(p, stage=1, shards=n, precision="fp32", accelerator=False,
                                                  offload_optimizer="cpu", sub_group_mib=1)}
    assert cpu["offload buffers"].host_bytes == 2**20
    nvme = {t.name: t for t in memory.model_states(p, stage=3, shards=n, offload_optimizer="nvme", sub_group_mib=1)}
    assert nvme["optimizer states"].nvme_bytes == 8 * p // n and nvme["optimizer states"].host_bytes == 0
    # bf16 at stage 3: the device keeps only the bf16 working copy (the one gathered), as DeepSpeed
    # does; the offload's files are the only fp32 master (engine/zero/stage3.py drop_master).
    assert nvme["parameters"].device_bytes == 2 * p // n and nvme["parameters"].host_bytes == 0
    assert nvme["master weights"].nvme_bytes == 4 * p // n and nvme["master weights"].host_bytes == 0
    # At stage 2 the master layout's fp32 partition still waits in host memory for the updates.
    s2 = {t.name: t for t in memory.model_states(p, stage=2, shards=n, offload_optimizer="nvme", sub_group_mib=1)}
    assert s2["master weights"].nvme_bytes == 4 * p // n and s2["master weights"].host_bytes == 4 * p // n
    assert nvme["master weights"].device_bytes == 0
    assert nvme["gradients"].device_bytes == 0 and nvme["gradients"].host_bytes == 4 * p // n
    # 3 buffers of [master, m, v] + 2 gradient sub-groups (1 MiB of fp32 each)
    assert nvme["offload buffers"].host_bytes == 3 * 3 * 2**20 + 2 * 2**20


@pytest.mark.parametrize(("stage", "device"), [(2, 2 * 8_000_000), (3, 2 * 8_000_000 // 8)])
def test_cpu_offload_device_bytes_match_deepspeeds_estimator(stage, device):
    """bf16, default layout, CPU optimizer offload: the device keeps only the 16-bit parameters
    (replicated at stage 2, the working-copy shard at stage 3), as DeepSpeed 0.19.8's estimators
    say (2P; 2P/N); master, moments and the gradient partition are in host memory."""
    p, n = 8_000_000, 8
    t = {x.name: x for x in memory.model_states(p, stage=stage, shards=n, offload_optimizer="cpu")}
    states = (memory.PARAMETERS, memory.GRADIENTS, memory.MASTER, memory.OPTIMIZER)
    assert sum(t[k].device_bytes for k in states) == device
    assert t[memory.MASTER].host_bytes == 4 * p // n and t[memory.GRADIENTS].host_bytes == 4 * p // n


@pytest.mark.parametrize(("preset", "params"), [
    ("llama2-7b", 6_738_415_616),   # Hugging Face meta-llama/Llama-2-7b-hf
    ("llama3-8b", 8_030_261_248),   # meta-llama/Meta-Llama-3-8B
    ("llama2-70b", 68_976_648_192),  # meta-llama/Llama-2-70b-hf
])
def test_parameter_counts_of_published_models(preset: str, params: int):
    assert ModelShape.of(preset).params == params
    assert round(ModelShape.of("bench").params / 1e6, 2) == 7.36  # the peer-baseline shape


def test_parameter_count_matches_the_bundled_model():
    import torch

    from dsl.engine import model as model_module
    from dsl.engine.train_config import ModelConfig

    for cfg in (ModelConfig(preset="tiny"), ModelConfig(preset="bench"),
                ModelConfig(vocab_size=96, hidden_size=64, num_hidden_layers=3, num_attention_heads=8,
                            num_key_value_heads=2, intermediate_size=80, seq_len=16, tie_word_embeddings=True)):
        torch.manual_seed(0)
        assert ModelShape.of(cfg).params == model_module.Llama(cfg).num_params(), cfg


def test_deepspeed_estimators_reproduce_their_published_table():
    """DeepSpeed's docs print, for t5-small (60,506,624 params, 16,449,536 in the largest layer) on
    1 GPU (estimate_zero3_model_states_mem_needs_all_live): per CPU | per GPU in GiB."""
    published = [  # (offload_params, offload_optimizer, zero_init) -> (cpu, gpu)
        ((True, True, True), (1.52, 0.06)), ((True, True, False), (1.52, 0.06)),
        ((False, True, True), (1.35, 0.17)), ((False, True, False), (1.35, 0.17)),
        ((False, False, True), (0.09, 1.08)), ((False, False, False), (0.34, 1.08)),
    ]
    for (params_off, opt_off, zero_init), (cpu, gpu) in published:
        est = memory_reference.deepspeed_estimate(60_506_624, 16_449_536, 3, gpus_per_node=1, offload_optimizer=opt_off,
                                        offload_params=params_off, zero_init=zero_init)
        assert (round(est["cpu_bytes"] / GiB, 2), round(est["gpu_bytes"] / GiB, 2)) == (cpu, gpu)
    # ZeRO-2 figures of 0.19.8 (deepspeed/runtime/zero/stage_1_and_2.py): the 1.5 buffer factor on
    # CPU, 2P + int(18P/N) on the GPU (older releases: 4P + 16P/N); with offload 2P.
    z2 = memory_reference.deepspeed_estimate(1_000_000_000, 0, 2, gpus_per_node=8)
    assert z2["gpu_bytes"] == 2 * 10**9 + 2_250_000_000 and z2["cpu_bytes"] == int(1e9 * 4 * 8 * 1.5)
    z2_off = memory_reference.deepspeed_estimate(10**9, 0, 2, gpus_per_node=8, offload_optimizer=True)
    assert z2_off["gpu_bytes"] == 2 * 10**9 and z2_off["cpu_bytes"] == int(1e9 * 32 * 1.5)
    assert memory_reference.deepspeed_estimate(10**9, 0, 0, gpus_per_node=8) is None


def test_activations_follow_the_saved_tensor_list():
    shape = ModelShape(layers=2, hidden=64, heads=4, kv_heads=2, ffn=128, vocab=100, seq_len=32, tied=True)
    sb = memory.state_bytes("fp32")
    tokens = 2 * 32
    per_layer = memory.layer_activation_bytes(shape, 2, sb=sb)
    # fp32, flash: per norm input, before-gain and output (x2 norms), q, attention output (= o_proj
    # input): 8 x 4 B x T x h; k and v: 2 x 4 B x T x h x kv/a; 4 SwiGLU tensors of width f;
    # rstd 2 x 4 B x T; logsumexp 4 B x T x a.
    expected = (8 * 4 * tokens * 64 + 2 * 4 * tokens * 64 * 2 // 4 + 4 * 4 * tokens * 128
                + 2 * 4 * tokens + 4 * tokens * 4)
    assert per_layer == expected
    # Math attention adds the a x s^2 probabilities and a separate o_proj input, and drops the
    # logsumexp.
    math_layer = memory.layer_activation_bytes(shape, 2, sb=sb, flash_attention=False)
    assert math_layer - per_layer == 4 * 2 * 4 * 32 * 32 - 4 * tokens * 4


def test_checkpointing_and_sequence_parallelism_shrink_activations():
    shape = ModelShape.of("llama2-7b")
    sb = memory.state_bytes("bf16", layout="paper")
    full, _, none = memory.activations(shape, micro_batch=1, sb=sb)
    ckpt, _, peak = memory.activations(shape, micro_batch=1, sb=sb, checkpointing=True)
    sp4, _, _ = memory.activations(shape, micro_batch=1, sb=sb, sp=4)
    assert ckpt.device_bytes < full.device_bytes / 10
    # the recomputed layer, less its input: the checkpoint's own storage, counted in `ckpt`
    layer_input = sb.residual * shape.seq_len * shape.hidden
    assert none.device_bytes == 0
    assert peak.device_bytes == memory.layer_activation_bytes(shape, 1, sb=sb) - layer_input
    # Ulysses: a quarter of everything, plus o_proj's input apart from the attention output (the
    # head -> seq all-to-all sits between them): c x s/4 x h per layer.
    extra = shape.layers * sb.compute * (shape.seq_len // 4) * shape.hidden
    assert sp4.device_bytes == pytest.approx(full.device_bytes / 4 + extra, rel=1e-3)
    # Within reach of Korthikanti et al.'s GPT figure without the s^2 term (34 s b h per layer):
    # the SwiGLU MLP is wider than GPT's 4h GELU MLP and there is no dropout mask.
    per_layer = memory.layer_activation_bytes(shape, 1, sb=sb)
    kort = memory_reference.korthikanti_layer_bytes(4096, 1, 4096, 32) - 5 * 32 * 4096 * 4096
    assert 0.9 < per_layer / kort < 1.4
    # Flash attention never stores the s^2 scores: the math path grows quadratically.
    long = shape.with_seq_len(32768)
    flash = memory.layer_activation_bytes(long, 1, sb=sb)
    naive = memory.layer_activation_bytes(long, 1, sb=sb, flash_attention=False)
    assert naive > 10 * flash


def test_autocast_layout_saves_weight_copies_unless_checkpointed():
    shape = ModelShape.of("llama2-7b")
    sb = memory.state_bytes("bf16", layout="autocast")
    _, copies, _ = memory.activations(shape, micro_batch=1, sb=sb)
    assert copies.device_bytes == 2 * shape.matmul_params
    _, ckpt_copies, peak = memory.activations(shape, micro_batch=1, sb=sb, checkpointing=True)
    assert ckpt_copies.device_bytes == 2 * shape.vocab * shape.hidden  # lm_head's only
    assert peak.device_bytes > memory.layer_activation_bytes(shape, 1, sb=sb)  # + one layer's casts
    _, none, _ = memory.activations(shape, micro_batch=1, sb=memory.state_bytes("bf16", layout="paper"))
    assert none.device_bytes == 0


def test_stage3_mixed_precision_holds_and_gathers_a_16_bit_working_copy():
    shape, n = ModelShape.of("llama2-7b"), 8
    p, unit = shape.params, shape.largest_unit_params

    def terms(stage: int, precision: str, **kw) -> dict[str, int]:
        b = memory.breakdown(shape, stage=stage, dp=n, micro_batch=1, precision=precision, **kw)
        return {t.name: t.device_bytes for t in b.terms}

    bf16 = terms(3, "bf16")
    assert bf16[memory.PARAMETERS] == -(-4 * p // n) + -(-2 * p // n)  # fp32 master + bf16 copy
    assert bf16[memory.GATHERED] == 2 * 2 * unit + 4 * unit  # bf16 units, an fp32 gradient
    assert bf16[memory.WEIGHT_COPIES] == 0  # the matmuls' weights are bf16 already
    assert terms(3, "fp16") == bf16
    assert terms(3, "bf16", layout="autocast") == bf16 == terms(3, "bf16", layout="master")  # one layout at 3
    assert terms(2, "bf16", layout="autocast")[memory.WEIGHT_COPIES] == 2 * shape.matmul_params
    assert terms(2, "bf16")[memory.WEIGHT_COPIES] == 0  # default at stage 2: master, 16-bit weights
    fp32 = terms(3, "fp32")
    assert fp32[memory.PARAMETERS] == -(-4 * p // n) and fp32[memory.GATHERED] == 2 * 4 * unit + 4 * unit
    low = terms(3, "bf16", low_precision_states=True)
    assert low[memory.PARAMETERS] == -(-2 * p // n) and low[memory.GATHERED] == 2 * 2 * unit + 2 * unit


def test_estimate_reports_every_term_and_refuses_auto():
    engine = EngineConfig(zero_stage=3, precision="bf16", micro_batch=2, activation_checkpointing=True,
                          offload={"optimizer": "cpu"})
    b = memory.estimate("llama2-7b", engine, dp=8)
    names = [t.name for t in b.terms]
    for name in ("parameters", "gradients", "master weights", "optimizer states", "offload buffers", "activations",
                 "autocast weight copies", "recomputation peak", "logits", "communication buckets", "gathered parameters", "runtime",
                 "model construction"):
        assert name in names
    assert b.device_sum_bytes == sum(t.device_bytes for t in b.terms if not t.transient)
    assert b.device_bytes == b.peak.bytes <= b.device_sum_bytes  # the phase peak (engine/memory_peak.py)
    assert b.term("gathered parameters").device_bytes > 0
    assert b.to_json()["terms"][0]["name"] == "parameters"
    with pytest.raises(ValueError, match="zero_stage is auto"):
        memory.estimate("tiny", EngineConfig(zero_stage="auto"), dp=1)


def test_cpu_ranks_count_everything_as_their_ram():
    b = memory.estimate("tiny", EngineConfig(), dp=2, accelerator=False)
    assert b.host_bytes == 0 and b.device_bytes > 0
    assert b.term("runtime").device_bytes == memory.CPU_RUNTIME_BYTES


def test_expected_state_summary_keys_and_values():
    engine = EngineConfig(zero_stage=2, precision="fp32")
    shape = ModelShape.of("tiny")
    exp = memory.expected_state_summary("tiny", engine, dp=2, micro_batch=4)
    assert exp["params_bytes"] == 4 * shape.params
    assert exp["grads_bytes"] == 4 * shape.params // 2 + (4 * shape.params % 2 > 0)
    assert exp["optimizer_states_bytes"] == -(-8 * shape.params // 2)
    assert exp["activations_bytes"] > 0
    assert exp["total_bytes"] == (exp["params_bytes"] + exp["grads_bytes"] + exp["optimizer_states_bytes"]
                                  + exp["activations_bytes"])
    assert exp["offload_cpu_bytes"] == exp["offload_nvme_bytes"] == 0


def test_memory_module_is_torch_free():
    code = "import sys, dsl.engine.memory; print('torch' in sys.modules)"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.stdout.strip() == "False", proc.stderr


@pytest.mark.parametrize("stage", [0, 1, 2])
def test_master_layout_model_states_per_stage(stage):
    """precision_layout master (engine/zero/master.py): 16-bit parameters, fp32 gradients (full at
    stages 0-1, + the reduced shard at 1, the partition at 2), fp32 master partitioned like the
    moments; at stage 2 below DeepSpeed's 2P + 18P/N."""
    p, n = 8_000_000, 8
    t = {x.name: x.device_bytes for x in memory.model_states(p, stage=stage, shards=n, layout="master")}
    shard = p // n
    assert t[memory.PARAMETERS] == 2 * p
    assert t[memory.GRADIENTS] == {0: 4 * p, 1: 4 * p + 4 * shard, 2: 4 * shard}[stage]
    assert t[memory.MASTER] == (4 * p if stage == 0 else 4 * shard)
    assert t[memory.OPTIMIZER] == (8 * p if stage == 0 else 8 * shard)
    if stage == 2:
        assert sum(t.values()) == 2 * p + 16 * p // n < 2 * p + 18 * p // n
    default = {x.name: x.device_bytes for x in memory.model_states(p, stage=stage, shards=n)}
    assert default == t  # master is the default at every stage
    autocast = {x.name: x.device_bytes for x in memory.model_states(p, stage=stage, shards=n, layout="autocast")}
    # autocast: fp32 parameters, no separate master: 2 B/param fewer at stage 0, more at 1-2
    assert sum(autocast.values()) - sum(t.values()) == {0: -2 * p, 1: 2 * p - 4 * shard, 2: 2 * p - 4 * shard}[stage]


def test_cpu_allocator_retention_term_follows_the_effective_allocator():
    """engine/memory_shape.py ALLOCATOR_RETENTION: jemalloc (auto's choice) keeps 15% of the live
    peak, return nothing, glibc's reuse/system are not modelled and say so."""
    engine = EngineConfig(zero_stage=2, precision="fp32")
    auto = memory.estimate("bench", engine, dp=2, accelerator=False)
    live = auto.device_bytes - auto.term(memory.RUNTIME).device_bytes - auto.term(memory.ALLOCATOR).device_bytes
    assert auto.term(memory.ALLOCATOR).device_bytes == int(0.15 * live) > 0
    ret = memory.estimate("bench", EngineConfig(zero_stage=2, precision="fp32", cpu_allocator="return"), dp=2,
                          accelerator=False)
    assert ret.term(memory.ALLOCATOR).device_bytes == 0 and "returns freed blocks" in ret.term(memory.ALLOCATOR).formula
    reuse = memory.estimate("bench", engine, dp=2, accelerator=False, allocator="reuse")
    assert reuse.term(memory.ALLOCATOR).device_bytes == 0 and "not counted" in reuse.term(memory.ALLOCATOR).formula
    assert auto.device_bytes - reuse.device_bytes == auto.term(memory.ALLOCATOR).device_bytes
    gpu = memory.estimate("bench", engine, dp=2, accelerator=True)
    assert gpu.term(memory.ALLOCATOR).device_bytes == 0 and gpu.term(memory.RUNTIME).device_bytes == memory.GPU_RUNTIME_BYTES
    ckpt = memory.estimate("bench", EngineConfig(zero_stage=2, precision="fp32", activation_checkpointing=True), dp=2,
                           accelerator=False)
    assert ckpt.term(memory.RUNTIME).device_bytes - auto.term(memory.RUNTIME).device_bytes == \
        memory_shape.CPU_CHECKPOINT_RUNTIME_BYTES > 0
