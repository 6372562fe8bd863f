"""1-bit sign compression with error feedback: the primitives of the compressed all-reduce.

Compression of x [n] (fp32) in blocks of `block` elements (a multiple of 8; n a multiple of it):

- per block, scale s = mean(|x|): the s that minimises ||x - s * sign(x)||_2 (DeepSpeed's 1-bit
  Adam uses ||x||_2 / sqrt(c) per chunk, which over-estimates the magnitude; mean |x| is the
  least-squares choice). Blocks (256 elements in 1-bit Adam, see allreduce.DEFAULT_BLOCK) rather
  than one scale per rank's chunk: a model's momentum mixes tensors whose magnitudes differ by
  orders of magnitude, and one scale for all of them sends the small ones as large values
  (measured on the tiny model, 1 process, 60 steps, freeze_step 15: final loss 3.90 with one
  scale for everything, 2.82 with blocks of 1024, against 2.41 for AdamW);
- bit i = the sign bit of x_i (1: negative, -0.0 included), packed 8 per byte, least significant
  bit first (`numpy.packbits(bitorder="little")`): byte k holds elements 8k..8k+7;
- on the wire: n / 8 bytes of bits + 4 bytes per block, against 4n bytes of fp32:
  1/32 + 1/block of the fp32 bytes (1/28.4 at block 256).

Decompression: x_hat_i = -s if bit i else +s (s of i's block).

Error feedback (Seide et al. 2014; 1-bit Adam, Tang et al. 2021): the caller keeps an error
buffer e per compressed tensor, compresses x + e instead of x, and keeps e <- (x + e) - x_hat for
the next call. What compression drops is delayed, not lost: summed over T calls, the
decompressed outputs equal the summed inputs minus the last error buffer, so the running mean of
the outputs converges to that of the inputs at rate O(1/T).

Two implementations with identical bits: the fused C kernels of native.py (two passes over the
data; used when they build) and the torch code here (the reference; `native=False`).
`pack_bits` packs with one int64 multiplication per 8 bits (an exact bit-gather, no carries);
`pack_bits_reference` / `unpack_bits_reference` are the plain per-bit versions.
"""

from __future__ import annotations

import functools

import sys

import torch

from dsl.ops.comm.native import kernels

if sys.byteorder != "little":  # pragma: no cover - the int64 trick reads bytes in memory order
    raise ImportError("dsl.ops.comm.signs assumes a little-endian machine")

__all__ = [
    "pack_bits",
    "unpack_bits",
    "pack_bits_reference",
    "unpack_bits_reference",
    "compress_",
    "decompress_into",
    "decompress",
    "compressed_nbytes",
    "native_available",
]

# Multiplying a little-endian int64 whose 8 bytes are each 0 or 1 (b_i in byte i) by
# M = sum_i 2**(56 - 7i) puts b_i at bit 56 + i: the products b_i * 2**(8i + 56 - 7j) land on
# distinct bits (8i - 7j is unique for i, j < 8), so nothing carries, and only i == j lands in
# bits 56..63 (the rest is below or overflows). The top byte is then the packed byte.
_GATHER = 0x0102040810204080


def native_available() -> bool:
    """True when the fused C kernels built and loaded (native.py)."""
    return kernels() is not None


def pack_bits(bits: torch.Tensor) -> torch.Tensor:
    """bool [n] (n a multiple of 8) -> uint8 [n / 8], LSB first: bit j of byte k is bits[8k + j]."""
    if bits.numel() % 8:
        raise ValueError(f"pack_bits needs a multiple of 8 bits, got {bits.numel()}")
    words = bits.contiguous().view(torch.uint8).view(torch.int64)
    return (words * _GATHER).view(torch.uint8)[7::8].clone()


@functools.cache
def _shifts_on(device: torch.device) -> torch.Tensor:
    """[0..7] as uint8 on `device`, made there once (not copied from the host at every call)."""
    return torch.arange(8, dtype=torch.uint8, device=device)


def unpack_bits(packed: torch.Tensor) -> torch.Tensor:
    """uint8 [m] -> bool [8m]; the inverse of `pack_bits`."""
    shifts = _shifts_on(packed.device)
    return packed.reshape(-1, 1).bitwise_right_shift(shifts).bitwise_and_(1).view(torch.bool).reshape(-1)


