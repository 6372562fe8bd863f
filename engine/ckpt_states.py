"""Where a checkpoint reads and writes the engine's values: shard-space ranges of each holder.

Three kinds of holder, one interface (`pieces` to save a range, `fill` to load one, `commit`
after a load):

- `Flat`: a tensor in memory, device or host: `stage.param_part(group)` (the values the optimizer
  updates, zero/base.py) and every optimizer state of `DeviceStates`, `CpuOffload` and
  `OnebitAdamStates` (their `read(name)` returns the tensor they update, not a copy). Saving a
  CPU range writes its bytes straight to the file; a device range goes through the staging
  buffer in chunks. Loading reads straight into a CPU range of the file's dtype, else through
  the staging buffer (`copy_` casts when the dtypes differ).
- `NvmeField`: one field of `NvmeOffload`'s sub-group files (each file holds `[master | state_1
  | state_2]` of its sub-group back to back, engine/offload.py), read and written in place by
  byte range, one staging buffer at a time: the state is never whole in memory.
  NvmeOffload has no range API yet, so this reads its `chunks`, `fields`, `dtype` and
  `_file(i)`; a holder without them falls back to `Flat(states.read(name))`, which for
  NvmeOffload is a whole copy of the state (correct, not memory-bounded; logged).
- `Joined`: `SplitStates` (`offload.ratio` < 1): shard space [0, split) is its `host` holder's
  (a CpuOffload of that range), [split, n) its `device` holder's (a DeviceStates of that range);
  a range is cut at the split and each part goes to its holder (`SplitStates.read` would
  concatenate a whole copy).

`fields(states)` picks a holder per optimizer state name; after a load `finish(holders)` hands
each in-memory state back through its owner's `write(name, flat)`: for 1-bit Adam that resets
its error feedback, for the others it copies the tensor onto itself, which torch skips.
"""

from __future__ import annotations

import logging
import os
from bisect import bisect_right
from collections.abc import Iterator
from typing import Any

import torch

from dsl.engine import transfer
from dsl.engine.ckpt_files import RankFile, Staging, raw_bytes

__all__ = ["Flat", "Joined", "NvmeField", "fields", "finish"]

log = logging.getLogger(__name__)


class Flat:
    """A 1-D tensor in memory (any device), addressed by element ranges; `owner.write(name, t)`
    after a load, when it belongs to a state holder."""

    def __init__(self, t: torch.Tensor, owner: Any = None, name: str = "") -> None:
        self.t = t
        self.dtype = t.dtype
        self._owner, self._name = owner, name

    def pieces(self, lo: int, n: int, staging: Staging) -> Iterator[torch.Tensor]:
        src = self.t[lo : lo + n]
        if src.device.type == "cpu" and src.is_contiguous():
            yield src  # the file gets these bytes directly: no copy
            return
        step = staging.numel(src.dtype)
        for i in range(0, n, step):
            (buf,) = staging.take(min(step, n - i), src.dtype)
            transfer.to_host(buf, src[i : i + buf.numel()]).wait()
            yield buf

    def fill(self, lo: int, n: int, file: RankFile, name: str, start: int, staging: Staging) -> None:
        dst = self.t[lo : lo + n]
        if dst.device.type == "cpu" and dst.is_contiguous() and dst.dtype == file.dtype(name):
            file.read_into(name, start, dst)
            return
        for i, buf in file.chunks(name, start, n, staging):
            transfer.to_device(dst[i : i + buf.numel()], buf).wait()

    def commit(self) -> None:
        if self._owner is not None:
            self._owner.write(self._name, self.t)


class Joined:
    """Holders of consecutive ranges: `parts` = [(start, holder)], each holder addressed from
    its start, the last one open-ended."""

    def __init__(self, parts: list[tuple[int, Any]]) -> None:
        self.parts = parts
        self.dtype = parts[0][1].dtype

    def _cut(self, lo: int, n: int) -> Iterator[tuple[Any, int, int, int]]:
        """(holder, start inside it, offset into the request, elements) covering [lo, lo + n)."""
        ends = [s for s, _ in self.parts[1:]] + [lo + n]
        for (start, holder), end in zip(self.parts, ends):
            a, b = max(lo, start), min(lo + n, end)
            if a < b:
                yield holder, a - start, a - lo, b - a

    def pieces(self, lo: int, n: int, staging: Staging) -> Iterator[torch.Tensor]:
        for holder, at, _, m in self._cut(lo, n):
            yield from holder.pieces(at, m, staging)

    def fill(self, lo: int, n: int, file: RankFile, name: str, start: int, staging: Staging) -> None:
        for holder, at, d, m in self._cut(lo, n):
            holder.fill(at, m, file, name, start + d, staging)

    def commit(self) -> None:
        for _, holder in self.parts:
            holder.commit()


