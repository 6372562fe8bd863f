"""Llama-style decoders: Llama, Mistral, Qwen2, Qwen3, Qwen2-MoE, Qwen3-MoE, Mixtral, Phi-3, Gemma.

One block: RMSNorm, attention (q, k, v, o projections of `heads x head_dim` and `kv_heads x
head_dim`; Phi-3 fuses q, k, v into one matrix of the same size), RMSNorm, MLP (gate, up, down;
Phi-3 fuses gate and up). Per family, as transformers builds them:

    family     q/k/v bias        o bias          q/k norm  MLP                          tied default
    llama      attention_bias    attention_bias  -         dense, mlp_bias              false
    mistral    -                 -               -         dense                        false
    qwen2      always            -               -         dense                        false
    qwen3      attention_bias    attention_bias  head_dim  dense                        false
    qwen2_moe  qkv_bias (true)   -               -         experts + shared expert      false
    qwen3_moe  attention_bias    attention_bias  head_dim  experts (mlp_only_layers     false
                                                           and decoder_sparse_step
                                                           leave some blocks dense)
    mixtral    -                 -               -         num_local_experts experts    false
    phi3       -                 -               -         dense (gate/up fused)        false
    gemma      attention_bias    attention_bias  -         dense                        true

A mixture-of-experts MLP holds a router (hidden x experts, no bias) and `experts` SwiGLU MLPs of
`moe_intermediate_size` (Mixtral: intermediate_size); Qwen2-MoE adds a shared expert of
`shared_expert_intermediate_size` and its gate (hidden x 1). head_dim is the config's when it
gives one (Qwen3 and Gemma default to 128 and 256), else hidden / heads. Defaults below are those
of each family's transformers configuration class.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from dsl.engine.modeldesc.description import ModelDescription, linear
from dsl.engine.modeldesc.fields import ConfigError, Fields
from dsl.engine.modeldesc.traits import Traits, activation_of


@dataclass(frozen=True)
class _Style:
    qkv_bias: str | bool  # a config key, or a fixed answer
    o_bias: str | bool
    qk_norm: bool
    moe: str | None  # None, "qwen" (num_experts, moe_intermediate_size), "mixtral"
    shared_expert: bool
    tied: bool
    defaults: dict[str, Any]


_LLAMA = dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
              num_attention_heads=32, max_position_embeddings=2048)
STYLES: dict[str, _Style] = {
    "llama": _Style("attention_bias", "attention_bias", False, None, False, False, _LLAMA),
    "mistral": _Style(False, False, False, None, False, False, dict(
        _LLAMA, intermediate_size=14336, num_key_value_heads=8, max_position_embeddings=131072)),
    "qwen2": _Style(True, False, False, None, False, False, dict(
        vocab_size=151936, hidden_size=4096, intermediate_size=22016, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=32768)),
    "qwen3": _Style("attention_bias", "attention_bias", True, None, False, False, dict(
        vocab_size=151936, hidden_size=4096, intermediate_size=22016, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=32, head_dim=128, max_position_embeddings=32768)),
    "qwen2_moe": _Style("qkv_bias", False, False, "qwen", True, False, dict(
        vocab_size=151936, hidden_size=2048, intermediate_size=5632, num_hidden_layers=24,
        num_attention_heads=16, num_key_value_heads=16, max_position_embeddings=32768,
        moe_intermediate_size=1408, shared_expert_intermediate_size=5632, num_experts=60,
        num_experts_per_tok=4, decoder_sparse_step=1)),
    "qwen3_moe": _Style("attention_bias", "attention_bias", True, "qwen", False, False, dict(
        vocab_size=151936, hidden_size=2048, intermediate_size=6144, num_hidden_layers=24,
        num_attention_heads=32, num_key_value_heads=4, max_position_embeddings=32768,
        moe_intermediate_size=768, num_experts=128, num_experts_per_tok=8, decoder_sparse_step=1)),
    "mixtral": _Style(False, False, False, "mixtral", False, False, dict(
        _LLAMA, intermediate_size=14336, num_key_value_heads=8, max_position_embeddings=131072,
        num_local_experts=8, num_experts_per_tok=2)),
    "phi3": _Style(False, False, False, None, False, False, dict(
        vocab_size=32064, hidden_size=3072, intermediate_size=8192, num_hidden_layers=32,
        num_attention_heads=32, max_position_embeddings=4096)),
    "gemma": _Style("attention_bias", "attention_bias", False, None, False, True, dict(
        vocab_size=256000, hidden_size=3072, intermediate_size=24576, num_hidden_layers=28,
        num_attention_heads=16, num_key_value_heads=16, head_dim=256, max_position_embeddings=8192)),
}


def _flag(f: Fields, spec: str | bool, default: bool) -> bool:
    return spec if isinstance(spec, bool) else f.bool(spec, default)


def describe(family: str, config: dict[str, Any]) -> ModelDescription:
    style = STYLES[family]
    d = style.defaults
    f = Fields(config)
    h = f.positive("hidden_size", d["hidden_size"])
    layers = f.positive("num_hidden_layers", d["num_hidden_layers"])
    heads = f.positive("num_attention_heads", d["num_attention_heads"])
    kv = f.positive("num_key_value_heads", d.get("num_key_value_heads", heads))
    if heads % kv:
        raise ConfigError("num_key_value_heads", f"num_key_value_heads ({kv}) must divide num_attention_heads ({heads})")
    head_dim = f.positive("head_dim", d.get("head_dim", h // heads)) if family != "phi3" else h // heads
    vocab = f.positive("vocab_size", d["vocab_size"])
    inter = f.positive("intermediate_size", d["intermediate_size"])
    tied = f.bool("tie_word_embeddings", style.tied)
    qkv_bias = _flag(f, style.qkv_bias, family == "qwen2_moe")
    o_bias = _flag(f, style.o_bias, False)
    mlp_bias = f.bool("mlp_bias", False) if family == "llama" else False

    attention = (linear(h, heads * head_dim, qkv_bias) + 2 * linear(h, kv * head_dim, qkv_bias)
                 + linear(heads * head_dim, h, o_bias) + (2 * head_dim if style.qk_norm else 0))
    dense_mlp = 2 * linear(h, inter, mlp_bias) + linear(inter, h, mlp_bias)
    norms = 2 * h

    experts = per_tok = expert_inter = shared_inter = 0
    sparse = [False] * layers
    moe_mlp = 0
    if style.moe == "mixtral":
        experts = f.positive("num_local_experts", d["num_local_experts"])
        expert_inter = inter
    elif style.moe == "qwen":
        experts = f.int("num_experts", d["num_experts"])
        expert_inter = f.positive("moe_intermediate_size", d["moe_intermediate_size"])
        if style.shared_expert:
            shared_inter = f.int("shared_expert_intermediate_size", d["shared_expert_intermediate_size"])
    if experts:
        per_tok = f.positive("num_experts_per_tok", d["num_experts_per_tok"])
        if style.moe == "qwen":
            step = f.positive("decoder_sparse_step", d["decoder_sparse_step"])
            dense_only = set(f.raw("mlp_only_layers", []))
            sparse = [i not in dense_only and (i + 1) % step == 0 for i in range(layers)]
        else:
            sparse = [True] * layers
        expert = 3 * h * expert_inter
        moe_mlp = h * experts + experts * expert
        if shared_inter:
            moe_mlp += 3 * h * shared_inter + h
    block_dense = attention + dense_mlp + norms
    block_moe = attention + moe_mlp + norms
    moe_layers = sum(sparse)
    blocks = (layers - moe_layers) * block_dense + moe_layers * block_moe
    embedding = vocab * h
    head = 0 if tied else vocab * h
    params = blocks + embedding + head + h  # + the final norm
    unused = moe_layers * (experts - min(per_tok, experts)) * 3 * h * expert_inter if experts else 0
    return ModelDescription(
        family=family, kind="decoder", params=params,
        largest_layer_params=max(block_moe if moe_layers else block_dense, block_dense if moe_layers < layers else 0,
                                 embedding, head),
        layers=layers, hidden=h, heads=heads, kv_heads=kv, head_dim=head_dim, intermediate=inter,
        vocab=vocab, max_positions=f.int("max_position_embeddings", d["max_position_embeddings"]),
        tied=tied, embedding_params=embedding, head_params=head, active_params=params - unused,
        experts=experts, experts_per_tok=per_tok, expert_intermediate=expert_inter,
        shared_expert_intermediate=shared_inter, moe_layers=moe_layers, decoder_layers=layers,
        traits=Traits(norm="gemma" if family == "gemma" else "rms", activation=_activation(family, f), gated=True, fused_qkv=family == "phi3",
                      attention_dropout=f.float("attention_dropout", 0.0), qk_norm=style.qk_norm,
                      shared_expert=shared_inter if moe_layers else 0,
                      norm_topk=style.moe == "mixtral" or f.bool("norm_topk_prob", False)))


def _activation(family: str, f: Fields):
    if family == "gemma":  # GemmaConfig: hidden_activation, else hidden_act, else gelu_pytorch_tanh
        return activation_of(f.raw("hidden_activation", f.raw("hidden_act")), "gelu_tanh")
    return activation_of(f.raw("hidden_act"), "silu")
