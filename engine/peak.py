"""A rank's measured peak memory, next to what the memory model predicts for it.

What a run reports (engine/train.py: every logged step in metrics.jsonl, the progress line when a
peak passes the prediction, the training summary):

- `host_peak_rss_bytes`: the process's peak resident set (`VmHWM` of /proc/self/status: the
  high-water mark the kernel keeps, so a peak between two logged steps is not missed). On a CPU
  device this is the rank's whole footprint: device and host are the same RAM.
- `host_peak_anon_bytes`: that peak less the file-backed pages resident now (RssFile + RssShmem:
  the mapped code of torch and the other libraries, fixed once they are loaded). This is what a
  CPU rank's prediction is compared with: how much of a mapped library is resident depends on
  the page cache, not on the run (measured on one machine, torch's libtorch_cpu.so: 49 MB resident
  in one install, 97 MB in a fresh copy of the same wheel, after dropping caches in both), and
  clean file pages are reclaimed before a process runs out of memory.
- on CUDA, `device_peak_allocated_bytes` / `device_peak_reserved_bytes`: the caching allocator's
  high-water marks (`torch.cuda.max_memory_allocated` / `max_memory_reserved`), the reserved one
  being what an out-of-memory error is about.
- `predicted_peak_bytes` (and `predicted_peak_phase`, the phase of the step it occurs in:
  engine/memory_peak.py): `engine.memory.estimate(...)` for this rank's configuration, the
  figure `dsl plan` shows per device: on a CPU device the whole RAM of the rank (host terms
  folded in, Python and torch's runtime included), on CUDA the device bytes (CUDA context and
  NCCL buffers included: a documented figure, or the host's measured one).

The memory model predicts the live peak (tests/unit/test_memory_peak_measured.py measures it);
on a CPU the prediction adds the process baseline (this host's, when `dsl probe
--measure-baseline` measured it: `host_baseline`, topology/baseline.py) and what the rank's
malloc keeps of freed memory (jemalloc by default, engine/cpu_alloc.py), so it is the resident
set's peak, within 10% per rank in tests/bench/peak.py; glibc keeping freed blocks
(`cpu_allocator: reuse|system`) adds heap holes the model does not count.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from dsl.engine.config import EngineConfig
    from dsl.engine.train_config import ModelConfig
    from dsl.topology.model import ProcessBaseline

__all__ = ["host_peak_rss_bytes", "host_peak_anon_bytes", "measured", "host_baseline", "predicted_peak",
           "predicted_peak_bytes", "PEAK_KEYS", "PEAK_TOLERANCE"]

PEAK_TOLERANCE = 0.10
"""How far above the prediction a measured peak may be before the progress line flags it: the
memory model's accuracy (docs/benchmarks.md "Peak memory": within 10% per rank under the default
allocator). On a CPU the runtime term is the baseline measured on one machine, and a small model's
peak is mostly that baseline: a few MiB more on another machine is not an over-plan peak."""
PEAK_KEYS = ("host_peak_rss_bytes", "device_peak_allocated_bytes", "device_peak_reserved_bytes",
             "host_peak_anon_bytes")
"""The measured figures, in the order `measured` gives them (device ones 0 off CUDA)."""


def _status_kib(*keys: str) -> dict[str, int]:
    out: dict[str, int] = {}
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                name = line.split(":", 1)[0]
                if name in keys:
                    out[name] = int(line.split()[1])
    except OSError:
        pass
    return out


def host_peak_rss_bytes() -> int:
    """This process's peak resident set in bytes (VmHWM); 0 where /proc is not available."""
    return _status_kib("VmHWM").get("VmHWM", 0) * 1024


def host_peak_anon_bytes() -> int:
    """VmHWM less the file-backed pages resident now (RssFile + RssShmem; module docstring)."""
    kib = _status_kib("VmHWM", "RssFile", "RssShmem")
    return max(0, kib.get("VmHWM", 0) - kib.get("RssFile", 0) - kib.get("RssShmem", 0)) * 1024


def measured(device: torch.device) -> list[int]:
    """[host peak RSS, CUDA peak allocated, CUDA peak reserved, host peak less file pages] of this
    rank (PEAK_KEYS order)."""
    out = [host_peak_rss_bytes(), 0, 0, host_peak_anon_bytes()]
    if device.type == "cuda":
        out[1] = torch.cuda.max_memory_allocated(device)
        out[2] = torch.cuda.max_memory_reserved(device)
    return out


def host_baseline() -> ProcessBaseline | None:
    """This host's measured process baseline for this Python (topology/baseline.py), or None when
    it was not measured: the runtime term of a CPU rank, and of a GPU rank when it holds the
    device's figure (engine/memory_shape.py)."""
    from dsl.topology.baseline import load

    return load()[0]


def predicted_peak(model: "ModelConfig", engine: "EngineConfig", *, dp: int, device: torch.device,
                   **kw: Any) -> tuple[int, str]:
    """The memory model's peak bytes for one rank (the device's on CUDA, the whole rank's on a
    CPU) and the phase of the step where it occurs (engine/memory_peak.py)."""
    from dsl.engine.memory import estimate

    b = estimate(model, engine, dp=dp, accelerator=device.type == "cuda", **kw)
    return b.device_bytes, b.peak.phase


def predicted_peak_bytes(model: "ModelConfig", engine: "EngineConfig", *, dp: int, device: torch.device,
                         **kw: Any) -> int:
    """`predicted_peak`'s bytes."""
    return predicted_peak(model, engine, dp=dp, device=device, **kw)[0]
