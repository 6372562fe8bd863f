"""Per-rank checkpoint files: the safetensors layout, written as a stream, read by byte range.

A file is `[u64 little-endian N][N bytes of JSON header][data]`, the layout of Hugging Face
safetensors (github.com/huggingface/safetensors, "Format"): the header maps each tensor name to
`{"dtype": "F32" | "BF16" | ..., "shape": [...], "data_offsets": [begin, end]}` (bytes into the
data section, back to back in header order) and holds `__metadata__`, a str -> str map. So
`safetensors.safe_open(path, "pt")` opens these files too; dsl itself needs no safetensors
package (the format is a few lines to write and read).

Why not `torch.save`: it pickles whole storages, so saving a slice of a flat buffer writes the
whole buffer unless the slice is copied first, and a file is written only once every tensor is
in memory. Here the header is computed from the entries' sizes alone, then each entry's bytes
go to the file straight from the memory that holds them (a CPU tensor: no copy at all) or
through one bounded `Staging` buffer (a device tensor, an NVMe-offloaded state). Reading is
positioned reads (`os.preadv`) of exactly the requested elements into the destination (a CPU
tensor of the file's dtype) or into a staging buffer: a rank reads only the bytes of its slices,
and nothing is memory-mapped, so the page cache, not the process, holds what was read.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from dsl.engine.errors import UserError
from dsl.engine.writefail import write_failed

__all__ = ["Entry", "Staging", "RankFile", "write_file", "raw_bytes", "DTYPES"]

DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}
"""safetensors dtype names (the ones torch and the engine use)."""
_NAMES = {v: k for k, v in DTYPES.items()}


def raw_bytes(t: torch.Tensor) -> memoryview:
    """The bytes of CPU contiguous `t`, without a copy."""
    return memoryview(t.detach().reshape(-1).view(torch.uint8).numpy())


@dataclass
class Entry:
    """One tensor of a file: its name, dtype, shape, and `pieces()`: CPU contiguous tensors of
    that dtype whose bytes, in order, are the tensor's (called once, while the file is written)."""

    name: str
    dtype: torch.dtype
    shape: list[int]
    pieces: Callable[[], Iterable[torch.Tensor]]

    @property
    def nbytes(self) -> int:
        numel = 1
        for d in self.shape:
            numel *= d
        return numel * self.dtype.itemsize


