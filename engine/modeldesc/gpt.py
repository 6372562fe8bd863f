"""GPT-style decoders with LayerNorm and a two-matrix MLP: GPT-2, GPT-NeoX (Pythia), Falcon.

    GPT-2     wte V x h, wpe n_positions x h; per block: ln_1, c_attn h x 3h (+3h bias), c_proj h x h
              (+h), ln_2, c_fc h x n_inner (+n_inner; n_inner defaults to 4h), c_proj back (+h);
              ln_f; the head is tied (GPT2LMHeadModel).
    GPT-NeoX  embed_in V x h; per block: two LayerNorms, query_key_value h x 3h and dense h x h (with
              biases when attention_bias, default true), dense_h_to_4h / dense_4h_to_h with biases;
              final_layer_norm; embed_out V x h unless tie_word_embeddings (default false).
    Falcon    word_embeddings V x h; query_key_value h x (heads + 2 kv_heads) x head_dim with
              new_decoder_architecture, h x (h + 2 head_dim) with multi_query (one kv head), else
              h x 3h; dense h x h; MLP h x ffn_hidden_size (default 4h) and back; biases when
              `bias`; LayerNorms: input + post-attention without parallel_attn, else ln_attn +
              ln_mlp when num_ln_in_parallel_attn is 2 (the new architecture's default), else one;
              ln_f; the head is tied by default.
Every LayerNorm has a weight and a bias (2h). Defaults are those of transformers' configuration
classes.
"""

from __future__ import annotations

from typing import Any

from dsl.engine.modeldesc.description import ModelDescription, layer_norm, linear
from dsl.engine.modeldesc.fields import Fields
from dsl.engine.modeldesc.traits import Traits, activation_of


def _description(family: str, f: Fields, *, h: int, layers: int, heads: int, kv: int, inter: int, vocab: int,
                 positions: int, block: int, embedding: int, tied: bool, tail: int, traits: Traits) -> ModelDescription:
    head = 0 if tied else vocab * h
    params = layers * block + embedding + head + tail
    return ModelDescription(
        family=family, kind="decoder", params=params, largest_layer_params=max(block, vocab * h, head),
        layers=layers, hidden=h, heads=heads, kv_heads=kv, head_dim=h // heads, intermediate=inter, vocab=vocab,
        max_positions=positions, tied=tied, embedding_params=embedding, head_params=head, active_params=params,
        decoder_layers=layers, gated_mlp=False, traits=traits)


def gpt2(config: dict[str, Any]) -> ModelDescription:
    f = Fields(config)
    h = f.first(("n_embd", "hidden_size"), 768)
    layers = f.first(("n_layer", "num_hidden_layers"), 12)
    heads = f.first(("n_head", "num_attention_heads"), 12)
    vocab = f.int("vocab_size", 50257)
    positions = f.first(("n_positions", "max_position_embeddings"), 1024)
    inter = f.int("n_inner", 4 * h)
    block = (2 * layer_norm(h) + linear(h, 3 * h, True) + linear(h, h, True)
             + linear(h, inter, True) + linear(inter, h, True))
    return _description("gpt2", f, h=h, layers=layers, heads=heads, kv=heads, inter=inter, vocab=vocab,
                        positions=positions, block=block, embedding=vocab * h + positions * h,
                        tied=f.bool("tie_word_embeddings", True), tail=layer_norm(h),
                        traits=Traits(norm="layer", activation=activation_of(f.raw("activation_function"), "gelu_new"),
                                      gated=False, fused_qkv=True, hidden_dropout=f.float("resid_pdrop", 0.1),
                                      attention_dropout=f.float("attn_pdrop", 0.1), softmax_fp32=False, rope=False))


def gpt_neox(config: dict[str, Any]) -> ModelDescription:
    f = Fields(config)
    h = f.int("hidden_size", 6144)
    layers = f.int("num_hidden_layers", 44)
    heads = f.int("num_attention_heads", 64)
    vocab = f.int("vocab_size", 50432)
    inter = f.int("intermediate_size", 24576)
    bias = f.bool("attention_bias", True)
    block = (2 * layer_norm(h) + linear(h, 3 * h, bias) + linear(h, h, bias)
             + linear(h, inter, True) + linear(inter, h, True))
    return _description("gpt_neox", f, h=h, layers=layers, heads=heads, kv=heads, inter=inter, vocab=vocab,
                        positions=f.int("max_position_embeddings", 2048), block=block, embedding=vocab * h,
                        tied=f.bool("tie_word_embeddings", False), tail=layer_norm(h),
                        traits=Traits(norm="layer", activation=activation_of(f.raw("hidden_act"), "gelu"), gated=False,
                                      fused_qkv=True, hidden_dropout=f.float("hidden_dropout", 0.0),
                                      attention_dropout=f.float("attention_dropout", 0.0),
                                      rotary_dim=int(h // heads * f.float("rotary_pct", 0.25)),
                                      parallel=2 if f.bool("use_parallel_residual", True) else 0))


def falcon(config: dict[str, Any]) -> ModelDescription:
    f = Fields(config)
    h = f.first(("hidden_size", "n_embed"), 4544)
    layers = f.first(("num_hidden_layers", "n_layer"), 32)
    heads = f.first(("num_attention_heads", "n_head"), 71)
    vocab = f.int("vocab_size", 65024)
    head_dim = h // heads
    new_arch = f.bool("new_decoder_architecture", False)
    multi_query = f.bool("multi_query", True)
    kv_written = f.int("num_kv_heads", heads)
    if new_arch:
        qkv_out, kv = (heads + 2 * kv_written) * head_dim, kv_written
    elif multi_query:
        qkv_out, kv = h + 2 * head_dim, 1
    else:
        qkv_out, kv = 3 * h, heads
    bias = f.bool("bias", False)
    inter = f.int("ffn_hidden_size", 4 * h)
    if not f.bool("parallel_attn", True):
        norms = 2
    else:
        norms = f.int("num_ln_in_parallel_attn", 2 if new_arch else 1)
        norms = 2 if norms == 2 else 1
    block = (norms * layer_norm(h) + linear(h, qkv_out, bias) + linear(h, h, bias)
             + linear(h, inter, bias) + linear(inter, h, bias))
    return _description("falcon", f, h=h, layers=layers, heads=heads, kv=kv, inter=inter, vocab=vocab,
                        positions=f.int("max_position_embeddings", 2048), block=block, embedding=vocab * h,
                        tied=f.bool("tie_word_embeddings", True), tail=layer_norm(h),
                        traits=Traits(norm="layer", activation=activation_of(f.raw("activation"), "gelu"), gated=False,
                                      fused_qkv=True, hidden_dropout=f.float("hidden_dropout", 0.0),
                                      attention_dropout=f.float("attention_dropout", 0.0),
                                      rope=not f.bool("alibi", False), parallel=norms if f.bool("parallel_attn", True) else 0))
