"""The Llama model: shapes, loss at init, causality, GQA and RoPE against explicit references,
tied embeddings, initialisation, activation checkpointing."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from dsl.engine.model import GPT, Llama, RMSNorm, apply_rope, rope_tables
from dsl.engine.train_config import ModelConfig

SMALL = ModelConfig(vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, seq_len=16)


def _model(cfg: ModelConfig = SMALL, seed: int = 0, **kwargs) -> Llama:
    torch.manual_seed(seed)
    return Llama(cfg, **kwargs)


def _tokens(b: int, t: int, vocab: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(vocab, (b, t), generator=torch.Generator().manual_seed(seed))


def test_gpt_is_the_llama_model() -> None:
    assert GPT is Llama


def test_logits_shape_and_dtype() -> None:
    logits = _model()(_tokens(3, 16, SMALL.vocab_size))
    assert logits.shape == (3, 16, SMALL.vocab_size)
    assert logits.dtype == torch.float32


def test_shorter_sequences_work_and_longer_are_refused() -> None:
    model = _model()
    assert model(_tokens(2, 5, SMALL.vocab_size)).shape == (2, 5, SMALL.vocab_size)
    with pytest.raises(ValueError, match=r"sequence of 17 tokens is longer than seq_len \(16\)"):
        model(_tokens(2, 17, SMALL.vocab_size))


def test_parameter_shapes_are_llama_without_biases() -> None:
    cfg = SMALL.model_copy(update={"num_key_value_heads": 2, "intermediate_size": 40, "tie_word_embeddings": False})
    model = _model(cfg)
    shapes = {name: tuple(p.shape) for name, p in model.named_parameters()}
    head_dim = 32 // 4
    assert shapes["embed_tokens.weight"] == (50, 32)
    assert shapes["layers.0.self_attn.q_proj.weight"] == (4 * head_dim, 32)
    assert shapes["layers.0.self_attn.k_proj.weight"] == (2 * head_dim, 32)
    assert shapes["layers.0.self_attn.v_proj.weight"] == (2 * head_dim, 32)
    assert shapes["layers.0.self_attn.o_proj.weight"] == (32, 4 * head_dim)
    assert shapes["layers.1.mlp.gate_proj.weight"] == shapes["layers.1.mlp.up_proj.weight"] == (40, 32)
    assert shapes["layers.1.mlp.down_proj.weight"] == (32, 40)
    assert shapes["layers.1.input_layernorm.weight"] == shapes["norm.weight"] == (32,)
    assert shapes["lm_head.weight"] == (50, 32)
    assert not any("bias" in name for name in shapes)
    per_layer = 4 * 8 * 32 * 2 + 2 * 8 * 32 * 2 + 3 * 40 * 32 + 2 * 32
    assert model.num_params() == 2 * 50 * 32 + 2 * per_layer + 32
    # The default inner width: 8/3 x hidden rounded up to a multiple of 16.
    assert _model().layers[0].mlp.gate_proj.weight.shape == (96, 32)


def test_bench_preset_has_the_peer_baselines_parameter_count() -> None:
    # The peer-baseline shape: vocab 8192, hidden 256, 4 layers, 8 heads, SwiGLU 688, seq 256 -> 7.36M parameters.
    with torch.device("meta"):
        model = Llama(ModelConfig(preset="bench"))
    assert round(model.num_params() / 1e6, 2) == 7.36


def test_loss_at_init_is_about_ln_vocab_and_equals_cross_entropy_of_logits() -> None:
    model = _model()
    x, y = _tokens(4, 16, SMALL.vocab_size, 1), _tokens(4, 16, SMALL.vocab_size, 2)
    loss = model(x, y)
    assert loss.shape == ()
    assert abs(loss.item() - math.log(SMALL.vocab_size)) < 0.1  # near-uniform predictions
    expected = F.cross_entropy(model(x).reshape(-1, SMALL.vocab_size), y.reshape(-1))
    torch.testing.assert_close(loss, expected)


def test_initialisation_scales() -> None:
    cfg = ModelConfig(vocab_size=512, hidden_size=128, num_hidden_layers=8, num_attention_heads=4)
    model = _model(cfg)
    residual = 0.02 / math.sqrt(2 * 8)
    for name, p in model.named_parameters():
        p = p.detach()
        if p.dim() == 1:
            assert torch.equal(p, torch.ones_like(p)), name
            continue
        if name.endswith(("o_proj.weight", "down_proj.weight")):
            assert float(p.std()) == pytest.approx(residual, rel=0.05), name
        else:
            assert float(p.std()) == pytest.approx(0.02, rel=0.05), name
        assert abs(float(p.mean())) < 0.002, name


def test_attention_is_causal() -> None:
    model = _model()
    x = _tokens(2, 16, SMALL.vocab_size)
    changed = x.clone()
    changed[:, 10:] = (changed[:, 10:] + 1) % SMALL.vocab_size
    with torch.no_grad():
        a, b = model(x), model(changed)
    torch.testing.assert_close(a[:, :10], b[:, :10], rtol=0, atol=1e-6)
    assert (a[:, 10:] - b[:, 10:]).abs().max() > 1e-3


def _reference_attention(attn, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """Grouped-query causal attention written out: repeated kv heads, masked softmax, RoPE by
    complex multiplication (an independent formulation of apply_rope)."""
    b, t, _ = x.shape
    h, kv, d = attn.heads, attn.kv_heads, attn.head_dim
    q = (x @ attn.q_proj.weight.T).view(b, t, h, d).transpose(1, 2)
    k = (x @ attn.k_proj.weight.T).view(b, t, kv, d).transpose(1, 2)
    v = (x @ attn.v_proj.weight.T).view(b, t, kv, d).transpose(1, 2)
    q, k = _rope_complex(q, positions, 10000.0), _rope_complex(k, positions, 10000.0)
    k = torch.stack([k[:, i // (h // kv)] for i in range(h)], dim=1)  # query head i reads kv head i // group
    v = torch.stack([v[:, i // (h // kv)] for i in range(h)], dim=1)
    scores = (q.double() @ k.double().transpose(-1, -2)) / math.sqrt(d)
    mask = torch.ones(t, t, dtype=torch.bool).tril()
    weights = scores.masked_fill(~mask, float("-inf")).softmax(-1)
    y = (weights @ v.double()).float().transpose(1, 2).reshape(b, t, h * d)
    return y @ attn.o_proj.weight.T


def _rope_complex(x: torch.Tensor, positions: torch.Tensor, theta: float) -> torch.Tensor:
    """RoPE as z_j * exp(i * pos * theta^(-2j/d)), z_j = x_j + i x_{j + d/2} (HF's layout)."""
    d = x.shape[-1]
    freqs = theta ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)
    angles = positions.double()[:, None] * freqs  # [T, d/2]
    z = torch.complex(x[..., : d // 2].double(), x[..., d // 2 :].double()) * torch.polar(torch.ones_like(angles), angles)
    return torch.cat((z.real, z.imag), dim=-1).to(x.dtype)


@pytest.mark.parametrize("kv_heads", [1, 2, 4])
def test_grouped_query_attention_matches_explicit_reference(kv_heads: int) -> None:
    model = _model(SMALL.model_copy(update={"num_key_value_heads": kv_heads}))
    attn = model.layers[0].self_attn
    assert attn.k_proj.weight.shape == (kv_heads * 8, 32)
    x = torch.randn(2, 12, 32, generator=torch.Generator().manual_seed(5))
    positions = torch.arange(12)
    cos, sin = rope_tables(positions, 8, 10000.0)
    with torch.no_grad():
        got = attn(x, cos, sin)
        expected = _reference_attention(attn, x, positions)
    torch.testing.assert_close(got, expected, rtol=0, atol=2e-6)
    # The reference is sensitive to the grouping: pairing query heads with the wrong kv head differs.
    if kv_heads == 2:
        with torch.no_grad():
            attn.k_proj.weight.copy_(attn.k_proj.weight.view(2, 8, 32).flip(0).reshape(16, 32))
            assert (attn(x, cos, sin) - expected).abs().max() > 1e-4


def test_apply_rope_equals_complex_rotation_and_keeps_norms() -> None:
    x = torch.randn(2, 3, 20, 16, generator=torch.Generator().manual_seed(0))
    positions = torch.arange(20) * 7 + 3
    cos, sin = rope_tables(positions, 16, 500000.0)
    rotated = apply_rope(x, cos, sin)
    torch.testing.assert_close(rotated, _rope_complex(x, positions, 500000.0), rtol=0, atol=2e-5)
    torch.testing.assert_close(rotated.norm(dim=-1), x.norm(dim=-1))
    at_zero = rope_tables(torch.zeros(20, dtype=torch.int64), 16, 10000.0)
    torch.testing.assert_close(apply_rope(x, *at_zero), x)


def test_rope_scores_depend_only_on_position_difference() -> None:
    gen = torch.Generator().manual_seed(1)
    q, k = torch.randn(1, 1, 1, 32, generator=gen), torch.randn(1, 1, 1, 32, generator=gen)

    def score(m: int, n: int) -> float:
        qm = apply_rope(q, *rope_tables(torch.tensor([m]), 32, 10000.0))
        kn = apply_rope(k, *rope_tables(torch.tensor([n]), 32, 10000.0))
        return float((qm * kn).sum())

    for m, n in [(5, 2), (9, 9), (3, 7)]:
        for shift in (1, 13, 100):
            assert score(m + shift, n + shift) == pytest.approx(score(m, n), abs=1e-4)
    assert abs(score(5, 2) - score(6, 2)) > 1e-3  # ... and on the difference, really


def test_model_positions_shifted_by_a_constant_give_the_same_logits() -> None:
    model = _model()
    with torch.no_grad():  # sharpen attention: at init it is nearly uniform, positions barely count
        for layer in model.layers:
            layer.self_attn.q_proj.weight.mul_(10)
            layer.self_attn.k_proj.weight.mul_(10)
    x = _tokens(2, 16, SMALL.vocab_size)
    with torch.no_grad():
        base = model(x)
        shifted = model(x, positions=torch.arange(16) + 37)
        per_row = model(x, positions=torch.stack([torch.arange(16) + 5, torch.arange(16) + 11]))
        stretched = model(x, positions=torch.arange(16) * 2)
    torch.testing.assert_close(shifted, base, rtol=0, atol=1e-4)
    torch.testing.assert_close(per_row, base, rtol=0, atol=1e-4)
    assert (stretched - base).abs().max() > 0.05  # positions do matter


def test_rms_norm_matches_its_formula() -> None:
    norm = RMSNorm(8, eps=1e-5)
    with torch.no_grad():
        norm.weight.copy_(torch.linspace(0.5, 2, 8))
    x = torch.randn(3, 5, 8, generator=torch.Generator().manual_seed(2)) * 4
    expected = x / torch.sqrt((x * x).mean(-1, keepdim=True) + 1e-5) * norm.weight
    torch.testing.assert_close(norm(x), expected)
    assert norm(x.bfloat16()).dtype == torch.float32  # times the fp32 gain


def test_tied_embeddings_share_one_parameter() -> None:
    tied = _model()
    untied = _model(SMALL.model_copy(update={"tie_word_embeddings": False}))
    assert tied.lm_head.weight is tied.embed_tokens.weight
    assert untied.lm_head.weight is not untied.embed_tokens.weight
    assert untied.num_params() - tied.num_params() == SMALL.vocab_size * SMALL.hidden_size
    assert len(list(tied.parameters())) == len(list(untied.parameters())) - 1
    # The tied weight gets gradient from both uses.
    x = _tokens(2, 16, SMALL.vocab_size)
    tied(x, x).backward()
    unused_rows = torch.ones(SMALL.vocab_size, dtype=torch.bool)
    unused_rows[x.unique()] = False
    assert tied.embed_tokens.weight.grad[unused_rows].abs().sum() > 0  # only the head touches these


def test_same_seed_same_weights() -> None:
    a, b, c = _model(seed=3), _model(seed=3), _model(seed=4)
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert torch.equal(pa, pb)
    assert not torch.equal(a.embed_tokens.weight, c.embed_tokens.weight)


def test_bf16_autocast_gives_fp32_loss_close_to_fp32() -> None:
    model = _model()
    x, y = _tokens(4, 16, SMALL.vocab_size, 1), _tokens(4, 16, SMALL.vocab_size, 2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(x)
        loss = model(x, y)
    assert logits.dtype == torch.bfloat16
    assert loss.dtype == torch.float32
    assert abs(loss.item() - model(x, y).item()) < 0.02


# Activation checkpointing ----------------------------------------------------------------

AC_CFG = ModelConfig(vocab_size=64, hidden_size=64, num_hidden_layers=4, num_attention_heads=4,
                     num_key_value_heads=2, seq_len=64)


def _loss_grads_and_saved_bytes(checkpointing: bool, autocast: bool = False):
    """Loss, gradients, and the bytes autograd keeps for backward (distinct storages)."""
    model = _model(AC_CFG, activation_checkpointing=checkpointing)
    x, y = _tokens(4, 64, 64, 1), _tokens(4, 64, 64, 2)
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss = model(x, y)
    loss.backward()
    return loss.detach(), [p.grad for p in model.parameters()], sum(storages.values())


@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "bf16-autocast"])
def test_activation_checkpointing_gives_identical_loss_and_gradients(autocast: bool) -> None:
    plain_loss, plain_grads, _ = _loss_grads_and_saved_bytes(False, autocast)
    ac_loss, ac_grads, _ = _loss_grads_and_saved_bytes(True, autocast)
    assert torch.equal(plain_loss, ac_loss)
    for a, b in zip(plain_grads, ac_grads, strict=True):
        assert torch.equal(a, b)


def test_activation_checkpointing_keeps_fewer_activations() -> None:
    _, _, plain = _loss_grads_and_saved_bytes(False)
    _, _, recomputed = _loss_grads_and_saved_bytes(True)
    # What checkpointing keeps: outside the layers (embedding output, final norm, logits, loss)
    # plus parameters; inside, each layer's saved tensors are replaced by recomputation.
    assert recomputed < 0.5 * plain, (recomputed, plain)
    # Each layer kept at least its [4, 64, 64] fp32 input and attention/MLP internals before.
    layer_input = 4 * 64 * 64 * 4
    assert plain - recomputed > 4 * 3 * layer_input


def test_activation_checkpointing_is_off_without_grad_and_by_default() -> None:
    assert _model().activation_checkpointing is False
    model = _model(activation_checkpointing=True)
    x = _tokens(2, 16, SMALL.vocab_size)
    with torch.no_grad():
        torch.testing.assert_close(model(x), _model()(x), rtol=0, atol=0)
