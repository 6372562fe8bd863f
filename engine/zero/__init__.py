"""ZeRO stages of the bundled engine, one module each (its docstring states its communication plan).

| stage | parameters | gradients | optimizer states | gradient collective |
|---|---|---|---|---|
| 0 (stage0.py) | replicated | replicated | replicated | all_reduce per bucket, last micro-step |
| 1 (stage1.py) | replicated | replicated + partition | partitioned | reduce_scatter per bucket, last micro-step; all_gather after the update |
| 2 (stage2.py) | replicated | partitioned | partitioned | reduce_scatter per bucket, every micro-step; all_gather after the update |
| 3 (stage3.py) | partitioned | partitioned | partitioned | all_gather per module in forward and backward; reduce_scatter per module, every micro-step |

layout.py holds the flat-buffer/partition arithmetic they share, base.py the backward counting
and the interface the engine drives, collectives.py the reduce-scatter and all-gather (on gloo
built from point-to-point messages and broadcasts, which are several times faster there). world_size 1 runs the same code with one partition.
"""

from __future__ import annotations

import torch
from torch import nn

from dsl.engine.zero.base import ZeroStage

__all__ = ["build_stage", "ZeroStage"]


def build_stage(
    stage: int,
    module: nn.Module,
    named: list[tuple[str, nn.Parameter]],
    *,
    bucket_bytes: int,
    grad_accum: int,
    world_size: int,
    rank: int,
    dtype: torch.dtype,
    device: torch.device,
    work_dtype: torch.dtype | None = None,
    compute_dtype: torch.dtype | None = None,
    host_states: bool = False,
    pinned: bool = False,
    stage3: dict | None = None,
) -> ZeroStage:
    """The stage object; it converts the parameters to `dtype` and takes over their storage.
    Stage 3 hands the model its gathered parameters in `work_dtype` when given (stage3.py);
    stages 0-2 hold them in `compute_dtype` when given, next to an fp32 master partition (the
    master-weights layout, zero/master.py). `host_states` (CPU/NVMe optimizer offload): the master
    partition and, at stages 2-3, the gradient partition live in host memory (page-locked when
    `pinned`); see zero/base.py. `stage3`: stage 3's own settings (stage3.py: parameter offload
    cpu/nvme and its folder, gather granularity, live cap, prefetch budget)."""
    common = dict(grad_accum=grad_accum, world_size=world_size, rank=rank, dtype=dtype, device=device,
                  host_states=host_states, pinned=pinned)
    if stage == 3:
        from dsl.engine.zero.stage3 import Stage3

        return Stage3(module, work_dtype=work_dtype, **(stage3 or {}), **common)
    if stage == 2:
        from dsl.engine.zero.stage2 import Stage2

        return Stage2(named, bucket_bytes=bucket_bytes, compute_dtype=compute_dtype, **common)
    if stage == 1:
        from dsl.engine.zero.stage1 import Stage1

        return Stage1(named, bucket_bytes=bucket_bytes, compute_dtype=compute_dtype, **common)
    from dsl.engine.zero.stage0 import Stage0

    return Stage0(named, bucket_bytes=bucket_bytes, compute_dtype=compute_dtype, **common)
