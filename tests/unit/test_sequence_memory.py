"""The memory model's long-context terms (engine/memory.py), torch-free: what each switch moves
or removes, so `dsl plan` sees the tricks the engine runs (the measured side is
tests/integration/test_sequence_parallel_memory.py)."""

from __future__ import annotations

from dsl.engine import memory
from dsl.engine.config import EngineConfig
from dsl.engine.memory import ModelShape

SHAPE = ModelShape.of("llama-1b").with_seq_len(32768)


def _b(stage: int = 3, **kw) -> memory.Breakdown:
    return memory.breakdown(SHAPE, stage=stage, dp=4, sp=2, micro_batch=1, precision="bf16", **kw)


def test_tiled_loss_keeps_one_chunk_of_logits_and_no_log_softmax():
    plain, tiled = _b(), _b(tiled_loss_tokens=2048)
    assert plain.term(memory.LOGITS).device_bytes == 12 * 16384 * SHAPE.vocab
    # one chunk's logits, log-softmax and gradient, the fp32 head-gradient accumulator and the
    # hidden states' gradient (fp32 residual); stage 3 gathers 16-bit weights: no head cast
    v, h = SHAPE.vocab, SHAPE.hidden
    assert tiled.term(memory.LOGITS).device_bytes == 12 * 2048 * v + 4 * v * h + 4 * 16384 * h
    # the master layout at stage 2 holds 16-bit weights: no cast either; autocast's fp32 weights are
    # cast to bf16 for the chunks (2 B x vocab x hidden)
    assert _b(stage=2, layout="autocast", tiled_loss_tokens=2048).term(memory.LOGITS).device_bytes \
        == tiled.term(memory.LOGITS).device_bytes + 2 * v * h
    # and under the autocast layout at stages 0-2 lm_head's 16-bit weight copy is not saved (the
    # tiled loss casts it inside); stage 3 gathers 16-bit weights (and the master layout holds
    # them), so autocast copies none either way
    plain2, tiled2 = _b(stage=2, layout="autocast"), _b(stage=2, layout="autocast", tiled_loss_tokens=2048)
    assert plain2.term(memory.WEIGHT_COPIES).device_bytes - tiled2.term(memory.WEIGHT_COPIES).device_bytes \
        == 2 * SHAPE.vocab * SHAPE.hidden
    assert plain.term(memory.WEIGHT_COPIES).device_bytes == tiled.term(memory.WEIGHT_COPIES).device_bytes == 0


def test_tiled_mlp_drops_the_ffn_wide_activations_and_adds_one_tile():
    plain, tiled = _b(), _b(tiled_mlp_tokens=1024)
    tokens, c, f = 16384, 2, SHAPE.ffn
    cut = plain.term(memory.ACTIVATIONS).device_bytes - tiled.term(memory.ACTIVATIONS).device_bytes
    # gate, up, silu, product and the two input casts go; the fp32 norm output stays as the input
    assert cut == SHAPE.layers * (4 * c * tokens * f + 2 * c * tokens * SHAPE.hidden - 4 * tokens * SHAPE.hidden)
    assert tiled.term(memory.RECOMPUTE).device_bytes == 4 * c * 1024 * f


def test_activation_offload_moves_checkpoints_to_the_host_and_needs_checkpointing():
    ckpt, off = _b(checkpointing=True), _b(checkpointing=True, activation_offload=True)
    moved = off.term(memory.OFFLOADED_ACTIVATIONS).host_bytes
    assert moved == SHAPE.layers * 4 * 16384 * SHAPE.hidden + 2 * 4 * 16384 * SHAPE.head_dim
    assert ckpt.term(memory.ACTIVATIONS).device_bytes - off.term(memory.ACTIVATIONS).device_bytes == moved
    assert off.device_bytes == ckpt.device_bytes - moved and off.host_bytes == ckpt.host_bytes + moved
    assert _b(activation_offload=True).device_bytes == _b().device_bytes  # nothing to offload


def test_estimate_reads_the_switches_from_the_engine_config():
    engine = EngineConfig(zero_stage=3, precision="bf16", micro_batch=1, sequence_parallel=2,
                          activation_checkpointing=True, activation_offload=True,
                          tiled_loss={"enabled": True, "chunk_tokens": 2048}, tiled_mlp={"enabled": True})
    got = memory.estimate(SHAPE, engine, dp=4)
    want = _b(checkpointing=True, activation_offload=True, tiled_loss_tokens=2048, tiled_mlp_tokens=4096)
    assert got.terms == want.terms


def test_sp_with_fewer_kv_heads_than_sp_holds_one_replicated_kv_head():
    gqa = ModelShape.of("llama-1b")  # 32 heads, 8 kv heads
    sb = memory.state_bytes("bf16")
    at8 = memory.layer_activation_bytes(gqa, 1, sp=8, sb=sb)
    at16 = memory.layer_activation_bytes(gqa, 1, sp=16, sb=sb)
    # Everything halves from sp 8 to sp 16 except k and v: at both degrees a rank holds one kv head
    # of the full sequence (8 kv heads / 8, or replicated at 16), 2 x c x s x head_dim bytes.
    assert 2 * at16 - at8 == 2 * 2 * gqa.seq_len * gqa.head_dim