def pack_bits_reference(bits: torch.Tensor) -> torch.Tensor:
    """Plain version of `pack_bits` (tests only)."""
    b = bits.reshape(-1, 8).to(torch.int64)
    return (b * (1 << torch.arange(8, dtype=torch.int64))).sum(dim=1).to(torch.uint8)


def unpack_bits_reference(packed: torch.Tensor) -> torch.Tensor:
    """Plain version of `unpack_bits` (tests only)."""
    return torch.tensor([bool((byte >> k) & 1) for byte in packed.tolist() for k in range(8)], dtype=torch.bool)


def compressed_nbytes(numel: int, block: int) -> int:
    """Bytes of `numel` elements compressed in blocks of `block`: the bits plus an fp32 scale per block."""
    return numel // 8 + 4 * (numel // block)


def _ptr(t: torch.Tensor) -> int:
    return t.data_ptr()


def _use_native(native: bool | None, *tensors: torch.Tensor) -> bool:
    if native is False:
        return False
    ok = all(t.device.type == "cpu" and t.is_contiguous() for t in tensors) and kernels() is not None
    if native and not ok:
        raise RuntimeError("the native 1-bit kernels are not available for these tensors")
    return ok


def compress_(x: torch.Tensor | None, error: torch.Tensor, block: int, *,
              native: bool | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Sign-compress x + error in blocks of `block` elements, with error feedback.

    x: fp32 [n] or None (compress `error` itself); error: fp32 [n], n % block == 0,
    block % 8 == 0; updated in place to (x + error) - decompress(result).
    Returns (packed uint8 [n / 8], scales fp32 [n / block]). `native`: None = the C kernels when
    they are available, False = torch, True = the C kernels or an error.
    Without error feedback pass `error=x.clone()` and x=None.
    """
    n = error.numel()
    if error.dtype != torch.float32 or block % 8 or block <= 0 or n % block:
        raise ValueError(f"compress_ needs fp32 [n] with n % block == 0 and block % 8 == 0, got "
                         f"{error.dtype} n={n} block={block}")
    if x is not None and x.numel() != n:
        raise ValueError(f"x has {x.numel()} elements, error {n}")
    packed = torch.empty(n // 8, dtype=torch.uint8, device=error.device)
    scales = torch.empty(n // block, dtype=torch.float32, device=error.device)
    if n == 0:
        return packed, scales
    if _use_native(native, error, *(() if x is None else (x,))):
        kernels().dsl_compress_blocks(None if x is None else _ptr(x), _ptr(error), n, block,
                                      _ptr(scales), _ptr(packed))
        return packed, scales
    e = error.view(-1, block)
    if x is not None:
        e.add_(x.reshape(-1, block).float())  # e now holds x + e; it becomes the residual below
    scales.copy_(e.abs().sum(dim=1).div_(block))
    bits = torch.signbit(e)
    packed.copy_(pack_bits(bits.reshape(-1)))
    s = scales.unsqueeze(1)
    e.sub_(torch.where(bits, -s, s))
    return packed, scales


def decompress_into(packed: torch.Tensor, scales: torch.Tensor, block: int, out: torch.Tensor, *,
                    weight: float = 1.0, accumulate: bool = False, native: bool | None = None) -> torch.Tensor:
    """out (fp32 [n]) = (or +=) weight x (+-scale of its block) for the first n bits of packed."""
    n = out.numel()
    if n > 8 * packed.numel() or -(-n // block) > scales.numel():
        raise ValueError(f"{packed.numel()} bytes / {scales.numel()} scales cannot fill {n} values")
    if n == 0:
        return out
    if _use_native(native, packed, scales, out):
        kernels().dsl_decompress_blocks(_ptr(packed), _ptr(scales), n, block, float(weight), _ptr(out),
                                        int(accumulate))
        return out
    bits = unpack_bits(packed.reshape(-1)[: (n + 7) // 8])[:n]
    s = (scales[: -(-n // block)].float() * weight).repeat_interleave(block)[:n]
    values = torch.where(bits, -s, s)
    if accumulate:
        out.add_(values.view_as(out))
    else:
        out.copy_(values.view_as(out))
    return out


def decompress(packed: torch.Tensor, scales: torch.Tensor, block: int, *, native: bool | None = None) -> torch.Tensor:
    """packed uint8 [n / 8], scales fp32 [n / block] -> fp32 [n] of +-scale."""
    out = torch.empty(8 * packed.numel(), dtype=torch.float32, device=packed.device)
    return decompress_into(packed, scales, block, out, native=native)
