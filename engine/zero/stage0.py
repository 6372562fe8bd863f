"""ZeRO stage 0: everything replicated; gradients all-reduced in buckets, overlapped with backward.

Holds on every rank: all parameters (one flat buffer, each `param.data` a view of it), all
gradients (one flat buffer cut into buckets, each `param.grad` a view of it: autograd accumulates
straight into the buckets, no copies) and all optimizer states.

Communication plan
------------------
- At `initialize`: `broadcast` of the flat parameter buffer and every module buffer from rank 0
  (done by the engine), so all ranks start from identical weights, as DDP does.
- During the backward of the *last* micro-step (the accumulation boundary): a post-accumulate-grad
  hook counts the parameters of each bucket whose gradient is final; a complete bucket is divided
  by `world_size * grad_accum` and an asynchronous `all_reduce(SUM)` is launched on it at once,
  so communication overlaps the rest of the backward. Buckets hold parameters in reverse
  definition order (roughly the order backward produces gradients), at most `bucket_mib` each,
  and are launched strictly in index order, so every rank issues the same collectives in the same
  order. At the end of the backward an autograd callback launches any bucket still incomplete (a
  parameter that got no gradient contributes zeros).
- Other micro-steps: no communication; autograd accumulates into the bucket views.
- `finish()` (in `engine.step()`): wait for every bucket's all_reduce. The gradient norm, fp16
  overflow check and the optimizer need no further communication: every rank holds the same
  full gradient.
- world_size 1 runs exactly this path; only the all_reduce is skipped.
- Master-weights layout (`compute_dtype` given; zero/master.py): `param.data` are 16-bit views,
  the gradient buffer stays fp32, and each parameter's 16-bit gradient is added into its bucket
  view by the hook (then freed) instead of autograd accumulating into the view; after the update
  the fp32 master (the whole model at stage 0) is cast into the 16-bit parameters.
- 1-bit Adam after its warm-up (engine/onebit.py sets `grad_comm_off`): buckets are divided by
  `grad_accum` only and not all-reduced; the optimizer exchanges compressed momentum instead.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as tdist
from torch import nn

from dsl.engine.zero.base import CastBack, ZeroStage, nbytes
from dsl.engine.zero.layout import FlatGroup, Layout, Segment, flatten_params, split_buckets
from dsl.engine.zero.master import MasterCopy

__all__ = ["Stage0", "Bucket"]


class Bucket:
    """One group's slice of the full gradient buffer; `views[i]` is `params[i].grad`."""

    def __init__(self, group: FlatGroup, flat: torch.Tensor) -> None:
        self.group = group
        self.index = group.index
        self.params = group.params
        self.flat = flat
        """[group.padded] view of the full gradient buffer."""
        self.views = [flat[s.offset : s.offset + s.numel].view(s.shape) for s in group.slots]
        self.pending = len(self.params)
        self.work: Any = None


