"""The model the bundled engine trains: a small GPT-style decoder built from `ModelConfig`.

Token embedding + learned position embedding, `layers` pre-norm blocks (causal self-attention
through `F.scaled_dot_product_attention`, GELU MLP of `ffn_size`), a final LayerNorm and an output
head that shares the token embedding when `tie_word_embeddings` is set. No dropout: every forward is
deterministic, so ranks that start from the same weights stay comparable and tests can compare
a distributed step with a single-process one exactly.

Initialisation follows GPT-2: N(0, 0.02) everywhere, residual output projections scaled by
1/sqrt(2 * layers) so the residual stream does not grow with depth. Callers seed torch before
building the model (`torch.manual_seed(TrainConfig.seed)`) to get the same weights on every rank.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from dsl.engine.train_config import ModelConfig

__all__ = ["GPT"]


class CausalSelfAttention(nn.Module):
    def __init__(self, hidden: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(hidden, 3 * hidden)
        self.proj = nn.Linear(hidden, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [B, T, hidden] -> [B, T, hidden]."""
        b, t, h = x.shape
        # [B, T, 3, heads, head_dim] -> three [B, heads, T, head_dim]
        q, k, v = self.qkv(x).view(b, t, 3, self.heads, h // self.heads).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.proj(y.transpose(1, 2).reshape(b, t, h))


class MLP(nn.Module):
    def __init__(self, hidden: int, ffn_size: int) -> None:
        super().__init__()
        self.fc = nn.Linear(hidden, ffn_size)
        self.proj = nn.Linear(ffn_size, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(F.gelu(self.fc(x)))


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(ln(x)), then x + mlp(ln(x))."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(cfg.hidden_size)
        self.attn = CausalSelfAttention(cfg.hidden_size, cfg.num_attention_heads)
        self.ln2 = nn.LayerNorm(cfg.hidden_size)
        self.mlp = MLP(cfg.hidden_size, cfg.ffn_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class GPT(nn.Module):
    """GPT-style decoder. `forward(tokens[B,T] int64, targets[B,T] int64 | None)`.

    Returns logits [B, T, vocab_size] without targets, else the mean cross entropy over all
    B*T positions (a 0-dim fp32 tensor, also under bf16 autocast).
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.pos_emb = nn.Embedding(cfg.seq_len, cfg.hidden_size)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.num_hidden_layers))
        self.norm = nn.LayerNorm(cfg.hidden_size)
        self.head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.apply(self._init_weights)
        residual_std = 0.02 / math.sqrt(2 * cfg.num_hidden_layers)
        for block in self.blocks:
            nn.init.normal_(block.attn.proj.weight, std=residual_std)
            nn.init.normal_(block.mlp.proj.weight, std=residual_std)
        if cfg.tie_word_embeddings:
            # One Parameter used twice: parameters() lists it once, autograd sums both uses.
            self.head.weight = self.tok_emb.weight

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def forward(self, tokens: torch.Tensor, targets: torch.Tensor | None = None) -> torch.Tensor:
        _, t = tokens.shape
        if t > self.cfg.seq_len:
            raise ValueError(f"sequence of {t} tokens is longer than seq_len ({self.cfg.seq_len})")
        positions = torch.arange(t, device=tokens.device)
        x = self.tok_emb(tokens) + self.pos_emb(positions)
        for block in self.blocks:
            x = block(x)
        logits = self.head(self.norm(x))
        if targets is None:
            return logits
        # fp32 log-softmax: under bf16 autocast the logits are bf16, whose 8-bit mantissa would
        # make the loss (and its gradient) visibly noisy.
        return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())

    def num_params(self) -> int:
        """Distinct parameters (a tied embedding counts once)."""
        return sum(p.numel() for p in self.parameters())