class NvmeField:
    """Field `name` of an NvmeOffload's sub-group files."""

    def __init__(self, states: Any, name: str) -> None:
        self.states = states
        self.dtype: torch.dtype = states.dtype
        self._k = list(states.fields).index(name)
        self._chunks: list[tuple[int, int]] = list(states.chunks)
        self._starts = [lo for lo, _ in self._chunks]

    def _spans(self, lo: int, n: int) -> Iterator[tuple[Any, int, int, int]]:
        """(file, byte offset in it, offset into the request, elements) covering [lo, lo + n)."""
        size = self.dtype.itemsize
        at, end = lo, lo + n
        i = bisect_right(self._starts, lo) - 1
        while at < end:
            c_lo, c_hi = self._chunks[i]
            m = min(end, c_hi) - at
            yield self.states._file(i), (self._k * (c_hi - c_lo) + at - c_lo) * size, at - lo, m
            at += m
            i += 1

    def _io(self, lo: int, t: torch.Tensor, write: bool) -> None:
        size = t.element_size()
        view = raw_bytes(t)
        for path, offset, d, m in self._spans(lo, t.numel()):
            part = view[d * size : (d + m) * size]
            fd = os.open(path, os.O_RDWR if write else os.O_RDONLY)
            try:
                done = 0
                while done < len(part):
                    got = (os.pwritev if write else os.preadv)(fd, [part[done:]], offset + done)
                    if got <= 0:
                        raise OSError(f"{path}: short {'write' if write else 'read'} at {offset + done}")
                    done += got
            finally:
                os.close(fd)

    def pieces(self, lo: int, n: int, staging: Staging) -> Iterator[torch.Tensor]:
        step = staging.numel(self.dtype)
        for i in range(0, n, step):
            (buf,) = staging.take(min(step, n - i), self.dtype)
            self._io(lo + i, buf, write=False)
            yield buf

    def fill(self, lo: int, n: int, file: RankFile, name: str, start: int, staging: Staging) -> None:
        src_dtype = file.dtype(name)
        if src_dtype == self.dtype:
            for i, buf in file.chunks(name, start, n, staging):
                self._io(lo + i, buf, write=True)
            return
        step = staging.numel(src_dtype, self.dtype)
        for i in range(0, n, step):
            src, dst = staging.take(min(step, n - i), src_dtype, self.dtype)
            file.read_into(name, start + i, src)
            dst.copy_(src)
            self._io(lo + i, dst, write=True)

    def commit(self) -> None:
        """Nothing: the files were written in place."""


def _nvme_files(states: Any) -> bool:
    return getattr(states, "kind", None) == "nvme" and all(
        hasattr(states, a) for a in ("chunks", "fields", "dtype", "_file"))


def fields(states: Any) -> dict[str, Flat | NvmeField | Joined]:
    """A holder per optimizer state name of `states` (engine/offload.py, engine/onebit.py)."""
    if all(hasattr(states, a) for a in ("split", "host", "device")):  # SplitStates
        host, device = fields(states.host), fields(states.device)
        return {k: Joined([(0, host[k]), (states.split, device[k])]) for k in states.names}
    if _nvme_files(states):
        return {k: NvmeField(states, k) for k in states.names}
    if getattr(states, "kind", None) == "nvme":
        log.warning("NVMe offload without sub-group file access: the checkpoint reads and writes "
                    "each optimizer state whole (one shard-space copy in host memory)")
    return {k: Flat(states.read(k), states, k) for k in states.names}


def param_holder(stage: Any, states: Any, group: Any) -> tuple[Flat | NvmeField, int]:
    """Where this rank's master values of `group` are, and the offset of the group's partition in
    it: the stage's `param_part(group)` (offset 0), or, when stage 3 dropped its master under NVMe
    optimizer offload (zero/stage3.py `drop_master`), the `master` field of the optimizer's
    sub-group files (offset: the group's place in shard space)."""
    part = stage.param_part(group)
    if part is not None:
        return Flat(part), 0
    return NvmeField(states, "master"), group.shard_offset


def finish(holders: dict[str, Flat | NvmeField | Joined]) -> None:
    """After a load: tell each owner its in-memory states changed (see the module docstring)."""
    for h in holders.values():
        h.commit()