class Stage0(ZeroStage):
    """Replicated parameters, gradients and optimizer states (DDP-style)."""

    stage = 0
    partitioned = False

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
        parts = self._parts()
        groups = split_buckets(list(reversed(named)), bucket_bytes)
        self.layout = Layout(groups, parts=parts, rank=rank if parts > 1 else 0)
        self.params_flat = flatten_params(self.layout, dtype, device)
        """[full_numel]: every parameter; `param.data` are views of it."""
        if world_size > 1:  # identical starting weights on every rank, as DDP does
            tdist.broadcast(self.params_flat, src=0)
        self.master: MasterCopy | None = None
        """The fp32 master partition under the master-weights layout (zero/master.py), else None."""
        grads_full = torch.zeros_like(self.params_flat)
        if compute_dtype is not None and compute_dtype != dtype:
            self.master = MasterCopy(self.layout, self.params_flat, host=host_states, pinned=pinned)
            self.params_flat = MasterCopy.to_compute(self.layout, self.params_flat, compute_dtype)
        self.grads_full = grads_full
        """[full_numel]: every gradient; `param.grad` are views of it (master layout: the hook
        adds the 16-bit `param.grad` into its view)."""
        self.buckets = [
            Bucket(g, self.grads_full[g.base : g.base + g.padded]) for g in self.layout.groups
        ]
        self._slot: dict[int, tuple[Bucket, torch.Tensor]] = {}
        for bucket in self.buckets:
            for p, view in zip(bucket.params, bucket.views):
                self._slot[id(p)] = (bucket, view)
                p.grad = view if self.master is None else None
        self._next_launch = 0
        self.grad_comm_off: Any = lambda: False
        """True while gradients stay local (1-bit Adam after freeze_step; engine/onebit.py)."""
        self._hooks = [
            p.register_post_accumulate_grad_hook(self._on_grad) for b in self.buckets for p in b.params
        ]

    def _parts(self) -> int:
        return 1

    @property
    def grad_flat(self) -> torch.Tensor:  # type: ignore[override]
        return self.grads_full

    # Backward ----------------------------------------------------------------------------

    def _on_grad(self, param: torch.Tensor) -> None:
        self._begin_backward()
        bucket, view = self._slot[id(param)]
        grad = param.grad
        if self.master is not None:  # 16-bit gradient: accumulate it in fp32, free it
            if grad is not None:
                view.add_(grad.view_as(view))
            param.grad = None
        elif grad is None or grad.data_ptr() != view.data_ptr():
            # Someone replaced .grad (optimizer.zero_grad(set_to_none=True), a manual
            # assignment), so autograd stored a fresh tensor: bring it back into the bucket.
            if grad is None:
                view.zero_()
            else:
                view.copy_(grad)
            param.grad = view
        if self.is_boundary:
            bucket.pending -= 1
            if bucket.pending == 0:
                self._launch_ready()

    def _launch_ready(self) -> None:
        while self._next_launch < len(self.buckets):
            bucket = self.buckets[self._next_launch]
            if bucket.pending:
                return
            self._launch(bucket)

    def _launch(self, bucket: Bucket) -> None:
        local = self.grad_comm_off()
        divisor = self.grad_accum if local else self.divisor()
        if divisor > 1:
            # Pre-divide: the SUM then yields the mean without a second pass over the buffer.
            bucket.flat.div_(divisor)
        if not local:
            self._reduce(bucket)
        self._next_launch = bucket.index + 1

    def _reduce(self, bucket: Bucket) -> None:
        if self.world_size > 1:
            wire = self.wire(bucket.flat)  # comm.reduce_dtype: a cast copy, cast back at finish()
            work = tdist.all_reduce(wire, op=tdist.ReduceOp.SUM, async_op=True)
            bucket.work = work if wire is bucket.flat else CastBack(work, wire, bucket.flat)
            self.collectives_launched += 1

    def _backward_end(self, boundary: bool) -> None:
        if boundary:
            # Buckets with parameters that received no gradient in this backward.
            for bucket in self.buckets[self._next_launch :]:
                self._launch(bucket)

    def finish(self) -> None:
        """Wait until the gradients are reduced; call once per optimizer step."""
        self.check_step()
        for bucket in self.buckets:
            if bucket.work is not None:
                bucket.work.wait()
            bucket.work = None
            bucket.pending = len(bucket.params)
        self._next_launch = 0
        self.micro_step = 0

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
        if self.master is not None:  # every rank updated the whole master: cast, no collective
            self.master.publish(self.params_flat, world_size=1)

    def zero_grad(self) -> None:
        self.grads_full.zero_()
        for bucket in self.buckets:
            for p, view in zip(bucket.params, bucket.views):
                if self.master is not None:
                    p.grad = None
                elif p.grad is None or p.grad.data_ptr() != view.data_ptr():
                    p.grad = view

    def host_master(self) -> torch.Tensor | None:
        return self.master.flat if self.master is not None and self.master.host else None

    def memory(self) -> dict[str, int]:
        master = nbytes(self.master.flat) if self.master is not None else 0
        return {"params_bytes": nbytes(self.params_flat), "grads_bytes": nbytes(self.grads_full),
                "master_bytes": 0 if self.host_master() is not None else master,
                "host_bytes": master if self.host_master() is not None else 0}

    # Compatibility with the first engine's reducer (tests and tools read these).

    def flats(self) -> list[torch.Tensor]:
        return [b.flat for b in self.buckets]
