"""Build and load onebit_kernels.c (fused 1-bit compression on CPU) with the system C compiler.

Why C through ctypes and not torch ops: compressing x with error feedback in eager torch takes
~8 passes over the data plus bool/uint8 conversions (~1 s for 100M elements on one core here),
which would eat most of what 1 bit per element saves on a 1 Gbit/s link. The C kernels do it in
about one pass (two per block, in L1). No torch headers are included, so the build takes well under a second (a torch C++
extension takes a minute); ctypes releases the GIL during the calls.

The shared library is cached under `$DSL_CACHE_DIR` (default `~/.cache/dsl`) in a folder named
by a hash of the source, the compiler flags and this CPU's flags (`-march=native` code must not
run on another CPU model sharing the same home directory). Concurrent ranks race safely: each
compiles to a temporary name and renames it into place.

`kernels()` returns the loaded library or None (no compiler, a failed build, a non-x86/ARM
machine, or `DSL_ONEBIT_NATIVE=0`); callers then use the torch implementation in signs.py,
which is also the reference the tests compare the kernels with.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from functools import lru_cache
from pathlib import Path

__all__ = ["kernels"]

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("onebit_kernels.c")
FLAGS = ["-O3", "-march=native", "-fopenmp-simd", "-fPIC", "-shared", "-fno-math-errno"]


def _cpu_id() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _cache_dir() -> Path:
    return Path(os.environ.get("DSL_CACHE_DIR") or Path.home() / ".cache" / "dsl")


@lru_cache(maxsize=1)
def kernels() -> ctypes.CDLL | None:
    """The loaded kernels, or None when they cannot be built here (see the module docstring)."""
    if os.environ.get("DSL_ONEBIT_NATIVE", "1") == "0":
        return None
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        log.info("no C compiler found: 1-bit compression uses the torch implementation")
        return None
    source = SOURCE.read_bytes()
    key = hashlib.sha256(source + " ".join([compiler, *FLAGS, _cpu_id()]).encode()).hexdigest()[:16]
    lib_path = _cache_dir() / "onebit" / key / "libdsl_onebit.so"
    if not lib_path.exists():
        lib_path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=lib_path.parent)
        os.close(fd)
        try:
            subprocess.run([compiler, *FLAGS, str(SOURCE), "-o", tmp], check=True,
                           capture_output=True, text=True, timeout=120)
            os.replace(tmp, lib_path)
        except (OSError, subprocess.SubprocessError) as err:
            detail = getattr(err, "stderr", "") or str(err)
            log.warning("building %s failed; 1-bit compression uses the torch implementation: %s",
                        SOURCE.name, detail.strip()[-500:])
            Path(tmp).unlink(missing_ok=True)
            return None
    lib = ctypes.CDLL(str(lib_path))
    ptr, i64 = ctypes.c_void_p, ctypes.c_int64
    lib.dsl_compress_blocks.argtypes = [ptr, ptr, i64, i64, ptr, ptr]
    lib.dsl_compress_blocks.restype = None
    lib.dsl_decompress_blocks.argtypes = [ptr, ptr, i64, i64, ctypes.c_float, ptr, ctypes.c_int]
    lib.dsl_decompress_blocks.restype = None
    lib.dsl_server_blocks.argtypes = [ptr, ptr, i64, i64, ctypes.c_float, ptr, i64, i64, ptr, ptr]
    lib.dsl_server_blocks.restype = None
    return lib
