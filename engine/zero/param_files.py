"""Stage 3's parameter partition in a file (`offload.params: nvme`, ZeRO-Infinity's offload_param
to NVMe): the partition a gather reads (engine/zero/stage3.py's gather source, in the dtype the
model computes with) lives in one file per rank under `offload.nvme_path`, in shard-space order,
and is read by byte range when a unit is gathered and rewritten after every update.

- `read(dst, lo)`: elements [lo, lo + dst.numel()) of the shard space into `dst`. On a CPU device
  `dst` is the rank's slice of the unit's gathered buffer itself; on a GPU it is a host bounce
  buffer (page-locked when pinned) that stage3.py then copies up.
- `write_cast(src)`: the whole shard space from `src` (the fp32 master partition, in host memory),
  cast to the file's dtype through one bounce buffer of `chunk_numel` elements; `write_cast_at`
  a range of it (the updated master of one sub-group, when the NVMe optimizer holds the only
  master: zero/stage3.py `drop_master`).
- `bytes_read` / `bytes_written` count what moved, for the memory model's bytes-per-step figures
  (engine/memory_nvme.py `nvme_param_traffic`) and the tests.

The file and its folder are deleted by `close()`, or at interpreter exit when the engine is
dropped without it.
"""

from __future__ import annotations

import ctypes
import os
import shutil
import uuid
import weakref
from pathlib import Path

import torch

from dsl.engine import transfer

__all__ = ["ParamFile"]


def _remove_tree(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)


def _bytes(t: torch.Tensor) -> memoryview:
    """The bytes of contiguous host tensor `t`, without `Tensor.numpy()` (which would make the
    storage non-resizable for good, and stage 3 resizes its gathered buffers to 0)."""
    assert t.is_contiguous() and t.device.type == "cpu"
    return memoryview((ctypes.c_char * (t.numel() * t.element_size())).from_address(t.data_ptr())).cast("B")


class ParamFile:
    """One rank's parameter partition (`numel` elements of `dtype`) in a file."""

    def __init__(self, folder: str | os.PathLike, *, rank: int, numel: int, dtype: torch.dtype,
                 chunk_numel: int, pinned: bool = False) -> None:
        self.dir = Path(folder) / f"dsl-params-rank{rank}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self.dir.mkdir(parents=True)
        self._finalizer = weakref.finalize(self, _remove_tree, self.dir)
        self.path = self.dir / "partition.bin"
        self.numel = numel
        self.dtype = dtype
        self.elem = torch.empty((), dtype=dtype).element_size()
        self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
        os.ftruncate(self._fd, numel * self.elem)
        self._bounce = transfer.host_empty(max(1, min(numel, chunk_numel)), dtype, pinned=pinned)
        self.bytes_read = 0
        self.bytes_written = 0

    @property
    def bounce_bytes(self) -> int:
        return self._bounce.numel() * self.elem

    def read(self, dst: torch.Tensor, lo: int) -> None:
        """Shard-space elements [lo, lo + dst.numel()) into `dst` (contiguous host memory)."""
        view, done, offset = _bytes(dst), 0, lo * self.elem
        while done < len(view):
            got = os.preadv(self._fd, [view[done:]], offset + done)
            if not got:
                raise OSError(f"{self.path}: {done} of {len(view)} bytes at offset {offset}")
            done += got
        self.bytes_read += len(view)

    def write_cast(self, src: torch.Tensor) -> None:
        """The whole partition from `src` (host memory, any float dtype), cast to the file's dtype."""
        step = self._bounce.numel()
        for lo in range(0, self.numel, step):
            n = min(step, self.numel - lo)
            buf = self._bounce[:n]
            buf.copy_(src[lo : lo + n])
            view, done = _bytes(buf), 0
            while done < len(view):
                done += os.pwritev(self._fd, [view[done:]], lo * self.elem + done)
            self.bytes_written += len(view)

    def write_cast_at(self, values: torch.Tensor, lo: int) -> None:
        """Shard-space elements [lo, lo + values.numel()) from `values` (host memory), cast."""
        step = self._bounce.numel()
        for i in range(0, values.numel(), step):
            n = min(step, values.numel() - i)
            buf = self._bounce[:n]
            buf.copy_(values[i : i + n])
            view, done, offset = _bytes(buf), 0, (lo + i) * self.elem
            while done < len(view):
                done += os.pwritev(self._fd, [view[done:]], offset + done)
            self.bytes_written += len(view)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        self._finalizer()
