"""Published estimators that dsl's memory model (engine/memory.py) is compared with, kept apart
so the model itself stays one formula per term:

- `deepspeed_estimate`: DeepSpeed 0.19.8's estimate_zero2/zero3_model_states_mem_needs
  (deepspeed/runtime/zero/stage_1_and_2.py and stage3.py; model states only; its CPU figure
  carries a 1.5x `additional_buffer_factor`), with every flag of the estimator: cpu_offload,
  cpu_offload_params, zero_init, additional_buffer_factor. `legacy_zero2_gpu` gives the ZeRO-2
  GPU figure DeepSpeed's memory docs print (memory.rst: 4P + 16P/N; 0.19.8 computes 2P + 18P/N);
- `zero_paper_bytes`: the ZeRO paper's model states per device, (2 + 2 + K) Psi split by stage
  over N_d (Rajbhandari et al. 2020, sec. 5; the table in engine/memory.py's docstring);
- `accelerate_estimate`: accelerate's `estimate-memory` (src/accelerate/commands/estimate.py):
  the model's size in a dtype, its largest layer, and "Training using Adam", the largest of
  model / gradients / optimizer / step for a batch of 1: 16 B/param in float32, 8 B/param in
  float16 (bfloat16 is its float16 row), none for int8/int4;
- `candidate_references`: the three for one planner candidate (`dsl plan --json` gives every
  candidate a `references` object; the text report one line each for the choice);
- `korthikanti_layer_bytes`: Korthikanti et al. 2022's activation formula for one layer.

tests/unit/test_published.py runs the estimator outputs printed by DeepSpeed's and accelerate's
docs (tests/fixtures/published/data_points.yaml) through these functions.
"""

from __future__ import annotations

from typing import Any


def korthikanti_layer_bytes(seq_len: int, micro_batch: int, hidden: int, heads: int) -> int:
    """Korthikanti et al. 2022, eq. (1): s b h (34 + 5 a s / h), a GPT layer, 16-bit, no parallelism."""
    s, b, h, a = seq_len, micro_batch, hidden, heads
    return s * b * h * 34 + 5 * a * s * s * b


