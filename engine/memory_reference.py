"""Published estimators that dsl's memory model (engine/memory.py) is compared with, kept apart
so the model itself stays one formula per term:

- `deepspeed_estimate`: DeepSpeed 0.19.8's estimate_zero2/zero3_model_states_mem_needs (model
  states only; its CPU figure carries a 1.5x `additional_buffer_factor`); `dsl plan` shows it next
  to its own figures where they differ;
- `korthikanti_layer_bytes`: Korthikanti et al. 2022's activation formula for one layer.
"""

from __future__ import annotations

from typing import Any


def korthikanti_layer_bytes(seq_len: int, micro_batch: int, hidden: int, heads: int) -> int:
    """Korthikanti et al. 2022, eq. (1): s b h (34 + 5 a s / h), a GPT layer, 16-bit, no parallelism."""
    s, b, h, a = seq_len, micro_batch, hidden, heads
    return s * b * h * 34 + 5 * a * s * s * b


def deepspeed_estimate(params: int, largest_layer_params: int, stage: int, *, gpus_per_node: int,
                       nodes: int = 1, offload_optimizer: bool = False, offload_params: bool = False,
                       zero_init: bool = True, additional_buffer_factor: float = 1.5) -> dict[str, Any] | None:
    """(cpu_bytes per node, gpu_bytes per GPU) as DeepSpeed's estimate_zero2/zero3_model_states_mem_needs
    compute them, or None for stage 0 (DeepSpeed has no estimator for it)."""
    total_gpus = nodes * gpus_per_node
    if stage in (1, 2):
        if offload_optimizer:
            gpu = 2 * params
            cpu = params * max(4 * total_gpus, 16) * additional_buffer_factor
        else:
            # deepspeed/runtime/zero/stage_1_and_2.py (0.19.8): 2 = 16-bit params; 18 = 16-bit
            # grads 2 + fp32 grads 4 + fp32 params 4 + moments 8, partitioned. (Releases before
            # it used 4P + 16P/N.)
            gpu = 2 * params + int(18 * params / total_gpus)
            cpu = params * 4 * gpus_per_node * additional_buffer_factor
        return {"function": "estimate_zero2_model_states_mem_needs", "cpu_bytes": int(cpu), "gpu_bytes": int(gpu),
                "why_different": "DeepSpeed counts full 16-bit params on every GPU plus 18P/N partitioned (16-bit "
                                 "and fp32 grads, fp32 params, moments: 2P + 18P/N; with offload 2P) and multiplies "
                                 "CPU figures by 1.5; it has no activations, logits or buffers"}
    if stage == 3:
        largest = 4 * largest_layer_params
        gpus_factor = 1 / nodes
        if offload_optimizer:
            if offload_params:
                gpu = largest
                per = 18 * gpus_factor if zero_init else max(4 * gpus_per_node, 18 * gpus_factor)
            else:
                gpu = largest + int(2 * params / total_gpus)
                per = 16 * gpus_factor if zero_init else max(4 * gpus_per_node, 16 * gpus_factor)
            cpu = params * per * additional_buffer_factor
        else:
            gpu = largest + int(18 * params / total_gpus)
            cpu = (largest_layer_params if zero_init else params) * 4 * gpus_per_node * additional_buffer_factor
        return {"function": "estimate_zero3_model_states_mem_needs", "cpu_bytes": int(cpu), "gpu_bytes": int(gpu),
                "why_different": "DeepSpeed charges 18P/N (an extra 16-bit parameter partition) plus 4 B x the "
                                 "largest layer on the GPU, multiplies CPU figures by 1.5, and has no activations, "
                                 "logits or buffers"}
    return None
