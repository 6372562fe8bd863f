"""Bidirectional encoders: BERT, RoBERTa, DeBERTa, DeBERTa-v2/v3, as transformers' base model
(`AutoModel`: no task head).

    BERT/RoBERTa  embeddings: word V x h, position P x h, token type T x h, LayerNorm; per block:
                  query, key, value, output h x h with biases, LayerNorm, intermediate h x I and
                  output I x h with biases, LayerNorm; the pooler h x h + h.
    DeBERTa       embeddings: word V x e (e = embedding_size, default h), position P x e when
                  position_biased_input (default true), token type T x e when T > 0, a projection
                  e x h (no bias) when e != h, LayerNorm; per block: in_proj h x 3h (no bias) plus
                  q_bias and v_bias (h each), head_logits_proj / head_weights_proj (heads x heads)
                  with talking_head, pos_proj h x h (c2p, no bias) and pos_q_proj h x h + h (p2c)
                  with relative_attention, then as BERT; the encoder's rel_embeddings 2 R x h with
                  relative_attention (R = max_relative_positions, or P when below 1).
    DeBERTa-v2    embeddings as DeBERTa; per block: query_proj, key_proj, value_proj with biases,
                  pos_key_proj (c2p) and pos_query_proj (p2c) h x h + h only when share_att_key is
                  false, then as BERT; the encoder's rel_embeddings (2 x position_buckets when
                  buckets > 0, else 2 R) x h, a LayerNorm when norm_rel_ebd names layer_norm, and
                  a ConvLayer (h x h/groups x k + h, LayerNorm) when conv_kernel_size > 0.
Every LayerNorm has a weight and a bias (2h). No LM head: these models are described as encoders.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from dsl.engine.modeldesc.description import ModelDescription, layer_norm, linear
from dsl.engine.modeldesc.fields import Fields
from dsl.engine.modeldesc.traits import Traits, activation_of

_DEFAULTS = {
    "bert": dict(vocab_size=30522, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                 intermediate_size=3072, max_position_embeddings=512, type_vocab_size=2),
    "roberta": dict(vocab_size=50265, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                    intermediate_size=3072, max_position_embeddings=512, type_vocab_size=2),
    "deberta": dict(vocab_size=50265, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                    intermediate_size=3072, max_position_embeddings=512, type_vocab_size=0),
    "deberta-v2": dict(vocab_size=128100, hidden_size=1536, num_hidden_layers=24, num_attention_heads=24,
                       intermediate_size=6144, max_position_embeddings=512, type_vocab_size=0),
}


def _pos_att_type(f: Fields) -> list[str]:
    value = f.raw("pos_att_type", None)
    if value is None:
        return []
    if isinstance(value, str):
        return [x.strip() for x in value.lower().split("|")]
    return [str(x) for x in value]


def describe(family: str, config: dict[str, Any]) -> ModelDescription:
    d = _DEFAULTS[family]
    f = Fields(config)
    h = f.positive("hidden_size", d["hidden_size"])
    layers = f.positive("num_hidden_layers", d["num_hidden_layers"])
    heads = f.positive("num_attention_heads", d["num_attention_heads"])
    inter = f.positive("intermediate_size", d["intermediate_size"])
    vocab = f.positive("vocab_size", d["vocab_size"])
    positions = f.int("max_position_embeddings", d["max_position_embeddings"])
    types = f.int("type_vocab_size", d["type_vocab_size"])
    # the attention's output dense + LayerNorm, then the MLP and its LayerNorm
    ffn = layer_norm(h) + linear(h, h, True) + linear(h, inter, True) + linear(inter, h, True) + layer_norm(h)
    tail = 0
    if family in ("bert", "roberta"):
        embedding = (vocab + positions + types) * h + layer_norm(h)
        block = 3 * linear(h, h, True) + ffn  # q, k, v (the attention's output dense is in ffn)
        tail = linear(h, h, True)  # the pooler
    else:
        e = f.int("embedding_size", h)
        embedding = vocab * e + (positions * e if f.bool("position_biased_input", True) else 0) \
            + (types * e if types > 0 else 0) + (linear(e, h) if e != h else 0) + layer_norm(h)
        relative = f.bool("relative_attention", False)
        pos = _pos_att_type(f)
        rel_positions = f.int("max_relative_positions", -1)
        if rel_positions < 1:
            rel_positions = positions
        if family == "deberta":
            block = linear(h, 3 * h) + 2 * h + ffn
            if f.bool("talking_head", False):
                block += 2 * heads * heads
            if relative:
                block += (linear(h, h) if "c2p" in pos else 0) + (linear(h, h, True) if "p2c" in pos else 0)
                tail = 2 * rel_positions * h
        else:
            block = 3 * linear(h, h, True) + ffn
            if relative and not f.bool("share_att_key", False):
                block += (linear(h, h, True) if "c2p" in pos else 0) + (linear(h, h, True) if "p2c" in pos else 0)
            if relative:
                buckets = f.int("position_buckets", -1)
                tail = (2 * buckets if buckets > 0 else 2 * rel_positions) * h
            norm_rel = [x.strip() for x in str(f.raw("norm_rel_ebd", "none")).lower().split("|")]
            if "layer_norm" in norm_rel:
                tail += layer_norm(h)
            kernel = f.int("conv_kernel_size", 0)
            if kernel > 0:
                groups = f.int("conv_groups", 1)
                tail += h * (h // groups) * kernel + h + layer_norm(h)
    params = layers * block + embedding + tail
    traits = Traits(norm="layer", activation=activation_of(f.raw("hidden_act"), "gelu"), gated=False,
                    hidden_dropout=f.float("hidden_dropout_prob", 0.1),
                    attention_dropout=f.float("attention_probs_dropout_prob", 0.1), softmax_fp32=False, rope=False,
                    pooler=family in ("bert", "roberta"), token_positions=family == "roberta")
    if family.startswith("deberta"):
        relative = f.bool("relative_attention", False)
        pos = _pos_att_type(f) if relative else []
        span = f.int("max_relative_positions", -1)
        if family == "deberta-v2" and f.int("position_buckets", -1) > 0:
            span = f.int("position_buckets", -1)
        traits = replace(traits, norm="deberta" if family == "deberta" else "layer", relative=family,
                         rel_span=span if span > 0 else positions, c2p="c2p" in pos, p2c="p2c" in pos,
                         share_att_key=f.bool("share_att_key", False), talking_head=f.bool("talking_head", False),
                         norm_rel_ebd=family == "deberta-v2" and relative and "layer_norm" in [
                             x.strip() for x in str(f.raw("norm_rel_ebd", "none")).lower().split("|")],
                         embedding_mask=True, fused_qkv=family == "deberta")
    return ModelDescription(
        family=family, kind="encoder", params=params, largest_layer_params=max(block, embedding),
        layers=layers, hidden=h, heads=heads, kv_heads=heads, head_dim=h // heads, intermediate=inter,
        vocab=vocab, max_positions=positions, tied=False, embedding_params=embedding, head_params=0,
        active_params=params, encoder_layers=layers, gated_mlp=False, traits=traits)
