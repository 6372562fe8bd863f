"""Tiled MLP: the SwiGLU MLP run over token chunks, each recomputed in backward.

`tiled_swiglu(x [..., h], gate_w [f, h], up_w [f, h], down_w [h, f], chunk_tokens)` equals
`down(silu(gate(x)) * up(x))`, but the f-wide intermediates (gate, up, silu(gate), their
product: 4 x c x tokens x f bytes, the largest activations of a layer when f ~ 3.5 h) exist for
one chunk of `chunk_tokens` tokens at a time:

- forward runs each chunk without recording autograd (no_grad) and saves only x (the
  post-attention norm's output, which the untiled MLP keeps too) and the weights (parameters);
- backward, chunk by chunk: recompute the chunk's MLP with autograd on (under the autocast state
  of the forward), `torch.autograd.grad` it against the chunk's output gradient, write d x for
  the chunk and add the chunk's weight gradients into fp32 accumulators. The weight gradients
  are returned once, as the function's outputs, so a parameter's gradient hook (ZeRO stages
  2-3 reduce when it fires) runs once per backward, not once per chunk.

Cost: one more MLP forward per step. No communication. This is Arctic Long Sequence Training's
TiledMLP (Bekman et al. 2025) with the weights passed explicitly.
"""

from __future__ import annotations

import contextlib

from typing import Any

import torch
import torch.nn.functional as F

__all__ = ["tiled_swiglu", "swiglu"]


def swiglu(x: torch.Tensor, gate_w: torch.Tensor, up_w: torch.Tensor, down_w: torch.Tensor) -> torch.Tensor:
    """down(silu(gate(x)) * up(x)) with explicit weights (the untiled reference)."""
    return F.linear(F.silu(F.linear(x, gate_w)) * F.linear(x, up_w), down_w)


class _TiledSwiGLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, gate_w: torch.Tensor, up_w: torch.Tensor, down_w: torch.Tensor,
                chunk: int, autocast: tuple[bool, torch.dtype]) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1])
        outs = []
        with torch.no_grad(), _autocast(x.device.type, *autocast):
            for start in range(0, flat.shape[0], chunk):
                outs.append(swiglu(flat[start:start + chunk], gate_w, up_w, down_w))
        ctx.save_for_backward(x, gate_w, up_w, down_w)
        ctx.chunk, ctx.autocast = chunk, autocast
        return torch.cat(outs).reshape(*x.shape[:-1], -1)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[Any, ...]:
        x, gate_w, up_w, down_w = ctx.saved_tensors
        weights = (gate_w, up_w, down_w)
        flat = x.detach().reshape(-1, x.shape[-1])
        grad = grad.reshape(-1, grad.shape[-1])
        grad_x = torch.empty_like(flat)
        grad_w = [torch.zeros(w.shape, dtype=torch.float32, device=w.device) for w in weights]
        enabled, dtype = ctx.autocast
        for start in range(0, flat.shape[0], ctx.chunk):
            piece = flat[start:start + ctx.chunk].requires_grad_(True)
            with torch.enable_grad(), _autocast(x.device.type, enabled, dtype):
                w = [t.detach().requires_grad_(True) for t in weights]
                out = swiglu(piece, *w)
                # a scalar to differentiate, not grad_outputs: torch.autograd.grad given a gradient
                # tensor imports torch.fx's symbolic shapes (sympy, mpmath: 12 MiB of modules that
                # stay resident); d(sum(out * g))/d out = g exactly
                scalar = (out * grad[start:start + ctx.chunk]).sum()
            d_piece, *d_w = torch.autograd.grad(scalar, (piece, *w))
            grad_x[start:start + ctx.chunk] = d_piece
            for acc, d in zip(grad_w, d_w):
                acc += d
        return (grad_x.reshape(x.shape), *(g.to(w.dtype) for g, w in zip(grad_w, weights)), None, None)


def _autocast(device_type: str, enabled: bool, dtype: torch.dtype | None):
    """The forward's autocast state again (nothing on a device without autocast)."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type, dtype=dtype, enabled=enabled)


def tiled_swiglu(x: torch.Tensor, gate_w: torch.Tensor, up_w: torch.Tensor, down_w: torch.Tensor,
                 chunk_tokens: int) -> torch.Tensor:
    """SwiGLU over chunks of `chunk_tokens` tokens of x [..., h] (see the module docstring)."""
    if chunk_tokens < 1:
        raise ValueError(f"chunk_tokens must be >= 1, got {chunk_tokens}")
    dev = x.device.type
    # A device without autocast (meta, in tests/unit/test_meta_device.py) computes in x's dtype.
    autocast = ((torch.is_autocast_enabled(dev), torch.get_autocast_dtype(dev))
                if torch.amp.is_autocast_available(dev) else (False, None))
    return _TiledSwiGLU.apply(x, gate_w, up_w, down_w, chunk_tokens, autocast)
