"""Sequential read/write bandwidth of a disk, measured with O_DIRECT (opt-in: it writes a file).

`measure(folder)` writes one temporary file of at most `size_mib` in `block_mib` blocks with
O_DIRECT (no page cache, so the figure is the device's, not RAM's), fsyncs it, reads it back
the same way and deletes it. Both phases stop early at `time_limit_s`, so a slow disk costs
bounded time. Buffers come from mmap, which is page-aligned as O_DIRECT requires. Filesystems
without O_DIRECT (tmpfs, some overlay setups) give None with the reason.

This is what NVMe optimizer offload will stream at (DeepSpeed's ds_nvme_tune measures the same
with libaio and many queues; one synchronous stream under-reports a fast NVMe by up to ~2x, so the
planner treats the figure as a floor).
"""

from __future__ import annotations

import errno
import mmap
import os
import time
from dataclasses import dataclass

_MIB = 1 << 20


@dataclass(frozen=True)
class DiskBandwidth:
    folder: str
    read_gb_s: float | None
    write_gb_s: float | None
    bytes_written: int
    reason: str | None = None
    """Why a figure is missing, or None."""


def measure(folder: str | os.PathLike[str], size_mib: int = 512, block_mib: int = 8,
            time_limit_s: float = 5.0) -> DiskBandwidth:
    folder = os.fspath(folder)
    if not hasattr(os, "O_DIRECT"):
        return DiskBandwidth(folder, None, None, 0, "O_DIRECT is not available on this OS")
    path = os.path.join(folder, f".dsl-disk-probe-{os.getpid()}")
    block = block_mib * _MIB
    buf = mmap.mmap(-1, block)
    buf.write(os.urandom(_MIB) * block_mib)  # incompressible, so no controller shortcut
    written = 0
    try:
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_DIRECT, 0o600)
        except OSError as exc:
            if exc.errno == errno.EINVAL:
                return DiskBandwidth(folder, None, None, 0,
                                     f"{folder}: the filesystem does not support O_DIRECT (tmpfs?)")
            return DiskBandwidth(folder, None, None, 0, f"{folder}: cannot create a file: {exc.strerror}")
        try:
            start = time.perf_counter()
            while written < size_mib * _MIB and time.perf_counter() - start < time_limit_s:
                written += os.write(fd, buf)
            os.fsync(fd)
            write_s = time.perf_counter() - start
        finally:
            os.close(fd)
        fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
        read = 0
        try:
            start = time.perf_counter()
            while read < written and time.perf_counter() - start < time_limit_s:
                n = os.readv(fd, [buf])
                if n <= 0:
                    break
                read += n
            read_s = time.perf_counter() - start
        finally:
            os.close(fd)
        return DiskBandwidth(folder, round(read / read_s / 1e9, 2) if read_s > 0 and read else None,
                             round(written / write_s / 1e9, 2) if write_s > 0 else None, written)
    except OSError as exc:
        return DiskBandwidth(folder, None, None, written, f"{folder}: {exc.strerror or exc}")
    finally:
        buf.close()
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
