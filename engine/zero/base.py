"""What every ZeRO stage shares: counting backward passes, the accumulation boundary, the
interface the engine drives, and the gather of a partitioned buffer.

The engine drives a stage through:

- `_begin_backward()` / `_end_backward()` (from autograd hooks): one backward pass per
  `loss.backward()`; the `grad_accum`-th since the last step is the *boundary*. A backward past
  the boundary is refused (UserError) before it communicates anything of its own.
- `finish()`: wait for this step's gradient communication; afterwards `grad_flat` (shard space,
  see layout.py) holds this rank's partition of the gradient averaged over ranks and micro-steps.
- `param_piece(segment)` / `param_part(group)`: views of where this rank's partition of the
  parameters lives (the optimizer updates them in place, or an offload copies into them).
- `after_update()`: make every rank's parameters current again (stages 1-2: all_gather; stage 3:
  refresh its compute-dtype working copy, see stage3.py).
- `zero_grad()`, `memory()`, `close()`.

`partitioned` says whether `grad_flat` is a partition (stages 1-3: the global gradient norm
needs one all_reduce) or the whole gradient (stage 0: every rank already holds the same sum).

Under optimizer offload of the whole update (`host_states`: CPU, or NVMe, whose offload streams
through host memory) a stage keeps what only the optimizer reads in host memory: the fp32 master partition where it is separate from what the model computes with
(`host_master()`: the master layout at stages 1-2, the 16-bit working copy's master at stage 3),
and at stages 2-3 the gradient partition (`grads_on_host`): each reduced bucket's partition is
copied down as soon as its reduce-scatter completes, so after backward no gradient stays on the
device. `memory()` reports those bytes as `host_bytes`.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.autograd import Variable

from dsl.engine import transfer
from dsl.engine.errors import UserError
from dsl.engine.zero import collectives
from dsl.engine.zero.layout import FlatGroup, Layout, Segment

__all__ = ["ZeroStage", "nbytes"]


def nbytes(t: torch.Tensor | None) -> int:
    """Bytes a tensor's storage holds now (0 for a released stage-3 buffer)."""
    if t is None:
        return 0
    return t.untyped_storage().nbytes()


