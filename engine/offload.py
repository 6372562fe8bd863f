"""Where the optimizer states live and the update runs: on the device, in CPU memory, or on NVMe.

All three hold this rank's shard space (zero/layout.py): the optimizer states of its partition,
and update the stage's parameter partition (`stage.param_piece(segment)`) from this rank's
gradient partition (`stage.grad_flat`).

- `DeviceStates` (offload none): states are flat device tensors; the update writes the
  parameter pieces in place (under autocast-style mixed precision the fp32 parameters are the
  master weights, so there is no separate master copy).
- `CpuOffload` (offload.optimizer: cpu): fp32 master weights and states in CPU memory. Per
  sub-group of `sub_group_mib` (shard space in order): the gradient piece is copied out to a CPU
  buffer, dsl.ops.adam's fused C++ AdamW updates the CPU master, and the updated master is
  copied back into the device parameters. With a CUDA device the host side is page-locked
  (`offload.pin_memory`, default true) and the copies are asynchronous (engine/transfer.py):
  sub-group i+1's gradient comes down while sub-group i is updated on the CPU, and i's
  parameters go up while i+1 is updated; the step waits for the last upload before it returns.
  On a CPU-only host "device" and "CPU" are the same memory, but the copies are real (the same
  code moves data across PCIe on a GPU host). Holds: master + states (CPU) and two
  sub-group-sized gradient buffers (one without a GPU, where copies cannot overlap).
  Where the stage keeps its own master partition in host memory (zero/base.py `host_master`:
  the master layout, stage 3's fp32 shard behind its 16-bit copy, parameter offload) that tensor
  *is* this offload's master: no second copy, nothing copied up by the offload (the stage casts
  it into the 16-bit parameters in `after_update`). Where the stage keeps the gradient partition
  in host memory (`grads_on_host`, stages 2-3) the update reads it in place: no gradient buffer.
- `NvmeOffload` (offload.optimizer: nvme): master weights and states of each sub-group in one file
  under `nvme_path` (`[master | state_1 | state_2]` back to back). A step streams the sub-groups
  through three CPU buffers: while sub-group i is updated, sub-group i+1 is read and i-1 written
  by a 2-thread pool (file I/O releases the GIL, so it overlaps the update). The gradient piece
  is copied to a host buffer first and the updated master back to the device, as `CpuOffload`
  does (pinned and asynchronous on CUDA). Holds: three state buffers and one or two gradient
  buffers (as `CpuOffload`) in CPU memory and the files on disk; `close()` (also at interpreter
  exit) deletes the files and their folder.
- `SplitStates` (offload.optimizer: cpu with `offload.ratio` < 1): a `CpuOffload` of the first
  `ratio` of the shard space and a `DeviceStates` of the rest (each takes a shard-space range).

All of them expose `step(grad_flat, step=, lr=)`, `read(name)` / `write(name, flat)` of a whole
shard-space tensor (`master` or a state name, for checkpoints), `sync_from_params()` (take the
master weights from the device parameters after a checkpoint load) and `memory()`.
"""

from __future__ import annotations

import os
import shutil
import uuid
import weakref
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import torch

from dsl.engine import transfer
from dsl.engine.errors import UserError
from dsl.engine.optim import STATE_NAMES, Hyper, update
from dsl.engine.zero.base import ZeroStage, nbytes
from dsl.engine.zero.layout import Segment, clip_segments

__all__ = ["DeviceStates", "CpuOffload", "NvmeOffload", "SplitStates", "build_states", "grad_buffers", "split_point"]

_MIB = 1 << 20


class DeviceStates:
    """Optimizer states on the device, parameters updated in place."""

    kind = "none"

    def __init__(self, stage: ZeroStage, hyper: Hyper, dtype: torch.dtype, device: torch.device,
                 lo: int = 0, hi: int | None = None) -> None:
        """States of shard-space range [lo, hi) (default: all of it; `SplitStates` uses a part)."""
        self.stage = stage
        self.hyper = hyper
        self.names = STATE_NAMES[hyper.kind]
        self.lo, self.hi = lo, stage.layout.shard_numel if hi is None else hi
        self.flats = {name: torch.zeros(self.hi - lo, dtype=dtype, device=device) for name in self.names}
        self._segs = clip_segments(stage.layout.segments, self.lo, self.hi)
        self._params = [stage.param_piece(s) for s in self._segs]
        self._states = {k: [_piece(f, s, lo) for s in self._segs] for k, f in self.flats.items()}
        self._decay = [s.decay for s in self._segs]

    def step(self, grad_flat: torch.Tensor, *, step: int, lr: float, seed: int = 0) -> None:
        grads = [_piece(grad_flat, s) for s in self._segs]
        update(self.hyper, self._params, grads, self._states, self._decay, step=step, lr=lr, seed=seed)

    def read(self, name: str) -> torch.Tensor:
        return self.flats[name]

    def write(self, name: str, flat: torch.Tensor) -> None:
        self.flats[name].copy_(flat)

    def sync_from_params(self) -> None:
        """Nothing: the parameters are the master weights."""

    def memory(self) -> dict[str, int]:
        return {"optimizer_states_bytes": sum(nbytes(f) for f in self.flats.values()),
                "offload_cpu_bytes": 0, "offload_nvme_bytes": 0}

    def close(self) -> None:
        pass


