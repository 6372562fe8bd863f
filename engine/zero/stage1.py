"""ZeRO stage 1: optimizer states (and offloaded master weights) partitioned across ranks.

Holds on every rank: all parameters (flat buffer, `param.data` views, as stage 0), all gradients
(flat bucket buffer, `param.grad` views, as stage 0) plus this rank's partition of the averaged
gradient (`grad_flat`, 1/world_size of the padded total), and the optimizer states of its
partition only. Each bucket is padded to a multiple of world_size and cut into equal partitions;
rank r owns partition r of every bucket (layout.py).

Communication plan
------------------
- At `initialize`: `broadcast` of the flat parameter buffer and module buffers from rank 0.
- During the backward of the *last* micro-step only (the accumulation boundary): a complete
  bucket is divided by `world_size * grad_accum` and an asynchronous reduce-scatter (SUM;
  collectives.py: point-to-point on gloo, whose own reduce_scatter is 2-4x slower) is launched
  from the bucket into this rank's partition of `grad_flat`, in bucket index order, overlapping
  the rest of the backward (same triggers as stage 0). Reduce-scatter moves half the bytes of stage 0's all_reduce; the bucket itself keeps
  this rank's local (unreduced) sum, so `param.grad` is NOT the averaged gradient at stage 1.
- Other micro-steps: no communication; autograd accumulates into the bucket views.
- `engine.step()`: `finish()` waits for the reduce-scatters; one `all_reduce` of [sum of squares,
  overflow flag] (done by the engine) gives the global gradient norm and the fp16 overflow
  decision; the optimizer updates this rank's partition of the parameter buffer in place; then
  `after_update()` launches one asynchronous all-gather per bucket, in place in the parameter
  buffer (collectives.py: on gloo one broadcast per rank of its own slice) and waits for all.
- world_size 1: one partition; the reduce-scatter becomes a copy into `grad_flat` and the
  all_gather is skipped.
"""

from __future__ import annotations

import torch
from torch import nn

from dsl.engine.zero import collectives
from dsl.engine.zero.base import CastBack, nbytes
from dsl.engine.zero.stage0 import Bucket, Stage0

__all__ = ["Stage1"]


class Stage1(Stage0):
    """Stage 0's buckets, reduce-scattered into a partitioned gradient; partitioned optimizer."""

    stage = 1
    partitioned = True

    def __init__(self, named: list[tuple[str, nn.Parameter]], **kwargs) -> None:
        super().__init__(named, **kwargs)
        self._grad_shard = torch.zeros(
            self.layout.shard_numel, dtype=self.grads_full.dtype, device=self.grads_full.device
        )

    def _parts(self) -> int:
        return self.world_size

    @property
    def grad_flat(self) -> torch.Tensor:  # type: ignore[override]
        return self._grad_shard

    def _reduce(self, bucket: Bucket) -> None:
        g = bucket.group
        out = self._grad_shard[g.shard_offset : g.shard_offset + g.part_numel]
        if self.world_size > 1:
            wire = self.wire(bucket.flat)  # comm.reduce_dtype: reduce-scatter a cast copy, cast back
            if wire is bucket.flat:
                bucket.work = collectives.reduce_scatter(out, wire)
            else:
                low = torch.empty(out.numel(), dtype=wire.dtype, device=wire.device)
                bucket.work = CastBack(collectives.reduce_scatter(low, wire), low, out)
            self.collectives_launched += 1
        else:
            out.copy_(bucket.flat)

    def after_update(self) -> None:
        if self.master is not None:  # cast the fp32 partition into the 16-bit slice, all-gather those
            self.master.publish(self.params_flat, self.world_size)
            return
        if self.world_size == 1:
            return
        # In place: this rank's updated partition already sits in its slice of the buffer.
        works = [collectives.all_gather(self.params_flat[g.base : g.base + g.padded], self.param_part(g))
                 for g in self.layout.groups]
        for work in works:
            work.wait()

    def memory(self) -> dict[str, int]:
        master = nbytes(self.master.flat) if self.master is not None else 0
        return {
            "params_bytes": nbytes(self.params_flat),
            "grads_bytes": nbytes(self.grads_full) + nbytes(self._grad_shard),
            "master_bytes": 0 if self.host_master() is not None else master,
            "host_bytes": master if self.host_master() is not None else 0,
        }
