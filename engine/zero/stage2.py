"""ZeRO stage 2: gradients and optimizer states partitioned; no full-gradient buffer is kept.

Holds on every rank: all parameters (flat buffer, `param.data` views, as stages 0-1), this rank's
partition of the gradient (`grad_flat`, 1/world_size of the padded total, accumulated over
micro-steps), and the optimizer states of its partition. Buckets (at most `bucket_mib`, reverse
definition order, padded to a multiple of world_size) are the unit of communication; rank r owns
partition r of every bucket. A full-size gradient exists only transiently: autograd's own
`param.grad` until its bucket copies it, and at most `MAX_IN_FLIGHT` staging buckets.

Communication plan
------------------
- At `initialize`: `broadcast` of the flat parameter buffer and module buffers from rank 0.
- During *every* backward (every micro-step; keeping gradients partitioned is the point of this
  stage, so accumulation happens in the partition, as in DeepSpeed): a post-accumulate-grad hook
  copies `param.grad` into its bucket's staging buffer and frees it (`param.grad = None`). A
  complete bucket is divided by `world_size * grad_accum` and an asynchronous reduce-scatter
  (SUM; collectives.py) is launched from the staging buffer into a partition-sized buffer,
  strictly in bucket index order (identical on every rank), overlapping the rest of the backward.
  When a reduce-scatter completes its result is added into `grad_flat` and the staging buffer is
  dropped; with more than `MAX_IN_FLIGHT` buckets in flight the hook waits for the oldest. At the
  end of the backward a callback launches the remaining buckets (missing gradients are zeros)
  and waits for all of them.
- `engine.step()`: one `all_reduce` of [sum of squares, overflow flag] (by the engine); the
  optimizer updates this rank's partition of the parameter buffer; `after_update()` launches one
  asynchronous all-gather per bucket, in place in the parameter buffer (collectives.py), and
  waits for all.
- world_size 1: one partition; the reduce-scatter becomes an add of the staging buffer and the
  all_gather is skipped.
- Master-weights layout (`compute_dtype` given; zero/master.py): `param.data` are 16-bit views and
  the hook copies the 16-bit `param.grad` into the fp32 staging buffer, so everything from the
  reduce-scatter on is fp32 as above; the optimizer updates the fp32 master partition, which is
  cast into this rank's 16-bit slice and all-gathered in 16 bits.
"""

from __future__ import annotations

from collections import deque
from typing import Any

import torch
import torch.distributed as tdist
from torch import nn

from dsl.engine import transfer
from dsl.engine.zero import collectives
from dsl.engine.zero.base import ZeroStage, nbytes
from dsl.engine.zero.layout import FlatGroup, Layout, Segment, flatten_params, split_buckets
from dsl.engine.zero.master import MasterCopy
from dsl.engine.zero.reduce_pipeline import MAX_IN_FLIGHT, ReducePipeline

__all__ = ["Stage2", "MAX_IN_FLIGHT"]

