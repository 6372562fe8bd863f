"""The model the bundled engine trains: a Llama-style decoder built from `ModelConfig`.

    tokens [B, T] int64
      -> embed_tokens                                   [B, T, hidden]
      -> num_hidden_layers x DecoderLayer:
           x = x + self_attn(input_layernorm(x))        RMSNorm -> GQA causal attention with RoPE
           x = x + mlp(post_attention_layernorm(x))     RMSNorm -> SwiGLU (gate, up, down)
      -> norm (RMSNorm) -> lm_head                       [B, T, vocab_size]

No biases and no dropout: every forward is deterministic, so ranks that start from the same
weights stay comparable, activation checkpointing recomputes exactly what it dropped, and tests
compare a distributed step with a single-process one exactly.

Parameter names are Hugging Face's `LlamaForCausalLM` names without the `model.` prefix
(`embed_tokens`, `layers.N.self_attn.q_proj`, `layers.N.mlp.gate_proj`, `norm`, `lm_head`), and
RoPE uses HF's "rotate_half" layout (dimension i is paired with i + head_dim/2), so an HF Llama
state dict maps onto this model by renaming keys alone.

Attention is `F.scaled_dot_product_attention(is_causal=True)` through engine/sdpa.py: with fewer
key/value heads than query heads (grouped-query attention) it shares each key/value head among
`heads / kv_heads` query heads, by `enable_gqa=True` where that keeps a flash kernel and by
repeating the heads where it would not (fp32 on CUDA; see engine/sdpa.py).

Dtypes: parameters are fp32 (the engine keeps fp32 masters). Under bf16 autocast the matmuls run
in bf16, while RMSNorm, the RoPE angles and the loss are computed in fp32; the residual stream
stays fp32 (embedding output fp32 + bf16 branch outputs promote to fp32). At ZeRO stage 3 under
bf16/fp16 the engine hands the model bf16/fp16 parameters (engine/precision.py) and sets
`residual_dtype` to fp32, so the embedding output, and with it the residual stream, is fp32
there too.

Initialisation (GPT-2 / Llama practice): N(0, 0.02) for every matrix and the embedding, the two
residual output projections of each layer (`o_proj`, `down_proj`) N(0, 0.02 / sqrt(2 * layers))
so the residual stream does not grow with depth, RMSNorm gains 1. Callers seed torch before
building the model (`torch.manual_seed(TrainConfig.seed)`) to get the same weights on every rank.

Activation checkpointing (`Llama(cfg, activation_checkpointing=True)` or setting the attribute):
each decoder layer runs under `torch.utils.checkpoint.checkpoint(use_reentrant=False)`, so
backward keeps only each layer's input [B, T, hidden] (plus the shared RoPE tables) and
recomputes the layer's internals (attention, the 3 x ffn_size-wide MLP activations) when its
gradient is needed: about one extra forward of the layers per step, for a fraction of the
activation memory. Losses and gradients are bitwise those of the plain forward.

Long-context switches (engine/long/; the engine sets them from its config, `long.setup.apply`):
- `Attention.sequence_group`: a process group of sp ranks (Ulysses). Each rank then holds T/sp
  tokens of every sequence (pass their `positions`, so RoPE rotates by the true positions), and
  attention all-to-alls to full-sequence head shards and back (engine/long/ulysses.py).
- `SwiGLU.chunk_tokens`: run the MLP over token chunks, recomputed per chunk in backward
  (engine/long/tiled_mlp.py).
- `Llama.loss_chunk_tokens`: the loss over token chunks, never holding the full
  [tokens, vocab] logits (engine/long/tiled_loss.py).
- `Llama.activation_offload`: with activation checkpointing, each layer's saved input lives in
  host memory (engine/long/act_offload.py).
Every switch keeps losses and gradients equal to the plain path (up to summation order).
"""

from __future__ import annotations

import contextlib
import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from dsl.engine.long.tiled_loss import tiled_cross_entropy
from dsl.engine.long.tiled_mlp import tiled_swiglu
from dsl.engine.long.ulysses import ulysses_attention
from dsl.engine.sdpa import causal_sdpa
from dsl.engine.train_config import ModelConfig

