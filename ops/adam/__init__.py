"""Fused Adam/AdamW over flat buffers: one pass reads the gradient (fp32/bf16/fp16, optionally
loss-scaled), the fp32 master weights and both moments, and writes master, moments and an
optional bf16/fp16 copy of the parameters.

    found_inf = adam_step(param, grad, exp_avg, exp_avg_sq, step=t, lr=lr,
                          weight_decay=0.1, grad_scale=loss_scale, param_lp=param_bf16)

Backends (`backend="auto"` picks by the tensors' device):
- `cpu` (CPU tensors): vectorised C++ built on first use (cpu.py; the offload path);
- `triton` (CUDA tensors): Triton kernels (triton_adam.py; triton is imported only here).
  Triton builds a small C launcher with the host's C compiler at its first launch, so
  `triton_reason()` names what is missing (triton itself, or a C compiler: $CC, cc, gcc or
  clang on PATH) before a kernel is tried; `auto` then runs the reference on CUDA tensors;
  the engine (engine/optim.py) uses torch's fused AdamW instead, with one warning;
- `reference`: plain PyTorch (reference.py), the definition the others equal bit for bit.
If the C++ build fails, `auto` logs one warning with the cause and runs the reference instead
(same numbers, slower); `DSL_ADAM_CPU=reference` skips the build on purpose.

inf/nan, decided: *detect first, write nothing*. With `check_finite=True` (default) the
gradient is scanned before anything is written (one extra read of the gradient: 2 bytes per
element for bf16, 4 for fp32); on inf/nan the call writes nothing and returns True, so the
caller just counts the step as skipped (and lowers its loss scale). Returning a flag from the
update pass itself (DeepSpeed style) would leave the states already overwritten. A caller that
has decided already (the engine: the flag must agree across ranks, so it is all-reduced before
any rank updates) passes `check_finite=False` and moves no extra bytes.
"""

from __future__ import annotations

import logging
import os

import torch

from dsl.ops.adam.reference import Coefficients, adam_step_reference, coefficients

__all__ = ["adam_step", "adam_step_coef", "coefficients", "Coefficients", "cpu_backend", "triton_reason",
           "BACKENDS"]

log = logging.getLogger(__name__)

BACKENDS = ("auto", "cpu", "triton", "reference")

_cpu_state: dict[str, str] = {}


def cpu_backend() -> str:
    """"cpu" when the C++ kernel is built and loaded, else "reference" (warned once)."""
    if "backend" not in _cpu_state:
        if os.environ.get("DSL_ADAM_CPU", "").lower() == "reference":
            _cpu_state["backend"] = "reference"
        else:
            from dsl.ops.adam import cpu

            try:
                cpu.load()
                _cpu_state["backend"] = "cpu"
            except cpu.BuildError as e:
                log.warning("fused CPU Adam unavailable, using the (slower, same-result) reference: %s",
                            str(e).splitlines()[0])
                _cpu_state["backend"] = "reference"
    return _cpu_state["backend"]


def triton_reason() -> str | None:
    """Why the Triton kernels cannot run on this host (None: they can). Cached per process."""
    if "triton" not in _cpu_state:
        _cpu_state["triton"] = _find_triton_blocker() or ""
    return _cpu_state["triton"] or None


def _find_triton_blocker() -> str | None:
    import importlib.util
    import shutil

    if importlib.util.find_spec("triton") is None:
        return "triton is not installed (pip install triton; CUDA builds of torch bring it)"
    compilers = [c for c in (os.environ.get("CC", ""), "cc", "gcc", "clang") if c]
    if not any(shutil.which(c) for c in compilers):
        return ("no C compiler for Triton's launcher (looked for $CC, cc, gcc, clang on PATH; "
                "apt install gcc)")
    return None


def adam_step_coef(
    param: torch.Tensor, grad: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor,
    coef: Coefficients, *, param_lp: torch.Tensor | None = None, check_finite: bool = True,
    backend: str = "auto",
) -> bool:
    """`adam_step` with precomputed coefficients (one `coefficients()` per step for many pieces)."""
    if backend not in BACKENDS:
        raise ValueError(f"adam backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    if backend == "auto":
        device = param.device.type
        if device == "cuda":
            backend = "triton" if triton_reason() is None else "reference"
        else:
            backend = cpu_backend() if device == "cpu" else "reference"
    if backend == "cpu":
        from dsl.ops.adam.cpu import adam_step_cpu

        return adam_step_cpu(param, grad, exp_avg, exp_avg_sq, coef, param_lp=param_lp, check_finite=check_finite)
    if backend == "triton":
        from dsl.ops.adam.triton_adam import adam_step_triton

        return adam_step_triton(param, grad, exp_avg, exp_avg_sq, coef, param_lp=param_lp, check_finite=check_finite)
    return adam_step_reference(param, grad, exp_avg, exp_avg_sq, coef, param_lp=param_lp, check_finite=check_finite)


def adam_step(
    param: torch.Tensor, grad: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor, *,
    step: int, lr: float, beta1: float = 0.9, beta2: float = 0.999, eps: float = 1e-8,
    weight_decay: float = 0.0, decoupled: bool = True, grad_scale: float = 1.0,
    param_lp: torch.Tensor | None = None, check_finite: bool = True, backend: str = "auto",
) -> bool:
    """One Adam (decoupled=False: L2 added to the gradient) or AdamW step in place.

    param, exp_avg, exp_avg_sq: [n] fp32, contiguous; grad: [n] fp32/bf16/fp16 carrying a factor
    `grad_scale` (divided out); param_lp: optional [n] bf16/fp16 receiving the new parameters.
    `step` counts from 1 (bias correction). Returns True when `check_finite` found inf/nan in the
    gradient, in which case nothing was written.
    """
    coef = coefficients(step=step, lr=lr, beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay,
                        decoupled=decoupled, grad_scale=grad_scale)
    return adam_step_coef(param, grad, exp_avg, exp_avg_sq, coef, param_lp=param_lp,
                          check_finite=check_finite, backend=backend)