def deepspeed_estimate(params: int, largest_layer_params: int, stage: int, *, gpus_per_node: int,
                       nodes: int = 1, offload_optimizer: bool = False, offload_params: bool = False,
                       zero_init: bool = True, additional_buffer_factor: float = 1.5,
                       legacy_zero2_gpu: bool = False) -> dict[str, Any] | None:
    """(cpu_bytes per node, gpu_bytes per GPU) as DeepSpeed's estimate_zero2/zero3_model_states_mem_needs
    compute them, or None for stage 0 (DeepSpeed has no estimator for it). The result names the
    function and carries the flags it was called with."""
    total_gpus = nodes * gpus_per_node
    flags = {"num_gpus_per_node": gpus_per_node, "num_nodes": nodes, "cpu_offload": offload_optimizer,
             "additional_buffer_factor": additional_buffer_factor}
    if stage in (1, 2):
        if offload_optimizer:
            gpu = 2 * params
            cpu = params * max(4 * total_gpus, 16) * additional_buffer_factor
        elif legacy_zero2_gpu:
            gpu = 4 * params + int(16 * params / total_gpus)  # memory.rst's printed tables
            cpu = params * 4 * gpus_per_node * additional_buffer_factor
        else:
            # deepspeed/runtime/zero/stage_1_and_2.py (0.19.8): 2 = 16-bit params; 18 = 16-bit
            # grads 2 + fp32 grads 4 + fp32 params 4 + moments 8, partitioned. (Releases before
            # it used 4P + 16P/N.)
            gpu = 2 * params + int(18 * params / total_gpus)
            cpu = params * 4 * gpus_per_node * additional_buffer_factor
        return {"function": "estimate_zero2_model_states_mem_needs", "flags": flags,
                "cpu_bytes": int(cpu), "gpu_bytes": int(gpu),
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
        flags.update(largest_layer_params=largest_layer_params, cpu_offload_params=offload_params,
                     zero_init=zero_init)
        return {"function": "estimate_zero3_model_states_mem_needs", "flags": flags,
                "cpu_bytes": int(cpu), "gpu_bytes": int(gpu),
                "why_different": "DeepSpeed charges 18P/N (an extra 16-bit parameter partition) plus 4 B x the "
                                 "largest layer on the GPU, multiplies CPU figures by 1.5, and has no activations, "
                                 "logits or buffers"}
    return None


def zero_paper_bytes(params: int, stage: int, shards: int, k: int = 12) -> dict[str, Any]:
    """The ZeRO paper's model states per device: 2 B 16-bit parameters + 2 B 16-bit gradients + K B
    optimizer states (K = 12 for mixed-precision Adam: fp32 master, momentum, variance), stage 1
    partitioning the K term over N_d = `shards`, stage 2 also the gradients, stage 3 also the
    parameters (no offload: the paper's stages are on the device)."""
    n = shards
    per_stage = {0: (4 + k) * params, 1: 4 * params + k * params / n, 2: 2 * params + (2 + k) * params / n,
                 3: (4 + k) * params / n}
    formula = {0: "(2 + 2 + K) Psi", 1: "(2 + 2) Psi + K Psi / N_d", 2: "2 Psi + (2 + K) Psi / N_d",
               3: "(2 + 2 + K) Psi / N_d"}
    return {"stage": stage, "k": k, "n_d": n, "device_bytes": int(per_stage[stage]), "formula": formula[stage]}


ACCELERATE_DTYPES = {"float32": 4.0, "float16": 2.0, "int8": 1.0, "int4": 0.5}
"""Bytes per parameter of accelerate estimate-memory's --dtypes."""


def accelerate_estimate(params: int, largest_layer_params: int, dtype: str) -> dict[str, Any]:
    """accelerate estimate-memory's row for `dtype` (bfloat16 is its float16 row): total and
    largest-layer bytes in that dtype, and "Training using Adam" (None for int8/int4, which
    accelerate prints as N/A). accelerate counts the transformers AutoModel it builds (for a
    decoder that is the backbone without the LM head); dsl passes the model it plans."""
    row = "float16" if dtype == "bfloat16" else dtype
    per = ACCELERATE_DTYPES[row]
    fp32 = 4 * params
    training = {"float32": 4 * fp32, "float16": 2 * fp32}.get(row)  # max(model, grads, optimizer, step)
    return {"dtype": row, "total_bytes": int(params * per), "largest_layer_bytes": int(largest_layer_params * per),
            "training_adam_bytes": training}


def candidate_references(params: int, largest_layer_params: int, *, stage: int, offload_optimizer: str,
                         offload_params: str, gpus_per_node: int, nodes: int, shards: int,
                         precision: str, optimizer: str = "adamw") -> dict[str, Any]:
    """The published estimators for one planner candidate (launcher/planner.py `Plan.to_json`):
    DeepSpeed's (None at stage 0: it has none; nvme offload is called as cpu_offload, the
    estimator's only offload flag), the ZeRO paper's split and accelerate's row for the precision."""
    ds = deepspeed_estimate(params, largest_layer_params, stage, gpus_per_node=gpus_per_node, nodes=nodes,
                            offload_optimizer=offload_optimizer != "none", offload_params=offload_params != "none")
    if ds is not None:
        ds = {k: v for k, v in ds.items() if k != "why_different"}
    k = 8 if optimizer == "sgd" else 12  # SGD: fp32 master + momentum
    return {"deepspeed": ds, "zero_paper": zero_paper_bytes(params, stage, shards, k),
            "accelerate": accelerate_estimate(params, largest_layer_params,
                                              "float32" if precision == "fp32" else "float16")}
