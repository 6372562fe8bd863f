"""Bytes autograd saves in one forward of a Hugging Face model, per family (torch-free).

engine/memory_acts.py uses these for a model described by its config.json (engine/modeldesc/):
decoders (Llama-style, GPT-style, mixtures of experts), encoders (BERT, RoBERTa, DeBERTa v1/v2)
and the T5 encoder-decoder. Each function lists what the family's transformers modules save,
tensor by tensor, as (what, bytes) (encoders and T5 in engine/modeldesc/acts_encoders.py, with
the shared pieces from here); tests/unit/test_family_activations.py builds a tiny model of
every family and compares the list's sum with the bytes autograd actually saves (distinct
storages, parameters left out).

Symbols: b micro batch, s sequence length (s_e / s_d: T5's encoder and decoder lengths), t = b s
/ sp the tokens of one rank, h hidden, a query heads, k kv heads, d head_dim, f MLP width, E
experts, x experts per token, R DeBERTa's relative embeddings (2 min(span, s)), S = b a s^2 / sp
score elements. Element sizes: c the compute dtype (matmul outputs), n the parameters' dtype,
which the residual stream and the norms' outputs take (4 under fp32 parameters, 2 under 16-bit
ones), m a dropout mask element (1 on a GPU, whose fused dropout keeps a bool mask; the
activation's own size on CPU, where dropout multiplies by a scaled noise tensor), l a LayerNorm
statistic (4 on a GPU; n on CPU, which keeps mean and rstd in the input dtype).

Norms (what the norm saves; its output is saved by whatever consumes it, counted there):

    rms (Llama)            fp32 input 4 tw, rstd 4 t, normalised value in the input dtype n tw
    t5 (T5)                as rms, plus the input itself under 16-bit parameters n tw
    layer (BERT, GPT-2)    input n tw, mean and rstd 2 l t
    deberta (DeBERTa v1)   x - mean 4 tw, std 4 t, normalised 4 tw, its cast n tw

Attention, q tokens t_q, key tokens t_k:

    eager         q c t_q a d, k and v expanded to a heads c t_k a d each, the softmax output
                  (fp32 4 S + its cast c S where the family's softmax runs in fp32, else c S),
                  with attention dropout its mask m S and the dropped probabilities c S, the
                  output transposed for o_proj c t_q a d
    flash / SDPA  q c t_q a d, k and v c t_k max(k, sp) d, output c t_q a d, logsumexp 4 t_q a;
                  o_proj reads the output as a view (sp > 1: the all-to-all in between makes it a
                  second c t_q a d); no s^2 term and no dropout mask (the kernel keeps its seed)

DeBERTa's disentangled attention has no SDPA path (always eager): q and k copies 2 c t h, per
layer the relative embeddings after dropout n R h and its mask m R h, for c2p a copy of q c t h,
the relative keys expanded over the batch c b h R and the gather index 8 s^2, for p2c the same
with k and the relative queries; v1 also keeps both gathered score terms c S each; the softmax
keeps its bool mask b s^2 and output c S, then dropout, v and the output as above; v2 keeps one
more copy of k for p2c (c t h).

MLP (f wide; t tokens): SwiGLU silu(gate) * up keeps gate, silu(gate), up, the product 4 c t f;
non-gated GELU keeps its input and output 2 c t f; gelu_new 5 c t f (x, tanh, 0.5 x, 1 + tanh and
the output); ReLU its output c t f; T5's inner dropout adds its mask m t f and the dropped value
c t f; T5's gated-gelu keeps gelu_new's 4, its output, wi_1's output, then the dropout.

Mixture of experts (transformers' grouped experts; t tokens, x routed each): the router's fp32
softmax 4 t E, the top-x indices 8 t x, the token order (two int64 sorts and the scatter index)
24 t x, the expert counts 4 E, the dispatched tokens c t x h, gate and up c t x 2f, silu and
product 2 c t x f, the routing weights c t x, the experts' outputs c t x h (weighted after).

Checkpointing keeps each block's input (n t h) and what the blocks share (RoPE tables, T5's
relative position bias); everything outside the blocks is saved as usual; backward rebuilds one
block at a time (the largest, for the recomputation peak).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from dsl.engine.modeldesc.traits import Traits

Items = list[tuple[str, int]]


@dataclass(frozen=True)
class Sizes:
    """Element sizes of one configuration (the module docstring's c, n, m, l)."""

    c: int
    n: int
    casts: bool = False
    """Autocast over fp32 parameters: every matmul casts (and saves) its input in c."""
    accelerator: bool = True

    def mask(self, elem: int) -> int:
        return 1 if self.accelerator else elem

    @property
    def stat(self) -> int:
        return 4 if self.accelerator else self.n


@dataclass(frozen=True)
class Dims:
    """The dimensions the formulas read (a DescribedShape's, engine/modeldesc/shape.py)."""

    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    ffn: int
    vocab: int
    experts: int = 0
    experts_per_tok: int = 0
    expert_ffn: int = 0
    traits: Traits = field(default_factory=Traits)


@dataclass
class Saved:
    """What one forward saves: per block group (count, items of one block), the rest, and what
    checkpointing keeps instead of the blocks."""

    blocks: list[tuple[str, int, Items]] = field(default_factory=list)
    outside: Items = field(default_factory=list)
    checkpoint_inputs: Items = field(default_factory=list)
    """Under checkpointing: the blocks' inputs and what they share (they replace `blocks`)."""

    def total(self, checkpointing: bool = False) -> int:
        if checkpointing:
            return sum(b for _, b in self.outside) + sum(b for _, b in self.checkpoint_inputs)
        return sum(b for _, b in self.outside) + sum(n * sum(b for _, b in items) for _, n, items in self.blocks)

    @property
    def largest_block(self) -> int:
        return max((sum(b for _, b in items) for _, n, items in self.blocks if n), default=0)


def norm(kind: str, t: int, width: int, z: Sizes) -> Items:
    """What a norm over t rows of `width` saves (the module docstring's table)."""
    tw = t * width
    if kind in ("rms", "t5"):
        out = [("norm fp32 input", 4 * tw), ("norm rstd", 4 * t), ("norm normalised", z.n * tw)]
        if kind == "t5" and z.n != 4:  # in fp32 the fp32 input is the input
            out.append(("norm input", z.n * tw))
        return out
    if kind == "gemma":
        return [("norm fp32 input", 4 * tw), ("norm rstd", 4 * t), ("norm normalised fp32", 4 * tw),
                ("norm 1 + weight fp32", 4 * width)]
    if kind == "deberta":
        return [("norm x - mean", 4 * tw), ("norm std", 4 * t), ("norm normalised", 4 * tw),
                ("norm cast", z.n * tw)]
    return [("norm input", z.n * tw), ("norm mean, rstd", 2 * z.stat * t)]


def matmul_input(what: str, elements: int, z: Sizes, consumers: int, elem: int | None = None) -> Items:
    """A tensor saved by the matmuls that read it (once; under autocast, one cast per matmul)."""
    out = [(what, (elem or z.n) * elements)]
    if z.casts:
        out.append((f"{what}: {consumers} autocast cast(s)", consumers * z.c * elements))
    return out


def attention(dims: Dims, z: Sizes, *, b: int, s_q: int, s_k: int, sp: int, flash: bool) -> Items:
    """q/k/v .. o_proj input of one attention (module docstring), per rank."""
    tr = dims.traits
    a, k, d, c = dims.heads, dims.kv_heads, dims.head_dim, z.c
    t_q, t_k = b * s_q // sp, b * s_k // sp
    if flash:
        out = [("q", c * t_q * a * d), ("k, v", 2 * c * t_k * max(k, sp) * d), ("attention output", c * t_q * a * d),
               ("logsumexp", 4 * t_q * a)]
        if sp > 1:
            out.append(("o_proj input (after the all-to-all)", c * t_q * a * d))
        return out
    scores = b * a * s_q * s_k // sp
    out = [("q", c * t_q * a * d), ("k, v (a heads)", 2 * c * t_k * a * d)]
    if tr.softmax_fp32:
        out.append(("softmax fp32", 4 * scores))
        if c != 4:
            out.append(("softmax cast", c * scores))
    else:
        out.append(("softmax", c * scores))
    if tr.attention_dropout:
        out += [("attention dropout mask", z.mask(c) * scores), ("dropped probabilities", c * scores)]
    out.append(("o_proj input", c * t_q * a * d))
    return out


def mlp(dims: Dims, z: Sizes, t: int, width: int, *, inner_dropout: float = 0.0) -> Items:
    """The MLP's saved tensors past its input (module docstring), t tokens, `width` wide."""
    tr, c = dims.traits, z.c
    tf = t * width
    act = {"silu": 1, "gelu": 1, "gelu_tanh": 1, "gelu_new": 4, "relu": 1}[tr.activation]
    if tr.gated:
        out = [("activation", act * c * tf), ("activation output, up", 2 * c * tf)]
        last = ("product", c * tf)
    elif tr.activation == "relu":
        out, last = [], ("relu output", c * tf)
    else:
        out, last = [("activation", act * c * tf)], ("activation output", c * tf)
    if inner_dropout:  # the down projection saves the dropped value instead (ReLU still keeps its output)
        kept = [last] if tr.activation == "relu" and not tr.gated else []
        return out + kept + [("inner dropout mask", z.mask(c) * tf), ("dropped", c * tf)]
    return out + [last]


def moe(dims: Dims, z: Sizes, t: int) -> Items:
    """A mixture-of-experts MLP past its input: routing buffers and the routed tokens' MLPs."""
    e, x, h, f, c = dims.experts, min(dims.experts_per_tok, dims.experts), dims.hidden, dims.expert_ffn, z.c
    routed = t * x
    out = [("router softmax fp32", 4 * t * e), ("top-x indices", 8 * routed), ("token order", 24 * routed),
           ("expert counts", 4 * e), ("dispatched tokens", c * routed * h), ("gate, up", 2 * c * routed * f),
           ("silu, product", 2 * c * routed * f), ("expert outputs", c * routed * h)]
    if dims.traits.norm_topk:  # renormalised top-x: their fp32 values and sum, the weights stay fp32
        out += [("top-x values, sum", 4 * routed + 4 * t), ("routing weights fp32", 4 * routed)]
    else:
        out.append(("routing weights", c * routed))
    if dims.traits.shared_expert:
        shared = Dims(h, dims.heads, dims.kv_heads, dims.head_dim, dims.traits.shared_expert, dims.vocab,
                      traits=dims.traits)
        out += [(f"shared expert {n}", v) for n, v in mlp(shared, z, t, shared.ffn)]
        out += [("shared expert gate", c * t)]
    return out


def decoder(dims: Dims, z: Sizes, *, b: int, s: int, sp: int, flash: bool, layers: int, moe_layers: int,
            tiled_mlp: bool = False) -> Saved:
    """A causal LM (Llama-style or GPT-style), per rank."""
    tr = dims.traits
    h, a, k, d = dims.hidden, dims.heads, dims.kv_heads, dims.head_dim
    t = b * s // sp
    drop = z.mask(z.n) * t * h if tr.hidden_dropout else 0
    qkv = 1 if tr.fused_qkv else 3
    attn = norm(tr.norm, t, h, z) + matmul_input("q/k/v input (norm output)", t * h, z, qkv)
    if tr.qk_norm:
        attn += [(f"q_norm {n}", v) for n, v in norm("rms", t * a, d, Sizes(z.c, z.c, False, z.accelerator))]
        attn += [(f"k_norm {n}", v) for n, v in norm("rms", t * max(k, 1), d, Sizes(z.c, z.c, False, z.accelerator))]
    attn += attention(dims, z, b=b, s_q=s, s_k=s, sp=sp, flash=flash)
    if drop:
        attn.append(("attention output dropout mask", drop))
    mlp_in = norm(tr.norm, t, h, z) + matmul_input("mlp input (norm output)", t * h, z, 2 if tr.gated else 1)
    if tr.parallel == 1:  # one norm feeds attention and MLP: its output is saved once (casts per matmul)
        mlp_in = [(w, v) for w, v in mlp_in if "cast" in w]
    elif tr.parallel == 2:  # a second norm of the same input: the input itself is not saved again
        mlp_in = [(w, v) for w, v in mlp_in if w not in ("norm input", "norm fp32 input")]
    tail = [("mlp output dropout mask", drop)] if drop else []
    dense = attn + mlp_in + ([] if tiled_mlp else mlp(dims, z, t, dims.ffn)) + tail
    sparse = attn + mlp_in + moe(dims, z, t) + tail
    saved = Saved(blocks=[("dense blocks", layers - moe_layers, dense), ("mixture-of-experts blocks", moe_layers, sparse)])
    saved.outside = [("token ids", 8 * t)]
    shared: Items = []
    if tr.rope:
        shared = [("RoPE cos, sin", 2 * z.n * (s // sp) * (tr.rotary_dim or d))]
    else:
        saved.outside.append(("position ids", 8 * (s // sp)))
    if drop:
        saved.outside.append(("embedding dropout mask", drop))
    saved.outside += shared + norm(tr.norm, t, h, z) + matmul_input("lm_head input (final norm output)", t * h, z, 1)
    saved.checkpoint_inputs = [("block inputs", layers * z.n * t * h)]
    if tr.rope:  # handed to every block (without RoPE they are saved by the position embedding)
        saved.checkpoint_inputs.append(("position ids", 8 * (s // sp)))
    if not flash:  # eager attention is handed a materialised causal mask
        saved.checkpoint_inputs.append(("causal mask (b, 1, s, s)", z.n * b * s * s))
    return saved
