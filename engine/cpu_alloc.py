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

`EngineConfig.cpu_allocator` chooses (only when the engine's device is the CPU; `effective`,
engine/core.py): "auto" (default: jemalloc, below, where the host has it, else "reuse"),
"jemalloc", "reuse" (`keep_freed_blocks`), "system" (leave malloc alone) or "return"
(`return_freed_blocks`). The setting does not change results, only speed and the resident set.

What each setting does to the resident set (docs/benchmarks.md, "Peak memory", tests/bench/peak.py):
a rank's peak RSS is the process baseline plus the step's live bytes plus what malloc keeps of
freed memory. Under "reuse" the heap's high-water mark keeps every hole that the order of
allocations left (checkpointing's recomputation leaves most), and that order depends on when the
communication threads free their buffers: the two ranks of one run differ, and the heap keeps
growing over the first dozens of steps (a logits-sized block at a time). Glibc's own defaults
("system") keep less, still with holes, because its mmap threshold rises to 32 MiB after the
first large free. `return_freed_blocks()` fixes the threshold at 1 MiB: every block of 1 MiB or
more is mapped for its tensor and unmapped when it is freed, so the resident set is the baseline
plus the live bytes, the same on every rank, at the cost of page-faulting those blocks each step
(the speed table of that section).

jemalloc (the default, "auto", where the host has it). A size-class allocator keeps freed memory
per size class, so a block of one size never takes the hole another size left: with decay off
(JEMALLOC_CONF) it reuses freed pages like "reuse" (no page faults in a steady step) without
glibc's holes, and the two ranks of one run peak within a few MiB of each other. It cannot be
switched on inside a running process: the trainer re-executes itself once at its start with
LD_PRELOAD and MALLOC_CONF set (`reexec_with_jemalloc`, engine/train.py), before torch is
imported; torch's own CPU launcher (`torch.backends.xeon.run_cpu --enable_jemalloc`) preloads it
the same way. "auto" falls back to "reuse" with a printed note on a host without libjemalloc.so.2
(Debian: `apt install libjemalloc2`); "jemalloc" then stops the rank. The memory model counts
what jemalloc keeps as a share of the step's live bytes (engine/memory_shape.py
ALLOCATOR_RETENTION; docs/benchmarks.md "Peak memory").
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import signal
import sys
from collections.abc import Mapping

from dsl.topology.host import JEMALLOC_SONAME, find_library

__all__ = ["keep_freed_blocks", "return_freed_blocks", "M_TRIM_THRESHOLD", "M_MMAP_THRESHOLD", "M_MMAP_MAX",
           "JEMALLOC_CONF", "find_jemalloc", "jemalloc_active", "preload_env", "reexec_with_jemalloc", "effective"]

JEMALLOC_CONF = "dirty_decay_ms:-1,muzzy_decay_ms:-1,oversize_threshold:0"
"""MALLOC_CONF of the preloaded jemalloc: freed pages are never purged (decay off: no page faults
in a steady step), and large blocks stay in the thread's arena instead of a separate one that
purges at once (oversize_threshold:0; measured: 1.03-1.13x the live bytes + baseline, against
1.04-1.21x with jemalloc's default threshold; tests/bench/peak.py)."""
PRELOADED_ENV = "DSL_JEMALLOC_PRELOADED"
"""Set in the re-executed trainer's environment: it re-executes at most once."""

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


def find_jemalloc() -> str | None:
    """The path of libjemalloc.so.2 on this host, or None (topology/host.py `find_library`)."""
    return find_library(JEMALLOC_SONAME)


def jemalloc_active() -> bool:
    """True when this process's malloc is jemalloc (preloaded: its `mallctl` is a global symbol)."""
    try:
        return hasattr(ctypes.CDLL(None), "mallctl")
    except OSError:
        return False


def gpu_host(environ: Mapping[str, str] | None = None) -> bool:
    """An NVIDIA GPU is visible to this process (torch-free: the driver's device files)."""
    environ = os.environ if environ is None else environ
    if environ.get("CUDA_VISIBLE_DEVICES") in ("", "-1"):
        return False
    return os.path.exists("/dev/nvidiactl")


