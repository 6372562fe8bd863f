"""The master-weights layout of stages 0-2: 16-bit parameters, a separate fp32 master partition.

With `precision_layout: master` (engine/precision.py) a stage keeps:
- `params_flat` in the compute dtype (bf16/fp16), each `param.data` a view of it, replicated on
  every rank (what forward and backward read: autocast casts no weight);
- `master`: this rank's partition of the fp32 master weights, in shard space (zero/layout.py; at
  stage 0 the shard space is the whole model). The optimizer and the offloads update it through
  `param_piece` / `param_part`; checkpoints read and write it;
- the gradient in fp32: the 16-bit gradient autograd produces for each parameter is added into
  the stage's fp32 buffer (stages 0-1: the full bucket buffer; stage 2: the staging buffer that
  is reduce-scattered into the fp32 partition) and freed at once, so accumulation over
  micro-steps, the reduction, clipping and the overflow check run in fp32 as in the autocast
  layout.

After each update (`publish`), every rank casts its master partition into its slice of
`params_flat`; stages 1-2 then all-gather the 16-bit slices in place (half the bytes of the
autocast layout's fp32 all-gather).

With CPU optimizer offload the master partition lives in host memory (`host=True`, pinned on a
GPU host) and is the offload's own master (engine/offload.py): one copy, updated in place by the
CPU optimizer, cast on its way up into the 16-bit slice. The device then holds only the 16-bit
parameters (and, at stage 2, no gradient partition either: zero/stage2.py).

Initial values: the model's fp32 parameters are flattened and broadcast from rank 0 first, the
master partition is copied from that fp32 buffer, and only then is the buffer cast to 16 bits,
so the master starts from exactly the weights the autocast layout would start from.
"""

from __future__ import annotations

import torch

from dsl.engine import transfer
from dsl.engine.zero import collectives
from dsl.engine.zero.layout import FlatGroup, Layout, rebind_params

__all__ = ["MasterCopy"]


class MasterCopy:
    """This rank's fp32 master partition (shard space) of a stage with 16-bit parameters."""

    def __init__(self, layout: Layout, full32: torch.Tensor, *, host: bool = False, pinned: bool = False) -> None:
        """full32: [layout.full_numel] fp32, every parameter (the flattened, broadcast model).
        `host`: keep the master in host memory (CPU optimizer offload updates it there; page-locked
        when `pinned`), else on full32's device."""
        self.layout = layout
        self.host = host
        if host:
            self.flat = transfer.host_empty(layout.shard_numel, full32.dtype, pinned=pinned)
        else:
            self.flat = torch.empty(layout.shard_numel, dtype=full32.dtype, device=full32.device)
        """[shard_numel] fp32: this rank's partition of every group, back to back."""
        for g in layout.groups:
            lo, hi = layout.part_range(g)
            if host:
                transfer.to_host(self.part(g), full32[g.base + lo : g.base + hi]).wait()
            else:
                self.part(g).copy_(full32[g.base + lo : g.base + hi])

    def part(self, g: FlatGroup) -> torch.Tensor:
        return self.flat[g.shard_offset : g.shard_offset + g.part_numel]

    @staticmethod
    def to_compute(layout: Layout, full32: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """The [full_numel] buffer in `dtype`, every parameter's `.data` rebound to a view of it."""
        flat = full32.to(dtype)
        rebind_params(layout, flat)
        return flat

    def publish(self, params_flat: torch.Tensor, world_size: int) -> None:
        """Cast the master partition into this rank's slice of `params_flat`, then (world_size >
        1) all-gather every group's slices in place."""
        layout = self.layout
        with torch.no_grad():
            last = None
            for g in layout.groups:
                lo, hi = layout.part_range(g)
                mine = params_flat[g.base + lo : g.base + hi]
                if self.host:  # up from host memory, cast on the way (asynchronous when pinned)
                    last = transfer.to_device(mine, self.part(g))
                else:
                    mine.copy_(self.part(g))
            if last is not None:  # the next update rewrites the master: the copies must be done
                last.wait()
            if world_size == 1:
                return
            works = []
            for g in layout.groups:
                lo, hi = layout.part_range(g)
                works.append(collectives.all_gather(params_flat[g.base : g.base + g.padded],
                                                    params_flat[g.base + lo : g.base + hi]))
            for work in works:
                work.wait()