__all__ = ["Llama", "GPT", "RMSNorm", "Attention", "SwiGLU", "DecoderLayer", "rope_tables", "apply_rope"]


class RMSNorm(nn.Module):
    """y = x / sqrt(mean(x^2) + eps) * weight over the last axis, computed in fp32.

    x: [..., dim] any float dtype -> same shape and dtype as x (times the fp32 weight, so the
    result is fp32 whenever x is). The fp32 upcast is what HF Llama does: a bf16 mean of squares
    loses the small components of wide vectors.
    """

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        normed = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return normed.type_as(x) * self.weight


def rope_tables(
    positions: torch.Tensor, head_dim: int, theta: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of the rotary angles, fp32, for `apply_rope`.

    positions: [T] or [B, T] integer positions (any offsets; a sequence-parallel shard passes
    its own). Returns (cos, sin), each [T, head_dim] for [T] positions or [B, 1, T, head_dim] for
    [B, T] positions (the 1 broadcasts over heads). Frequency j (< head_dim/2) is
    theta^(-2j/head_dim); columns j and j + head_dim/2 carry the same angle (rotate_half layout).
    """
    inv_freq = theta ** (
        -torch.arange(0, head_dim, 2, dtype=torch.float32, device=positions.device) / head_dim
    )
    angles = positions.to(torch.float32)[..., None] * inv_freq  # [..., T, head_dim/2]
    angles = torch.cat((angles, angles), dim=-1)  # [..., T, head_dim]
    if positions.dim() == 2:
        angles = angles.unsqueeze(1)  # [B, 1, T, head_dim]
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x: [B, heads, T, head_dim] by the angles of `rope_tables` (same shape and dtype as x).

    Pairs (x[..., i], x[..., i + head_dim/2]) are rotated by angle_i: the dot product of a query
    rotated at position m with a key rotated at position n then depends on m - n only.
    """
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos.to(x.dtype) + rotated * sin.to(x.dtype)


class Attention(nn.Module):
    """Grouped-query causal self-attention with RoPE: [B, T, hidden] -> [B, T, hidden]."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.heads = cfg.num_attention_heads
        self.kv_heads = cfg.kv_heads
        self.head_dim = cfg.head_dim
        hidden = cfg.hidden_size
        self.q_proj = nn.Linear(hidden, self.heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(hidden, self.kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(hidden, self.kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.heads * self.head_dim, hidden, bias=False)
        self.sequence_group: object | None = None
        """Ulysses: the sequence-parallel process group x's tokens are split over (None: no split)."""

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        # [B, T, heads * head_dim] -> [B, heads, T, head_dim]
        q = self.q_proj(x).view(b, t, self.heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(b, t, self.kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, t, self.kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if self.sequence_group is not None:
            return self.o_proj(ulysses_attention(q, k, v, self.sequence_group))
        y = causal_sdpa(q, k, v)  # query head h reads kv head h // (heads / kv_heads)
        return self.o_proj(y.transpose(1, 2).reshape(b, t, self.heads * self.head_dim))


class SwiGLU(nn.Module):
    """down(silu(gate(x)) * up(x)): [B, T, hidden] -> [B, T, hidden], inner width ffn_size."""

    def __init__(self, hidden: int, ffn_size: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(hidden, ffn_size, bias=False)
        self.up_proj = nn.Linear(hidden, ffn_size, bias=False)
        self.down_proj = nn.Linear(ffn_size, hidden, bias=False)
        self.chunk_tokens: int | None = None
        """Tiled MLP: tokens per chunk (None: one pass over all tokens)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.chunk_tokens is not None:
            return tiled_swiglu(x, self.gate_proj.weight, self.up_proj.weight, self.down_proj.weight,
                                self.chunk_tokens)
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    """Pre-norm block: x + attn(norm(x)), then x + mlp(norm(x)). [B, T, hidden] -> same."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = SwiGLU(cfg.hidden_size, cfg.ffn_size)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin)
        return x + self.mlp(self.post_attention_layernorm(x))


class Llama(nn.Module):
    """Llama-style decoder.

    `forward(tokens, targets=None, *, positions=None)`:
    - tokens: [B, T] int64 token ids, T <= seq_len.
    - targets: [B, T] int64 next-token ids, or None.
    - positions: [T] or [B, T] int64 RoPE positions; default 0..T-1. A sequence-parallel rank
      passes its shard's positions (engine/data.py `TokenBatches.positions`).
    Returns logits [B, T, vocab_size] (fp32; bf16 under bf16 autocast) without targets, else the
    mean cross entropy over all B*T positions (a 0-dim fp32 tensor, also under autocast).
    """

    def __init__(self, cfg: ModelConfig, *, activation_checkpointing: bool = False) -> None:
        super().__init__()
        self.cfg = cfg
        self.activation_checkpointing = activation_checkpointing
        """Recompute each decoder layer in backward instead of keeping its activations."""
        self.loss_chunk_tokens: int | None = None
        """Tiled loss: tokens per chunk of the cross entropy (None: the full logits at once)."""
        self.activation_offload: object | None = None
        """An engine.long.act_offload.ActivationOffload: checkpointed inputs live in host memory."""
        self.residual_dtype: torch.dtype | None = None
        """dtype the embedding output (the start of the residual stream) is cast to; None: the
        embedding weight's."""
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            # One Parameter used twice: parameters() lists it once, autograd sums both uses.
            self.lm_head.weight = self.embed_tokens.weight
        self._init_weights()

    def _init_weights(self) -> None:
        residual_std = 0.02 / math.sqrt(2 * self.cfg.num_hidden_layers)
        # named_parameters() lists a tied weight once, so it is drawn once.
        for name, param in self.named_parameters():
            if isinstance(self.get_submodule(name.rpartition(".")[0]), RMSNorm):
                nn.init.ones_(param)
            elif name.endswith(("o_proj.weight", "down_proj.weight")):
                nn.init.normal_(param, std=residual_std)
            else:
                nn.init.normal_(param, std=0.02)

    def forward(
        self,
        tokens: torch.Tensor,
        targets: torch.Tensor | None = None,
        *,
        positions: torch.Tensor | None = None,
    ) -> torch.Tensor:
        t = tokens.shape[1]
        if t > self.cfg.seq_len:
            raise ValueError(f"sequence of {t} tokens is longer than seq_len ({self.cfg.seq_len})")
        if positions is None:
            positions = torch.arange(t, device=tokens.device)
        cos, sin = rope_tables(positions, self.cfg.head_dim, self.cfg.rope_theta)
        x = self.embed_tokens(tokens)
        if self.residual_dtype is not None:
            x = x.to(self.residual_dtype)
        recompute = self.activation_checkpointing and torch.is_grad_enabled()
        offload = self.activation_offload if recompute else None
        if offload is not None:
            offload.begin_forward()
        for layer in self.layers:
            if recompute:
                # preserve_rng_state=False: a layer draws no random numbers (no dropout), so
                # stashing the RNG state per layer would be wasted work. Adding dropout needs it.
                with offload.hooks() if offload is not None else contextlib.nullcontext():
                    x = checkpoint(layer, x, cos, sin, use_reentrant=False, preserve_rng_state=False)
            else:
                x = layer(x, cos, sin)
        if targets is not None and self.loss_chunk_tokens is not None:
            hidden = self.norm(x)
            return tiled_cross_entropy(hidden.flatten(0, 1), self.lm_head.weight, targets.flatten(),
                                       self.loss_chunk_tokens)
        logits = self.lm_head(self.norm(x))
        if targets is None:
            return logits
        # fp32 log-softmax: under bf16 autocast the logits are bf16, whose 8-bit mantissa would
        # make the loss (and its gradient) visibly noisy.
        return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())

    def num_params(self) -> int:
        """Distinct parameters (a tied embedding counts once)."""
        return sum(p.numel() for p in self.parameters())


GPT = Llama
"""The engine's model under its former name (the engine's own tests build `GPT(cfg)`)."""