def _piece(flat: torch.Tensor, seg: Segment, base: int = 0) -> torch.Tensor:
    lo = seg.shard_lo - base
    return flat[lo : lo + seg.numel]


_ALIGN = 256
"""Sub-group boundaries inside a segment fall on multiples of this many elements from the
segment's start: the fused kernel handles the same elements in its vector loop and its scalar
tail as an unsplit update would, so offloaded runs match non-offloaded ones bit for bit."""


def _chunks(segments: list[Segment], total: int, size: int) -> list[tuple[int, int]]:
    """Sub-groups [lo, hi) of about `size` elements covering shard space [0, total)."""
    out, lo = [], 0
    size = max(size, _ALIGN)
    while lo < total:
        hi = min(lo + size, total)
        inside = next((s for s in segments if s.shard_lo < hi < s.shard_lo + s.numel), None)
        if inside is not None:
            hi = inside.shard_lo + (hi - inside.shard_lo) // _ALIGN * _ALIGN
            if hi <= lo:
                hi = min(inside.shard_lo + ((lo - inside.shard_lo) // _ALIGN + 1) * _ALIGN,
                         inside.shard_lo + inside.numel)
        out.append((lo, hi))
        lo = hi
    return out


def _host_zeros(numel: int, dtype: torch.dtype, pinned: bool) -> torch.Tensor:
    return transfer.host_empty(numel, dtype, pinned=pinned).zero_()


def grad_buffers(pinned: bool) -> int:
    """Host gradient buffers of an offload: two when copies are asynchronous (pinned, CUDA),
    one when every copy completes before the call returns (a second would change nothing)."""
    return 2 if pinned else 1


class _GradStream:
    """The gradient partition coming down to the host one sub-group at a time. With two
    buffers sub-group i+1's copy runs while the caller updates sub-group i."""

    def __init__(self, width: int, dtype: torch.dtype, pinned: bool, direct: bool = False) -> None:
        self.direct = direct
        """The gradient partition is host memory already (zero/base.py grads_on_host): its
        sub-groups are read in place, no buffer, no copy."""
        self.bufs = [] if direct else [_host_zeros(width, dtype, pinned) for _ in range(grad_buffers(pinned))]

    def pieces(self, grad_flat: torch.Tensor, chunks: list[tuple[int, int]]):
        """Yield (i, lo, hi, host copy of grad_flat[lo:hi]) in order, each already arrived."""
        if self.direct:
            for i, (lo, hi) in enumerate(chunks):
                yield i, lo, hi, grad_flat[lo:hi]
            return
        ahead = len(self.bufs) > 1

        def fetch(i: int) -> tuple[torch.Tensor, transfer.Pending]:
            lo, hi = chunks[i]
            buf = self.bufs[i % len(self.bufs)][: hi - lo]
            return buf, transfer.to_host(buf, grad_flat[lo:hi])

        nxt = fetch(0) if chunks and ahead else None
        for i, (lo, hi) in enumerate(chunks):
            buf, pending = nxt if ahead else fetch(i)
            if ahead and i + 1 < len(chunks):
                # Buffer (i+1) % 2 held sub-group i-1, whose update has returned.
                nxt = fetch(i + 1)
            pending.wait()
            yield i, lo, hi, buf

    def nbytes(self) -> int:
        return sum(nbytes(b) for b in self.bufs)


class CpuOffload:
    """Master weights and optimizer states in CPU memory; gradients out, parameters back."""

    kind = "cpu"

    def __init__(self, stage: ZeroStage, hyper: Hyper, dtype: torch.dtype, sub_group_numel: int,
                 pinned: bool = False, hi: int | None = None) -> None:
        """States of shard-space range [0, hi) (default: all of it; `SplitStates` uses a part)."""
        self.stage = stage
        self.hyper = hyper
        self.names = STATE_NAMES[hyper.kind]
        self.pinned = pinned
        n = stage.layout.shard_numel if hi is None else hi
        self._segs = clip_segments(stage.layout.segments, 0, n)
        shared = stage.host_master() if hi is None else None
        self.shared_master = shared is not None
        """The stage keeps its fp32 master partition in host memory (zero/base.py): it is this
        offload's master too, updated in place, never copied up or down by the offload."""
        self.master = shared if shared is not None else _host_zeros(n, dtype, pinned)
        self.flats = {name: _host_zeros(n, dtype, pinned) for name in self.names}
        self.chunks = _chunks(self._segs, n, sub_group_numel)
        width = 0 if stage.grads_on_host else max((b - a for a, b in self.chunks), default=0)
        self._grads = _GradStream(width, dtype, pinned, direct=stage.grads_on_host)
        self.sync_from_params()

    def sync_from_params(self) -> None:
        if self.shared_master:
            return
        with torch.no_grad():
            for s in self._segs:
                transfer.to_host(_piece(self.master, s), self.stage.param_piece(s)).wait()

    def step(self, grad_flat: torch.Tensor, *, step: int, lr: float, seed: int = 0) -> None:
        segments = self._segs
        last: transfer.Pending | None = None
        for _, lo, hi, grad in self._grads.pieces(grad_flat, self.chunks):
            segs = clip_segments(segments, lo, hi)
            if not segs:
                continue
            params = [_piece(self.master, s) for s in segs]
            update(
                self.hyper, params, [_piece(grad, s, lo) for s in segs],
                {k: [_piece(f, s) for s in segs] for k, f in self.flats.items()},
                [s.decay for s in segs], step=step, lr=lr, seed=seed,
            )  # fmt: skip
            if self.shared_master:  # updated in place: the stage casts it up (after_update)
                continue
            for s, p in zip(segs, params):
                last = transfer.to_device(self.stage.param_piece(s), p)  # CPU -> device
        if last is not None:  # uploads run in order on one stream: the last one ends them all
            last.wait()

    def read(self, name: str) -> torch.Tensor:
        return self.master if name == "master" else self.flats[name]

    def write(self, name: str, flat: torch.Tensor) -> None:
        self.read(name).copy_(flat)

    def memory(self) -> dict[str, int]:
        host = (0 if self.shared_master else nbytes(self.master)) + sum(nbytes(f) for f in self.flats.values()) \
            + self._grads.nbytes()
        return {"optimizer_states_bytes": 0, "offload_cpu_bytes": host, "offload_nvme_bytes": 0}

    def close(self) -> None:
        pass


def _remove_tree(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)


class NvmeOffload:
    """Master weights and optimizer states in files, streamed through CPU buffers per sub-group."""

    kind = "nvme"
    _BUFFERS = 3

    def __init__(
        self, stage: ZeroStage, hyper: Hyper, dtype: torch.dtype, sub_group_numel: int, path: str | os.PathLike,
        pinned: bool = False,
    ) -> None:
        self.stage = stage
        self.hyper = hyper
        self.names = STATE_NAMES[hyper.kind]
        self.fields = ("master", *self.names)
        self.dtype = dtype
        self.chunks = _chunks(stage.layout.segments, stage.layout.shard_numel, sub_group_numel)
        self.dir = Path(path) / f"dsl-optimizer-rank{stage.rank}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self.dir.mkdir(parents=True)
        # Delete the files even when close() is never called (interpreter exit, engine dropped).
        self._finalizer = weakref.finalize(self, _remove_tree, self.dir)
        width = max((hi - lo for lo, hi in self.chunks), default=0)
        self._bufs = [_host_zeros(len(self.fields) * width, dtype, pinned) for _ in range(self._BUFFERS)]
        self._grads = _GradStream(width, dtype, pinned)
        self._pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="dsl-nvme")
        for i, (lo, hi) in enumerate(self.chunks):
            buf = self._bufs[0]
            buf.zero_()
            self._fill_master(buf, lo, hi)
            self._write_file(i, buf)

    # Files -------------------------------------------------------------------------------

    def _file(self, i: int) -> Path:
        return self.dir / f"subgroup-{i:05d}.bin"

    def _nbytes(self, i: int) -> int:
        lo, hi = self.chunks[i]
        return len(self.fields) * (hi - lo) * self._bufs[0].element_size()

    def _bytes_view(self, buf: torch.Tensor, i: int) -> memoryview:
        return memoryview(buf.view(torch.uint8).numpy())[: self._nbytes(i)]

    def _read_file(self, i: int, buf: torch.Tensor) -> None:
        with open(self._file(i), "rb", buffering=0) as f:
            view, done = self._bytes_view(buf, i), 0
            while done < len(view):
                got = f.readinto(view[done:])
                if not got:
                    raise OSError(f"{self._file(i)}: {done} of {len(view)} bytes")
                done += got

    def _write_file(self, i: int, buf: torch.Tensor) -> None:
        with open(self._file(i), "wb", buffering=0) as f:
            view, done = self._bytes_view(buf, i), 0
            while done < len(view):
                done += f.write(view[done:])

    def _field(self, buf: torch.Tensor, i: int, name: str) -> torch.Tensor:
        lo, hi = self.chunks[i]
        k = self.fields.index(name)
        return buf[k * (hi - lo) : (k + 1) * (hi - lo)]

    def _fill_master(self, buf: torch.Tensor, lo: int, hi: int) -> None:
        master = buf[: hi - lo]
        with torch.no_grad():
            for s in clip_segments(self.stage.layout.segments, lo, hi):
                transfer.to_host(_piece(master, s, lo), self.stage.param_piece(s)).wait()

    # Step --------------------------------------------------------------------------------

    def step(self, grad_flat: torch.Tensor, *, step: int, lr: float, seed: int = 0) -> None:
        n = len(self.chunks)
        bufs = self._bufs
        reads: dict[int, Future] = {}
        writes: dict[int, Future] = {}
        uploads: dict[int, transfer.Pending] = {}
        if n:
            reads[0] = self._pool.submit(self._read_file, 0, bufs[0])
        segments = self.stage.layout.segments
        try:
            for i, lo, hi, grad in self._grads.pieces(grad_flat, self.chunks):
                buf = bufs[i % self._BUFFERS]
                reads.pop(i).result()
                if i + 1 < n:
                    # Buffer (i+1) % 3 was last used by sub-group i-2: its upload and its write.
                    if i - 2 in uploads:
                        uploads.pop(i - 2).wait()
                    if i - 2 in writes:
                        writes.pop(i - 2).result()
                    reads[i + 1] = self._pool.submit(self._read_file, i + 1, bufs[(i + 1) % self._BUFFERS])
                segs = clip_segments(segments, lo, hi)
                master = self._field(buf, i, "master")
                params = [_piece(master, s, lo) for s in segs]
                update(
                    self.hyper, params, [_piece(grad, s, lo) for s in segs],
                    {k: [_piece(self._field(buf, i, k), s, lo) for s in segs] for k in self.names},
                    [s.decay for s in segs], step=step, lr=lr, seed=seed,
                )  # fmt: skip
                for s, p in zip(segs, params):
                    uploads[i] = self.stage.store_param(s, p)  # CPU -> device (or the stage's file)
                writes[i] = self._pool.submit(self._write_file, i, buf)
        finally:
            for f in [*reads.values(), *writes.values()]:
                f.result()
            for pending in uploads.values():
                pending.wait()

    # Whole-tensor access (checkpoints) -----------------------------------------------------

    def read(self, name: str) -> torch.Tensor:
        out = torch.empty(self.stage.layout.shard_numel, dtype=self.dtype)
        buf = self._bufs[0]
        for i, (lo, hi) in enumerate(self.chunks):
            self._read_file(i, buf)
            out[lo:hi].copy_(self._field(buf, i, name))
        return out

    def write(self, name: str, flat: torch.Tensor) -> None:
        buf = self._bufs[0]
        for i, (lo, hi) in enumerate(self.chunks):
            self._read_file(i, buf)
            self._field(buf, i, name).copy_(flat[lo:hi])
            self._write_file(i, buf)

    def sync_from_params(self) -> None:
        buf = self._bufs[0]
        if getattr(self.stage, "master_owner", None) is self:
            # The files are the only master (stage 3 dropped its copy: zero/stage3.py
            # `drop_master`); a checkpoint load wrote them, so the stage's parameters follow them.
            for i, (lo, hi) in enumerate(self.chunks):
                self._read_file(i, buf)
                master = self._field(buf, i, "master")
                for s in clip_segments(self.stage.layout.segments, lo, hi):
                    self.stage.store_param(s, _piece(master, s, lo)).wait()
            return
        for i, (lo, hi) in enumerate(self.chunks):
            self._read_file(i, buf)
            self._fill_master(buf, lo, hi)
            self._write_file(i, buf)

    def memory(self) -> dict[str, int]:
        files = sum(self._nbytes(i) for i in range(len(self.chunks)))
        return {"optimizer_states_bytes": 0,
                "offload_cpu_bytes": sum(nbytes(b) for b in self._bufs) + self._grads.nbytes(),
                "offload_nvme_bytes": files}

    def close(self) -> None:
        self._pool.shutdown(wait=True)
        self._finalizer()