class ZeroStage:
    """Base of the stages; see the module docstring for the protocol."""

    stage = -1
    partitioned = True
    grads_on_host = False
    """`grad_flat` lives in host memory (stages 2-3 under CPU/NVMe optimizer offload)."""

    layout: Layout
    grad_flat: torch.Tensor

    def __init__(self, *, grad_accum: int, world_size: int, rank: int) -> None:
        self.grad_accum = grad_accum
        self.world_size = world_size
        self.rank = rank
        self.micro_step = 0
        """Backward passes since the last `finish()`."""
        self.collectives_launched = 0
        """Gradient collectives issued so far (0 forever at world_size 1)."""
        self._in_backward = False
        self._hooks: list[Any] = []
        self.quantize_block_numel: int | None = None
        """Set (by the engine, from comm.quantize_gradients) to reduce-scatter int8 blocks of this
        many elements in `reduce_scatter_group` (ops/comm/qreduce.py); None: fp32."""
        self.reduce_dtype: torch.dtype | None = None
        """Set (by the engine, from comm.reduce_dtype) to send gradients in this dtype: each
        reduction runs on a copy cast to it, and the result is cast back into the gradient
        buffer or partition (`CastBack`). None: the gradients' own dtype."""

    # Backward counting -------------------------------------------------------------------

    @property
    def is_boundary(self) -> bool:
        """True while (or before) running the backward that completes the accumulation."""
        return self.micro_step == self.grad_accum - 1

    def _begin_backward(self) -> None:
        if self._in_backward:
            return
        if self.micro_step >= self.grad_accum:
            raise UserError(
                f"backward pass {self.micro_step + 1} since the last engine.step(), but "
                f"grad_accum is {self.grad_accum}: call engine.step() and engine.zero_grad() "
                f"after every {self.grad_accum} backward passes"
            )
        self._in_backward = True
        Variable._execution_engine.queue_callback(self._end_backward)

    def _end_backward(self) -> None:
        self._backward_end(self.is_boundary)
        self._in_backward = False
        self.micro_step += 1

    def _backward_end(self, boundary: bool) -> None:
        """Subclass hook: runs inside autograd's final callback of every backward."""

    def check_step(self) -> None:
        if self.micro_step != self.grad_accum:
            raise UserError(
                f"engine.step() after {self.micro_step} backward passes, but grad_accum is "
                f"{self.grad_accum}: run loss.backward() once per micro-batch, "
                f"{self.grad_accum} times per step"
            )

    # Interface ---------------------------------------------------------------------------

    def finish(self) -> None:
        raise NotImplementedError

    def param_piece(self, seg: Segment) -> torch.Tensor:
        raise NotImplementedError

    def param_part(self, group: FlatGroup) -> torch.Tensor:
        raise NotImplementedError

    def store_param(self, seg: Segment, values: torch.Tensor) -> Any:
        """Write updated master values of segment `seg` (host memory, from an offloaded optimizer)
        where the stage keeps them; returns the copy's Pending (engine/transfer.py)."""
        return transfer.to_device(self.param_piece(seg), values)

    def after_update(self) -> None:
        """Default: nothing to do (stage 0 updates the replicated parameters in place)."""

    def zero_grad(self) -> None:
        raise NotImplementedError

    def host_master(self) -> torch.Tensor | None:
        """The fp32 master partition (shard space) when it lives in host memory, else None."""
        return None

    def memory(self) -> dict[str, int]:
        raise NotImplementedError

    def close(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks.clear()

    # Shared helpers ----------------------------------------------------------------------

    def gather_group(self, part: torch.Tensor, group: FlatGroup) -> torch.Tensor:
        """[group.padded] from every rank's [group.part_numel] partition (all_gather)."""
        if self.layout.parts == 1:
            return part
        out = torch.empty(group.padded, dtype=part.dtype, device=part.device)
        collectives.all_gather(out, part).wait()
        return out

    def divisor(self) -> int:
        """Gradients are pre-divided by this before the SUM, so the SUM is the mean."""
        return self.world_size * self.grad_accum

    def wire(self, grads: torch.Tensor) -> torch.Tensor:
        """`grads` as they cross the wire: a copy in `reduce_dtype` when set and different."""
        if self.reduce_dtype is None or grads.dtype == self.reduce_dtype:
            return grads
        return grads.to(self.reduce_dtype)

    def reduce_scatter_group(self, g: FlatGroup, staging: torch.Tensor, filled: set[int]) -> tuple[torch.Tensor, Any]:
        """Stages 2-3: launch the reduce-scatter of one group's full gradient staging buffer.

        Slots whose parameter got no gradient in this backward contribute zeros; the buffer is
        pre-divided so the SUM is the mean. Returns (this rank's partition, async work or None)."""
        for slot in g.slots:
            if slot.offset not in filled:
                staging[slot.offset : slot.offset + slot.numel].zero_()
        divisor = self.divisor()
        if divisor > 1:
            staging.div_(divisor)
        if self.world_size == 1:
            return staging, None
        if self.quantize_block_numel is not None:  # int8 all-to-all; wait() dequantizes into out
            from dsl.ops.comm.qreduce import quantized_reduce_scatter

            pending = quantized_reduce_scatter(staging, world_size=self.world_size,
                                               block_numel=self.quantize_block_numel)
            self.collectives_launched += 1
            return pending.out, pending
        staging = self.wire(staging)  # comm.reduce_dtype: the completion casts `out` back (dst.add_)
        out = torch.empty(g.part_numel, dtype=staging.dtype, device=staging.device)
        work = collectives.reduce_scatter(out, staging)  # gloo: point-to-point, see collectives.py
        self.collectives_launched += 1
        return out, work


class CastBack:
    """A reduction launched on a low-precision copy (`ZeroStage.wire`): `wait()` waits for it and
    copies the result into `dst`, the gradient buffer or partition it stands for."""

    def __init__(self, work: Any, low: torch.Tensor, dst: torch.Tensor) -> None:
        self.work, self.low, self.dst = work, low, dst

    def wait(self) -> None:
        if self.work is not None:
            self.work.wait()
        self.dst.copy_(self.low)


def named_trainable(module: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """(name, parameter) of every trainable parameter, a tied one once, in definition order."""
    return [(n, p) for n, p in module.named_parameters() if p.requires_grad]
