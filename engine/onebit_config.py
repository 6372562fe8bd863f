"""Which engine settings 1-bit Adam and the int8 gradient reduce-scatter can run with (torch-free).

Read by engine/validity.py, the rules every entry point checks (so `dsl validate` reports a
located error, the planner never picks a stage 1-bit Adam cannot run when zero_stage is auto,
and every rank re-checks).

1-bit Adam runs at ZeRO stage 0 only. Its compressed all-reduce replaces stage 0's gradient
all-reduce: every rank keeps the full momentum, updates it with its *local* gradient and
all-reduces the momentum in 1 bit (engine/onebit.py). Stages 1-3 partition optimizer states
(and gradients): a rank holds only its partition's momentum, so it cannot compress the full
momentum, and the parameter all_gather after the update would still move fp32 (stage 1-2) or
the gathers of stage 3 would dominate; DeepSpeed's OnebitAdam likewise runs without ZeRO
partitioning. Other limits of this version:
- precision fp32 or bf16 (fp32 master weights): fp16's overflow check relies on every rank
  seeing the all-reduced gradient, which 1-bit Adam no longer all-reduces after warm-up;
- no low_precision_states and no optimizer offload (the update runs on fp32 device buffers).

The int8 quantized reduce-scatter (`comm.quantize_gradients`) applies to the gradient
reduce-scatter of stages 2 and 3 (ZeroStage.reduce_scatter_group); stages 0 and 1 have none.
"""

from __future__ import annotations

from typing import Any

__all__ = ["ONEBIT_STAGES", "QUANTIZED_STAGES", "onebit_reason", "quantize_reason"]

ONEBIT_STAGES = (0,)
"""ZeRO stages 1-bit Adam runs at."""
QUANTIZED_STAGES = (2, 3)
"""ZeRO stages whose gradient reduce-scatter can be int8-quantized."""


def onebit_reason(zero_stage: Any, precision: Any = "fp32", low_precision_states: Any = False,
                  offload_optimizer: Any = "none") -> str | None:
    """Why optimizer.type onebit_adam cannot run with these settings, or None.

    zero_stage "auto" is accepted (the planner then keeps to ONEBIT_STAGES); any other value
    outside ONEBIT_STAGES is refused with the stages that work.
    """
    stages = " or ".join(str(s) for s in ONEBIT_STAGES)
    if zero_stage not in (*ONEBIT_STAGES, "auto", None):
        return (f"optimizer.type onebit_adam works with zero_stage {stages} only (got zero_stage: "
                f"{zero_stage}); its 1-bit momentum all-reduce replaces stage 0's gradient all-reduce, "
                f"and stages 1-3 partition the momentum it compresses. Set zero_stage: {stages}, or "
                f"use optimizer.type adamw for ZeRO stages 1-3")
    if precision == "fp16":
        return ("optimizer.type onebit_adam needs precision fp32 or bf16 (got fp16: its overflow "
                "check needs all-reduced gradients, which 1-bit Adam stops exchanging after freeze_step)")
    if low_precision_states:
        return "optimizer.type onebit_adam keeps fp32 states; set low_precision_states: false"
    if offload_optimizer not in ("none", "auto", None):
        return (f"optimizer.type onebit_adam runs its update on the device; set offload.optimizer: none "
                f"(got {offload_optimizer})")
    return None


def quantize_reason(zero_stage: Any) -> str | None:
    """Why comm.quantize_gradients cannot apply at this stage, or None ("auto" is accepted: the
    quantized path then applies only if the planner picks stage 2 or 3)."""
    if zero_stage in (*QUANTIZED_STAGES, "auto", None):
        return None
    return (f"comm.quantize_gradients quantizes the gradient reduce-scatter of zero_stage 2 or 3 "
            f"only (got zero_stage: {zero_stage}; stage 0's all-reduce and stage 1's reduce-scatter "
            f"stay fp32); set zero_stage: 2 or 3, or quantize_gradients: false")