class SplitStates:
    """Partial optimizer offload (`offload.ratio` < 1, ZeRO-Offload++ / SuperOffload): shard
    space [0, split) is updated by the CPU optimizer (`CpuOffload` of that range, its own fp32
    master and moments in host memory), [split, n) on the device (`DeviceStates` of that range).
    The split is `ratio` of this rank's shard space, moved down to a multiple of 256 elements from
    its segment's start (the alignment `_chunks` keeps, so the fused kernel's vector loop sees the
    same elements as an unsplit update: losses are bit-identical to no offload in fp32). A step
    queues the device part first (asynchronous on a GPU), then runs the host part."""

    kind = "cpu"

    def __init__(self, stage: ZeroStage, hyper: Hyper, dtype: torch.dtype, device: torch.device,
                 sub_group_numel: int, ratio: float, pinned: bool) -> None:
        self.split = split_point(stage.layout.segments, stage.layout.shard_numel, ratio)
        self.names = STATE_NAMES[hyper.kind]
        self.host = CpuOffload(stage, hyper, dtype, sub_group_numel, pinned=pinned, hi=self.split)
        self.device = DeviceStates(stage, hyper, dtype, device, lo=self.split)

    def step(self, grad_flat: torch.Tensor, *, step: int, lr: float, seed: int = 0) -> None:
        self.device.step(grad_flat, step=step, lr=lr, seed=seed)
        self.host.step(grad_flat, step=step, lr=lr, seed=seed)

    def read(self, name: str) -> torch.Tensor:
        dev = self.device.read(name)
        return torch.cat([self.host.read(name).to(dev.device), dev])

    def write(self, name: str, flat: torch.Tensor) -> None:
        self.host.write(name, flat[: self.split])
        self.device.write(name, flat[self.split :])

    def sync_from_params(self) -> None:
        self.host.sync_from_params()

    def memory(self) -> dict[str, int]:
        h, d = self.host.memory(), self.device.memory()
        return {"optimizer_states_bytes": d["optimizer_states_bytes"], "offload_cpu_bytes": h["offload_cpu_bytes"],
                "offload_nvme_bytes": 0}

    def close(self) -> None:
        self.host.close()
        self.device.close()


