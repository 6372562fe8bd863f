"""The fused Adam/AdamW step as Triton kernels (CUDA; tested on CPU under `TRITON_INTERPRET=1`).

Importing this module imports triton: `dsl.ops.adam` imports it only for CUDA tensors (or when a
test asks for backend="triton"). `TRITON_INTERPRET` is read when the kernels are decorated, i.e.
at import time.

Two kernels, launched on a 1-D grid of ceil(n / BLOCK) programs:

1. `_nonfinite_kernel` (only with `check_finite`): each program loads BLOCK gradient elements
   and folds "any inf/nan among them" into one int32 flag with `atomic_max`.
   Reads the gradient once (2 or 4 bytes per element).
2. `_adam_kernel`: each program first loads the flag (when checking); a set flag masks all
   its loads and stores, so a skipped step needs no host round trip; otherwise it loads BLOCK
   elements of grad, param, exp_avg, exp_avg_sq, casts to fp32, applies reference.py's
   per-element math in the same order, and stores param, exp_avg, exp_avg_sq and (optionally)
   the bf16/fp16 copy. 28 bytes per element for fp32 grad without a copy; 28 with bf16 grad and
   a bf16 copy.

Exactness: all arithmetic is fp32 (bf16/fp16 values are cast after loading: the interpreter
computes bf16 arithmetic wrongly), division and square root are the correctly rounded
`div_rn`/`sqrt_rn`, and the launch passes `enable_fp_fusion=False` so that no multiply-add is
contracted: the kernel reproduces the reference bit for bit under the interpreter, and is
meant to on a GPU as well (the GPU tests allow 1 ulp). The bf16 copy is rounded to nearest
even on the fp32 bits (`_bf16_bits_rne`): the interpreter truncates in `.to(tl.bfloat16)`.

No `@triton.autotune`: with more than one config it fails without a GPU (even under the
interpreter). BLOCK is an argument instead: 1024 on a GPU; tests under the interpreter pass a
large BLOCK, because the interpreter's cost is per program.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from dsl.ops.adam.reference import Coefficients, check_buffers

__all__ = ["adam_step_triton", "nonfinite_triton", "DEFAULT_BLOCK", "INTERPRETED"]

INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"
"""True when the kernels below were decorated under the Triton interpreter."""

DEFAULT_BLOCK = 65536 if INTERPRETED else 1024


@triton.jit
def _nonfinite_kernel(g_ptr, flag_ptr, n, BLOCK: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    g = tl.load(g_ptr + offs, mask=offs < n, other=0.0).to(tl.float32)
    # |g| < inf is false for +-inf and for nan.
    bad = tl.where(tl.abs(g) < float("inf"), 0, 1)
    tl.atomic_max(flag_ptr, tl.max(bad, axis=0))


@triton.jit
def _bf16_bits_rne(x):
    """fp32 -> bf16 bits (int16), rounded to nearest even; nan -> 0x7fc0 (as torch). Done on the
    bits because the interpreter truncates in `.to(tl.bfloat16)` whatever rounding is asked."""
    u = x.to(tl.uint32, bitcast=True)
    r = (u + 0x7FFF + ((u >> 16) & 1)) >> 16
    r = tl.where(x != x, 0x7FC0, r)
    return r.to(tl.uint16).to(tl.int16, bitcast=True)


@triton.jit
def _adam_kernel(
    p_ptr, g_ptr, m_ptr, v_ptr, lp_ptr, flag_ptr, n,
    inv_scale, wd, decay, b1, one_minus_b1, b2, one_minus_b2, step_size, inv_bc2_sqrt, eps,
    DECOUPLED: tl.constexpr, LP: tl.constexpr, CHECK: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0).to(tl.int64)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    if CHECK:  # a set flag masks every load and store: the step writes nothing
        mask = mask & (tl.load(flag_ptr + offs * 0) == 0)  # one address, broadcast to the block
    g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32) * inv_scale
    p = tl.load(p_ptr + offs, mask=mask, other=0.0)
    if DECOUPLED:
        p = p * decay
    else:
        g = g + wd * p
    m = b1 * tl.load(m_ptr + offs, mask=mask, other=0.0) + one_minus_b1 * g
    v = b2 * tl.load(v_ptr + offs, mask=mask, other=0.0) + (one_minus_b2 * g) * g
    denom = tl.sqrt_rn(v) * inv_bc2_sqrt + eps
    p = p - tl.div_rn(step_size * m, denom)
    tl.store(m_ptr + offs, m, mask=mask)
    tl.store(v_ptr + offs, v, mask=mask)
    tl.store(p_ptr + offs, p, mask=mask)
    if LP == 1:  # bf16, stored as its int16 bits
        tl.store(lp_ptr + offs, _bf16_bits_rne(p), mask=mask)
    elif LP == 2:
        tl.store(lp_ptr + offs, p.to(tl.float16), mask=mask)


def _grid(n: int, block: int) -> tuple[int]:
    return (triton.cdiv(n, block),)


def nonfinite_triton(t: torch.Tensor, *, block: int | None = None) -> torch.Tensor:
    """int32 [1] on t's device: 1 when `t` holds inf or nan, else 0 (no host synchronisation)."""
    flag = torch.zeros(1, dtype=torch.int32, device=t.device)
    if t.numel():
        b = block or DEFAULT_BLOCK
        _nonfinite_kernel[_grid(t.numel(), b)](t, flag, t.numel(), BLOCK=b)
    return flag


def adam_step_triton(
    param: torch.Tensor, grad: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor,
    coef: Coefficients, *, param_lp: torch.Tensor | None = None, check_finite: bool = True,
    block: int | None = None,
) -> bool:
    """One fused step in place (see the module docstring). Returns True when `check_finite`
    found inf/nan (nothing written); reading that flag synchronises with the device."""
    check_buffers(param, grad, exp_avg, exp_avg_sq, param_lp)
    n = param.numel()
    if n == 0:
        return False
    b = block or DEFAULT_BLOCK
    flag = nonfinite_triton(grad, block=b) if check_finite else param  # param: an unused pointer
    c = coef
    # bf16 copies are written as int16 bits (see _bf16_bits_rne); no copy: an unused pointer.
    lp_kind = 0 if param_lp is None else 1 if param_lp.dtype == torch.bfloat16 else 2
    lp_arg = param if param_lp is None else param_lp.view(torch.int16) if lp_kind == 1 else param_lp
    _adam_kernel[_grid(n, b)](
        param, grad, exp_avg, exp_avg_sq, lp_arg, flag, n,
        c.inv_scale, c.wd, c.decay, c.b1, c.one_minus_b1, c.b2, c.one_minus_b2, c.step_size,
        c.inv_bc2_sqrt, c.eps,
        DECOUPLED=c.decoupled, LP=lp_kind, CHECK=check_finite, BLOCK=b,
        enable_fp_fusion=False,
    )  # fmt: skip
    return bool(flag.item()) if check_finite else False
