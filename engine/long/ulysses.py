"""Ulysses sequence parallelism: all-to-alls that turn a sequence shard into a head shard and back.

On each of the sp ranks of an SP group (groups.py), attention receives q, k, v for its own
T/sp tokens and all heads, already rotated by RoPE at the shard's true positions:

    q [B, a, T/sp, d], k, v [B, k, T/sp, d]
      --all_to_all (seq -> head)-->  q [B, a/sp, T, d], k, v [B, max(k/sp, 1), T, d]
      scaled_dot_product_attention(causal) over the full sequence, locally
      y [B, a/sp, T, d] --all_to_all (head -> seq)--> y [B, T/sp, a*d]  (o_proj's input)

Grouped-query attention: when sp divides the kv heads k, rank j receives kv heads
[j*k/sp, (j+1)*k/sp), exactly those its query heads [j*a/sp, (j+1)*a/sp) read. When k < sp (and
k divides sp), each kv head is first repeated sp/k times (`repeat_interleave`, whose backward
sums the copies' gradients), so rank j receives kv head j // (sp/k). degrees.py refuses others.

Communication plan (per layer, per micro-batch, on the SP group; c = bytes per element):
- forward: 3 `all_to_all_single` (q, k, v: seq -> head) and 1 (attention output: head -> seq);
- backward: the same 4 in the opposite directions (the gradient of a permutation is its inverse:
  `SeqToHead.backward` is a head -> seq all-to-all and vice versa).
Each rank sends (sp-1)/sp of its piece: q and the output B*(T/sp)*a*d*c bytes each, k and v
B*(T/sp)*max(k, sp)*d*c each. With sp == 1 (or no group) both directions are the identity and no
collective runs.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as tdist

from dsl.engine.sdpa import causal_sdpa

__all__ = ["seq_to_head", "head_to_seq", "ulysses_attention"]


def _group_size(group: Any) -> int:
    return 1 if group is None else tdist.get_world_size(group)


def _seq_to_head(x: torch.Tensor, group: Any) -> torch.Tensor:
    """[B, H, T/sp, d] (all heads, my tokens) -> [B, H/sp, T, d] (my heads, all tokens)."""
    sp = _group_size(group)
    if sp == 1:
        return x
    b, h, t, d = x.shape
    # Piece j (heads [j*H/sp, (j+1)*H/sp)) goes to rank j; piece i received holds shard i's tokens.
    send = x.reshape(b, sp, h // sp, t, d).transpose(0, 1).contiguous()  # [sp, B, H/sp, T/sp, d]
    recv = torch.empty_like(send)
    tdist.all_to_all_single(recv, send, group=group)
    return recv.permute(1, 2, 0, 3, 4).reshape(b, h // sp, sp * t, d)


def _head_to_seq(x: torch.Tensor, group: Any) -> torch.Tensor:
    """[B, H/sp, T, d] (my heads, all tokens) -> [B, H, T/sp, d] (all heads, my tokens)."""
    sp = _group_size(group)
    if sp == 1:
        return x
    b, hl, t, d = x.shape
    # Piece j (tokens of shard j) goes to rank j; piece i received holds head group i.
    send = x.reshape(b, hl, sp, t // sp, d).permute(2, 0, 1, 3, 4).contiguous()  # [sp, B, H/sp, T/sp, d]
    recv = torch.empty_like(send)
    tdist.all_to_all_single(recv, send, group=group)
    # Laid out as [B, T/sp, H, d] (one copy), so the caller's transpose + reshape into o_proj's
    # [B, T/sp, H*d] input is a view.
    return recv.permute(1, 3, 0, 2, 4).reshape(b, t // sp, sp * hl, d).transpose(1, 2)


class _SeqToHead(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, group: Any) -> torch.Tensor:
        ctx.group = group
        return _seq_to_head(x, group)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return _head_to_seq(grad.contiguous(), ctx.group), None


class _HeadToSeq(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, group: Any) -> torch.Tensor:
        ctx.group = group
        return _head_to_seq(x, group)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return _seq_to_head(grad.contiguous(), ctx.group), None


def seq_to_head(x: torch.Tensor, group: Any) -> torch.Tensor:
    """Autograd-aware all-to-all: [B, H, T/sp, d] -> [B, H/sp, T, d] over `group`."""
    if _group_size(group) == 1:
        return x
    return _SeqToHead.apply(x, group)


def head_to_seq(x: torch.Tensor, group: Any) -> torch.Tensor:
    """Autograd-aware all-to-all: [B, H/sp, T, d] -> [B, H, T/sp, d] over `group`."""
    if _group_size(group) == 1:
        return x
    return _HeadToSeq.apply(x, group)


def ulysses_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, group: Any) -> torch.Tensor:
    """Causal attention of a sequence shard: q [B, a, T/sp, d], k, v [B, kv, T/sp, d] -> the
    output for the shard's tokens, [B, T/sp, a*d] (o_proj's input). RoPE is applied by the caller
    at the shard's positions. With `group` None this is plain causal attention."""
    sp = _group_size(group)
    b, a, t, d = q.shape
    kv = k.shape[1]
    if kv < sp:  # replicate each kv head sp/kv times so that every rank receives one
        k = k.repeat_interleave(sp // kv, dim=1)
        v = v.repeat_interleave(sp // kv, dim=1)
    q, k, v = seq_to_head(q, group), seq_to_head(k, group), seq_to_head(v, group)
    y = causal_sdpa(q, k, v)  # query head h reads kv head h // (a / kv)
    y = head_to_seq(y, group)  # [B, a, T/sp, d]
    return y.transpose(1, 2).reshape(b, t, a * d)
