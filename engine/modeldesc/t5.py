"""T5 (encoder-decoder), as transformers builds `T5ForConditionalGeneration`.

d = d_model, n = num_heads x d_kv (the attention's inner width), f = d_ff, V = vocab_size. Every
projection has no bias; a T5 LayerNorm is one weight of d.

    attention (self or cross)   q, k, v: d x n each, o: n x d; the first block of each stack also
                                holds relative_attention_bias, num_buckets x heads
    feed-forward                wi: d x f, wo: f x d; gated (feed_forward_proj "gated-..."): wi_0 and
                                wi_1, d x f each
    encoder block               self-attention, LayerNorm, feed-forward, LayerNorm
    decoder block               self-attention, LayerNorm, cross-attention, LayerNorm, feed-forward,
                                LayerNorm
    whole                       shared embedding V x d (both stacks read it), a final LayerNorm per
                                stack, lm_head tied to the embedding

transformers 5 ties T5's head always (its T5Config forces tie_word_embeddings true and keeps the
written value only to decide whether decoder outputs are scaled), so a T5 v1.1 config, whose
checkpoint has a separate lm_head, is counted with the head tied, as the model transformers
builds from it.
"""

from __future__ import annotations

from typing import Any

from dsl.engine.modeldesc.description import ModelDescription, linear
from dsl.engine.modeldesc.fields import Fields
from dsl.engine.modeldesc.traits import Traits, activation_of


def describe(config: dict[str, Any]) -> ModelDescription:
    f = Fields(config)
    d = f.positive("d_model", 512)
    heads = f.positive("num_heads", 8)
    d_kv = f.positive("d_kv", 64)
    d_ff = f.positive("d_ff", 2048)
    vocab = f.positive("vocab_size", 32128)
    enc_layers = f.positive("num_layers", 6)
    dec_layers = f.positive("num_decoder_layers", enc_layers)
    buckets = f.int("relative_attention_num_buckets", 32)
    proj = str(f.raw("feed_forward_proj", "relu")).split("-")
    gated = proj[0] == "gated"
    act = "gelu_new" if proj[-1] == "gelu" else proj[-1]  # T5Config: gated-gelu means gelu_new
    n = heads * d_kv
    attention = 3 * linear(d, n) + linear(n, d)
    ff = (3 if gated else 2) * d * d_ff
    enc_block = attention + d + ff + d
    dec_block = 2 * attention + 2 * d + ff + d
    rel_bias = buckets * heads  # once per stack
    embedding = vocab * d
    params = (enc_layers * enc_block + dec_layers * dec_block + 2 * rel_bias + 2 * d + embedding)
    return ModelDescription(
        family="t5", kind="encoder-decoder", params=params,
        largest_layer_params=max(dec_block + rel_bias, enc_block + rel_bias, embedding),
        layers=enc_layers + dec_layers, hidden=d, heads=heads, kv_heads=heads, head_dim=d_kv, intermediate=d_ff,
        vocab=vocab, max_positions=f.int("n_positions", 512), tied=True, embedding_params=embedding,
        head_params=0, active_params=params, encoder_layers=enc_layers, decoder_layers=dec_layers,
        gated_mlp=gated,
        traits=Traits(norm="t5", activation=activation_of(act, "relu"), gated=gated,
                      hidden_dropout=f.float("dropout_rate", 0.1), attention_dropout=f.float("dropout_rate", 0.1),
                      softmax_fp32=False, rope=False, relative="t5"))
