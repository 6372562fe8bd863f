"""Saved activations of encoders (BERT, RoBERTa, DeBERTa v1/v2) and of T5, per rank (torch-free).

The symbols, element sizes and per-piece formulas (norms, attention, MLP, DeBERTa's disentangled
attention) are documented in engine/modeldesc/activations.py; this module assembles them into
the families' blocks. tests/unit/test_family_activations.py checks them against transformers.
"""

from __future__ import annotations

from dsl.engine.modeldesc.activations import Dims, Items, Saved, Sizes, attention, matmul_input, mlp, norm


def deberta_attention(dims: Dims, z: Sizes, *, b: int, s: int, sp: int) -> Items:
    """DeBERTa's disentangled attention (always eager), per rank."""
    tr = dims.traits
    h, a, c = dims.hidden, dims.heads, z.c
    t = b * s // sp
    scores = b * a * s * s // sp
    rel = 2 * min(tr.rel_span if tr.rel_span > 0 else s, s)
    out = [("q, k copies", 2 * c * t * h), ("scale scalars", 2 * c)]
    if tr.c2p or tr.p2c:
        out += [("relative embeddings (dropped)", z.n * rel * h)]
        if tr.hidden_dropout:
            out.append(("relative embeddings dropout mask", z.mask(z.n) * rel * h))
    v1 = tr.relative == "deberta"
    for on, name in ((tr.c2p, "c2p"), (tr.p2c, "p2c")):
        if on:
            out += [(f"{name} q/k copy", c * t * h), (f"{name} relative keys/queries", c * b * h * rel // sp),
                    (f"{name} gather index", 8 * s * s)]
            if v1:
                out.append((f"{name} gathered scores", c * scores))
    if tr.p2c and not v1:
        out.append(("p2c key copy", c * t * h))
    if v1 and tr.talking_head:  # head_logits_proj's input and head_weights_proj's (not measured)
        out.append(("talking heads", 2 * c * scores))
    out += [("softmax mask", b * s * s), ("softmax", c * scores)]
    if tr.attention_dropout:
        out += [("attention dropout mask", z.mask(c) * scores), ("dropped probabilities", c * scores)]
    out += [("v copy", c * t * h), ("o_proj input", c * t * h)]
    return out


def encoder(dims: Dims, z: Sizes, *, b: int, s: int, sp: int, flash: bool, layers: int) -> Saved:
    """BERT / RoBERTa / DeBERTa (AutoModel: no task head), per rank."""
    tr = dims.traits
    h = dims.hidden
    t = b * s // sp
    drop = z.mask(z.n) * t * h if tr.hidden_dropout else 0
    deberta = tr.relative in ("deberta", "deberta-v2")
    block = matmul_input("q/k/v input (block input)", t * h, z, 1 if tr.fused_qkv else 3)
    if deberta:
        block += deberta_attention(dims, z, b=b, s=s, sp=sp)
    else:
        block += attention(dims, z, b=b, s_q=s, s_k=s, sp=sp, flash=flash)
    if drop:
        block.append(("attention output dropout mask", drop))
    block += norm(tr.norm, t, h, z) + matmul_input("mlp input (norm output)", t * h, z, 1)
    block += mlp(dims, z, t, dims.ffn)
    if drop:
        block.append(("mlp output dropout mask", drop))
    block += norm(tr.norm, t, h, z)  # its output is the next block's input
    saved = Saved(blocks=[("encoder blocks", layers, block)])
    saved.outside = [("token ids", 8 * t)]
    if tr.token_positions:
        saved.outside += [("token type ids", 8 * t), ("position ids", 8 * t)]
    elif not deberta:
        saved.outside.append(("token type ids", 8 * (s // sp)))
    saved.outside += norm(tr.norm, t, h, z)
    if tr.embedding_mask:
        saved.outside.append(("attention mask", z.n * t))
    if drop:
        saved.outside.append(("embedding dropout mask", drop))
    if tr.norm_rel_ebd:
        saved.outside.append(("relative embedding norm mean, rstd", 2 * z.stat * 2 * min(tr.rel_span or s, s)))
    if tr.pooler:
        saved.outside += [("last hidden state (pooler input)", z.n * t * h), ("pooler tanh output", z.c * b * h)]
    saved.checkpoint_inputs = [("block inputs", layers * z.n * t * h)]
    if deberta:  # what every block is handed: the fp32 extended mask, relative positions (and v2's embeddings)
        saved.checkpoint_inputs += [("attention mask (b, 1, s, s) fp32", 4 * b * s * s), ("relative positions", 8 * s * s)]
        if tr.relative == "deberta-v2" and (tr.c2p or tr.p2c):
            saved.checkpoint_inputs.append(("relative embeddings (normalised)", z.n * 2 * min(tr.rel_span or s, s) * h))
    return saved


def t5(dims: Dims, z: Sizes, *, b: int, s_enc: int, s_dec: int, flash: bool, enc_layers: int,
       dec_layers: int) -> Saved:
    """T5ForConditionalGeneration: encoder and decoder, each at its own length."""
    tr = dims.traits
    h, a, c = dims.hidden, dims.heads, z.c
    te, td = b * s_enc, b * s_dec
    p = tr.hidden_dropout

    def self_attention(t: int, s: int, cross_len: int | None) -> Items:
        out = norm("t5", t, h, z) + matmul_input("q/k/v input (norm output)", t * h, z, 3)
        out += attention(dims, z, b=b, s_q=s, s_k=s, sp=1, flash=flash)
        if p:
            out.append(("attention dropout mask", z.mask(z.n) * t * h))
        if cross_len is not None:
            out += norm("t5", t, h, z) + matmul_input("cross q input (norm output)", t * h, z, 1)
            if z.casts:
                out.append(("encoder output: cross k/v autocast casts", 2 * c * b * cross_len * h))
            out += attention(dims, z, b=b, s_q=s, s_k=cross_len, sp=1, flash=flash)
            if p:
                out.append(("cross-attention dropout mask", z.mask(z.n) * t * h))
        out += norm("t5", t, h, z) + matmul_input("ff input (norm output)", t * h, z, 2 if tr.gated else 1)
        out += mlp(dims, z, t, dims.ffn, inner_dropout=p)
        if p:
            out.append(("ff dropout mask", z.mask(z.n) * t * h))
        return out

    enc = self_attention(te, s_enc, None)
    dec = self_attention(td, s_dec, s_enc)
    # The first block of each stack computes the relative position buckets (int64 s x s, saved by
    # the bias lookup; inside that block, so recomputed under checkpointing).
    buckets = [("encoder relative position buckets", 8 * s_enc * s_enc),
               ("decoder relative position buckets", 8 * s_dec * s_dec)]
    saved = Saved(blocks=[("encoder blocks", enc_layers, enc), ("decoder blocks", dec_layers, dec),
                          ("relative position buckets", 1, buckets)])
    for name, t, s in (("encoder", te, s_enc), ("decoder", td, s_dec)):
        saved.outside.append((f"{name} token ids", 8 * t))
        if p:
            saved.outside += [(f"{name} embedding dropout mask", z.mask(z.n) * t * h),
                              (f"{name} final dropout mask", z.mask(z.n) * t * h)]
        saved.outside += [(f"{name} final {n}", v) for n, v in norm("t5", t, h, z)]
    saved.outside += [("encoder output (cross k/v input)", z.n * te * h),
                      ("lm_head input (scaled decoder output)", z.n * td * h)]
    if z.casts:
        saved.outside.append(("lm_head input autocast cast", c * td * h))
    if flash:  # the memory-efficient kernel keeps its additive bias (relative positions + mask), one per stack
        saved.outside += [("encoder position bias", c * b * a * s_enc * s_enc), ("decoder position bias",
                                                                              c * b * a * s_dec * s_dec)]
    saved.checkpoint_inputs = [("block inputs", z.n * (enc_layers * te + dec_layers * td) * h),
                               ("position biases (1, a, s, s)", z.n * a * (s_enc * s_enc + s_dec * s_dec)),
                               ("cross-attention zero bias", c * a * s_dec * s_enc),
                               ("decoder causal mask (b, 1, s_d, s_d)", c * b * s_dec * s_dec)]
    return saved