class Stage2(ReducePipeline, ZeroStage):
    """Partitioned gradients (reduce-scattered every micro-step) and optimizer states."""

    stage = 2
    partitioned = True

    def __init__(
        self,
        named: list[tuple[str, nn.Parameter]],
        *,
        bucket_bytes: int,
        grad_accum: int,
        world_size: int,
        rank: int,
        dtype: torch.dtype,
        device: torch.device,
        compute_dtype: torch.dtype | None = None,
        host_states: bool = False,
        pinned: bool = False,
    ) -> None:
        super().__init__(grad_accum=grad_accum, world_size=world_size, rank=rank)
        self.device = device
        groups = split_buckets(list(reversed(named)), bucket_bytes)
        self.layout = Layout(groups, parts=world_size, rank=rank)
        self.params_flat = flatten_params(self.layout, dtype, device)
        if world_size > 1:  # identical starting weights on every rank, as DDP does
            tdist.broadcast(self.params_flat, src=0)
        self.master: MasterCopy | None = None
        """The fp32 master partition under the master-weights layout (zero/master.py), else None."""
        if compute_dtype is not None and compute_dtype != dtype:
            self.master = MasterCopy(self.layout, self.params_flat, host=host_states, pinned=pinned)
            self.params_flat = MasterCopy.to_compute(self.layout, self.params_flat, compute_dtype)
        self.grads_on_host = host_states
        if host_states:  # CPU optimizer offload: reduced partitions go straight down (base.py)
            self._grad_shard = transfer.host_empty(self.layout.shard_numel, dtype, pinned=pinned).zero_()
        else:
            self._grad_shard = torch.zeros(self.layout.shard_numel, dtype=dtype, device=device)
        self.buckets = self.layout.groups
        self._where: dict[int, tuple[FlatGroup, int, int]] = {}
        for g in self.layout.groups:
            for slot, p in zip(g.slots, g.params):
                self._where[id(p)] = (g, slot.offset, slot.numel)
                p.grad = None
        self._staging: dict[int, torch.Tensor] = {}
        self._filled: dict[int, set[int]] = {}
        """Per staging buffer: offsets of the slots that received a gradient."""
        self._pending = [len(g.params) for g in self.layout.groups]
        self._next_launch = 0
        self._in_flight: deque[tuple[Any, FlatGroup, torch.Tensor, torch.Tensor]] = deque()
        self._hooks = [
            p.register_post_accumulate_grad_hook(self._on_grad) for g in self.layout.groups for p in g.params
        ]

    @property
    def grad_flat(self) -> torch.Tensor:  # type: ignore[override]
        return self._grad_shard

    # Backward ----------------------------------------------------------------------------

    def _on_grad(self, param: torch.Tensor) -> None:
        self._begin_backward()
        g, offset, numel = self._where[id(param)]
        if param.grad is not None:
            self._staging_for(g)[offset : offset + numel].copy_(param.grad.reshape(-1))
            self._mark_filled(g, offset)
            param.grad = None  # the staging copy is the only full gradient left
        self._pending[g.index] -= 1
        if self._pending[g.index] == 0:
            self._launch_ready()

    def _mark_filled(self, g: FlatGroup, offset: int) -> None:
        self._filled.setdefault(g.index, set()).add(offset)

    def _launch_ready(self) -> None:
        groups = self.layout.groups
        while self._next_launch < len(groups) and self._pending[self._next_launch] == 0:
            self._launch(groups[self._next_launch])

    def _launch(self, g: FlatGroup) -> None:
        self._start_reduce(g)
        self._next_launch = g.index + 1
        self._bound_in_flight()

    def _backward_end(self, boundary: bool) -> None:
        for g in self.layout.groups[self._next_launch :]:
            self._launch(g)
        self._drain()
        self._next_launch = 0

    # Parameters --------------------------------------------------------------------------

    def param_piece(self, seg: Segment) -> torch.Tensor:
        """What the optimizer updates: the fp32 master (master layout) or the parameters."""
        if self.master is not None:
            return self.master.flat[seg.shard_lo : seg.shard_lo + seg.numel]
        return self.params_flat[seg.full_lo : seg.full_lo + seg.numel]

    def param_part(self, group: FlatGroup) -> torch.Tensor:
        if self.master is not None:
            return self.master.part(group)
        lo, hi = self.layout.part_range(group)
        return self.params_flat[group.base + lo : group.base + hi]

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

    def zero_grad(self) -> None:
        self._grad_shard.zero_()
        for g in self.layout.groups:
            for p in g.params:
                p.grad = None

    def host_master(self) -> torch.Tensor | None:
        return self.master.flat if self.master is not None and self.master.host else None

    def memory(self) -> dict[str, int]:
        staging = sum(nbytes(t) for t in self._staging.values())
        staging += sum(nbytes(s) + (nbytes(o) if o is not s else 0) for _, _, o, s in self._in_flight)
        master = nbytes(self.master.flat) if self.master is not None else 0
        shard = nbytes(self._grad_shard)
        host = (shard + nbytes(getattr(self, "_down", None)) if self.grads_on_host else 0) \
            + (master if self.host_master() is not None else 0)
        return {"params_bytes": nbytes(self.params_flat),
                "grads_bytes": (0 if self.grads_on_host else shard) + staging,
                "master_bytes": 0 if self.host_master() is not None else master,
                "host_bytes": host}
