"""The optimizer update on flat pieces of parameters: AdamW and SGD with momentum.

The engine keeps parameters, gradients and optimizer states in flat buffers (zero/layout.py) and
updates lists of same-shaped pieces (`Segment`s of this rank's partition) with `update()`:

- AdamW, fp32 parameters and states: dsl's fused Adam (`dsl.ops.adam`, one pass per piece; the
  C++ kernel on CPU tensors, which is also the CPU-offload path, Triton on CUDA tensors). Its
  per-element math is ops/adam/reference.py's; against `torch.optim.AdamW` it differs by a few
  fp32 ulp per step (torch divides by sqrt(bias correction) and lerps exp_avg): tests hold the
  parameters to 1e-6 absolute + 1e-6 relative after 20 steps. The overflow decision is the
  engine's (core.py all-reduces it before any rank updates), so the op runs with
  `check_finite=False`. When the C++ kernel cannot be
  built (`dsl.ops.adam` warns once), on CUDA without triton, and for other dtypes, torch's
  fused kernel (`torch.optim.adamw.adamw` with `fused=True`) runs instead, once for the pieces
  that decay and once for those that do not.
- SGD: `buf = grad` on the first step, then `buf = momentum * buf + grad`; `p -= lr * buf`
  (torch.optim.SGD without dampening/nesterov).
- Weight decay is decoupled for both (`p *= 1 - lr * weight_decay` before the update), applied to
  matrices and embeddings only (the `decay` flag of a piece).
- bf16 parameters and states (`low_precision_states`): `_update_bf16`, see below.

`update_reference` is the plain per-element reference the tests compare against.

Low-precision states (bf16 parameters, bf16 exp_avg/exp_avg_sq or momentum, no fp32 master)
-------------------------------------------------------------------------------------------
bf16 keeps 8 significant bits: a parameter of magnitude |p| only moves when the update exceeds
about |p| * 2**-9, so with round-to-nearest the many small late-training updates (lr * ~1 for
Adam, often 1e-4 relative) are *lost*, and training stalls above the fp32 loss. This engine
rounds the updated parameter *stochastically* (round up with probability equal to the discarded
fraction): each update is kept in expectation, at the cost of noise of one bf16 ulp per step.
The math runs in fp32 per chunk of `_CHUNK` elements (a few extra passes; no persistent fp32
copy), exp_avg/exp_avg_sq round to nearest. The random bits come from a generator seeded by
(seed, step, piece), so a run and its resumed copy round identically. Kahan compensation would
be exact but needs a second bf16 buffer per parameter, which gives back half of the saving.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass

import torch
from torch.optim import adamw as _adamw

from dsl.ops.adam import adam_step_coef, coefficients, cpu_backend, triton_reason

__all__ = ["Hyper", "STATE_NAMES", "update", "update_reference", "stochastic_round_bf16"]

STATE_NAMES = {"adamw": ("exp_avg", "exp_avg_sq"), "sgd": ("momentum_buffer",)}
"""Optimizer state tensors per parameter element, by optimizer type (torch's names)."""

log = logging.getLogger(__name__)

_CHUNK = 1 << 20


@dataclass(frozen=True)
class Hyper:
    """Optimizer hyper-parameters (from `EngineConfig.optimizer`), lr apart."""

    kind: str
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 0.0
    momentum: float = 0.9


def update(
    hyper: Hyper,
    params: list[torch.Tensor],
    grads: list[torch.Tensor],
    states: dict[str, list[torch.Tensor]],
    decay: list[bool],
    *,
    step: int,
    lr: float,
    seed: int = 0,
) -> None:
    """One optimizer step on matching lists of 1-D pieces; `step` counts from 1 (this step).
    Every piece must be on the parameters' device: the fused kernels read raw pointers, so a
    gradient left on the GPU for a CPU update (or the reverse) is refused here, by name."""
    if not params:
        return
    _same_device(params, grads, states)
    if params[0].dtype == torch.bfloat16:
        _update_bf16(hyper, params, grads, states, decay, step=step, lr=lr, seed=seed)
        return
    for want in (True, False):
        idx = [i for i, d in enumerate(decay) if d == want]
        if not idx:
            continue
        wd = hyper.weight_decay if want else 0.0
        ps = [params[i] for i in idx]
        gs = [grads[i] for i in idx]
        if hyper.kind == "adamw" and _fusable(ps, gs, [states[k][i] for k in STATE_NAMES["adamw"] for i in idx]):
            b1, b2 = hyper.betas
            coef = coefficients(step=step, lr=lr, beta1=b1, beta2=b2, eps=hyper.eps, weight_decay=wd, decoupled=True)
            for p, g, i in zip(ps, gs, idx):
                adam_step_coef(p, g, states["exp_avg"][i], states["exp_avg_sq"][i], coef, check_finite=False)
        elif hyper.kind == "adamw":
            # A fresh step tensor per piece: the kernel increments each one it is given.
            steps = [torch.tensor(float(step - 1), dtype=torch.float32, device=ps[0].device) for _ in idx]
            _adamw.adamw(
                ps, gs, [states["exp_avg"][i] for i in idx], [states["exp_avg_sq"][i] for i in idx],
                [], steps, fused=True, amsgrad=False, beta1=hyper.betas[0], beta2=hyper.betas[1],
                lr=lr, weight_decay=wd, eps=hyper.eps, maximize=False,
            )  # fmt: skip
        else:
            for p, g, buf in zip(ps, gs, [states["momentum_buffer"][i] for i in idx]):
                if wd:
                    p.mul_(1 - lr * wd)
                if step == 1:
                    buf.copy_(g)
                else:
                    buf.mul_(hyper.momentum).add_(g)
                p.add_(buf, alpha=-lr)


def _same_device(params: list[torch.Tensor], grads: list[torch.Tensor],
                 states: dict[str, list[torch.Tensor]]) -> None:
    device = params[0].device
    for what, tensors in (("parameter", params), ("gradient", grads), *states.items()):
        for t in tensors:
            if t.device != device:
                raise RuntimeError(f"optimizer update: a {what} piece is on {t.device}, the parameters on "
                                   f"{device}; copy it to {device} first (engine/offload.py does)")


def _fusable(params: list[torch.Tensor], grads: list[torch.Tensor], states: list[torch.Tensor]) -> bool:
    """dsl's fused Adam takes fp32 parameters/states, contiguous pieces, CPU or CUDA (with triton)."""
    if any(t.dtype != torch.float32 or not t.is_contiguous() for t in (*params, *states)):
        return False
    if any(g.dtype not in (torch.float32, torch.bfloat16, torch.float16) or not g.is_contiguous() for g in grads):
        return False
    device = params[0].device.type
    if device == "cuda":
        return _triton_usable()
    # Without the C++ kernel (no compiler) dsl.ops.adam would run its slow reference: torch's
    # fused kernel is the faster stand-in here.
    return device == "cpu" and cpu_backend() == "cpu"


@functools.cache
def _triton_usable() -> bool:
    """dsl's Triton Adam can run here; else torch's fused AdamW runs, after one warning."""
    reason = triton_reason()
    if reason is not None:
        log.warning("fused Triton Adam unavailable, using torch's fused AdamW: %s", reason)
    return reason is None


def stochastic_round_bf16(x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """fp32 -> bf16 rounding up in magnitude with probability (discarded bits) / 2**16.

    Adds uniform 16-bit noise to the fp32 bit pattern and truncates: unbiased, E[result] = x.
    Non-finite values pass through unchanged.
    """
    bits = x.contiguous().view(torch.int32)
    noise = torch.randint(0, 1 << 16, x.shape, dtype=torch.int32, device=x.device, generator=generator)
    rounded = ((bits + noise) & -65536).view(torch.float32)
    rounded = torch.where(torch.isfinite(x), rounded, x)
    return rounded.to(torch.bfloat16)  # exact: the low 16 bits are zero


def _update_bf16(hyper, params, grads, states, decay, *, step, lr, seed) -> None:
    b1, b2 = hyper.betas
    device = params[0].device
    # The meta device (tests/unit/test_meta_device.py runs this math there) has no generator.
    gen = torch.Generator(device=device) if device.type != "meta" else None
    for piece, (p, g, d) in enumerate(zip(params, grads, decay)):
        if gen is not None:
            gen.manual_seed((seed * 1_000_003 + step) * 10_007 + piece)
        wd = hyper.weight_decay if d else 0.0
        for lo in range(0, p.numel(), _CHUNK):
            hi = min(lo + _CHUNK, p.numel())
            p32 = p[lo:hi].float()
            g32 = g[lo:hi].float()
            if wd:
                p32.mul_(1 - lr * wd)
            if hyper.kind == "adamw":
                m = states["exp_avg"][piece][lo:hi]
                v = states["exp_avg_sq"][piece][lo:hi]
                m32 = m.float().lerp_(g32, 1 - b1)
                v32 = v.float().mul_(b2).addcmul_(g32, g32, value=1 - b2)
                denom = (v32 / (1 - b2**step)).sqrt_().add_(hyper.eps)
                p32.addcdiv_(m32, denom, value=-lr / (1 - b1**step))
                m.copy_(m32)
                v.copy_(v32)
            else:
                buf = states["momentum_buffer"][piece][lo:hi]
                b32 = g32.clone() if step == 1 else buf.float().mul_(hyper.momentum).add_(g32)
                p32.add_(b32, alpha=-lr)
                buf.copy_(b32)
            p[lo:hi].copy_(stochastic_round_bf16(p32, gen))


def update_reference(
    hyper: Hyper, p: torch.Tensor, g: torch.Tensor, state: dict[str, torch.Tensor], *, decay: bool, step: int, lr: float
) -> None:
    """Per-element float64 reference of `update` for one piece (tests only)."""
    wd = hyper.weight_decay if decay else 0.0
    p64, g64 = p.double(), g.double()
    p64 *= 1 - lr * wd
    if hyper.kind == "adamw":
        b1, b2 = hyper.betas
        m = state["exp_avg"].double() * b1 + (1 - b1) * g64
        v = state["exp_avg_sq"].double() * b2 + (1 - b2) * g64 * g64
        p64 -= lr / (1 - b1**step) * m / ((v / (1 - b2**step)).sqrt() + hyper.eps)
        state["exp_avg"].copy_(m)
        state["exp_avg_sq"].copy_(v)
    else:
        buf = g64 if step == 1 else state["momentum_buffer"].double() * hyper.momentum + g64
        p64 -= lr * buf
        state["momentum_buffer"].copy_(buf)
    p.copy_(p64)
