"""CPU training: keep freed large memory blocks in the process for the next step.

glibc's malloc serves a block above its mmap threshold (at most 32 MiB; a vocabulary-sized
gradient or the logits are larger) with freshly mapped pages and unmaps it on free. A training
step frees and re-allocates the same large tensors every step (gradients, logits, communication
staging buffers), so every step page-faults them in again: the kernel zeroes each 4 KiB page on
first touch. Measured on this project's 2-core machine (tests/bench, the `comm` shape, 2 ranks,
paired runs): steps 1.15x faster for dsl at ZeRO 2 and 1.13x for torch DDP with the setting below.

`keep_freed_blocks()` sets `M_MMAP_MAX = 0` (every block comes from the heap) and
`M_TRIM_THRESHOLD` to 2 GiB (freed heap memory stays in the process unless 2 GiB of it sits
at the top): the next step reuses the same pages, as CUDA's caching allocator does on a GPU
and as Intel's CPU launcher gets by preloading tcmalloc/jemalloc. The cost: memory a step frees
is not returned to the OS, so resident memory stays at its peak; and like any heap, a workload
whose allocation sizes keep changing can fragment it. It applies to the whole process (the
engine runs one rank per process) and is a no-op off glibc.

`EngineConfig.cpu_allocator` chooses: "reuse" (default; only when the engine's device is the
CPU, `keep_freed_blocks`), "system" (leave malloc alone) or "return" (`return_freed_blocks`,
engine/core.py). The setting does not change results, only speed and the resident set.

What each setting does to the resident set (docs/benchmarks.md, "Peak memory", tests/bench/peak.py):
a rank's peak RSS is the process baseline plus the step's live bytes plus what malloc keeps of
freed memory. Under "reuse" the heap's high-water mark keeps every hole that the order of
allocations left (checkpointing's recomputation leaves most), and that order depends on when the
communication threads free their buffers: the two ranks of one run differ. Glibc's own defaults
("system") keep less, still with holes, because its mmap threshold rises to 32 MiB after the
first large free. `return_freed_blocks()` fixes the threshold at 1 MiB: every block of 1 MiB or
more is mapped for its tensor and unmapped when it is freed, so the resident set is the baseline
plus the live bytes, the same on every rank, at the cost of page-faulting those blocks each step
(the speed table of that section).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

__all__ = ["keep_freed_blocks", "return_freed_blocks", "M_TRIM_THRESHOLD", "M_MMAP_THRESHOLD", "M_MMAP_MAX"]

M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
M_MMAP_MAX = -4
"""glibc's mallopt parameter numbers (malloc.h)."""
TRIM_BYTES = 2**31 - 1
"""mallopt takes an int: the largest trim threshold it can express."""

RETURN_BYTES = 1 << 20
"""`return_freed_blocks`' mmap and trim threshold: blocks from 1 MiB up are mapped per tensor
(8 MiB left the bench's activations in the heap, 11% over the live bytes, tests/bench/peak.py)."""

_applied: bool | None = None


def _mallopt():
    """glibc's mallopt, or None off glibc."""
    if not sys.platform.startswith("linux"):
        return None
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return None
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return mallopt


def return_freed_blocks(threshold_bytes: int = RETURN_BYTES) -> bool:
    """Make this process's malloc map every block of `threshold_bytes` or more on its own and
    unmap it on free, and trim the heap's top above that size (module docstring); True when glibc
    took both settings. A fixed M_MMAP_THRESHOLD also turns off glibc's dynamic threshold."""
    mallopt = _mallopt()
    return (mallopt is not None and mallopt(M_MMAP_THRESHOLD, threshold_bytes) == 1
            and mallopt(M_TRIM_THRESHOLD, threshold_bytes) == 1)


def keep_freed_blocks() -> bool:
    """Make this process's malloc keep freed blocks (see the module docstring); True when glibc
    took both settings (now or by an earlier call)."""
    global _applied
    if _applied is not None:
        return _applied
    mallopt = _mallopt()
    _applied = mallopt is not None and mallopt(M_MMAP_MAX, 0) == 1 and mallopt(M_TRIM_THRESHOLD, TRIM_BYTES) == 1
    return _applied