class Staging:
    """One host buffer, reused for every copy that cannot go straight between a tensor and a
    file: the bound on a save's or a load's extra memory. Its size is fixed before first use
    (`cap_bytes`, lowered by `limit()` to what the largest request can need) and it is
    allocated, whole, on the first request that needs it, so it never grows (growing would hold
    the old and the new buffer at once)."""

    def __init__(self, cap_bytes: int) -> None:
        self.cap_bytes = max(64, int(cap_bytes))
        self._buf: torch.Tensor | None = None

    def limit(self, nbytes: int) -> None:
        """No request will need more than `nbytes`: allocate no more than that."""
        if self._buf is None:
            self.cap_bytes = max(64, min(self.cap_bytes, int(nbytes) + 16))

    def numel(self, *dtypes: torch.dtype) -> int:
        """Elements per chunk when one chunk of each dtype must fit at once."""
        per = sum(d.itemsize for d in dtypes)
        return max(1, (self.cap_bytes - 8 * len(dtypes)) // per)

    def take(self, numel: int, *dtypes: torch.dtype) -> list[torch.Tensor]:
        """One [numel] view per dtype, back to back (8-byte aligned) in the buffer."""
        sizes = [-(-numel * d.itemsize // 8) * 8 for d in dtypes]
        if sum(sizes) > self.cap_bytes:
            raise ValueError(f"staging request of {sum(sizes)} bytes over its size of {self.cap_bytes}")
        if self._buf is None:
            self._buf = torch.empty(self.cap_bytes, dtype=torch.uint8)
        out, at = [], 0
        for d, size in zip(dtypes, sizes):
            out.append(self._buf[at : at + numel * d.itemsize].view(d))
            at += size
        return out

    @property
    def nbytes(self) -> int:
        """Bytes allocated (0 when every copy went straight to or from a tensor)."""
        return 0 if self._buf is None else self._buf.numel()


def write_file(path: Path, entries: list[Entry], metadata: dict[str, str]) -> int:
    """Write `entries` to `path` (safetensors layout), fsync it; returns the bytes written.
    Raises WriteError when the file cannot be written (a full disk)."""
    header: dict[str, Any] = {"__metadata__": metadata}
    offset = 0
    for e in entries:
        header[e.name] = {"dtype": _NAMES[e.dtype], "shape": list(e.shape), "data_offsets": [offset, offset + e.nbytes]}
        offset += e.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the data section starts 8-byte aligned, as safetensors writes it
    try:
        _write_entries(path, raw, entries)
    except OSError as err:  # a full disk: name the file and the free space (engine/writefail.py)
        raise write_failed(path, err, "checkpoint file") from None
    return 8 + len(raw) + offset


def _write_entries(path: Path, raw: bytes, entries: list[Entry]) -> None:
    with open(path, "wb", buffering=0) as f:
        _write_all(f, memoryview(struct.pack("<Q", len(raw)) + raw))
        for e in entries:
            done = 0
            for piece in e.pieces():
                if piece.dtype != e.dtype:
                    raise ValueError(f"{e.name}: a {piece.dtype} piece in a {e.dtype} entry")
                done += _write_all(f, raw_bytes(piece))
            if done != e.nbytes:
                raise ValueError(f"{e.name}: wrote {done} bytes, the header says {e.nbytes}")
        os.fsync(f.fileno())


def _write_all(f: Any, view: memoryview) -> int:
    done = 0
    while done < len(view):
        done += f.write(view[done:])
    return done


class RankFile:
    """A file written by `write_file`, for positioned reads. The constructor reads the header
    only; the file descriptor can be closed between reads (`close()`; the next read reopens it),
    so a reader of many files keeps few open."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd: int | None = os.open(path, os.O_RDONLY)
        try:
            (n,) = struct.unpack("<Q", self._pread(8, 0))
            header = json.loads(self._pread(n, 8))
            self._data = 8 + n
            self.metadata: dict[str, str] = header.pop("__metadata__", {}) or {}
            self.tensors: dict[str, tuple[torch.dtype, list[int], int, int]] = {
                name: (DTYPES[t["dtype"]], list(t["shape"]), *t["data_offsets"]) for name, t in header.items()
            }
        except (struct.error, ValueError, KeyError, TypeError) as err:
            self.close()
            raise UserError(f"{path}: not a dsl checkpoint file ({type(err).__name__}: {err})") from None

    def _pread(self, n: int, offset: int) -> bytes:
        if self._fd is None:
            self._fd = os.open(self.path, os.O_RDONLY)
        out = os.pread(self._fd, n, offset)
        if len(out) != n:
            raise UserError(f"{self.path}: {len(out)} of {n} bytes at offset {offset}: the file is truncated")
        return out

    def dtype(self, name: str) -> torch.dtype:
        return self.tensors[name][0]

    def read_into(self, name: str, start: int, out: torch.Tensor) -> None:
        """Elements [start, start + out.numel()) of flattened tensor `name` into `out` (CPU,
        contiguous, the tensor's dtype)."""
        dtype, _, begin, end = self.tensors[name]
        if out.dtype != dtype:
            raise ValueError(f"{self.path}: {name} is {dtype}, asked to read it as {out.dtype}")
        size = out.element_size()
        lo = self._data + begin + start * size
        view = raw_bytes(out)
        if start < 0 or lo + len(view) > self._data + end:
            raise UserError(f"{self.path}: elements [{start}, {start + out.numel()}) are outside {name}")
        if self._fd is None:
            self._fd = os.open(self.path, os.O_RDONLY)
        done = 0
        while done < len(view):
            got = os.preadv(self._fd, [view[done:]], lo + done)
            if got <= 0:
                raise UserError(f"{self.path}: {name} ends early: the file is truncated")
            done += got

    def chunks(self, name: str, start: int, numel: int, staging: Staging) -> Iterator[tuple[int, torch.Tensor]]:
        """(offset, values) chunks of elements [start, start + numel) of `name` read into the
        staging buffer (each valid until the next one is produced)."""
        dtype = self.dtype(name)
        step = staging.numel(dtype)
        for i in range(0, numel, step):
            (buf,) = staging.take(min(step, numel - i), dtype)
            self.read_into(name, start + i, buf)
            yield i, buf

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