def preload_env(setting: str, environ: Mapping[str, str], library: str | None,
                on_gpu_host: bool = False) -> dict[str, str] | None:
    """The environment to re-execute the trainer with so that jemalloc is its malloc, or None
    when nothing is to change: the setting is not auto/jemalloc, this is a GPU host (its device
    is not the CPU), it already ran preloaded, or (auto) the library is missing. A missing
    library under "jemalloc" is a ValueError with what to install."""
    if setting not in ("auto", "jemalloc") or on_gpu_host or environ.get(PRELOADED_ENV):
        return None
    if library is None:
        if setting == "jemalloc":
            raise ValueError(f"engine.cpu_allocator: jemalloc, but {JEMALLOC_SONAME} is not on this host "
                             "(Debian/Ubuntu: apt install libjemalloc2); use auto to fall back to reuse")
        return None
    env = dict(environ)
    preload = env.get("LD_PRELOAD", "")
    env["LD_PRELOAD"] = f"{library}:{preload}" if preload else library
    env.setdefault("MALLOC_CONF", JEMALLOC_CONF)  # a user's own MALLOC_CONF wins
    env[PRELOADED_ENV] = "1"
    return env


def reexec_with_jemalloc(setting: str, warning_signals: tuple[int, ...] = ()) -> str | None:
    """Replace this process by itself with jemalloc preloaded (`preload_env`). Returns when there
    is nothing to do: with the note to print when "auto" found no library on this CPU host, else
    None. The warning signals are blocked across the exec (a blocked, pending signal survives it)
    so that one arriving in between waits for the new process's handlers: the trainer unblocks
    them once its handlers are installed."""
    library, on_gpu = find_jemalloc(), gpu_host()
    env = preload_env(setting, os.environ, library, on_gpu)
    if env is None:
        if setting == "auto" and library is None and not on_gpu and not os.environ.get(PRELOADED_ENV) \
                and not jemalloc_active():
            return (f"engine.cpu_allocator: auto found no {JEMALLOC_SONAME} on this host (Debian/Ubuntu: apt "
                    "install libjemalloc2): glibc's malloc keeps freed blocks (reuse) and the peak resident set "
                    "can exceed the plan by the heap's holes (docs/benchmarks.md \"Peak memory\")")
        return None
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    if warning_signals:
        signal.pthread_sigmask(signal.SIG_BLOCK, warning_signals)
    try:
        os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)
    except OSError as err:  # the process goes on as it is, with glibc (effective() says so)
        if warning_signals:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, warning_signals)
        print(f"note: engine.cpu_allocator: {setting}: could not re-execute with {JEMALLOC_SONAME} preloaded "
              f"({err}); glibc's malloc stays", file=sys.stderr, flush=True)
    return None


def effective(setting: str, on_cpu: bool) -> tuple[str, list[str]]:
    """Apply `setting` to this process and say what its malloc does now: "jemalloc", "reuse",
    "system" or "return" ("none" off the CPU), with notes on settings that could not apply."""
    if not on_cpu:
        return "none", []
    if jemalloc_active():
        notes = ([f"engine.cpu_allocator: {setting} has no effect: jemalloc is this process's malloc "
                  "(LD_PRELOAD)"] if setting in ("reuse", "return") else [])
        return "jemalloc", notes
    if setting == "jemalloc":
        return ("reuse" if keep_freed_blocks() else "system"), [
            "engine.cpu_allocator: jemalloc applies where dsl's trainer starts the process (it preloads "
            f"{JEMALLOC_SONAME}); this process was started without it: glibc's malloc keeps freed "
            "blocks instead (reuse)"]
    if setting in ("auto", "reuse"):
        return ("reuse" if keep_freed_blocks() else "system"), []
    if setting == "return":
        return ("return" if return_freed_blocks() else "system"), []
    return "system", []