def split_point(segments: list[Segment], total: int, ratio: float) -> int:
    """`ratio` of [0, total), moved down to a multiple of _ALIGN from its segment's start."""
    at = int(total * ratio)
    inside = next((s for s in segments if s.shard_lo < at < s.shard_lo + s.numel), None)
    if inside is not None:
        at = inside.shard_lo + (at - inside.shard_lo) // _ALIGN * _ALIGN
    return at


def build_states(stage: ZeroStage, hyper: Hyper, *, offload: str, dtype: torch.dtype, device: torch.device,
                 sub_group_mib: float, nvme_path: str | None, pin_memory: bool = True, ratio: float = 1.0):
    """The state holder for `offload` (none | cpu | nvme; with cpu, `ratio` of it on the host);
    host buffers are page-locked when `pin_memory` and the device is a GPU (engine/transfer.py)."""
    sub_group_numel = max(1, int(sub_group_mib * _MIB) // torch.empty((), dtype=dtype).element_size())
    pinned = pin_memory and transfer.use_pinned(device)
    if offload == "cpu" and ratio < 1.0:
        return SplitStates(stage, hyper, dtype, device, sub_group_numel, ratio, pinned)
    if offload == "cpu":
        return CpuOffload(stage, hyper, dtype, sub_group_numel, pinned=pinned)
    if offload == "nvme":
        if not nvme_path:
            raise UserError("offload.optimizer: nvme needs offload.nvme_path (a folder on a fast disk)")
        return NvmeOffload(stage, hyper, dtype, sub_group_numel, nvme_path, pinned=pinned)
    return DeviceStates(stage, hyper, dtype, device)
