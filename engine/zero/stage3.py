"""ZeRO stage 3: parameters, gradients and optimizer states partitioned; parameters gathered per
module for its forward and backward, prefetched one module ahead and released after use.

Units. The model is cut into *units*: every child of an `nn.ModuleList` / `nn.ModuleDict` (the
repeated blocks of a transformer; outermost lists only), or, for a model without such lists, the
direct children of the root. Every other direct child of the root with trainable parameters
that no other child shares (the embedding, the final norm, an untied output head) is a *resident
unit*; the *root unit* holds what is left: parameters of the root itself and any parameter used
by more than one child (a tied embedding), so a shared parameter is always gathered when any of
its users runs. Resident units are kept apart from the root so that the output head's gradient
is reduce-scattered as soon as it is ready, at the start of the backward, instead of after the
embedding's at the very end (and its gather overlaps the layers' forward). Each unit is one flat group
(layout.py), padded to a multiple of world_size; rank r keeps partition r of every unit in
`master` (shard space): fp32, or bf16 with low_precision_states. Under bf16/fp16 mixed precision
(fp32 master weights) rank r also keeps `work`, the same partition in the compute dtype
(precision.py), cast from `master` at initialize and after every update or checkpoint load
(`after_update`); otherwise `work` is `master` itself. The optimizer, offload and checkpoints
read and write `master` (`param_piece` / `param_part`); gathers read `work`.

While gathered, a unit's parameters are views of one flat [unit.padded] buffer in `work`'s dtype
(so the model computes with bf16/fp16 parameters under mixed precision, and autocast has no weight
to cast) whose storage is allocated for the gather and resized to 0 at release (FSDP1's trick):
tensors autograd saved for backward keep pointing at that storage and see the re-gathered values
in backward.

Communication plan
------------------
- At `initialize`: `broadcast` of every unit's flat buffer (`master`'s dtype) from rank 0, then
  each rank keeps its partition (and casts it into `work`) and releases the rest.
All-gathers and reduce-scatters below are collectives.py's (on gloo: broadcasts and point-to-point
messages, 2-5x faster than gloo's all_gather_single / reduce_scatter_single).

- Forward: the root module's forward pre-hook issues the asynchronous all-gathers (`work`
  partition -> flat buffer; under bf16/fp16 in the compute dtype, half the bytes of fp32) of the
  first two units of the recorded forward order and of every resident unit, then gathers the root unit and waits for it. The root unit stays gathered until
  the end of the backward; a resident unit until its gradients are reduced. A unit's forward
  pre-hook waits for its gather (or issues it) and issues an asynchronous gather for the next unit
  in the forward order recorded during the first forward (prefetch); its forward post-hook
  releases it (not a resident unit) and registers a pre-backward hook on its outputs.
- Backward: a unit's pre-backward hook (the gradient of one of its outputs arrived) gathers it
  again (usually prefetched already) and prefetches the unit whose backward comes next. Each
  parameter's post-accumulate-grad hook copies its gradient (bf16/fp16 under mixed precision,
  like the parameter) into the unit's staging buffer (fp32: the reduce-scatter, accumulation,
  clipping and the fp16 overflow check stay fp32; inf/nan survive the cast) and frees it; when
  all of a unit's gradients are in, the staging buffer is divided by `world_size * grad_accum`
  and an asynchronous reduce-scatter (SUM) into a partition-sized buffer is launched (strictly
  in reverse forward order, the root unit last, identical on all ranks), and the unit is
  released. Completed reduce-scatters are added into `grad_flat`; at most `MAX_IN_FLIGHT` are
  alive. This happens on every micro-step (accumulation in the partition).
  At the end of the backward a callback reduces the remaining units (missing gradients are
  zeros), waits for all reductions and releases every unit.
- `engine.step()`: one `all_reduce` of [sum of squares, overflow flag] (by the engine); the
  optimizer updates `master` in place and `after_update` casts it into `work` (no communication);
  the next forward gathers the new values. A skipped fp16 step changes neither.
- world_size 1: the "gather" is a copy of the partition into the flat buffer and the
  reduce-scatter an add; the same hooks run.

Parameter offload (`offload.params: cpu`, ZeRO-Infinity's offload_param to CPU, with
`offload.optimizer: cpu`): `master` and `work` live in host memory (page-locked on a GPU host);
a gather first copies this rank's `work` partition up into its own slice of the unit's flat
buffer and all-gathers in place, so the device holds gathered units only (the root and resident
units, the unit running and the one prefetched: `peak_live_numel` counts them) plus
communication buffers. `timeline` records when each gather is issued and each unit's forward
runs, which shows the prefetch ahead of use.

A released parameter has its full shape but no storage: read parameters through
`engine.full_state_dict()` or a checkpoint, not `module.state_dict()`.
"""

