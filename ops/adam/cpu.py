"""The fused Adam/AdamW step on CPU tensors: vectorised C++ (adam_cpu.cpp), built once per machine.

Why C++ and not `torch.compile`: both were measured on this machine (2 cores, AVX-512, shared
with other jobs; 50M fp32 elements, best of 8 runs side by side): the C++ loop ran the plain
step in ~64 ms against torch.compile's ~122 ms (torch's own fused AdamW: ~69 ms), and the full
step (bf16 grad, bf16 copy out) in ~74 ms against ~136 ms; torch.compile also costs a 10-45 s
compile per process and shape. `python tests/bench/optim.py --compile` repeats the comparison.
The C++ source is plain loops that GCC vectorises (-O3 -march=native
-mprefer-vector-width=512); it uses no torch headers (a C ABI on data pointers, called through
ctypes), so the build takes ~1-3 s instead of the ~45 s that <torch/extension.h> costs.

Algorithm and bytes: one pass over the buffers, see reference.py for the exact per-element
math (the kernel equals the reference bit for bit). Per element it reads grad (4 or 2 bytes),
param, exp_avg, exp_avg_sq (12) and writes param, exp_avg, exp_avg_sq (12) and optionally the
bf16/fp16 copy (2): 28 bytes for the plain fp32 step and 28 for the full step (bf16 grad in,
bf16 copy out), against 28 + 6 for torch's fused AdamW followed by a separate copy. The copy is
written with streaming stores (no read of the destination line first; measured ~8-13% off the
full step). With `check_finite` a read-only scan of the gradient (4 or 2 bytes) runs first,
and nothing is written when it finds inf/nan.

Threads: OpenMP (`torch.get_num_threads()` of them) taking chunks of 16K elements dynamically,
so that a thread descheduled by another process does not hold the step up. The extension
links the same libgomp soname as torch, so it shares torch's OpenMP runtime.

Build: `torch.utils.cpp_extension.load` (ninja, a file lock so that ranks building at once wait
for one another, rebuild when the source or flags change) into
`$DSL_CACHE_DIR/ops` (default `~/.cache/dsl/ops`), one folder per torch version and CPU-flag set
(`-march=native` code must not run on another CPU model sharing the home folder). A second
process finds the built library up to date and only loads it (~0.1 s, cpp_extension's import
included).

A failed build is not fatal: `load()` raises `BuildError` with the compiler's reason in one line
(the full output is kept in the build folder as build-error.log); `dsl.ops.adam.adam_step` then
runs the reference implementation (the same numbers, several passes, slower) after one warning,
and the engine (engine/optim.py) uses torch's fused AdamW. `DSL_ADAM_CPU=reference` skips the
build on purpose. fp16 gradients/copies go through small fp32 stack buffers converted with
F16C/AVX-512 instructions (GCC 12 leaves _Float16 conversions scalar).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import sys
from pathlib import Path

import torch

from dsl.ops.adam.reference import Coefficients, check_buffers

__all__ = ["BuildError", "load", "adam_step_cpu", "nonfinite_cpu", "cache_dir", "CFLAGS"]

SOURCE = Path(__file__).with_name("adam_cpu.cpp")
CFLAGS = ["-O3", "-march=native", "-ffp-contract=off", "-fno-math-errno", "-fopenmp"]
if platform.machine() in ("x86_64", "AMD64"):
    CFLAGS.append("-mprefer-vector-width=512")  # GCC's default on AVX-512 CPUs is 256-bit vectors
"""-ffp-contract=off keeps each multiply and add rounded separately (the reference's order);
-fno-math-errno lets sqrtf vectorise."""

_DTYPE_CODE = {None: 0, torch.float32: 1, torch.bfloat16: 2, torch.float16: 3}


class BuildError(RuntimeError):
    """The C++ kernel could not be built or loaded (no compiler, no Python headers, ...)."""


def cache_dir() -> Path:
    """Folder of the built library: per torch version and per CPU-flag set."""
    root = Path(os.environ.get("DSL_CACHE_DIR") or Path.home() / ".cache" / "dsl") / "ops"
    key = hashlib.sha256(f"{torch.__version__}|{sys.version_info[:2]}|{_cpu_flags()}".encode()).hexdigest()[:12]
    return root / f"adam_cpu-{key}"


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return line
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _ensure_ninja_on_path() -> None:
    """cpp_extension runs `ninja` from PATH; the `ninja` wheel puts it in the venv's bin folder,
    which is not on PATH when the venv's python is run without activating the venv."""
    if shutil.which("ninja"):
        return
    try:
        import ninja  # type: ignore[import-not-found]
    except ImportError:
        return
    os.environ["PATH"] = f"{ninja.BIN_DIR}{os.pathsep}{os.environ.get('PATH', '')}"


def _reason(text: str) -> str:
    """The line of a compiler/ninja output that says what went wrong."""
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    for ln in lines:
        if any(w in ln.lower() for w in ("error:", "not found", "no such file", "fatal")):
            return ln
    return lines[-1] if lines else "no output"


@functools.cache
def load() -> ctypes.CDLL:
    """Build (first time) and load the kernel library; BuildError if that fails."""
    from torch.utils import cpp_extension

    _ensure_ninja_on_path()
    build = cache_dir()
    build.mkdir(parents=True, exist_ok=True)
    try:
        path = cpp_extension.load(
            name="dsl_adam_cpu", sources=[str(SOURCE)], extra_cflags=CFLAGS, extra_ldflags=["-fopenmp"],
            build_directory=str(build), is_python_module=False, verbose=False,
        )  # fmt: skip
        lib = ctypes.CDLL(str(path) if path else str(build / "dsl_adam_cpu.so"))
    except (RuntimeError, OSError, ImportError) as e:
        log_file = build / "build-error.log"
        log_file.write_text(str(e))
        raise BuildError(f"building the fused CPU Adam kernel failed: {_reason(str(e))} "
                         f"(full output: {log_file})") from e
    c_int, c_i64, c_p = ctypes.c_int, ctypes.c_int64, ctypes.c_void_p
    lib.dsl_adam_step.argtypes = [c_int, c_p, c_p, c_p, c_p, c_int, c_p, c_i64, c_int, c_p, c_int]
    lib.dsl_adam_step.restype = c_int
    lib.dsl_nonfinite.argtypes = [c_int, c_p, c_i64, c_int]
    lib.dsl_nonfinite.restype = c_int
    return lib


def nonfinite_cpu(t: torch.Tensor) -> bool:
    """True when the contiguous CPU tensor `t` (fp32, bf16 or fp16) holds inf or nan."""
    if t.dtype not in _DTYPE_CODE or not t.is_contiguous() or t.device.type != "cpu":
        raise ValueError(f"nonfinite_cpu: needs a contiguous CPU fp32/bf16/fp16 tensor, got {t.dtype} on {t.device}")
    if t.numel() == 0:
        return False
    r = load().dsl_nonfinite(_DTYPE_CODE[t.dtype], t.data_ptr(), t.numel(), torch.get_num_threads())
    if r < 0:
        raise ValueError(f"nonfinite_cpu: unsupported dtype {t.dtype}")
    return bool(r)


def adam_step_cpu(
    param: torch.Tensor, grad: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor,
    coef: Coefficients, *, param_lp: torch.Tensor | None = None, check_finite: bool = True,
) -> bool:
    """One fused step in place on CPU tensors (see the module docstring); True = inf/nan found,
    nothing written."""
    check_buffers(param, grad, exp_avg, exp_avg_sq, param_lp)
    if param.device.type != "cpu":
        raise ValueError(f"adam_step_cpu: tensors must be on the CPU, got {param.device}")
    n = param.numel()
    if n == 0:
        return False
    lib = load()
    threads = torch.get_num_threads()
    if check_finite and lib.dsl_nonfinite(_DTYPE_CODE[grad.dtype], grad.data_ptr(), n, threads):
        return True
    coefs = (ctypes.c_float * 10)(*coef.as_list())
    rc = lib.dsl_adam_step(
        _DTYPE_CODE[grad.dtype], grad.data_ptr(), param.data_ptr(), exp_avg.data_ptr(), exp_avg_sq.data_ptr(),
        _DTYPE_CODE[None if param_lp is None else param_lp.dtype], None if param_lp is None else param_lp.data_ptr(),
        n, int(coef.decoupled), ctypes.addressof(coefs), threads,
    )  # fmt: skip
    if rc != 0:
        raise ValueError(f"adam_step_cpu: kernel refused dtypes (code {rc})")
    return False
