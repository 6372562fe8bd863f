"""Stage 3's gathers: one unit's all-gather (from its partition on the device, in host memory or
in a file), its release, the live-parameter count and cap, and prefetching along a recorded
order (engine/zero/stage3.py drives them from its hooks; its docstring has the plan).

A mixin of `Stage3`: it reads the stage's `units`, `layout`, `work`, `files`, `params_on_host`,
`world_size`, `_root`, `_read_buf`, `timeline`, `max_live_params`, `prefetch_params` and
`notes`.
"""

from __future__ import annotations

import time
import torch

from dsl.engine import transfer
from dsl.engine.zero import collectives
from dsl.engine.zero.units import GATHERED as _GATHERED
from dsl.engine.zero.units import GATHERING as _GATHERING
from dsl.engine.zero.units import RELEASED as _RELEASED
from dsl.engine.zero.units import Unit as _Unit

__all__ = ["UnitGathers"]


class UnitGathers:
    """Gather, wait for, release and prefetch stage-3 units."""

    units: list[_Unit]
    live_numel: int
    peak_live_numel: int

    def _check_cap(self) -> None:
        """A cap below what training needs gathered at once cannot be kept: that is the units that
        stay gathered (root, resident) plus the two largest others (in backward a unit stays
        gathered until its gradients are reduced, which can be after the next unit's backward has
        begun). As in DeepSpeed, a unit is still gathered when it is needed; the cap then only
        stops prefetching, and `notes` says so (the engine prints it)."""
        if self.max_live_params is None:
            return
        stay = sum(u.group.padded for u in self.units if u.resident or u is self._root)
        others = sorted(u.group.padded for u in self.units if not (u.resident or u is self._root))
        need = stay + sum(others[-2:])
        if self.max_live_params < need:
            self.notes.append(
                f"engine.stage3.max_live_params: {self.max_live_params:,} is below the {need:,} parameter "
                f"elements this model needs gathered at once (units that stay gathered: {stay:,}, the two "
                f"largest other units: {sum(others[-2:]):,}); units are gathered when needed regardless and "
                f"none is prefetched past the cap. Raise it, or gather smaller units with stage3.gather: module")

    def _fits(self, unit: _Unit) -> bool:
        cap = self.max_live_params
        return cap is None or self.live_numel + unit.group.padded <= cap

    def _prefetch(self, sequence: list[int], pos: int, skip=lambda u: False) -> None:
        """Gather ahead the units after position `pos` of `sequence`, within the prefetch budget
        (`prefetch_params`; None: one unit) and the live cap."""
        budget = self.prefetch_params
        for i in sequence[pos + 1 :]:
            unit = self.units[i]
            if skip(unit):
                continue
            if budget is None:  # exactly the next unit
                if unit.state == _RELEASED and self._fits(unit):
                    self._gather(unit)
                return
            if unit.group.padded > budget:
                return
            budget -= unit.group.padded
            if unit.state == _RELEASED:
                if not self._fits(unit):
                    return
                self._gather(unit)


    # Gather / release --------------------------------------------------------------------

    def _gather(self, unit: _Unit) -> None:
        if unit.state != _RELEASED:
            return
        g = unit.group
        unit.full.untyped_storage().resize_(g.padded * unit.full.element_size())
        self.live_numel += g.padded
        self.peak_live_numel = max(self.peak_live_numel, self.live_numel)
        if self.timeline is not None:
            self.timeline.append(("gather", unit.index, time.perf_counter()))
        part = None if self.work is None else self.work[g.shard_offset : g.shard_offset + g.part_numel]
        # The parameters are views of `full`; writing into it must not look like an in-place
        # change of a tensor autograd saved (it restores the same values).
        with torch.no_grad(), torch.autograd._unsafe_preserve_version_counter(unit.full):
            if self.files is not None:  # read this rank's slice from the file (via host memory on a GPU)
                lo, hi = self.layout.part_range(g)
                if self._read_buf is None:
                    self.files.read(unit.full[lo:hi], g.shard_offset)
                else:
                    buf = self._read_buf[: g.part_numel]
                    self.files.read(buf, g.shard_offset)
                    transfer.to_device(unit.full[lo:hi], buf).wait()  # buf is reused by the next read
                part = unit.full[lo:hi]
            elif self.params_on_host:  # up into this rank's slice first (stream-ordered before the gather)
                lo, hi = self.layout.part_range(g)
                transfer.to_device(unit.full[lo:hi], part)
                part = unit.full[lo:hi]
            if self.world_size > 1:
                unit.work = collectives.all_gather(unit.full, part)
                unit.state = _GATHERING
            else:
                unit.full.copy_(part)
                unit.state = _GATHERED

    def _wait(self, unit: _Unit) -> None:
        if unit.state == _GATHERING:
            unit.work.wait()
            unit.work = None
            unit.state = _GATHERED

    def _release(self, unit: _Unit) -> None:
        if unit.state == _RELEASED:
            return
        self._wait(unit)
        unit.full.untyped_storage().resize_(0)
        unit.state = _RELEASED
        self.live_numel -= unit.group.padded

    def reset_peak(self) -> None:
        self.peak_live_numel = self.live_numel

    def _use(self, unit: _Unit) -> None:
        self._gather(unit)
        self._wait(unit)