from __future__ import annotations

import time
from collections import deque
from typing import Any

import torch
import torch.distributed as tdist
from torch import nn
from torch.utils._pytree import tree_flatten

from dsl.engine import transfer
from dsl.engine.zero.base import ZeroStage, nbytes
from dsl.engine.zero.layout import FlatGroup, Layout, Segment
from dsl.engine.zero.param_files import ParamFile
from dsl.engine.zero.reduce_pipeline import ReducePipeline
from dsl.engine.zero.stage3_gathers import UnitGathers
from dsl.engine.zero.units import Unit as _Unit
from dsl.engine.zero.units import assign, choose_units, split_root

__all__ = ["Stage3", "choose_units"]



def _in_backward() -> bool:
    return torch._C._current_graph_task_id() != -1


class Stage3(UnitGathers, ReducePipeline, ZeroStage):
    """Fully sharded parameters, gradients and optimizer states."""

    stage = 3
    partitioned = True

    def __init__(
        self,
        module: nn.Module,
        *,
        grad_accum: int,
        world_size: int,
        rank: int,
        dtype: torch.dtype,
        device: torch.device,
        work_dtype: torch.dtype | None = None,
        host_states: bool = False,
        pinned: bool = False,
        params_offload: str = "none",
        nvme_path: str | None = None,
        gather: str = "layer",
        max_live_params: int | None = None,
        prefetch_params: int | None = None,
        chunk_numel: int = 1 << 22,
    ) -> None:
        super().__init__(grad_accum=grad_accum, world_size=world_size, rank=rank)
        unit_modules = choose_units(module, gather)
        root_named, per_unit = assign(module, unit_modules)
        root_named, resident = split_root(module, root_named, unit_modules)
        kept = [(m, named) for (_, m), named in zip(unit_modules, per_unit) if named]
        named_groups = [root_named] + [named for _, named in resident] + [named for _, named in kept]
        modules = [module] + [m for m, _ in resident] + [m for m, _ in kept]
        resident_modules = {id(m) for m, _ in resident}
        if not root_named:  # the root still needs a (possibly empty) unit for its hooks
            named_groups, modules = named_groups[1:], modules[1:]
            self._root_has_params = False
        else:
            self._root_has_params = True
        self.layout = Layout(named_groups, parts=world_size, rank=rank)
        self.device = device
        has_work = work_dtype is not None and work_dtype != dtype
        self.params_offload = params_offload
        self.params_on_host = params_offload != "none"
        """offload.params cpu/nvme: the partitions (`master`, `work`) live in host memory or (the
        16-bit `work`, nvme) a file; a gather first copies this rank's partition up into its slice
        of the unit's flat buffer."""
        self._host_master = (host_states and has_work) or self.params_on_host
        if self._host_master:  # CPU optimizer offload: only the 16-bit copy is gathered (base.py)
            self.master = transfer.host_empty(self.layout.shard_numel, dtype, pinned=pinned)
        else:
            self.master = torch.empty(self.layout.shard_numel, dtype=dtype, device=device)
        """This rank's partition of every unit (shard space): the persistent parameters, which the
        optimizer, offload and checkpoints read and write (`param_piece` / `param_part`)."""
        self.work = self.master
        """What `_gather` gathers: `master` itself, or (`work_dtype` given and not `dtype`) its
        copy in `work_dtype`, the same layout, refreshed by `after_update()`."""
        gather_dtype = work_dtype if has_work else dtype
        self.files: ParamFile | None = None
        """offload.params: nvme: the gather source (`work`, or a copy of `master` in fp32) in a
        file (zero/param_files.py); `work` is then None."""
        self._read_buf: torch.Tensor | None = None
        if params_offload == "nvme":
            if not nvme_path:
                raise ValueError("offload.params: nvme needs offload.nvme_path")
            self.files = ParamFile(nvme_path, rank=rank, numel=self.layout.shard_numel, dtype=gather_dtype,
                                   chunk_numel=chunk_numel, pinned=pinned)
            self.work = None
            if device.type != "cpu":  # reads land in host memory, then go up
                biggest = max((g.part_numel for g in self.layout.groups), default=1)
                self._read_buf = transfer.host_empty(biggest, gather_dtype, pinned=pinned)
        elif has_work and self.params_on_host:
            self.work = transfer.host_empty(self.layout.shard_numel, work_dtype, pinned=pinned)
        elif has_work:
            self.work = torch.empty(self.layout.shard_numel, dtype=work_dtype, device=device)
        self.max_live_params = max_live_params
        """The most parameter elements gathered at once (DeepSpeed's stage3_max_live_parameters):
        a prefetch that would pass it waits until the unit is needed; None: no cap."""
        self.prefetch_params = prefetch_params
        """The most elements of prefetched units not yet used (DeepSpeed's
        stage3_prefetch_bucket_size); None: exactly the next unit, 0: no prefetch."""
        self.live_numel = 0
        """Parameter elements gathered on the device right now."""
        self.peak_live_numel = 0
        """The most parameter elements gathered at once since the last `reset_peak()`."""
        self.timeline: list[tuple[str, int, float]] | None = None
        """Set to a list to record (event, unit index, time.perf_counter()) for every gather issued
        ("gather"), unit forward start ("forward") and end ("forward_end")."""
        self.grads_on_host = host_states
        if host_states:  # reduced partitions go straight down to host memory (base.py)
            self._grad_shard = transfer.host_empty(self.layout.shard_numel, dtype, pinned=pinned).zero_()
        else:
            self._grad_shard = torch.zeros(self.layout.shard_numel, dtype=dtype, device=device)
        self.master_owner: Any = None
        """The NVMe optimizer offload holding the only master after `drop_master`."""
        self.units: list[_Unit] = []
        self._where: dict[int, tuple[_Unit, int, int]] = {}
        with torch.no_grad():
            for g, m in zip(self.layout.groups, modules):
                flat = torch.zeros(g.padded, dtype=dtype, device=device)
                for slot, p in zip(g.slots, g.params):
                    flat[slot.offset : slot.offset + slot.numel].copy_(p.detach().reshape(-1))
                if world_size > 1:
                    tdist.broadcast(flat, src=0)
                lo, hi = self.layout.part_range(g)
                mine = self.master[g.shard_offset : g.shard_offset + g.part_numel]
                if self._host_master:
                    transfer.to_host(mine, flat[lo:hi]).wait()
                else:
                    mine.copy_(flat[lo:hi])
                full = flat
                if gather_dtype != dtype:  # gathered in work's dtype
                    full = torch.empty(g.padded, dtype=gather_dtype, device=device)
                unit = _Unit(g, m, full)
                unit.resident = id(m) in resident_modules
                for slot, p in zip(g.slots, g.params):
                    p.data = full[slot.offset : slot.offset + slot.numel].view(slot.shape)
                    p.grad = None
                    self._where[id(p)] = (unit, slot.offset, slot.numel)
                full.untyped_storage().resize_(0)
                self.units.append(unit)
        self._refresh_work()
        self._root = self.units[0] if self._root_has_params else None
        self.notes: list[str] = []
        """Settings that cannot apply as given (engine/core.py prints them)."""
        self._check_cap()
        self._root_module = module
        self._resident = [u for u in self.units if u.resident]
        """Units of the root's other children (embedding, final norm, output head): gathered
        when the root's forward starts, kept until their gradients are reduced (as the root)."""
        self._order: list[int] = []
        """Unit indices in the order of the first forward (the root first when it has params)."""
        self._recording = True
        self._staging: dict[int, torch.Tensor] = {}
        self._filled: dict[int, set[int]] = {}
        self._pending = [len(g.params) for g in self.layout.groups]
        self._reduce_pos = 0
        self._in_flight: deque[tuple[Any, FlatGroup, torch.Tensor, torch.Tensor]] = deque()
        self._hooks = [
            p.register_post_accumulate_grad_hook(self._on_grad) for g in self.layout.groups for p in g.params
        ]
        self._hooks.append(module.register_forward_pre_hook(self._root_pre_forward))
        self._hooks.append(module.register_forward_hook(self._root_post_forward, always_call=True))
        for unit in self.units:
            if unit is self._root:
                continue
            self._hooks.append(unit.module.register_forward_pre_hook(
                lambda m, args, unit=unit: self._pre_forward(unit)))
            self._hooks.append(unit.module.register_forward_hook(
                lambda m, args, out, unit=unit: self._post_forward(unit, out)))

    @property
    def grad_flat(self) -> torch.Tensor:  # type: ignore[override]
        return self._grad_shard

    @property
    def unit_names(self) -> list[list[str]]:
        """Parameter names of each unit (the root's first)."""
        return [[s.name for s in u.group.slots] for u in self.units]

    # Forward hooks -----------------------------------------------------------------------

    def _root_pre_forward(self, module: nn.Module, args: Any) -> None:
        if not _in_backward():
            # Issue order (the same on every rank): the root, the resident units (they stay
            # gathered, so the prefetch below counts them against the cap), then the first unit of
            # the recorded forward order and the prefetch budget after it.
            if self._root is not None:
                self._gather(self._root)
            for unit in self._resident:
                self._gather(unit)
            if not self._recording:
                first = next((i for i in self._order if self._root is None or i != self._root.index), None)
                if first is not None:
                    self._gather(self.units[first])
                    self._prefetch(self._order, self._order.index(first), skip=lambda u: u is self._root)
        if self._root is not None:
            self._use(self._root)
            if self._recording and self._root.index not in self._order:
                self._order.append(self._root.index)

    def _root_post_forward(self, module: nn.Module, args: Any, output: Any) -> None:
        self._recording = False
        if self._root is not None:
            if torch.is_grad_enabled():
                self._register_pre_backward(self._root, output)
            elif not _in_backward():
                self._release(self._root)
        if not torch.is_grad_enabled() and not _in_backward():
            for unit in self._resident:
                self._release(unit)

    def _pre_forward(self, unit: _Unit) -> None:
        self._use(unit)
        if self.timeline is not None:
            self.timeline.append(("forward", unit.index, time.perf_counter()))
        if self._recording:
            if unit.index not in self._order:
                self._order.append(unit.index)
        elif not _in_backward() and unit.index in self._order:
            self._prefetch(self._order, self._order.index(unit.index))

    def _post_forward(self, unit: _Unit, output: Any) -> None:
        if self.timeline is not None:
            self.timeline.append(("forward_end", unit.index, time.perf_counter()))
        if torch.is_grad_enabled():
            self._register_pre_backward(unit, output)
        if not _in_backward() and not unit.resident:
            self._release(unit)

    def _register_pre_backward(self, unit: _Unit, output: Any) -> None:
        for t in tree_flatten(output)[0]:
            if isinstance(t, torch.Tensor) and t.requires_grad:
                t.register_hook(lambda grad, unit=unit: self._pre_backward(unit))

    def _backward_sequence(self) -> list[int]:
        """Units in the order their backward runs: the root, then the others reversed."""
        rest = [i for i in self._order if self._root is None or i != self._root.index]
        head = [self._root.index] if self._root is not None else []
        return head + rest[::-1]

    def _pre_backward(self, unit: _Unit) -> None:
        self._begin_backward()
        if unit.backward_ready:
            return
        unit.backward_ready = True
        self._use(unit)
        seq = self._backward_sequence()
        if unit.index in seq:
            self._prefetch(seq, seq.index(unit.index), skip=lambda u: u.reduced)

    # Gradients ---------------------------------------------------------------------------

    def _reduce_sequence(self) -> list[int]:
        """Units in reduce-scatter order: reverse forward order, the root last."""
        seq = self._backward_sequence()
        if self._root is not None:
            seq = seq[1:] + seq[:1]
        seen = set(seq)
        return seq + [u.index for u in self.units if u.index not in seen]

    def _on_grad(self, param: torch.Tensor) -> None:
        self._begin_backward()
        unit, offset, numel = self._where[id(param)]
        if param.grad is not None:
            self._staging_for(unit.group)[offset : offset + numel].copy_(param.grad.reshape(-1))
            self._filled.setdefault(unit.index, set()).add(offset)
            param.grad = None
        self._pending[unit.index] -= 1
        if self._pending[unit.index] == 0:
            self._launch_ready()

    def _launch_ready(self) -> None:
        seq = self._reduce_sequence()
        while self._reduce_pos < len(seq) and self._pending[seq[self._reduce_pos]] == 0:
            self._launch(self.units[seq[self._reduce_pos]])
            self._reduce_pos += 1

    def _launch(self, unit: _Unit) -> None:
        self._start_reduce(unit.group)
        unit.reduced = True
        self._release(unit)
        self._bound_in_flight()

    def _backward_end(self, boundary: bool) -> None:
        seq = self._reduce_sequence()
        for i in seq[self._reduce_pos :]:
            self._launch(self.units[i])
        self._reduce_pos = 0
        self._drain()
        for unit in self.units:
            unit.backward_ready = False
            unit.reduced = False
            self._release(unit)

    # Parameters --------------------------------------------------------------------------

    def param_piece(self, seg: Segment) -> torch.Tensor | None:
        """This rank's master values of `seg`; None when the NVMe optimizer holds the only copy."""
        if self.master is None:
            return None
        return self.master[seg.shard_lo : seg.shard_lo + seg.numel]

    def param_part(self, group: FlatGroup) -> torch.Tensor | None:
        if self.master is None:
            return None
        return self.master[group.shard_offset : group.shard_offset + group.part_numel]

    def drop_master(self, owner: Any) -> bool:
        """Under NVMe optimizer offload the optimizer's files hold the fp32 master: free this
        stage's host copy (ZeRO-Infinity keeps no master in RAM). Only where the master is not
        what a gather reads (a 16-bit working copy, or the parameter file of offload.params:
        nvme). From then on the optimizer writes each updated sub-group through `store_param`
        straight into the working copy, and checkpoints read and write the master in its files
        (engine/ckpt_states.py). Returns whether it was dropped."""
        if self.master is None or (self.work is self.master and self.files is None):
            return False
        self.master_owner = owner
        self.master = None
        return True

    def store_param(self, seg: Segment, values: torch.Tensor) -> Any:
        if self.master is not None:
            return super().store_param(seg, values)
        if self.files is not None:
            self.files.write_cast_at(values, seg.shard_lo)
            return transfer.DONE
        return transfer.to_device(self.work[seg.shard_lo : seg.shard_lo + seg.numel], values)

    def after_update(self) -> None:
        # A unit still gathered (a forward without backward) holds stale values now.
        for unit in self.units:
            self._release(unit)
        self._refresh_work()

    def _refresh_work(self) -> None:
        """Cast the new `master` into `work` (nothing to do when they are the same tensor)."""
        if self.master is None:  # the optimizer wrote each sub-group through store_param
            return
        if self.files is not None:  # cast and write the file (offload.params: nvme)
            self.files.write_cast(self.master)
            return
        if self.work is self.master:
            return
        if self._host_master and not self.params_on_host:  # up from host memory, cast on the way
            transfer.to_device(self.work, self.master).wait()
        else:
            self.work.copy_(self.master)

    def zero_grad(self) -> None:
        self._grad_shard.zero_()
        for g in self.layout.groups:
            for p in g.params:
                p.grad = None

    def param_storages(self) -> set[int]:
        """Storage ids of the gathered-parameter buffers (to tell parameters from activations)."""
        return {u.full.untyped_storage()._cdata for u in self.units}

    def host_master(self) -> torch.Tensor | None:
        return self.master if self._host_master else None

    def memory(self) -> dict[str, int]:
        gathered = sum(nbytes(u.full) for u in self.units)
        staging = sum(nbytes(t) for t in self._staging.values())
        staging += sum(nbytes(s) + (nbytes(o) if o is not s else 0) for _, _, o, s in self._in_flight)
        work = nbytes(self.work) if self.work is not None and self.work is not self.master else 0
        master = nbytes(self.master)
        shard = nbytes(self._grad_shard)
        host = (master if self._host_master else 0) \
            + (shard + nbytes(getattr(self, "_down", None)) if self.grads_on_host else 0)
        if self.params_on_host:  # the 16-bit partition is host memory too (nvme: a file)
            host, work = host + work, 0
        if self.files is not None:
            host += self.files.bounce_bytes + nbytes(self._read_buf)
        return {
            "params_bytes": (0 if self._host_master else master) + work + gathered,
            "grads_bytes": (0 if self.grads_on_host else shard) + staging,
            "host_bytes": host,
            "nvme_bytes": self.files.numel * self.files.elem if self.files is not None else 0,
        }

    def close(self) -> None:
        super().close()
        if self.files is not None:
            self.files.close()
