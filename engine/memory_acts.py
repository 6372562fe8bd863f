"""Activation, logits and offloaded-activation bytes of one rank (torch-free).

The formulas of the bundled Llama are documented in engine/memory.py's module docstring
("Activations", "Logits", "Long-sequence switches"), which re-exports these functions as part of
its public name; this module holds their code so that engine/memory.py keeps the model states
and the whole configuration. A model described by its Hugging Face config.json (a
`DescribedShape` with `traits`, engine/modeldesc/shape.py) is counted by its family's formulas
instead (`family_saved`, documented in engine/modeldesc/activations.py): decoders, encoders, the
T5 encoder-decoder, eager vs flash/SDPA attention, mixture-of-experts routing buffers.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Any

from dsl.engine.memory_shape import (ACTIVATIONS, LOGITS, OFFLOADED_ACTIVATIONS, RECOMPUTE, WEIGHT_COPIES, MiB,
                                     ModelShape, StateBytes, Term, state_bytes)

if TYPE_CHECKING:
    from dsl.engine.modeldesc.activations import Saved


def _layer_saved(shape: ModelShape, tokens: int, seq_len: int, micro_batch: int, sp: int,
                 sb: StateBytes, flash: bool, tiled_mlp: bool = False) -> list[tuple[str, int]]:
    """(what, bytes) autograd saves in one decoder layer of one rank (module docstring).

    Checked against the engine's saved-tensor accounting (Engine.state_summary, distinct
    storages): RMSNorm keeps its input, rstd and the normalised value before the gain, and the
    next matmul keeps the norm's output (under autocast: one 16-bit cast of it per matmul);
    flash attention's output is laid out so that the transpose + reshape feeding o_proj is a
    view (math attention's is a copy).
    """
    h, f, a, k = shape.hidden, shape.ffn, shape.heads, shape.kv_heads
    c, r = sb.compute, sb.residual
    experts = min(shape.experts, shape.experts_per_tok) if shape.experts else 1
    norm = [("norm input", r * tokens * h), ("norm rstd", 4 * tokens), ("norm before gain", r * tokens * h)]
    if not sb.autocast:  # under autocast the matmuls save 16-bit casts of it instead (below)
        norm.append(("norm output", r * tokens * h))
    out = [(f"attention {n}", b) for n, b in norm]
    if sb.autocast:
        out.append(("q/k/v input casts", 3 * c * tokens * h))
    # Ulysses replicates kv heads up to sp when there are fewer (engine/long/ulysses.py).
    out += [("q", c * tokens * h), ("k, v", 2 * c * tokens * h * max(k, sp) // a)]
    if flash and sp > 1:  # the head -> seq all-to-all separates the output from o_proj's input
        out += [("attention output", c * tokens * h), ("logsumexp", 4 * tokens * a),
                ("o_proj input", c * tokens * h)]
    elif flash:
        out += [("attention output = o_proj input", c * tokens * h), ("logsumexp", 4 * tokens * a)]
    else:
        # All s^2 scores of a/sp heads over the full sequence: b * a/sp * s^2 elements.
        out += [("softmax probabilities", c * micro_batch * a * seq_len * seq_len // sp),
                ("o_proj input", c * tokens * h)]
    out += [(f"mlp {n}", b) for n, b in norm]
    if sb.autocast:
        # RoPE's angle tables are cast to the compute dtype for q and k: 4 small copies per layer.
        out.append(("rope table casts", 4 * c * (seq_len // sp) * shape.head_dim))
    if tiled_mlp:  # the tiled MLP keeps only its input, the norm's fp32 output
        if sb.autocast:
            out.append(("mlp norm output (tiled MLP input)", r * tokens * h))
        return out
    if sb.autocast:
        out.append(("gate/up input casts", 2 * c * tokens * h))
    out.append(("gate, up, silu, product", 4 * c * tokens * f * experts))
    return out


def layer_activation_bytes(shape: ModelShape, micro_batch: int, seq_len: int | None = None, sp: int = 1,
                           sb: StateBytes | None = None, flash_attention: bool = True,
                           tiled_mlp: bool = False) -> int:
    """Bytes one decoder layer keeps for backward on one rank (no checkpointing)."""
    seq = seq_len or shape.seq_len
    tokens = micro_batch * seq // sp
    return sum(b for _, b in _layer_saved(shape, tokens, seq, micro_batch, sp, sb or state_bytes(), flash_attention,
                                          tiled_mlp))


def family_saved(shape: ModelShape, *, micro_batch: int, seq_len: int | None = None, sp: int = 1,
                 sb: StateBytes | None = None, flash_attention: bool = True, accelerator: bool = True,
                 target_len: int | None = None, tiled_mlp: bool = False) -> "Saved | None":
    """What a described model's forward saves on one rank (engine/modeldesc/activations.py), or
    None for a shape without family traits (the bundled Llama, a model known by its counts).
    `target_len`: T5's decoder length (default: the shape's decoder_seq_len, else seq_len);
    `accelerator=False`: CPU dropout masks
    and LayerNorm statistics (the module docstring there)."""
    traits = getattr(shape, "traits", None)
    if traits is None:
        return None
    from dsl.engine.modeldesc import activations as fam
    from dsl.engine.modeldesc import acts_encoders

    sb = sb or state_bytes()
    seq = seq_len or shape.seq_len
    n = sb.work or sb.param
    z = fam.Sizes(c=sb.compute, n=n, casts=sb.autocast and n != sb.compute, accelerator=accelerator)
    dims = fam.Dims(hidden=shape.hidden, heads=shape.heads, kv_heads=shape.kv_heads, head_dim=shape.head_dim,
                    ffn=getattr(shape, "dense_ffn", 0) or shape.ffn, vocab=shape.vocab, experts=shape.experts,
                    experts_per_tok=shape.experts_per_tok, expert_ffn=shape.ffn, traits=traits)
    kind = getattr(shape, "kind", "decoder")
    if kind == "encoder":
        return acts_encoders.encoder(dims, z, b=micro_batch, s=seq, sp=sp, flash=flash_attention, layers=shape.layers)
    if kind == "encoder-decoder":
        s_dec = target_len or getattr(shape, "decoder_seq_len", 0) or seq
        return acts_encoders.t5(dims, z, b=micro_batch, s_enc=seq, s_dec=s_dec, flash=flash_attention,
                      enc_layers=shape.encoder_layers, dec_layers=shape.decoder_layers)
    return fam.decoder(dims, z, b=micro_batch, s=seq, sp=sp, flash=flash_attention, layers=shape.layers,
                       moe_layers=shape.moe_layers if shape.experts else 0, tiled_mlp=tiled_mlp)


def activations(shape: ModelShape, **kw: Any) -> tuple[Term, Term, Term]:
    """(activations saved by the forward on the device, autocast weight copies, recomputation
    peak) of one rank for one micro-batch (keywords: `_activations`'). The planner asks for the
    same ones for every offload variant of a candidate: memoized (shapes and terms are frozen)."""
    try:
        return _memo(shape, **kw)
    except TypeError:  # an unhashable argument: computed each time
        return _activations(shape, **kw)


def _activations(shape: ModelShape, *, micro_batch: int, seq_len: int | None = None, sp: int = 1,
                 checkpointing: bool = False, flash_attention: bool = True,
                 sb: StateBytes | None = None, stage: int = 0, tiled_loss_tokens: int | None = None,
                 tiled_mlp_tokens: int | None = None, activation_offload: bool = False,
                 accelerator: bool = True) -> tuple[Term, Term, Term]:
    """See `activations`. With activation_offload (and checkpointing) the layer inputs are not on
    the device: `offloaded_activations` has them."""
    sb = sb or state_bytes()
    seq = seq_len or shape.seq_len
    tokens = micro_batch * seq // sp
    tiled_mlp = tiled_mlp_tokens is not None
    saved = family_saved(shape, micro_batch=micro_batch, seq_len=seq, sp=sp, sb=sb, flash_attention=flash_attention,
                         accelerator=accelerator, tiled_mlp=tiled_mlp)
    if saved is not None:
        # the tiled MLP rebuilds one tile of its SwiGLU in backward (gate, up, silu, product)
        tile = 4 * sb.compute * min(tiled_mlp_tokens, tokens) * (getattr(shape, "dense_ffn", 0) or shape.ffn) \
            if tiled_mlp else 0
        return _family_terms(shape, saved, sb=sb, stage=stage, checkpointing=checkpointing, tokens=tokens, tile=tile,
                             flash_attention=flash_attention, tiled_loss=tiled_loss_tokens is not None,
                             offload_bytes=offloaded_activations(shape, micro_batch=micro_batch, seq_len=seq, sp=sp,
                                                                 sb=sb).host_bytes if activation_offload else 0)
    layer = layer_activation_bytes(shape, micro_batch, seq, sp, sb, flash_attention, tiled_mlp)
    h, r, c = shape.hidden, sb.residual, sb.compute
    # Final norm (input, rstd, before gain; its output, or under autocast the output's cast for
    # lm_head), the token ids of the embedding and of the loss (int64), and RoPE's fp32 angle
    # tables (under autocast only their per-layer casts are saved, counted in the layers).
    # (the tiled loss saves the fp32 norm output itself instead of lm_head's 16-bit input cast)
    lm_input = c if sb.autocast and tiled_loss_tokens is None else r
    final = 2 * r * tokens * h + 4 * tokens + lm_input * tokens * h + 16 * tokens
    if not sb.autocast or checkpointing:  # checkpoint() keeps its inputs, the fp32 tables among them
        final += 2 * 4 * (seq // sp) * shape.head_dim
    attn = "flash" if flash_attention else "math (s^2 scores)"
    recompute = 0
    # Stage 3's matmuls use (and save) the gathered 16-bit working copy itself: parameter storage.
    # So do the master layout's 16-bit parameters at stages 0-2 (engine/zero/master.py).
    weight_casts = sb.autocast and not sb.weights16 and not (stage >= 3 and sb.work)
    per_layer_copies = c * (shape.matmul_params - shape.vocab * h) // shape.layers if weight_casts else 0
    experts = min(shape.experts, shape.experts_per_tok) if shape.experts else 1
    if tiled_mlp and weight_casts:  # the tiled MLP casts its weights inside, without saving them
        per_layer_copies -= c * 3 * h * shape.ffn * experts
    tile = 4 * c * min(tiled_mlp_tokens, tokens) * shape.ffn * experts if tiled_mlp else 0
    if checkpointing:
        acts = shape.layers * r * tokens * h + final
        formula = f"{shape.layers} layer inputs x {r} B x {tokens:,} tokens x {h} ({attn})"
        if activation_offload:
            acts -= offloaded_activations(shape, micro_batch=micro_batch, seq_len=seq, sp=sp, sb=sb).host_bytes
            formula = f"final norm and loss inputs ({tokens:,} tokens; the {shape.layers} layer inputs are offloaded)"
        # The recomputed layer's first saved tensor, its norm's input, is the layer input the
        # checkpoint keeps (same storage, counted above): measured, counting it twice put the
        # long-context bench's checkpointing row 5.6 MiB (~650 tokens) over at 26k tokens.
        recompute = layer - r * tokens * h + per_layer_copies + tile
    else:
        acts = shape.layers * layer + final
        formula = f"{shape.layers} layers x {layer / MiB:,.1f} MiB ({tokens:,} tokens/rank, {attn})"
    acts_term = Term(ACTIVATIONS, device_bytes=acts, formula=formula)
    recompute_term = Term(RECOMPUTE, device_bytes=recompute,
                          formula=f"one layer's activations ({layer / MiB:,.1f} MiB, less its input, the checkpoint) "
                                  "and weight casts rebuilt in backward"
                          + (f", one MLP tile ({tile / MiB:,.1f} MiB)" if tile else "")
                          if checkpointing else "none: no checkpointing")
    if tile and not checkpointing:
        recompute_term = Term(RECOMPUTE, device_bytes=tile,
                              formula=f"one MLP tile rebuilt in backward: 4 x {c} B x {min(tiled_mlp_tokens, tokens):,} "
                                      f"tokens x {shape.ffn}")
    copies = 0
    copies_f = "none: parameters are already in the compute dtype"
    if weight_casts:
        layers_kept = 0 if checkpointing else shape.layers
        head = 0 if tiled_loss_tokens is not None else c * shape.vocab * h  # the tiled loss casts without saving
        copies = layers_kept * per_layer_copies + head
        copies_f = (f"{c} B x matmul weights of {layers_kept} layer(s)" + (" + lm_head" if head else "")
                    + ", saved for backward"
                    + (" (a recomputed layer's are in the recomputation peak)" if checkpointing else ""))
    return acts_term, Term(WEIGHT_COPIES, device_bytes=copies, formula=copies_f), recompute_term


def _family_terms(shape: ModelShape, saved: "Saved", *, sb: StateBytes, stage: int, checkpointing: bool,
                  tokens: int, flash_attention: bool, tiled_loss: bool, offload_bytes: int,
                  tile: int = 0) -> tuple[Term, Term, Term]:
    """The three activation terms of a described model from its family's `Saved` list."""
    kind = getattr(shape, "kind", "decoder")
    attn = ("flash/SDPA" if flash_attention else "eager (s^2 scores)") if shape.traits.relative not in (
        "deberta", "deberta-v2") else "disentangled (s^2 scores)"
    groups = " + ".join(f"{n} {what} x {sum(b for _, b in items) / MiB:,.1f} MiB" for what, n, items in saved.blocks if n)
    weight_casts = sb.autocast and not sb.weights16 and not (stage >= 3 and sb.work)
    blocks = sum(n for _, n, _ in saved.blocks) or 1
    per_layer_copies = sb.compute * (shape.matmul_params - shape.vocab * shape.hidden) // blocks if weight_casts else 0
    if checkpointing:
        acts = saved.total(True) - offload_bytes
        formula = (f"{kind} ({shape.family}): {blocks} block inputs + what the blocks share, "
                   f"{tokens:,} tokens/rank ({attn})" + (", block inputs offloaded" if offload_bytes else ""))
        recompute = Term(RECOMPUTE, device_bytes=saved.largest_block + per_layer_copies + tile,
                         formula=f"the largest block's activations ({saved.largest_block / MiB:,.1f} MiB) "
                                 "and weight casts rebuilt in backward"
                                 + (f", one MLP tile ({tile / MiB:,.1f} MiB)" if tile else ""))
    else:
        acts = saved.total(False)
        formula = f"{kind} ({shape.family}): {groups} + embeddings/norms/heads ({tokens:,} tokens/rank, {attn})"
        recompute = Term(RECOMPUTE, device_bytes=tile, formula=f"one MLP tile rebuilt in backward ({tile / MiB:,.1f} MiB)"
                         if tile else "none: no checkpointing")
    copies, copies_f = 0, "none: parameters are already in the compute dtype"
    if weight_casts:
        kept = 0 if checkpointing else blocks
        head = 0 if tiled_loss else sb.compute * shape.vocab * shape.hidden
        copies = kept * per_layer_copies + head
        copies_f = f"{sb.compute} B x matmul weights of {kept} block(s)" + (" + lm_head" if head else "") + \
            ", saved for backward"
    return (Term(ACTIVATIONS, device_bytes=acts, formula=formula), Term(WEIGHT_COPIES, device_bytes=copies,
                                                                         formula=copies_f), recompute)


def logits(shape: ModelShape, *, micro_batch: int, seq_len: int | None = None, sp: int = 1,
           chunk_tokens: int | None = None, sb: StateBytes | None = None, stage: int = 0) -> Term:
    """The loss's logits buffers; with a tiled loss of `chunk_tokens`, what its backward holds
    (engine/long/tiled_loss.py, measured on the loss alone to 0.05 MiB at 128-2,368 tokens): one
    chunk's logits, their fp32 log-softmax and its gradient (12 B a logit with two chunks or more;
    with one chunk 8 B, plus the 16-bit logits under autocast), the fp32 accumulator of the head's
    gradient (4 B x vocab x hidden), the gradient of the hidden states (residual bytes a token),
    and under autocast with fp32 weights the head's 16-bit cast. An encoder-decoder's logits are
    its decoder's tokens (`decoder_seq_len` of a DescribedShape)."""
    tokens = micro_batch * (getattr(shape, "decoder_seq_len", 0) or seq_len or shape.seq_len) // sp
    if chunk_tokens is not None:
        sb = sb or state_bytes()
        chunk = min(chunk_tokens, tokens)
        v, h = shape.vocab, shape.hidden
        cast = sb.autocast and not sb.weights16 and not (stage >= 3 and sb.work)
        per_logit = 12 if tokens > chunk else 8 + (sb.compute if sb.autocast else 0)
        total = per_logit * chunk * v + 4 * v * h + sb.residual * tokens * h + (sb.compute * v * h if cast else 0)
        return Term(LOGITS, device_bytes=total,
                    formula=f"{per_logit} B x {chunk:,} tokens (one tiled-loss chunk) x {v:,} vocab + fp32 head "
                            f"gradient 4 B x {v:,} x {h:,} + hidden gradient {sb.residual} B x {tokens:,} x {h:,}"
                            + (f" + the head's {sb.compute} B cast" if cast else ""))
    return Term(LOGITS, device_bytes=12 * tokens * shape.vocab,
                formula=f"12 B x {tokens:,} tokens x {shape.vocab:,} vocab (fp32 log-softmax, its grad, logits grad)")


def offloaded_activations(shape: ModelShape, *, micro_batch: int, seq_len: int | None = None, sp: int = 1,
                          sb: StateBytes | None = None) -> Term:
    """Host bytes of activation offload: the inputs checkpointing keeps (L layer inputs r bsh and
    the two fp32 RoPE tables, which every layer shares and are copied once)."""
    sb = sb or state_bytes()
    seq = seq_len or shape.seq_len
    tokens = micro_batch * seq // sp
    saved = family_saved(shape, micro_batch=micro_batch, seq_len=seq, sp=sp, sb=sb)
    if saved is not None:  # a described model: its block inputs in the parameters' dtype (+ RoPE tables)
        inputs = dict(saved.checkpoint_inputs).get("block inputs", 0)
        host = inputs + dict(saved.outside).get("RoPE cos, sin", 0)
        return Term(OFFLOADED_ACTIVATIONS, host_bytes=host,
                    formula=f"{shape.layers} block inputs ({inputs / MiB:,.1f} MiB, {tokens:,} tokens) "
                            "+ RoPE tables, in host memory")
    host = shape.layers * sb.residual * tokens * shape.hidden + 2 * 4 * (seq // sp) * shape.head_dim
    return Term(OFFLOADED_ACTIVATIONS, host_bytes=host,
                formula=f"{shape.layers} layer inputs x {sb.residual} B x {tokens:,} tokens x {shape.hidden} "
                        f"+ RoPE tables, in host memory")


_memo = functools.lru_cache(maxsize=4096)(_activations)
