"""Tiled (chunked) cross entropy: the mean next-token loss without the full tokens x vocab logits.

`tiled_cross_entropy(hidden [N, h], weight [V, h], targets [N], chunk_tokens)` equals
`F.cross_entropy((hidden @ weight.T).float(), targets)` (the model's untiled loss: fp32
log-softmax of logits computed in the autocast dtype, when autocast is on), but

- forward runs the chunks of `chunk_tokens` rows one after the other and keeps only the loss
  sum: for a chunk, logits [chunk, V] in the compute dtype, upcast to fp32, logsumexp minus
  the target logit; nothing per chunk is saved for backward;
- backward recomputes each chunk's logits and turns them into that chunk's gradient at once:
  d logits = (softmax - onehot(target)) x grad / N, then d hidden[chunk] = d logits @ W and
  d W += d logits^T @ hidden[chunk] (accumulated in fp32).

Saved for backward: hidden, weight and targets (hidden is the final norm's output, which the
untiled loss keeps too, and weight is the parameter itself, so neither is extra). Gone: the fp32
log-softmax output (4 N V bytes) and, under autocast, the 16-bit copies of hidden and of the
weight. Peak extra memory: one chunk's logits, probabilities and their cast (~12 B x chunk x V)
instead of ~12 B x N x V (engine/memory.py `logits`). Cost: one more [N, h] x [h, V] matmul
(the recomputed logits), as the paper's recipe (Wijmans et al. 2024, "Cut Your Losses in
Large-Vocabulary Language Models"; Arctic Long Sequence Training's TiledFusedLogitsLoss).

Every target counts (no ignore_index: the bundled data has no padding); a target of -100 is an
error here, where F.cross_entropy would skip it.

No communication. Under sequence parallelism each rank's loss is the mean over its own tokens
(the shift of targets happened before the sequence was split, engine/data.py).
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch

__all__ = ["tiled_cross_entropy", "reference_cross_entropy"]


def _compute_dtype(t: torch.Tensor) -> torch.dtype:
    # A device without autocast (meta, in tests/unit/test_meta_device.py) computes in t's dtype.
    if torch.amp.is_autocast_available(t.device.type) and torch.is_autocast_enabled(t.device.type):
        return torch.get_autocast_dtype(t.device.type)
    return t.dtype


class _TiledCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                chunk: int, dtype: torch.dtype) -> torch.Tensor:
        n = hidden.shape[0]
        w = weight.to(dtype)
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for start in range(0, n, chunk):
            logits = (hidden[start:start + chunk].to(dtype) @ w.t()).float()  # [chunk, V]
            tgt = targets[start:start + chunk]
            total += (torch.logsumexp(logits, -1) - logits.gather(1, tgt[:, None]).squeeze(1)).sum()
            del logits
        ctx.save_for_backward(hidden, weight, targets)
        ctx.chunk, ctx.dtype = chunk, dtype
        return total / n

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[Any, ...]:
        hidden, weight, targets = ctx.saved_tensors
        n, chunk, dtype = hidden.shape[0], ctx.chunk, ctx.dtype
        w = weight.to(dtype)
        grad_hidden = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) \
            if ctx.needs_input_grad[1] else None
        scale = grad.float() / n
        for start in range(0, n, chunk):
            h = hidden[start:start + chunk].to(dtype)
            logits = (h @ w.t()).float()
            probs = torch.softmax(logits, -1)
            del logits
            probs[torch.arange(probs.shape[0], device=probs.device), targets[start:start + chunk]] -= 1.0
            d_logits = (probs * scale).to(dtype)  # [chunk, V]
            del probs
            if grad_hidden is not None:
                grad_hidden[start:start + chunk] = (d_logits @ w).to(hidden.dtype)
            if grad_weight is not None:
                grad_weight += (d_logits.t() @ h).float()
        if grad_weight is not None:
            grad_weight = grad_weight.to(weight.dtype)
        return grad_hidden, grad_weight, None, None, None


def tiled_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                        chunk_tokens: int) -> torch.Tensor:
    """Mean cross entropy of logits hidden @ weight.T against targets, chunk by chunk.

    hidden: [N, h] (fp32, or any float dtype); weight: [V, h]; targets: [N] int64. Returns a 0-dim
    fp32 tensor. Under autocast the logits are computed in the autocast dtype, as the untiled
    `lm_head` would, and the log-softmax in fp32.
    """
    if chunk_tokens < 1:
        raise ValueError(f"chunk_tokens must be >= 1, got {chunk_tokens}")
    dtype = _compute_dtype(hidden)
    dev = hidden.device.type
    with torch.autocast(dev, enabled=False) if torch.amp.is_autocast_available(dev) else contextlib.nullcontext():
        return _TiledCrossEntropy.apply(hidden, weight, targets, chunk_tokens, dtype)


def reference_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The untiled loss `tiled_cross_entropy` must equal (the model's plain path)."""
    logits = torch.nn.functional.linear(hidden, weight)
    return torch.nn.functional.cross_entropy(logits.float(), targets)
