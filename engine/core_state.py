"""`Engine.state_summary()` (engine/core.py): the bytes one rank holds now, by term, read from the
ZeRO stage's and the optimizer states' buffers (engine/zero/, engine/offload.py) and, on CUDA, the
allocator. engine/core.py binds this function as the Engine method.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from dsl.engine import transfer

if TYPE_CHECKING:
    from dsl.engine.core import Engine


def state_summary(self: Engine) -> dict[str, int]:
    """Bytes this rank holds now, by term (each exact, from the buffers' storage sizes):

    - params_bytes: parameter storage: stages 0-2 the padded flat buffer of all parameters;
      stage 3 this rank's padded partition plus the units gathered right now (none between
      steps); plus frozen parameters. Under bf16/fp16 (not low_precision_states) the buffer
      or partition holds the fp32 master weights, and stage 3 adds the partition's
      compute-dtype working copy, the dtype its gathered units have (precision.py).
    - grads_bytes: stage 0 the flat gradient buffer; stage 1 that plus this rank's gradient
      partition; stages 2-3 the partition plus staging buffers alive now (none between
      steps; up to zero.stage2.MAX_IN_FLIGHT buckets/units during backward).
    - optimizer_states_bytes: optimizer states on the device (AdamW: exp_avg + exp_avg_sq;
      SGD: momentum) over this rank's padded partition, allocated at initialize (none with
      offload), plus under the master-weights layout at stages 0-2 the fp32 master
      partition the stage keeps on the device (zero/master.py; with offload too).
    - activations_bytes: distinct storages autograd saved for backward during the last
      forward of the module (saved_tensors_hooks), excluding parameter and buffer storage;
      includes autocast's low-precision weight copies (stages 0-2) and saved inputs.
      Measured only while `measure_activations` is on, which this call switches on: 0 until
      a forward runs after the first `state_summary()` (or after setting
      `measure_activations = True`).
    - total_bytes: the sum of the four above (device memory for model state + activations).
    - offload_cpu_bytes: CPU memory of offloaded master weights, states and buffers.
    - offload_nvme_bytes: bytes in NVMe offload files.
    - On a CUDA device also what the allocator saw: `device_allocated_bytes` /
      `device_reserved_bytes` now and `device_peak_allocated_bytes` /
      `device_peak_reserved_bytes` since the process started or the last
      `torch.cuda.reset_peak_memory_stats()` (read after a synchronize; the reserved figures
      include the caching allocator's free blocks, what an out-of-memory error is about).
    Activation checkpoints moved to host memory (engine.activation_offload) are not in
    activations_bytes; `module.activation_offload.offloaded_bytes` has them.
    Module buffers are not counted.
    """
    self.measure_activations = True
    mem = self.stage.memory()
    frozen = sum(p.untyped_storage().nbytes() for p in self.module.parameters() if not p.requires_grad)
    st = self.states.memory()
    out = {
        "params_bytes": mem["params_bytes"] + frozen,
        "grads_bytes": mem["grads_bytes"],
        # The master layout's fp32 master partition on the device (stages 0-2) counts here.
        "optimizer_states_bytes": st["optimizer_states_bytes"] + mem.get("master_bytes", 0),
        "activations_bytes": self._activation_bytes,
    }
    out["total_bytes"] = sum(out.values())
    out["offload_cpu_bytes"] = st["offload_cpu_bytes"] + mem.get("host_bytes", 0)
    out["offload_nvme_bytes"] = st["offload_nvme_bytes"] + mem.get("nvme_bytes", 0)
    if self.device.type == "cuda":
        transfer.wait_device(self.device)
        out["device_allocated_bytes"] = torch.cuda.memory_allocated(self.device)
        out["device_reserved_bytes"] = torch.cuda.memory_reserved(self.device)
        out["device_peak_allocated_bytes"] = torch.cuda.max_memory_allocated(self.device)
        out["device_peak_reserved_bytes"] = torch.cuda.max_memory_reserved(self.device)
    return out
