"""Causal scaled-dot-product attention with grouped-query heads, on the kernel that fits.

`causal_sdpa(q, k, v)`: q [B, a, T, d], k and v [B, kv, T, d] with kv dividing a -> [B, a, T, d];
query head h reads key/value head h // (a / kv).

Which kernel runs matters for memory: the flash and memory-efficient kernels keep O(T) bytes per
head, the math fallback materialises the whole T x T score matrix (engine/memory.py assumes the
former). With fewer kv heads than query heads, `enable_gqa=True` shares each kv head without
copying it, but on CUDA only the flash kernel takes `enable_gqa`, and flash has no fp32: fp32
GQA would fall back to the math kernel. There the kv heads are repeated instead
(`expand_kv(...)` is True), which costs one [B, a, T, d] copy of k and v per layer and lets the
memory-efficient kernel run. On the CPU (its flash kernel takes fp32 and enable_gqa) and for
16-bit dtypes on CUDA, enable_gqa is used.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["causal_sdpa", "expand_kv"]

# enable_gqa arrived in torch 2.5 (pyproject allows 2.4).
_SDPA_HAS_GQA = torch.torch_version.TorchVersion(torch.__version__) >= (2, 5)


def expand_kv(device_type: str, dtype: torch.dtype) -> bool:
    """Repeat kv heads before SDPA (rather than `enable_gqa`) for tensors of this device/dtype."""
    if not _SDPA_HAS_GQA:
        return True
    return device_type == "cuda" and dtype == torch.float32


def causal_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Causal attention; see the module docstring for shapes and the kernel choice."""
    heads, kv_heads = q.shape[1], k.shape[1]
    if heads == kv_heads:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)
    if expand_kv(q.device.type, q.dtype):
        group = heads // kv_heads
        k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)
    return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
