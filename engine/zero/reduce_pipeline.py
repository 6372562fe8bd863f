"""The gradient pipeline stages 2 and 3 share: full-gradient staging buffers, reduce-scattered into
this rank's gradient shard, with at most `MAX_IN_FLIGHT` staging buffers alive.

A stage that mixes this in owns `device`, `_staging` ({group index: buffer}), `_filled` ({group index: set
of offsets written}), `_pending` (gradients still expected per group), `_in_flight` (a deque) and
`_grad_shard`; it decides *when* a group is launched (stage 2: bucket order; stage 3: unit
order), this class *how*.
"""

from __future__ import annotations

import torch

from dsl.engine import transfer
from dsl.engine.zero.layout import FlatGroup

MAX_IN_FLIGHT = 4
"""Staging buckets alive at once (bounds the transient full-gradient memory)."""


class ReducePipeline:
    def _staging_for(self, g: FlatGroup) -> torch.Tensor:
        buf = self._staging.get(g.index)
        if buf is None:
            # On the device (the reduce-scatter's source), whether or not the shard is host memory.
            buf = torch.empty(g.padded, dtype=self._grad_shard.dtype, device=self.device)
            buf[g.numel :].zero_()
            self._staging[g.index] = buf
        return buf

    def _start_reduce(self, g: FlatGroup) -> None:
        """Reduce-scatter g's staging buffer (asynchronously) and make g ready for the next micro-step."""
        staging = self._staging_for(g)
        out, work = self.reduce_scatter_group(g, staging, self._filled.pop(g.index, set()))
        self._in_flight.append((work, g, out, staging))
        del self._staging[g.index]
        self._pending[g.index] = len(g.params)

    def _bound_in_flight(self) -> None:
        while len(self._in_flight) > MAX_IN_FLIGHT:
            self._complete_oldest()

    def _complete_oldest(self) -> None:
        work, g, out, _staging = self._in_flight.popleft()
        if work is not None:
            work.wait()
        dst = self._grad_shard[g.shard_offset : g.shard_offset + g.part_numel]
        if dst.device != out.device:  # the partition lives in host memory (CPU optimizer offload)
            down = self._down_buffer(out.numel(), out.dtype)
            transfer.to_host(down, out).wait()
            out = down
        dst.add_(out)

    def _down_buffer(self, numel: int, dtype: torch.dtype) -> torch.Tensor:
        """A reusable host buffer (pinned on a GPU host) for one reduced partition on its way down."""
        buf = getattr(self, "_down", None)
        if buf is None or buf.numel() < numel:
            buf = self._down = transfer.host_empty(max(g.part_numel for g in self.layout.groups), dtype,
                                                   pinned=self._grad_shard.is_pinned())
        return buf[:numel]

    def _drain(self) -> None:
        while self._in_flight:
            self._complete_oldest()

    def finish(self) -> None:
        self.check_step()
        self.micro_step = 0
