"""The fused Adam/AdamW step in plain PyTorch: the definition the C++ and Triton kernels match.

One step over flat buffers of n elements (every tensor 1-D, contiguous, same device):

    inputs   grad [n] fp32 | bf16 | fp16 (optionally multiplied by a loss scale)
             param [n] fp32 (the master weights), exp_avg [n] fp32, exp_avg_sq [n] fp32
    outputs  param, exp_avg, exp_avg_sq (in place); param_lp [n] bf16 | fp16 (optional copy)

Per element, in fp32, every operation rounded once (no fused multiply-add), in this order:

    g  = float(grad) * inv_scale                       inv_scale = fp32(1 / grad_scale)
    AdamW (decoupled):  p = p * decay                  decay = fp32(1 - lr * weight_decay)
    Adam  (L2):         g = g + wd * p
    m  = b1 * m + (1 - b1) * g
    v  = b2 * v + ((1 - b2) * g) * g
    p  = p - (step_size * m) / (sqrt(v) * inv_bc2_sqrt + eps)
                step_size = lr / (1 - b1**step), inv_bc2_sqrt = 1 / sqrt(1 - b2**step)
    lp = p rounded to nearest even in bf16/fp16

The scalar coefficients are computed in float64 and rounded to fp32 once (`coefficients`); every
backend uses the same fp32 values, so the CPU kernel equals this reference bit for bit, and the
Triton kernel does too under the interpreter (on a GPU within a few ulp: the compiler may
contract multiply-adds).

Differences from `torch.optim.AdamW`: torch divides by sqrt(bias correction 2) per element and
uses lerp for exp_avg; the results differ by a few fp32 ulp per step (tests: rtol 1e-6 on the
parameters after several steps).

Non-finite gradients: with `check_finite` the gradient is scanned first; if it holds inf or nan
nothing is written and the step reports `True` (skipped), like `torch.amp.GradScaler`'s
found_inf.

Memory: the reference works on chunks of `CHUNK` elements, so its temporaries stay small whatever n.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

import torch

__all__ = ["Coefficients", "coefficients", "adam_step_reference", "CHUNK", "GRAD_DTYPES", "LP_DTYPES"]

CHUNK = 1 << 20
"""Elements per chunk of the reference (bounds its temporary memory)."""

GRAD_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
LP_DTYPES = (torch.bfloat16, torch.float16)


def _f32(x: float) -> float:
    """`x` rounded to the nearest fp32 value (as a Python float, exactly representable)."""
    return struct.unpack("f", struct.pack("f", x))[0]


@dataclass(frozen=True)
class Coefficients:
    """The fp32 scalars of one step (each exactly representable in fp32)."""

    decoupled: bool
    """AdamW (weight decay applied to the parameter) rather than Adam (L2 added to the gradient)."""
    inv_scale: float
    wd: float
    decay: float
    b1: float
    one_minus_b1: float
    b2: float
    one_minus_b2: float
    step_size: float
    inv_bc2_sqrt: float
    eps: float

    def as_list(self) -> list[float]:
        """In the order of the C++ `Coef` struct."""
        return [self.inv_scale, self.wd, self.decay, self.b1, self.one_minus_b1, self.b2,
                self.one_minus_b2, self.step_size, self.inv_bc2_sqrt, self.eps]


def coefficients(
    *, step: int, lr: float, beta1: float, beta2: float, eps: float, weight_decay: float,
    decoupled: bool, grad_scale: float = 1.0,
) -> Coefficients:
    """fp32 coefficients of step `step` (counting from 1). `grad_scale`: the factor the gradient
    carries (a loss scale, or loss scale / clip coefficient); the step multiplies by its inverse."""
    if step < 1:
        raise ValueError(f"step counts from 1, got {step}")
    if not grad_scale > 0:
        raise ValueError(f"grad_scale must be positive, got {grad_scale}")
    bc1 = 1.0 - beta1**step
    bc2 = 1.0 - beta2**step
    return Coefficients(
        decoupled=decoupled,
        inv_scale=_f32(1.0 / grad_scale),
        wd=_f32(weight_decay),
        decay=_f32(1.0 - lr * weight_decay) if decoupled else 1.0,
        b1=_f32(beta1),
        one_minus_b1=_f32(1.0 - beta1),
        b2=_f32(beta2),
        one_minus_b2=_f32(1.0 - beta2),
        step_size=_f32(lr / bc1),
        inv_bc2_sqrt=_f32(1.0 / bc2**0.5),
        eps=_f32(eps),
    )


def check_buffers(
    param: torch.Tensor, grad: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor,
    param_lp: torch.Tensor | None,
) -> None:
    """Raise ValueError unless the buffers have the documented dtypes, sizes and layout."""
    n = param.numel()
    for name, t in (("param", param), ("exp_avg", exp_avg), ("exp_avg_sq", exp_avg_sq)):
        if t.dtype != torch.float32:
            raise ValueError(f"fused adam: {name} must be float32, got {t.dtype}")
    if grad.dtype not in GRAD_DTYPES:
        raise ValueError(f"fused adam: grad must be one of float32, bfloat16, float16, got {grad.dtype}")
    named = [("param", param), ("grad", grad), ("exp_avg", exp_avg), ("exp_avg_sq", exp_avg_sq)]
    if param_lp is not None:
        if param_lp.dtype not in LP_DTYPES:
            raise ValueError(f"fused adam: param_lp must be bfloat16 or float16, got {param_lp.dtype}")
        named.append(("param_lp", param_lp))
    for name, t in named:
        if t.numel() != n:
            raise ValueError(f"fused adam: {name} has {t.numel()} elements, param has {n}")
        if not t.is_contiguous():
            raise ValueError(f"fused adam: {name} must be contiguous")
        if t.device != param.device:
            raise ValueError(f"fused adam: {name} is on {t.device}, param on {param.device}")


def adam_step_reference(
    param: torch.Tensor, grad: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor,
    coef: Coefficients, *, param_lp: torch.Tensor | None = None, check_finite: bool = True,
) -> bool:
    """One step in place (see the module docstring). Returns True when `check_finite` found inf/nan
    in `grad` (then nothing was written), else False."""
    check_buffers(param, grad, exp_avg, exp_avg_sq, param_lp)
    if check_finite and grad.numel() and not bool(torch.isfinite(grad).all()):
        return True
    c = coef
    with torch.no_grad():
        for lo in range(0, param.numel(), CHUNK):
            hi = min(lo + CHUNK, param.numel())
            g = grad[lo:hi].float() * c.inv_scale
            p = param[lo:hi].clone()
            if c.decoupled:
                p = p * c.decay
            else:
                g = g + p * c.wd
            m = exp_avg[lo:hi] * c.b1 + g * c.one_minus_b1
            v = exp_avg_sq[lo:hi] * c.b2 + (g * c.one_minus_b2) * g
            # torch's fp32 sqrt on CPU is not always correctly rounded (1 ulp off on ~0.7% of
            # random inputs, measured); the fp64 root rounded to fp32 is.
            root = v.double().sqrt().float()
            p = p - (m * c.step_size) / (root * c.inv_bc2_sqrt + c.eps)
            exp_avg[lo:hi] = m
            exp_avg_sq[lo:hi] = v
            param[lo:hi] = p
            if param_lp is not None:
                param_lp[lo:hi] = p
    return False
